"""The Generate panel in headless Chromium: a new embedding is offered at once, random seeds, batches, and the
gallery's per-image parameters."""

from __future__ import annotations

import re

import pytest

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, set_value

pytestmark = browser_marks


@pytest.fixture
def page(tmp_path, cache_dir):
    with running_app(tmp_path, cache_dir) as app, chromium() as browser:
        yield open_page(browser, app.url)


def test_random_seed_batches_and_the_selected_image_parameters(page):
    from playwright.sync_api import expect

    # A just-created embedding is in the Generate picker without pressing Refresh.
    set_value(page, "tinv-create-name", "fresh-emb")
    page.get_by_role("button", name="Create embedding").click()
    expect(field(page, "tinv-create-status")).to_have_value("Created: embeddings/fresh-emb.pt")
    page.get_by_role("tab", name="Generate").click()
    set_value(page, "tinv-generate-prompt", "a photo of")
    pick_option(page, "tinv-insert-embedding", "fresh-emb")
    expect(field(page, "tinv-generate-prompt")).to_have_value("a photo of, fresh-emb")

    # Seed -1 draws one; 2 batches of 2 use it and the next three; the page says which.
    for key, value in (("steps", 2), ("seed", -1), ("batch_count", 2), ("batch_size", 2)):
        set_value(page, f"tinv-generate-{key}", value)
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#tinv-generate-progress")).to_contain_text("Done: 4 image(s).", timeout=90_000)
    seed_text = page.locator("#tinv-seed-used")
    expect(seed_text).to_contain_text(re.compile(r"Seed used: \d+ \(to \d+\)"))
    first, last = map(int, re.findall(r"\d+", seed_text.inner_text()))
    assert first >= 0 and last == first + 3
    infotext = field(page, "tinv-infotext")
    expect(infotext).to_have_value(re.compile(rf"Seed: {first},.*TI hashes: \"fresh-emb: ", re.S))
    assert 'Batch size: 2, Batch pos: 0,' in infotext.input_value()

    # Clicking the third image shows that image's own parameters.
    thumbs = page.locator("#tinv-gallery button.thumbnail-item, #tinv-gallery .thumbnail-item")
    expect(thumbs).to_have_count(4)
    thumbs.nth(2).click()
    expect(infotext).to_have_value(re.compile(rf"Seed: {first + 2},"))
    thumbs.nth(0).click()
    expect(infotext).to_have_value(re.compile(rf"Seed: {first},"))
