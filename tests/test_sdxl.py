"""SDXL on the tiny SDXL-shaped model: loading, fp16 VAE upcast, prompts, generation (training: test_sdxl_training.py)."""

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


# -- embeddings: create pairs, save them, tell families apart -------------------------------------------------
def test_create_sdxl_pair_from_both_token_tables(sdxl_studio, paths):
    from safetensors import safe_open

    from tinv_ui.config import CreateConfig
    from tinv_ui.create import create_embedding

    path = create_embedding(sdxl_studio, CreateConfig(name="xl-style", initializer="cat dog", num_vectors=3),
                            paths.embeddings_dir)
    assert path.name == "xl-style.safetensors"  # the `auto` format for SDXL
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        got = {k: f.get_tensor(k) for k in f.keys()}
    pipe = sdxl_studio.pipeline
    rows = [2368, 2368, 1929]  # "cat", "dog": vector i copies token floor(i * 2 / 3)
    want_l = pipe.text_encoder.get_input_embeddings().weight[rows].detach()
    want_g = pipe.text_encoder_2.get_input_embeddings().weight[rows].detach()
    assert got["clip_l"].shape == (3, TINY_SDXL_WIDTHS[0]) and torch.equal(got["clip_l"], want_l)
    assert got["clip_g"].shape == (3, TINY_SDXL_WIDTHS[1]) and torch.equal(got["clip_g"], want_g)


def test_create_sdxl_zero_pair_as_pt_holds_only_the_two_tensors(sdxl_studio, paths):
    from tinv_ui.config import CreateConfig
    from tinv_ui.create import create_embedding

    path = create_embedding(sdxl_studio, CreateConfig(name="zero", initializer="", num_vectors=2, file_format="pt"),
                            paths.embeddings_dir)
    data = torch.load(path, weights_only=True)
    assert sorted(data) == ["clip_g", "clip_l"]
    assert torch.equal(data["clip_l"], torch.zeros(2, 32)) and torch.equal(data["clip_g"], torch.zeros(2, 64))


