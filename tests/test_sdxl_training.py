"""Training SDXL embeddings on the tiny SDXL model: both vector sets move and the loss falls, the UNet gets the
pooled text and each image's size conditioning, exact resume, the pair files, the NaN guard, the CLI."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_images
from safetensors import safe_open

from tinv_ui import formats, training
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.errors import TrainingError
from tinv_ui.events import Preview, Saved, Started, Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.tiny_model import TINY_SDXL_POOLED, TINY_SDXL_RESOLUTION, TINY_SDXL_WIDTHS
from tinv_ui.training import train

ROOT = Path(__file__).resolve().parent.parent
SIZE = TINY_SDXL_RESOLUTION
NAME = "xltrain"


def make_pair(studio, paths, file_format="auto", overwrite=False, name=NAME) -> Path:
    cfg = CreateConfig(name=name, initializer="painting", num_vectors=2, file_format=file_format, overwrite=overwrite)
    return create_embedding(studio, cfg, paths.embeddings_dir)


def config(images, **kw) -> TrainConfig:
    base = dict(embedding=NAME, dataset_dir=str(images), template="subject", max_steps=4, width=SIZE, height=SIZE,
                learn_rate="0.05", save_every=0, preview_every=0, preview_steps=2, seed=3, batch_size=1)
    return TrainConfig(**{**base, **kw})


def run(studio, paths, cfg, stop=None):
    return list(train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths, stop))


def test_training_moves_clip_l_and_clip_g_and_lowers_the_loss(sdxl_studio, paths, tmp_path, monkeypatch):
    """Fixed image, noise, timestep and prompt: the trainer's steps lower the loss, and both sets of vectors move."""
    write_images(tmp_path / "one", 1, size=SIZE)
    g = torch.Generator().manual_seed(0)
    fixed = functools.partial(training.diffusion_loss, timesteps=torch.tensor([400]),
                              noise=torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g))
    monkeypatch.setattr(training, "diffusion_loss", fixed)
    path = create_embedding(sdxl_studio, CreateConfig(name=NAME, initializer="painting", num_vectors=8),
                            paths.embeddings_dir)
    start = formats.read(path)
    events = run(sdxl_studio, paths, config(tmp_path / "one", template="none", max_steps=12,
                                            save_optimizer_state=False))
    losses = [e.loss for e in events if isinstance(e, Step)]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 1e-3
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 9  # it goes down step after step
    trained = formats.read(path)
    assert trained.step == 12 and trained.is_sdxl
    for part in ("clip_l", "clip_g"):
        assert trained.parts[part].shape == start.parts[part].shape
        assert (trained.parts[part] - start.parts[part]).abs().max() > 1e-3, f"{part} did not move"


