"""The compiled training path keeps static shapes: a caption over 75 tokens does not change the UNet's input."""

import torch
from conftest import write_images

from tinv_ui import train_speed
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.events import Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train


class _ShapeRecorder(torch.nn.Module):
    """Stands in for `torch.compile(unet)`: calls the UNet and records the conditioning shapes it receives."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.cond_shapes: list[tuple[int, ...]] = []

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
