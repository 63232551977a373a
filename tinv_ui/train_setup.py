"""Setting up a training run: the pre-flight checks (everything that can fail before GPU work), where the run
starts from (the embedding file, or the newer copy a killed run left) and writes to, and the run's live state.

`preflight` returns a frozen `Plan`; `prepare` (under the studio's lock) turns it into a `Run`: latents, the
trainable vectors, the noise scheduler and the data order, restored from the `.optim` when it holds them.
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import formats, sdxl
from .config import ClipGrad, Paths, TrainConfig
from .dataset import BucketBatchSampler, Dataset, LatentCache, build_latent_cache, load_dataset
from .embedding import Embedding
from .errors import ConfigError, ShapeMismatchError, TinvError, TrainingError
from .fileio import existing_parent, temp_target
from .schedules import Schedule, parse_schedule
from .studio import Studio
from .templates import PromptBuilder, Template, load_template
from .tokens import PromptEncoder, PromptTokenizer
from .train_outputs import RESUME_KEY, LossLog
from .train_speed import amp_dtype, half_text_encoder, half_text_encoder_wanted, memory_format, vae_offload_wanted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything pre-flight established (no GPU work yet)."""

    cfg: TrainConfig
    embedding: Embedding  # the vectors and step the run starts from
    path: Path  # the library file the final result overwrites
    start_file: Path  # where the starting vectors come from: `path`, or a newer copy left by a killed run
    others: dict[str, Any]  # the other loaded embeddings, usable in captions (SDXL: name -> clip_l/clip_g pair)
    hashes: dict[str, str]
    lr: Schedule
    clip: Schedule | None
    prompts: PromptBuilder
    dataset: Dataset
    out_dir: Path
    seed: int
    sidecar: dict | None  # the `.optim` of `start_file` when it fits these vectors (AdamW state, resume state)
    notes: tuple[str, ...] = ()  # sentences for the Started message

    @property
    def name(self) -> str:
        return self.embedding.name

    @property
    def initial_step(self) -> int:
        return self.embedding.step or 0


# ---------------------------------------------------------------------------------------------------
# Pre-flight: every check that can fail, before any GPU work
# ---------------------------------------------------------------------------------------------------
def preflight(studio: Studio, cfg: TrainConfig, library, paths: Paths) -> Plan:
    """Run every check that can fail before touching the GPU; returns what the run needs."""
    emb, path, start_file, notes = starting_point(studio, cfg.embedding, cfg.log_dir, library, paths)
    root = _log_root(cfg.log_dir, paths)
    _check_steps(cfg, emb)
    lr = parse_schedule(cfg.learn_rate, cfg.max_steps, emb.step or 0, "learn_rate")
    clip = None
    if cfg.clip_grad_mode != ClipGrad.DISABLED:
        clip = parse_schedule(cfg.clip_grad_value, cfg.max_steps, emb.step or 0, "clip_grad_value")
    builder = prompt_builder(cfg, emb.name)
    dataset = load_dataset(cfg.dataset_dir, train_size(cfg), cfg.filename_regex, cfg.filename_join,
                           cfg.use_alpha_weight)
    usable = sdxl.library_pairs(library) if studio.is_sdxl else library.vectors()
    others = {k: v for k, v in usable.items() if k.lower() != emb.name.lower()}
    _check_name_in_prompts(studio, builder, dataset, others, emb.num_vectors)
    out_dir = _output_dir(root, emb.name, emb.step or 0)
    _check_disk(cfg, emb, out_dir, path)
    hashes = {k: v for k, v in library.hashes().items() if k.lower() != emb.name.lower()}
    sidecar = formats.read_optim_sidecar(start_file, emb) if cfg.save_optimizer_state else None
    seed, sidecar, order_note = _seed_and_resume_state(cfg, sidecar, emb.step or 0)
    notes += (order_note,) if order_note else ()
    return Plan(cfg, emb, path, start_file, others, hashes, lr, clip, builder, dataset, out_dir, seed, sidecar,
                notes)


