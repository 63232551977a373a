"""txt2img with embeddings: prompts → conditioning (our `PromptEncoder`) → the studio's pipeline → PNGs with infotext.

- `render` draws one batch; the caller holds the studio lock (the trainer calls it for previews with the
  vectors it is training, the Generate tab through `generate`).
- `generate` is the request-level workflow: rescan the embeddings folder, then per batch take the lock,
  render, save; it yields `Step` per denoising step and one `Generated` per batch.
- `infotext` writes AUTOMATIC1111's "parameters" layout (`modules/processing.py`
  `create_infotext`) so A1111, civitai and PNG-info readers parse it.

Conditioning is computed here, never by diffusers: diffusers' `clip_skip` is broken with transformers 5 and
knows nothing about A1111 prompt syntax. Each image gets its own `torch.Generator` seeded `seed + i`, so a
batch of N reproduces N single runs with the same seeds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from . import __version__, sdxl
from .config import SAMPLER_TABLE, SAMPLERS, Compile, GenerateConfig, Paths
from .errors import ConfigError, TinvError
from .events import Generated, Step
from .fileio import atomic_write, disk_full_is_said
from .tokens import PromptEncoder

if TYPE_CHECKING:
    from .library import EmbeddingLibrary
    from .studio import Studio

log = logging.getLogger(__name__)

MAX_SEED = 4294967294  # A1111's random seed range
OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class Rendered:
    """One generated image, its A1111 infotext and the seed that made it."""

    image: Image.Image
    infotext: str
    seed: int


def make_scheduler(sampler: str, base_config: Mapping[str, Any]):
    """A fresh diffusers scheduler for an A1111 sampler name, built from the model's scheduler config."""
    if sampler not in SAMPLER_TABLE:
        raise ConfigError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}.")
    import diffusers

    spec = SAMPLER_TABLE[sampler]
    return getattr(diffusers, spec.scheduler).from_config(dict(base_config), **spec.options)


def compiles(cfg: GenerateConfig, device: torch.device) -> bool:
    """Whether this request draws with the `torch.compile`d UNet (`compile` auto: on a CUDA device)."""
    return cfg.compile == Compile.ON or (cfg.compile == Compile.AUTO and device.type == "cuda")


def resolve_seed(seed: int) -> int:
    """`-1` → a random seed (A1111's range); any other value is used as is."""
    return random.randrange(MAX_SEED) if seed == -1 else int(seed)


# -- infotext ------------------------------------------------------------------------------------------
def quote(value: Any) -> str:
    """A1111 `infotext_utils.quote`: JSON-quote a value that contains ',', ':' or a newline."""
    text = str(value)
    if not any(c in text for c in ",:\n"):
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    """7.0 → '7', 7.5 → '7.5' (A1111 shows the slider value as typed)."""
    return f"{value:g}" if float(value) != int(value) else str(int(value))


def ti_hashes(used: list[str], hashes: Mapping[str, str]) -> str | None:
    """The `TI hashes` value: 'name: hash, ...' for used embeddings that have a hash (':' and ',' removed from names)."""
    parts = [f"{re.sub(r'[:,]', '', n)}: {hashes[n]}" for n in used if hashes.get(n)]
    return ", ".join(parts) or None


def infotext(cfg: GenerateConfig, seed: int, model_name: str | None, model_hash: str | None, ti: str | None,
             batch_pos: int = 0, extra: Mapping[str, Any] | None = None) -> str:
    """A1111's three-part infotext: prompt, optional 'Negative prompt:' line, then 'Key: value' pairs.

    `batch_pos` is the image's place in its batch; like A1111, 'Batch size'/'Batch pos' appear only for batches of 2+.
    `extra` pairs go before 'Version' (as A1111's scripts add theirs to `extra_generation_params`).
    """
    batched = cfg.batch_size > 1
    params: dict[str, Any] = {
        "Steps": cfg.steps,
        "Sampler": cfg.sampler.removesuffix(" Karras"),
        "Schedule type": SAMPLER_TABLE[cfg.sampler].schedule_type,
        "CFG scale": _number(cfg.cfg_scale),
        "Seed": seed,
        "Size": f"{cfg.width}x{cfg.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Batch size": cfg.batch_size if batched else None,
        "Batch pos": batch_pos if batched else None,
        "Clip skip": cfg.clip_skip if cfg.clip_skip > 1 else None,
        "TI hashes": ti,
        **(extra or {}),
        "Version": f"tinv-ui {__version__}",
    }
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {cfg.negative_prompt}" if cfg.negative_prompt else ""
    return f"{cfg.prompt}{negative}\n{line}"


