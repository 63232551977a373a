"""Single-file Stable Diffusion checkpoints (A1111 / CompVis layout) → a diffusers pipeline, offline.

A `.safetensors` or `.ckpt` file in the original layout holds three models under fixed prefixes:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoder, which names the family:
`cond_stage_model.transformer.*` (CLIP ViT-L, SD 1.x) or `cond_stage_model.model.*` (OpenCLIP ViT-H, SD 2.x).

diffusers knows how to convert those weights, but left alone it downloads the matching diffusers configs from
the Hub. We ship those small JSON configs in `tinv_ui/model_configs/<family>/`, build the CLIP tokenizer from
the vocabulary in `tinv_ui/assets`, and convert each component from the state dict we already hold, so a load
never touches the network and reads the file once.

The shipped configs are the ones diffusers' own single-file loader picks (`fetch_diffusers_config` in
diffusers/loaders/single_file_utils.py): stable-diffusion-v1-5 for SD 1.x and stable-diffusion-2-1 for every
SD 2.x file, which sets `upcast_attention` (attention scores in fp32; the 768-v model gives NaN/black images
in fp16 without it). Where diffusers assumes 768-v for all SD 2.x files, the native size and prediction type
here come from A1111's probe or a sidecar `.yaml` instead (`_set_parameterization`). Each component keeps the dtype it has in the file (an
fp16 file stays fp16 until the studio has moved it to its device), so loading needs about the file's size
in RAM, not twice that.

Safety: `.ckpt` files are pickles. They are read with `torch.load(weights_only=True)`, which refuses any
callable outside torch's tensor allow-list; the few harmless training leftovers of old LDM checkpoints
(a Lightning `ModelCheckpoint` callback, numpy scalars) are mapped to an inert placeholder instead of their
real classes, so none of their code runs.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .tiny_model import load_clip_tokenizer

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
SUPPORTED = (
    "Supported: SD 1.x (CLIP ViT-L text encoder, keys cond_stage_model.transformer.*), SD 2.x "
    "(OpenCLIP ViT-H, keys cond_stage_model.model.*; 512-base and 768-v) and SDXL base-architecture "
    "(conditioner.embedders.0/1.*; epsilon or v_pred) text-to-image checkpoints in the original "
    "A1111/CompVis layout, or a diffusers folder."
)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x
UNET_IN = UNET + "input_blocks.0.0.weight"
UNET_EMA = "model_ema."  # LDM training checkpoints keep an EMA copy of the UNet under flattened key names
CLIP_TOKENS = CLIP + "text_model.embeddings.token_embedding.weight"
OPEN_CLIP_TOKENS = OPEN_CLIP + "token_embedding.weight"

# UNet input channels other than 4 mean a model conditioned on extra images, which txt2img cannot feed.
_IN_CHANNEL_KINDS = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth-conditioned model",
                     7: "an x4 upscaler"}

# Old LDM .ckpt files pickle some training state next to the weights. These globals are harmless metadata;
# they are bound to `_Inert` (never to the real class or function), and everything not a tensor is dropped.
_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.dtype", "numpy.ndarray",
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What `detect` found in a checkpoint's keys and shapes."""

    family: str  # "sd1", "sd2" or "sdxl": the folder under model_configs/ and the conversion to use
    text_width: int  # token vector width: 768 SD1, 1024 SD2, 768 + 1280 SDXL (32 for a converted tiny test model)
    num_tensors: int
    objective: str = "epsilon"  # SDXL files say "v_prediction" with a `v_pred` key (sdxl_checkpoint.py)
    zero_snr: bool = False  # SDXL files trained with zero terminal SNR carry a `ztsnr` key
    has_ema: bool = False  # an EMA copy of the UNet (model_ema.*) sits beside the regular weights

    @property
    def label(self) -> str:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.family]