def prompt_builder(cfg: TrainConfig, name: str) -> PromptBuilder:
    """The run's prompts: `cfg.template` loaded and checked, filled for the embedding `name` (also what the
    Train panel's dataset preview shows)."""
    template: Template = load_template(cfg.template)
    template.check()
    return PromptBuilder(template, name, cfg.shuffle_tags, cfg.tag_dropout)


def train_size(cfg: TrainConfig) -> tuple[int, int] | None:
    """The size images are resized to, or None with `keep_size` (each its own size, in buckets)."""
    return None if cfg.keep_size else (cfg.width, cfg.height)


def starting_point(studio: Studio, name: str, log_dir: str, library, paths: Paths) -> tuple[Embedding, Path, Path, tuple[str, ...]]:
    """Where a run of embedding `name` starts: (the vectors and their step, the library file, the file they
    come from, notes). The step is the file's, its `.optim`'s (SDXL), or that of a newer copy a killed run
    left under the log root. The Train panel's "what Start will do" line reads it from here too."""
    emb, path = _find_embedding(studio, name, library)
    emb = with_sidecar_step(path, emb)
    emb, start_file, notes = _newest_good_state(_log_root(log_dir, paths), emb, path)
    return emb, path, start_file, notes


def _find_embedding(studio: Studio, name: str, library) -> tuple[Embedding, Path]:
    expected = studio.embedding_width
    library.rescan_for(studio)
    wanted = name.strip().lower()
    if not any(n.lower() == wanted for n in library.loaded):
        for skipped in (s for s in library.skipped if s.name.lower() == wanted):
            try:
                skipped_emb = formats.read(skipped.path)
            except TinvError:  # unreadable: library.get below says why
                continue
            if skipped_emb.is_sdxl != studio.is_sdxl:
                raise ShapeMismatchError(f"embedding {skipped.name!r} ({skipped.path.name}) does not fit the loaded "
                                         f"model: {skipped.reason}.")
            width = skipped_emb.width
            if width != expected:
                raise ShapeMismatchError(
                    f"embedding {skipped.name!r} ({skipped.path.name}) does not fit the loaded model: expected "
                    f"vectors of width {expected}, actual {width}. Load the model it was made for, or create "
                    "a new embedding for this one."
                )
    entry = library.get(name.strip())
    emb = entry.embedding
    if emb.is_sdxl != studio.is_sdxl or emb.width != expected:
        kind = "an SDXL (clip_l + clip_g) embedding" if emb.is_sdxl else f"vectors of width {emb.width}"
        raise ShapeMismatchError(
            f"embedding {entry.name!r} has {kind}; the loaded model expects width {expected} "
            f"(expected {expected}, actual {emb.width}). Create a new embedding for this model."
        )
    if not bool(torch.isfinite(emb.all_vectors).all()):
        raise TrainingError(f"embedding {entry.name!r} contains NaN/inf values; create it again.")
    return replace(emb, name=entry.name), Path(entry.path)


def _log_root(log_dir: str, paths: Paths) -> Path:
    return Path(log_dir).expanduser() if log_dir.strip() else paths.outputs_dir / "train"


def _newest_good_state(root: Path, emb: Embedding, path: Path) -> tuple[Embedding, Path, tuple[str, ...]]:
    """The embedding as its file holds it, or the newest `<name>-<N>` copy that a run killed before its final
    save left behind (a higher step, written after the file): progress survives up to the last copy."""
    file_time = path.stat().st_mtime_ns
    pattern = re.compile(rf"^{re.escape(emb.name)}-(\d+)(\.[A-Za-z]+)$", re.IGNORECASE)
    found = []
    for run_dir in _run_folders(root, emb.name):
        if not (run_dir / "embeddings").is_dir():
            continue
        for copy in (run_dir / "embeddings").iterdir():
            match = pattern.match(copy.name)
            if not match or match.group(2).lower() not in formats.EMBEDDING_SUFFIXES:
                continue
            with_time = copy.stat().st_mtime_ns
            if int(match.group(1)) > (emb.step or 0) and with_time > file_time:
                found.append((int(match.group(1)), with_time, copy))
    for step, _, copy in sorted(found, reverse=True):
        try:
            saved = with_sidecar_step(copy, formats.read(copy))
        except TinvError as e:
            log.warning("ignoring %s: %s", copy, e)
            continue
        if saved.is_sdxl != emb.is_sdxl or saved.all_vectors.shape != emb.all_vectors.shape or saved.step != step:
            continue
        if not bool(torch.isfinite(saved.all_vectors).all()):
            continue
        note = (f"Resuming from {copy.name} (step {step}), the newest copy of a run that did not finish; "
                f"{path.name} held step {emb.step or 0}.")
        return emb.with_vectors(saved.all_vectors, step=step), copy, (note,)
    return emb, path, ()


