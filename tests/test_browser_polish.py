"""Details a user meets in the browser (issue 15, items 8-10): "Insert embedding" at the caret, the preview
gallery and the image embeddings of a run, the Advanced labels, the upload zones, the model picker after a
failed load, and a console free of vega and upload noise.

One `python app.py` and one chromium serve the module; each test uses its own names.
"""

from __future__ import annotations

import json
import re

import pytest

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, set_value
from conftest import write_images

pytestmark = browser_marks


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with running_app(tmp_path_factory.mktemp("app"), cache_dir) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(app, browser):
    page = open_page(browser, app.url)
    yield page
    page.close()


def create(page, name: str) -> None:
    from playwright.sync_api import expect

    set_value(page, "tinv-create-name", name)
    page.get_by_role("button", name="Create embedding").click()
    expect(field(page, "tinv-create-status")).to_have_value(f"Created: embeddings/{name}.pt")


def box(locator) -> dict:
    found = locator.bounding_box()
    assert found is not None, f"{locator} is not rendered"
    return found


# -- item 8: insert at the caret -------------------------------------------------------------------------------
def test_insert_embedding_puts_the_name_at_the_caret_with_sensible_separators(page):
    from playwright.sync_api import expect

    create(page, "caret-emb")
    page.get_by_role("tab", name="Generate").click()
    prompt = field(page, "tinv-generate-prompt")

    def insert() -> None:
        pick_option(page, "tinv-insert-embedding", "caret-emb")

    # Typed "art by " (caret at the end): no comma before the name.
    prompt.fill("art by ")
    insert()
    expect(prompt).to_have_value("art by caret-emb")
    # A second pick follows the first (the caret was put after the inserted name).
    insert()
    expect(prompt).to_have_value("art by caret-emb, caret-emb")

    # The caret placed inside the text with the keyboard: the name goes there, between words.
    prompt.fill("a photo of in the rain")
    prompt.press("Home")
    for _ in range(len("a photo of")):
        prompt.press("ArrowRight")
    insert()
    expect(prompt).to_have_value("a photo of caret-emb in the rain")

    # After a comma: one space.
    prompt.fill("a photo, in the rain")
    prompt.press("Home")
    for _ in range(len("a photo,")):
        prompt.press("ArrowRight")
    insert()
    expect(prompt).to_have_value("a photo, caret-emb in the rain")

    # A selection (shift+arrows over "OLD") is replaced.
    prompt.fill("a photo of OLD, dark")
    prompt.press("Home")
    for _ in range(len("a photo of ")):
        prompt.press("ArrowRight")
    for _ in range(3):
        prompt.press("Shift+ArrowRight")
    insert()
    expect(prompt).to_have_value("a photo of caret-emb, dark")

    # Empty prompt: the name alone.
    prompt.fill("")
    insert()
    expect(prompt).to_have_value("caret-emb")


# -- item 10: console noise, upload zones --------------------------------------------------------------------
def test_loading_the_page_and_uploading_a_folder_log_no_vega_or_upload_noise(app, browser, tmp_path):
    from playwright.sync_api import expect

    folder = tmp_path / "noise images"
    write_images(folder, 3, captions=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    try:
        page.goto(app.url, wait_until="load")
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#tinv-train-progress")).to_be_visible()
        page.locator("#tinv-upload-folder input[type=file]").set_input_files(str(folder))
        expect(field(page, "tinv-train-dataset_dir")).to_have_value(re.compile(r"^outputs/datasets/"))
        page.wait_for_timeout(2500)  # a few training polls: the loss plot is redrawn on each change
        noise = [m for m in messages if re.search(r"Infinite extent|Method not implemented", m)]
        assert noise == [], messages
        assert not [m for m in messages if m.startswith("error")], messages
    finally:
        page.close()


def test_the_upload_area_leaves_no_grey_band_under_its_zones(page, tmp_path):
    """The drop zone and the folder button's column are white blocks on the group's grey: each reaches the row's
    bottom, on an empty page and after a folder upload (which fills the folder field and the note)."""
    from playwright.sync_api import expect

    folder = tmp_path / "band images"
    write_images(folder, 3, captions=True)
    page.get_by_role("tab", name="Train").click()

    def check_no_band() -> None:
        row_box = box(page.locator("#tinv-upload-files").locator("xpath=.."))
        for zone in ("#tinv-upload-files", "#tinv-upload-folder"):
            zone_box = box(page.locator(zone))
            assert zone_box["y"] + zone_box["height"] == pytest.approx(row_box["y"] + row_box["height"], abs=1), zone

    expect(page.locator("#tinv-upload-files")).to_be_visible()
    check_no_band()
    page.locator("#tinv-upload-folder input[type=file]").set_input_files(str(folder))
    expect(page.locator("#tinv-upload-note")).to_contain_text("3 image(s)", timeout=30_000)
    check_no_band()
    page.screenshot(path=str(tmp_path / "band.png"))


# -- item 10: model picker ----------------------------------------------------------------------------------------
def test_after_a_failed_load_the_picker_shows_the_loaded_model_and_the_status_says_why(app, page):
    from playwright.sync_api import expect

    (app.dirs["models"] / "polish-broken.safetensors").write_bytes(b"\x00" * 64)
    status = page.locator("#tinv-model-status")
    expect(status).to_contain_text("Loaded tiny test model (random weights)")
    page.get_by_role("button", name="Refresh").first.click()
    pick_option(page, "tinv-model-picker", "polish-broken.safetensors")
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.locator("[data-testid=toast-text]").last).to_contain_text("polish-broken.safetensors", timeout=30_000)
    expect(page.locator("#tinv-model-picker input")).to_have_value("tiny test model (random weights)")
    expect(status).to_contain_text("Loaded tiny test model (random weights)")
    expect(status).to_contain_text(re.compile(r"Not loaded: .*polish-broken\.safetensors"))


