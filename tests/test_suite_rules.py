"""The suite itself: a run without chromium is red unless the person opts out, and then it says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pytest_run(**env: str) -> subprocess.CompletedProcess:
    """The lightest browser module, with chromium pointed at a path that does not exist."""
    environ = {k: v for k, v in os.environ.items() if k != "TINV_SKIP_BROWSER"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_browser_generate.py"], cwd=REPO,
                          env={**environ, "TINV_CHROMIUM": "/nonexistent/chromium", **env},
                          capture_output=True, text=True, timeout=300)


def test_browser_tests_fail_without_chromium():
    result = pytest_run()
    assert result.returncode != 0, result.stdout[-2000:]
    assert "/nonexistent/chromium is missing" in result.stdout
    assert "set TINV_SKIP_BROWSER=1 to skip" in result.stdout


def test_the_opt_out_skips_them_and_the_summary_says_so():
    result = pytest_run(TINV_SKIP_BROWSER="1")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "browser tests skipped" in result.stdout
    assert "1 browser test(s) did NOT run: TINV_SKIP_BROWSER=1 is set" in result.stdout
