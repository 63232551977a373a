"""Helpers for the browser tests: start `python app.py` in a subprocess, drive Gradio widgets with Playwright.

Debian's chromium is driven headless by Playwright (`executable_path=/usr/bin/chromium`), with flags that
keep it off the network (no background networking, sync, component updates or QUIC). Tests using these
helpers are marked `browser`; without chromium they FAIL (tests/conftest.py `pytest_runtest_setup`), unless
the person opts out with `TINV_SKIP_BROWSER=1`, which the pytest summary then reports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("TINV_CHROMIUM", "/usr/bin/chromium"))  # another path: TINV_CHROMIUM=PATH
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
REPO = Path(__file__).resolve().parents[1]

SKIP_ENV = "TINV_SKIP_BROWSER"  # set to 1 to skip (not fail) the browser tests on a machine without chromium

browser_marks = [pytest.mark.browser]


def browser_missing() -> str:
    """Why the browser tests cannot run here ('' when they can)."""
    return "" if CHROMIUM.exists() else f"{CHROMIUM} is missing (apt-get install chromium)"


def browser_opt_out() -> bool:
    return os.environ.get(SKIP_ENV) == "1"


@dataclass
class App:
    """A running `python app.py`: its URL, working folder, data folders and log."""

    url: str
    cwd: Path
    dirs: dict[str, Path]
    log: Path
    proc: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app.py did not answer on {url}:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_app(cwd: Path, cache_dir: Path, *extra: str, allow_dir: Path | None = None) -> Iterator[App]:
    """`python app.py` on a free port with folders under `cwd` (relative, as a user would have them).

    `allow_dir` (default: `cwd`'s parent, where the tests write datasets and templates) is allowed with
    --allow-dir, as a user would allow their own data folder.
    """
    port = free_port()
    dirs = {k: cwd / k for k in ("embeddings", "outputs", "models")}
    log = cwd / "app.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(cwd / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--model", "tiny", "--embeddings-dir", "embeddings",
           "--outputs-dir", "outputs", "--models-dir", "models", "--cache-dir", str(cache_dir),
           "--allow-dir", str(allow_dir or cwd.parent), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, proc, log)
        yield App(url, cwd, dirs, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Debian chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url, wait_until="load")
    return page


def shoot(page, tmp_path: Path, name: str) -> None:
    """A full-page screenshot in tmp_path, and in docs/screenshots/ when TINV_SCREENSHOTS=1 (for the README)."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("TINV_SCREENSHOTS") == "1":
        dest = REPO / "docs" / "screenshots"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / f"{name}.png")


def field(page, elem_id: str):
    """The text/number input inside a Gradio component with this elem_id."""
    return page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input:not([type])").first


def set_value(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")  # Gradio commits a Number/Slider value on blur


def pick_option(page, dropdown_id: str, option: str) -> None:
    """Open a Gradio dropdown and click one of its options."""
    page.locator(f"#{dropdown_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_dropdown_text(page, dropdown_id: str, text: str) -> None:
    """Type a custom value into a Gradio dropdown that allows one."""
    box = page.locator(f"#{dropdown_id} input")
    box.fill(text)
    box.press("Enter")
