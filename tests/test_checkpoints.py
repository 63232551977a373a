"""Single-file checkpoints: original (A1111/CompVis) layout → diffusers pipeline, offline.

The tiny model is exported to the original layout by a small reverse converter below (the inverse of
diffusers' `convert_ldm_*` functions, generic over block counts), loaded back with `config=` pointing at
the tiny model's own diffusers folder, and compared weight for weight. The shipped SD 1.x / 2.x configs are
checked on the meta device against the real SD key layout and shapes, without allocating weights. A full
SD1.5-shaped load (zeros, 2 GB) is the `slow` test at the end.
"""

from __future__ import annotations

import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tinv_ui.checkpoints import CONFIG_DIR, detect, inspect_checkpoint, load_single_file, probe_v_prediction
from tinv_ui.errors import ModelLoadError
from tinv_ui.tiny_model import build_tiny_pipeline, load_clip_tokenizer, tiny_model_dir

# -- reverse converter: diffusers state dicts → original layout ---------------------------------------------
_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _swap_prefix(key: str, table: dict[str, str]) -> str:
    for old in sorted(table, key=len, reverse=True):
        if key.startswith(old):
            return table[old] + key[len(old):]
    return key


def _unet_prefixes(cfg) -> dict[str, str]:
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    table = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
             "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(per):
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.1."
        table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per + 1) * (i + 1)}.0.op."
        for j in range(per + 1):
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(per + 1) * i + j}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(per + 1) * i + j}.1."
        upsampler_slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
        table[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(per + 1) * i + per}.{upsampler_slot}."
    return table