def test_each_images_size_conditioning_and_the_pooled_text_reach_the_unet(sdxl_studio, paths, tmp_path):
    """kohya's micro-conditioning per image: (original h, w, crop top, left, target h, w), with the pooled output."""
    from PIL import Image

    folder = tmp_path / "sizes"
    folder.mkdir()
    for i, (w, h) in enumerate([(96, 80), (200, 120), (64, 64), (128, 160)]):
        Image.new("RGB", (w, h), (40 * i, 90, 200 - 40 * i)).save(folder / f"{i:03d}-thing {i}.png")
    make_pair(sdxl_studio, paths)
    calls = []

    def record(_module, _args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((added["time_ids"].detach().clone(), tuple(added["text_embeds"].shape)))

    unet = sdxl_studio.pipeline.unet
    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(sdxl_studio, paths, config(folder, max_steps=2, batch_size=4, flip=True, gradient_checkpointing=True))
    finally:
        handle.remove()
    assert len(calls) == 2
    want = sorted([(80, 96, 0, 0, SIZE, SIZE), (120, 200, 0, 0, SIZE, SIZE), (64, 64, 0, 0, SIZE, SIZE),
                   (160, 128, 0, 0, SIZE, SIZE)])
    for time_ids, pooled_shape in calls:
        assert sorted(tuple(int(v) for v in row) for row in time_ids) == want
        assert pooled_shape == (4, TINY_SDXL_POOLED)

    calls.clear()
    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:  # keep_size: each image is its own bucket, target = its size rounded down to a multiple of 8
        run(sdxl_studio, paths, config(folder, max_steps=6, keep_size=True))
    finally:
        handle.remove()
    seen = {tuple(int(v) for v in row) for time_ids, _ in calls for row in time_ids}
    assert seen <= {(80, 96, 0, 0, 80, 96), (120, 200, 0, 0, 120, 200), (64, 64, 0, 0, 64, 64),
                    (160, 128, 0, 0, 160, 128)} and len(seen) >= 2


def test_two_steps_then_resume_to_four_equals_four_steps_bit_for_bit(sdxl_studio, paths, images):
    knobs = dict(flip=True, latent_sampling="random", shuffle_tags=True, tag_dropout=0.3)
    path = make_pair(sdxl_studio, paths)
    straight = run(sdxl_studio, paths, config(images, seed=7, **knobs))
    four = formats.read(path)

    make_pair(sdxl_studio, paths, overwrite=True)
    first = run(sdxl_studio, paths, config(images, max_steps=2, seed=7, **knobs))
    second = run(sdxl_studio, paths, config(images, max_steps=4, seed=-1, **knobs))  # the saved seed continues
    resumed = formats.read(path)
    assert resumed.step == 4
    for part in ("clip_l", "clip_g"):
        assert torch.equal(resumed.parts[part], four.parts[part])
    losses = lambda events: [e.loss for e in events if isinstance(e, Step)]  # noqa: E731
    assert losses(first) + losses(second) == losses(straight)
    assert "continues as if it had never stopped" in next(e for e in second if isinstance(e, Started)).message


@pytest.mark.parametrize("file_format", ["safetensors", "pt"])
def test_copies_and_the_final_file_are_clip_l_clip_g_pairs_that_round_trip(sdxl_studio, paths, images, file_format):
    path = make_pair(sdxl_studio, paths, file_format=file_format)
    events = run(sdxl_studio, paths, config(images, max_steps=2, save_every=1, preview_every=2))
    copies = [e.path for e in events if isinstance(e, Saved) and not e.final]
    assert [c.name for c in copies] == [f"{NAME}-1.{file_format}", f"{NAME}-2.{file_format}"]
    if file_format == "safetensors":
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == ["clip_g", "clip_l"]
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        tensors = torch.load(path, weights_only=True)
        assert sorted(tensors) == ["clip_g", "clip_l"]  # only the two tensors (what every SDXL tool reads)
    assert tensors["clip_l"].shape == (2, TINY_SDXL_WIDTHS[0]) and tensors["clip_g"].shape == (2, TINY_SDXL_WIDTHS[1])
    assert all(t.dtype == torch.float32 for t in tensors.values())
    final, last_copy = formats.read(path), formats.read(copies[-1])
    for part in ("clip_l", "clip_g"):  # the final file holds what the step-2 copy holds, bit for bit
        assert torch.equal(final.parts[part], tensors[part]) and torch.equal(last_copy.parts[part], tensors[part])
    preview = next(e for e in events if isinstance(e, Preview))
    assert preview.images[0].size == (SIZE, SIZE) and preview.paths[0].is_file()
    # the trained pair is usable at once (the library lists it for the SDXL model), and a further run continues
    # from step 2 (a .pt pair holds no step: the `.optim` keeps it)
    library = EmbeddingLibrary(paths.embeddings_dir)
    library.rescan_for(sdxl_studio)
    assert library.get(NAME).embedding.parts["clip_g"].shape == (2, TINY_SDXL_WIDTHS[1])
    more = run(sdxl_studio, paths, config(images, max_steps=3))
    assert [e.step for e in more if isinstance(e, Step)] == [3]


def test_a_nan_loss_stops_and_keeps_the_last_finite_pair(sdxl_studio, paths, images, monkeypatch):
    path = make_pair(sdxl_studio, paths)
    real = training.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    with pytest.raises(TrainingError, match="Training stopped at step 3"):
        run(sdxl_studio, paths, config(images, max_steps=5, save_every=2))
    kept = formats.read(path)
    copy = formats.read(paths.outputs_dir / "train" / __import__("datetime").date.today().isoformat() / NAME
                        / "embeddings" / f"{NAME}-2.safetensors")
    assert kept.step == 2
    for part in ("clip_l", "clip_g"):
        assert torch.isfinite(kept.parts[part]).all() and torch.equal(kept.parts[part], copy.parts[part])


def test_cli_trains_the_tiny_sdxl_model(tmp_path, sdxl_studio, cache_dir):
    images = tmp_path / "ds"
    write_images(images, 2, size=SIZE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "tinv_ui", "--cache-dir", str(cache_dir), "--model", "tiny-sdxl",
              "--embeddings-dir", str(tmp_path / "emb"), "--outputs-dir", str(tmp_path / "out")]

    def cli(*args):
        proc = subprocess.run([*common, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()

    cli("create", "--name", "clixl", "--num-vectors", "2")
    lines = cli("train", "--embedding", "clixl", "--dataset-dir", str(images), "--max-steps", "2", "--preview-every",
                "0", "--save-every", "0", "--width", str(SIZE), "--height", str(SIZE), "--template", "subject")
    assert [line for line in lines if line.startswith("started: ")][0].startswith("started: clixl from step 0 to 2 on 2 images")
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/2", "2/2"]
    assert lines[-1].startswith("finished at step 2:")
    trained = formats.read(tmp_path / "emb" / "clixl.safetensors")
    assert trained.is_sdxl and trained.step == 2


def test_fp16_sdxl_trains_with_the_latent_cache_encoded_in_fp32(cache_dir, paths, images):
    """The SDXL VAE overflows fp16 (`force_upcast`): the latent cache is encoded in fp32 while the frozen UNet stays
    fp16. The tiny VAE's first encoder conv is scaled up so that an fp16 encode would give inf (the GroupNorm after
    it undoes the scale in fp32)."""
    from tinv_ui.config import ModelSpec
    from tinv_ui.studio import Studio
    from tinv_ui.tiny_model import TINY_SDXL

    studio = Studio(paths)
    studio.load(ModelSpec(TINY_SDXL, dtype="float16"))
    pipe = studio.pipeline
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.mul_(1e5)
        pipe.vae.encoder.conv_in.bias.mul_(1e5)
    seen = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    unet_dtypes = []
    unet_handle = pipe.unet.register_forward_pre_hook(lambda _m, args: unet_dtypes.append(args[0].dtype))
    try:
        make_pair(studio, paths)
        events = run(studio, paths, config(images, max_steps=2))
    finally:
        handle.remove()
        unet_handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert set(unet_dtypes) == {torch.float16}
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in events if isinstance(e, Step))
    trained = formats.read(paths.embeddings_dir / f"{NAME}.safetensors")
    assert trained.step == 2 and all(torch.isfinite(t).all() for t in trained.parts.values())


def test_an_sd_embedding_with_the_sdxl_model_is_refused_with_the_family_reason(sdxl_studio, paths, images):
    from tinv_ui.embedding import Embedding
    from tinv_ui.errors import ShapeMismatchError

    formats.write(Embedding("sdone", torch.zeros(2, 768), step=0), paths.embeddings_dir / "sdone.pt")
    with pytest.raises(ShapeMismatchError, match="an SD 1.x/2.x embedding .* does not fit the loaded SDXL model"):
        run(sdxl_studio, paths, config(images, embedding="sdone"))


def test_interrupt_saves_the_pair_as_it_stands(sdxl_studio, paths, images):
    import threading

    from tinv_ui.events import Finished

    path = make_pair(sdxl_studio, paths)
    stop = threading.Event()
    events = []
    for event in train(sdxl_studio, config(images, max_steps=50), EmbeddingLibrary(paths.embeddings_dir), paths, stop):
        events.append(event)
        if isinstance(event, Step) and event.step == 2:
            stop.set()
    assert isinstance(events[-1], Finished) and events[-1].interrupted and events[-1].step == 2
    saved = formats.read(path)
    assert saved.is_sdxl and saved.step == 2
