"""tinv-ui benchmark: our trainer (`tinv_ui.training.train`) and generator (`tinv_ui.generation.render`) timed.

    python bench/bench.py                      # GPU: SD1.5-shaped random model, built offline once, 512 px
    python bench/bench.py --model PATH         # a real model (diffusers folder, .safetensors/.ckpt, hub id)
    python bench/bench.py --tiny --quick       # CPU smoke test on the tiny model (seconds; run by the tests)
    python bench/bench.py --family sdxl        # GPU: SDXL-shaped random model, built offline once, 1024 px
    python bench/bench.py --family sdxl --tiny --quick   # CPU: the tiny SDXL model (128 px)
    python bench/bench.py --load --model PATH  # only the model load: seconds (first and cached-hash) and peak RAM

Measures training samples/s for each batch size, eager and compiled (`TrainConfig.compile`), optimizer
steps/s and peak GPU memory at batch 1, start-up time (model load + latent cache of 20 images), seconds per
20-step image at batch 1 and images/s at batch 8. Prints one table and writes JSON (`--out`).

How each figure is taken (details in bench/README.md):
- training runs the real `train()` generator with previews, periodic saves, the CSV and the optimizer sidecar
  off. Time runs from the Step event that ends the warm-up to the last Step event; the trainer reports each
  step's loss as a float, so every Step event follows a finished step. Peak memory is reset when `Started`
  arrives, so it covers the training steps (not the VAE pass of the latent cache).
- generation calls `render()` (prompt encoding, 20 Euler a steps at CFG 7.5, VAE decode, PIL images) with the
  CUDA clock synchronised around each call. "compiled" is the app's own switch, `GenerateConfig.compile`
  (the studio's UNet in `torch.compile`, channels-last on CUDA), as the Generate panel and `--compile` use it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START = time.perf_counter()  # process start, near enough: only the standard library is imported above
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/bench.py` from a checkout
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("tinv_ui.bench")

# Issue targets: H100, SD1.5 shape, 512 px.
TARGETS = {
    "train_best_samples_per_s": (">=", 150.0),
    "optimizer_steps_per_s_batch1": (">=", 20.0),
    "peak_memory_gib_batch1": ("<=", 3.0),
    "generate_s_per_image_batch1": ("<=", 0.45),
    "generate_images_per_s_batch8": (">=", 9.0),
}
# Peer baseline, shared/spec/gpu-baseline.md (H100 80GB, 2026-11-22): the lean fast_ti.py loop and stock
# diffusers generation, each at its best setting.
BASELINE = {
    "train_best_samples_per_s": 117.2,  # lean loop, batch 16, compiled
    "optimizer_steps_per_s_batch1": 20.9,  # lean loop, batch 1, reduce-overhead (48 ms/step)
    "peak_memory_gib_batch1": 2.35,  # same run
    "generate_s_per_image_batch1": 0.44,  # stock pipeline, UNet compiled
    "generate_images_per_s_batch8": 9.3,  # stock pipeline, UNet compiled
}
METRIC_KEYS = (
    "train_samples_per_s", "train_best_samples_per_s", "train_best_config", "optimizer_steps_per_s_batch1",
    "peak_memory_gib_batch1", "startup_s", "generate_s_per_image_batch1", "generate_images_per_s_batch8",
    "generate",
)
NUM_IMAGES = 20  # the start-up figure is "load + latent cache for 20 images"
PROMPT = "a photo of a cat"


@dataclass(frozen=True)
class Plan:
    """How much to run: batch sizes, modes and step counts."""

    batches: tuple[int, ...]
    modes: tuple[str, ...]  # "eager", "compiled"
    warmup: int  # optimizer steps before timing starts (eager)
    compiled_warmup: int  # compilation happens in the first steps
    steps: int  # timed optimizer steps
    gen_repeats: int  # timed render() calls per setting
    gen_steps: int = 20


FULL = Plan(batches=(1, 4, 8, 16), modes=("eager", "compiled"), warmup=5, compiled_warmup=10, steps=40, gen_repeats=5)
QUICK = Plan(batches=(1, 4), modes=("eager",), warmup=2, compiled_warmup=3, steps=5, gen_repeats=1)


# -- setup: model, images, embedding ----------------------------------------------------------------------------
def build_sd15(folder: Path, cache_dir: Path, dtype=None) -> Path:
    """Save a Stable Diffusion 1.5-shaped pipeline with random weights (same FLOPs as the real one) to `folder`.

    Shapes come from the SD 1.x configs shipped for single-file loading; the tokenizer is the real CLIP one
    built offline. Weights are made on the GPU when there is one (seconds instead of a minute) and saved in
    `dtype` (default fp16).
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tinv_ui.checkpoints import CONFIG_DIR
    from tinv_ui.fileio import atomic_write_text
    from tinv_ui.tiny_model import load_clip_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    configs = CONFIG_DIR / "sd1"
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(cache_dir), unet=unet,
        scheduler=PNDMScheduler.from_pretrained(configs, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".partial")
    pipe.to(dtype or torch.float16).save_pretrained(tmp)
    os.replace(tmp, folder)  # a half-written model is never found under the final name
    atomic_write_text(folder / "BENCH_MODEL.txt", "SD1.5-shaped random weights built by bench/bench.py\n")
    del pipe, unet, vae, text_encoder
    gc.collect()  # the pipeline holds reference cycles; free its GPU memory before anything is timed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def build_sdxl(folder: Path, cache_dir: Path, dtype=None) -> Path:
    """Save an SDXL-shaped pipeline with random weights (SDXL base's shapes and FLOPs) to `folder`.

    Shapes come from the SDXL configs shipped for single-file loading, tokenizers are CLIP's BPE built offline
    (the second pads with "!", as SDXL's does); weights are made on the GPU when there is one, saved in `dtype`
    (default fp16). The VAE config keeps `force_upcast`, so the app runs it in fp32 beside an fp16 UNet.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tinv_ui.checkpoints import CONFIG_DIR
    from tinv_ui.fileio import atomic_write_text
    from tinv_ui.sdxl_checkpoint import tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    configs = CONFIG_DIR / "sdxl"
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder_2"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet,
        tokenizer=tokenizer(configs, "tokenizer", cache_dir), tokenizer_2=tokenizer(configs, "tokenizer_2", cache_dir),
        scheduler=EulerDiscreteScheduler.from_pretrained(configs, subfolder="scheduler"), add_watermarker=False,
    )
    tmp = folder.with_name(folder.name + ".partial")
    pipe.to(dtype or torch.float16).save_pretrained(tmp)
    os.replace(tmp, folder)
    atomic_write_text(folder / "BENCH_MODEL.txt", "SDXL-shaped random weights built by bench/bench.py\n")
    del pipe, unet, vae, text_encoder, text_encoder_2
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def write_images(folder: Path, n: int, size: int) -> Path:
    """`n` distinct gradient PNGs of `size` px with captions in their file names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] * (255.0 / size)
    for i in range(n):
        path = folder / f"{i:03d}-a photo of thing {i}.png"
        if not path.is_file():
            rgb = np.stack([(x + 37 * i) % 256, (y * (1 + i % 3)) % 256, np.full_like(x, 12.0 * i)], -1)
            Image.fromarray(rgb.astype(np.uint8)).save(path)
    return folder


