"""The trainer on the tiny model (CPU): only the vectors move, events, outputs, interrupt, resume, NaN, pre-flight."""

import functools
import json
import shutil
from collections import namedtuple

import pytest
import torch
from conftest import write_images

from tinv_ui import formats, training
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.embedding import Embedding
from tinv_ui.errors import ConfigError, DatasetError, ShapeMismatchError, TinvError, TrainingError
from tinv_ui.events import Finished, Phase, Preview, Saved, Started, Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train

NAME = "tstemb"


def make_embedding(studio, paths, overwrite: bool = False):
    """A 2-vector embedding initialised from 'painting'; `overwrite` starts it afresh for a second run."""
    cfg = CreateConfig(name=NAME, initializer="painting", num_vectors=2, overwrite=overwrite)
    return create_embedding(studio, cfg, paths.embeddings_dir)


@pytest.fixture
def emb_path(studio, paths):
    """A 2-vector embedding initialised from 'painting' (engineer A's create_embedding)."""
    return make_embedding(studio, paths)


def config(images, **kw) -> TrainConfig:
    base = dict(embedding=NAME, dataset_dir=str(images), template="subject_filewords", max_steps=3, width=64,
                height=64, learn_rate="0.02", save_every=0, preview_every=0, preview_steps=2, seed=1)
    return TrainConfig(**{**base, **kw})


def run(studio, paths, cfg, stop=None):
    """The run's events without its `Phase`s (tests/test_progress.py checks those)."""
    return [e for e in train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths, stop) if not isinstance(e, Phase)]


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_targets_and_alpha_weights(prediction_type):
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    latents, noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    left = torch.zeros(2, 4, 8, 8)
    left[..., :4] = 1.0

    def oracle(offset):
        unet = lambda x, tt, cond: SimpleNamespace(sample=target + offset)  # noqa: E731
        unet.dtype = torch.float32
        return unet

    loss = functools.partial(training.diffusion_loss, scheduler=sched, latents=latents, cond=torch.zeros(2, 77, 32),
                             timesteps=t, noise=noise)
    assert loss(oracle(0)).item() == 0  # the exact target for this prediction type
    assert loss(oracle(left)).item() == pytest.approx(0.5)  # error 1 on the left half
    weights = torch.zeros(2, 1, 8, 8)
    weights[..., 4:] = 2.0  # alpha map: only the right half counts
    assert loss(oracle(left), weights=weights).item() == 0
    assert loss(oracle(1 - left), weights=weights).item() == pytest.approx(1.0)


