"""Rows of docs/reliability.md where a user meets them in the browser: what the page says, and what is on disk.

One `python app.py` serves the module's tests (each uses its own names and folders); the login test starts
its own with `--auth`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, set_dropdown_text, set_value
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


def toast(page):
    """The text of the newest error/warning toast."""
    return page.locator("[data-testid=toast-text]").last


def close_toasts(page) -> None:
    for button in page.locator("[data-testid=toast-close]").all():
        if button.is_visible():
            button.click()


def create(page, name: str) -> None:
    set_value(page, "tinv-create-name", name)
    page.get_by_role("button", name="Create embedding").click()


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


class _RunsCode:
    """Pickles to a call of os.system: what a malicious embedding file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# -- uploads and names -------------------------------------------------------------------------------------------
def test_unsafe_long_and_taken_names_are_refused_unicode_is_fine(app, page):
    from playwright.sync_api import expect

    status = field(page, "tinv-create-status")
    create(page, "../escape")
    expect(toast(page)).to_contain_text("name '../escape' contains '/'")
    close_toasts(page)
    create(page, "x" * 150)
    expect(toast(page)).to_contain_text("at most 120")
    close_toasts(page)
    create(page, "café-ñ")
    expect(status).to_have_value("Created: embeddings/café-ñ.pt")
    existing = app.dirs["embeddings"] / "café-ñ.pt"
    before = existing.read_bytes()
    create(page, "café-ñ")
    expect(toast(page)).to_contain_text("already exists")
    expect(toast(page)).to_contain_text("turn on overwrite")
    assert existing.read_bytes() == before
    assert not list(app.cwd.rglob("escape*")) and not list(app.cwd.rglob("xxxxxxxxxx*"))
    assert temp_files(app.dirs["embeddings"]) == []


# -- embeddings --------------------------------------------------------------------------------------------------
def test_bad_embedding_files_are_listed_with_their_reasons(app, page):
    from playwright.sync_api import expect

    from tinv_ui import formats
    from tinv_ui.embedding import Embedding

    folder = app.dirs["embeddings"] / "dropped"
    folder.mkdir()
    marker = app.cwd / "pwned"
    formats.write(Embedding("sd15-style", torch.zeros(2, 768)), folder / "sd15-style.pt")  # SD 1.x width
    (folder / "zero-bytes.pt").write_bytes(b"")
    (folder / "garbage.pt").write_bytes(b"PK\x03\x04 this is not an embedding")
    (folder / "evil.pt").write_bytes(pickle.dumps({"name": "evil", "x": _RunsCode(f"touch {marker}")}, protocol=2))
    formats.write(Embedding("twin", torch.zeros(1, 32)), app.dirs["embeddings"] / "twin.pt")
    formats.write(Embedding("twin", torch.ones(1, 32)), folder / "twin.safetensors")
    formats.write(Embedding("cat", torch.zeros(1, 32)), folder / "cat.pt")  # a real word: prompts lose "cat"
    page.get_by_role("tab", name="Generate").click()
    info = page.locator("#tinv-library-info")
    expect(info).to_contain_text("skipped sd15-style (sd15-style.pt)", timeout=15_000)
    for text in ("768 (SD 1.x)", "32 (tiny test model)", "zero-bytes.pt", "garbage.pt", "evil.pt",
                 "refused and not executed", "collision:", "twin.safetensors", "warning:", "'cat'"):
        expect(info).to_contain_text(text)
    assert not marker.exists()
    # The loaded ones stay usable: the dropdown offers them, not the skipped ones.
    pick_option(page, "tinv-insert-embedding", "twin")
    page.locator("#tinv-insert-embedding input").click()
    expect(page.get_by_role("option", name="evil", exact=True)).to_have_count(0)


