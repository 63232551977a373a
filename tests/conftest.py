"""Shared fixtures. Every test is offline and runs on CPU on the built-in tiny model.

Tiers:
- default: `python -m pytest` runs everything not marked `slow` or `gpu`, browser tests included: without
  /usr/bin/chromium they fail, unless `TINV_SKIP_BROWSER=1` opts out (then they skip, and the summary says so);
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


_skipped_browser_tests: list[str] = []


def pytest_runtest_setup(item):
    """A browser test without chromium fails (a green run must have driven the UI), unless opted out."""
    if item.get_closest_marker("browser") is None:
        return
    from browser_app import SKIP_ENV, browser_missing, browser_opt_out

    missing = browser_missing()
    if not missing:
        return
    if browser_opt_out():
        _skipped_browser_tests.append(item.nodeid)
        pytest.skip(f"{missing}; skipped because {SKIP_ENV}=1")
    pytest.fail(f"browser test, but {missing}. Install it, or set {SKIP_ENV}=1 to skip the browser tests "
                "(the run then reports that no UI test ran).", pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _skipped_browser_tests:
        from browser_app import SKIP_ENV

        terminalreporter.write_sep("=", "browser tests skipped", yellow=True)
        terminalreporter.write_line(f"{len(_skipped_browser_tests)} browser test(s) did NOT run: {SKIP_ENV}=1 is set "
                                    "and chromium is missing. The UI was not tested.", yellow=True)


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


def blocked_in_session(thread) -> bool:
    """True while `thread` waits in `Studio.session` for the lock (its innermost Python frame is that method).

    Lets a test hold the lock and know, without a timing window, that another thread is waiting for it.
    """
    import sys

    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_name == "session" and frame.f_code.co_filename.endswith("studio.py")


def wait_until(condition, what: str, limit: float = 60.0) -> None:
    """Poll `condition` every 10 ms; fail naming `what` after `limit` seconds."""
    import threading

    pause = threading.Event()
    for _ in range(int(limit * 100)):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.fixture(scope="session")
def sdxl_studio(cache_dir):
    """A Studio with the tiny SDXL model loaded, shared by the session. Tests must leave it as they found it."""
    from tinv_ui.studio import Studio
    from tinv_ui.tiny_model import TINY_SDXL

    s = Studio(Paths(cache_dir=cache_dir))
    s.load(ModelSpec(TINY_SDXL))
    return s
