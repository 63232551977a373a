"""Shared fixtures. Every test is offline and runs on CPU on the built-in tiny model.

Tiers:
- default: `python -m pytest` runs everything not marked `slow` or `gpu` (browser tests included);
- `python -m pytest -m slow`: longer runs; `python -m pytest -m gpu`: needs CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path

import pytest

from tinv_ui.config import ModelSpec, Paths


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (tokenizer + tiny model) for the whole session; built once, about 5 s."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def paths(tmp_path, cache_dir) -> Paths:
    """Fresh embeddings/outputs/models folders per test, sharing the session cache."""
    p = Paths(tmp_path / "embeddings", tmp_path / "outputs", tmp_path / "models", cache_dir)
    for d in (p.embeddings_dir, p.outputs_dir, p.models_dir):
        d.mkdir(parents=True)
    return p


@pytest.fixture(scope="session")
def studio(cache_dir):
    """A Studio with the tiny model loaded, shared by the session. Tests must leave it as they found it."""
    from tinv_ui.studio import Studio

    s = Studio(Paths(cache_dir=cache_dir))
    s.load(ModelSpec("tiny"))
    return s


def write_images(folder: Path, n: int = 4, size: int = 64, captions: bool = False) -> list[Path]:
    """Write `n` small gradient PNGs (distinct colours) to `folder`; optional .txt captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size))
        img.putdata([((x * 4 + i * 60) % 256, (y * 4) % 256, (i * 90) % 256) for y in range(size) for x in range(size)])
        path = folder / f"{i:03d}-a red thing number {i}.png"
        img.save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"caption {i}, tag a, tag b", encoding="utf-8")
        out.append(path)
    return out


@pytest.fixture
def images(tmp_path) -> Path:
    """A dataset folder with 4 small PNGs."""
    folder = tmp_path / "dataset"
    write_images(folder)
    return folder


@pytest.fixture(scope="session")
def sdxl_studio(cache_dir):
    """A Studio with the tiny SDXL model loaded, shared by the session. Tests must leave it as they found it."""
    from tinv_ui.studio import Studio
    from tinv_ui.tiny_model import TINY_SDXL

    s = Studio(Paths(cache_dir=cache_dir))
    s.load(ModelSpec(TINY_SDXL))
    return s
