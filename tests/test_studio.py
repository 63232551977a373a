"""The model holder: a failed load keeps the previous model, a switch releases the old one, the lock."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from tinv_ui.config import ModelSpec
from tinv_ui.errors import BusyError, ModelLoadError
from tinv_ui.studio import Studio


@pytest.fixture
def own_studio(paths, cache_dir):
    """A studio of this test's own (the session `studio` fixture is shared and must stay loaded)."""
    studio = Studio(paths)
    studio.load(ModelSpec("tiny"))
    return studio


def test_a_failed_load_keeps_the_previous_model(own_studio, paths):
    (paths.models_dir / "broken.safetensors").write_bytes(b"\x00" * 100)
    (paths.models_dir / "not-a-model").mkdir()
    unet = own_studio.pipeline.unet
    for source in ("broken.safetensors", str(paths.models_dir / "not-a-model"), "no/such/thing/here"):
        with pytest.raises(ModelLoadError):
            own_studio.load(ModelSpec(source))
        assert own_studio.loaded and own_studio.pipeline.unet is unet
        assert own_studio.info.is_tiny and own_studio.spec.is_tiny
    assert not own_studio.busy_with  # the lock was given back each time


def test_switching_models_releases_the_old_one(own_studio):
    old = weakref.ref(own_studio.pipeline.unet)
    own_studio.load(ModelSpec("tiny"))
    gc.collect()
    assert old() is None, "the previous UNet is still referenced after a switch"
    assert own_studio.loaded


def test_the_lock_names_its_holder_and_times_out(own_studio):
    inside, release = threading.Event(), threading.Event()

    def hold():
        with own_studio.session(what="training x (step 3/10)"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(10)
        assert own_studio.busy_with == "training x (step 3/10)"
        with pytest.raises(BusyError, match=r"training x \(step 3/10\)"):
            with own_studio.session(timeout=0.05):
                pass
    finally:
        release.set()
        t.join()
    with own_studio.session(timeout=1):
        assert own_studio.busy_with == ""  # holder text is only kept for named sessions


def test_a_hub_id_is_fetched_through_diffusers_and_labelled_with_the_id(own_studio, paths, monkeypatch):
    # No network in tests: diffusers' from_pretrained is replaced, and must be asked for the id as given,
    # without local_files_only (a hub id is the one source that may download).
    from diffusers import StableDiffusionPipeline

    from tinv_ui.tiny_model import tiny_model_dir

    calls, real = [], StableDiffusionPipeline.from_pretrained.__func__

    def fake(cls, source, **kw):
        calls.append((source, kw))
        if source == "someone/offline-model":
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(cls, tiny_model_dir(paths.cache_dir), local_files_only=True, safety_checker=None)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(fake))
    info = own_studio.load(ModelSpec("someone/sd-model"))
    assert calls == [("someone/sd-model", {"safety_checker": None, "requires_safety_checker": False})]
    assert (info.label, info.name, info.hash, info.is_tiny) == ("someone/sd-model", "sd-model", None, False)
    assert own_studio.info is info and own_studio.loaded
    with pytest.raises(ModelLoadError, match="Could not load model 'someone/offline-model': We couldn't connect"):
        own_studio.load(ModelSpec("someone/offline-model"))
    assert own_studio.info is info  # the failed fetch kept the loaded model


@pytest.mark.parametrize(
    ("spec", "cuda", "bf16", "want"),
    [
        (ModelSpec("tiny"), False, False, ("cpu", "float32")),
        (ModelSpec("tiny"), True, True, ("cuda", "bfloat16")),
        (ModelSpec("tiny"), True, False, ("cuda", "float16")),
        (ModelSpec("tiny", device="cpu"), True, True, ("cpu", "float32")),
        (ModelSpec("tiny", dtype="float16"), False, False, ("cpu", "float16")),
    ],
)
def test_pick_device_dtype(monkeypatch, spec, cuda, bf16, want):
    import torch

    from tinv_ui.studio import pick_device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    device, dtype = pick_device_dtype(spec)
    assert (device.type, dtype) == (want[0], getattr(torch, want[1]))


def test_an_unknown_dtype_is_refused_with_the_choices():
    from tinv_ui.studio import pick_device_dtype

    with pytest.raises(ModelLoadError, match="dtype 'float8' is unknown; use float16, bfloat16 or float32"):
        pick_device_dtype(ModelSpec("tiny", dtype="float8"))
