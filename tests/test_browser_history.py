"""Run history in the browser: runs trained before the app started are listed, opened, and a step is used.

The runs are trained through the core in this process before `python app.py` starts, as by an earlier app
process or the CLI: only what is on disk in outputs/train/ can show them.
"""

from __future__ import annotations

import os
import re

import torch

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, set_value, shoot
from conftest import write_images

pytestmark = browser_marks


def _train_before_the_app(studio, tmp_path, cache_dir):
    from tinv_ui import runs
    from tinv_ui.config import CreateConfig, Paths, TrainConfig
    from tinv_ui.create import create_embedding
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.training import train

    paths = Paths(tmp_path / "app" / "embeddings", tmp_path / "app" / "outputs", tmp_path / "app" / "models", cache_dir)
    write_images(tmp_path / "data", 3)
    for name, steps in (("hist", 4), ("older", 2)):
        create_embedding(studio, CreateConfig(name=name, initializer="painting"), paths.embeddings_dir)
        cfg = TrainConfig(embedding=name, dataset_dir=str(tmp_path / "data"), template="subject_filewords", max_steps=steps,
                          width=64, height=64, learn_rate="0.05", save_every=2, preview_every=2, preview_steps=2,
                          batch_size=1, seed=3)
        list(train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    root = runs.log_root(paths.outputs_dir)
    odd = root / "2020-01-01" / "<b>odd"  # a folder another tool left: its name is shown, not rendered
    odd.mkdir(parents=True)
    (odd / runs.LOSS_CSV).write_text("step,epoch,epoch_step,loss,learn_rate\n1,0,1,0.5,0.1\n")
    os.utime(odd, (1577872800, 1577872800))  # without settings its start is the folder's time: 2020-01-01
    return paths, runs.list_runs(root, "hist")[0]


def test_runs_from_an_earlier_process_are_listed_opened_and_a_step_is_used(studio, tmp_path, cache_dir):
    from playwright.sync_api import expect

    from tinv_ui import formats

    paths, run = _train_before_the_app(studio, tmp_path, cache_dir)
    loss = f"{run.final_loss():.4f}"
    with running_app(tmp_path / "app", cache_dir) as app, chromium() as browser:
        page = open_page(browser, app.url)
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#tinv-train-progress")).to_contain_text("No run in this session; 3 earlier runs under Runs")
        page.wait_for_timeout(2500)  # a few ticks of the poll timer the Runs view watches: the line stays
        expect(page.locator("#tinv-train-progress")).to_contain_text("No run in this session; 3 earlier runs under Runs")

        page.get_by_role("tab", name="Runs").click()
        table = page.locator("#tinv-runs-table")
        expect(table).to_contain_text(f"{run.started:%Y-%m-%d %H:%M:%S}")
        for text in ("hist", "4/4", loss, "older", "2/2", "<b>odd"):
            expect(table).to_contain_text(text)
        expect(table.locator("b")).to_have_count(0)
        shown = table.inner_text()
        assert shown.index("older") < shown.index("hist") < shown.index("odd")  # newest first

        # Open the run by clicking its row: previews, loss curve and settings.
        table.get_by_text("hist", exact=True).click()
        summary = page.locator("#tinv-runs-summary")
        expect(summary).to_contain_text(f"4 of 4 steps, final loss {loss}")
        expect(summary).to_contain_text("Saved copies at steps 2, 4; 2 previews")
        expect(page.locator("#tinv-runs-previews img")).to_have_count(2)
        expect(page.locator("#tinv-runs-previews")).to_contain_text("step 4")
        expect(page.locator("#tinv-runs-loss [aria-label^=\"X-axis titled 'step'\"]")).to_have_attribute(
            "aria-label", re.compile(r"values from 1(\.0)? to 4(\.0)?$"))
        settings = page.locator("#tinv-runs-settings")
        expect(settings).to_contain_text("Learning rate")
        expect(settings).to_contain_text("0.05")
        expect(field(page, "tinv-runs-name")).to_have_value("hist")
        shoot(page, tmp_path, "history")

        # Use step 2 under a new name: Generate's dropdown offers it, the file holds step 2's vectors.
        pick_option(page, "tinv-runs-step", "2")
        set_value(page, "tinv-runs-name", "hist-2")
        page.get_by_role("button", name="Use this step").click()
        expect(field(page, "tinv-runs-status")).to_have_value("Step 2 of hist is now embeddings/hist-2.pt.")
        used = formats.read(paths.embeddings_dir / "hist-2.pt")
        assert used.step == 2 and torch.equal(used.vectors, formats.read(run.copies[2]).vectors)
        page.get_by_role("tab", name="Generate").click()
        page.locator("#tinv-insert-embedding input").click()
        expect(page.get_by_role("option", name="hist-2", exact=True)).to_have_count(1)
        page.keyboard.press("Escape")

        # The embedding's own name is taken: refused until overwrite is ticked.
        page.get_by_role("tab", name="Train").click()
        own = paths.embeddings_dir / "hist.pt"
        before = own.read_bytes()
        set_value(page, "tinv-runs-name", "hist")
        page.get_by_role("button", name="Use this step").click()
        expect(page.locator("[data-testid=toast-text]").last).to_contain_text("already exists")
        expect(page.locator("[data-testid=toast-text]").last).to_contain_text("turn on overwrite")
        assert own.read_bytes() == before
        page.locator("#tinv-runs-overwrite input").check()
        page.get_by_role("button", name="Use this step").click()
        expect(field(page, "tinv-runs-status")).to_have_value("Step 2 of hist is now embeddings/hist.pt.")
        assert formats.read(own).step == 2

        # A run started here appears in the list by itself when it ends (the view stays on Runs meanwhile).
        pick_option(page, "tinv-train-embedding", "hist-2")
        set_value(page, "tinv-train-dataset_dir", str(tmp_path / "data"))
        set_value(page, "tinv-train-max_steps", 3)
        page.get_by_role("button", name="Start training").click()
        expect(table).to_contain_text(re.compile(r"hist-2\s+\S+ \S+\s+3/3\s"), timeout=40_000)
        expect(table).to_contain_text("4/4")