def save_png(image: Image.Image, path: str | Path, infotext: str) -> Path:
    """Write `image` as a PNG with the A1111 `parameters` tEXt chunk, atomically. Returns the path."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


# -- rendering --------------------------------------------------------------------------------------------
def _conditioning(studio: Studio, cfg: GenerateConfig, vectors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(cond, uncond, used names) for one batch, both padded to the same chunk count, in the UNet dtype."""
    encoder = PromptEncoder(studio.tokenizer, studio.text_encoder, vectors)
    n = cfg.batch_size
    # One encode for both prompts pads them to the same number of 77-token chunks (the UNet needs equal lengths).
    cond, used = encoder.encode([cfg.prompt] * n + [cfg.negative_prompt] * n, clip_skip=cfg.clip_skip)
    unet_dtype = studio.pipeline.unet.dtype
    return cond[:n].to(unet_dtype), cond[n:].to(unet_dtype), used


def sampling_pipeline(studio: Studio, sampler: str, compiled: bool = False):
    """A pipeline over the studio's modules with a fresh scheduler and no text encoder (`render` builds one per
    batch unless given one: the trainer builds one per run for its previews).

    `compiled` puts the studio's `torch.compile`d UNet in it (`Studio.compiled_unet`).

    Nothing on the studio's own pipeline is mutated (its scheduler stays as loaded). Leaving the text
    encoder out makes diffusers keep our conditioning in the UNet dtype: with the fp32 encoder present it
    would cast `prompt_embeds` (and so the latents) to fp32 and break a bf16/fp16 UNet.
    """
    from diffusers import StableDiffusionPipeline

    base = studio.pipeline
    unet = studio.compiled_unet() if compiled else base.unet
    if studio.is_sdxl:
        return sdxl.sampling_pipeline(base, make_scheduler(sampler, base.scheduler.config), unet)
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=make_scheduler(sampler, base.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(
    studio: Studio,
    cfg: GenerateConfig,
    vectors: Mapping[str, torch.Tensor],
    hashes: Mapping[str, str] | None = None,
    on_step: OnStep | None = None,
    pipe: Any = None,
) -> list[Rendered]:
    """Draw one batch of `cfg.batch_size` images with seeds `cfg.seed + i` (-1: random). The caller holds the lock.

    `vectors` maps embedding names to `[n, d]` tensors (they may be trainable parameters: no gradient is
    recorded here). `on_step(step, total)` is called after each denoising step. `pipe` is a `sampling_pipeline`
    to draw with (its sampler and UNet are used, not `cfg.sampler`/`cfg.compile`); None builds a fresh one.
    """
    seed = resolve_seed(cfg.seed)
    seeds = [seed + i for i in range(cfg.batch_size)]
    device = studio.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    with torch.no_grad():
        if pipe is None:
            pipe = sampling_pipeline(studio, cfg.sampler, compiled=compiles(cfg, device))
        if studio.is_sdxl:  # `vectors` holds {"clip_l", "clip_g"} pairs; SDXL ignores clip skip, as A1111 does
            images, used = sdxl.sample(studio, cfg, vectors, generators, pipe, _step_callback(on_step))
            cfg = replace(cfg, clip_skip=1)
        else:
            images, used = _sample(studio, cfg, vectors, generators, pipe, on_step)
    info = studio.info
    ti = ti_hashes(used, hashes or {})
    name, model_hash = (info.name, info.hash) if info else (None, None)
    return [Rendered(img, infotext(cfg, s, name, model_hash, ti, pos), s) for pos, (img, s) in enumerate(zip(images, seeds))]


def _sample(studio, cfg: GenerateConfig, vectors, generators, pipe, on_step: OnStep | None) -> tuple[list, list[str]]:
    """SD 1.x/2.x txt2img with `pipe` (a `sampling_pipeline`): PIL images and the embedding names used."""
    cond, uncond, used = _conditioning(studio, cfg, vectors)
    images = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.cfg_scale,
        width=cfg.width,
        height=cfg.height,
        generator=generators,
        output_type="np",
        callback_on_step_end=_step_callback(on_step),
    ).images
    # A NaN image would be saved as a black PNG without a word: say so instead.
    for image, generator in zip(images, generators):
        if not np.isfinite(image).all():
            raise TinvError(f"the image for seed {generator.initial_seed()} came out of the VAE as NaN (not a number), "
                            "so nothing was saved. A VAE in half precision overflows this way (use a float32 VAE), "
                            "or an embedding in the prompt holds values far out of range.")
    return pipe.numpy_to_pil(images), used


