"""Textual Inversion training: `train(studio, cfg, library, paths) -> Iterator[Event]`.

The recipe, in the order `train` runs it:
1. pre-flight: every check that can fail, before any GPU work (`train_setup.preflight`);
2. prepare: the model's speed settings (`train_speed`), latents, the vectors, AdamW, the data order;
3. loop: one optimizer step per iteration (`_loop`, `optimizer_step`), copies and previews every N steps;
4. save: the final file (`train_outputs`);
5. clean up: every setting undone, under the lock, before the last events.

What is trained: ONLY the embedding's `[num_vectors, width]` vectors, an fp32 `nn.Parameter` spliced into the
token lookup by `tokens.PromptEncoder`. The text encoder, UNet and VAE are frozen (`requires_grad=False`) and
AdamW (weight_decay 0, as A1111) sees the vectors alone, so nothing else can move.

SDXL: the parameter holds the pair's clip_l and clip_g rows side by side (`sdxl.TrainingEncoder` splices each
part into its encoder), so both sets are trained jointly by one AdamW and clipped together. The UNet also
gets the second encoder's pooled output and each image's size conditioning (`dataset.size_conditioning`:
original size, crop top-left, target size, as kohya's sd-scripts), cached with its latents.

Deliberate differences from AUTOMATIC1111 (its modules/textual_inversion/textual_inversion.py `train_embedding`):
- the learning-rate schedule never ends a run early: its last rate continues to max_steps (`schedules.py`);
- gradient clipping acts on the true (unscaled) gradients; steps the fp16 GradScaler skips are still counted;
- the periodic copy `<name>-<N>` holds exactly N steps (its `step` field is N); A1111's held N-1;
- micro-batches form one continuous stream across epochs, so no accumulation group is dropped and
  gradient_accumulation is never silently lowered;
- flips are really applied, prompts use a fresh template line per use, alpha maps are resized (w, h);
- a NaN/inf loss stops the run with a `TrainingError` and keeps the last finite vectors on disk;
- the final file overwrites the trained embedding's own file (wherever it is), atomically;
- a resume is exact: the `.optim` also holds the data/noise RNG states and the data-order position.

Steps are counted as the embedding counts them: `run.step` is the number of optimizer steps done over all
runs, the loop's `step` is the one being taken (`run.step + 1`), and rates are read at the steps done before it.

Locking: the studio's GPU lock is taken per optimizer step (and per preview), never across a `yield`, so a
generation request waits at most one step. Autocast and grad modes are entered inside each step for the
same reason (a generator may be resumed on another thread).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ClipGrad, Paths, TrainConfig
from .errors import TinvError, TrainingError
from .eta import PREVIEW, SAVE, STEP, RunTimes
from .events import (ENCODING_LATENTS, LOADING_IMAGES, RENDERING_PREVIEW, SAVING, Event, Finished, Phase, Saved,
                     Started, Step)
from .studio import Studio
from .train_outputs import render_preview, save_copy, save_final, write_settings
from .train_setup import Plan, Run, preflight, prepare, remove_stale_temp_files
from .train_speed import (  # noqa: F401  (re-exported: the CLI and tests use them from here)
    VAE_OFFLOAD_BELOW_FREE_BYTES, adamw_speed_options, distributed_accelerator, offloaded_vae, tuned_unet,
    vae_offload_wanted, want_compile,
)

log = logging.getLogger(__name__)


def train(studio: Studio, cfg: TrainConfig, library, paths: Paths, stop: threading.Event | None = None,
          accelerator: Any = None, plan: Plan | None = None) -> Iterator[Event]:
    """Train `cfg.embedding`; yields Started, then Step per optimizer step, Saved/Preview every N, then
    Saved(final=True) and Finished. Failures raise `TinvError` subclasses (`TrainingError` for NaN/disk).
    A `Phase` comes before the work it names: loading images (first), encoding latents (before Started),
    saving and rendering preview (before each Saved and Preview).

    `stop` (set from any thread) or closing the generator interrupts the run and saves it. `accelerator`:
    one `accelerate.Accelerator` for `accelerate launch` data-parallel runs (see `distributed_accelerator`).
    `plan`: `preflight(studio, cfg, library, paths)` already run by the caller (`jobs.TrainingRunner.start`
    checks before it starts a thread, so a wrong setting is refused, not a failed job).
    """
    stop = stop or threading.Event()
    if plan is None:  # 1. checks only, no GPU work
        yield Phase(LOADING_IMAGES, "loading images (checking the settings and the dataset)")
        plan = preflight(studio, cfg, library, paths)
    main = accelerator is None or accelerator.is_main_process
    if main:
        remove_stale_temp_files(plan)
    yield Phase(ENCODING_LATENTS, _encoding_text(plan, studio))
    micro_batches = (cfg.max_steps - plan.initial_step) * cfg.gradient_accumulation
    with contextlib.ExitStack() as cleanup:  # 5. clean up: undone in reverse order, each under the lock
        unet = cleanup.enter_context(tuned_unet(studio, cfg, want_compile(cfg, studio.device, micro_batches)))
        with studio.session(what=f"preparing training of {plan.name}"):  # 2. prepare
            run = prepare(studio, plan, unet, _make_optimizer, accelerator)
        run.vae_hook = cleanup.enter_context(offloaded_vae(studio))
        if run.is_main:
            write_settings(studio, plan)
        yield _started(run)
        closing = yield from _run_guarded(run, stop)  # 3. loop, 4. save
    # The UNet/VAE settings are restored before the last events, so a consumer that stops reading at
    # Finished leaves nothing behind.
    if run.is_main:
        library.rescan_for(studio)
    yield from closing


def _started(run: Run) -> Started:
    plan = run.plan
    buckets = len(plan.dataset.buckets)
    message = " ".join((
        f"Training {plan.name} from step {plan.initial_step} to {plan.cfg.max_steps} on {len(plan.dataset)} images "
        f"({buckets} size bucket{'s' * (buckets != 1)}); learning rate {plan.lr.describe()}.", *run.notes,
    )) + _skipped_note(plan)
    return Started(plan.name, plan.initial_step, plan.cfg.max_steps, len(plan.dataset), plan.out_dir, message)


def _encoding_text(plan: Plan, studio: Studio) -> str:
    images = f"{len(plan.dataset)} image{'s' * (len(plan.dataset) != 1)}"
    if vae_offload_wanted(studio.device):  # `prepare` encodes them all before the first step
        return f"encoding latents of {images}"
    return f"encoding latents of {images} (each as the first steps use it)"


def _run_guarded(run: Run, stop: threading.Event) -> Iterator[Event]:
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
                save_final(run, run.last_finite_vectors, with_optimizer=False)
            except (OSError, TinvError):
                log.exception("could not save %s after the error below", run.name)
        raise
    finally:
        if run.loss_log is not None:
            run.loss_log.flush()


def _loop(run: Run, stop: threading.Event) -> Iterator[Event]:
    """One iteration per optimizer step; returns the closing events once the final file is saved."""
    cfg, total, first = run.cfg, run.cfg.max_steps, run.step
    # Timing for the ETA: steps, previews and saves each measured, the ones to come counted (`eta.py`).
    times = RunTimes.for_run(first, total, cfg.preview_every, cfg.save_every, cfg.preview_steps,
                             cfg.gradient_accumulation, run.is_main)
    for step in range(first + 1, total + 1):
        # Stop between steps; the interrupt saves the vectors as they stand.
        if stop.is_set():
            yield from _saving_final(run, times)
            return _finish(run, interrupted=True)
        # Rates for this update, from the steps completed so far (A1111's rule).
        lr = run.plan.lr.rate_at(step - 1)
        clip = run.plan.clip.rate_at(step - 1) if run.plan.clip is not None else None
        # One optimizer step, holding the GPU lock only for its duration.
        with run.studio.session(what=f"training {run.name} (step {step}/{total})"):
            _check_model(run)
            loss, magnitude, prompt = optimizer_step(run, lr, clip)
        # NaN/inf guard: stop and keep the last finite vectors.
        if not (math.isfinite(loss) and math.isfinite(magnitude)):
            _stop_on_nan(run, step, loss, lr)
        run.step = step
        run.last_finite_vectors.copy_(run.vectors.detach())
        # Report: loss CSV (A1111 columns) and a Step event with the ETA and the step's first prompt.
        if run.loss_log is not None and step % cfg.write_csv_every == 0:
            epoch, epoch_step = divmod(step - 1, run.steps_per_epoch)
            run.loss_log.add(step, epoch, epoch_step, loss, lr)
        times.lap(STEP)
        yield Step(step, total, time.perf_counter() - run.started, times.eta(), loss, lr, prompt)
        # Periodic copy and preview (main process only), each announced before it starts.
        if run.is_main and cfg.save_every and step % cfg.save_every == 0:
            yield Phase(SAVING, f"saving a copy at step {step}", step, times.eta(), times.expected(SAVE))
            path = save_copy(run, step)
            times.lap(SAVE)
            yield Saved(step, path)
        if run.is_main and cfg.preview_every and step % cfg.preview_every == 0:
            yield Phase(RENDERING_PREVIEW, f"rendering preview at step {step}", step, times.eta(),
                        times.expected(PREVIEW))
            preview = render_preview(run, step, prompt)
            times.lap(PREVIEW)
            yield preview
    yield from _saving_final(run, times)
    return _finish(run, interrupted=False)


def _saving_final(run: Run, times: RunTimes) -> Iterator[Phase]:
    """The phase of the final save (`_finish`), on the process that writes it; it is all that is left (also
    when the run was interrupted)."""
    if run.is_main:
        seconds = times.expected(SAVE)
        yield Phase(SAVING, f"saving the final file at step {run.step}", run.step, seconds, seconds)


# ---------------------------------------------------------------------------------------------------
# One optimizer step (called under the lock)
# ---------------------------------------------------------------------------------------------------
def optimizer_step(run: Run, lr: float, clip: float | None) -> tuple[float, float, str]:
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
                cond, added = _conditioning(run, batch)
                loss = diffusion_loss(run.unet, run.noise_scheduler, batch.latents, cond, batch.weights, run.generator,
                                      memory_format=run.memory_format, dtype=run.unet_dtype,
                                      added_cond_kwargs=added) / accumulation
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


@dataclass(frozen=True)
class _Batch:
    prompts: list[str]
    latents: torch.Tensor  # [B, 4, h, w]
    weights: torch.Tensor | None  # [B, 1, h, w] alpha maps
    time_ids: torch.Tensor | None = None  # [B, 6] SDXL size conditioning (`dataset.size_conditioning`)


def _conditioning(run: Run, batch: _Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The UNet's text conditioning for a micro-batch, and for SDXL its added conditioning (pooled text, time ids).

    Every chunk is encoded (a long caption must not cut off [name]); compiled: always `run.chunks` chunks."""
    if not run.is_sdxl:
        cond, _ = run.encoder.encode(batch.prompts, min_chunks=run.chunks)
        return cond, None
    cond, pooled, _ = run.encoder.encode(batch.prompts, min_chunks=run.chunks)
    return cond, {"text_embeds": pooled.to(run.unet_dtype), "time_ids": batch.time_ids.to(run.unet_dtype)}


