"""SDXL single-file checkpoints (A1111/civitai layout) → `StableDiffusionXLPipeline`, offline.

The layout (Stability's `sgm` names, what A1111, ComfyUI and civitai files use):
- `conditioner.embedders.0.transformer.text_model.*`: CLIP ViT-L (transformers layout, 768 wide);
- `conditioner.embedders.1.model.*`: OpenCLIP ViT-bigG (`transformer.resblocks.N`, fused `in_proj`, 1280 wide,
  `text_projection` stored as [width, projection]);
- `model.diffusion_model.*`: the UNet, with `label_emb.0.*` for the `text_time` added conditioning;
- `first_stage_model.*`: the VAE.

The weights are mapped with diffusers' own converters onto the component configs shipped in
`tinv_ui/model_configs/sdxl/` (SDXL base 1.0's), or onto a caller's diffusers folder (`config=`: models with
other shapes, and the tests' tiny model). The tokenizers are CLIP's BPE built offline; the tokenizer configs
in that folder say the pad token ("!" for the second one).

Objectives: SDXL base is epsilon-prediction. A `v_pred` key marks a v-prediction model (NoobAI-XL V-Pred and
its kin), a `ztsnr` key zero-terminal-SNR training: both are honoured for generation. `edm_vpred.*` (CosXL)
and `edm_mean`/`edm_std` (Playground v2.5) mark EDM models, whose noise schedule these samplers cannot
reproduce: they are refused with the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .tiny_model import load_clip_tokenizer

log = logging.getLogger(__name__)

PREFIX = "conditioner.embedders."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."
CLIP_L_TOKENS = CLIP_L + "text_model.embeddings.token_embedding.weight"
CLIP_G_TOKENS = CLIP_G + "token_embedding.weight"
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
# Marker keys of EDM-objective SDXL models and what they are.
EDM_KEYS = {"edm_vpred.sigma_max": "an EDM v-prediction model (CosXL-style, edm_vpred keys)",
            "edm_vpred.sigma_min": "an EDM v-prediction model (CosXL-style, edm_vpred keys)",
            "edm_mean": "an EDM model (Playground v2.5-style, edm_mean/edm_std keys)",
            "edm_std": "an EDM model (Playground v2.5-style, edm_mean/edm_std keys)"}


def is_sdxl_layout(shapes: Mapping[str, Any]) -> bool:
    return any(k.startswith(PREFIX) for k in shapes)


def detect(shapes: Mapping[str, tuple[int, ...]], name: str, unet_in: str, unet: str, vae: str, supported: str):
    """`CheckpointInfo` of an SDXL-layout state dict; `ModelLoadError` with the reason when it cannot be used."""
    from .checkpoints import _IN_CHANNEL_KINDS, CheckpointInfo

    edm = next((what for key, what in EDM_KEYS.items() if key in shapes), None)
    if edm:
        raise ModelLoadError(f"{name} is {edm}. Its noise schedule differs from SDXL's and the samplers here "
                             f"would give broken images; it cannot be loaded or trained. {supported}")
    if CLIP_L_TOKENS not in shapes or CLIP_G_TOKENS not in shapes:
        if "conditioner.embedders.0.model.text_projection" in shapes:
            raise ModelLoadError(f"{name} is an SDXL refiner (one OpenCLIP text encoder); it only refines images "
                                 f"from a base model. {supported}")
        missing = CLIP_L + "*" if CLIP_L_TOKENS not in shapes else CLIP_G + "*"
        raise ModelLoadError(f"{name} is an SDXL checkpoint without its {missing} text encoder weights; it is "
                             f"partial or another architecture. {supported}")
    if unet_in not in shapes:
        raise ModelLoadError(f"{name} is an SDXL checkpoint without UNet weights ({unet}*). {supported}")
    in_channels = shapes[unet_in][1]
    if in_channels != 4:
        kind = _IN_CHANNEL_KINDS.get(in_channels, "model with extra conditioning inputs").removeprefix("an ")
        raise ModelLoadError(f"{name} is an SDXL {kind} (its UNet takes {in_channels} input channels, txt2img "
                             f"needs 4). {supported}")
    if not any(k.startswith(vae) for k in shapes):
        raise ModelLoadError(f"{name} has no VAE weights ({vae}*); it is a partial checkpoint. {supported}")
    widths = (int(shapes[CLIP_L_TOKENS][1]), int(shapes[CLIP_G_TOKENS][1]))
    context = next((s[1] for k, s in shapes.items() if k.startswith(unet) and k.endswith("attn2.to_k.weight")),
                   sum(widths))
    if context != sum(widths):
        raise ModelLoadError(f"{name}: its UNet expects {context}-wide text features but its text encoders give "
                             f"{widths[0]} + {widths[1]}; the file mixes two models.")
    objective = "v_prediction" if V_PRED_KEY in shapes else "epsilon"
    return CheckpointInfo("sdxl", sum(widths), len(shapes), objective=objective, zero_snr=ZTSNR_KEY in shapes)


def assemble(state: dict[str, Any], folder: Path, info, cache_dir: Path, name: str):
    """Build the `StableDiffusionXLPipeline` (on the CPU, in the file's dtype) from an SDXL-layout state dict and
    a config folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .checkpoints import SUPPORTED, UNET, VAE, quiet_diffusers
    from .checkpoints import _check_complete as check_complete
    from .checkpoints import _stored_dtype as stored_dtype

    # Each part is built in the dtype its tensors are stored in (an fp16 file stays fp16 until Studio.load
    # has moved it to its device), so no fp32 copy of an fp16 file is made in RAM.
    kw = dict(config=str(folder), local_files_only=True)
    try:
        with quiet_diffusers():
            unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", dtype=stored_dtype(state, UNET),
                                                         **kw)
            vae = AutoencoderKL.from_single_file(state, subfolder="vae", dtype=stored_dtype(state, VAE), **kw)
            text_encoder = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, state, subfolder="text_encoder", torch_dtype=stored_dtype(state, CLIP_L), **kw)
            text_encoder_2 = create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, state, subfolder="text_encoder_2", torch_dtype=stored_dtype(state, CLIP_G),
                **kw)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:  # a shape or key that does not fit the configs
        raise ModelLoadError(f"{name}: its weights do not fit the {info.label} model shape ({e}). {SUPPORTED}") from e
    for part, model in (("UNet", unet), ("VAE", vae), ("CLIP ViT-L text encoder", text_encoder),
                        ("OpenCLIP text encoder", text_encoder_2)):
        check_complete(model, part, name, info)
    scheduler_config = EulerDiscreteScheduler.load_config(str(folder), subfolder="scheduler")
    if info.objective == "v_prediction":
        scheduler_config["prediction_type"] = "v_prediction"
    if info.zero_snr:
        scheduler_config["rescale_betas_zero_snr"] = True
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer(folder, "tokenizer", cache_dir), tokenizer_2=tokenizer(folder, "tokenizer_2", cache_dir),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def tokenizer(folder: Path, subfolder: str, cache_dir: Path):
    """CLIP's tokenizer (built offline) with the pad token and length of `folder/subfolder/tokenizer_config.json`."""
    config_path = Path(folder) / subfolder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_path} is missing or not JSON ({e}); it ships with tinv_ui, restore it.") from e
    tok = load_clip_tokenizer(cache_dir)
    pad = config.get("pad_token")
    tok.pad_token = pad.get("content") if isinstance(pad, dict) else pad or tok.eos_token
    tok.model_max_length = int(config.get("model_max_length", 77))
    return tok
