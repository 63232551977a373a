"""The compiled training path keeps static shapes (a caption over 75 tokens does not change the UNet's input),
and its previews draw with the studio's compiled UNet through one pipeline per run."""

import diffusers
import pytest
import torch
from conftest import write_images

from tinv_ui import generation, train_speed
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.events import Preview, Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train


class _ShapeRecorder(torch.nn.Module):
    """Stands in for `torch.compile(unet)`: calls the UNet and records the conditioning shapes it receives."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.cond_shapes: list[tuple[int, ...]] = []

    def __getattr__(self, name):  # like torch.compile's wrapper: config, dtype… are the UNet's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        self.cond_shapes.append(tuple(encoder_hidden_states.shape))
        return self.unet(sample, timestep, encoder_hidden_states, *args, **kwargs)


def test_compiled_training_pads_every_batch_to_the_longest_prompt(studio, paths, tmp_path, monkeypatch):
    images = tmp_path / "dataset"
    write_images(images, n=3, captions=True)
    (images / "000-a red thing number 0.txt").write_text("word " * 90, encoding="utf-8")  # two chunks
    create_embedding(studio, CreateConfig(name="chunkemb", initializer="painting", num_vectors=1), paths.embeddings_dir)
    recorders = []
    monkeypatch.setattr(train_speed.torch, "compile",
                        lambda unet, **kw: recorders.append(_ShapeRecorder(unet)) or recorders[-1])
    cfg = TrainConfig(embedding="chunkemb", dataset_dir=str(images), template="subject_filewords", max_steps=6,
                      width=64, height=64, learn_rate="0.01", save_every=0, preview_every=0, seed=3,
                      compile="on")
    events = list(train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    assert sum(isinstance(e, Step) for e in events) == 6
    (recorder,) = recorders
    assert len(recorder.cond_shapes) == 6  # each image twice (batch 1, 3 images): the long caption included
    assert set(recorder.cond_shapes) == {(1, 154, studio.embedding_width)}  # short captions padded to 2 chunks


@pytest.fixture
def counted_pipelines(studio, monkeypatch):
    """Count the sampling pipelines and schedulers built, and stand a recorder in for `torch.compile`."""
    built = {"pipelines": 0, "schedulers": 0}
    real_pipeline, real_scheduler = diffusers.StableDiffusionPipeline, generation.make_scheduler

    def counted_pipeline(*args, **kwargs):  # diffusers reads a subclass's __init__ signature: wrap, not subclass
        built["pipelines"] += 1
        return real_pipeline(*args, **kwargs)

    def counted_scheduler(*args, **kwargs):
        built["schedulers"] += 1
        return real_scheduler(*args, **kwargs)

    recorders = []
    monkeypatch.setattr(diffusers, "StableDiffusionPipeline", counted_pipeline)
    monkeypatch.setattr(generation, "make_scheduler", counted_scheduler)
    monkeypatch.setattr(train_speed.torch, "compile",
                        lambda unet, **kw: recorders.append(_ShapeRecorder(unet)) or recorders[-1])
    yield built, recorders
    studio._compiled_unet = None  # the session studio is shared: leave it as found


@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_previews_build_one_pipeline_per_run_and_a_compiled_run_draws_with_the_compiled_unet(
        studio, paths, images, counted_pipelines, compile_mode):
    built, recorders = counted_pipelines
    create_embedding(studio, CreateConfig(name="previewemb", initializer="painting", num_vectors=1),
                     paths.embeddings_dir)
    cfg = TrainConfig(embedding="previewemb", dataset_dir=str(images), template="subject", max_steps=4, width=64,
                      height=64, learn_rate="0.01", save_every=0, preview_every=2, preview_steps=2, seed=3,
                      save_optimizer_state=False, compile=compile_mode)
    events = list(train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [2, 4] and all(p.paths[0].is_file() for p in previews)
    assert built == {"pipelines": 1, "schedulers": 1}  # two previews, one pipeline and scheduler
    if compile_mode == "off":
        assert recorders == []  # previews draw with the eager UNet, as before
        return
    trainer_unet, preview_unet = recorders  # the trainer's torch.compile, then the studio's for generation
    assert studio._compiled_unet is preview_unet and preview_unet.unet is studio.pipeline.unet
    assert len(trainer_unet.cond_shapes) == 4  # one micro-batch per step; no preview went through it
    # each preview: 2 denoising steps, prompt and negative prompt in one batch of 2
    assert preview_unet.cond_shapes == [(2, 77, studio.embedding_width)] * 4