def unet_to_ldm(state, cfg) -> dict:
    table, out = _unet_prefixes(cfg), {}
    for k, v in state.items():
        new = _swap_prefix(k, table)
        if ".resnets." in k:
            for a, b in _RESNET_NAMES.items():
                new = new.replace(f".{a}.", f".{b}.")
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(state, cfg) -> dict:
    n = len(cfg["block_out_channels"])
    table = {}
    for side in ("encoder", "decoder"):
        table |= {f"{side}.mid_block.attentions.0.": f"{side}.mid.attn_1.",
                  f"{side}.conv_norm_out.": f"{side}.norm_out.",
                  f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
                  f"{side}.mid_block.resnets.1.": f"{side}.mid.block_2."}
    for i in range(n):
        table[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        table[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        table[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        table[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for k, v in state.items():
        new = _swap_prefix(k, table).replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:  # the original VAE attention uses 1x1 convs
            head, _, tail = new.partition(".attn_1.")
            new = f"{head}.attn_1.{_swap_prefix(tail, attn)}"
            v = v[:, :, None, None] if v.ndim == 2 else v
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(state) -> dict:
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in state.items()}


def open_clip_to_ldm(state, num_layers: int) -> dict:
    p = "cond_stage_model.model."
    width = state["embeddings.token_embedding.weight"].shape[1]
    out = {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"], p + "ln_final.bias": state["final_layer_norm.bias"],
           p + "text_projection": torch.eye(width), p + "logit_scale": torch.tensor(1.0)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            for a, b in names.items():
                out[f"{dst}{b}.{t}"] = state[f"{src}{a}.{t}"]
            out[f"{dst}attn.in_proj_{t}"] = torch.cat([state[f"{src}self_attn.{q}_proj.{t}"] for q in "qkv"])
    return out


def to_ldm(unet, vae, text_encoder, open_clip: bool = False) -> dict:
    te = text_encoder.state_dict()
    text = open_clip_to_ldm(te, text_encoder.config.num_hidden_layers) if open_clip else clip_to_ldm(te)
    return {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config), **text}


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_parts():
    unet, vae, text_encoder, _, _ = build_tiny_pipeline(seed=3)
    return unet, vae, text_encoder


@pytest.fixture(scope="module")
def tiny_ldm(tiny_parts):
    return to_ldm(*tiny_parts)


def _assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k


# -- tiny SD 1.x layout ----------------------------------------------------------------------------------------
def test_sd1_safetensors_round_trip(tmp_path, cache_dir, tiny_parts, tiny_ldm):
    unet, vae, text_encoder = tiny_parts
    path = tmp_path / "tiny-sd1.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_ldm.items()}, str(path))
    assert inspect_checkpoint(path).family == "sd1"
    pipe = load_single_file(path, cache_dir, config=tiny_model_dir(cache_dir))
    _assert_same_weights(pipe.unet, unet)
    _assert_same_weights(pipe.vae, vae)
    _assert_same_weights(pipe.text_encoder, text_encoder)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer.pad_token_id == 49407
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())


def test_ckpt_with_lightning_leftovers_and_old_clip_keys(tmp_path, cache_dir, tiny_parts, tiny_ldm, monkeypatch):
    """Old LDM .ckpt: fp16 weights nested under state_dict, old CLIP keys without `text_model.`, a pickled
    Lightning callback and numpy scalars: the weights load, the rest is ignored (its code never runs)."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __setstate__(self, state):
            raise AssertionError("the real class must never be used while loading")

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    old = {k.replace("transformer.text_model.", "transformer."): v.half() for k, v in tiny_ldm.items()}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old, "global_step": np.int64(470000), "epoch": np.float64(6.0),
                "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)  # loading must not need the class at all
    pipe = load_single_file(path, cache_dir, config=tiny_model_dir(cache_dir))
    want = tiny_parts[2].get_input_embeddings().weight.half().float()
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.float(), want)
    # The file's dtype is kept (no fp32 copy on the CPU): the studio casts each part once it is on its device.
    parts = (pipe.unet, pipe.vae, pipe.text_encoder)
    assert {p.dtype for part in parts for p in part.parameters()} == {torch.float16}


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_running_pickle_is_refused(tmp_path, cache_dir, tiny_ldm):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    weights = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    torch.save({"state_dict": weights, "x": _RunsCode(marker)}, path)
    with pytest.raises(ModelLoadError, match=r"evil\.ckpt was refused: .*system.*\.safetensors"):
        load_single_file(path, cache_dir)
    assert not marker.exists()


# -- tiny SD 2.x layout (OpenCLIP keys, linear proj_in) -------------------------------------------------------
def test_sd2_open_clip_round_trip(tmp_path, cache_dir):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet0, vae, text_encoder, scheduler, _ = build_tiny_pipeline(seed=5)
    unet = UNet2DConditionModel.from_config({**unet0.config, "use_linear_projection": True})
    folder = tmp_path / "tiny-sd2"
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(cache_dir), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    path = tmp_path / "tiny-sd2.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm(unet, vae, text_encoder, open_clip=True).items()}, str(path))
    info = inspect_checkpoint(path)
    assert (info.family, info.text_width) == ("sd2", 32)
    pipe = load_single_file(path, cache_dir, config=folder)
    _assert_same_weights(pipe.unet, unet)
    _assert_same_weights(pipe.text_encoder, text_encoder)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    assert torch.allclose(pipe.text_encoder(ids)[0], text_encoder(ids)[0], atol=1e-6)
    assert pipe.tokenizer.pad_token_id == 0  # OpenCLIP pads with "!" (id 0), like A1111 and diffusers' SD 2


def test_sidecar_yaml_selects_v_prediction(tmp_path, cache_dir, tiny_ldm):
    path = tmp_path / "anime-v.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_ldm.items()}, str(path))
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    pipe = load_single_file(path, cache_dir, config=tiny_model_dir(cache_dir))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.sample_size == 8  # the native size only changes for SD 2.x 768-v with shipped configs


def test_v_prediction_probe():
    class FakeUNet(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.shift = shift
            self.config = types.SimpleNamespace(cross_attention_dim=1024)

        def forward(self, x, t, encoder_hidden_states):
            assert int(t) == 999 and encoder_hidden_states.shape == (1, 2, 1024)
            return types.SimpleNamespace(sample=x + self.shift)

    assert probe_v_prediction(FakeUNet(-2.0)) is True
    assert probe_v_prediction(FakeUNet(0.1)) is False


# -- the shipped real-size configs, checked on the meta device ------------------------------------------------
REAL_SHAPES = {  # facts of the released SD 1.5 / SD 2.x files
    "sd1": {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
    "sd2": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            "cond_stage_model.model.positional_embedding": (77, 1024),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)},
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_shipped_configs_match_the_real_layout(family):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CONFIG_DIR / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    ldm = to_ldm(unet, vae, te, open_clip=family == "sd2")
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert {k: shapes[k] for k in REAL_SHAPES[family]} == REAL_SHAPES[family]
    info = detect(shapes, "real.safetensors")
    assert (info.family, info.text_width) == (family, {"sd1": 768, "sd2": 1024}[family])
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686  # as in v1-5-pruned-emaonly / v2-1
    for model, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = convert(ldm, dict(model.config))  # diffusers' own mapping lands on every weight, shapes equal
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items()} == want


# -- what is refused, and how it is explained -----------------------------------------------------------------
CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def _sd1_shapes():
    return {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}


@pytest.mark.parametrize("change, message", [
    ({"conditioner.embedders.1.model.positional_embedding": (77, 1280), CLIP_KEY: None}, "an SDXL checkpoint"),
    ({"conditioner.embedders.1.model.positional_embedding": (77, 1280), CLIP_KEY: None,
      "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "an SDXL checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting model .*9 input channels"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}, "instruct-pix2pix"),
    ({CLIP_KEY: None}, "a UNet with no text encoder we know"),
    ({"first_stage_model.encoder.conv_in.weight": None}, "no VAE weights"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "mixes two models"),
])
def test_unsupported_checkpoints_are_explained(change, message):
    shapes = _sd1_shapes()
    for k, v in change.items():
        if v is None:
            del shapes[k]
        else:
            shapes[k] = v
    with pytest.raises(ModelLoadError, match=message) as e:
        detect(shapes, "x.safetensors")
    assert "x.safetensors" in str(e.value) and ("Supported: SD 1.x" in str(e.value) or "mixes" in message)


@pytest.mark.parametrize("keys, found", [
    ({"lora_unet_down_blocks_0.alpha": (1,)}, "LoRA"),
    ({"emb_params": (2, 768)}, "embedding"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "VAE on its own"),
    ({"foo.bar": (1,)}, r"unknown layout \(first keys: foo.bar\)"),
])
def test_other_files_are_named(keys, found):
    with pytest.raises(ModelLoadError, match=found):
        detect(keys, "x.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_are_refused(tmp_path, cache_dir, suffix, seed):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(ModelLoadError, match="junk"):
        load_single_file(path, cache_dir)


def test_shape_mismatch_with_shipped_config_is_a_model_load_error(tmp_path, cache_dir, tiny_ldm):
    """The tiny file has SD1 keys but 32-wide weights: the shipped SD1.5 configs cannot take it."""
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_ldm.items()}, str(path))
    with pytest.raises(ModelLoadError, match=r"odd\.safetensors.*SD 1\.x"):
        load_single_file(path, cache_dir)


def test_studio_reports_unsupported_file(paths):
    from tinv_ui.config import ModelSpec
    from tinv_ui.studio import Studio

    path = paths.models_dir / "xl.safetensors"
    key = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
    save_file({key: torch.zeros(77, 4)}, str(path))
    with pytest.raises(ModelLoadError, match="xl.safetensors is an SDXL checkpoint"):
        Studio(paths).load(ModelSpec("xl.safetensors"))


# -- EMA checkpoints and what the console says --------------------------------------------------------------------
def test_ema_checkpoint_loads_the_regular_weights_and_says_so_without_diffusers_noise(
        tmp_path, cache_dir, tiny_parts, tiny_ldm, capfd, caplog):
    """An fp16 training checkpoint with an EMA copy of the UNet (model_ema.*, flattened names, as LDM saves it):
    the regular weights load, our log says so, and diffusers' advice about a flag we do not have and its
    'kept in float32: []' note do not reach the console."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1.0
           for k, v in tiny_ldm.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "trained-ema.safetensors"
    save_file({k: v.half().contiguous() for k, v in {**tiny_ldm, **ema}.items()}, str(path))
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # what a user's console shows (the test session hides warnings)
    try:
        with caplog.at_level(logging.INFO, logger="tinv_ui"):
            pipe = load_single_file(path, cache_dir, config=tiny_model_dir(cache_dir))
            pipe.unet.to(dtype=torch.float32)  # the studio's cast on the device goes through the same filter
    finally:
        diffusers_logging.set_verbosity(level)
    console = capfd.readouterr().err
    assert "extract_ema" not in console and "kept in float32" not in console
    assert "trained-ema.safetensors also holds EMA weights (model_ema.*); the regular (non-EMA) UNet weights " \
           "were loaded, as A1111 does." in caplog.text
    want = tiny_parts[0].state_dict()
    got = pipe.unet.state_dict()
    assert all(torch.equal(got[k].float(), want[k].half().float()) for k in want)


# -- the UNet configs, against what diffusers' own converter builds -------------------------------------------------
# The unet_config params of the LDM inference configs that ship with the released models (v1-inference.yaml,
# v2-inference.yaml for 512-base, v2-inference-v.yaml for 768-v), as diffusers' converter reads them.
_LDM_UNET = {
    "sd1": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "transformer_depth": 1,
            "context_dim": 768},
    "sd2": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
            "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024},
}
# diffusers' single-file loader builds each file from a Hub model's config (`fetch_diffusers_config`); the
# `upcast_attention` of those configs (stable-diffusion-2-1 sets it: fp16 attention overflows without it).
_HUB_UPCAST = {"stable-diffusion-v1-5/stable-diffusion-v1-5": False, "stabilityai/stable-diffusion-2-1": True}
_COMPARED = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
             "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
             "use_linear_projection", "transformer_layers_per_block")


