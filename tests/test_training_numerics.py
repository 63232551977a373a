"""What the optimizer really receives, step by step, and what previews and samplers really draw.

These tests watch training from the outside (torch's global optimizer-step hooks, the UNet's forward hooks,
the images rendered) and use only the public API (`training.train`, `generation.render`), so they hold
whatever shape the trainer's internals take: learning rate per step, clipped gradients, accumulation scaling,
the lock held during each step and render, previews drawn with the in-training vectors, samplers that differ,
and a trained embedding that generalises to noise/timestep draws it never saw.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from conftest import write_images
from PIL import Image, ImageChops

from tinv_ui import formats, generation
from tinv_ui.config import SAMPLERS, CreateConfig, GenerateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.dataset import pixels_to_tensor
from tinv_ui.events import Preview, Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.tokens import PromptEncoder
from tinv_ui.training import train

NAME = "numemb"


@pytest.fixture
def emb_path(studio, paths):
    return fresh_embedding(studio, paths)


def fresh_embedding(studio, paths, num_vectors: int = 2):
    """A new embedding initialised from 'painting' (overwriting an earlier one, so runs start alike)."""
    cfg = CreateConfig(name=NAME, initializer="painting", num_vectors=num_vectors, overwrite=True)
    return create_embedding(studio, cfg, paths.embeddings_dir)


def config(images, **kw) -> TrainConfig:
    base = dict(embedding=NAME, dataset_dir=str(images), template="subject_filewords", max_steps=3, width=64,
                height=64, learn_rate="0.02", save_every=0, preview_every=0, preview_steps=2, seed=1,
                save_optimizer_state=False)
    return TrainConfig(**{**base, **kw})


def run(studio, paths, cfg, stop=None) -> list:
    return list(train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths, stop))


@contextlib.contextmanager
def watching_adamw(studio=None):
    """Record, just before each `optimizer.step()`, what it is about to use: lr per group, gradients, lock holder."""
    seen: list[dict] = []

    def before_step(optimizer, args, kwargs):
        seen.append({
            "lr": [group["lr"] for group in optimizer.param_groups],
            "grads": [p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]],
            "busy_with": studio.busy_with if studio is not None else None,
        })

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        yield seen
    finally:
        handle.remove()


def pixels_differ(a: Image.Image, b: Image.Image) -> int:
    """The largest per-channel difference between two images (0: identical)."""
    return max(hi for _, hi in ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getextrema())


# -- learning rate ------------------------------------------------------------------------------------------------
def test_adamw_gets_the_scheduled_learning_rate_at_every_step(studio, paths, images, emb_path):
    with watching_adamw() as seen:
        events = run(studio, paths, config(images, max_steps=5, learn_rate="0.01:2, 0.005:4, 0.001"))
    # A1111's rule: the rate for step N is the schedule's entry for the N-1 steps done so far
    assert [s["lr"] for s in seen] == [[0.01], [0.01], [0.005], [0.005], [0.001]]
    assert [e.lr for e in events if isinstance(e, Step)] == [0.01, 0.01, 0.005, 0.005, 0.001]


def test_a_resumed_run_gets_the_rate_for_its_own_steps(studio, paths, images, emb_path):
    run(studio, paths, config(images, max_steps=2, learn_rate="0.01:3, 0.002"))
    with watching_adamw() as seen:
        run(studio, paths, config(images, max_steps=5, learn_rate="0.01:3, 0.002"))
    assert [s["lr"] for s in seen] == [[0.01], [0.002], [0.002]]  # steps 3, 4, 5


# -- clipping -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["value", "norm"])
def test_adamw_gets_clipped_gradients(studio, paths, images, mode):
    limit = 1e-4
    grads = {}
    for clip in ("disabled", mode):
        fresh_embedding(studio, paths)
        with watching_adamw() as seen:
            run(studio, paths, config(images, max_steps=3, clip_grad_mode=clip, clip_grad_value=str(limit)))
        grads[clip] = [s["grads"][0] for s in seen]
    assert len(grads[mode]) == 3
    raw = grads["disabled"][0]  # step 1 starts from the same vectors and batch in both runs
    if mode == "value":
        assert raw.abs().max() > 2 * limit  # so clipping has something to do
        assert all(g.abs().max() <= limit * (1 + 1e-6) for g in grads[mode])
        torch.testing.assert_close(grads[mode][0], raw.clamp(-limit, limit))
    else:
        assert raw.norm() > 2 * limit
        assert all(g.norm() <= limit * (1 + 1e-5) for g in grads[mode])
        torch.testing.assert_close(grads[mode][0], raw * (limit / raw.norm()), rtol=1e-4, atol=1e-12)


# -- gradient accumulation ----------------------------------------------------------------------------------------
@pytest.fixture
def same_draws(monkeypatch):
    """Every noise and timestep draw in the process returns the same values: all micro-batches become equal."""
    real_randn, real_randint = torch.randn, torch.randint

    def randn(*args, generator=None, **kw):
        return real_randn(*args, generator=torch.Generator().manual_seed(7), **kw)

    def randint(*args, generator=None, **kw):
        return real_randint(*args, generator=torch.Generator().manual_seed(7), **kw)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch, "randint", randint)


@pytest.mark.parametrize("accumulation", [3])
def test_n_equal_micro_batches_give_adamw_the_gradient_of_one(studio, paths, tmp_path, same_draws, accumulation):
    write_images(tmp_path / "one", 1)  # one image, one prompt line ("[name]"), fixed draws: identical micro-batches
    got = {}
    for n in (1, accumulation):
        fresh_embedding(studio, paths)
        with watching_adamw() as seen:
            events = run(studio, paths, config(tmp_path / "one", template="none", max_steps=1, gradient_accumulation=n))
        got[n] = (seen[0]["grads"][0], [e.loss for e in events if isinstance(e, Step)])
    assert got[1][0].abs().max() > 0
    scale = float(got[1][0].abs().max())
    torch.testing.assert_close(got[accumulation][0], got[1][0], rtol=1e-4, atol=1e-4 * scale)  # the mean, not the sum
    assert got[accumulation][1] == pytest.approx(got[1][1], rel=1e-5)


# -- samplers -----------------------------------------------------------------------------------------------------
def test_each_sampler_draws_its_own_image_with_its_own_scheduler(studio, monkeypatch):
    from diffusers import StableDiffusionPipeline

    schedulers, real_call = [], StableDiffusionPipeline.__call__

    def recording_call(pipe, *args, **kwargs):
        config = pipe.scheduler.config
        schedulers.append((type(pipe.scheduler).__name__, bool(config.get("use_karras_sigmas"))))
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording_call)
    images = {}
    with studio.session():
        for sampler in SAMPLERS:
            cfg = GenerateConfig(prompt="a red house", sampler=sampler, steps=3, width=64, height=64, seed=11, save=False)
            images[sampler] = generation.render(studio, cfg, {})[0].image
    assert len(schedulers) == len(SAMPLERS) == len(set(schedulers))  # a scheduler (or config) per name
    assert schedulers[SAMPLERS.index("Euler a")] == ("EulerAncestralDiscreteScheduler", False)
    assert schedulers[SAMPLERS.index("DPM++ 2M Karras")] == ("DPMSolverMultistepScheduler", True)
    same = [(a, b) for i, a in enumerate(SAMPLERS) for b in SAMPLERS[i + 1:] if pixels_differ(images[a], images[b]) == 0]
    assert same == []


# -- previews -----------------------------------------------------------------------------------------------------
def test_a_preview_is_drawn_with_the_vectors_being_trained(studio, paths, images, emb_path):
    initial = formats.read(emb_path).vectors
    cfg = config(images, max_steps=2, preview_every=2, learn_rate="0.05", preview_prompt=f"a castle, art by {NAME}")
    preview = next(e for e in run(studio, paths, cfg) if isinstance(e, Preview))
    trained = formats.read(emb_path).vectors  # the final file holds the step-2 vectors the preview was drawn with
    assert not torch.equal(trained, initial)
    gen_cfg = GenerateConfig(prompt=cfg.preview_prompt, sampler=cfg.preview_sampler, steps=cfg.preview_steps,
                             cfg_scale=cfg.preview_cfg, seed=cfg.preview_seed, width=64, height=64, save=False)
    with studio.session():
        with_initial = generation.render(studio, gen_cfg, {NAME: initial})[0].image
        with_trained = generation.render(studio, gen_cfg, {NAME: trained})[0].image
    assert pixels_differ(with_initial, with_trained) > 0  # the vectors moved enough to change the picture
    assert pixels_differ(preview.images[0], with_trained) == 0
    assert pixels_differ(preview.images[0], with_initial) > 0


# -- the lock, observed from inside the work ------------------------------------------------------------------------
@contextlib.contextmanager
def removing(handle):
    """Remove a torch hook handle when the block ends."""
    try:
        yield handle
    finally:
        handle.remove()


def test_each_training_step_and_preview_runs_under_the_lock(studio, paths, images, emb_path):
    forwards: list[str] = []
    with watching_adamw(studio) as seen, removing(studio.pipeline.unet.register_forward_pre_hook(
            lambda module, args: forwards.append(studio.busy_with))):
        run(studio, paths, config(images, max_steps=2, preview_every=2, preview_steps=2))
    assert [s["busy_with"] for s in seen] == [f"training {NAME} (step 1/2)", f"training {NAME} (step 2/2)"]
    # UNet passes: one per training step, then the preview's denoising steps (x2 for the CFG batch is one call)
    assert forwards[:2] == [f"training {NAME} (step 1/2)", f"training {NAME} (step 2/2)"]
    assert forwards[2:] and set(forwards[2:]) == {f"training {NAME}: preview at step 2"}


# -- generalisation -----------------------------------------------------------------------------------------------
def held_out_loss(studio, image_paths, vectors: torch.Tensor, draws: int = 64, seed: int = 12345) -> float:
    """The LDM loss of `vectors` on the training images, averaged over noise/timestep draws training never used.

    Computed here from the model's parts (VAE mean latents, DDPM noising, UNet epsilon/v error), independent
    of the trainer's own code.
    """
    from diffusers import DDPMScheduler

    pipe = studio.pipeline
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        cond, _ = PromptEncoder(studio.tokenizer, studio.text_encoder, {NAME: vectors}).encode([NAME])
        for path in image_paths:
            with Image.open(path) as img:
                x = pixels_to_tensor(img.convert("RGB"))[None]
            latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            latents = latents.expand(draws, -1, -1, -1)
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (draws,), generator=g)
            target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                noise_scheduler.get_velocity(latents, noise, t)
            pred = pipe.unet(noise_scheduler.add_noise(latents, noise, t), t, cond.expand(draws, -1, -1)).sample
            total += float(((pred - target) ** 2).mean())
    return total / len(image_paths)


def test_a_trained_embedding_lowers_the_loss_on_held_out_draws(studio, paths, tmp_path):
    image_paths = write_images(tmp_path / "two", 2)
    fresh_embedding(studio, paths, num_vectors=4)
    path = paths.embeddings_dir / f"{NAME}.pt"
    initial = formats.read(path).vectors
    run(studio, paths, config(tmp_path / "two", template="none", max_steps=40, learn_rate="0.05"))
    trained = formats.read(path).vectors
    moved = trained - initial
    random_move = torch.randn(moved.shape, generator=torch.Generator().manual_seed(3)) * (moved.norm() / moved.numel() ** 0.5)
    before, after = held_out_loss(studio, image_paths, initial), held_out_loss(studio, image_paths, trained)
    # The tiny model's random UNet leaves little for a prompt to explain (about 0.3 % here), but the same
    # draws make the comparison exact; a random step of the same size does not buy it.
    assert after < before * 0.999, (before, after)
    assert held_out_loss(studio, image_paths, initial + random_move) > after
