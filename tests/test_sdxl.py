"""SDXL on the tiny SDXL-shaped model: loading, fp16 VAE upcast, prompts, generation, and training refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinv_ui.config import GenerateConfig, ModelSpec, Paths
from tinv_ui.tiny_model import TINY_SDXL, TINY_SDXL_RESOLUTION, TINY_SDXL_WIDTHS


def test_tiny_sdxl_is_an_sdxl_pipeline(sdxl_studio):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = sdxl_studio.pipeline
    assert type(pipe) is StableDiffusionXLPipeline
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]  # the real CLIP BPE, twice
    assert pipe.tokenizer_2("a cat").input_ids == [49406, 320, 2368, 49407]
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (49407, 0)  # OpenCLIP pads with "!"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == sum(TINY_SDXL_WIDTHS)
    assert pipe.unet.add_embedding.linear_1.in_features == 6 * pipe.unet.config.addition_time_embed_dim + \
        pipe.text_encoder_2.config.projection_dim
    assert pipe.vae.config.force_upcast is True and pipe.vae.config.scaling_factor == 0.13025
    assert sdxl_studio.is_sdxl and sdxl_studio.embedding_width == sum(TINY_SDXL_WIDTHS)
    assert sdxl_studio.info.resolution == TINY_SDXL_RESOLUTION and sdxl_studio.info.is_tiny


def test_sd_model_is_not_sdxl(studio):
    assert not studio.is_sdxl and studio.embedding_width == 32


# -- fp16: the SDXL VAE is decoded in fp32 (force_upcast) ---------------------------------------------------------
def test_fp16_sdxl_decodes_in_fp32_never_black(cache_dir):
    """The real SDXL VAE overflows fp16 (inf → NaN → a black image). The tiny VAE is made to overflow the same
    way (its first decoder conv scaled up; the GroupNorm after it undoes the scale in fp32)."""
    from tinv_ui.generation import render
    from tinv_ui.studio import Studio

    studio = Studio(Paths(cache_dir=cache_dir))
    studio.load(ModelSpec(TINY_SDXL, dtype="float16"))
    pipe = studio.pipeline
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e5)
        pipe.vae.decoder.conv_in.bias.mul_(1e5)
    with studio.session():
        image = render(studio, GenerateConfig(prompt="a cat", width=64, height=64, steps=2, seed=3), {})[0].image
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 5 and pixels.mean() > 5  # a NaN decode comes out as a flat black image