def with_sidecar_step(path: Path, emb: Embedding) -> Embedding:
    """`emb`, with the step its `.optim` records when the file itself holds none: an SDXL `.pt` keeps only
    clip_l and clip_g (what every SDXL tool reads), so the trainer's `.optim` is where its step survives."""
    if emb.step is not None or not emb.is_sdxl:
        return emb
    sidecar = formats.read_optim_sidecar(path, emb)
    saved = sidecar.get(RESUME_KEY) if sidecar is not None else None
    if isinstance(saved, dict) and isinstance(saved.get("step"), int):
        return replace(emb, step=saved["step"])
    return emb


def _check_steps(cfg: TrainConfig, emb: Embedding) -> None:
    done = emb.step or 0
    if done >= cfg.max_steps:
        raise ConfigError(
            f"max_steps is {cfg.max_steps}, but {emb.name!r} has already been trained for {done} steps "
            f"(max_steps counts the steps of all runs). Set max_steps above {done} to train further."
        )


def _check_name_in_prompts(studio: Studio, builder: PromptBuilder, dataset: Dataset,
                           others: dict[str, Any], num_vectors: int) -> None:
    """Every template line must put the embedding in the prompt as its own word (A1111 issues #5141, #6705)."""
    counts = {k: int((v["clip_l"] if isinstance(v, dict) else v).shape[0]) for k, v in others.items()}
    tokenize = PromptTokenizer(studio.tokenizer, {**counts, builder.name: num_vectors})
    for prompt in builder.every_line(dataset.images[0].caption):
        if builder.name not in tokenize(prompt).used:
            raise ConfigError(
                f"template {builder.template.name!r} gives the prompt {prompt!r}, in which the embedding "
                f"{builder.name!r} is not recognised (the text around [name] merges with it, or another embedding's "
                "name covers it): the embedding would get no gradient. Put spaces or commas around [name]."
            )


def _output_dir(root: Path, name: str, initial_step: int) -> Path:
    """`<root>/<date>/<name>`, or `<name>_run2`, `_run3`… when that folder holds copies or previews of later
    steps than this run starts from (a run killed mid-way, or an embedding trained again from scratch):
    a run never overwrites another run's files."""
    day = root / _dt.date.today().isoformat()
    out_dir, number = day / name, 1
    while _holds_steps_after(out_dir, name, initial_step):
        number += 1
        out_dir = day / f"{name}_run{number}"
    return out_dir


def _holds_steps_after(out_dir: Path, name: str, step: int) -> bool:
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)\.", re.IGNORECASE)
    for folder in (out_dir / "embeddings", out_dir / "images"):
        if folder.is_dir() and any((m := pattern.match(f.name)) and int(m.group(1)) > step for f in folder.iterdir()):
            return True
    return False


def _check_disk(cfg: TrainConfig, emb: Embedding, out_dir: Path, final_path: Path) -> None:
    """Refuse to start when the outputs clearly will not fit (copies, previews, loss log, final file)."""
    steps = cfg.max_steps - (emb.step or 0)
    file_bytes = emb.num_vectors * emb.width * 4 + 4096
    per_copy = file_bytes * (3 if cfg.save_optimizer_state else 1)  # .optim holds AdamW's two moments
    copies = steps // cfg.save_every if cfg.save_every else 0
    previews = steps // cfg.preview_every if cfg.preview_every else 0
    previews *= 2 if cfg.save_image_with_stored_embedding else 1  # image_embeddings/: the preview again, with the data
    need = copies * per_copy + previews * (cfg.width * cfg.height * 3 + 4096) + steps * 64 + 2 * per_copy
    for folder in {existing_parent(out_dir), existing_parent(final_path.parent)}:
        free = shutil.disk_usage(folder).free
        if free < need + 16 * 2**20:
            raise TrainingError(
                f"not enough disk space in {folder}: this run needs about {need / 2**20:.0f} MB "
                f"(+16 MB margin) and {free / 2**20:.0f} MB are free. Free some space, or raise save_every/preview_every."
            )


