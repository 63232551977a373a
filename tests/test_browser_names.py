"""Embedding names are shown as text in the page: a file named like HTML or Markdown renders literally (issue 12)."""

from __future__ import annotations

import pytest
import torch

from browser_app import browser_marks, chromium, open_page, running_app

pytestmark = browser_marks

NAMES = ["<img src=x onerror=alert(1)>", "**x**"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    from tinv_ui import formats
    from tinv_ui.embedding import Embedding

    cwd = tmp_path_factory.mktemp("app")
    (cwd / "embeddings").mkdir()
    for i, name in enumerate(NAMES):  # loaded: width 32 fits the tiny model
        formats.write(Embedding(name, torch.full((1, 32), float(i))), cwd / "embeddings" / f"{name}.pt")
    formats.write(Embedding("w", torch.zeros(1, 768)), cwd / "embeddings" / "<b>wide<b>.pt")  # skipped: SD 1.x width
    with running_app(cwd, cache_dir) as running:
        yield running


def test_html_and_markdown_in_embedding_names_render_as_text(app):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = open_page(browser, app.url)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.get_by_role("tab", name="Generate").click()
        info = page.locator("#tinv-library-info")
        expect(info).to_contain_text("2 embeddings loaded", timeout=15_000)
        text = info.inner_text()
        for name in NAMES:
            assert name in text
        assert "skipped <b>wide<b> (<b>wide<b>.pt)" in text
        assert info.locator("img, strong:has-text('x'), b").count() == 0
        assert page.locator("img[src=x]").count() == 0 and dialogs == []
        page.locator("#tinv-insert-embedding input").click()  # the dropdown lists them as text too
        expect(page.get_by_role("option", name=NAMES[0], exact=True)).to_have_count(1)
        assert page.locator("img[src=x]").count() == 0 and dialogs == []
        page.close()
