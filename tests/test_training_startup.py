"""Training start-up: the first step does not wait for the whole folder's latents."""

from conftest import write_images

from tinv_ui import dataset
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.events import Started, Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train


def test_images_are_encoded_as_batches_first_use_them(studio, paths, tmp_path, monkeypatch):
    images = tmp_path / "dataset"
    write_images(images, n=6)
    create_embedding(studio, CreateConfig(name="lazyemb", initializer="painting", num_vectors=1), paths.embeddings_dir)
    monkeypatch.setattr(dataset, "ENCODE_BATCH_IMAGES_CPU", 2)  # 3 groups of 2 images
    vae = studio.pipeline.vae
    encoded = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: encoded.append(x.shape[0]) or encode(x, *a, **k))
    cfg = TrainConfig(embedding="lazyemb", dataset_dir=str(images), template="subject", max_steps=6, width=64,
                      height=64, learn_rate="0.01", save_every=0, preview_every=0, seed=2)
    at_event = []
    for event in train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths):
        if isinstance(event, (Started, Step)):
            at_event.append(len(encoded))
    assert at_event[0] == 0  # Started: no image encoded yet
    assert at_event[1] == 1  # the first step (batch 1) encoded its image's group only
    assert at_event[-1] == 3 and encoded == [2, 2, 2]  # one epoch later every group once, never twice