def _seed_and_resume_state(cfg: TrainConfig, sidecar: dict | None, step: int) -> tuple[int, dict | None, str]:
    """The run's seed, the sidecar (None if absent), and a note when the data order starts afresh on a resume.

    A sidecar written by tinv-ui holds the data/noise RNG states and the data-order position at its step:
    the run continues them (with their seed, unless `cfg.seed` names another), so resuming equals never
    having stopped. A1111's `.optim` holds AdamW's state only.
    """
    seed = cfg.seed if cfg.seed >= 0 else random.SystemRandom().randrange(2**31)
    if sidecar is None:
        return seed, None, ""
    saved = sidecar.get(RESUME_KEY)
    if not _is_resume_state(saved) or saved["step"] != step:
        return seed, sidecar, (f"The optimizer state was restored, but it holds no data order (an A1111 or older "
                               f".optim): batches, noise and timesteps start a fresh data order from seed {seed}.")
    if cfg.seed >= 0 and cfg.seed != saved["seed"]:
        return seed, sidecar, (f"seed {cfg.seed} differs from the resumed run's {saved['seed']}: batches, noise "
                               "and timesteps start a fresh data order.")
    return saved["seed"], sidecar, ""


def _is_resume_state(saved: Any) -> bool:
    if not isinstance(saved, dict):
        return False
    rng = saved.get("python_rng")
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) for x in xs)  # noqa: E731
    return (isinstance(saved.get("seed"), int) and isinstance(saved.get("step"), int)
            and isinstance(rng, tuple) and len(rng) == 3 and isinstance(rng[1], tuple)
            and torch.is_tensor(saved.get("torch_rng")) and saved["torch_rng"].dtype == torch.uint8
            and isinstance(saved.get("groups"), list) and all(ints(g) for g in saved["groups"])
            and isinstance(saved.get("epoch"), list) and all(ints(b) for b in saved["epoch"])
            and isinstance(saved.get("position"), int))


def remove_stale_temp_files(plan: Plan) -> None:
    """Delete temp files of our own naming (`fileio.temp_target`) that a killed run left: in this embedding's
    run folders (`<log root>/<date>/<name>[_runK]`), and beside the library file the ones that were about
    to replace this embedding or its `.optim`."""
    own = {plan.path.name, formats.optim_path(plan.path).name}
    folders: list[tuple[Path, set[str] | None]] = [(plan.path.parent, own)]
    for run_dir in {plan.out_dir, *_run_folders(plan.out_dir.parent.parent, plan.name)}:
        folders += [(run_dir, None), (run_dir / "embeddings", None), (run_dir / "images", None),
                    (run_dir / "image_embeddings", None)]
    for folder, targets in folders:
        if not folder.is_dir():
            continue
        for file in folder.iterdir():
            target = temp_target(file.name)
            if target is not None and (targets is None or target in targets) and file.is_file():
                log.info("removing %s, left by an interrupted write", file)
                file.unlink(missing_ok=True)


def _run_folders(root: Path, name: str) -> list[Path]:
    """`<root>/<date>/<name>` and `<root>/<date>/<name>_runK`: every folder a run of this embedding wrote to."""
    own = re.compile(rf"{re.escape(name.lower())}(_run\d+)?")
    return [d for d in root.glob("*/*") if d.is_dir() and own.fullmatch(d.name.lower())]