# -- item 10: Advanced labels ---------------------------------------------------------------------------------
def test_advanced_labels_fit_on_one_line(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    page.get_by_text("Advanced", exact=True).click()
    labels = page.locator("#tinv-train-advanced [data-testid=block-info]")
    expect(labels.first).to_be_visible()
    heights = {labels.nth(i).inner_text(): box(labels.nth(i))["height"] for i in range(labels.count())}
    line = min(heights.values())
    assert len(heights) >= 10
    assert {name: h for name, h in heights.items() if h > 1.5 * line} == {}, heights


# -- items 9 and 10: a run's previews all in view, and its image embeddings ----------------------------------------
def test_the_preview_gallery_shows_whole_rows_and_image_embeddings_are_written(app, page, tmp_path):
    from playwright.sync_api import expect

    from tinv_ui import formats

    folder = tmp_path / "gallery images"
    write_images(folder, 3)
    create(page, "gallery-emb")
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#tinv-train-embedding input")).to_have_value("gallery-emb")
    for key, value in (("dataset_dir", folder), ("max_steps", 10), ("preview_every", 1), ("save_every", 0)):
        set_value(page, f"tinv-train-{key}", value)
    page.get_by_text("Advanced", exact=True).click()
    set_value(page, "tinv-train-preview_steps", 1)
    page.locator("#tinv-train-save_image_with_stored_embedding input").check()
    page.get_by_role("button", name="Start training").click()
    expect(page.locator("#tinv-train-progress")).to_contain_text("step 10/10 · finished", timeout=120_000)

    # Ten previews in rows of four: every thumbnail lies wholly inside the gallery's visible area.
    thumbs = page.locator("#tinv-train-previews .thumbnail-item")
    expect(thumbs).to_have_count(10)
    view = box(page.locator("#tinv-train-previews .grid-wrap"))
    rows = set()
    for i in range(10):
        thumb = box(thumbs.nth(i))
        rows.add(round(thumb["y"]))
        assert view["y"] - 1 <= thumb["y"] and thumb["y"] + thumb["height"] <= view["y"] + view["height"] + 1, (i, thumb, view)
    assert len(rows) == 3

    # image_embeddings/: one PNG per preview; the last one holds the trained vectors, bit for bit.
    (run,) = (app.cwd / "outputs" / "train").glob("*/gallery-emb")
    assert sorted(p.name for p in (run / "image_embeddings").iterdir()) == sorted(f"gallery-emb-{n}.png" for n in range(1, 11))
    final = formats.read(app.dirs["embeddings"] / "gallery-emb.pt")
    last = formats.read(run / "image_embeddings" / "gallery-emb-10.png")
    assert last.name == "gallery-emb-10" and last.step == 10 and last.vectors.equal(final.vectors)
    (settings,) = run.glob("settings-*.json")
    assert json.loads(settings.read_text(encoding="utf-8"))["save_image_with_stored_embedding"] is True
