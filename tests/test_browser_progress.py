"""Honest progress in the browser: while a preview renders the Train tab says so (with an ETA), and it shows the
last training prompt and the newest preview large, with its step.

The previews are made slow the way a user would: many sampling steps (150) at 128 px on the tiny model.
"""

from __future__ import annotations

import re

from browser_app import browser_marks, chromium, field, open_page, running_app, set_dropdown_text, set_value
from conftest import write_images

pytestmark = browser_marks

NAME = "prog-emb"


def test_the_phase_the_last_prompt_and_the_newest_preview_are_shown(tmp_path, cache_dir):
    from playwright.sync_api import expect

    data = tmp_path / "data"
    write_images(data, 3, captions=True)
    (tmp_path / "app").mkdir()
    with running_app(tmp_path / "app", cache_dir) as app, chromium() as browser:
        page = open_page(browser, app.url)
        set_value(page, "tinv-create-name", NAME)
        page.get_by_role("button", name="Create embedding").click()
        expect(field(page, "tinv-create-status")).to_have_value(f"Created: embeddings/{NAME}.pt")

        page.get_by_role("tab", name="Train").click()
        page.get_by_role("button", name="Refresh").first.click()
        set_dropdown_text(page, "tinv-train-embedding", NAME)
        set_value(page, "tinv-train-dataset_dir", str(data))
        for key, value in (("max_steps", 4), ("preview_every", 2), ("save_every", 2), ("width", 128), ("height", 128)):
            set_value(page, f"tinv-train-{key}", value)
        page.get_by_text("Advanced", exact=True).click()
        set_value(page, "tinv-train-preview_steps", 150)
        page.get_by_role("button", name="Start training").click()

        # While the first preview renders, the label names it, with an ETA (the run's previews included).
        progress = page.locator("#tinv-train-progress")
        preview_phase = re.compile(rf"{NAME}: step 2/4 · ETA \d+:\d\d · loss [\d.]+ · rendering preview at step 2")
        expect(progress).to_contain_text(preview_phase, timeout=60_000)
        # The last training prompt: a line of the template (style_filewords) with the embedding and a caption.
        with_both = re.compile(rf"^(?=.*\b{NAME}\b)(?=.*\bcaption \d, tag a, tag b\b)")
        expect(field(page, "tinv-train-prompt")).to_have_value(with_both)
        # The newest preview, large, with its step; then the next one replaces it.
        newest = page.locator("#tinv-train-newest")
        expect(newest).to_contain_text("Newest preview: step 2", timeout=60_000)
        expect(newest.locator("img")).to_have_attribute("src", re.compile(rf"{NAME}-2\.png"))
        expect(progress).to_contain_text("rendering preview at step 4", timeout=60_000)
        expect(progress).to_contain_text("step 4/4 · finished", timeout=60_000)
        expect(newest).to_contain_text("Newest preview: step 4")
        expect(newest.locator("img")).to_have_attribute("src", re.compile(rf"{NAME}-4\.png"))
        # Gradio's <img> loads lazily: in view (the form above was scrolled down to Advanced), it loads and shows.
        newest.locator("img").scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=newest.locator("img").element_handle())
        assert newest.locator("img").bounding_box()["width"] >= 200  # large: the gallery's thumbnails are ~110 px
