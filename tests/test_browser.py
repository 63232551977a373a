"""The whole app in headless Chromium: create → upload a folder → train with previews → generate → hot-drop a file.

Runs `python app.py` in a subprocess on the tiny model. Screenshots of each tab go to the test's tmp
folder, and to docs/screenshots/ when TINV_SCREENSHOTS=1 (for the README).
"""

from __future__ import annotations

import re

import pytest
import torch

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, set_value, shoot
from conftest import write_images

pytestmark = browser_marks


@pytest.fixture
def app_server(tmp_path, cache_dir):
    """`python app.py` on a free port with tmp folders; yields (url, folders)."""
    with running_app(tmp_path, cache_dir) as app:
        yield app.url, app.dirs


def test_full_workflow_in_the_browser(app_server, tmp_path):
    from playwright.sync_api import expect

    url, dirs = app_server
    dataset = tmp_path / "my images"
    write_images(dataset, 3, captions=True)
    with chromium() as browser:
        page = open_page(browser, url)

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
        assert sorted(p.suffix for p in uploaded.iterdir() if not p.name.startswith(".")) == [".png"] * 3 + [".txt"] * 3
        for elem_id, value in (("max_steps", 4), ("preview_every", 2), ("save_every", 2), ("preview_prompt", "browser-emb")):
            set_value(page, f"tinv-train-{elem_id}", value)
        page.get_by_text("Advanced", exact=True).click()
        set_value(page, "tinv-train-preview_steps", 2)
        page.get_by_role("button", name="Start training").click()
        expect(page.locator("#tinv-train-progress")).to_contain_text("step 4/4 · finished", timeout=90_000)
        expect(page.locator("#tinv-train-previews img")).to_have_count(2)
        # The loss curve holds one point per step (vega draws it as SVG with accessible labels).
        expect(page.locator("#tinv-loss-plot [aria-label^=\"X-axis titled 'step'\"]")).to_have_attribute(
            "aria-label", re.compile(r"values from 1(\.0)? to 4(\.0)?$"))
        line = page.locator("#tinv-loss-plot [aria-roledescription='line mark']").first
        assert line.get_attribute("d").count("L") == 3
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
