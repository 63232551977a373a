"""The Train tab's "Compare steps" view in headless Chromium: pick a run, render its saved steps, get the saved
labelled grid with its parameters."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app, shoot
from tinv_ui import formats
from tinv_ui.embedding import Embedding

pytestmark = browser_marks


def write_run(outputs, day: str, name: str, steps: list[int]) -> None:
    """A finished run of the tiny model (32-wide vectors), with fast preview settings the view starts from."""
    folder = outputs / "train" / day / name
    for step in steps:
        vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(step)) * 3
        formats.write(Embedding(f"{name}-{step}", vectors, step=step), folder / "embeddings" / f"{name}-{step}.pt")
    (folder / f"settings-{day}-10-00-00.json").write_text(json.dumps({
        "embedding_name": name, "preview_prompt": f"a painting of {name}", "preview_steps": 2, "preview_seed": 77,
        "preview_width": 64, "preview_height": 64, "steps": max(steps)}))


@pytest.fixture
def page_and_app(tmp_path, cache_dir):
    write_run(tmp_path / "outputs", "2026-12-01", "alpha", [2, 4])
    write_run(tmp_path / "outputs", "2026-12-03", "gamma", [1])  # newer: listed first
    with running_app(tmp_path, cache_dir) as app, chromium() as browser:
        yield open_page(browser, app.url), app


def test_a_run_is_picked_rendered_and_its_grid_saved_with_infotext(page_and_app, tmp_path):
    from playwright.sync_api import expect

    page, app = page_and_app
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("tab", name="Compare steps").click()
    # Each view's button once (a component outside every gr.Tab made Gradio draw this one twice once selected).
    expect(page.locator("#tinv-train-views [role=tab]")).to_have_text(["Current run", "Runs", "Compare steps"])
    run = page.locator("#tinv-compare-run input")
    expect(run).to_have_value(re.compile(r"^gamma · 2026-12-03 10:00"))
    pick_option(page, "tinv-compare-run", "alpha · 2026-12-01 10:00 · steps 2–4 (2) · alpha")
    copies = page.locator("#tinv-compare-copies")
    expect(copies.get_by_label("step 2")).to_be_checked()
    expect(copies.get_by_label("step 4")).to_be_checked()
    expect(field(page, "tinv-compare-prompt")).to_have_value("a painting of alpha")

    page.locator("#tinv-compare-render").click()
    expect(page.locator("#tinv-compare-progress")).to_contain_text("Done: 2 steps, seed 77; grid saved.", timeout=90_000)
    expect(page.locator("#tinv-compare-grid img")).to_be_visible()
    saved = field(page, "tinv-compare-saved")
    expect(saved).to_have_value(re.compile(r"compare/alpha-\d{8}-\d{6}\.png$"))
    [path] = list((app.dirs["outputs"] / "compare").glob("alpha-*.png"))
    with Image.open(path) as grid:
        assert grid.width == 2 * 64 and grid.height > 64  # two 64 px cells side by side, labels above
        text = grid.text["parameters"]
    assert text.startswith("a painting of alpha\nSteps: 2, ") and 'Embedding steps: "2, 4"' in text
    assert "Seed: 77," in text and "Training run: train/2026-12-01/alpha" in text
    expect(field(page, "tinv-compare-infotext")).to_have_value(text)
    shoot(page, tmp_path, "compare")