def _two_families(folder):
    from tinv_ui import formats
    from tinv_ui.embedding import Embedding

    formats.write(Embedding("sd-one", torch.randn(2, 32)), folder / "sd-one.pt")
    formats.write(Embedding("xl-one", parts={"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}),
                  folder / "xl-one.safetensors")
    formats.write(Embedding("xl-big", parts={"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}),
                  folder / "xl-big.safetensors")


def test_library_tells_sd_and_sdxl_embeddings_apart(sdxl_studio, studio, paths):
    from tinv_ui.library import EmbeddingLibrary

    _two_families(paths.embeddings_dir)
    library = EmbeddingLibrary(paths.embeddings_dir)
    library.refresh(expected_width=sdxl_studio.embedding_width, tokenizer=sdxl_studio.tokenizer,
                    expected_parts=sdxl_studio.embedding_parts)
    assert library.names() == ["xl-one"]
    reasons = {s.name: s.reason for s in library.skipped}
    assert "SD 1.x/2.x embedding" in reasons["sd-one"] and "loaded SDXL model" in reasons["sd-one"]
    assert "768 + 1280 wide" in reasons["xl-big"] and "needs 32 + 64" in reasons["xl-big"]

    library.refresh(expected_width=studio.embedding_width, tokenizer=studio.tokenizer,
                    expected_parts=studio.embedding_parts)
    assert library.names() == ["sd-one"]
    reasons = {s.name: s.reason for s in library.skipped}
    assert reasons["xl-one"].startswith("an SDXL embedding (clip_l + clip_g, width 96) does not fit the loaded "
                                        "SD 1.x/2.x model (width 32 (tiny test model))")
    assert "load an SDXL model" in reasons["xl-big"]


# -- prompts → SDXL conditioning --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_sdxl_pipe(cache_dir):
    """A private tiny SDXL pipeline (diffusers' load_textual_inversion changes its tokenizers and tables)."""
    from diffusers import StableDiffusionXLPipeline

    from tinv_ui.tiny_model import tiny_sdxl_model_dir

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir(cache_dir), local_files_only=True)


def test_plain_prompt_matches_diffusers_encode_prompt(sdxl_studio):
    from tinv_ui.sdxl import conditioning

    pipe = sdxl_studio.pipeline
    with torch.no_grad():
        cond, uncond, pooled, neg_pooled, _ = conditioning(pipe, "a photo of a cat", "", 1, {}, torch.float32)
        want, want_neg, want_pooled, want_neg_pooled = pipe.encode_prompt("a photo of a cat", device="cpu",
                                                                          do_classifier_free_guidance=True)
    assert cond.shape == (1, 77, sum(TINY_SDXL_WIDTHS))
    assert torch.allclose(cond, want, atol=1e-6) and torch.allclose(pooled, want_pooled, atol=1e-6)
    # an empty negative prompt is all zeros (A1111's force_zero_negative_prompt, diffusers' force_zeros_for_empty_prompt)
    assert torch.equal(uncond, want_neg) and torch.equal(neg_pooled, want_neg_pooled) and not uncond.any()


def test_pair_file_matches_diffusers_load_textual_inversion(sdxl_studio, fresh_sdxl_pipe, paths):
    """Our splice of a clip_l/clip_g file gives what diffusers' documented SDXL call gives for the same file."""
    from safetensors.torch import load_file

    from tinv_ui.config import CreateConfig
    from tinv_ui.create import create_embedding
    from tinv_ui.sdxl import SDXLPromptEncoder

    path = create_embedding(sdxl_studio, CreateConfig(name="xlstyle", initializer="sunset glow", num_vectors=3),
                            paths.embeddings_dir)
    state_dict = load_file(path)
    pipe = fresh_sdxl_pipe
    pipe.load_textual_inversion(state_dict["clip_l"], token="<xlstyle>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state_dict["clip_g"], token="<xlstyle>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt("a <xlstyle> house", device="cpu",
                                                     do_classifier_free_guidance=False)
        got, pooled, used = SDXLPromptEncoder(sdxl_studio.pipeline, {"xlstyle": state_dict}).encode(["a xlstyle house"])
    assert used == ["xlstyle"]
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(pooled, want_pooled, atol=1e-5)


def test_a1111_prompt_semantics_break_emphasis_and_first_chunk_pooled(sdxl_studio):
    from tinv_ui.sdxl import SDXLPromptEncoder

    encoder = SDXLPromptEncoder(sdxl_studio.pipeline, {})
    with torch.no_grad():
        two, pooled_two, _ = encoder.encode(["a red cat BREAK a blue dog"])
        first, pooled_first, _ = encoder.encode(["a red cat"])
        second, _, _ = encoder.encode(["a blue dog"])
        weighted, pooled_weighted, _ = encoder.encode(["a red (cat:1.5)"])
        long, _, _ = encoder.encode([" ".join(["cat"] * 76)])
    assert two.shape == (1, 154, 96) and long.shape == (1, 154, 96)  # BREAK and 76 tokens: two 75-token chunks
    assert torch.allclose(two[:, :77], first, atol=1e-6) and torch.allclose(two[:, 77:], second, atol=1e-6)
    assert torch.allclose(pooled_two, pooled_first, atol=1e-6)  # the pooled output comes from the first chunk
    assert not torch.allclose(weighted, first) and torch.allclose(pooled_weighted, pooled_first, atol=1e-6)


# -- generation ---------------------------------------------------------------------------------------------
def test_generate_sdxl_with_a_pair_time_ids_and_infotext(sdxl_studio, paths):
    from tinv_ui.config import CreateConfig
    from tinv_ui.create import create_embedding
    from tinv_ui.events import Generated
    from tinv_ui.generation import generate
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.sdxl import SDXLPromptEncoder

    create_embedding(sdxl_studio, CreateConfig(name="xlgen", initializer="gold", num_vectors=2), paths.embeddings_dir)
    library = EmbeddingLibrary(paths.embeddings_dir)
    seen = []

    def capture(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"])

    cfg = GenerateConfig(prompt="a xlgen house", width=128, height=64, steps=2, seed=5, batch_size=1)
    handle = sdxl_studio.pipeline.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        events = list(generate(sdxl_studio, cfg, library, paths))
    finally:
        handle.remove()
    (done,) = [e for e in events if isinstance(e, Generated)]
    assert done.images[0].size == (128, 64)
    text = done.infotexts[0]
    assert f"TI hashes: \"xlgen: {library.get('xlgen').shorthash}\"" in text and "Size: 128x64" in text
    ids = seen[0]["time_ids"]  # original (h, w), crop top-left (0, 0), target (h, w); uncond and cond rows
    assert ids.tolist() == [[64, 128, 0, 0, 64, 128]] * 2
    with torch.no_grad():
        _, pooled, _ = SDXLPromptEncoder(sdxl_studio.pipeline, {"xlgen": library.get("xlgen").embedding.parts}).encode(
            ["a xlgen house"])
    assert not seen[0]["text_embeds"][0].any()  # empty negative prompt: zero pooled vector
    assert torch.allclose(seen[0]["text_embeds"][1], pooled[0], atol=1e-6)
    pixels = np.asarray(done.images[0], dtype=np.float32)
    assert pixels.std() > 1


# -- the UI and training with an SDXL model -----------------------------------------------------------------
def test_model_picker_shows_sdxl_family_and_sizes_follow(paths):
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.studio import Studio
    from tinv_ui.ui.context import UIContext
    from tinv_ui.ui.model_picker import load_model

    class Runner:
        current = None

    ctx = UIContext(Studio(paths), EmbeddingLibrary(paths.embeddings_dir), Runner(), paths)
    status = load_model(ctx, TINY_SDXL)
    assert "tiny SDXL test model (random weights)" in status and "embeddings SDXL (32 + 64)" in status
    assert "native 128px" in status and ctx.native_resolution == TINY_SDXL_RESOLUTION


def test_sdxl_diffusers_folder_loads_and_a_refiner_folder_is_refused(cache_dir, tmp_path):
    import json
    import shutil

    from tinv_ui.errors import ModelLoadError
    from tinv_ui.studio import Studio
    from tinv_ui.tiny_model import tiny_sdxl_model_dir

    folder = tmp_path / "my-sdxl"
    shutil.copytree(tiny_sdxl_model_dir(cache_dir), folder)
    studio = Studio(Paths(cache_dir=cache_dir))
    info = studio.load(ModelSpec(str(folder)))
    assert studio.is_sdxl and type(studio.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert (info.label, info.resolution, info.is_tiny) == ("my-sdxl", TINY_SDXL_RESOLUTION, False)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(ModelLoadError, match="my-sdxl is a StableDiffusionXLImg2ImgPipeline .*refiner"):
        studio.load(ModelSpec(str(folder)))
    assert studio.info is info  # the loaded model stays
