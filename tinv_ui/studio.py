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
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sdxl
from .checkpoints import quiet_diffusers
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
    family: str = ""  # "SD 1.x", "SD 2.x", "SDXL", ... from the UNet's text width (see `model_family`)
    v_prediction: bool = False  # the scheduler predicts v (SD 2.x 768-v and its fine-tunes)

    @property
    def kind(self) -> str:
        """'SD 2.x, v-prediction': what the status line says the model is."""
        return self.family + (", v-prediction" if self.v_prediction else "")


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
        self.load_error: str | None = None  # the last failed load, in one line, until a load succeeds

    # -- loading -----------------------------------------------------------------------------------
    def load(self, spec: ModelSpec) -> ModelInfo:
        """Load `spec` and make it the held model. Takes the lock (waits for a training step).

        The new model is read into CPU memory first, so a file that fails to load leaves the previous
        model in place; only then is the old one released, before the new one moves to the device, so the
        GPU never holds two models.
        """
        with self.session(what=f"loading {spec.source}"):
            import torch

            t0 = time.perf_counter()
            try:
                device, dtype = pick_device_dtype(spec)
                pipe, info = self._load_pipeline(spec)
            except ModelLoadError as e:
                self.load_error = one_line(e)
                raise
            if self._pipe is not None:  # a full gc.collect() is ~0.5 s at start-up, with nothing to free
                self._release()
            try:
                # Frozen UNet/VAE in half precision on GPU; the text encoders in fp32 (small next to the UNet, and
                # the trained vectors' gradients flow through them). Nothing gets weight gradients. Each part is cast
                # where it is smaller: a widening cast (fp16 file, fp32 target) after the move, so an fp16
                # file never has an fp32 copy in RAM; a narrowing one (fp32 file on a GPU) before it.
                # An SDXL VAE that overflows fp16 stays fp32 (`sdxl.vae_dtype`).
                parts = [(pipe.unet, dtype), (pipe.vae, sdxl.vae_dtype(pipe, dtype)),
                         *((encoder, torch.float32) for encoder in sdxl.text_encoders(pipe))]
                for part, part_dtype in parts:
                    widens = part.dtype.itemsize < part_dtype.itemsize
                    if widens:
                        part.to(device)
                    if part.dtype != part_dtype:  # only when it changes
                        with quiet_diffusers():  # its "should be kept in float32: []" note on every cast
                            part.to(dtype=part_dtype)
                    if not widens:
                        part.to(device)
                    part.requires_grad_(False).eval()
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                del pipe
                self._release()
                first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
                error = ModelLoadError(f"{info.label} could not be moved to {device} (no model is loaded now): "
                                       f"{first_line}")
                self.load_error = one_line(error)
                raise error from e
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self.spec, self.info, self.device, self.dtype = pipe, spec, info, device, dtype
            self.xformers = False
            self.load_error = None
            log.info("loaded %s%s, native %dpx, on %s/%s in %.1fs", info.label, "" if info.is_tiny else f" ({info.kind})",
                     info.resolution, device, dtype, time.perf_counter() - t0)
            return info

    def load_or_fall_back(self, spec: ModelSpec, fallback: ModelSpec = ModelSpec("tiny")) -> ModelInfo:
        """Load `spec`; when it cannot be loaded, load `fallback` and keep the reason in `load_error`.

        The app starts this way: a broken or unsupported `--model` still gives a working page, whose status
        line (and the console, in one line) says why the requested model is not the one loaded.
        """
        try:
            return self.load(spec)
        except ModelLoadError as e:
            if spec == fallback:
                raise
            reason = one_line(e)
            log.error("%s; started with %s instead (pick another model in the header).", reason,
                      TINY_LABEL if fallback.is_tiny else fallback.source)
        info = self.load(fallback)
        self.load_error = reason
        return info

    def _load_pipeline(self, spec: ModelSpec):
        from diffusers import StableDiffusionPipeline

        source = spec.source
        if source == TINY_SDXL:
            pipe = sdxl.load_tiny(self.paths.cache_dir)
            return pipe, ModelInfo(TINY_SDXL_LABEL, "tiny-sdxl-test-model", None, TINY_SDXL_RESOLUTION, True,
                                   "tiny SDXL test model")
        if spec.is_tiny:
            folder = tiny_model_dir(self.paths.cache_dir)
            pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
            return pipe, ModelInfo(TINY_LABEL, "tiny-test-model", None, TINY_RESOLUTION, True, "tiny test model")
        path = Path(source)
        if not path.exists() and (self.paths.models_dir / source).exists():
            path = self.paths.models_dir / source
        if path.is_file():
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                raise ModelLoadError(f"{path.name}: a checkpoint must be a .safetensors or .ckpt file.")
            from .checkpoints import load_single_file

            pipe = load_single_file(path, self.paths.cache_dir)
            return pipe, _model_info(pipe, path.name, path.stem, cached_sha256(path, self.paths.cache_dir)[:10])
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"{path} is a folder without model_index.json; it is not a diffusers model.")
            variant = weights_variant(path)
            options = {"variant": variant} if variant else {}
            if stored := stored_dtype(path, variant):  # diffusers would expand fp16 files to fp32 on the CPU
                options["dtype"] = stored
            pipe = _from_pretrained(sdxl.pipeline_class(path), str(path), local_files_only=True, **options)
            return pipe, _model_info(pipe, path.name, path.name, None)
        if path.is_absolute() or source.count("/") != 1:
            raise ModelLoadError(f"model {source!r} was not found: give a diffusers folder, a file in models/, or a hub id.")
        pipe = _from_pretrained(_hub_pipeline_class(source), source)
        return pipe, _model_info(pipe, source, source.split("/")[-1], None)

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


