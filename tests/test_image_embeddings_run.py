"""A1111's "Save images with embedding in PNG chunks" for a run: `image_embeddings/<name>-<N>.png` beside the
previews, holding the preview picture and the embedding at step N (text chunk and pixels), written atomically."""

from __future__ import annotations

import base64
import errno
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinv_ui import formats, image_embedding
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.errors import TrainingError
from tinv_ui.events import Started
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train

NAME = "imgemb"


@pytest.fixture
def emb_path(studio, paths):
    return create_embedding(studio, CreateConfig(name=NAME, initializer="painting", num_vectors=2), paths.embeddings_dir)


def config(images, **kw) -> TrainConfig:
    base = dict(embedding=NAME, dataset_dir=str(images), template="subject_filewords", max_steps=4, width=64,
                height=64, learn_rate="0.02", save_every=2, preview_every=2, preview_steps=2, seed=1,
                write_csv_every=0, save_image_with_stored_embedding=True)
    return TrainConfig(**{**base, **kw})


def run(studio, paths, cfg) -> Path:
    events = list(train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    return next(e for e in events if isinstance(e, Started)).log_dir


def settings_of(log_dir: Path) -> dict:
    (path,) = log_dir.glob("settings-*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def test_each_preview_step_writes_the_preview_with_the_embedding_of_that_step(studio, paths, images, emb_path):
    log_dir = run(studio, paths, config(images))
    assert sorted(p.name for p in (log_dir / "image_embeddings").iterdir()) == [f"{NAME}-2.png", f"{NAME}-4.png"]
    for step in (2, 4):
        png = log_dir / "image_embeddings" / f"{NAME}-{step}.png"
        copy = formats.read(log_dir / "embeddings" / f"{NAME}-{step}.pt")
        # our library loads it: the vectors of the step-N copy, bit for bit, under A1111's name <name>-<N>
        loaded = formats.read(png)
        assert loaded.meta["format"] == "image-text" and loaded.name == f"{NAME}-{step}" and loaded.step == step
        assert loaded.vectors.dtype == copy.vectors.dtype and loaded.vectors.equal(copy.vectors)
        # what A1111 reads first: the sd-ti-embedding chunk, base64 JSON of its .pt dict
        with Image.open(png) as img:
            chunk = json.loads(base64.b64decode(img.text[image_embedding.TEXT_KEY]))
            pixels = np.asarray(img.convert("RGB"))
        assert chunk["name"] == f"{NAME}-{step}" and chunk["step"] == step
        assert np.array_equal(np.asarray(chunk["string_to_param"]["*"]["TORCHTENSOR"], np.float32), copy.vectors.numpy())
        # ... and when the chunk is gone (a tool stripped it), the pixels carry the same data
        by_pixels = image_embedding.extract_data(Image.fromarray(pixels))
        assert by_pixels["name"] == f"{NAME}-{step}"
        assert by_pixels["string_to_param"]["*"].float().equal(copy.vectors)
        # the picture in the middle is the preview of that step
        with Image.open(log_dir / "images" / f"{NAME}-{step}.png") as preview:
            shown = np.asarray(preview.convert("RGB"))
        block = (pixels.shape[1] - shown.shape[1] - 2) // 2
        assert np.array_equal(pixels[:, block + 1 : block + 1 + shown.shape[1]], shown)
    assert settings_of(log_dir)["save_image_with_stored_embedding"] is True


def test_off_by_default_no_folder_and_the_settings_say_false(studio, paths, images, emb_path):
    cfg = config(images, max_steps=2)
    off = TrainConfig(**{**cfg.__dict__, "save_image_with_stored_embedding": TrainConfig.__dataclass_fields__[
        "save_image_with_stored_embedding"].default})
    log_dir = run(studio, paths, off)
    assert (log_dir / "images" / f"{NAME}-2.png").is_file()
    assert not (log_dir / "image_embeddings").exists()
    assert settings_of(log_dir)["save_image_with_stored_embedding"] is False


def test_a_full_disk_while_writing_it_ends_the_run_with_the_message_and_no_half_file(studio, paths, images, emb_path,
                                                                                     monkeypatch):
    real = image_embedding.save_embedding_image

    def dies_halfway(dest, data, image, suffix):
        real(dest, data, image, suffix)
        Path(dest).write_bytes(Path(dest).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image_embedding, "save_embedding_image", dies_halfway)
    with pytest.raises(TrainingError, match=rf"^the disk is full while writing .*image_embeddings/{NAME}-2\.png; "
                                            r"free some space and resume\.$"):
        run(studio, paths, config(images))
    (log_dir,) = (paths.outputs_dir / "train").glob(f"*/{NAME}")
    assert list((log_dir / "image_embeddings").iterdir()) == []  # no half file, no temp file
