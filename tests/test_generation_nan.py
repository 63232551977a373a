"""A generation whose decoded image is NaN says so instead of saving a black PNG (issue 12)."""

from __future__ import annotations

import pytest

from tinv_ui import generation
from tinv_ui.config import GenerateConfig
from tinv_ui.errors import TinvError
from tinv_ui.events import Generated
from tinv_ui.library import EmbeddingLibrary


def test_a_nan_image_is_an_error_and_nothing_is_saved(studio, paths, monkeypatch):
    vae = studio.pipeline.vae
    real_decode = vae.decode

    def nan_decode(latents, *args, **kwargs):  # what an fp16 VAE that overflows returns
        out = real_decode(latents, *args, **kwargs)
        (out[0] if isinstance(out, tuple) else out.sample).fill_(float("nan"))
        return out

    monkeypatch.setattr(vae, "decode", nan_decode)
    cfg = GenerateConfig(prompt="a cat", steps=2, width=64, height=64, seed=7, save=True)
    with pytest.raises(TinvError, match="seed 7 came out of the VAE as NaN"):
        list(generation.generate(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    assert list(paths.outputs_dir.rglob("*.png")) == []
    monkeypatch.undo()
    events = list(generation.generate(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))  # and a sound VAE still saves
    assert isinstance(events[-1], Generated) and len(list(paths.outputs_dir.rglob("*.png"))) == 1
