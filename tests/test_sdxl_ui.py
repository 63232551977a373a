"""The app on the tiny SDXL model, over HTTP (gradio_client): Create makes a pair, Generate uses it at the model's
size with its TI hash, Train trains the pair and shows its previews."""

from __future__ import annotations

import pytest
from safetensors import safe_open
from test_ui import generate_kwargs, serving

from tinv_ui.tiny_model import TINY_SDXL_RESOLUTION


@pytest.fixture
def served_sdxl(sdxl_studio, paths, tmp_path, monkeypatch):
    with serving(sdxl_studio, paths, tmp_path, monkeypatch) as (client, library, runner):
        yield client, library, paths, runner


def _defaults(client, endpoint):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"][endpoint]["parameters"]
    return {p["parameter_name"]: p["parameter_default"] for p in api}


def test_sdxl_create_generate_and_train_over_http(served_sdxl, images):
    client, library, paths, runner = served_sdxl
    create = _defaults(client, "/create_embedding")
    assert create["file_format"] == "auto"
    status = client.predict(**{**create, "name": "xlweb", "initializer": "gold", "num_vectors": 2},
                            api_name="/create_embedding")
    assert status.startswith("Created: ") and status.endswith("xlweb.safetensors")
    with safe_open(str(paths.embeddings_dir / "xlweb.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]

    generate = _defaults(client, "/generate")
    assert (generate["width"], generate["height"]) == (TINY_SDXL_RESOLUTION, TINY_SDXL_RESOLUTION)
    size = TINY_SDXL_RESOLUTION
    progress, gallery, infotext, _ = client.predict(
        **generate_kwargs("a photo of xlweb", width=size, height=size, save=False), api_name="/generate")
    assert len(gallery) == 1 and f"Size: {size}x{size}" in infotext
    assert f'TI hashes: "xlweb: {library.get("xlweb").shorthash}"' in infotext

    train = {**_defaults(client, "/start_training"), "embedding": "xlweb", "dataset_dir": str(images), "max_steps": 2,
             "preview_every": 2, "preview_steps": 2, "save_every": 0}
    assert train["width"] == TINY_SDXL_RESOLUTION
    assert client.predict(**train, api_name="/start_training") == "Training xlweb started."
    runner.current.wait(120)
    snap = runner.current.snapshot()
    assert snap.status.value == "finished", snap.message
    assert snap.step == 2 and len(snap.previews) == 1
    with safe_open(str(paths.embeddings_dir / "xlweb.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata()["step"] == "2"
