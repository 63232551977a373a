"""The Train panel's dataset preview (what a run will use, before Start) and the upload folder rules:
the same files uploaded again reuse their folder; captions alone go beside the images of the current one."""

from __future__ import annotations

import io
import itertools

import pytest
from conftest import write_images
from PIL import Image
from test_reliability import write_big_png

from tinv_ui import training
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.dataset_preview import THUMBNAIL_PX, preview_dataset
from tinv_ui.errors import ConfigError, DatasetError
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.train_setup import preflight
from tinv_ui.uploads import MANIFEST, import_uploads, receive_uploads

NAME = "prevemb"


def mixed_folder(folder):
    """Two 64 px squares with captions, an 80x64 image captioned by its name, a broken file, a subfolder."""
    write_images(folder, 2, captions=True)
    Image.new("RGB", (83, 64), (0, 90, 200)).save(folder / "007-blue_cat_sitting.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "more").mkdir()
    return folder


@pytest.mark.parametrize("keep_size", [False, True], ids=["resized", "keep_size"])
def test_the_preview_shows_the_prompts_buckets_and_skipped_files_training_uses(studio, paths, tmp_path, monkeypatch,
                                                                               keep_size):
    folder = mixed_folder(tmp_path / "data")
    template = tmp_path / "two.txt"
    template.write_text("a photo of [filewords], by [name]\n[name] art, [filewords]\n", encoding="utf-8")
    create_embedding(studio, CreateConfig(name=NAME, initializer="painting", num_vectors=1), paths.embeddings_dir)
    cfg = TrainConfig(embedding=NAME, dataset_dir=str(folder), template=str(template), filename_regex="[a-z]+",
                      filename_join="+", width=72, height=64, keep_size=keep_size, max_steps=8, learn_rate="0.01",
                      save_every=0, preview_every=0, seed=3)

    preview = preview_dataset(cfg, NAME)

    plan = preflight(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths)
    assert [(i.name, i.caption, i.bucket) for i in preview.images] == [
        (i.path.name, i.caption, i.size) for i in plan.dataset.images]
    assert preview.skipped == plan.dataset.skipped
    assert all(list(p.prompts) == plan.prompts.every_line(p.caption) for p in preview.images)
    by_name = {p.name: p for p in preview.images}
    assert by_name["007-blue_cat_sitting.png"].caption == "blue+cat+sitting"  # regex matches joined
    assert by_name["007-blue_cat_sitting.png"].prompts == ("a photo of blue+cat+sitting, by prevemb",
                                                           "prevemb art, blue+cat+sitting")
    assert by_name["007-blue_cat_sitting.png"].bucket == ((80, 64) if keep_size else (72, 64))
    assert sorted(s.split(":")[0] for s in preview.skipped) == ["broken.png", "more", "notes.pdf"]

    # What the UNet really gets in a short run: every prompt is one the preview shows for an image of the
    # bucket the latents have.
    drawn = []
    next_batch = training._next_batch

    def recording(run):
        batch = next_batch(run)
        drawn.extend((prompt, (batch.latents.shape[-1] * 8, batch.latents.shape[-2] * 8)) for prompt in batch.prompts)
        return batch

    monkeypatch.setattr(training, "_next_batch", recording)
    list(training.train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    shown = {(prompt, p.bucket) for p in preview.images for prompt in p.prompts}
    assert len(drawn) == 8 and set(drawn) <= shown


def test_the_preview_is_bounded_thumbnails_small_and_a_huge_image_is_a_reason(tmp_path):
    folder = tmp_path / "data"
    write_images(folder, 5, size=400)
    write_big_png(folder / "huge.png", 12000, 12000)
    cfg = TrainConfig(embedding="x", dataset_dir=str(folder), keep_size=True)

    preview = preview_dataset(cfg, "", max_thumbnails=3)
    assert len(preview.images) == 5 and preview.complete
    assert [p.thumbnail is not None for p in preview.images] == [True] * 3 + [False] * 2
    with Image.open(io.BytesIO(preview.images[0].thumbnail)) as small:
        assert small.format == "JPEG" and max(small.size) == THUMBNAIL_PX  # never the 400 px original
    assert preview.skipped == ("huge.png: 12000x12000 is over the 8192x8192 pixel limit; downscale it first",)
    assert preview.images[0].prompts[0].count("[name]") == 1  # no embedding chosen yet: the tag is shown

    ticks = itertools.count(0, 10.0)  # a clock that says 10 s pass per file
    cut = preview_dataset(cfg, "", time_limit=25, clock=lambda: next(ticks))
    assert not cut.complete and 0 < len(cut.images) < 5


def test_the_preview_refuses_what_preflight_refuses_and_lists_an_imageless_folder(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        preview_dataset(TrainConfig(embedding="x", dataset_dir=str(tmp_path / "nope")))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        preview_dataset(TrainConfig(embedding="x", dataset_dir=str(tmp_path / "d"), filename_regex="("))
    (tmp_path / "t.txt").write_text("no tag here\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"has no \[name\]"):
        preview_dataset(TrainConfig(embedding="x", dataset_dir=str(tmp_path / "d"), template=str(tmp_path / "t.txt")))
    empty = preview_dataset(TrainConfig(embedding="x", dataset_dir=str(tmp_path / "d")))
    assert empty.images == () and empty.skipped == ("a.pdf: not an image",)


# -- uploads -------------------------------------------------------------------------------------------------------
def browser_files(tmp_path, images: int = 2, captions: bool = True):
    """Files as Gradio hands them over: each in a temp folder of its own."""
    src = write_images(tmp_path / "src", images, captions=captions)
    return [*src, *(p.with_suffix(".txt") for p in src if captions)]


def test_the_same_files_uploaded_again_reuse_their_folder(tmp_path):
    outputs = tmp_path / "outputs"
    files = browser_files(tmp_path)
    first = import_uploads(files, outputs, label="a")
    again = import_uploads(list(reversed(files)), outputs, label="another")  # order and label do not matter
    assert again.folder == first.folder and again.reused and not first.reused
    assert (again.images, again.captions) == (2, 2)
    assert sorted(p.name for p in (outputs / "datasets").iterdir()) == [first.folder.name]

    (tmp_path / "src" / "000-a red thing number 0.txt").write_text("changed", encoding="utf-8")
    changed = import_uploads(files, outputs, label="a")  # one caption differs: a new folder
    assert changed.folder != first.folder and not changed.reused
    assert (changed.folder / "000-a red thing number 0.txt").read_text(encoding="utf-8") == "changed"
    fewer = import_uploads(files[:3], outputs, label="a")
    assert fewer.folder not in (first.folder, changed.folder)

    (first.folder / "000-a red thing number 0.png").write_bytes(b"edited by hand")  # the folder changed since
    (tmp_path / "src" / "000-a red thing number 0.txt").write_text("caption 0, tag a, tag b", encoding="utf-8")
    after_edit = import_uploads(files, outputs, label="a")
    assert after_edit.folder != first.folder and (after_edit.folder / MANIFEST).is_file()


def test_captions_alone_go_beside_the_images_of_the_current_upload_folder(tmp_path):
    outputs = tmp_path / "outputs"
    images = write_images(tmp_path / "src", 2)
    uploaded = receive_uploads(images, outputs, "a")
    caption_dir = tmp_path / "caps"
    caption_dir.mkdir()
    (caption_dir / "000-a red thing number 0.txt").write_text("a red cat", encoding="utf-8")
    (caption_dir / "stray.txt").write_text("nobody", encoding="utf-8")
    captions = [caption_dir / "000-a red thing number 0.txt", caption_dir / "stray.txt"]

    result = receive_uploads(captions, outputs, "a", current=str(uploaded.folder))
    assert result.folder == uploaded.folder and result.captions_only
    assert (result.captions, result.ignored) == (1, ("stray.txt",))
    assert sorted(p.name for p in (outputs / "datasets").iterdir()) == [uploaded.folder.name]  # no new folder
    assert (uploaded.folder / "000-a red thing number 0.txt").read_text(encoding="utf-8") == "a red cat"
    assert not (uploaded.folder / "stray.txt").exists()
    preview = preview_dataset(TrainConfig(embedding="x", dataset_dir=str(uploaded.folder)))
    assert preview.images[0].caption == "a red cat"

    # The folder's manifest follows: the images with that caption are this folder, the images alone are not.
    both = receive_uploads([*images, captions[0]], outputs, "a")
    assert both.folder == uploaded.folder and both.reused
    assert receive_uploads(images, outputs, "a").folder != uploaded.folder

    with pytest.raises(ConfigError, match="captions only"):
        receive_uploads(captions, outputs, "a", current=str(tmp_path / "src"))  # a folder of the user's: untouched
    assert not (tmp_path / "src" / "000-a red thing number 0.txt").exists()


def test_the_preview_page_shows_file_names_and_captions_as_text(tmp_path):
    from tinv_ui.ui.dataset_preview import preview_html

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "<img src=x onerror=alert(1)>.png")
    (folder / "<img src=x onerror=alert(1)>.txt").write_text("<script>alert(2)</script>, tag", encoding="utf-8")
    (folder / "<b onclick=x>bad.png").write_bytes(b"not a picture")
    page = preview_html(preview_dataset(TrainConfig(embedding="x", dataset_dir=str(folder), width=64, height=64),
                                        "x"))
    assert "<script>" not in page and "<img src=x" not in page and "<b onclick" not in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;, tag" in page
    assert "&lt;b onclick=x&gt;bad.png: not an image" in page
    assert page.count("<img src=\"data:image/jpeg;base64,") == 1
