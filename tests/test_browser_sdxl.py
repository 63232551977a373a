"""One SDXL flow in headless Chromium on the tiny SDXL model: the header names the family, sizes follow the model,
Create writes a clip_l/clip_g pair, Train trains it 4 steps with previews, Generate uses the trained pair."""

from __future__ import annotations

import re

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, set_value
from conftest import write_images
from safetensors import safe_open

pytestmark = browser_marks


def test_sdxl_create_train_and_generate(tmp_path, cache_dir):
    from playwright.sync_api import expect

    dataset = tmp_path / "images"
    write_images(dataset, 2)
    with running_app(tmp_path, cache_dir, "--model", "tiny-sdxl") as app, chromium() as browser:
        page = open_page(browser, app.url)
        expect(page.locator("#tinv-model-status")).to_contain_text("embeddings SDXL (32 + 64)")
        expect(page.locator("#tinv-model-status")).to_contain_text("native 128px")

        set_value(page, "tinv-create-name", "xl-web")
        page.get_by_role("button", name="Create embedding").click()
        expect(field(page, "tinv-create-status")).to_have_value("Created: embeddings/xl-web.safetensors")

        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#tinv-train-embedding input")).to_have_value("xl-web")
        expect(field(page, "tinv-train-width")).to_have_value("128")
        set_value(page, "tinv-train-dataset_dir", str(dataset))
        for elem_id, value in (("max_steps", 4), ("preview_every", 2), ("save_every", 2), ("preview_prompt", "xl-web")):
            set_value(page, f"tinv-train-{elem_id}", value)
        page.get_by_text("Advanced", exact=True).click()
        set_value(page, "tinv-train-preview_steps", 2)
        page.get_by_role("button", name="Start training").click()
        expect(page.locator("#tinv-train-progress")).to_contain_text("step 4/4 · finished", timeout=120_000)
        expect(page.locator("#tinv-train-previews img")).to_have_count(2)
        expect(page.locator("#tinv-loss-plot [aria-label^=\"X-axis titled 'step'\"]")).to_have_attribute(
            "aria-label", re.compile(r"values from 1(\.0)? to 4(\.0)?$"))
        expect(field(page, "tinv-train-saved")).to_have_value(re.compile(r"xl-web\.safetensors$"))
        with safe_open(str(tmp_path / "embeddings" / "xl-web.safetensors"), framework="pt") as f:
            assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata()["step"] == "4"

        page.get_by_role("tab", name="Generate").click()
        expect(field(page, "tinv-generate-width")).to_have_value("128")
        set_value(page, "tinv-generate-prompt", "a photo of")
        pick_option(page, "tinv-insert-embedding", "xl-web")
        set_value(page, "tinv-generate-steps", 2)
        page.get_by_role("button", name="Generate", exact=True).click()
        expect(page.locator("#tinv-generate-progress")).to_contain_text("Done: 1 image(s).", timeout=90_000)
        expect(field(page, "tinv-infotext")).to_have_value(re.compile(r"Size: 128x128,.*TI hashes: \"xl-web: ", re.S))
