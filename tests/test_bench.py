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
VERSUS = ROOT / "bench" / "versus.py"


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
    s = m["startup_s"]  # start-up to the first step: imports + load + the first train() call to its first step
    assert s["imports_s"] > 0 and s["to_first_step_s"] > s["imports_s"] + s["load_s"]
    assert "start-up to first step" in done.stdout
    assert all(r["timed_steps"] == bench.QUICK.steps for r in m["train_runs"])
    assert results["meta"]["model"].startswith("tiny") and results["meta"]["torch"]
    assert results["pass"] is None  # a CPU/tiny run is not judged against the H100 targets
    assert "optimizer_steps_per_s_batch1" in done.stdout and "not judged" in done.stdout
    # The trained embedding was written by the trainer each run (the bench resets it to step 0 first).
    assert (tmp_path / "work" / "embeddings" / "benchemb.pt").is_file()


def test_quick_tiny_sdxl_run_trains_and_generates_a_pair(tmp_path, cache_dir, bench):
    """`--family sdxl --tiny`: the CPU run on the tiny SDXL model trains the clip_l/clip_g pair and generates."""
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--family", "sdxl", "--quick", "--device", "cpu", "--threads", "1",
           "--batches", "1", "--work", str(tmp_path / "work"), "--cache-dir", str(cache_dir), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    meta, m = results["meta"], results["metrics"]
    assert meta["family"] == "SDXL" and meta["model"].startswith("tiny SDXL") and meta["size"] == 128
    assert m["optimizer_steps_per_s_batch1"] > 0 and m["generate_s_per_image_batch1"] > 0
    assert results["pass"] is None
    from tinv_ui import formats

    trained = formats.read(tmp_path / "work" / "embeddings" / "benchemb.safetensors")
    assert trained.is_sdxl and trained.step == bench.QUICK.warmup + bench.QUICK.steps


@pytest.fixture(scope="module")
def versus(bench):
    """bench/versus.py imported as a module (it imports bench.py, already loaded by the `bench` fixture)."""
    spec = importlib.util.spec_from_file_location("tinv_versus", VERSUS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_versus_runs_diffusers_script_and_tinv_cli_side_by_side(tmp_path, cache_dir, versus):
    """The side-by-side mode on the tiny model: diffusers' textual_inversion.py and tinv-ui's CLI, one pair."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(VERSUS), "--tiny", "--steps", "3", "--work", str(work), "--cache-dir", str(cache_dir),
           "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads((out / "versus.json").read_text(encoding="utf-8"))
    runs = {r["impl"]: r for r in results["runs"]}
    assert set(runs) == {"tinv-ui", "diffusers"} and not results["skipped"]
    for r in runs.values():  # each child trained all its steps, timed from its own progress output
        assert r["rc"] == 0 and r["steps_seen"] == 3 and (r["batch"], r["grad_accum"]) == (1, 4)
        assert r["samples_per_s"] > 0 and 0 < r["loop_s"] < r["first_step_s"] and r["peak_gib"] > 0.05
    # both trained for real: diffusers saved its learned vector, tinv-ui its embedding at step 3
    assert (work / "versus-diffusers" / "learned_embeds.safetensors").is_file()
    from tinv_ui import formats

    assert formats.read(work / "versus-tinv" / "embeddings" / "versusemb.pt").step == 3
    ratio = runs["tinv-ui"]["samples_per_s"] / runs["diffusers"]["samples_per_s"]
    assert f"samples/s {round(ratio, 2):g}x" in done.stdout and "start-up" in done.stdout


def test_versus_summary_takes_medians_over_pairs_and_fills_the_targets_table(versus):
    def child(impl, recipe, pair, sps, first, peak, batch=1, accum=4):
        return {"impl": impl, "recipe": recipe, "pair": pair, "rc": 0, "batch": batch, "grad_accum": accum,
                "samples_per_s": sps, "steps_per_s": sps / (batch * accum), "first_step_s": first, "peak_gib": peak}

    docs, best = "docs fp32 bs1 ga4", "best fp16 bs8"
    runs = [child("diffusers", docs, 0, 8.0, 20.0, 5.0), child("tinv-ui", docs, 0, 20.0, 10.0, 2.0),
            child("tinv-ui", docs, 1, 16.0, 12.0, 2.0), child("diffusers", docs, 1, 6.0, 30.0, 5.0),
            child("diffusers", docs, 2, 7.0, 25.0, 5.0), child("tinv-ui", docs, 2, 30.0, 11.0, 2.0),
            {**child("diffusers", docs, 3, 99.0, 1.0, 1.0), "rc": 1},  # a failed child does not count
            child("diffusers", best, 0, 25.0, 40.0, 9.0, 8, 1), child("tinv-ui", best, 0, 100.0, 12.0, 4.0, 8, 1),
            {"impl": "tinv-ui", "section": "train", "batch": 1, "mode": "eager", "samples_per_s": 21.0,
             "steps_per_s": 21.0, "peak_gib": 2.5},
            {"impl": "tinv-ui", "section": "train", "batch": 16, "mode": "compiled", "samples_per_s": 160.0,
             "steps_per_s": 10.0, "peak_gib": 6.0},
            {"impl": "tinv-ui", "section": "generate", "batch": 1, "s_per_image": 0.4, "images_per_s": 2.5},
            {"impl": "tinv-ui", "section": "generate", "batch": 8, "s_per_image": 0.1, "images_per_s": 10.0},
            {"impl": "diffusers", "section": "generate", "batch": 1, "s_per_image": 1.1, "images_per_s": 0.9},
            {"impl": "diffusers", "section": "generate", "batch": 8, "s_per_image": 0.15, "images_per_s": 6.4}]
    results = {"meta": {"device": "NVIDIA H200", "size": 512}, "runs": runs, "skipped": []}
    pairs = versus.pair_summary(results)
    first = pairs[0]
    assert first["recipe"] == docs and first["diffusers"]["runs"] == 3 and first["tinv-ui"]["runs"] == 3
    assert first["tinv-ui"]["samples_per_s"] == 20.0 and first["diffusers"]["samples_per_s"] == 7.0  # medians
    assert first["ratios"] == {"samples_per_s": 2.86, "loop_s": None, "first_step_s": 0.44, "peak_gib": 0.4}
    rows = {name: (t, d) for name, t, d, _ in versus.targets_rows(results, pairs)}
    assert rows["training samples/s, best batch"] == (160.0, 25.0)
    assert rows["optimizer steps/s, batch 1"] == (21.0, 1.75)  # diffusers: docs recipe, 7 samples/s at ga 4
    assert rows["peak memory at batch 1, GiB"] == (2.5, 5.0)
    assert rows["20-step 512 px image, batch 1, s"] == (0.4, 1.1)
    assert rows["images/s at batch 8"] == (10.0, 6.4)
    assert rows["start-up to first step, 20 images, s"] == (12.0, 40.0)  # the best-recipe pair, as on the GPU
    text = versus.table(results)
    assert "samples/s 2.86x" in text and "160" in text


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
