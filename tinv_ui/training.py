"""Textual Inversion training: `train(studio, cfg, library, paths) -> Iterator[Event]`.

Recipe: **pre-flight** (every check that can fail before any GPU work) -> **prepare** (latents, optimizer, UNet
settings) -> **loop** (one optimizer step per iteration, reads top to bottom) -> **save** -> **cleanup**.

What is trained: ONLY the embedding's `[num_vectors, width]` vectors, an fp32 `nn.Parameter` spliced into the
token lookup by `tokens.PromptEncoder`. The text encoder, UNet and VAE are frozen (`requires_grad=False`) and
AdamW (weight_decay 0, as A1111) sees the vectors alone, so nothing else can move.

Deliberate differences from AUTOMATIC1111 (spec §2.4-2.7):
- the learning-rate schedule never ends a run early: its last rate continues to max_steps (`schedules.py`);
- gradient clipping acts on the true (unscaled) gradients; steps the fp16 GradScaler skips are still counted;
- the periodic copy `<name>-<N>.pt` holds exactly N steps (its `step` field is N); A1111's held N-1;
- micro-batches form one continuous stream across epochs, so no accumulation group is dropped and
  gradient_accumulation is never silently lowered;
- flips are really applied, prompts use a fresh template line per use, alpha maps are resized (w, h);
- a NaN/inf loss stops the run with a `TrainingError` and keeps the last finite vectors on disk;
- the final file overwrites the trained embedding's own file (wherever it is), atomically.

Locking: the studio lock is taken per optimizer step (and per preview), never across a `yield`, so a
generation request waits at most one step. Autocast and grad modes are entered inside each step for the
same reason (a generator may be resumed on another thread).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, formats, sdxl
from .config import ClipGrad, GenerateConfig, Paths, TrainConfig
from .dataset import BucketBatchSampler, Dataset, LatentCache, build_latent_cache, load_dataset
from .embedding import Embedding
from .errors import ConfigError, ShapeMismatchError, TinvError, TrainingError
from .events import Event, Finished, Preview, Saved, Started, Step
from .fileio import atomic_write_text
from .schedules import Schedule, parse_schedule
from .templates import PromptBuilder, Template, load_template
from .tokens import PromptEncoder, PromptTokenizer

log = logging.getLogger(__name__)

# torch.compile pays off only on long runs: ~1 min to compile an SD UNet vs ~60 ms saved per batch-1 micro-batch
# on an H100 (shared/spec/gpu-baseline.md: 109 -> 48 ms), so about 1000 micro-batches to break even.
COMPILE_MIN_MICRO_BATCHES = 1000
VAE_OFFLOAD_BELOW_FREE_BYTES = 3 * 2**30  # move the VAE to RAM when less GPU memory than this is free
CSV_FLUSH_SECONDS = 5.0
CSV_HEADER = "step,epoch,epoch_step,loss,learn_rate\n"


# ---------------------------------------------------------------------------------------------------
# Pieces used by the loop
# ---------------------------------------------------------------------------------------------------
def diffusion_loss(unet, scheduler, latents, cond, weights=None, generator=None, timesteps=None, noise=None,
                   memory_format=torch.contiguous_format) -> torch.Tensor:
    """The LDM training loss: noise the latents at random timesteps, MSE of the UNet output vs its target.

    The target is the noise (`epsilon`) or the velocity (`v_prediction`), per the scheduler config.
    `weights` ([B, 1, h, w], alpha maps) multiply the per-element error before the mean.
    Pass `timesteps`/`noise` to fix them (tests); otherwise they are drawn from `generator`.
    """
    latents = latents.float()
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if timesteps is None:
        n = int(scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, n, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    dtype = unet.dtype
    x = noisy.to(dtype).contiguous(memory_format=memory_format)
    pred = unet(x, timesteps, cond.to(dtype)).sample.float()
    err = (pred - target) ** 2  # [B, 4, h, w]
    if weights is not None:
        err = err * weights
    return err.mean()


class LossLog:
    """`textual_inversion_loss.csv` with A1111's columns; the header is written once, rows are appended.

    Every write goes through an atomic rewrite of the whole file (fileio has no append), so rows are
    buffered and flushed at most every few seconds and at the end of the run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        existing = path.read_text(encoding="utf-8") if path.is_file() else ""  # a resumed run appends
        self.lines = existing.splitlines(keepends=True) or [CSV_HEADER]
        if not self.lines[-1].endswith("\n"):
            self.lines[-1] += "\n"
        self._dirty = False
        self._flushed = 0.0

    def add(self, step: int, epoch: int, epoch_step: int, loss: float, lr: float) -> None:
        """Append a row (flushed later)."""
        self.lines.append(f"{step},{epoch},{epoch_step},{loss:.7f},{lr}\n")
        self._dirty = True
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Write the file if rows are pending (and, unless forced, the last write is a few seconds old)."""
        if self._dirty and (force or time.monotonic() - self._flushed > CSV_FLUSH_SECONDS):
            atomic_write_text(self.path, "".join(self.lines))
            self._dirty, self._flushed = False, time.monotonic()


@dataclass(frozen=True)
class _Batch:
    prompts: list[str]
    latents: torch.Tensor  # [B, 4, h, w]
    weights: torch.Tensor | None  # [B, 1, h, w] alpha maps


@dataclass(frozen=True)
class _Plan:
    """Everything pre-flight established (no GPU work yet)."""

    cfg: TrainConfig
    embedding: Embedding
    path: Path  # the library file the final result overwrites
    others: dict[str, torch.Tensor]  # the other loaded embeddings, usable in captions
    hashes: dict[str, str]
    lr: Schedule
    clip: Schedule | None
    prompts: PromptBuilder
    dataset: Dataset
    out_dir: Path
    seed: int

    @property
    def name(self) -> str:
        return self.embedding.name

    @property
    def initial_step(self) -> int:
        return self.embedding.step or 0


@dataclass
class _Run:
    """The live state of a run: what the loop reads and updates."""

    studio: Any
    plan: _Plan
    vectors: nn.Parameter  # [n, d] fp32 on the device: the only trainable tensor
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    encoder: PromptEncoder
    unet: Any  # the studio's UNet, or its compiled wrapper
    base_unet: Any  # the studio's UNet itself, to notice a model switch between steps
    noise: Any  # DDPMScheduler
    cache: LatentCache
    batches: Iterator[list[int]]
    rng: random.Random
    generator: torch.Generator
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    steps_per_epoch: int
    losses: LossLog | None
    accelerator: Any = None
    vae_hook: Any = None
    step: int = 0
    good: torch.Tensor | None = None  # the last finite vectors
    started: float = field(default_factory=time.perf_counter)

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process


# ---------------------------------------------------------------------------------------------------
# 1. Pre-flight: every check that can fail, before any GPU work
# ---------------------------------------------------------------------------------------------------
def _find_embedding(studio, cfg: TrainConfig, library) -> tuple[Embedding, Path]:
    expected = studio.embedding_width
    library.refresh(expected_width=expected, tokenizer=studio.tokenizer)
    wanted = cfg.embedding.strip().lower()
    if not any(n.lower() == wanted for n in library.loaded):
        for skipped in (s for s in library.skipped if s.name.lower() == wanted):
            try:
                width = formats.read(skipped.path).width
            except TinvError:  # unreadable: library.get below says why
                continue
            if width != expected:
                raise ShapeMismatchError(
                    f"embedding {skipped.name!r} ({skipped.path.name}) does not fit the loaded model: expected "
                    f"vectors of width {expected}, actual {width}. Load the model it was made for, or create "
                    "a new embedding for this one."
                )
    entry = library.get(cfg.embedding.strip())
    emb = entry.embedding
    if emb.is_sdxl or emb.width != expected:
        kind = "an SDXL (clip_l + clip_g) embedding" if emb.is_sdxl else f"vectors of width {emb.width}"
        raise ShapeMismatchError(
            f"embedding {entry.name!r} has {kind}; the loaded model expects width {expected} "
            f"(expected {expected}, actual {emb.width}). Create a new embedding for this model."
        )
    if not bool(torch.isfinite(emb.vectors).all()):
        raise TrainingError(f"embedding {entry.name!r} contains NaN/inf values; create it again.")
    return replace(emb, name=entry.name), Path(entry.path)


def _check_steps(cfg: TrainConfig, emb: Embedding) -> None:
    done = emb.step or 0
    if done >= cfg.max_steps:
        raise ConfigError(
            f"max_steps is {cfg.max_steps}, but {emb.name!r} has already been trained for {done} steps "
            f"(max_steps counts the steps of all runs). Set max_steps above {done} to train further."
        )


def _check_name_in_prompts(studio, builder: PromptBuilder, dataset: Dataset, others: dict[str, torch.Tensor],
                           num_vectors: int) -> None:
    """Every template line must put the embedding in the prompt as its own word (A1111 issues #5141, #6705)."""
    tokenize = PromptTokenizer(studio.tokenizer, {**{k: int(v.shape[0]) for k, v in others.items()},
                                                  builder.name: num_vectors})
    for prompt in builder.every_line(dataset.images[0].caption):
        if builder.name not in tokenize(prompt).used:
            raise ConfigError(
                f"template {builder.template.name!r} gives the prompt {prompt!r}, in which the embedding "
                f"{builder.name!r} is not recognised (the text around [name] merges with it, or another embedding's "
                "name covers it): the embedding would get no gradient. Put spaces or commas around [name]."
            )


def _output_dir(cfg: TrainConfig, paths: Paths, name: str) -> Path:
    root = Path(cfg.log_dir).expanduser() if cfg.log_dir.strip() else paths.outputs_dir / "train"
    return root / _dt.date.today().isoformat() / name


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_disk(cfg: TrainConfig, emb: Embedding, out_dir: Path, final_path: Path) -> None:
    """Refuse to start when the outputs clearly will not fit (copies, previews, loss log, final file)."""
    steps = cfg.max_steps - (emb.step or 0)
    file_bytes = emb.num_vectors * emb.width * 4 + 4096
    per_copy = file_bytes * (3 if cfg.save_optimizer_state else 1)  # .optim holds AdamW's two moments
    copies = steps // cfg.save_every if cfg.save_every else 0
    previews = steps // cfg.preview_every if cfg.preview_every else 0
    need = copies * per_copy + previews * (cfg.width * cfg.height * 3 + 4096) + steps * 64 + 2 * per_copy
    for folder in {_existing_parent(out_dir), _existing_parent(final_path.parent)}:
        free = shutil.disk_usage(folder).free
        if free < need + 16 * 2**20:
            raise TrainingError(
                f"not enough disk space in {folder}: this run needs about {need / 2**20:.0f} MB "
                f"(+16 MB margin) and {free / 2**20:.0f} MB are free. Free some space, or raise save_every/preview_every."
            )


def preflight(studio, cfg: TrainConfig, library, paths: Paths) -> _Plan:
    """Run every check that can fail before touching the GPU; returns what the run needs."""
    sdxl.check_trainable(studio)
    emb, path = _find_embedding(studio, cfg, library)
    _check_steps(cfg, emb)
    lr = parse_schedule(cfg.learn_rate, cfg.max_steps, emb.step or 0, "learn_rate")
    clip = None
    if cfg.clip_grad_mode != ClipGrad.DISABLED:
        clip = parse_schedule(cfg.clip_grad_value, cfg.max_steps, emb.step or 0, "clip_grad_value")
    template: Template = load_template(cfg.template)
    template.check()
    builder = PromptBuilder(template, emb.name, cfg.shuffle_tags, cfg.tag_dropout)
    size = None if cfg.keep_size else (cfg.width, cfg.height)
    dataset = load_dataset(cfg.dataset_dir, size, cfg.filename_regex, cfg.filename_join, cfg.use_alpha_weight)
    others = {k: v for k, v in library.vectors().items() if k.lower() != emb.name.lower()}
    _check_name_in_prompts(studio, builder, dataset, others, emb.num_vectors)
    out_dir = _output_dir(cfg, paths, emb.name)
    _check_disk(cfg, emb, out_dir, path)
    hashes = {k: v for k, v in library.hashes().items() if k.lower() != emb.name.lower()}
    seed = cfg.seed if cfg.seed >= 0 else random.SystemRandom().randrange(2**31)
    return _Plan(cfg, emb, path, others, hashes, lr, clip, builder, dataset, out_dir, seed)


# ---------------------------------------------------------------------------------------------------
# 2. Prepare: model settings (restored on exit), latents, optimizer
# ---------------------------------------------------------------------------------------------------
def _want_compile(cfg: TrainConfig, device: torch.device, micro_batches: int) -> bool:
    if cfg.compile == "on":
        return True
    return cfg.compile == "auto" and device.type == "cuda" and micro_batches >= COMPILE_MIN_MICRO_BATCHES


def _xformers_available() -> bool:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def tuned_unet(studio, cfg: TrainConfig, compile_unet: bool) -> Iterator[Any]:
    """Speed/memory settings on the studio's UNet for the run (channels_last on CUDA, xformers, gradient
    checkpointing, torch.compile); all undone on exit, under the lock. Yields the module to call.

    Gradient checkpointing in diffusers checks `torch.is_grad_enabled()`, not train mode, and uses
    non-reentrant checkpoints, so the frozen UNet stays in eval mode and its weights still get no gradient.
    """
    unet = studio.pipeline.unet
    cuda = studio.device.type == "cuda"
    with studio.session(what="preparing training"):
        processors = unet.attn_processors
        if cuda:
            unet.to(memory_format=torch.channels_last)
        if cfg.xformers and cuda and _xformers_available():
            unet.enable_xformers_memory_efficient_attention()
        elif cfg.xformers:
            log.warning("xformers requested but not usable here (not installed or no CUDA); using SDPA attention")
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # dynamic=False: one static graph per batch shape (CUDA graphs need static shapes anyway)
        call = torch.compile(unet, mode="reduce-overhead" if cuda else None, dynamic=False) if compile_unet else unet
    try:
        yield call
    finally:
        with studio.session(what="finishing training"):
            if cfg.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.set_attn_processor(processors)
            if cuda:
                unet.to(memory_format=torch.contiguous_format)


def vae_offload_wanted(device: torch.device) -> bool:
    """True on a CUDA device with less than `VAE_OFFLOAD_BELOW_FREE_BYTES` free (never on the CPU)."""
    return device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < VAE_OFFLOAD_BELOW_FREE_BYTES


@contextlib.contextmanager
def offloaded_vae(studio, force: bool = False) -> Iterator[Any]:
    """On CUDA with little free memory (or when `force`d), keep the VAE in RAM during training.

    The VAE gets accelerate's CPU-offload hook: any encode/decode (our previews, or a Generate request served
    between two steps) moves it to the GPU first, and diffusers pipelines see the right execution device.
    Yields the hook (None when not offloaded); `hook.offload()` sends the VAE back to RAM.
    """
    device = studio.device
    if not (force or vae_offload_wanted(device)):
        yield None
        return
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    vae = studio.pipeline.vae
    with studio.session(what="preparing training"):
        _, hook = cpu_offload_with_hook(vae, execution_device=device)
    log.info("VAE moved to RAM for training (little free GPU memory)")
    try:
        yield hook
    finally:
        with studio.session(what="finishing training"):
            remove_hook_from_module(vae)
            vae.to(device)


def _freeze(studio) -> None:
    for module in (studio.pipeline.unet, studio.pipeline.vae, studio.text_encoder):
        module.requires_grad_(False)


def _make_optimizer(plan: _Plan, vectors: nn.Parameter) -> torch.optim.Optimizer:
    """AdamW on the vectors alone; restores the `.optim` sidecar when its checksum matches the vectors."""
    optimizer = torch.optim.AdamW([vectors], lr=plan.lr.rate_at(plan.initial_step), weight_decay=0.0)
    state = formats.read_optim(plan.path, plan.embedding) if plan.cfg.save_optimizer_state else None
    if state is None:
        log.info("no saved optimizer state for %s; starting AdamW fresh", plan.name)
        return optimizer
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("saved optimizer state for %s does not fit (%s); starting AdamW fresh", plan.name, e)
        return torch.optim.AdamW([vectors], lr=plan.lr.rate_at(plan.initial_step), weight_decay=0.0)
    log.info("restored AdamW state for %s from %s", plan.name, formats.optim_path(plan.path).name)
    return optimizer


def _prepare(studio, plan: _Plan, unet, accelerator) -> _Run:
    """Latents, the trainable vectors, the optimizer and the noise schedule. Called under the lock."""
    from diffusers import DDPMScheduler

    cfg, device = plan.cfg, studio.device
    rank = accelerator.process_index if accelerator is not None else 0  # each GPU draws its own batches
    generator = torch.Generator(device=device).manual_seed(plan.seed + rank)
    rng = random.Random(plan.seed + rank)
    _freeze(studio)
    noise = DDPMScheduler.from_config(studio.pipeline.scheduler.config)
    if noise.config.prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingError(f"the model predicts {noise.config.prediction_type!r}; only epsilon and v_prediction "
                            "models can be trained.")
    cache = build_latent_cache(studio.pipeline.vae, plan.dataset, cfg.latent_sampling, cfg.flip,
                               cfg.use_alpha_weight, generator)
    vectors = nn.Parameter(plan.embedding.vectors.to(device, torch.float32).clone())
    others = {k: v.to(device) for k, v in plan.others.items()}
    amp = studio.dtype if device.type == "cuda" and studio.dtype in (torch.float16, torch.bfloat16) else None
    sampler = BucketBatchSampler(plan.dataset.buckets, cfg.batch_size, rng)
    main = accelerator is None or accelerator.is_main_process
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    return _Run(
        studio=studio, plan=plan, vectors=vectors, optimizer=_make_optimizer(plan, vectors),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),  # fp16 only; bf16 needs none
        encoder=PromptEncoder(studio.tokenizer, studio.text_encoder, {**others, plan.name: vectors}),
        unet=unet, base_unet=studio.pipeline.unet, noise=noise, cache=cache, batches=iter(sampler), rng=rng, generator=generator, amp_dtype=amp,
        memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format,
        steps_per_epoch=max(1, sampler.batches_per_epoch // cfg.gradient_accumulation),
        losses=LossLog(plan.out_dir / "textual_inversion_loss.csv") if main and cfg.write_csv_every else None,
        accelerator=accelerator, step=plan.initial_step, good=vectors.detach().clone(),
    )


# ---------------------------------------------------------------------------------------------------
# 3. One optimizer step (called under the lock)
# ---------------------------------------------------------------------------------------------------
def _next_batch(run: _Run) -> _Batch:
    """Draw a micro-batch: image indices from one bucket, a coin flip per image, a fresh prompt per image."""
    indices = next(run.batches)
    flips = [run.cfg.flip and run.rng.random() < 0.5 for _ in indices]
    images = run.plan.dataset.images
    prompts = [run.plan.prompts(images[i].caption, run.rng) for i in indices]
    latents, weights = run.cache.batch(indices, flips, run.generator)
    return _Batch(prompts, latents, weights)


def _clip_gradients(vectors: nn.Parameter, mode: ClipGrad, value: float) -> None:
    if mode == ClipGrad.VALUE:
        torch.nn.utils.clip_grad_value_([vectors], value)
    elif mode == ClipGrad.NORM:
        torch.nn.utils.clip_grad_norm_([vectors], value)


def optimizer_step(run: _Run, lr: float, clip: float | None) -> tuple[float, float, str]:
    """Accumulate the micro-batches, clip, step. Returns (mean loss, |vectors| sum, first prompt).

    One host sync per step: loss and the vectors' magnitude are fetched together (both feed the NaN guard).
    """
    if run.vae_hook is not None and next(run.studio.pipeline.vae.parameters()).device.type != "cpu":
        run.vae_hook.offload()  # a preview or a Generate request brought the VAE back to the GPU
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=run.vectors.device)
    accumulation = run.cfg.gradient_accumulation
    first_prompt = ""
    with torch.enable_grad():
        for _ in range(accumulation):
            batch = _next_batch(run)
            first_prompt = first_prompt or batch.prompts[0]
            with torch.autocast(run.vectors.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                cond, _ = run.encoder.encode(batch.prompts)  # every chunk: a long caption must not cut off [name]
                loss = diffusion_loss(run.unet, run.noise, batch.latents, cond, batch.weights, run.generator,
                                      memory_format=run.memory_format) / accumulation
            run.scaler.scale(loss).backward()
            total += loss.detach()
    if run.accelerator is not None and run.accelerator.num_processes > 1:  # data parallel: average over GPUs
        run.vectors.grad = run.accelerator.reduce(run.vectors.grad, reduction="mean")
        total = run.accelerator.reduce(total, reduction="mean")
    run.scaler.unscale_(run.optimizer)  # clip the true gradients (A1111 clipped the scaled ones)
    if clip is not None:
        _clip_gradients(run.vectors, run.cfg.clip_grad_mode, clip)
    try:
        run.scaler.step(run.optimizer)
    except RuntimeError as e:  # AdamW cannot even form the update (e.g. lr 1e38): same fate as a NaN
        if "overflow" not in str(e):
            raise
        return float(total), math.inf, first_prompt
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    loss_value, magnitude = torch.stack([total, run.vectors.detach().abs().sum()]).tolist()
    return loss_value, magnitude, first_prompt


# ---------------------------------------------------------------------------------------------------
# 4. Saving and previews
# ---------------------------------------------------------------------------------------------------
def _embedding_at(run: _Run, vectors: torch.Tensor, step: int, name: str | None = None) -> Embedding:
    info = run.studio.info
    meta = {**run.plan.embedding.meta, "sd_checkpoint": info.hash if info else None,
            "sd_checkpoint_name": info.name if info else None}
    return replace(run.plan.embedding.with_vectors(vectors, step=step, name=name), meta=meta)


def _cpu_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    state["state"] = {k: {n: (t.detach().cpu() if torch.is_tensor(t) else t) for n, t in s.items()}
                      for k, s in state["state"].items()}
    return state


def _write(run: _Run, emb: Embedding, path: Path, with_optimizer: bool) -> Path:
    """Write an embedding (+ its .optim when asked); disk-full becomes a `TrainingError`."""
    try:
        formats.write(emb, path)
        if with_optimizer and run.cfg.save_optimizer_state:
            formats.write_optim(path, emb, _cpu_state(run.optimizer))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise TrainingError(f"the disk is full while writing {path}; free some space and resume.") from e
        raise
    return path


def save_copy(run: _Run, step: int) -> Path:
    """The periodic copy `embeddings/<name>-<N>.pt`: exactly N steps (no A1111 off-by-one)."""
    name = f"{run.name}-{step}"
    path = run.plan.out_dir / "embeddings" / f"{name}.pt"
    return _write(run, _embedding_at(run, run.vectors, step, name), path, with_optimizer=True)


def save_final(run: _Run, vectors: torch.Tensor | None = None, with_optimizer: bool = True) -> Path:
    """Overwrite the trained embedding's own library file (atomically) with `vectors` at `run.step`."""
    vectors = run.vectors if vectors is None else vectors
    path = _write(run, _embedding_at(run, vectors, run.step), run.plan.path, with_optimizer)
    log.info("saved %s at step %d to %s", run.name, run.step, path)
    return path


def _preview_config(cfg: TrainConfig, prompt: str) -> GenerateConfig:
    return GenerateConfig(
        prompt=cfg.preview_prompt or prompt, negative_prompt=cfg.preview_negative_prompt, sampler=cfg.preview_sampler,
        steps=cfg.preview_steps, cfg_scale=cfg.preview_cfg, seed=cfg.preview_seed, width=cfg.width,
        height=cfg.height, batch_count=1, batch_size=1, save=False,
    )


def render_preview(run: _Run, step: int, prompt: str) -> Preview:
    """Render `images/<name>-<N>.png` with the in-training vectors and the fixed preview seed."""
    from . import generation

    gen_cfg = _preview_config(run.cfg, prompt)
    vectors = {**run.encoder.vectors, run.name: run.vectors.detach()}
    with run.studio.session(what=f"training {run.name}: preview at step {step}"):
        rendered = generation.render(run.studio, gen_cfg, vectors, run.plan.hashes)
        if run.vae_hook is not None:
            run.vae_hook.offload()
    path = run.plan.out_dir / "images" / f"{run.name}-{step}.png"
    generation.save_png(rendered[0].image, path, rendered[0].infotext)
    return Preview(step, (rendered[0].image,), gen_cfg.prompt, (path,))


def _jsonable(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value


def write_settings(studio, plan: _Plan) -> Path:
    """`settings-YYYY-MM-DD-HH-MM-SS.json`: A1111's keys (spec §2.6) plus everything else under `tinv_ui`."""
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
        "save_image_with_stored_embedding": False, "template_file": str(plan.prompts.template.path),
        "initial_step": plan.initial_step, "preview_prompt": cfg.preview_prompt,
        "preview_negative_prompt": cfg.preview_negative_prompt, "preview_steps": cfg.preview_steps,
        "preview_sampler_name": cfg.preview_sampler, "preview_cfg_scale": cfg.preview_cfg,
        "preview_seed": cfg.preview_seed, "preview_width": cfg.width, "preview_height": cfg.height,
        "tinv_ui": {"version": __version__, "seed": plan.seed, "skipped_files": list(plan.dataset.skipped),
                    "config": {k: _jsonable(v) for k, v in asdict(cfg).items()}},
    }
    path = plan.out_dir / f"settings-{now.strftime('%Y-%m-%d-%H-%M-%S')}.json"
    return atomic_write_text(path, json.dumps(settings, indent=4, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# 5. The loop
# ---------------------------------------------------------------------------------------------------
def _finish(run: _Run, interrupted: bool) -> list[Event]:
    """Save the final file; return the closing events (yielded by `train` after cleanup)."""
    path = save_final(run) if run.is_main else None
    verb = "interrupted" if interrupted else "finished"
    saved = [Saved(run.step, path, final=True)] if path is not None else []
    message = f"Training {verb} at step {run.step}; saved to {path}" + _skipped_note(run.plan)
    return [*saved, Finished(run.step, path, interrupted, message)]


def _skipped_note(plan: _Plan) -> str:
    """' Skipped: a.png: reason; ….' when the dataset left files out (said at the start and again at the end)."""
    return " Skipped: " + "; ".join(plan.dataset.skipped) + "." if plan.dataset.skipped else ""


def _stop_on_nan(run: _Run, step: int, loss: float, lr: float) -> None:
    """Keep the last finite vectors (on disk too), then raise a `TrainingError` that suggests a fix."""
    with torch.no_grad():
        run.vectors.copy_(run.good)
    path = save_final(run, run.good, with_optimizer=False) if run.is_main else None
    what = f"the loss became {loss}" if not math.isfinite(loss) else "the update overflowed (vectors NaN/inf)"
    raise TrainingError(
        f"Training stopped at step {step}: {what}. The embedding was kept as it was after step {run.step} "
        f"(saved to {path}). Lower learn_rate (it was {lr:g}; try {lr / 10:g}) or set clip_grad_mode to norm."
    )


def _check_model(run: _Run) -> None:
    """Another model was loaded between two steps: save what we have (vectors do not depend on it) and stop."""
    if run.studio.loaded and run.studio.pipeline.unet is run.base_unet:
        return
    path = save_final(run) if run.is_main else None
    raise TrainingError(f"The model was changed during training; training of {run.name} stopped at step "
                        f"{run.step} and was saved to {path}. Load the model again and resume.")


def _loop(run: _Run, stop: threading.Event) -> Iterator[Event]:
    """One iteration per optimizer step; returns the closing events once the final file is saved."""
    cfg, total, first = run.cfg, run.cfg.max_steps, run.step
    for step in range(first + 1, total + 1):
        # 1. Stop between steps; the interrupt saves the vectors as they stand.
        if stop.is_set():
            return _finish(run, interrupted=True)
        # 2. Rates for this update, from the steps completed so far (A1111's rule).
        lr = run.plan.lr.rate_at(step - 1)
        clip = run.plan.clip.rate_at(step - 1) if run.plan.clip is not None else None
        # 3. One optimizer step, holding the GPU lock only for its duration.
        with run.studio.session(what=f"training {run.name} (step {step}/{total})"):
            _check_model(run)
            loss, magnitude, prompt = optimizer_step(run, lr, clip)
        # 4. NaN/inf guard: stop and keep the last finite vectors.
        if not (math.isfinite(loss) and math.isfinite(magnitude)):
            _stop_on_nan(run, step, loss, lr)
        run.step, run.good = step, run.vectors.detach().clone()
        # 5. Report: loss CSV (A1111 columns) and a Step event with the ETA.
        elapsed = time.perf_counter() - run.started
        if run.losses is not None and step % cfg.write_csv_every == 0:
            epoch, epoch_step = divmod(step - 1, run.steps_per_epoch)
            run.losses.add(step, epoch, epoch_step, loss, lr)
        yield Step(step, total, elapsed, elapsed / (step - first) * (total - step), loss, lr)
        # 6. Periodic copy and preview (main process only).
        if run.is_main and cfg.save_every and step % cfg.save_every == 0:
            yield Saved(step, save_copy(run, step))
        if run.is_main and cfg.preview_every and step % cfg.preview_every == 0:
            yield render_preview(run, step, prompt)
    return _finish(run, interrupted=False)


# ---------------------------------------------------------------------------------------------------
# 6. The recipe
# ---------------------------------------------------------------------------------------------------
def _started(run: _Run) -> Started:
    plan = run.plan
    buckets = len(plan.dataset.buckets)
    message = (f"Training {plan.name} from step {plan.initial_step} to {plan.cfg.max_steps} on "
               f"{len(plan.dataset)} images ({buckets} size bucket{'s' * (buckets != 1)}); "
               f"learning rate {plan.lr.describe()}.")
    message += _skipped_note(plan)
    return Started(plan.name, plan.initial_step, plan.cfg.max_steps, len(plan.dataset), plan.out_dir, message)


def _run_guarded(run: _Run, stop: threading.Event) -> Iterator[Event]:
    """The loop, plus the interrupt rules: a closed generator saves; an unexpected error saves what is good."""
    try:
        return (yield from _loop(run, stop))
    except GeneratorExit:  # the consumer closed us (Stop in the UI, tab closed): save, emit nothing more
        if run.is_main:
            save_final(run)
        raise
    except TrainingError:
        raise
    except Exception:
        if run.is_main and run.step > run.plan.initial_step:
            try:
                save_final(run, run.good, with_optimizer=False)
            except (OSError, TinvError):
                log.exception("could not save %s after the error below", run.name)
        raise
    finally:
        if run.losses is not None:
            run.losses.flush()


def train(studio, cfg: TrainConfig, library, paths: Paths, stop: threading.Event | None = None,
          accelerator: Any = None) -> Iterator[Event]:
    """Train `cfg.embedding`; yields Started, then Step per optimizer step, Saved/Preview every N, then
    Saved(final=True) and Finished. Failures raise `TinvError` subclasses (`TrainingError` for NaN/disk).

    `stop` (set from any thread) or closing the generator interrupts the run and saves it. `accelerator`:
    one `accelerate.Accelerator` for `accelerate launch` data-parallel runs (see `distributed_accelerator`).
    """
    stop = stop or threading.Event()
    plan = preflight(studio, cfg, library, paths)  # 1. checks only, no GPU work
    micro_batches = (cfg.max_steps - plan.initial_step) * cfg.gradient_accumulation
    with contextlib.ExitStack() as cleanup:  # 5. cleanup: undone in reverse order, each under the lock
        unet = cleanup.enter_context(tuned_unet(studio, cfg, _want_compile(cfg, studio.device, micro_batches)))
        with studio.session(what=f"preparing training of {plan.name}"):  # 2. prepare
            run = _prepare(studio, plan, unet, accelerator)
        run.vae_hook = cleanup.enter_context(offloaded_vae(studio))
        if run.is_main:
            write_settings(studio, plan)
        yield _started(run)
        closing = yield from _run_guarded(run, stop)  # 3. loop, 4. save
    # The UNet/VAE settings are restored before the last events, so a consumer that stops reading at
    # Finished leaves nothing behind.
    if run.is_main:
        library.refresh(expected_width=studio.embedding_width, tokenizer=studio.tokenizer)
    yield from closing


def distributed_accelerator() -> Any:
    """One `accelerate.Accelerator` when launched with `accelerate launch` (WORLD_SIZE > 1), else None.

    Create it ONCE per process, in the CLI only: accelerate's state is a process-wide singleton, so a web app
    must never build one per run. Precision is handled by our own autocast, so it gets no mixed_precision.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from accelerate import Accelerator

    # Without CUDA, accelerate only forms a (gloo) process group when told to use the CPU; otherwise every
    # process would train alone and all of them would write the same files.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != world:
        raise TrainingError(f"WORLD_SIZE is {world} but accelerate joined {accelerator.num_processes} process(es); "
                            "start multi-GPU runs with `accelerate launch -m tinv_ui train ...`.")
    return accelerator