# -- model picker --------------------------------------------------------------------------------------------------
def test_load_says_loading_then_keeps_the_model_when_the_checkpoint_is_broken(app, page):
    from playwright.sync_api import expect

    (app.dirs["models"] / "broken.safetensors").write_bytes(b"\x00" * 64)
    status = page.locator("#tinv-model-status")
    expect(status).to_contain_text("Loaded tiny test model (random weights)")
    # Record every text the status line shows: "Loading …" is on screen only while the load runs.
    page.evaluate("""() => {
        const el = document.querySelector('#tinv-model-status');
        window.statusTexts = [];
        new MutationObserver(() => window.statusTexts.push(el.innerText))
            .observe(el, {subtree: true, childList: true, characterData: true});
    }""")
    page.get_by_role("button", name="Refresh").first.click()
    pick_option(page, "tinv-model-picker", "broken.safetensors")
    page.get_by_role("button", name="Load", exact=True).click()
    expect(toast(page)).to_contain_text("broken.safetensors", timeout=30_000)
    expect(status).to_contain_text("Loaded tiny test model (random weights)")
    texts = page.evaluate("() => window.statusTexts")
    assert any(t.startswith("Loading broken.safetensors…") for t in texts), texts
    close_toasts(page)


# -- dataset -------------------------------------------------------------------------------------------------------
def start_training(page, embedding: str, dataset: str, **settings) -> None:
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Refresh").first.click()
    set_dropdown_text(page, "tinv-train-embedding", embedding)
    if dataset:
        set_value(page, "tinv-train-dataset_dir", dataset)
    for key, value in {"max_steps": 2, "preview_every": 0, "save_every": 0, **settings}.items():
        if key == "template":
            set_dropdown_text(page, "tinv-train-template", value)
        else:
            set_value(page, f"tinv-train-{key}", value)
    page.get_by_role("button", name="Start training").click()


def test_dataset_problems_are_explained_before_training(app, page, tmp_path):
    from playwright.sync_api import expect

    create(page, "ds-emb")
    expect(field(page, "tinv-create-status")).to_have_value("Created: embeddings/ds-emb.pt")
    before = (app.dirs["embeddings"] / "ds-emb.pt").read_bytes()
    message, progress = field(page, "tinv-train-message"), page.locator("#tinv-train-progress")

    # A dropped folder with no images: the note says what was ignored; Start says why nothing can train.
    junk = tmp_path / "not images"
    junk.mkdir()
    (junk / "notes.pdf").write_bytes(b"%PDF-1.4")
    (junk / "song.mp3").write_bytes(b"ID3")
    page.get_by_role("tab", name="Train").click()
    page.locator("#tinv-upload-folder input[type=file]").set_input_files(str(junk))
    expect(page.get_by_text(re.compile(r"Copied 0 image\(s\) and 0 caption\(s\) .*Ignored 2 file\(s\) \(not an image "
                                       r"or a \.txt caption\): (notes\.pdf, song\.mp3|song\.mp3, notes\.pdf)"))).to_be_visible()
    expect(page.get_by_text("No images: drop PNG, JPG, WebP")).to_be_visible()
    start_training(page, "ds-emb", "")
    expect(toast(page)).to_contain_text(re.compile(r"Dataset folder: dataset_dir '.*' has no usable image \(the folder is empty\)"))
    expect(progress).not_to_contain_text("failed")  # refused before a run starts: no failed job
    close_toasts(page)

    # A typed path to an empty folder, then a folder of non-images: the same, naming the files.
    empty = tmp_path / "empty"
    empty.mkdir()
    start_training(page, "ds-emb", str(empty))
    expect(toast(page)).to_contain_text(re.compile(r"dataset_dir '.*empty' has no usable image \(the folder is empty\)"))
    close_toasts(page)
    (empty / "a.pdf").write_bytes(b"%PDF")
    start_training(page, "ds-emb", str(empty))
    expect(toast(page)).to_contain_text(re.compile(r"no usable image \(a.pdf: not an image\)"))
    close_toasts(page)

    # A template without [name]: refused, naming the line.
    good = tmp_path / "good"
    write_images(good, 2)
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    Image.new("RGBA", (70, 90), (255, 0, 0, 100)).save(good / "rgba-odd-size.png")
    bad_template = tmp_path / "no-name.txt"
    bad_template.write_text("a photo of a thing\n", encoding="utf-8")
    start_training(page, "ds-emb", str(good), template=str(bad_template))
    expect(toast(page)).to_contain_text(re.compile(r"Prompt template: .*\[name\]"))
    close_toasts(page)
    expect(message).to_have_value("")  # the job panel shows no job: none was started
    assert (app.dirs["embeddings"] / "ds-emb.pt").read_bytes() == before  # nothing touched by refused runs

    # A corrupt image among good ones: the run goes on and says what it skipped.
    start_training(page, "ds-emb", str(good), template="subject_filewords")
    expect(progress).to_contain_text("step 2/2 · finished", timeout=60_000)
    expect(message).to_have_value(re.compile(r"Training finished at step 2; saved to .* Skipped: broken.png: "))
    log_dir = next((app.dirs["outputs"] / "train").glob("*/ds-emb"))
    settings = next(log_dir.glob("settings-*.json")).read_text(encoding="utf-8")
    assert "broken.png" in settings  # the skipped file and its reason are kept with the run


