"""The docs point at real things: every test named in docs/reliability.md exists, the README links the docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_functions() -> dict[str, set[str]]:
    out = {}
    for path in (REPO / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        out[path.name] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return out


test_functions.__test__ = False  # a helper, not a test


def test_every_test_named_in_the_reliability_table_exists():
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    found = test_functions()
    every = set().union(*found.values())
    pairs = re.findall(r"(test_\w+\.py)::(test_\w+)", text)
    assert len(pairs) > 40
    missing = [f"{f}::{t}" for f, t in pairs if t not in found.get(f, set())]
    assert missing == []
    bare = set(re.findall(r"(?<![:\w])(test_\w+)(?![\w.])", text)) - {t for _, t in pairs}
    assert bare - every == set()


def test_every_table_row_has_a_test():
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Case")]
    assert len(rows) >= 30
    for row in rows:
        assert "test_" in row.rsplit("|", 2)[-2], f"no test named in: {row[:80]}"


def test_readme_links_the_docs_and_screenshots():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for link in re.findall(r"\]\(((?:docs|bench|models)/[^)]+)\)", readme):
        assert (REPO / link).exists(), link
    for needed in ("docs/reliability.md", "docs/screenshots/create.png", "docs/screenshots/train.png",
                   "docs/screenshots/generate.png"):
        assert f"]({needed})" in readme, needed