def _hub_pipeline_class(repo_id: str):
    """SD or SDXL pipeline for a hub id, from its `model_index.json` (fetched first: the only file read to decide)."""
    from huggingface_hub import hf_hub_download

    try:
        index = Path(hf_hub_download(repo_id, "model_index.json"))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, HTTP errors: all mean "cannot load"
        raise ModelLoadError(f"Could not load model {repo_id!r}: {one_line(e)}") from e
    return sdxl.pipeline_class(index.parent, label=repo_id)


def _from_pretrained(cls, source: str, **kw):
    try:
        return cls.from_pretrained(source, safety_checker=None, requires_safety_checker=False, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Could not load model {source!r}: {e}") from e


def _native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


# UNet cross-attention width → family: the text features each family's UNet is trained on.
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def model_family(pipe) -> str:
    """'SD 1.x', 'SD 2.x' or 'SDXL' from the UNet's text width; other widths are named by it."""
    width = int(pipe.unet.config.cross_attention_dim)
    return _FAMILIES.get(width, f"custom, {width}-wide text")


def _model_info(pipe, label: str, name: str, hash_: str | None) -> ModelInfo:
    is_v = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    return ModelInfo(label, name, hash_, _native_resolution(pipe), False, model_family(pipe), is_v)


def one_line(error: BaseException) -> str:
    """An error's message on one line (for the status line and the console)."""
    return " ".join(str(error).split()) or type(error).__name__


# -- the model hash, cached ------------------------------------------------------------------------------------
HASH_CACHE = "model-hashes.json"


def cached_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a checkpoint, remembered by (path, size, mtime) in `cache_dir/model-hashes.json`.

    Hashing reads the whole file (seconds per gigabyte); a file that has not changed is not read again.
    A changed size or mtime (a re-download, an edit) hashes it anew. The cache is a convenience: an
    unreadable cache file is ignored and rewritten.
    """
    from .fileio import atomic_write_text

    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = Path(cache_dir) / HASH_CACHE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(path)
    cache[key] = {**stamp, "sha256": digest}
    try:
        atomic_write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True))
    except OSError as e:  # a read-only cache folder costs a re-hash next time, nothing more
        log.warning("could not save the model hash cache %s: %s", cache_file, e)
    return digest


# -- diffusers folders -------------------------------------------------------------------------------------------
_PLAIN_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                  "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
_VARIANT_WEIGHTS = re.compile(r"^diffusion_pytorch_model\.(?:safetensors\.index\.|bin\.index\.)?([A-Za-z0-9_]+)"
                              r"(?:-\d+-of-\d+)?\.(?:safetensors|bin|json)$")


def weights_variant(folder: Path) -> str | None:
    """The weights variant of a diffusers folder ('fp16' for `*.fp16.safetensors`), None for plain files.

    `from_pretrained(..., variant="fp16")` downloads only the variant files; diffusers then needs the
    variant named to find them. Plain files win when both are there.
    """
    unet = folder / "unet"
    names = {p.name for p in unet.iterdir()} if unet.is_dir() else set()
    if names & set(_PLAIN_WEIGHTS):
        return None
    variants = sorted({m.group(1) for n in names if (m := _VARIANT_WEIGHTS.match(n))})
    if not variants:
        return None
    return "fp16" if "fp16" in variants else variants[0]


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def stored_dtype(folder: Path, variant: str | None):
    """The torch dtype the UNet of a diffusers folder is stored in (from a safetensors header), else None."""
    import torch
    from safetensors import SafetensorError, safe_open

    files = sorted((folder / "unet").glob(f"diffusion_pytorch_model{'.' + variant if variant else ''}*.safetensors"))
    if not files:
        return None
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            name = next(iter(f.keys()), None)
            kind = f.get_slice(name).get_dtype() if name else None
    except (SafetensorError, OSError):
        return None  # from_pretrained reports the broken file
    return getattr(torch, _SAFETENSORS_DTYPES[kind]) if kind in _SAFETENSORS_DTYPES else None


def list_models(models_dir: Path) -> list[str]:
    """Checkpoint files and diffusers folders in `models_dir` (relative names, sorted).

    A diffusers folder is listed once, as the folder: the weight files inside it (`unet/…safetensors`)
    are parts of that model, not models of their own.
    """
    if not models_dir.is_dir():
        return []
    folders = [p.parent for p in models_dir.rglob("model_index.json")]
    found = [p for p in models_dir.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
             and not any(folder in p.parents for folder in folders)]
    found += folders
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(models_dir).parts)]
    return sorted({str(p.relative_to(models_dir)) for p in found}, key=str.lower)