def fresh_embedding(studio, embeddings_dir: Path, name: str) -> Path:
    """(Re)write a 2-vector embedding at step 0, initialised from "cat", so every run starts from scratch.
    With an SDXL model: a clip_l/clip_g pair, as `.safetensors` (and its `.optim` removed)."""
    from tinv_ui import formats, sdxl
    from tinv_ui.embedding import Embedding

    token = studio.tokenizer("cat", add_special_tokens=False).input_ids[0]
    rows = [te.get_input_embeddings().weight[token].detach().float().cpu().repeat(2, 1).clone()
            for te in sdxl.text_encoders(studio.pipeline)]
    if studio.is_sdxl:
        path = embeddings_dir / f"{name}.safetensors"
        formats.optim_path(path).unlink(missing_ok=True)
        return formats.write(Embedding(name, step=0, parts={"clip_l": rows[0], "clip_g": rows[1]}), path)
    return formats.write(Embedding(name, rows[0], step=0), embeddings_dir / f"{name}.pt")


# -- measurements ------------------------------------------------------------------------------------------------
class Clock:
    """Wall-clock with the CUDA queue drained on each reading (a no-op on CPU)."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def now(self) -> float:
        self._sync()
        return time.perf_counter()

    def release(self) -> None:
        """Collect garbage and return cached CUDA blocks, so runs do not inherit each other's memory."""
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None


