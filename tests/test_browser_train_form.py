"""The Train form in the browser: it follows the running job and the last run (across tabs and restarts), says
what Start will do, refuses wrong settings before a run starts (field named, no traceback, no failed job), and
its embedding list picks up dropped files by itself."""

from __future__ import annotations

import re
import shutil

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from browser_app import browser_marks, chromium, field, open_page, running_app, set_value
from conftest import write_images

pytestmark = browser_marks


def toast(page):
    return page.locator("[data-testid=toast-text]").last


def create(page, name: str) -> None:
    from playwright.sync_api import expect

    set_value(page, "tinv-create-name", name)
    page.get_by_role("button", name="Create embedding").click()
    expect(field(page, "tinv-create-status")).to_have_value(f"Created: embeddings/{name}.pt")


def open_train(browser, url: str):
    page = open_page(browser, url)
    page.get_by_role("tab", name="Train").click()
    return page


def test_the_form_follows_the_running_job_and_remembers_the_last_settings_across_a_restart(tmp_path, cache_dir):
    from playwright.sync_api import expect

    cwd = tmp_path / "app"
    cwd.mkdir()
    data = tmp_path / "data"
    write_images(data, 3)
    outlook = "#tinv-train-outlook"
    with chromium() as browser:
        with running_app(cwd, cache_dir) as app:
            page = open_page(browser, app.url)
            create(page, "follow")
            page.get_by_role("tab", name="Train").click()
            expect(page.locator(outlook)).to_contain_text("Start begins a new run of follow: steps 0 → 3000.")
            set_value(page, "tinv-train-dataset_dir", str(data))
            for key, value in (("max_steps", 400), ("preview_every", 5), ("save_every", 0), ("preview_prompt", "follow")):
                set_value(page, f"tinv-train-{key}", value)
            expect(page.locator(outlook)).to_contain_text("steps 0 → 400")
            page.get_by_text("Advanced", exact=True).click()
            set_value(page, "tinv-train-preview_steps", 1)
            page.get_by_role("button", name="Start training").click()
            expect(page.locator("#tinv-train-progress")).to_contain_text(re.compile(r"follow: step \d+/400 · ETA"))
            page.close()

            # A new tab shows the running job's settings, not the defaults, and says Start would be refused.
            again = open_train(browser, app.url)
            expect(field(again, "tinv-train-max_steps")).to_have_value("400")
            expect(field(again, "tinv-train-preview_every")).to_have_value("5")
            expect(field(again, "tinv-train-dataset_dir")).to_have_value(str(data))
            expect(again.locator(outlook)).to_contain_text(
                re.compile(r"A run of this embedding is in progress \(step \d+/400\): Start is refused"))
            expect(again.locator(outlook)).to_contain_text("Settings of the run in progress.")
            again.get_by_role("button", name="Interrupt").click()
            progress = again.locator("#tinv-train-progress")
            expect(progress).to_contain_text(re.compile(r"step \d+/400 · interrupted"), timeout=30_000)
            step = int(re.search(r"step (\d+)/", progress.inner_text()).group(1))
            # Without reloading, the line follows the job: Start now continues the same embedding.
            expect(again.locator(outlook)).to_contain_text(f"Start continues follow from step {step} to 400")
            set_value(again, "tinv-train-max_steps", step)
            expect(again.locator(outlook)).to_contain_text(f"follow is already at step {step}: Start would be refused")
            again.close()

        # After a restart, the newest settings file of the embedding is what the form shows.
        with running_app(cwd, cache_dir) as app:
            page = open_train(browser, app.url)
            expect(page.locator("#tinv-train-embedding input")).to_have_value("follow")
            expect(field(page, "tinv-train-max_steps")).to_have_value("400")
            expect(field(page, "tinv-train-preview_every")).to_have_value("5")
            expect(field(page, "tinv-train-save_every")).to_have_value("0")
            expect(field(page, "tinv-train-dataset_dir")).to_have_value(str(data))
            page.get_by_text("Advanced", exact=True).click()
            expect(field(page, "tinv-train-preview_steps")).to_have_value("1")
            expect(page.locator(outlook)).to_contain_text(f"Start continues follow from step {step} to 400")
            expect(page.locator(outlook)).to_contain_text(re.compile(r"Settings of the run of \d{4}-\d\d-\d\d \d\d:\d\d\."))
            # The embedding created again (overwrite): the line follows the file, a new run from step 0.
            page.get_by_role("tab", name="Create embedding").click()
            page.locator("#tinv-create-overwrite input").check()
            create(page, "follow")
            page.get_by_role("tab", name="Train").click()
            expect(page.locator(outlook)).to_contain_text("Start begins a new run of follow: steps 0 → 400.")
            page.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with running_app(tmp_path_factory.mktemp("app"), cache_dir) as running:
        yield running


