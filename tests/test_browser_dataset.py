"""The Train panel's dataset area in the browser: one upload area, the preview of what training will use
(thumbnails with prompt and size bucket, ignored files by name with the reason), the same upload reusing its
folder, and captions alone going beside their images. Makes docs/screenshots/dataset.png (TINV_SCREENSHOTS=1)."""

from __future__ import annotations

import re

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, set_value, shoot
from conftest import write_images

from tinv_ui.templates import load_template

pytestmark = browser_marks


def filled(template: str, caption: str, name: str) -> str:
    """The first line of a shipped template, filled as training fills it."""
    return load_template(template).lines[0].replace("[filewords]", caption).replace("[name]", name)


def test_the_dataset_preview_shows_what_training_uses_and_uploads_reuse_their_folder(tmp_path, cache_dir):
    from playwright.sync_api import expect

    src = tmp_path / "my pictures"
    images = write_images(src, 3, captions=True)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (src / "stray.txt").write_text("a caption without its image", encoding="utf-8")
    upload = [*images, *(p.with_suffix(".txt") for p in images), src / "broken.png", src / "stray.txt"]
    (tmp_path / "app").mkdir()
    with running_app(tmp_path / "app", cache_dir) as app, chromium() as browser:
        page = open_page(browser, app.url)
        set_value(page, "tinv-create-name", "ds-prev")
        page.get_by_role("button", name="Create embedding").click()
        expect(field(page, "tinv-create-status")).to_have_value("Created: embeddings/ds-prev.pt")
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#tinv-train-embedding input")).to_have_value("ds-prev")
        expect(page.locator("#tinv-upload-help")).to_contain_text("Subfolders are flattened")

        # Files into the one upload area: the folder field is filled in, the preview lists what training uses.
        page.locator("#tinv-upload-files input[type=file]").set_input_files([str(p) for p in upload])
        dataset_box = field(page, "tinv-train-dataset_dir")
        expect(dataset_box).to_have_value(re.compile(r"^outputs/datasets/ds-prev-\d{8}-\d{6}$"))
        folder = dataset_box.input_value()
        preview = page.locator("#tinv-dataset-preview")
        expect(preview.locator("figure img")).to_have_count(3)
        expect(preview).to_contain_text("3 images will be used")
        expect(preview).to_contain_text("size bucket 64×64 (3)")  # the tiny model's size, the form's default
        for i in range(3):
            item = preview.locator("figure", has_text=images[i].name)
            expect(item.locator(".tinv-dp-bucket")).to_have_text("64×64")
            expect(item.locator(".tinv-dp-prompt")).to_have_text(
                filled("style_filewords", f"caption {i}, tag a, tag b", "ds-prev"))
        expect(preview.locator(".tinv-dp-ignored")).to_contain_text("Ignored (2)")
        expect(preview.locator(".tinv-dp-ignored li", has_text="broken.png: not an image")).to_have_count(1)
        expect(preview.locator(".tinv-dp-ignored li", has_text="stray.txt: not an image")).to_have_count(1)
        thumb = preview.locator("figure img").first.get_attribute("src")
        assert thumb.startswith("data:image/jpeg;base64,") and len(thumb) < 20_000  # small, never the original

        # Another template: the prompts follow the form.
        pick_option(page, "tinv-train-template", "subject_filewords")
        expect(preview.locator("figure", has_text=images[0].name).locator(".tinv-dp-prompt")).to_have_text(
            filled("subject_filewords", "caption 0, tag a, tag b", "ds-prev"))

        # Another training size: the buckets follow.
        set_value(page, "tinv-train-width", 72)
        expect(preview).to_contain_text("size bucket 72×64 (3)")
        expect(preview.locator("figure", has_text=images[2].name).locator(".tinv-dp-bucket")).to_have_text("72×64")

        # The same files again: the same folder, nothing copied.
        page.locator("#tinv-upload-files input[type=file]").set_input_files([str(p) for p in upload])
        expect(page.locator("#tinv-upload-note")).to_contain_text("using " + folder + " again")
        expect(dataset_box).to_have_value(folder)
        assert [p.name for p in (app.dirs["outputs"] / "datasets").iterdir()] == [folder.rsplit("/", 1)[1]]

        # Captions alone: written beside their images in that folder; the preview shows the new prompt.
        captions = tmp_path / "new captions"
        captions.mkdir()
        (captions / images[1].with_suffix(".txt").name).write_text("a <b>blue</b> cat", encoding="utf-8")
        page.locator("#tinv-upload-files input[type=file]").set_input_files(str(captions / images[1].with_suffix(".txt").name))
        expect(page.locator("#tinv-upload-note")).to_contain_text("Wrote 1 caption(s) beside their images in " + folder)
        expect(dataset_box).to_have_value(folder)
        expect(preview.locator("figure", has_text=images[1].name).locator(".tinv-dp-prompt")).to_have_text(
            filled("subject_filewords", "a <b>blue</b> cat", "ds-prev"))  # shown as text, not markup
        assert len(list((app.dirs["outputs"] / "datasets").iterdir())) == 1
        assert (app.cwd / folder / images[1].with_suffix(".txt").name).read_text(encoding="utf-8") == "a <b>blue</b> cat"

        # A folder typed outside the app's folders is refused like Start refuses it, nothing read.
        set_value(page, "tinv-train-dataset_dir", "/etc")
        expect(preview).to_contain_text("outside the folders this app may use")
        set_value(page, "tinv-train-dataset_dir", folder)
        expect(preview.locator("figure img")).to_have_count(3)
        page.evaluate("document.activeElement.blur()")  # no focus ring in the screenshot
        shoot(page, tmp_path, "dataset")