def measure_startup(studio, spec, dataset_dir: Path, size: int, clock: Clock) -> dict[str, float]:
    """Seconds to load the model onto the device, then to read and VAE-encode the 20 training images."""
    from tinv_ui.config import LatentSampling
    from tinv_ui.dataset import build_latent_cache, load_dataset

    t0 = clock.now()
    studio.load(spec)
    t1 = clock.now()
    with studio.session(what="bench: latent cache"):
        data = load_dataset(dataset_dir, (size, size))
        build_latent_cache(studio.pipeline.vae, data, LatentSampling.DETERMINISTIC, flips=False, use_alpha=False)
    t2 = clock.now()
    return {"load_s": round(t1 - t0, 3), "latent_cache_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
            "images": len(data)}


def measure_training(studio, ctx: dict, batch: int, mode: str, plan: Plan, clock: Clock) -> dict[str, Any]:
    """One `train()` run: samples/s and optimizer steps/s over the timed steps, peak memory, prepare time."""
    import torch

    from tinv_ui.config import TrainConfig
    from tinv_ui.events import Started, Step
    from tinv_ui.training import train

    warm = plan.compiled_warmup if mode == "compiled" else plan.warmup
    if mode == "compiled":
        torch._dynamo.reset()  # each batch size gets its own static graph, not a dynamic-shape recompile
    clock.release()  # the previous run's freed blocks must not count towards this run's peak
    fresh_embedding(studio, ctx["paths"].embeddings_dir, ctx["name"])
    cfg = TrainConfig(
        embedding=ctx["name"], dataset_dir=str(ctx["dataset"]), template="style_filewords", learn_rate="0.005",
        batch_size=batch, max_steps=warm + plan.steps, width=ctx["size"], height=ctx["size"], preview_every=0,
        save_every=0, write_csv_every=0, save_optimizer_state=False, seed=0,
        compile="on" if mode == "compiled" else "off", gradient_checkpointing=ctx.get("checkpointing", False),
    )
    t_call, times, prepare = clock.now(), {}, None
    for event in train(studio, cfg, ctx["library"], ctx["paths"]):
        if isinstance(event, Started):
            prepare = time.perf_counter() - t_call
            clock.reset_peak()
        elif isinstance(event, Step):
            times[event.step] = time.perf_counter()
    peak = clock.peak_gib()
    first, last = warm, max(times)
    if first not in times or last <= first:
        raise RuntimeError(f"train() reported steps {sorted(times)}; expected {warm + plan.steps}")
    seconds = times[last] - times[first]
    steps_per_s = (last - first) / seconds
    return {"batch": batch, "mode": mode, "samples_per_s": round(batch * steps_per_s, 2),
            "steps_per_s": round(steps_per_s, 2), "step_ms": round(1000 / steps_per_s, 1), "peak_gib": peak,
            "prepare_s": round(prepare, 3) if prepare is not None else None, "timed_steps": last - first,
            "first_step_s": round(times[min(times)] - t_call, 3)}


def measure_generation(studio, batch: int, size: int, plan: Plan, clock: Clock, compiled: bool = False) -> dict[str, Any]:
    """Seconds per `render()` call (20 steps, Euler a, CFG 7.5) after one warm-up call."""
    from tinv_ui.config import GenerateConfig
    from tinv_ui.generation import render

    cfg = GenerateConfig(prompt=PROMPT, sampler="Euler a", steps=plan.gen_steps, cfg_scale=7.5, seed=1,
                         width=size, height=size, batch_size=batch, save=False, compile=compiled)
    with studio.session(what="bench: generation"):
        render(studio, cfg, {})  # warm-up (and compilation, when compiled)
        t0 = clock.now()
        for _ in range(plan.gen_repeats):
            images = render(studio, cfg, {})
        seconds = (clock.now() - t0) / plan.gen_repeats
    if len(images) != batch:
        raise RuntimeError(f"render() returned {len(images)} images for batch {batch}")
    return {"batch": batch, "s_per_batch": round(seconds, 4), "s_per_image": round(seconds / batch, 4),
            "images_per_s": round(batch / seconds, 3), "steps": plan.gen_steps}