@pytest.mark.parametrize("family, v_model, image_size", [("sd1", False, 512), ("sd2", False, 512), ("sd2", True, 768)])
def test_loaded_unet_config_matches_diffusers_converter(tmp_path, cache_dir, family, v_model, image_size):
    """The UNet config our loader ends with (shipped config + its v-prediction rule, run on a meta-device
    model) equals what diffusers' converter builds for the same file: the architecture from the LDM config,
    `upcast_attention` from the Hub config diffusers picks for the file's keys."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, fetch_diffusers_config
    from transformers import CLIPTextConfig, CLIPTextModel

    from tinv_ui.checkpoints import _set_parameterization

    folder = CONFIG_DIR / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    checkpoint = to_ldm(unet, vae, te, open_clip=family == "sd2")  # meta tensors: the real keys and shapes
    path = tmp_path / f"{family}.safetensors"
    if family == "sd2":  # A1111's sidecar .yaml tells 768-v from 512-base without the probe (meta weights)
        parameterization = '    parameterization: "v"\n' if v_model else ""
        path.with_suffix(".yaml").write_text(f"model:\n  params:\n{parameterization}    linear_start: 0.00085\n",
                                             encoding="utf-8")
    pipe = types.SimpleNamespace(unet=unet, scheduler=PNDMScheduler.from_pretrained(str(folder), subfolder="scheduler"))
    info = detect({k: tuple(v.shape) for k, v in checkpoint.items()}, path.name)
    _set_parameterization(pipe, path, info, shipped=True)

    original = {"model": {"params": {"unet_config": {"params": _LDM_UNET[family]},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    want = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=image_size)
    want["upcast_attention"] = _HUB_UPCAST[fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]]
    got = dict(pipe.unet.config)
    assert {k: _plain(got[k]) for k in (*_COMPARED, "upcast_attention")} == \
           {k: _plain(want[k]) for k in (*_COMPARED, "upcast_attention")}
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if v_model else "epsilon")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# -- full size, slow: SD1.5 / SD2.1-shaped files (zeros, fp16, 2-2.6 GB, ~8 GB RAM) through the Studio ---------
@pytest.mark.slow
@pytest.mark.parametrize("family, width, unet_params, pad_id", [("sd1", 768, 859_520_964, 49407),
                                                              ("sd2", 1024, 865_910_724, 0)])
def test_full_size_file_loads_offline(tmp_path, cache_dir, family, width, unet_params, pad_id):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tinv_ui.config import ModelSpec, Paths
    from tinv_ui.studio import Studio

    folder = CONFIG_DIR / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    state = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in to_ldm(unet, vae, te, family == "sd2").items()}
    path = tmp_path / "models" / f"{family}-zeros.safetensors"
    path.parent.mkdir()
    save_file(state, str(path))
    del state
    studio = Studio(Paths(tmp_path / "e", tmp_path / "o", tmp_path / "models", cache_dir))
    info = studio.load(ModelSpec(path.name, device="cpu"))
    # An all-zero UNet predicts 0, so the v-probe reads mean(0 - 0.5) = -0.5: epsilon, 512 px.
    assert (info.resolution, studio.embedding_width, info.is_tiny) == (512, width, False)
    assert len(info.hash) == 10 and studio.pipeline.scheduler.config.prediction_type == "epsilon"
    assert sum(p.numel() for p in studio.pipeline.unet.parameters()) == unet_params
    assert studio.tokenizer.pad_token_id == pad_id
    assert studio.pipeline.unet.config.upcast_attention is (family == "sd2")  # as diffusers' converter sets it
    assert studio.pipeline.unet.dtype == torch.float32  # the fp16 file, cast on its device (the CPU here)
