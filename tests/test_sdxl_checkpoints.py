"""SDXL single-file checkpoints (A1111/civitai layout) → StableDiffusionXLPipeline, offline.

The tiny SDXL model is exported to the sgm layout by the reverse converter of tests/test_checkpoints.py plus
SDXL's own parts (label_emb, the two conditioner embedders), loaded back with `config=` pointing at the tiny
model's diffusers folder, and compared tensor for tensor. The shipped real-size SDXL configs are checked on
the meta device against the real SDXL base key layout and shapes.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoints import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

from tinv_ui.checkpoints import CONFIG_DIR, detect, inspect_checkpoint, load_single_file
from tinv_ui.errors import ModelLoadError
from tinv_ui.tiny_model import build_tiny_sdxl_parts, tiny_sdxl_model_dir


def sdxl_to_ldm(unet, vae, text_encoder, text_encoder_2) -> dict:
    """diffusers SDXL components → one sgm-layout state dict (what A1111/civitai SDXL files hold)."""
    unet_sd = dict(unet.state_dict())
    label = {f"add_embedding.linear_{i}.{t}": f"model.diffusion_model.label_emb.0.{2 * (i - 1)}.{t}"
             for i in (1, 2) for t in ("weight", "bias")}
    out = {label[k]: unet_sd.pop(k) for k in label}
    out |= unet_to_ldm(unet_sd, unet.config) | vae_to_ldm(vae.state_dict(), vae.config)
    out |= {k.replace("cond_stage_model.", "conditioner.embedders.0."): v
            for k, v in clip_to_ldm(text_encoder.state_dict()).items()}
    g = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    big_g = open_clip_to_ldm(g, text_encoder_2.config.num_hidden_layers)
    big_g["cond_stage_model.model.text_projection"] = text_encoder_2.text_projection.weight.T.contiguous()  # stored [width, proj]
    out |= {k.replace("cond_stage_model.model.", "conditioner.embedders.1.model."): v for k, v in big_g.items()}
    return out


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_tiny_sdxl_parts(seed=7)


@pytest.fixture(scope="module")
def tiny_sdxl_ldm(tiny_sdxl):
    parts = tiny_sdxl
    return sdxl_to_ldm(parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"])


def _assert_same_weights(model, reference, dtype=torch.float32):
    """Bit-exact against the source, in the file's own dtype: an fp16 file is not widened on the CPU (Studio.load
    casts each part once it is on its device)."""
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == dtype, k
        assert torch.equal(got[k], want[k].to(dtype)), k


@pytest.mark.parametrize("dtype, suffix", [(torch.float32, ".safetensors"), (torch.float16, ".safetensors"),
                                           (torch.float16, ".ckpt")])
def test_sdxl_single_file_round_trip(tmp_path, cache_dir, tiny_sdxl, tiny_sdxl_ldm, dtype, suffix):
    from diffusers import StableDiffusionXLPipeline

    state = {k: v.to(dtype).contiguous() for k, v in tiny_sdxl_ldm.items()}
    # Real files carry these too: CLIP's position ids (int64) and OpenCLIP's logit_scale; neither is a weight here.
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert "conditioner.embedders.1.model.logit_scale" in state
    path = tmp_path / f"tiny-sdxl{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    info = inspect_checkpoint(path)
    assert (info.family, info.text_width, info.objective) == ("sdxl", 32 + 64, "epsilon")
    pipe = load_single_file(path, cache_dir, config=tiny_sdxl_model_dir(cache_dir))
    assert type(pipe) is StableDiffusionXLPipeline
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(pipe, part), tiny_sdxl[part], dtype)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (49407, 0)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae.config.force_upcast is True


def test_v_pred_sdxl_loads_as_v_prediction(tmp_path, cache_dir, tiny_sdxl_ldm):
    path = tmp_path / "noob-vpred.safetensors"
    save_file({**tiny_sdxl_ldm, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(path))
    info = inspect_checkpoint(path)
    assert (info.objective, info.zero_snr) == ("v_prediction", True)
    pipe = load_single_file(path, cache_dir, config=tiny_sdxl_model_dir(cache_dir))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr is True


@pytest.mark.parametrize("key, message", [("edm_vpred.sigma_max", "EDM v-prediction model"),
                                          ("edm_mean", "Playground v2.5")])
def test_edm_sdxl_is_refused_with_the_reason(tmp_path, cache_dir, tiny_sdxl_ldm, key, message):
    path = tmp_path / "cosxl.safetensors"
    save_file({**tiny_sdxl_ldm, key: torch.tensor([1.0])}, str(path))
    with pytest.raises(ModelLoadError, match=f"cosxl.safetensors is .*{message}.*cannot be loaded or trained"):
        load_single_file(path, cache_dir, config=tiny_sdxl_model_dir(cache_dir))


def _drop(state, prefix):
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


@pytest.mark.parametrize("change, message", [
    (lambda s: _drop(s, "conditioner.embedders.0."), r"without its conditioner.embedders.0.transformer.\* text"),
    (lambda s: _drop(s, "first_stage_model."), "no VAE weights"),
    (lambda s: {**s, "model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}, "SDXL inpainting model"),
    (lambda s: {**_drop(s, "conditioner.embedders."), "conditioner.embedders.0.model.text_projection": (1280, 1280),
                "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "SDXL refiner"),
])
def test_unusable_sdxl_files_are_explained(tiny_sdxl_ldm, change, message):
    shapes = change({k: tuple(v.shape) for k, v in tiny_sdxl_ldm.items()})
    with pytest.raises(ModelLoadError, match=message):
        detect(shapes, "x.safetensors")


REAL_SDXL_SHAPES = {  # facts of the released sd_xl_base_1.0.safetensors
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
}


def test_shipped_sdxl_configs_match_the_real_layout():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIG_DIR / "sdxl"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    ldm = sdxl_to_ldm(unet, vae, te, te2)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert {k: shapes[k] for k in REAL_SDXL_SHAPES} == REAL_SDXL_SHAPES
    info = detect(shapes, "sd_xl_base_1.0.safetensors")
    assert (info.family, info.text_width) == ("sdxl", 2048)
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 1024  # native 1024 px
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))  # diffusers' own mapping lands on every weight
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
