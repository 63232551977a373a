"""The benchmark script: the CPU smoke run on the tiny model works end to end and reports every metric."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    """bench/bench.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("tinv_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_tiny_run_reports_every_metric(tmp_path, cache_dir, bench):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--quick", "--device", "cpu", "--threads", "1",
           "--work", str(tmp_path / "work"), "--cache-dir", str(cache_dir), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    m = results["metrics"]
    assert set(bench.METRIC_KEYS) <= set(m)
    assert set(m["train_samples_per_s"]["eager"]) == {"1", "4"}
    for key in ("train_best_samples_per_s", "optimizer_steps_per_s_batch1", "generate_s_per_image_batch1",
                "generate_images_per_s_batch8"):
        assert m[key] > 0, key
    assert m["peak_memory_gib_batch1"] is None  # no GPU: not measured, and said so
    assert m["startup_s"]["images"] == 20 and m["startup_s"]["load_s"] > 0 and m["startup_s"]["latent_cache_s"] > 0
    assert all(r["timed_steps"] == bench.QUICK.steps for r in m["train_runs"])
    assert results["meta"]["model"].startswith("tiny") and results["meta"]["torch"]
    assert results["pass"] is None  # a CPU/tiny run is not judged against the H100 targets
    assert "optimizer_steps_per_s_batch1" in done.stdout and "not judged" in done.stdout
    # The trained embedding was written by the trainer each run (the bench resets it to step 0 first).
    assert (tmp_path / "work" / "embeddings" / "benchemb.pt").is_file()


def _result(**metrics):
    base = {"train_samples_per_s": {"eager": {"1": 10.0}},
            "startup_s": {"images": 20, "load_s": 1.0, "latent_cache_s": 0.5}}
    meta = {"device": "NVIDIA H100 80GB HBM3", "model": "sd15-random", "size": 512, "dtype": "bfloat16",
            "torch": "2.13", "diffusers": "0.42.1", "date": "2026-11-23"}
    return {"meta": meta, "metrics": {**base, **metrics}}


def test_targets_are_judged_only_on_comparable_runs(bench):
    results = _result(train_best_samples_per_s=160.0, optimizer_steps_per_s_batch1=19.0, peak_memory_gib_batch1=2.5,
                      generate_s_per_image_batch1=0.5, generate_images_per_s_batch8=None)
    results["pass"] = bench.verdicts(results)
    assert results["pass"] == {"train_best_samples_per_s": True, "optimizer_steps_per_s_batch1": False,
                               "peak_memory_gib_batch1": True, "generate_s_per_image_batch1": False,
                               "generate_images_per_s_batch8": None}
    text = bench.table(results)
    assert "160 ok" in text and "19 MISS" in text and "0.5 MISS" in text and "n/a" in text
    results["meta"]["device"] = "CPU (2 cores)"
    assert bench.verdicts(results) is None


@pytest.mark.slow
def test_sd15_shaped_model_builds_offline(tmp_path, cache_dir, bench):
    """The GPU bench's model: SD1.5 shapes from the shipped configs, the real tokenizer, saved fp16 (2 GB)."""
    from tinv_ui.config import ModelSpec, Paths
    from tinv_ui.studio import Studio

    folder = bench.build_sd15(tmp_path / "sd15-random", cache_dir)
    studio = Studio(Paths(cache_dir=cache_dir))
    info = studio.load(ModelSpec(str(folder), device="cpu"))
    assert (info.resolution, studio.embedding_width) == (512, 768)
    assert sum(p.numel() for p in studio.pipeline.unet.parameters()) == 859_520_964
    assert studio.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.gpu
def test_gpu_quick_run_measures_memory(tmp_path, cache_dir):
    """On a CUDA machine the default run uses the SD1.5-shaped model at 512 px and measures GPU memory."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--batches", "1", "--work", str(tmp_path / "work"),
           "--cache-dir", str(cache_dir), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["meta"]["size"] == 512 and results["pass"] is not None
    assert 0 < results["metrics"]["peak_memory_gib_batch1"] < 80
