"""`Studio`: the one object that owns the loaded pipeline, its device/dtype and the GPU lock.

Training and generation are functions that take a studio; the studio holds no training or sampling
logic. There are no module-level model globals: the app, the CLI and each test create their own studio.

Lock rules (docs/design.md, "The lock"):
- one plain `threading.Lock` (not an RLock: a generator holding it may be resumed on another thread);
- the trainer takes it per optimizer step, so a generation request waits at most one step;
- `session()` blocks by default; `session(timeout=0)` raises `BusyError` saying who holds it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sdxl
from .config import ModelSpec, Paths
from .errors import BusyError, ModelLoadError
from .fileio import file_sha256
from .tiny_model import TINY_LABEL, TINY_RESOLUTION, TINY_SDXL, TINY_SDXL_LABEL, TINY_SDXL_RESOLUTION, tiny_model_dir

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelInfo:
    """What the UI and infotexts say about the loaded model."""

    label: str  # shown in the model picker
    name: str  # infotext "Model:"
    hash: str | None  # infotext "Model hash:" (10 hex of the checkpoint sha256), None for folders/tiny
    resolution: int  # native training/generation size
    is_tiny: bool


def pick_device_dtype(spec: ModelSpec) -> tuple[Any, Any]:
    import torch

    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec.dtype:
        dtype = getattr(torch, spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"dtype {spec.dtype!r} is unknown; use float16, bfloat16 or float32.")
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    return device, dtype


class Studio:
    """Owns one Stable Diffusion pipeline (tokenizer, text encoder, UNet, VAE, scheduler) and its lock."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths()
        self._lock = threading.Lock()
        self._holder = ""  # what holds the lock, for BusyError messages
        self._pipe = None
        self._compiled_unet = None  # torch.compile wrapper of the loaded UNet for generation, made on first use
        self.spec: ModelSpec | None = None
        self.info: ModelInfo | None = None
        self.device = None
        self.dtype = None
        self.xformers = False  # the loaded pipeline's attention: xformers (True) or PyTorch SDPA (False)

    # -- loading -----------------------------------------------------------------------------------
    def load(self, spec: ModelSpec) -> ModelInfo:
        """Load `spec` and make it the held model. Takes the lock (waits for a training step).

        The new model is read into CPU memory first, so a file that fails to load leaves the previous
        model in place; only then is the old one released, before the new one moves to the device, so the
        GPU never holds two models.
        """
        with self.session(what=f"loading {spec.source}"):
            t0 = time.perf_counter()
            device, dtype = pick_device_dtype(spec)
            pipe, info = self._load_pipeline(spec)
            if self._pipe is not None:  # a full gc.collect() is ~0.5 s at start-up, with nothing to free
                self._release()
            try:
                # Frozen UNet/VAE in half precision on GPU; the text encoder stays fp32 (it is small, and the
                # trained vectors' gradients flow through it). Nothing here ever gets weight gradients.
                # An SDXL VAE that overflows fp16 stays fp32 (`sdxl.vae_dtype`).
                for part in (pipe.unet, pipe.vae):
                    part_dtype = sdxl.vae_dtype(pipe, dtype) if part is pipe.vae else dtype
                    if part.dtype != part_dtype:  # only when it changes: diffusers warns about every dtype cast
                        part.to(dtype=part_dtype)
                    part.to(device).requires_grad_(False).eval()
                for encoder in sdxl.text_encoders(pipe):
                    encoder.to(device).requires_grad_(False).eval()
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                del pipe
                self._release()
                first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ModelLoadError(f"{info.label} could not be moved to {device} (no model is loaded now): "
                                     f"{first_line}") from e
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self.spec, self.info, self.device, self.dtype = pipe, spec, info, device, dtype
            self.xformers = False
            log.info("loaded %s on %s/%s in %.1fs", info.label, device, dtype, time.perf_counter() - t0)
            return info

    def _load_pipeline(self, spec: ModelSpec):
        from diffusers import StableDiffusionPipeline

        source = spec.source
        if source == TINY_SDXL:
            pipe = sdxl.load_tiny(self.paths.cache_dir)
            return pipe, ModelInfo(TINY_SDXL_LABEL, "tiny-sdxl-test-model", None, TINY_SDXL_RESOLUTION, True)
        if spec.is_tiny:
            folder = tiny_model_dir(self.paths.cache_dir)
            pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
            return pipe, ModelInfo(TINY_LABEL, "tiny-test-model", None, TINY_RESOLUTION, True)
        path = Path(source)
        if not path.exists() and (self.paths.models_dir / source).exists():
            path = self.paths.models_dir / source
        if path.is_file():
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                raise ModelLoadError(f"{path.name}: a checkpoint must be a .safetensors or .ckpt file.")
            from .checkpoints import load_single_file

            pipe = load_single_file(path, self.paths.cache_dir)
            return pipe, ModelInfo(path.name, path.stem, file_sha256(path)[:10], _native_resolution(pipe), False)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"{path} is a folder without model_index.json; it is not a diffusers model.")
            pipe = _from_pretrained(sdxl.pipeline_class(path), str(path), local_files_only=True)
            return pipe, ModelInfo(path.name, path.name, None, _native_resolution(pipe), False)
        if path.is_absolute() or source.count("/") != 1:
            raise ModelLoadError(f"model {source!r} was not found: give a diffusers folder, a file in models/, or a hub id.")
        pipe = _from_pretrained(StableDiffusionPipeline, source)
        return pipe, ModelInfo(source, source.split("/")[-1], None, _native_resolution(pipe), False)

    def _release(self) -> None:
        self._pipe = None
        self._compiled_unet = None
        self.spec = None
        self.info = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # -- access --------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def pipeline(self):
        if self._pipe is None:
            raise ModelLoadError("No model is loaded: pick one in the model picker (or the tiny test model).")
        return self._pipe

    @property
    def text_encoder(self):
        return self.pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def embedding_width(self) -> int:
        """Width of one token vector in the loaded text encoder (768 SD1, 1024 SD2, 32 tiny); for SDXL the sum
        of both encoders' widths (768 + 1280 = 2048), as an SDXL embedding's width is counted."""
        return sum(sdxl.token_widths(self.pipeline))

    @property
    def embedding_parts(self) -> tuple[int, int] | None:
        """SDXL: the (clip_l, clip_g) widths an embedding pair needs, (768, 1280); None for SD 1.x/2.x."""
        widths = sdxl.token_widths(self.pipeline)
        return (widths[0], widths[1]) if len(widths) == 2 else None

    @property
    def is_sdxl(self) -> bool:
        """True when the loaded model is SDXL-architecture (two text encoders, `text_time` conditioning)."""
        return self.loaded and sdxl.is_sdxl(self.pipeline)

    def set_attention(self, xformers: bool) -> bool:
        """Switch the loaded pipeline's attention to xformers or back to PyTorch SDPA, under the lock.

        xformers needs CUDA and the xformers package; without them this logs why and keeps SDPA.
        Returns whether xformers is on now. The one place attention is switched (app start, training).
        """
        with self.session(what="switching attention"):
            pipe = self.pipeline
            if xformers and not self.xformers:
                if not xformers_usable(self.device):
                    log.warning("xformers needs CUDA and the xformers package (pip install xformers); "
                                "using SDPA attention.")
                    return False
                pipe.enable_xformers_memory_efficient_attention()
            elif not xformers and self.xformers:
                pipe.disable_xformers_memory_efficient_attention()
            self.xformers = xformers
            return xformers

    def compiled_unet(self):
        """The loaded UNet wrapped in `torch.compile` for generation; the caller holds the lock.

        Made once per loaded model and reused, so its compiled graphs are too. Shapes are static
        (`dynamic=False`): each new batch size or image size compiles once more (about a minute for an SD
        UNet on a GPU), then runs at the compiled speed. On CUDA the UNet is put in channels-last memory
        format first, the layout the compiled convolutions are fast with (the trainer uses it too).
        """
        import torch

        unet = self.pipeline.unet
        if self._compiled_unet is None:
            self._compiled_unet = torch.compile(unet, dynamic=False)
            log.info("generation uses a torch.compile'd UNet; each new image/batch size compiles on first use")
        if self.device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
        return self._compiled_unet

    # -- the lock --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, timeout: float | None = None, what: str = "") -> Iterator["Studio"]:
        """Hold the GPU lock for the block. Waits (forever by default, or `timeout` seconds)."""
        ok = self._lock.acquire(timeout=-1 if timeout is None else timeout)
        if not ok:
            raise BusyError(f"The model is busy ({self._holder or 'another task'}); wait for it or stop it.")
        self._holder = what
        try:
            yield self
        finally:
            self._holder = ""
            self._lock.release()

    @property
    def busy_with(self) -> str:
        return self._holder if self._lock.locked() else ""


def xformers_usable(device) -> bool:
    """True on a CUDA device with the xformers package installed."""
    import importlib.util

    return getattr(device, "type", None) == "cuda" and importlib.util.find_spec("xformers") is not None


def _from_pretrained(cls, source: str, **kw):
    try:
        return cls.from_pretrained(source, safety_checker=None, requires_safety_checker=False, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Could not load model {source!r}: {e}") from e


def _native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def list_models(models_dir: Path) -> list[str]:
    """Checkpoint files and diffusers folders in `models_dir` (relative names, sorted)."""
    if not models_dir.is_dir():
        return []
    found = [p for p in models_dir.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES]
    found += [p.parent for p in models_dir.rglob("model_index.json")]
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(models_dir).parts)]
    return sorted({str(p.relative_to(models_dir)) for p in found}, key=str.lower)
