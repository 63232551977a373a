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