class _Inert:
    """Stands in for a harmless pickled training object; accepts any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# -- public API ------------------------------------------------------------------------------------------
def load_single_file(path: str | Path, cache_dir: str | Path, config: str | Path | None = None):
    """Load an original-layout SD 1.x / 2.x checkpoint into a `StableDiffusionPipeline` (fp32, CPU), offline.

    `config` is a diffusers folder whose component configs replace the shipped ones (used for models with
    non-standard shapes, and by the tests' tiny model); without it the family's shipped configs are used and
    SD 2.x v-prediction (768-v) is detected. Raises `ModelLoadError` saying what was found and what is supported.
    """
    path, cache_dir = Path(path), Path(cache_dir)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such checkpoint file.")
    # Safetensors: decide from the header before reading gigabytes; a pickle has to be read whole first.
    if path.suffix.lower() == ".safetensors":
        info = detect(safetensors_shapes(path), path.name)
        state = _load_safetensors(path)
    else:
        state = load_ckpt(path)
        info = detect({k: tuple(v.shape) for k, v in state.items()}, path.name)
    folder = Path(config) if config is not None else CONFIG_DIR / info.family
    if info.family == "sdxl":
        from .sdxl_checkpoint import assemble

        pipe = assemble(state, folder, info, cache_dir, path.name)
    else:
        pipe = _assemble(state, folder, info, cache_dir, path.name)
    del state
    _set_parameterization(pipe, path, info, shipped=config is None)
    log.info("loaded %s as %s (%s, %d tensors, %s)", path.name, info.label, folder.name, info.num_tensors,
             str(pipe.unet.dtype).removeprefix("torch."))
    if info.has_ema:
        # As A1111 does (its inference configs set use_ema: False): the regular UNet weights, which are the
        # ones the model was saved to be used with; the EMA copy is ignored.
        log.info("%s also holds EMA weights (model_ema.*); the regular (non-EMA) UNet weights were loaded, as "
                 "A1111 does.", path.name)
    return pipe


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Detect a checkpoint's family without building models (a `.ckpt` is still read whole: it is a pickle)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return detect(safetensors_shapes(path), path.name)
    return detect({k: tuple(v.shape) for k, v in load_ckpt(path).items()}, path.name)


def detect(shapes: Mapping[str, tuple[int, ...]], name: str) -> CheckpointInfo:
    """Family of an original-layout checkpoint from its tensor names and shapes; `ModelLoadError` if unsupported."""
    shapes = _with_text_model_prefix(shapes)
    from . import sdxl_checkpoint

    if sdxl_checkpoint.is_sdxl_layout(shapes):
        return sdxl_checkpoint.detect(shapes, name, UNET_IN, UNET, VAE, SUPPORTED)
    if UNET_IN not in shapes or not (CLIP_TOKENS in shapes or OPEN_CLIP_TOKENS in shapes):
        raise ModelLoadError(f"{name} is {describe(shapes)}, not an SD 1.x/2.x checkpoint. {SUPPORTED}")
    in_channels = shapes[UNET_IN][1]
    if in_channels != 4:
        kind = _IN_CHANNEL_KINDS.get(in_channels, "a model with extra conditioning inputs")
        raise ModelLoadError(f"{name} is {kind} (its UNet takes {in_channels} input channels, txt2img needs 4). "
                             f"{SUPPORTED}")
    family, key = ("sd1", CLIP_TOKENS) if CLIP_TOKENS in shapes else ("sd2", OPEN_CLIP_TOKENS)
    width = shapes[key][1]
    if not any(k.startswith(VAE) for k in shapes):
        raise ModelLoadError(f"{name} has no VAE weights (first_stage_model.*); it is a partial checkpoint. "
                             f"{SUPPORTED}")
    context = next((s[1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), width)
    if context != width:
        raise ModelLoadError(f"{name}: its UNet expects {context}-wide text features but its text encoder gives "
                             f"{width}; the file mixes two models.")
    has_ema = sum(k.startswith(UNET_EMA) for k in shapes) > 100  # diffusers' own test for an EMA checkpoint
    return CheckpointInfo(family, int(width), len(shapes), has_ema=has_ema)


def describe(shapes: Mapping[str, Any]) -> str:
    """A short human description of what a state dict looks like, for error messages."""
    keys = list(shapes)
    has = lambda *parts: any(any(p in k for p in parts) for k in keys)  # noqa: E731
    starts = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not keys:
        return "a file with no tensors"
    if starts("conditioner.embedders."):
        return "an SDXL checkpoint (conditioner.embedders.* text encoders)"
    if has("joint_blocks."):
        return "an SD3 checkpoint"
    if has("double_blocks.", "single_blocks."):
        return "a Flux checkpoint"
    if has("lora_", "lokr_", "hada_"):
        return "a LoRA/LyCORIS file (not a full model)"
    if has("emb_params", "string_to_param") or set(keys) <= {"clip_l", "clip_g"}:
        return "a textual-inversion embedding (put it in the embeddings folder)"
    if starts(UNET):
        return f"a UNet with no text encoder we know (no {CLIP}* or {OPEN_CLIP}* weights)"
    if starts("encoder.conv_in.") and starts("decoder."):
        return "a VAE on its own"
    if starts("conv_in.") and starts("down_blocks."):
        return "a diffusers-layout UNet (load the whole diffusers folder instead)"
    return f"an unknown layout (first keys: {', '.join(keys[:3])})"


# -- reading files -----------------------------------------------------------------------------------------
def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path.name} is not a readable .safetensors file ({e}); re-download it.") from e


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return _with_text_model_prefix(load_file(str(path)))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path.name}: reading its tensors failed ({e}); the file may be truncated.") from e


def load_ckpt(path: Path) -> dict[str, Any]:
    """Tensors of a `.ckpt` pickle, read with `weights_only=True`; a pickle that wants to run code is refused."""
    import torch

    inert = [(_Inert, name) for name in _INERT_GLOBALS]
    try:
        with torch.serialization.safe_globals(inert):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e) from e
    except Exception as e:  # noqa: BLE001 - on arbitrary bytes the unpickler fails in any way (IndexError, ...)
        raise ModelLoadError(f"{path.name} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from e
    # Lightning checkpoints nest the weights under "state_dict" (sometimes twice).
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors.")
    return _with_text_model_prefix({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def _unpickling_error(path: Path, e: Exception) -> ModelLoadError:
    text = str(e)
    unsafe = re.search(r"GLOBAL (\S+)|reduce for unrecognized function (\S+)|Can only (?:build|create)[^\n]*got (\S+)",
                       text)
    if unsafe:
        what = next(g for g in unsafe.groups() if g)
        return ModelLoadError(
            f"{path.name} was refused: it is a pickle that asks to call {what}, which could run code on this "
            "machine. Nothing from it was executed. Use a .safetensors version of this model.")
    # torch wraps the real reason after "WeightsUnpickler error:"; its generic preamble would mislead here.
    reason = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0] or repr(e)
    return ModelLoadError(f"{path.name} is not a readable PyTorch checkpoint ({reason}); it may be corrupt or "
                          "truncated.")


def _with_text_model_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Old SD 1.x files lack `text_model.` in their CLIP keys (transformers < 4.22 layout); add it."""
    out = {}
    for k, v in state.items():
        if k.startswith(CLIP) and not k.startswith(CLIP + "text_model."):
            k = CLIP + "text_model." + k[len(CLIP):]
        out[k] = v
    return out


# -- building the pipeline -----------------------------------------------------------------------------------
def _assemble(state: dict[str, Any], folder: Path, info: CheckpointInfo, cache_dir: Path, name: str):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    kw = dict(config=str(folder), local_files_only=True)
    try:
        with quiet_diffusers():
            unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", dtype=_stored_dtype(state, UNET),
                                                         **kw)
            vae = AutoencoderKL.from_single_file(state, subfolder="vae", dtype=_stored_dtype(state, VAE), **kw)
            text_dtype = _stored_dtype(state, "cond_stage_model.")
            text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder",
                                                                torch_dtype=text_dtype, **kw)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:  # a shape or key that does not fit the configs
        raise ModelLoadError(f"{name}: its weights do not fit the {info.label} model shape ({e}). {SUPPORTED}") from e
    for part, model in (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)):
        _check_complete(model, part, name, info)
    tokenizer = load_clip_tokenizer(cache_dir)
    if info.family == "sd2":
        tokenizer.pad_token = "!"  # OpenCLIP pads with id 0 ("!"), as the diffusers SD 2 tokenizer does
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_pretrained(str(folder), subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _stored_dtype(state: Mapping[str, Any], prefix: str):
    """The floating dtype most of the `prefix` tensors are stored in (fp16, bf16, fp32): the component is
    built in it, so no fp32 copy of an fp16 file is ever made on the CPU."""
    import torch

    counts: dict[Any, int] = {}
    for k, v in state.items():
        if k.startswith(prefix) and v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else torch.float32


# diffusers' messages during a single-file load that the user can do nothing about: a dtype note listing no
# modules at all, and advice for its converter's `--extract_ema` flag (we say which weights were loaded).
_NOISE = (re.compile(r"should be kept in float32: \[\]"), re.compile(r"--extract_ema"),
          re.compile(r"^Checkpoint has both EMA and non-EMA weights"))
_NOISY_LOGGERS = ("diffusers.models.modeling_utils", "diffusers.loaders.single_file_utils")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in _NOISE)