# ---------------------------------------------------------------------------------------------------
# The run's live state, and preparing it
# ---------------------------------------------------------------------------------------------------
class DataOrder:
    """Which images each micro-batch takes, their coin flips and prompt lines: all drawn from one seeded
    `random.Random`, with the epoch in progress and the position in it, so a resumed run continues them."""

    def __init__(self, sampler: BucketBatchSampler, rng: random.Random) -> None:
        self.sampler, self.rng = sampler, rng
        self.epoch: list[list[int]] = []
        self.position = 0

    def next_indices(self) -> list[int]:
        if self.position >= len(self.epoch):
            self.epoch, self.position = self.sampler.epoch(), 0
        self.position += 1
        return self.epoch[self.position - 1]

    def state(self) -> dict:
        return {"python_rng": self.rng.getstate(), "groups": [list(g) for g in self.sampler.groups],
                "epoch": [list(b) for b in self.epoch], "position": self.position}

    def restore(self, state: dict) -> bool:
        """Continue a saved order; False (nothing changed) when it does not fit this dataset and batch size."""
        same_images = sorted(map(sorted, state["groups"])) == sorted(map(sorted, self.sampler.groups))
        same_batches = all(len(b) == self.sampler.batch_size for b in state["epoch"])
        if not (same_images and same_batches and 0 <= state["position"] <= len(state["epoch"])):
            return False
        self.sampler.groups = [list(g) for g in state["groups"]]
        self.epoch, self.position = [list(b) for b in state["epoch"]], state["position"]
        self.rng.setstate(state["python_rng"])
        return True


@dataclass
class Run:
    """The live state of a run: what the loop reads and updates."""

    studio: Studio
    plan: Plan
    vectors: nn.Parameter  # [n, d] fp32 on the device: the only trainable tensor (SDXL: clip_l | clip_g)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    encoder: PromptEncoder | sdxl.TrainingEncoder  # SDXL: `encode` also gives the pooled output
    unet: Any  # the studio's UNet, or its compiled wrapper
    base_unet: Any  # the studio's UNet itself, to notice a model switch between steps
    unet_dtype: torch.dtype  # read once: `unet.dtype` walks every module
    noise_scheduler: Any  # DDPMScheduler: adds noise at the drawn timesteps, gives the training target
    latents: LatentCache
    data_order: DataOrder
    generator: torch.Generator  # noise, timesteps and latent samples
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    steps_per_epoch: int
    loss_log: LossLog | None
    last_finite_vectors: torch.Tensor  # what the NaN guard puts back (a buffer copied into, not a new clone)
    accelerator: Any = None
    vae_hook: Any = None
    preview_pipeline: Any = None  # the previews' sampling pipeline: built at the first preview, then reused
    chunks: int = 1  # conditioning padded to this many 77-token chunks: the longest prompt's when compiled
    step: int = 0  # optimizer steps completed, counting the runs before this one (the embedding's `step`)
    notes: tuple[str, ...] = ()
    started: float = field(default_factory=time.perf_counter)

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def compiled(self) -> bool:
        """Whether the run trains a `torch.compile`d UNet (`train_speed.tuned_unet`)."""
        return self.unet is not self.base_unet

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.encoder, sdxl.TrainingEncoder)

    def named_vectors(self) -> dict[str, Any]:
        """Every usable embedding by name, the trained one as it stands (detached): what a preview renders with."""
        if self.is_sdxl:
            return self.encoder.vectors
        return {**self.encoder.vectors, self.name: self.vectors.detach()}

    def resume_state(self) -> dict:
        """What the `.optim` keeps beside AdamW's state so a resumed run continues exactly (see DataOrder)."""
        return {"seed": self.plan.seed, "step": self.step, "torch_rng": self.generator.get_state(),
                **self.data_order.state()}


