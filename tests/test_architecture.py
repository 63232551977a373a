"""Architecture rules that are cheap to check mechanically."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tinv_ui

PACKAGE = Path(tinv_ui.__file__).parent
ROOT = PACKAGE.parent

_IMPORT_ALL_CORE = """
import importlib, os, pkgutil, sys
import tinv_ui

def walk(path, prefix):
    # pkgutil.walk_packages would import tinv_ui.ui itself to look inside it; walk the folders instead
    for m in pkgutil.iter_modules([path]):
        name = prefix + m.name
        if name in ("tinv_ui.ui", "tinv_ui.__main__"):
            continue
        yield name
        if m.ispkg:
            yield from walk(os.path.join(path, m.name), name + ".")

names = list(walk(tinv_ui.__path__[0], "tinv_ui."))
for name in names:
    importlib.import_module(name)
print(",".join(names))
print("GRADIO" if "gradio" in sys.modules else "CLEAN")
"""


def _core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "ui" not in p.relative_to(PACKAGE).parts[:1]]


def test_core_modules_import_without_gradio():
    """Import every module outside tinv_ui/ui in a fresh interpreter: gradio must not be loaded."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL_CORE], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names_line, verdict = proc.stdout.strip().splitlines()[-2:]
    names = names_line.split(",")
    assert {"tinv_ui.formats", "tinv_ui.library", "tinv_ui.create", "tinv_ui.cli"} <= set(names)
    assert verdict == "CLEAN"


def test_core_sources_never_name_gradio():
    offenders = []
    for path in _core_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {m}" for m in mods if m.split(".")[0] == "gradio"]
    assert offenders == []


def test_print_only_in_the_cli():
    """Core modules log; only cli.py writes to stdout."""
    offenders = []
    for path in _core_files():
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
