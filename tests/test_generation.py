"""Generation on the tiny model: determinism, batch = singles, embeddings applied and removed, infotext, PNGs."""

from __future__ import annotations

import re
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import blocked_in_session, wait_until
from PIL import Image

from tinv_ui import generation
from tinv_ui.config import SAMPLERS, GenerateConfig
from tinv_ui.errors import ConfigError
from tinv_ui.events import Generated, Step

BASE = GenerateConfig(prompt="a photo of a cat", negative_prompt="blurry", steps=2, width=64, height=64, seed=1234, save=False)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def text_encoder_state(studio):
    emb = studio.text_encoder.get_input_embeddings()
    return len(studio.tokenizer), tuple(emb.weight.shape), emb, emb.weight.detach().clone(), studio.pipeline.scheduler


# -- render ----------------------------------------------------------------------------------------------
def test_same_seed_same_image(studio):
    a = generation.render(studio, BASE, {})[0]
    b = generation.render(studio, BASE, {})[0]
    assert max_diff(a.image, b.image) == 0
    assert a.seed == b.seed == 1234
    other = generation.render(studio, replace(BASE, seed=1235), {})[0]
    assert max_diff(a.image, other.image) > 0


def test_batch_equals_single_runs(studio):
    batch = generation.render(studio, replace(BASE, batch_size=3, seed=10), {})
    singles = [generation.render(studio, replace(BASE, seed=10 + i), {})[0] for i in range(3)]
    assert [r.seed for r in batch] == [10, 11, 12]
    for pos, (b, s) in enumerate(zip(batch, singles)):
        # Batched convolutions may round differently on CPU: allow 2/255, far below any real difference.
        assert max_diff(b.image, s.image) <= 2
        # The same parameters, plus where the image sat in its batch (as A1111 writes it).
        assert b.infotext == s.infotext.replace(", Version:", f", Batch size: 3, Batch pos: {pos}, Version:")


def test_random_seed_is_reported(studio):
    rendered = generation.render(studio, replace(BASE, seed=-1, batch_size=2), {})
    first = rendered[0].seed
    assert 0 <= first < generation.MAX_SEED
    assert rendered[1].seed == first + 1
    assert f"Seed: {first}," in rendered[0].infotext


def test_embedding_changes_output_and_does_not_leak(studio):
    before = text_encoder_state(studio)
    vectors = {"myemb": torch.randn(2, studio.embedding_width, generator=torch.Generator().manual_seed(0))}
    cfg = replace(BASE, prompt="a photo of myemb")
    plain = generation.render(studio, cfg, {})[0]
    applied = generation.render(studio, cfg, vectors, {"myemb": "0123456789ab"})[0]
    assert max_diff(plain.image, applied.image) > 10
    assert 'TI hashes: "myemb: 0123456789ab"' in applied.infotext
    after = text_encoder_state(studio)
    assert after[:3] == before[:3]  # tokenizer length, matrix shape, module identity (no splice left behind)
    assert torch.equal(after[3], before[3])
    assert after[4] is before[4]  # the studio's scheduler is never swapped


def test_embedding_in_negative_prompt_is_hashed_unused_ones_are_not(studio):
    width = studio.embedding_width
    vectors = {"badthing": torch.randn(1, width), "unused": torch.randn(3, width)}
    cfg = replace(BASE, prompt="a cat", negative_prompt="badthing, blurry")
    text = generation.render(studio, cfg, vectors, {"badthing": "aaaaaaaaaaaa", "unused": "bbbbbbbbbbbb"})[0].infotext
    assert 'TI hashes: "badthing: aaaaaaaaaaaa"' in text
    assert "unused" not in text


def test_trainable_vectors_get_no_gradient(studio):
    param = torch.nn.Parameter(torch.randn(2, studio.embedding_width))
    generation.render(studio, replace(BASE, prompt="myemb"), {"myemb": param})
    assert param.grad is None


def test_long_prompt_against_short_negative(studio):
    long_prompt = ", ".join(f"word{i}" for i in range(60))  # well over 75 tokens: two chunks vs one
    rendered = generation.render(studio, replace(BASE, prompt=long_prompt, negative_prompt=""), {})
    assert rendered[0].image.size == (64, 64)