@contextlib.contextmanager
def quiet_diffusers():
    """Drop `_NOISE` from diffusers' loggers for the block (everything else they say still shows)."""
    noise = _DropNoise()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def _check_complete(model, part: str, name: str, info: CheckpointInfo) -> None:
    """diffusers leaves weights missing from the file on the meta device; report them instead."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{name}: the {part} misses {len(missing)} weights for the {info.label} shape "
                             f"(e.g. {missing[0]}); the file is incomplete or a different architecture. {SUPPORTED}")


# -- v-prediction (SD 2.x 768-v) -------------------------------------------------------------------------------
def _set_parameterization(pipe, path: Path, info: CheckpointInfo, shipped: bool) -> None:
    """Switch to v-prediction where the file is a v model: a sidecar `NAME.yaml` (A1111's convention) decides;
    without one, SD 2.x files loaded with the shipped configs are probed as A1111 does."""
    sidecar = _sidecar_parameterization(path)
    if sidecar is not None:
        is_v = sidecar == "v"
    else:
        is_v = shipped and info.family == "sd2" and probe_v_prediction(pipe.unet)
    if not is_v:
        return
    # Samplers built later from this config (X.from_config) inherit v_prediction; the trainer reads it too.
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    if shipped and info.family == "sd2":
        pipe.unet.register_to_config(sample_size=96)  # the SD 2.x v models are the 768 px ones
    log.info("%s uses v-prediction%s", path.name, " (from its .yaml)" if sidecar else " (probed)")


def _sidecar_parameterization(path: Path) -> str | None:
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    text = sidecar.read_text(encoding="utf-8", errors="replace")
    found = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.M)
    return found.group(1) if found else "eps"  # LDM's default parameterization is eps


def probe_v_prediction(unet) -> bool:
    """A1111's test (`is_using_v_parameterization_for_sd2`): denoise a flat 0.5 latent at t=999.

    An epsilon model predicts roughly its (almost pure-noise) input back, so the mean of `out - x` is near 0;
    a v model predicts about minus the clean image, far below it. Below -1 means v-prediction.
    """
    import torch

    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond).sample
    return float((out.float() - x.float()).mean()) < -1.0
