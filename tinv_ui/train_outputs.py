"""What a training run writes: the loss CSV, the `<name>-<N>` copies with their `.optim` (and resume state),
the final file, previews and the settings JSON. Every write is atomic (`fileio`), and a full disk ends the
run with one message (docs/reliability.md) while the previous file stays whole.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import time
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__, formats
from .config import GenerateConfig, TrainConfig
from .embedding import Embedding
from .errors import TrainingError
from .events import Preview
from .fileio import atomic_write_text, disk_full_is_said

if TYPE_CHECKING:
    from .train_setup import Plan, Run

log = logging.getLogger(__name__)

CSV_FLUSH_SECONDS = 5.0
CSV_HEADER = "step,epoch,epoch_step,loss,learn_rate\n"
RESUME_KEY = "tinv_ui_resume"  # the `.optim` key of the data/noise RNG states and the data-order position


def disk_full_is_a_training_error(path: Path) -> contextlib.AbstractContextManager[None]:
    """Turn a full disk while writing `path` into the documented `TrainingError` (see `fileio.is_disk_full`:
    torch's zip writer reports a full disk as a RuntimeError "unexpected pos …", which counts too)."""
    return disk_full_is_said(path, "free some space and resume.", TrainingError)


class LossLog:
    """`textual_inversion_loss.csv` with A1111's columns; the header is written once, rows are appended.

    A resumed run continues the file of its folder, without the rows of steps it will train again (a run
    that crashed after its last copy), so every step appears once. Every write is an atomic rewrite of the
    whole file (fileio has no append), so rows are buffered and flushed at most every few seconds.
    """

    def __init__(self, path: Path, initial_step: int) -> None:
        self.path = path
        existing = path.read_text(encoding="utf-8") if path.is_file() else ""
        lines = existing.splitlines(keepends=True)
        self.lines = [CSV_HEADER] + [line if line.endswith("\n") else line + "\n" for line in lines[1:]
                                     if _row_step(line) is not None and _row_step(line) <= initial_step]
        self._dirty = len(self.lines) != len(lines)
        self._flushed = 0.0

    def add(self, step: int, epoch: int, epoch_step: int, loss: float, lr: float) -> None:
        """Append a row (flushed later)."""
        self.lines.append(f"{step},{epoch},{epoch_step},{loss:.7f},{lr}\n")
        self._dirty = True
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Write the file if rows are pending (and, unless forced, the last write is a few seconds old)."""
        if self._dirty and (force or time.monotonic() - self._flushed > CSV_FLUSH_SECONDS):
            with disk_full_is_a_training_error(self.path):
                atomic_write_text(self.path, "".join(self.lines))
            self._dirty, self._flushed = False, time.monotonic()


def _row_step(line: str) -> int | None:
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() else None


# -- embedding files -------------------------------------------------------------------------------------
def embedding_at(run: Run, vectors: torch.Tensor, step: int, name: str | None = None) -> Embedding:
    """The trained embedding with `vectors` at `step`, tagged with the loaded model (A1111's meta keys)."""
    info = run.studio.info
    meta = {**run.plan.embedding.meta, "sd_checkpoint": info.hash if info else None,
            "sd_checkpoint_name": info.name if info else None}
    return replace(run.plan.embedding.with_vectors(vectors, step=step, name=name), meta=meta)


def _cpu_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    state["state"] = {k: {n: (t.detach().cpu() if torch.is_tensor(t) else t) for n, t in s.items()}
                      for k, s in state["state"].items()}
    return state


def write_embedding(run: Run, emb: Embedding, path: Path, with_optimizer: bool) -> Path:
    """Write an embedding, and with `with_optimizer` its `.optim`: AdamW's state plus the resume state
    (data/noise RNGs and data-order position), so that a resumed run continues exactly where this one is."""
    with disk_full_is_a_training_error(path):
        formats.write(emb, path)
    if with_optimizer and run.cfg.save_optimizer_state:
        with disk_full_is_a_training_error(formats.optim_path(path)):
            formats.write_optim(path, emb, _cpu_state(run.optimizer), {RESUME_KEY: run.resume_state()})
    return path


def copy_path(plan: Plan, step: int) -> Path:
    """`<out_dir>/embeddings/<name>-<N><suffix>`, in the embedding's own format (its file's suffix)."""
    return plan.out_dir / "embeddings" / f"{plan.name}-{step}{plan.path.suffix.lower()}"


def save_copy(run: Run, step: int) -> Path:
    """The periodic copy `<name>-<N>`: exactly N steps (no A1111 off-by-one), with its `.optim`."""
    emb = embedding_at(run, run.vectors, step, f"{run.name}-{step}")
    return write_embedding(run, emb, copy_path(run.plan, step), with_optimizer=True)


def save_final(run: Run, vectors: torch.Tensor | None = None, with_optimizer: bool = True) -> Path:
    """Overwrite the trained embedding's own library file (atomically) with `vectors` at `run.step`."""
    vectors = run.vectors if vectors is None else vectors
    path = write_embedding(run, embedding_at(run, vectors, run.step), run.plan.path, with_optimizer)
    log.info("saved %s at step %d to %s", run.name, run.step, path)
    return path


# -- previews and settings ----------------------------------------------------------------------------------
def _preview_config(cfg: TrainConfig, prompt: str) -> GenerateConfig:
    return GenerateConfig(
        prompt=cfg.preview_prompt or prompt, negative_prompt=cfg.preview_negative_prompt, sampler=cfg.preview_sampler,
        steps=cfg.preview_steps, cfg_scale=cfg.preview_cfg, seed=cfg.preview_seed, width=cfg.width,
        height=cfg.height, batch_count=1, batch_size=1, save=False,
    )


def render_preview(run: Run, step: int, prompt: str) -> Preview:
    """Render `images/<name>-<N>.png` with the in-training vectors and the fixed preview seed."""
    from . import generation

    gen_cfg = _preview_config(run.cfg, prompt)
    vectors = run.named_vectors()
    with run.studio.session(what=f"training {run.name}: preview at step {step}"):
        if run.preview_pipeline is None:  # once per run: its sampler and UNet do not change during the run
            # a compiled run draws with the studio's compiled UNet (Generate's; the trainer's own wrapper is
            # compiled for training shapes with CUDA graphs)
            run.preview_pipeline = generation.sampling_pipeline(run.studio, gen_cfg.sampler, compiled=run.compiled)
        rendered = generation.render(run.studio, gen_cfg, vectors, run.plan.hashes, pipe=run.preview_pipeline)
        if run.vae_hook is not None:
            run.vae_hook.offload()
    path = run.plan.out_dir / "images" / f"{run.name}-{step}.png"
    with disk_full_is_a_training_error(path):
        generation.save_png(rendered[0].image, path, rendered[0].infotext)
    if run.cfg.save_image_with_stored_embedding:
        save_image_embedding(run, step, rendered[0].image)
    return Preview(step, (rendered[0].image,), gen_cfg.prompt, (path,))


def image_embedding_path(plan: Plan, step: int) -> Path:
    """`<out_dir>/image_embeddings/<name>-<N>.png` (A1111's folder and name)."""
    return plan.out_dir / "image_embeddings" / f"{plan.name}-{step}.png"


def save_image_embedding(run: Run, step: int, preview: Any) -> Path:
    """The preview at step N with the embedding at step N inside it, as A1111's "Save images with embedding in
    PNG chunks" writes it (modules/textual_inversion/image_embedding.py): the `sd-ti-embedding` text chunk and
    the data in the pixels on both sides of the picture. A1111 also draws a caption over the picture; the data,
    which is what A1111 and this app load, is encoded the same. Its internal name is `<name>-<N>`, like the copy's."""
    path = image_embedding_path(run.plan, step)
    emb = embedding_at(run, run.vectors, step, f"{run.name}-{step}")
    with disk_full_is_a_training_error(path):
        formats.write(emb, path, image=preview)
    return path


def _jsonable(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value


def write_settings(studio, plan: Plan) -> Path:
    """`settings-YYYY-MM-DD-HH-MM-SS.json`: A1111's keys (its `save_settings_to_file` in
    modules/textual_inversion/textual_inversion.py) plus everything else under `tinv_ui`."""
    cfg, now, info = plan.cfg, _dt.datetime.now(), studio.info
    settings = {
        "datetime": now.strftime("%Y-%m-%d %H:%M:%S"), "model_name": info.name if info else None,
        "model_hash": info.hash if info else None, "num_of_dataset_images": len(plan.dataset),
        "num_vectors_per_token": plan.embedding.num_vectors, "embedding_name": plan.name,
        "learn_rate": cfg.learn_rate, "batch_size": cfg.batch_size, "gradient_step": cfg.gradient_accumulation,
        "data_root": str(plan.dataset.folder), "log_directory": str(plan.out_dir), "training_width": cfg.width,
        "training_height": cfg.height, "steps": cfg.max_steps, "clip_grad_mode": cfg.clip_grad_mode.value,
        "clip_grad_value": cfg.clip_grad_value, "latent_sampling_method": cfg.latent_sampling.value,
        "create_image_every": cfg.preview_every, "save_embedding_every": cfg.save_every,
        "save_image_with_stored_embedding": cfg.save_image_with_stored_embedding, "template_file": str(plan.prompts.template.path),
        "initial_step": plan.initial_step, "preview_prompt": cfg.preview_prompt,
        "preview_negative_prompt": cfg.preview_negative_prompt, "preview_steps": cfg.preview_steps,
        "preview_sampler_name": cfg.preview_sampler, "preview_cfg_scale": cfg.preview_cfg,
        "preview_seed": cfg.preview_seed, "preview_width": cfg.width, "preview_height": cfg.height,
        "tinv_ui": {"version": __version__, "seed": plan.seed, "skipped_files": list(plan.dataset.skipped),
                    "resumed_from": str(plan.start_file), "config": {k: _jsonable(v) for k, v in asdict(cfg).items()}},
    }
    stamp = now.strftime("%Y-%m-%d-%H-%M-%S")
    path, number = plan.out_dir / f"settings-{stamp}.json", 1
    while path.exists():  # two runs started within a second: never overwrite another run's settings
        number += 1
        path = plan.out_dir / f"settings-{stamp}-{number}.json"
    with disk_full_is_a_training_error(path):
        return atomic_write_text(path, json.dumps(settings, indent=4, ensure_ascii=False) + "\n")
