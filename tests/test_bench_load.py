"""`bench/bench.py --load`: the model-load measurement (seconds, peak RAM) runs and reports its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_measurement_reports_seconds_and_peak_ram(tmp_path, cache_dir):
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--load", "--tiny", "--device", "cpu", "--threads", "1",
           "--work", str(tmp_path / "work"), "--cache-dir", str(cache_dir), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text(encoding="utf-8"))["load"]
    assert r["model"].startswith("tiny") and r["load_s"] > 0 and r["reload_s"] > 0
    assert 0 < r["rss_start_gib"] < r["peak_rss_gib"] and r["peak_above_start_gib"] >= 0
    assert "load tiny test model (random weights) on cpu/float32:" in done.stdout and "peak RSS" in done.stdout
