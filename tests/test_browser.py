"""The whole app in headless Chromium: create → upload a folder → train with previews → generate → hot-drop a file.

Runs `python app.py` in a subprocess on the tiny model. Screenshots of each tab go to the test's tmp
folder, and to docs/screenshots/ when TINV_SCREENSHOTS=1 (for the README).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import write_images

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"),
]


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


@pytest.fixture
def app_server(tmp_path, cache_dir):
    """`python app.py` on a free port with tmp folders; yields (url, folders) and stops the process."""
    port = free_port()
    dirs = {k: tmp_path / k for k in ("embeddings", "outputs", "models")}
    log = tmp_path / "app.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # Relative folders (the app runs in tmp_path): the UI shows short paths, as it would for a user.
    cmd = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--model", "tiny", "--embeddings-dir", "embeddings",
           "--outputs-dir", "outputs", "--models-dir", "models", "--cache-dir", str(cache_dir)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, proc, log)
        yield url, dirs
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shoot(page, tmp_path: Path, name: str) -> None:
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


def test_full_workflow_in_the_browser(app_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, dirs = app_server
    dataset = tmp_path / "my images"
    write_images(dataset, 3, captions=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(url, wait_until="load")

        # 1. Create an embedding; the status names the file.
        set_value(page, "tinv-create-name", "browser-emb")
        set_value(page, "tinv-create-num_vectors", 2)
        page.get_by_role("button", name="Create embedding").click()
        expect(field(page, "tinv-create-status")).to_have_value("Created: embeddings/browser-emb.pt")
        assert (dirs["embeddings"] / "browser-emb.pt").is_file()
        shoot(page, tmp_path, "create")

        # 2. Train: the new embedding is selected; a folder goes in through the drag-and-drop file input.
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#tinv-train-embedding input")).to_have_value("browser-emb")
        page.locator("#tinv-upload-folder input[type=file]").set_input_files(str(dataset))
        dataset_box = field(page, "tinv-train-dataset_dir")
        expect(dataset_box).to_have_value(re.compile(r"^outputs/datasets/browser-emb-\d{8}-\d{6}$"))
        uploaded = tmp_path / dataset_box.input_value()
        assert sorted(p.suffix for p in uploaded.iterdir()) == [".png"] * 3 + [".txt"] * 3
        for elem_id, value in (("max_steps", 4), ("preview_every", 2), ("save_every", 2), ("preview_prompt", "browser-emb")):
            set_value(page, f"tinv-train-{elem_id}", value)
        page.get_by_text("Advanced", exact=True).click()
        set_value(page, "tinv-train-preview_steps", 2)
        page.get_by_role("button", name="Start training").click()
        expect(page.locator("#tinv-train-progress")).to_contain_text("step 4/4 · finished", timeout=90_000)
        expect(page.locator("#tinv-train-previews img")).to_have_count(2)
        expect(page.locator("#tinv-loss-plot canvas, #tinv-loss-plot svg").first).to_be_visible()
        expect(field(page, "tinv-train-saved")).to_have_value(re.compile(r"browser-emb"))
        page.get_by_text("Advanced", exact=True).click()  # fold it again for the screenshot
        shoot(page, tmp_path, "train")

        # 3. Generate with the embedding picked from the dropdown; the infotext names it (TI hashes).
        page.get_by_role("tab", name="Generate").click()
        set_value(page, "tinv-generate-prompt", "a photo of")
        pick_option(page, "tinv-insert-embedding", "browser-emb")
        expect(field(page, "tinv-generate-prompt")).to_have_value("a photo of, browser-emb")
        set_value(page, "tinv-generate-steps", 2)
        set_value(page, "tinv-generate-seed", 4242)
        page.get_by_role("button", name="Generate", exact=True).click()
        infotext = page.locator("#tinv-infotext textarea")
        expect(infotext).to_have_value(re.compile(r'Seed: 4242,.*TI hashes: "browser-emb: [0-9a-f]{12}"', re.S), timeout=60_000)
        expect(page.locator("#tinv-gallery img").first).to_be_visible()
        expect(page.locator("#tinv-seed-used")).to_contain_text("4242")
        shoot(page, tmp_path, "generate")

        # 4. A file dropped into embeddings/ shows up in the dropdown without a restart.
        from tinv_ui import formats
        from tinv_ui.embedding import Embedding

        formats.write(Embedding("dropped-emb", torch.zeros(1, 32)), dirs["embeddings"] / "dropped-emb.safetensors")
        expect(page.locator("#tinv-library-info")).to_contain_text("dropped-emb", timeout=15_000)
        pick_option(page, "tinv-insert-embedding", "dropped-emb")
        expect(field(page, "tinv-generate-prompt")).to_have_value("a photo of, browser-emb, dropped-emb")
        browser.close()
