"""SDXL: what differs from SD 1.x/2.x when loading, prompting, sampling and decoding.

An SDXL model has two text encoders: CLIP ViT-L (`text_encoder`, 768 wide) and OpenCLIP ViT-bigG with a
projection (`text_encoder_2`, 1280 wide, its tokenizer pads with "!"). Their penultimate hidden states are
concatenated (768 + 1280 = 2048 per token) for cross-attention, and the UNet's `text_time` added conditioning
gets the second encoder's pooled output plus six "time ids" (original size, crop top-left, target size).

Prompt semantics are A1111's (`modules/sd_hijack_clip.py`, `modules/sd_models_xl.py`): each encoder reads the
prompt in 75-token chunks with emphasis and BREAK and applies the emphasis to its own output; the pooled
vector comes from the first chunk; an empty negative prompt is all zeros (A1111's
`force_zero_negative_prompt`, diffusers' `force_zeros_for_empty_prompt`). Clip skip does not apply to SDXL
(A1111 ignores it there too): both encoders always give their penultimate layer.

An SDXL embedding is a pair `{"clip_l": [n, 768], "clip_g": [n, 1280]}`: `clip_l` is spliced into the first
encoder's token lookup, `clip_g` into the second's, at the same prompt positions. Training optimises both as
one `[n, 768 + 1280]` tensor (`TrainingEncoder`): one AdamW, one gradient clip over both sets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .errors import ModelLoadError
from .tiny_model import tiny_sdxl_model_dir
from .tokens import PromptEncoder

log = logging.getLogger(__name__)


# -- the loaded model ----------------------------------------------------------------------------------------
def is_sdxl(pipe) -> bool:
    """True for a pipeline with SDXL's second text encoder."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_encoders(pipe) -> list:
    """The pipeline's text encoders in order (one for SD 1.x/2.x, two for SDXL)."""
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


def token_widths(pipe) -> tuple[int, ...]:
    """Width of one token vector per text encoder: (768,) SD 1.x, (1024,) SD 2.x, (768, 1280) SDXL."""
    return tuple(int(te.get_input_embeddings().weight.shape[1]) for te in text_encoders(pipe))


def width_label(pipe) -> str:
    """How the UI names the loaded model's embedding width: "SDXL (768 + 1280)" or "768 (SD 1.x)"."""
    from .library import width_label as single

    widths = token_widths(pipe)
    return f"SDXL ({' + '.join(map(str, widths))})" if len(widths) == 2 else single(widths[0])


def vae_dtype(pipe, dtype: torch.dtype) -> torch.dtype:
    """The dtype to keep the VAE in: float32 where an SDXL VAE asks for it (`force_upcast`) and the model runs
    in float16. The SDXL VAE overflows fp16 (inf, then NaN: a black image); bfloat16 has float32's range and
    needs no upcast. An fp16-safe VAE (e.g. madebyollin's sdxl-vae-fp16-fix) sets `force_upcast: false`."""
    if dtype == torch.float16 and is_sdxl(pipe) and getattr(pipe.vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def pipeline_class(folder: Path, label: str | None = None):
    """The diffusers pipeline class for a diffusers folder, from its `model_index.json`.

    `label` names the model in messages (a hub id, whose files sit in a cache folder named by commit).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    label = label or Path(folder).name
    try:
        name = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{label}/model_index.json is not readable JSON ({e}).") from e
    if name == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline
    if str(name).startswith("StableDiffusionXL"):
        raise ModelLoadError(f"{label} is a {name} (an SDXL refiner, inpainting or image-to-image "
                             "model); load an SDXL text-to-image base model.")
    return StableDiffusionPipeline


def load_tiny(cache_dir: Path):
    """The tiny SDXL test model as a `StableDiffusionXLPipeline` (built on first use)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir(cache_dir), local_files_only=True)


def library_pairs(library) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"clip_l", "clip_g"} of the library's loaded SDXL embeddings."""
    return {n: dict(e.embedding.parts) for n, e in library.loaded.items() if e.embedding.is_sdxl}