def _step_callback(on_step: OnStep | None):
    """Adapt `on_step(step, total)` to diffusers' `callback_on_step_end` (which must return its kwargs)."""
    if on_step is None:
        return None

    def callback(pipe, i: int, _t, kwargs: dict) -> dict:
        on_step(i + 1, pipe.num_timesteps)
        return kwargs

    return callback


# -- the request workflow ---------------------------------------------------------------------------
class _Cancelled(Exception):
    """Raised inside the denoising callback to stop a render whose consumer went away."""


def _render_streaming(studio: Studio, cfg: GenerateConfig, vectors, hashes) -> Iterator[tuple[int, int] | list[Rendered]]:
    """Run `render` on a worker thread; yield (step, total) as steps finish, then the rendered list.

    The pipeline call blocks, so streaming its steps needs a thread. Closing this generator stops the
    worker at the next step and waits for it, so the caller's lock is never released under a running render.
    """
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def on_step(step: int, total: int) -> None:
        if stop.is_set():
            raise _Cancelled
        events.put(("step", (step, total)))

    def work() -> None:
        try:
            events.put(("done", render(studio, cfg, vectors, hashes, on_step)))
        except _Cancelled:
            events.put(("cancelled", None))
        except BaseException as e:  # handed to the consumer thread and re-raised there
            events.put(("error", e))

    worker = threading.Thread(target=work, name="tinv-render", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = events.get()
            if kind == "step":
                yield value
            elif kind == "done":
                yield value
                return
            elif kind == "error":
                raise value
    finally:
        stop.set()
        worker.join()


def output_folder(paths: Paths, today: _dt.date | None = None) -> Path:
    """outputs/txt2img/<YYYY-MM-DD> (A1111's layout)."""
    return paths.outputs_dir / "txt2img" / (today or _dt.date.today()).isoformat()


def next_image_path(folder: Path, seed: int) -> Path:
    """`NNNNN-seed.png`, numbered after the highest number already in `folder`."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))] if folder.is_dir() else []
    return folder / f"{max(numbers, default=-1) + 1:05d}-{seed}.png"


def check_clip_skip(studio: Studio, clip_skip: int) -> None:
    """`clip_skip` n uses the n-th last layer's output: the loaded text encoder must have n layers."""
    layers = getattr(getattr(studio.text_encoder, "config", None), "num_hidden_layers", None)
    if layers is not None and clip_skip > layers:
        raise ConfigError(f"clip_skip is {clip_skip}, but the loaded model's text encoder has {layers} layers; "
                          f"use 1 to {layers}.")


def generate(studio: Studio, cfg: GenerateConfig, library: EmbeddingLibrary, paths: Paths) -> Iterator[Step | Generated]:
    """Run `cfg.batch_count` batches of `cfg.batch_size` images with the embeddings folder's embeddings.

    Yields `Step` per denoising step and one `Generated` per batch. The lock is taken per batch, so a
    running training interleaves (it takes the lock per optimizer step) instead of failing either side.
    """
    check_clip_skip(studio, cfg.clip_skip)
    # 1. Rescan the embeddings folder: files dropped in since the last request are used without a restart.
    library.rescan_for(studio)
    vectors = sdxl.library_pairs(library) if studio.is_sdxl else library.vectors()
    hashes = library.hashes()
    base_seed = resolve_seed(cfg.seed)
    total = cfg.batch_count * cfg.steps
    t0 = time.perf_counter()
    for b in range(cfg.batch_count):
        batch_cfg = replace(cfg, seed=base_seed + b * cfg.batch_size)
        # 2. Render under the lock; steps are counted across the whole request for the progress bar.
        with studio.session(what="generating"), contextlib.closing(_render_streaming(studio, batch_cfg, vectors, hashes)) as items:
            for item in items:
                if isinstance(item, tuple):
                    # Heun-like samplers run more than `steps` UNet passes: scale to the requested steps.
                    done = b * cfg.steps + round(item[0] / item[1] * cfg.steps)
                    elapsed = time.perf_counter() - t0
                    yield Step(done, total, elapsed, elapsed / done * (total - done) if done else None)
                else:
                    rendered = item
        # 3. Save outside the lock: disk writes need no GPU.
        saved = tuple(_save(r, paths) for r in rendered) if cfg.save else ()
        yield Generated(tuple(r.image for r in rendered), tuple(r.infotext for r in rendered), tuple(r.seed for r in rendered), saved)


def _save(rendered: Rendered, paths: Paths) -> Path:
    folder = output_folder(paths)
    path = next_image_path(folder, rendered.seed)
    with disk_full_is_said(path, "free some space, or untick 'Save images' to generate without saving."):
        return save_png(rendered.image, path, rendered.infotext)