def prepare(studio: Studio, plan: Plan, unet, optimizer_for, accelerator) -> Run:
    """Latents, the trainable vectors and their optimizer (`optimizer_for(plan, vectors)`), the noise
    scheduler, the data order (restored from the `.optim` when it holds one). Called under the lock."""
    from diffusers import DDPMScheduler

    cfg, device = plan.cfg, studio.device
    processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0  # each GPU draws its own batches
    generator = torch.Generator(device=device).manual_seed(plan.seed + rank)
    rng = random.Random(plan.seed + rank)
    for module in (studio.pipeline.unet, studio.pipeline.vae, *sdxl.text_encoders(studio.pipeline)):
        module.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(studio.pipeline.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingError(f"the model predicts {noise_scheduler.config.prediction_type!r}; only epsilon and "
                            "v_prediction models can be trained.")
    # The cache draws from `generator` (latent sampling "once"), so a resumed run rebuilds it from the seed
    # first, then continues the saved generator state. It is lazy (each image group encoded when a batch first
    # uses it, so the first step comes after one group, not the whole folder) unless the VAE will be kept in
    # RAM between steps.
    latents = build_latent_cache(studio.pipeline.vae, plan.dataset, cfg.latent_sampling, cfg.flip,
                                 cfg.use_alpha_weight, generator, lazy=not vae_offload_wanted(device))
    # SDXL: clip_l and clip_g side by side in one tensor (`Embedding.all_vectors`), trained jointly
    vectors = nn.Parameter(plan.embedding.all_vectors.to(device, torch.float32).clone())
    others = {k: ({p: t.to(device) for p, t in v.items()} if isinstance(v, dict) else v.to(device))
              for k, v in plan.others.items()}
    amp = amp_dtype(studio)
    sampler = BucketBatchSampler(plan.dataset.buckets, cfg.batch_size, rng)
    data_order = DataOrder(sampler, rng)
    notes = plan.notes + _restore_order(plan, data_order, generator, processes)
    if sampler.batch_size < cfg.batch_size:
        notes += (f"batch_size {cfg.batch_size} is more than the {sampler.num_images} images: each batch holds "
                  f"{sampler.batch_size}.",)
    main = accelerator is None or accelerator.is_main_process
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    # CUDA autocast: a half copy of each frozen encoder's linear weights, cast once here, not on every forward
    half = half_text_encoder_wanted(device, amp)
    text_encoders = [half_text_encoder(te, amp) if half else te for te in sdxl.text_encoders(studio.pipeline)]
    if studio.is_sdxl:
        encoder = sdxl.TrainingEncoder(studio.pipeline, others, plan.name, vectors, text_encoders)
    else:
        encoder = PromptEncoder(studio.tokenizer, text_encoders[0], {**others, plan.name: vectors})
    return Run(
        studio=studio, plan=plan, vectors=vectors, optimizer=optimizer_for(plan, vectors),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),  # fp16 only; bf16 needs none
        encoder=encoder, chunks=longest_prompt_chunks(plan, encoder) if unet is not studio.pipeline.unet else 1,
        unet=unet, base_unet=studio.pipeline.unet, unet_dtype=studio.pipeline.unet.dtype,
        noise_scheduler=noise_scheduler, latents=latents, data_order=data_order, generator=generator,
        amp_dtype=amp, memory_format=memory_format(device),
        steps_per_epoch=max(1, sampler.batches_per_epoch // cfg.gradient_accumulation),
        loss_log=LossLog(plan.out_dir / "textual_inversion_loss.csv", plan.initial_step)
        if main and cfg.write_csv_every else None,
        last_finite_vectors=vectors.detach().clone(), accelerator=accelerator, step=plan.initial_step, notes=notes,
    )


def longest_prompt_chunks(plan: Plan, encoder: PromptEncoder | sdxl.TrainingEncoder) -> int:
    """77-token chunks of the longest prompt the run can build (every template line with every full caption).

    A compiled UNet (static shapes) gets every micro-batch padded to this count: a caption over 75 tokens
    would otherwise change the conditioning's length and recompile the UNet for each new length.
    """
    captions = dict.fromkeys(item.caption for item in plan.dataset.images)
    return max(len(encoder.tokenize(p).ids) for caption in captions for p in plan.prompts.every_line(caption))


def _restore_order(plan: Plan, data_order: DataOrder, generator: torch.Generator, processes: int) -> tuple[str, ...]:
    saved = plan.sidecar.get(RESUME_KEY) if plan.sidecar is not None else None
    if not _is_resume_state(saved) or saved["seed"] != plan.seed:
        return ()  # fresh order; preflight's note says why when it matters
    if processes > 1:
        return ("The saved data order belongs to one process; this multi-process run starts a fresh data order.",)
    if not data_order.restore(saved):
        return ("The dataset or batch size changed since the saved state: batches start a fresh data order.",)
    generator.set_state(saved["torch_rng"])
    return ("Resuming the saved data order: the run continues as if it had never stopped.",)