def test_wrong_settings_are_refused_before_the_run_with_the_field_label(app, tmp_path):
    from playwright.sync_api import expect

    data = tmp_path / "data"
    write_images(data, 2)
    with chromium() as browser:
        page = open_page(browser, app.url)
        create(page, "errs")
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#tinv-train-outlook")).to_contain_text("Start begins a new run of errs")
        set_value(page, "tinv-train-dataset_dir", str(data))
        for key, value in (("max_steps", 2), ("preview_every", 0), ("save_every", 0)):
            set_value(page, f"tinv-train-{key}", value)
        page.get_by_role("button", name="Start training").click()
        progress = page.locator("#tinv-train-progress")
        expect(progress).to_contain_text("errs: step 2/2 · finished", timeout=60_000)
        tracebacks = app.log_text().count("Traceback")

        # A folder that does not exist: pre-flight's check, answered as a toast naming the field; the panel
        # keeps showing the finished run, not a failed one.
        set_value(page, "tinv-train-max_steps", 4)
        set_value(page, "tinv-train-dataset_dir", str(tmp_path / "no such folder"))
        page.get_by_role("button", name="Start training").click()
        expect(toast(page)).to_contain_text("Dataset folder: dataset_dir")
        expect(toast(page)).to_contain_text("is not a folder")
        # Max steps at the embedding's step: refused up front too.
        set_value(page, "tinv-train-dataset_dir", str(data))
        set_value(page, "tinv-train-max_steps", 2)
        page.get_by_role("button", name="Start training").click()
        expect(toast(page)).to_contain_text("Max steps: max_steps is 2, but 'errs' has already been trained for 2 steps")
        expect(progress).to_contain_text("errs: step 2/2 · finished")
        expect(progress).not_to_contain_text("failed")

        # While pre-flight reads the dataset (here slowly: a backtracking filename regex on 8 long names, 0.25 s
        # each), the Message box says so; after the refusal it shows the last job's message again.
        slow = tmp_path / "slow"
        write_images(slow, 8)
        for number, image in enumerate(sorted(slow.glob("*.png"))):
            image.rename(slow / ("a" * (50 + number) + "!.png"))
        set_value(page, "tinv-train-dataset_dir", str(slow))
        set_value(page, "tinv-train-max_steps", 4)
        page.get_by_text("Advanced", exact=True).click()
        set_value(page, "tinv-train-filename_regex", "(a|aa)+$")
        message = field(page, "tinv-train-message")
        page.get_by_role("button", name="Start training").click()
        expect(message).to_have_value("errs: loading images (checking the settings and the dataset)...")
        expect(toast(page)).to_contain_text("Filename regex: filename_regex '(a|aa)+$' took over", timeout=30_000)
        expect(message).to_have_value(re.compile(r"^Training finished at step 2"))
        expect(progress).to_contain_text("errs: step 2/2 · finished")
        page.close()

    # Through the API: a value out of range and a choice that is not one; each names the field.
    client = Client(app.url, verbose=False)
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/start_training"]["parameters"]
    base = {**{p["parameter_name"]: p["parameter_default"] for p in params}, "embedding": "errs",
            "dataset_dir": str(data), "max_steps": 4, "preview_every": 0, "save_every": 0}
    for wrong, expected in (({"max_steps": 0}, "Max steps: max_steps is 0; it must be at least 1"),
                            ({"clip_grad_mode": "bogus"}, "Gradient clipping: clip_grad_mode is 'bogus'; choose one of "
                                                          "disabled, value, norm"),
                            ({"batch_size": "many"}, "Batch size: batch_size is 'many'; enter a number")):
        with pytest.raises(AppError) as info:
            client.predict(**{**base, **wrong}, api_name="/start_training")
        assert expected in str(info.value)
    client.close()
    assert app.log_text().count("Traceback") == tracebacks  # a user's mistake is not logged as a crash


def test_the_train_list_picks_up_a_dropped_embedding_without_refresh(app, tmp_path):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = open_page(browser, app.url)
        create(page, "listed")
        page.get_by_role("tab", name="Train").click()
        shutil.copyfile(app.dirs["embeddings"] / "listed.pt", app.dirs["embeddings"] / "dropped-in.pt")
        page.wait_for_timeout(4_000)  # one list refresh later, no click on Refresh
        page.locator("#tinv-train-embedding input").click()
        expect(page.get_by_role("option", name="dropped-in", exact=True)).to_be_visible(timeout=10_000)
        page.close()