# -- prompts → conditioning -------------------------------------------------------------------------------------
class _PenultimateEncoder(PromptEncoder):
    """A `PromptEncoder` for one SDXL text encoder: the penultimate hidden states, and the pooled projection
    (second encoder only) kept in `pooled` for the caller."""

    pooled: torch.Tensor | None = None

    def _hidden_states(self, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        out = self.text_encoder(ids, output_hidden_states=True)
        self.pooled = getattr(out, "text_embeds", None)  # [rows, projection]: CLIPTextModelWithProjection only
        return out.hidden_states[-2]


class SDXLPromptEncoder:
    """Prompts → (cross-attention conditioning [B, 77*chunks, 768+1280], pooled [B, 1280], embeddings used).

    `pairs` maps embedding names to `{"clip_l": [n, 768], "clip_g": [n, 1280]}`.
    """

    def __init__(self, pipe, pairs: Mapping[str, Mapping[str, torch.Tensor]], text_encoders=None) -> None:
        """`text_encoders`: the two encoders to use instead of the pipeline's (the trainer's half copies)."""
        first, second = text_encoders or (pipe.text_encoder, pipe.text_encoder_2)
        self.encoders = [
            _PenultimateEncoder(tokenizer, encoder, {name: pair[part] for name, pair in pairs.items()})
            for tokenizer, encoder, part in ((pipe.tokenizer, first, "clip_l"), (pipe.tokenizer_2, second, "clip_g"))
        ]

    def encode(self, prompts: list[str], max_chunks: int | None = None,
               min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        outputs, used = [], []
        for encoder in self.encoders:
            z, names = encoder.encode(prompts, max_chunks=max_chunks, min_chunks=min_chunks)
            outputs.append(z)
            used = used or names
        first, second = outputs
        if first.shape[1] != second.shape[1]:  # both tokenizers share CLIP's BPE, so their chunks agree
            raise RuntimeError(f"SDXL text encoders gave {first.shape[1]} and {second.shape[1]} tokens for one prompt")
        pooled = self.encoders[1].pooled  # [B * chunks, projection], rows grouped by prompt
        chunks = first.shape[1] // 77
        pooled = pooled.reshape(len(prompts), chunks, -1)[:, 0]  # A1111: the pooled output of the first chunk
        return torch.cat([first, second.to(first.dtype)], dim=-1), pooled, used


def split_pair(vectors: torch.Tensor, clip_l_width: int) -> dict[str, torch.Tensor]:
    """`[n, width_l + width_g]` → {"clip_l": [n, width_l], "clip_g": [n, width_g]} (views: gradients flow back)."""
    return {"clip_l": vectors[:, :clip_l_width], "clip_g": vectors[:, clip_l_width:]}


class TrainingEncoder:
    """`SDXLPromptEncoder` for training: the trained pair is one `[n, width_l + width_g]` parameter, sliced
    into its clip_l/clip_g parts at every `encode` so both encoders' gradients reach it.

    `encode` returns (conditioning, pooled, names used); `tokenize` and `vectors` are as a `PromptEncoder`'s
    (`vectors` maps names to pairs, the trained one as it stands now)."""

    def __init__(self, pipe, others: Mapping[str, Mapping[str, torch.Tensor]], name: str,
                 vectors: torch.Tensor, text_encoders=None) -> None:
        self.name, self.trained = name, vectors
        self.clip_l_width = token_widths(pipe)[0]
        self.others = dict(others)
        self.inner = SDXLPromptEncoder(pipe, {**self.others, name: split_pair(vectors.detach(), self.clip_l_width)},
                                       text_encoders)
        self.tokenize = self.inner.encoders[0].tokenize

    @property
    def vectors(self) -> dict[str, Mapping[str, torch.Tensor]]:
        return {**self.others, self.name: split_pair(self.trained.detach(), self.clip_l_width)}

    def encode(self, prompts: list[str], min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        pair = split_pair(self.trained, self.clip_l_width)  # fresh views in this step's autograd graph
        for encoder, part in zip(self.inner.encoders, ("clip_l", "clip_g")):
            encoder.vectors[self.name] = pair[part]
        return self.inner.encode(prompts, min_chunks=min_chunks)


def conditioning(pipe, prompt: str, negative_prompt: str, batch_size: int,
                 pairs: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype):
    """(cond, uncond, pooled, negative pooled, used names) for one batch, cond/uncond padded to one length."""
    encoder = SDXLPromptEncoder(pipe, pairs)
    n = batch_size
    z, pooled, used = encoder.encode([prompt] * n + [negative_prompt] * n)
    cond, uncond, pooled_cond, pooled_uncond = z[:n], z[n:], pooled[:n], pooled[n:]
    if negative_prompt == "" and pipe.config.get("force_zeros_for_empty_prompt", True):
        uncond, pooled_uncond = torch.zeros_like(uncond), torch.zeros_like(pooled_uncond)
    return cond.to(dtype), uncond.to(dtype), pooled_cond.to(dtype), pooled_uncond.to(dtype), used


def time_ids(width: int, height: int, crop_top: int = 0, crop_left: int = 0) -> dict[str, tuple[int, int]]:
    """SDXL's size conditioning for txt2img, as A1111 sends it: original = target = the requested size."""
    return {"original_size": (height, width), "crops_coords_top_left": (crop_top, crop_left),
            "target_size": (height, width)}


# -- sampling and decoding -------------------------------------------------------------------------------------
def sampling_pipeline(base, scheduler, unet):
    """A `StableDiffusionXLPipeline` over `base`'s VAE with `unet` and `scheduler`, without text encoders: our
    conditioning is used as given, in the UNet dtype. Latents come out undecoded (`decode` decodes them)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(studio, cfg, pairs: Mapping[str, Mapping[str, torch.Tensor]], generators: list, pipe,
           callback: Callable | None) -> tuple[list, list[str]]:
    """txt2img on the studio's SDXL model with `pipe` (`sampling_pipeline`): PIL images and the embedding names
    used. The caller holds the lock and is in `torch.no_grad()`."""
    base = studio.pipeline
    cond, uncond, pooled, neg_pooled, used = conditioning(base, cfg.prompt, cfg.negative_prompt, cfg.batch_size,
                                                          pairs, base.unet.dtype)
    latents = pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=cfg.steps, guidance_scale=cfg.cfg_scale,
        width=cfg.width, height=cfg.height, generator=generators, output_type="latent",
        callback_on_step_end=callback, **time_ids(cfg.width, cfg.height),
    ).images
    return decode(base, latents), used


def decode(pipe, latents: torch.Tensor) -> list:
    """Latents → PIL images in the VAE's own dtype (float32 for an SDXL VAE that asks for it: `vae_dtype`)."""
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:  # VAEs that normalise per channel (not SDXL base's)
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if not bool(torch.isfinite(image).all()):
        log.warning("the VAE decoded NaN/inf values (dtype %s); use float32 or an fp16-safe VAE", vae.dtype)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")