def _next_batch(run: Run) -> _Batch:
    """Draw a micro-batch: image indices from one bucket, a coin flip per image, a fresh prompt per image."""
    order = run.data_order
    indices = order.next_indices()
    flips = [run.cfg.flip and order.rng.random() < 0.5 for _ in indices]
    images = run.plan.dataset.images
    prompts = [run.plan.prompts(images[i].caption, order.rng) for i in indices]
    latents, weights = run.latents.batch(indices, flips, run.generator)
    time_ids = run.latents.time_ids_for(indices) if run.is_sdxl else None
    return _Batch(prompts, latents, weights, time_ids)


def diffusion_loss(unet, scheduler, latents, cond, weights=None, generator=None, timesteps=None, noise=None,
                   memory_format=torch.contiguous_format, dtype: torch.dtype | None = None,
                   added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The LDM training loss: noise the latents at random timesteps, MSE of the UNet output vs its target.

    The target is the noise (`epsilon`) or the velocity (`v_prediction`), per the scheduler config.
    `weights` ([B, 1, h, w], alpha maps) multiply the per-element error before the mean.
    Pass `timesteps`/`noise` to fix them (tests); otherwise they are drawn from `generator`.
    `dtype` is the UNet's (the trainer reads it once per run; `unet.dtype` walks every module).
    `added_cond_kwargs`: SDXL's pooled text embeds and time ids, passed to the UNet as given.
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
    dtype = dtype or unet.dtype
    x = noisy.to(dtype).contiguous(memory_format=memory_format)
    extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    pred = unet(x, timesteps, cond.to(dtype), **extra).sample.float()
    err = (pred - target) ** 2  # [B, 4, h, w]
    if weights is not None:
        err = err * weights
    return err.mean()


def _clip_gradients(vectors: nn.Parameter, mode: ClipGrad, value: float) -> None:
    if mode == ClipGrad.VALUE:
        torch.nn.utils.clip_grad_value_([vectors], value)
    elif mode == ClipGrad.NORM:
        torch.nn.utils.clip_grad_norm_([vectors], value)


def _make_optimizer(plan: Plan, vectors: nn.Parameter) -> torch.optim.Optimizer:
    """AdamW on the vectors alone (fused on CUDA); restores the `.optim` state when it fits the vectors."""
    def fresh() -> torch.optim.Optimizer:
        return torch.optim.AdamW([vectors], lr=plan.lr.rate_at(plan.initial_step), weight_decay=0.0,
                                 **adamw_speed_options(vectors.device))

    optimizer = fresh()
    if plan.sidecar is None:
        log.info("no saved optimizer state for %s; starting AdamW fresh", plan.name)
        return optimizer
    try:
        optimizer.load_state_dict(plan.sidecar["optimizer_state_dict"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("saved optimizer state for %s does not fit (%s); starting AdamW fresh", plan.name, e)
        return fresh()
    log.info("restored AdamW state for %s from %s.optim", plan.name, plan.start_file.name)
    return optimizer


# ---------------------------------------------------------------------------------------------------
# Ending a run
# ---------------------------------------------------------------------------------------------------
def _finish(run: Run, interrupted: bool) -> list[Event]:
    """Save the final file; return the closing events (yielded by `train` after clean-up)."""
    path = save_final(run) if run.is_main else None
    verb = "interrupted" if interrupted else "finished"
    saved = [Saved(run.step, path, final=True)] if path is not None else []
    message = f"Training {verb} at step {run.step}; saved to {path}" + _skipped_note(run.plan)
    return [*saved, Finished(run.step, path, interrupted, message)]


def _skipped_note(plan: Plan) -> str:
    """' Skipped: a.png: reason; ….' when the dataset left files out (said at the start and again at the end)."""
    return " Skipped: " + "; ".join(plan.dataset.skipped) + "." if plan.dataset.skipped else ""


def _stop_on_nan(run: Run, step: int, loss: float, lr: float) -> None:
    """Keep the last finite vectors (on disk too), then raise a `TrainingError` that suggests a fix."""
    with torch.no_grad():
        run.vectors.copy_(run.last_finite_vectors)
    path = save_final(run, run.last_finite_vectors, with_optimizer=False) if run.is_main else None
    what = f"the loss became {loss}" if not math.isfinite(loss) else "the update overflowed (vectors NaN/inf)"
    raise TrainingError(
        f"Training stopped at step {step}: {what}. The embedding was kept as it was after step {run.step} "
        f"(saved to {path}). Lower learn_rate (it was {lr:g}; try {lr / 10:g}) or set clip_grad_mode to norm."
    )


def _check_model(run: Run) -> None:
    """Another model was loaded between two steps: save what we have (vectors do not depend on it) and stop."""
    if run.studio.loaded and run.studio.pipeline.unet is run.base_unet:
        return
    path = save_final(run) if run.is_main else None
    raise TrainingError(f"The model was changed during training; training of {run.name} stopped at step "
                        f"{run.step} and was saved to {path}. Load the model again and resume.")