# -- training: a closed tab, a second start, generation during training --------------------------------------------
def test_a_run_survives_a_closed_tab_refuses_a_second_start_and_serves_generation(app, browser, page, tmp_path):
    from playwright.sync_api import expect

    create(page, "long-run")
    expect(field(page, "tinv-create-status")).to_have_value("Created: embeddings/long-run.pt")
    data = tmp_path / "data"
    write_images(data, 3)
    start_training(page, "long-run", str(data), max_steps=100_000, preview_every=3)
    expect(page.locator("#tinv-train-progress")).to_contain_text(re.compile(r"long-run: step \d+/100000 · ETA"))
    page.close()  # the tab goes away mid-run

    again = open_page(browser, app.url)
    again.get_by_role("tab", name="Train").click()
    expect(again.locator("#tinv-train-embedding input")).to_have_value("long-run")  # the running job's, not the first
    progress = again.locator("#tinv-train-progress")
    expect(progress).to_contain_text(re.compile(r"long-run: step \d+/100000 · ETA"))
    first = int(re.search(r"step (\d+)/", progress.inner_text()).group(1))
    expect(progress).not_to_contain_text(f"step {first}/", timeout=15_000)  # still training
    # Previews appear while the run goes on (not only at its end).
    expect(again.locator("#tinv-train-previews img").first).to_be_visible(timeout=30_000)
    expect(progress).to_contain_text("ETA")

    # Start again from this tab: refused with the running job named; the run goes on.
    again.get_by_role("button", name="Start training").click()
    expect(toast(again)).to_contain_text("a training run for long-run is already running")
    close_toasts(again)

    # Generate during training: served between training steps.
    again.get_by_role("tab", name="Generate").click()
    set_value(again, "tinv-generate-prompt", "a long-run picture")
    set_value(again, "tinv-generate-steps", 2)
    set_value(again, "tinv-generate-seed", 77)
    again.get_by_role("button", name="Generate", exact=True).click()
    expect(again.locator("#tinv-infotext textarea")).to_have_value(re.compile(r"Seed: 77,"), timeout=60_000)
    assert int(re.search(r"step (\d+)/", again.locator("#tinv-train-progress").inner_text()).group(1)) > first

    # Interrupt: the embedding is saved at the step it reached.
    again.get_by_role("tab", name="Train").click()
    again.get_by_role("button", name="Interrupt").click()
    expect(progress).to_contain_text(re.compile(r"step \d+/100000 · interrupted"), timeout=30_000)
    from tinv_ui import formats

    step = int(re.search(r"step (\d+)/", progress.inner_text()).group(1))
    assert formats.read(app.dirs["embeddings"] / "long-run.pt").step == step > first
    assert temp_files(app.dirs["embeddings"]) == []
    again.close()


# -- server --------------------------------------------------------------------------------------------------------
def test_auth_requires_the_login(tmp_path, cache_dir, browser):
    from playwright.sync_api import expect

    with running_app(tmp_path, cache_dir, "--auth", "alice:s3cret") as app:
        page = open_page(browser, app.url)
        expect(page.get_by_text("tinv-ui: Textual Inversion")).to_have_count(0)
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_text("Incorrect Credentials", exact=False)).to_be_visible()
        expect(page.get_by_text("tinv-ui: Textual Inversion")).to_have_count(0)
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_role("heading", name="tinv-ui: Textual Inversion")).to_be_visible()
        page.close()
        # The API is closed too without the login cookie.
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(app.url + "gradio_api/info", timeout=10)
        assert err.value.code in (401, 403)