# -- the run ------------------------------------------------------------------------------------------------------
def measure_load(studio, spec, source_file: Path | None) -> dict[str, Any]:
    """Load `spec` twice in this fresh process: seconds for each, and the process's peak RSS.

    The first load hashes a single-file checkpoint (once per file version; the hash is cached), the second
    shows the load itself. The peak resident set (ru_maxrss) covers imports plus the first load; `rss_start`
    is what the process held before it, so `peak - start` is what loading the model costs in RAM.
    """
    import resource

    def rss_gib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    start = rss_gib()
    t0 = time.perf_counter()
    studio.load(spec)
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    t0 = time.perf_counter()
    studio.load(spec)
    again = time.perf_counter() - t0
    size = source_file.stat().st_size / 2**30 if source_file and source_file.is_file() else None
    return {"model": studio.info.label, "file_gib": None if size is None else round(size, 2),
            "load_s": round(first, 2), "reload_s": round(again, 2), "rss_start_gib": round(start, 2),
            "peak_rss_gib": round(peak, 2), "peak_above_start_gib": round(peak - start, 2),
            "device": str(studio.device), "dtype": str(studio.dtype).removeprefix("torch.")}


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """`--load`: only the model load (no training, no generation)."""
    from tinv_ui.config import Paths
    from tinv_ui.studio import Studio

    work = args.work.resolve()
    paths = Paths(work / "embeddings", work / "outputs", work / "models", args.cache_dir.resolve())
    spec, _ = model_spec(args, paths)
    warm_imports()  # the first diffusers import takes seconds that are not the load's
    if spec.is_tiny:  # built once on first use: that is not the load either
        from tinv_ui.tiny_model import tiny_model_dir

        tiny_model_dir(paths.cache_dir)
    return {"load": measure_load(Studio(paths), spec, Path(spec.source) if not spec.is_tiny else None)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do every measurement and return the results dict (also what is written as JSON)."""
    from tinv_ui.config import Paths
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.studio import Studio

    plan = QUICK if args.quick else FULL
    if args.batches:
        plan = Plan(**{**plan.__dict__, "batches": tuple(args.batches)})
    if args.no_compile:
        plan = Plan(**{**plan.__dict__, "modes": ("eager",)})
    work = args.work.resolve()
    paths = Paths(work / "embeddings", work / "outputs", work / "models", args.cache_dir.resolve())
    import torch  # noqa: F401  (counted in the start-up: the CLI and the app import it too)

    t_setup = time.perf_counter()
    spec, size = model_spec(args, paths)  # may build a model on first use: not start-up, excluded
    if spec.is_tiny:
        from tinv_ui.tiny_model import tiny_model_dir

        tiny_model_dir(paths.cache_dir)
    setup_s = time.perf_counter() - t_setup
    warm_imports()
    imports_s = time.perf_counter() - START - setup_s
    studio = Studio(paths)
    clock = Clock(_device(spec))
    dataset = write_images(work / f"images-{size}", NUM_IMAGES, size)
    startup = measure_startup(studio, spec, dataset, size, clock)
    ctx = {"name": "benchemb", "dataset": dataset, "size": size, "paths": paths,
           "library": EmbeddingLibrary(paths.embeddings_dir), "checkpointing": args.gradient_checkpointing}
    paths.embeddings_dir.mkdir(parents=True, exist_ok=True)
    train_runs = [measure_training(studio, ctx, b, m, plan, clock) for m in plan.modes for b in plan.batches]
    # What a user waits for before training starts: libraries imported, model loaded, then the first run's
    # train() call (checks, dataset, latent cache) to its first finished step.
    startup["imports_s"] = round(imports_s, 3)
    startup["to_first_step_s"] = round(imports_s + startup["load_s"] + train_runs[0]["first_step_s"], 3)
    generation = generation_runs(studio, size, plan, clock)
    results = {"meta": environment(studio, spec, size, plan, args),
               "metrics": summarize(startup, train_runs, generation),
               "targets": {k: list(v) for k, v in TARGETS.items()}, "baseline": BASELINE}
    results["pass"] = verdicts(results)
    return results


def generation_runs(studio, size: int, plan: Plan, clock: Clock) -> dict[str, list[dict[str, Any]]]:
    """render() timings at batch 1 and 8, eager and (unless disabled) with a compiled UNet."""
    out = {"eager": [measure_generation(studio, b, size, plan, clock) for b in (1, 8)]}
    if "compiled" in plan.modes:
        # static shapes: each batch size compiles once, in its warm-up call
        out["compiled"] = [measure_generation(studio, b, size, plan, clock, compiled=True) for b in (1, 8)]
    return out


def summarize(startup: dict, train_runs: list[dict], generation: dict[str, list[dict]]) -> dict[str, Any]:
    """The headline metrics (every key of METRIC_KEYS) from the raw runs."""
    per_mode: dict[str, dict[str, float]] = {}
    for r in train_runs:
        per_mode.setdefault(r["mode"], {})[str(r["batch"])] = r["samples_per_s"]
    best = max(train_runs, key=lambda r: r["samples_per_s"])
    best_b1 = max((r for r in train_runs if r["batch"] == 1), key=lambda r: r["steps_per_s"])
    gen_b1 = min((g for runs in generation.values() for g in runs if g["batch"] == 1), key=lambda g: g["s_per_image"])
    gen_b8 = max((g for runs in generation.values() for g in runs if g["batch"] == 8), key=lambda g: g["images_per_s"])
    return {
        "train_samples_per_s": per_mode,
        "train_best_samples_per_s": best["samples_per_s"],
        "train_best_config": f"batch {best['batch']}, {best['mode']}",
        "optimizer_steps_per_s_batch1": best_b1["steps_per_s"],
        "peak_memory_gib_batch1": best_b1["peak_gib"],  # of the run that gave the batch-1 figure
        "startup_s": startup,
        "generate_s_per_image_batch1": gen_b1["s_per_image"],
        "generate_images_per_s_batch8": gen_b8["images_per_s"],
        "generate": generation,
        "train_runs": train_runs,
    }


def model_spec(args: argparse.Namespace, paths) -> tuple[Any, int]:
    """Which model to load and at what training/generation size."""
    import torch

    from tinv_ui.config import ModelSpec

    from tinv_ui.tiny_model import TINY_SDXL, TINY_SDXL_RESOLUTION

    xl = args.family == "sdxl"
    if args.tiny or (args.model is None and not torch.cuda.is_available()):
        if not args.tiny:
            log.warning("no CUDA device: running the smoke test on the tiny model (pass --tiny to silence this)")
        if xl:
            return ModelSpec(TINY_SDXL, device=args.device), args.size or TINY_SDXL_RESOLUTION
        return ModelSpec("tiny", device=args.device), args.size or 64
    if args.model is None and xl:
        source = str(build_sdxl(paths.models_dir / "sdxl-random", paths.cache_dir))
    else:
        source = args.model or str(build_sd15(paths.models_dir / "sd15-random", paths.cache_dir))
    return ModelSpec(source, device=args.device, dtype=args.dtype), args.size or (1024 if xl else 512)


def warm_imports() -> None:
    """Import the libraries before the load is timed (their time is reported as `imports_s`)."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one table is the output; no per-component bars


def comparable(meta: dict[str, Any]) -> bool:
    """Only a GPU run on an SD1.5-shaped model at 512 px is judged against the H100 targets (not SDXL's)."""
    return (not meta["device"].startswith("CPU") and meta["size"] == 512 and "tiny" not in meta["model"]
            and meta.get("family") != "SDXL")


def verdicts(results: dict[str, Any]) -> dict[str, bool | None] | None:
    """Target met per metric (None: not measured), or None when the run is not comparable with the targets."""
    if not comparable(results["meta"]):
        return None
    m = results["metrics"]
    return {k: None if m[k] is None else _meets(m[k], op, t) for k, (op, t) in TARGETS.items()}


def _device(spec):
    from tinv_ui.studio import pick_device_dtype

    return pick_device_dtype(spec)[0]


def environment(studio, spec, size: int, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Machine, versions, model and settings: enough to compare two result files honestly."""
    import diffusers
    import torch
    import transformers

    cuda = studio.device.type == "cuda"
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(studio.device) if cuda else f"CPU ({os.cpu_count()} cores)",
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "model": studio.info.label, "dtype": str(studio.dtype).removeprefix("torch."), "size": size,
        "quick": bool(args.quick), "plan": plan.__dict__, "cpu_threads": torch.get_num_threads(),
        "family": "SDXL" if studio.is_sdxl else "SD", "gradient_checkpointing": bool(args.gradient_checkpointing),
    }


# -- output -------------------------------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    """One plain-text table: metric, measured, target, peer baseline."""
    m, meta, verdict = results["metrics"], results["meta"], results["pass"] or {}
    rows = [("metric", "measured", "target", "peer baseline")]
    for mode, per_batch in m["train_samples_per_s"].items():
        for b, v in per_batch.items():
            rows.append((f"train samples/s, batch {b}, {mode}", _fmt(v), "", ""))
    for key in TARGETS:
        op, target = TARGETS[key]
        mark = {True: " ok", False: " MISS"}.get(verdict.get(key), "")
        rows.append((key, _fmt(m[key]) + mark, f"{op} {target}", _fmt(BASELINE[key])))
    s = m["startup_s"]
    rows.append((f"start-up: load + latent cache ({s['images']} images)", f"{s['load_s']} + {s['latent_cache_s']} s",
                 "", ""))
    if "to_first_step_s" in s:
        rows.append((f"start-up to first step: imports + load + train() to step 1 ({s['images']} images)",
                     f"{s['to_first_step_s']} s", "< 15", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"tinv-ui bench: {meta['device']}, {meta['model']}, {meta['size']} px, {meta['dtype']}, "
             f"torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if results["pass"] is None:
        lines.append("(the targets are for an H100 with the SD1.5-shaped model at 512 px; this run is not judged "
                     "against them)")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _meets(value: float, op: str, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="Benchmark tinv-ui's trainer and generator.")
    p.add_argument("--model", default=None, help="A real model (diffusers folder, .safetensors/.ckpt, hub id). "
                   "Default: an SD1.5-shaped random model built offline into --work.")
    p.add_argument("--tiny", action="store_true", help="Use the tiny test model (the CPU smoke test).")
    p.add_argument("--family", choices=("sd", "sdxl"), default="sd", help="sdxl: an SDXL-shaped random model at "
                   "1024 px (with --tiny: the tiny SDXL model, 128 px). Default sd (SD1.5 shape, 512 px).")
    p.add_argument("--gradient-checkpointing", action="store_true", help="Train with gradient checkpointing "
                   "(the SDXL 12 GiB batch-1 target is for this setting).")
    p.add_argument("--quick", action="store_true", help="Few steps, batches 1 and 4, eager only.")
    p.add_argument("--load", action="store_true", help="Only measure loading the model: seconds and peak RAM.")
    p.add_argument("--batches", type=int, nargs="+", help="Training batch sizes (default 1 4 8 16).")
    p.add_argument("--no-compile", action="store_true", help="Skip the torch.compile runs.")
    p.add_argument("--size", type=int, default=None, help="Image size in px (default 512; 64 for --tiny).")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available).")
    p.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 (default: the app's choice).")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; "
                   "1 keeps a CPU smoke run steady on a busy machine).")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench",
                   help="Scratch folder (model, images, embeddings).")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="tinv-ui cache (tokenizer, tiny model).")
    p.add_argument("--out", type=Path, default=None, help="JSON results file (default <work>/results-<device>.json).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON. Returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built or read locally
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from tinv_ui.fileio import atomic_write_text

    if args.load:
        results = run_load(args)
        if args.out:
            atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        r = results["load"]
        file = f" ({r['file_gib']} GiB file)" if r["file_gib"] is not None else ""
        sys.stdout.write(f"load {r['model']}{file} on {r['device']}/{r['dtype']}: {r['load_s']} s "
                         f"(again, hash cached: {r['reload_s']} s); peak RSS {r['peak_rss_gib']} GiB, "
                         f"{r['peak_above_start_gib']} GiB above the {r['rss_start_gib']} GiB before loading\n")
        return 0
    results = run(args)

    out = args.out or args.work / f"results-{'cpu' if results['meta']['device'].startswith('CPU') else 'gpu'}.json"
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    sys.stdout.write(table(results))  # the table is this script's output, not a log line
    log.info("results written to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