def test_only_the_vectors_change_and_the_model_is_left_as_found(studio, paths, images, emb_path):
    pipe = studio.pipeline
    before = {m: state_of(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    start = formats.read(emb_path)
    events = run(studio, paths, config(images, max_steps=3, gradient_checkpointing=True, batch_size=2,
                                       gradient_accumulation=2))
    after = formats.read(emb_path)
    for name, state in before.items():
        now = state_of(getattr(pipe, name))
        assert now.keys() == state.keys()
        assert all(torch.equal(now[k], state[k]) for k in state), f"{name} weights changed"
        assert all(p.grad is None and not p.requires_grad for p in getattr(pipe, name).parameters())
    token_rows = pipe.text_encoder.get_input_embeddings()
    assert type(token_rows).__name__ == "Embedding"  # the splice was removed
    assert not pipe.unet.is_gradient_checkpointing
    assert not torch.equal(after.vectors, start.vectors) and torch.isfinite(after.vectors).all()
    assert after.step == 3 and after.meta["sd_checkpoint_name"] == studio.info.name
    assert isinstance(events[-1], Finished) and not events[-1].interrupted


def test_loss_goes_down_on_a_fixed_batch(studio, paths, tmp_path, monkeypatch):
    """Fixed image, noise, timestep and prompt: the trainer's own steps must lower the loss (and lr 0 must not)."""
    write_images(tmp_path / "one", 1)
    g = torch.Generator().manual_seed(0)
    fixed = functools.partial(training.diffusion_loss, timesteps=torch.tensor([400]),
                              noise=torch.randn(1, 4, 8, 8, generator=g))
    monkeypatch.setattr(training, "diffusion_loss", fixed)
    create_embedding(studio, CreateConfig(name=NAME, initializer="painting", num_vectors=8), paths.embeddings_dir)

    def losses(lr):
        cfg = config(tmp_path / "one", template="none", max_steps=12, learn_rate=lr, save_optimizer_state=False)
        out = [e.loss for e in run(studio, paths, cfg) if isinstance(e, Step)]
        formats.write(formats.read(paths.embeddings_dir / f"{NAME}.pt").with_vectors(start, step=0),
                      paths.embeddings_dir / f"{NAME}.pt")
        return out

    start = formats.read(paths.embeddings_dir / f"{NAME}.pt").vectors
    trained, frozen = losses("0.05"), losses("0")
    assert len(trained) == 12
    assert max(frozen) - min(frozen) < 1e-6  # same batch, no update: the loss cannot move
    assert trained[0] == pytest.approx(frozen[0], abs=1e-6)
    assert trained[-1] < trained[0] - 1e-3
    assert sum(b < a for a, b in zip(trained, trained[1:])) >= 9  # it goes down step after step


def test_events_arrive_in_order_and_previews_are_saved(studio, paths, images, emb_path):
    events = run(studio, paths, config(images, max_steps=4, save_every=2, preview_every=2))
    kinds = [(type(e).__name__, e.step if not isinstance(e, Started) else e.initial_step) for e in events]
    assert kinds == [
        ("Started", 0), ("Step", 1), ("Step", 2), ("Saved", 2), ("Preview", 2), ("Step", 3), ("Step", 4),
        ("Saved", 4), ("Preview", 4), ("Saved", 4), ("Finished", 4),
    ]
    started, steps = events[0], [e for e in events if isinstance(e, Step)]
    assert started.total_steps == 4 and started.num_images == 4 and started.log_dir.is_dir()
    assert all(s.total == 4 and s.lr == 0.02 and s.loss > 0 and s.eta >= 0 for s in steps)
    assert steps[-1].elapsed >= steps[0].elapsed  # the last ETA still counts the final save (tests/test_progress.py)
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews[0].paths[0].name == f"{NAME}-2.png" and previews[0].paths[0].is_file()
    assert f" {NAME}, a red thing number " in previews[0].prompt  # the first prompt of the batch
    final = [e for e in events if isinstance(e, Saved) and e.final]
    assert final[0].path == paths.embeddings_dir / f"{NAME}.pt"
    assert events[-1].message == f"Training finished at step 4; saved to {final[0].path}"


def test_previews_use_the_fixed_seed_and_the_preview_prompt(studio, paths, images, emb_path):
    cfg = config(images, max_steps=2, preview_every=1, preview_prompt=f"a castle, art by {NAME}", learn_rate="0")
    previews = [e for e in run(studio, paths, cfg) if isinstance(e, Preview)]
    assert [p.prompt for p in previews] == [f"a castle, art by {NAME}"] * 2
    # learn_rate 0 keeps the vectors: same seed and prompt give the same picture at both steps
    assert list(previews[0].images[0].getdata()) == list(previews[1].images[0].getdata())


def test_outputs_folder_holds_exactly_the_expected_files(studio, paths, images, emb_path):
    events = run(studio, paths, config(images, max_steps=4, save_every=2, preview_every=4, write_csv_every=1))
    log_dir = events[0].log_dir
    assert log_dir.parent.parent == paths.outputs_dir / "train" and log_dir.name == NAME
    files = sorted(p.relative_to(log_dir).as_posix() for p in log_dir.rglob("*") if p.is_file())
    settings = [f for f in files if f.startswith("settings-")]
    assert len(settings) == 1
    assert [f for f in files if f not in settings] == [
        f"embeddings/{NAME}-2.pt", f"embeddings/{NAME}-2.pt.optim", f"embeddings/{NAME}-4.pt",
        f"embeddings/{NAME}-4.pt.optim", f"images/{NAME}-4.png", "textual_inversion_loss.csv",
    ]
    assert sorted(p.name for p in paths.embeddings_dir.iterdir()) == [f"{NAME}.pt", f"{NAME}.pt.optim"]
    copy = formats.read(log_dir / "embeddings" / f"{NAME}-2.pt")
    assert copy.step == 2  # exactly N steps in <name>-<N>.pt (no A1111 off-by-one)
    rows = (log_dir / "textual_inversion_loss.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate" and len(rows) == 5
    assert rows[1].split(",")[:3] == ["1", "0", "0"] and rows[1].split(",")[4] == "0.02"
    assert rows[4].split(",")[:3] == ["4", "0", "3"]  # 4 images at batch 1: 4 steps per epoch
    data = json.loads((log_dir / settings[0]).read_text(encoding="utf-8"))
    a1111_keys = {"datetime", "model_name", "model_hash", "num_of_dataset_images", "num_vectors_per_token",
                  "embedding_name", "learn_rate", "batch_size", "gradient_step", "data_root", "log_directory",
                  "training_width", "training_height", "steps", "clip_grad_mode", "clip_grad_value",
                  "latent_sampling_method", "create_image_every", "save_embedding_every",
                  "save_image_with_stored_embedding", "template_file", "initial_step"}
    assert a1111_keys <= set(data)
    assert data["num_of_dataset_images"] == 4 and data["embedding_name"] == NAME and data["steps"] == 4
    assert data["tinv_ui"]["config"]["flip"] is False and data["tinv_ui"]["seed"] == 1


def test_stop_event_interrupts_and_saves(studio, paths, images, emb_path):
    stop = __import__("threading").Event()
    events = []
    for e in train(studio, config(images, max_steps=10), EmbeddingLibrary(paths.embeddings_dir), paths, stop):
        events.append(e)
        if isinstance(e, Step) and e.step == 2:
            stop.set()
    assert [type(e) for e in events[-2:]] == [Saved, Finished]
    fin = events[-1]
    assert fin.interrupted and fin.step == 2
    assert fin.message == f"Training interrupted at step 2; saved to {emb_path}"
    assert formats.read(emb_path).step == 2


def test_closing_the_generator_saves_and_restores_the_model(studio, paths, images, emb_path):
    gen = train(studio, config(images, max_steps=10, gradient_checkpointing=True), EmbeddingLibrary(paths.embeddings_dir), paths)
    for e in gen:
        if isinstance(e, Step) and e.step == 3:
            assert studio.pipeline.unet.is_gradient_checkpointing
            break
    gen.close()
    assert formats.read(emb_path).step == 3
    assert formats.read_optim(emb_path, formats.read(emb_path)) is not None
    assert not studio.pipeline.unet.is_gradient_checkpointing
    assert studio.busy_with == ""


def test_resume_continues_from_the_saved_step_with_the_saved_optimizer_state(studio, paths, images, emb_path, monkeypatch):
    run(studio, paths, config(images, max_steps=3))
    saved = torch.load(formats.optim_path(emb_path), map_location="cpu")["optimizer_state_dict"]
    made = []

    def spy(plan, vectors):
        optimizer = make(plan, vectors)
        made.append({k: v.clone() for k, v in optimizer.state_dict()["state"].get(0, {}).items()})
        return optimizer

    make = training._make_optimizer
    monkeypatch.setattr(training, "_make_optimizer", spy)
    events = run(studio, paths, config(images, max_steps=5))
    assert events[0].initial_step == 3
    assert [e.step for e in events if isinstance(e, Step)] == [4, 5]
    assert torch.equal(made[0]["exp_avg"], saved["state"][0]["exp_avg"])
    assert torch.equal(made[0]["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])
    assert float(made[0]["step"]) == 3
    assert formats.read(emb_path).step == 5
    # vectors changed behind the sidecar's back: its checksum no longer matches, AdamW starts fresh
    emb = formats.read(emb_path)
    formats.write(emb.with_vectors(emb.vectors + 1), emb_path)
    made.clear()
    run(studio, paths, config(images, max_steps=6))
    assert made == [{}]


def test_nan_loss_stops_and_keeps_the_last_good_file(studio, paths, images, emb_path, monkeypatch):
    calls = {"n": 0}
    real = training.diffusion_loss

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    events = []
    with pytest.raises(TrainingError, match=r"stopped at step 3: the loss became nan.*after step 2.*learn_rate"):
        for e in train(studio, config(images, max_steps=6, save_every=2), EmbeddingLibrary(paths.embeddings_dir), paths):
            events.append(e)
    kept = formats.read(emb_path)
    copy = formats.read(next(e for e in events if isinstance(e, Started)).log_dir / "embeddings" / f"{NAME}-2.pt")
    assert kept.step == 2 and torch.equal(kept.vectors, copy.vectors)
    assert not any(isinstance(e, Finished) for e in events)
    assert not studio.busy_with


def test_huge_learning_rate_is_caught_before_the_file_is_damaged(studio, paths, images, emb_path):
    start = formats.read(emb_path)
    with pytest.raises(TrainingError, match="step 1: the update overflowed.*try 1e\\+37"):
        run(studio, paths, config(images, learn_rate="1e38"))
    kept = formats.read(emb_path)
    assert torch.equal(kept.vectors, start.vectors) and torch.isfinite(kept.vectors).all()


Case = namedtuple("Case", "kw error match")


@pytest.mark.parametrize(
    "case",
    [
        Case({"embedding": "nobody"}, TinvError, "'nobody' is not loaded"),
        Case({"template": "missing.txt"}, ConfigError, "was not found"),
        Case({"learn_rate": "0.1:1e3"}, ConfigError, "^learn_rate"),
        Case({"clip_grad_mode": "norm", "clip_grad_value": "x"}, ConfigError, "^clip_grad_value"),
        Case({"max_steps": 5, "_step": 5}, ConfigError, "already been trained for 5 steps"),
        Case({"filename_regex": "("}, ConfigError, "filename_regex"),
        Case({"_template_text": "a photo\n[name]"}, ConfigError, "no \\[name\\] in 1 of 2 lines"),
        Case({"_template_text": "a [name]s"}, ConfigError, "is not recognised"),
        Case({"_empty_dataset": True}, DatasetError, "no usable image"),
        Case({"_wide": True}, ShapeMismatchError, "expected vectors of width 32, actual 768"),
        Case({"_no_disk": True}, TrainingError, "not enough disk space"),
    ],
    ids=lambda c: c.match[:30],
)
def test_preflight_errors_come_before_any_work(studio, paths, images, emb_path, tmp_path, monkeypatch, case):
    kw = {k: v for k, v in case.kw.items() if not k.startswith("_")}
    if "_step" in case.kw:
        formats.write(formats.read(emb_path).with_vectors(formats.read(emb_path).vectors, step=case.kw["_step"]), emb_path)
    if "_template_text" in case.kw:
        (tmp_path / "t.txt").write_text(case.kw["_template_text"], encoding="utf-8")
        kw["template"] = str(tmp_path / "t.txt")
    if "_empty_dataset" in case.kw:
        (tmp_path / "empty").mkdir()
        kw["dataset_dir"] = str(tmp_path / "empty")
    if "_wide" in case.kw:
        emb_path.unlink()
        formats.write(Embedding(NAME, torch.zeros(1, 768)), emb_path)
    if "_no_disk" in case.kw:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(case.error, match=case.match):
        run(studio, paths, config(images, **kw))
    assert not (paths.outputs_dir / "train").exists()  # nothing was written: the checks ran first
    assert not studio.busy_with


def test_feature_mix_runs_keep_size_buckets_flip_alpha_random_latents_clipping(studio, paths, tmp_path, emb_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    write_images(folder, 2, size=64, captions=True)
    img = Image.new("RGBA", (96, 64), (200, 10, 10, 0))
    img.paste((10, 200, 10, 255), (0, 0, 48, 64))
    img.save(folder / "wide.png")
    img.save(folder / "wide2.png")
    cfg = config(folder, max_steps=3, keep_size=True, flip=True, use_alpha_weight=True, latent_sampling="random",
                 batch_size=2, gradient_accumulation=2, clip_grad_mode="norm", clip_grad_value="0.5:2, 0.1",
                 shuffle_tags=True, tag_dropout=0.3, learn_rate="0.01:2, 0.001", template="style_filewords")
    events = run(studio, paths, cfg)
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.lr for s in steps] == [0.01, 0.01, 0.001]
    assert "2 size buckets" in events[0].message
    assert events[-1].step == 3 and torch.isfinite(formats.read(emb_path).vectors).all()


@pytest.mark.parametrize("flip, alpha", [(True, True), (False, False)])
def test_batches_really_use_flips_and_alpha_weights(studio, paths, tmp_path, emb_path, monkeypatch, flip, alpha):
    from PIL import Image

    from tinv_ui.dataset import LatentCache

    for i in range(2):
        img = Image.new("RGBA", (64, 64), (i * 100, 50, 50, 0))
        img.paste((200, 200, 0, 255), (0, 0, 32, 64))
        img.save(tmp_path / f"{i}.png")
    flips, weights, real_batch, real_loss = [], [], LatentCache.batch, training.diffusion_loss

    def batch(self, indices, flipped, generator=None):
        flips.extend(flipped)
        return real_batch(self, indices, flipped, generator)

    def loss(unet, scheduler, latents, cond, w=None, *a, **kw):
        weights.append(w)
        return real_loss(unet, scheduler, latents, cond, w, *a, **kw)

    monkeypatch.setattr(LatentCache, "batch", batch)
    monkeypatch.setattr(training, "diffusion_loss", loss)
    run(studio, paths, config(tmp_path, max_steps=12, flip=flip, use_alpha_weight=alpha, template="subject"))
    assert len(flips) == 12
    assert set(flips) == ({True, False} if flip else {False})  # p = 0.5: both sides show up in 12 draws
    if alpha:
        assert all(w.shape == (1, 1, 8, 8) and w[0, 0, :, :4].min() > 0 and w[0, 0, :, 4:].max() == 0
                   or w[0, 0, :, 4:].min() > 0 and w[0, 0, :, :4].max() == 0 for w in weights)  # mirrored or not
    else:
        assert weights == [None] * 12


def test_vae_offload_plumbing_moves_nothing_permanent(studio, paths, images, emb_path):
    """The CUDA-only VAE offload, forced on CPU: the hook installs, previews still render, and it is removed."""
    vae = studio.pipeline.vae
    with training.offloaded_vae(studio, force=True) as hook:
        assert hook is not None and hasattr(vae, "_hf_hook")
        from tinv_ui import generation
        from tinv_ui.config import GenerateConfig

        with studio.session():
            out = generation.render(studio, GenerateConfig(prompt="x", steps=1, width=64, height=64, seed=1), {})
        assert out[0].image.size == (64, 64)
    assert not hasattr(vae, "_hf_hook") and next(vae.parameters()).device == studio.device


def test_vae_offload_is_wanted_only_on_a_short_cuda_device(monkeypatch):
    gib = 2**30
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 24 * gib))
    assert not training.vae_offload_wanted(torch.device("cpu"))  # never on the CPU
    free["bytes"] = 2 * gib
    assert training.vae_offload_wanted(torch.device("cuda:0"))
    free["bytes"] = 8 * gib
    assert not training.vae_offload_wanted(torch.device("cuda:0"))
    assert training.VAE_OFFLOAD_BELOW_FREE_BYTES == 3 * gib


def test_gradient_checkpointing_recomputes_but_trains_the_same(studio, paths, images, monkeypatch):
    import torch.utils.checkpoint as checkpoint_module

    calls, real = [], checkpoint_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "checkpoint", counting)
    results = {}
    for on in (False, True):
        calls.clear()
        path = make_embedding(studio, paths, overwrite=True)
        losses = [e.loss for e in run(studio, paths, config(images, max_steps=2, gradient_checkpointing=on))
                  if isinstance(e, Step)]
        results[on] = (losses, formats.read(path).vectors, len(calls))
    assert results[False][2] == 0 and results[True][2] > 0  # the UNet blocks really were checkpointed
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)


def test_single_process_accelerator_path(studio, paths, images, emb_path):
    """`accelerate launch` runs use one Accelerator; with one process the same loop runs (multi-GPU not testable here)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    try:
        events = list(train(studio, config(images, max_steps=2), EmbeddingLibrary(paths.embeddings_dir), paths,
                            accelerator=acc))
    finally:
        AcceleratorState._reset_state(True)
    assert events[-1].step == 2 and formats.read(emb_path).step == 2
    assert training.distributed_accelerator() is None  # WORLD_SIZE unset: plain loop, no Accelerator


def test_trained_file_loads_in_a_fresh_diffusers_pipeline(studio, paths, images, emb_path, cache_dir):
    from diffusers import StableDiffusionPipeline

    from tinv_ui.tiny_model import tiny_model_dir

    initial = paths.embeddings_dir.parent / "initial.pt"
    shutil.copy(emb_path, initial)
    run(studio, paths, config(images, max_steps=3, learn_rate="0.05"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir(cache_dir), local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(emb_path), token="<trained>")
    pipe.load_textual_inversion(str(initial), token="<initial>")
    tok, te = pipe.tokenizer, pipe.text_encoder
    trained = formats.read(emb_path).vectors
    ids = tok.convert_tokens_to_ids(["<trained>", "<trained>_1"])
    assert torch.equal(te.get_input_embeddings().weight[ids].detach(), trained)

    def encode(prompt):
        with torch.no_grad():
            return te(tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]

    a, b = encode("a photo of <trained>"), encode("a photo of <initial>")
    assert not torch.allclose(a, b)  # the trained vectors change the text encoder's output


def test_a_model_switch_between_steps_stops_the_run_and_saves(paths, images, cache_dir):
    from tinv_ui.config import ModelSpec
    from tinv_ui.studio import Studio

    own = Studio(paths)  # not the shared studio: this test reloads the model
    own.load(ModelSpec("tiny"))
    path = create_embedding(own, CreateConfig(name=NAME, num_vectors=1), paths.embeddings_dir)
    with pytest.raises(TrainingError, match="model was changed during training.*stopped at step 2"):
        for e in train(own, config(images, max_steps=10), EmbeddingLibrary(paths.embeddings_dir), paths):
            if isinstance(e, Step) and e.step == 2:
                own.load(ModelSpec("tiny"))  # what the model picker does between two steps
    assert formats.read(path).step == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_mode, checkpointing", [("off", False), ("on", False), ("off", True)])
def test_cuda_half_precision_training(paths, images, compile_mode, checkpointing):
    """bf16/fp16 autocast, channels_last, optional torch.compile and checkpointing on a real GPU."""
    from tinv_ui.config import ModelSpec
    from tinv_ui.studio import Studio

    own = Studio(paths)
    own.load(ModelSpec("tiny", device="cuda"))
    path = create_embedding(own, CreateConfig(name=NAME, num_vectors=2), paths.embeddings_dir)
    unet_before = state_of(own.pipeline.unet)
    events = run(own, paths, config(images, max_steps=6, preview_every=3, batch_size=2, compile=compile_mode,
                                    gradient_checkpointing=checkpointing, latent_sampling="random", flip=True))
    assert events[-1].step == 6 and not events[-1].interrupted
    assert all(torch.equal(v, unet_before[k]) for k, v in state_of(own.pipeline.unet).items())
    assert own.pipeline.unet.conv_in.weight.is_contiguous()  # channels_last undone
    assert torch.isfinite(formats.read(path).vectors).all()


@pytest.mark.slow
def test_compiled_unet_gives_the_same_losses(studio, paths, images, emb_path):
    """compile=on (torch.compile of the UNet, inductor on CPU here) trains like eager."""
    eager = [e.loss for e in run(studio, paths, config(images, max_steps=2, learn_rate="0")) if isinstance(e, Step)]
    # same seed, vectors unchanged (lr 0), no saved data order read back (a resume would continue it): steps 3-4
    # of the second run draw what steps 1-2 drew
    compiled = [e.loss for e in run(studio, paths, config(images, max_steps=4, learn_rate="0", compile="on",
                                                          save_optimizer_state=False)) if isinstance(e, Step)]
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_clipping_sees_the_unscaled_gradients_under_a_grad_scaler(studio, paths, images, emb_path, monkeypatch):
    # fp16 runs scale the loss; the clip threshold must apply to the true gradients (A1111 clipped scaled ones).
    # Force an enabled scaler on the CPU and compare what the clip sees with an unscaled run of the same seed.
    seen, real_clip, real_scaler = [], training._clip_gradients, torch.amp.GradScaler

    def recording_clip(vectors, mode, value):
        seen.append(vectors.grad.detach().clone())
        real_clip(vectors, mode, value)

    monkeypatch.setattr(training, "_clip_gradients", recording_clip)
    cfg = config(images, max_steps=2, clip_grad_mode="norm", clip_grad_value="1e-4")
    plain = [e.loss for e in run(studio, paths, cfg) if isinstance(e, Step)]
    plain_grads, seen[:] = list(seen), []
    make_embedding(studio, paths, overwrite=True)
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device, enabled=True: real_scaler(device, init_scale=2.0**12, enabled=True))
    scaled = [e.loss for e in run(studio, paths, cfg) if isinstance(e, Step)]
    assert len(seen) == len(plain_grads) == 2
    for got, want in zip(seen, plain_grads):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert scaled == pytest.approx(plain, rel=1e-4)  # and the scaled run trained the same


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_a_v_prediction_model_trains_on_velocity_and_sample_models_are_refused(
        studio, paths, images, emb_path, monkeypatch, prediction_type):
    # SD 2.x 768 models predict v: the trainer must take the target from the model's scheduler config.
    from diffusers import DDPMScheduler

    original = studio.pipeline.scheduler
    monkeypatch.setattr(studio.pipeline, "scheduler",
                        DDPMScheduler.from_config(original.config, prediction_type=prediction_type))
    kinds, real = [], training.diffusion_loss

    def spy(unet, scheduler, *args, **kwargs):
        kinds.append(scheduler.config.prediction_type)
        return real(unet, scheduler, *args, **kwargs)

    monkeypatch.setattr(training, "diffusion_loss", spy)
    if prediction_type == "sample":
        with pytest.raises(TrainingError, match="the model predicts 'sample'; only epsilon and v_prediction"):
            run(studio, paths, config(images, max_steps=2))
        assert kinds == [] and formats.read(emb_path).step == 0
        return
    events = run(studio, paths, config(images, max_steps=2))
    assert kinds == ["v_prediction"] * 2
    assert events[-1].step == 2 and torch.isfinite(formats.read(emb_path).vectors).all()