def test_step_callback_reports_progress(studio):
    calls: list[tuple[int, int]] = []
    generation.render(studio, replace(BASE, steps=3), {}, on_step=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs(studio, sampler):
    scheduler = studio.pipeline.scheduler
    rendered = generation.render(studio, replace(BASE, sampler=sampler, cfg_scale=5.5), {})
    assert rendered[0].image.size == (64, 64)
    assert pixels(rendered[0].image).std() > 0
    assert studio.pipeline.scheduler is scheduler


def test_half_precision_unet_with_fp32_text_encoder(cache_dir):
    """The GPU layout (bf16 UNet/VAE, fp32 text encoder), here on CPU: conditioning must reach the UNet in its dtype."""
    from tinv_ui.config import ModelSpec, Paths
    from tinv_ui.studio import Studio

    studio = Studio(Paths(cache_dir=cache_dir))
    studio.load(ModelSpec("tiny", dtype="bfloat16"))
    assert (studio.pipeline.unet.dtype, studio.text_encoder.dtype) == (torch.bfloat16, torch.float32)
    rendered = generation.render(studio, replace(BASE, prompt="myemb"), {"myemb": torch.randn(2, studio.embedding_width)})
    assert rendered[0].image.size == (64, 64)


def _own_studio(cache_dir):
    from tinv_ui.config import ModelSpec, Paths
    from tinv_ui.studio import Studio

    studio = Studio(Paths(cache_dir=cache_dir))
    studio.load(ModelSpec("tiny"))
    return studio


def test_compiled_generation_matches_eager_compiles_once_per_model(cache_dir, monkeypatch):
    """`compile=True` draws through one cached `torch.compile` wrapper; a model load drops it.

    dynamo's "eager" backend keeps this fast on CPU (the real inductor compile is the slow test below)."""
    from tinv_ui.config import ModelSpec

    studio = _own_studio(cache_dir)
    real_compile, made = torch.compile, []

    def recording_compile(module, **kw):
        made.append((module, kw))
        return real_compile(module, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", recording_compile)
    eager = generation.render(studio, BASE, {"myemb": torch.randn(2, studio.embedding_width)})[0]
    assert made == []
    cfg = replace(BASE, compile=True)
    compiled = [generation.render(studio, cfg, {"myemb": torch.randn(2, studio.embedding_width)})[0] for _ in range(2)]
    assert len(made) == 1 and made[0][0] is studio.pipeline.unet and made[0][1] == {"dynamic": False}
    assert studio.compiled_unet()._orig_mod is studio.pipeline.unet
    for r in compiled:
        assert max_diff(r.image, eager.image) <= 1
        assert r.infotext == eager.infotext
    studio.load(ModelSpec("tiny"))
    generation.render(studio, cfg, {})
    assert len(made) == 2 and made[1][0] is studio.pipeline.unet  # the new model's UNet, not the released one


@pytest.mark.slow
def test_inductor_compiled_generation_matches_eager(cache_dir):
    """The real `torch.compile` (inductor, about 45 s on CPU for the tiny UNet) draws the eager image."""
    studio = _own_studio(cache_dir)
    eager = generation.render(studio, BASE, {})[0]
    compiled = generation.render(studio, replace(BASE, compile=True), {})[0]
    assert max_diff(compiled.image, eager.image) <= 1


def test_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match="sampler"):
        generation.make_scheduler("Nope", {})


# -- infotext and PNGs ----------------------------------------------------------------------------------
def test_infotext_layout_matches_a1111():
    cfg = GenerateConfig(prompt="portrait of myemb, detailed", negative_prompt="easynegative", sampler="DPM++ 2M Karras",
                         steps=20, cfg_scale=7.0, width=512, height=768)
    ti = generation.ti_hashes(["myemb", "easynegative"], {"myemb": "0a1b2c3d4e5f", "easynegative": "c74b4e810b03"})
    text = generation.infotext(cfg, 1234567890, "v1-5-pruned-emaonly", "6ce0161689", ti)
    assert text == (
        "portrait of myemb, detailed\n"
        "Negative prompt: easynegative\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, TI hashes: "myemb: 0a1b2c3d4e5f, easynegative: c74b4e810b03", '
        "Version: tinv-ui 0.1.0"
    )


def test_infotext_names_the_batch_position_for_batches_of_two_or_more():
    one = GenerateConfig(prompt="p", steps=5, width=64, height=64)
    assert "Batch" not in generation.infotext(one, 7, "m", None, None)
    four = GenerateConfig(prompt="p", steps=5, width=64, height=64, batch_size=4)
    text = generation.infotext(four, 9, "m", "0123456789", None, batch_pos=2)
    assert "Model hash: 0123456789, Model: m, Batch size: 4, Batch pos: 2, Version:" in text


def test_infotext_omits_empty_values_and_quotes_special_ones():
    cfg = GenerateConfig(prompt="a\nb", sampler="Euler a", steps=5, cfg_scale=6.5, clip_skip=2, width=64, height=64)
    text = generation.infotext(cfg, 7, "my, model", None, None)
    assert text.startswith("a\nb\nSteps: 5, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 7, Size: 64x64, ")
    assert "Negative prompt" not in text
    assert "Model hash" not in text and "TI hashes" not in text
    assert 'Model: "my, model", Clip skip: 2, Version: tinv-ui 0.1.0' in text
    assert generation.quote('say "hi": x') == '"say \\"hi\\": x"'
    assert generation.ti_hashes(["a:b,c", "nohash"], {"a:b,c": "123456789abc"}) == "abc: 123456789abc"


def test_save_png_writes_readable_parameters(tmp_path):
    image = Image.new("RGB", (16, 16), (200, 10, 10))
    path = generation.save_png(image, tmp_path / "sub" / "00000-1.png", "prompt\nSteps: 1, Seed: 1")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.text["parameters"] == "prompt\nSteps: 1, Seed: 1"
    assert [p.name for p in path.parent.iterdir()] == ["00000-1.png"]  # no temp file left behind


def test_next_image_path_numbers_after_existing(tmp_path):
    assert generation.next_image_path(tmp_path / "missing", 5).name == "00000-5.png"
    (tmp_path / "00007-99.png").touch()
    (tmp_path / "notes.png").touch()
    assert generation.next_image_path(tmp_path, 42).name == "00008-42.png"


# -- the request workflow --------------------------------------------------------------------------------
def make_library(paths):
    from tinv_ui.library import EmbeddingLibrary

    return EmbeddingLibrary(paths.embeddings_dir)


def write_embedding(studio, paths, name: str, n: int = 2):
    from tinv_ui import formats
    from tinv_ui.embedding import Embedding

    vectors = torch.randn(n, studio.embedding_width, generator=torch.Generator().manual_seed(n))
    return formats.write(Embedding(name, vectors), paths.embeddings_dir / f"{name}.pt")


def test_generate_yields_steps_then_one_result_per_batch_and_saves(studio, paths):
    cfg = replace(BASE, batch_count=2, batch_size=2, seed=-1, save=True)
    events = list(generation.generate(studio, cfg, make_library(paths), paths))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Step", "Step", "Generated"] * 2
    steps = [e for e in events if isinstance(e, Step)]
    assert [(s.step, s.total) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    results = [e for e in events if isinstance(e, Generated)]
    seeds = [s for r in results for s in r.seeds]
    assert seeds == list(range(seeds[0], seeds[0] + 4))  # one random base seed, then consecutive
    saved = [p for r in results for p in r.paths]
    assert [p.name for p in saved] == [f"{i:05d}-{s}.png" for i, s in enumerate(seeds)]
    assert saved[0].parent == generation.output_folder(paths)
    with Image.open(saved[3]) as img:
        assert f"Seed: {seeds[3]}," in img.text["parameters"]


def test_generate_picks_up_new_embedding_files_without_restart(studio, paths):
    library = make_library(paths)
    cfg = replace(BASE, prompt="a photo of newemb")
    first = [e for e in generation.generate(studio, cfg, library, paths) if isinstance(e, Generated)][0]
    assert "TI hashes" not in first.infotexts[0]
    write_embedding(studio, paths, "newemb")
    second = [e for e in generation.generate(studio, cfg, library, paths) if isinstance(e, Generated)][0]
    assert re.search(r'TI hashes: "newemb: [0-9a-f]{12}"', second.infotexts[0])
    assert max_diff(first.images[0], second.images[0]) > 10
    assert not any(paths.outputs_dir.rglob("*.png"))  # save=False writes nothing


def test_generate_waits_for_the_lock_instead_of_failing(studio, paths):
    """A request arriving while a training step holds the lock blocks on it, then renders holding it itself."""
    release, order, results = threading.Event(), [], []

    def hold_like_a_training_step() -> None:
        with studio.session(what="training step"):
            release.wait(60)
            order.append("released")

    def request() -> None:
        results.extend(generation.generate(studio, BASE, make_library(paths), paths))

    holder = threading.Thread(target=hold_like_a_training_step)
    holder.start()
    wait_until(lambda: studio.busy_with == "training step", "the step holds the lock")
    hook = studio.pipeline.unet.register_forward_pre_hook(lambda module, args: order.append(studio.busy_with))
    try:
        requester = threading.Thread(target=request)
        requester.start()
        wait_until(lambda: blocked_in_session(requester), "the request waits in Studio.session")
        assert order == []  # no UNet pass while the step holds the lock
        release.set()
        holder.join(60)
        requester.join(60)
    finally:
        hook.remove()
    assert order[0] == "released" and order[1:] and set(order[1:]) == {"generating"}
    assert isinstance(results[-1], Generated)


def test_closing_generate_midway_releases_the_lock(studio, paths):
    gen = generation.generate(studio, replace(BASE, steps=5, batch_count=3), make_library(paths), paths)
    assert isinstance(next(gen), Step)
    assert studio.busy_with == "generating"
    gen.close()
    assert studio.busy_with == ""
    with studio.session(timeout=0):
        pass
