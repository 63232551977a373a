"""tinv-ui next to diffusers' `textual_inversion.py`, in one run, on the same model, images and device.

    python bench/versus.py                          # GPU: SD1.5-shaped random model, 512 px, then the targets table
    python bench/versus.py --device cpu --size 128  # the SD1.5 shape on the CPU (pairs only; minutes per run)
    python bench/versus.py --tiny                   # CPU smoke test on the tiny model (tests/test_bench.py)

1. Pairs. Each training recipe is run as two child processes, diffusers' script (`bench/anchor/`, the
   torchvision-free copy) and tinv-ui's CLI (`python -m tinv_ui ... train`), one after the other, the order
   alternating from pair to pair so that a machine getting busier or cooler favours neither. Each child is timed
   from its own progress lines (diffusers' tqdm bar, tinv-ui's `step N/M`): samples/s over the steps after the
   warm-up, start-up as process start -> first optimizer step done, and peak memory (GPU: the process's own
   memory in nvidia-smi, the same reading for both; CPU: the process's peak resident set, VmHWM).
   Recipes: the diffusers docs recipe (fp32, batch 1, gradient accumulation 4) and, on CUDA, its best setting
   (fp16, batch 8). tinv-ui runs the same batch and accumulation in the app's default precision.
2. Targets (CUDA, unless `--pairs-only`): tinv-ui's trainer and generator in process (`bench.py`'s
   measurements: `train()` eager and compiled, `render()` eager and compiled) next to the stock
   `StableDiffusionPipeline`, then one table with the issue's targets: training samples/s at the best batch,
   optimizer steps/s and peak memory at batch 1, 20-step image time, images/s at batch 8, start-up to first step
   with 20 images; each next to diffusers' figure.

Phases run in that order and each one is skipped, with a line saying so, when its estimate does not fit in
`--budget` seconds; every result is printed (`RESULT {...}`) and saved to `<out>/versus.json` as soon as it is
measured, so a run cut short still reports what it measured. The table comes last (`<out>/versus_table.txt`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

T0 = time.monotonic()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench  # noqa: E402  (bench/bench.py: model build, images, in-process measurements)

ANCHOR = HERE / "anchor" / "textual_inversion_patched.py"
NUM_IMAGES = bench.NUM_IMAGES  # 20: the start-up target is "to the first step with 20 images"


def main(argv: list[str] | None = None) -> int:
    """Run the pairs (and on CUDA the targets phases), print the table, write the JSON."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a terminated run still prints what it measured
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error",
                      HF_HUB_DISABLE_PROGRESS_BARS="1")
    run = Run(args)
    try:
        run.all()
    except KeyboardInterrupt:
        run.log("interrupted: printing what was measured")
    except Exception as e:  # print what was measured, then fail
        import traceback

        traceback.print_exc()
        run.results["fatal"] = repr(e)[:500]
    run.save()
    text = table(run.results)
    (args.out / "versus_table.txt").write_text(text)
    sys.stdout.write("\n" + text)
    return 1 if run.results.get("fatal") else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tinv-ui vs diffusers' textual_inversion.py, side by side.")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 64 px, a few steps, pairs only.")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available).")
    p.add_argument("--size", type=int, default=None, help="Image size (default 512; 64 with --tiny).")
    p.add_argument("--pairs", type=int, default=1, help="Interleaved pairs per recipe (default 1).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per child run (default 20 GPU, 6 CPU).")
    p.add_argument("--pairs-only", action="store_true", help="Skip the in-process targets phases.")
    p.add_argument("--budget", type=float, default=480.0, help="Seconds for the whole run; phases that would not "
                   "fit are skipped (default 480).")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench", help="Scratch folder (models, images).")
    p.add_argument("--cache-dir", type=Path, default=None, help="tinv-ui cache: tokenizer, tiny model "
                   "(default <work>/cache).")
    p.add_argument("--out", type=Path, default=None, help="Results folder (default <work>/versus).")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.out = (args.out or args.work / "versus").resolve()
    args.cache_dir = (args.cache_dir or args.work / "cache").resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


class Run:
    """One side-by-side run: the settings, the results so far and the time left."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") and not args.tiny
        self.device = "cuda" if self.cuda else "cpu"
        self.size = args.size or (64 if args.tiny else 512)
        self.steps = args.steps or (20 if self.cuda else 6)
        self.env = {**os.environ, "TQDM_MININTERVAL": "0", "PYTHONUNBUFFERED": "1"}
        if not self.cuda:
            self.env.setdefault("OMP_NUM_THREADS", "1")  # steady figures on a shared CPU
        self.results: dict[str, Any] = {"meta": {}, "runs": [], "skipped": []}

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget - (time.monotonic() - T0)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        (self.args.out / "versus.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def emit(self, rec: dict) -> None:
        self.results["runs"].append(rec)
        print("RESULT " + json.dumps(rec), flush=True)
        self.save()

    def fits(self, name: str, estimate_s: float) -> bool:
        if self.left() >= estimate_s:
            return True
        self.results["skipped"].append({"phase": name, "estimate_s": estimate_s, "left_s": round(self.left(), 1)})
        self.log(f"SKIPPED {name}: needs ~{estimate_s:.0f}s, {self.left():.0f}s left")
        self.save()
        return False

    # -- the run -------------------------------------------------------------------------------------------------
    def all(self) -> None:
        self.results["meta"] = self.meta()
        self.save()
        self.log(json.dumps(self.results["meta"]))
        t = time.perf_counter()
        model = self.model()
        images = bench.write_images(self.args.work / f"images-{self.size}", NUM_IMAGES, self.size)
        self.results["meta"].update(model=str(model), build_s=round(time.perf_counter() - t, 1))
        self.log(f"model {model} and {NUM_IMAGES} images ready")
        # 1. the pairs: child processes, before anything of ours holds GPU memory
        recipes = [("docs fp32 bs1 ga4", "no", 1, 4)]
        if self.cuda:
            recipes.append(("best fp16 bs8", "fp16", 8, 1))
        est = 90 if self.cuda else 40 if self.args.tiny else 400  # a CPU step of the SD1.5 shape takes ~10-60 s
        for i in range(self.args.pairs):
            for label, precision, batch, accum in recipes:
                order = (self.diffusers, self.tinv_cli) if i % 2 == 0 else (self.tinv_cli, self.diffusers)
                for child in order:
                    child(model, images, label, precision, batch, accum, pair=i, est=est)
        # 2. the targets table's in-process figures (CUDA)
        if self.cuda and not self.args.pairs_only:
            self.targets(model, images)

    def meta(self) -> dict[str, Any]:
        from importlib.metadata import version  # not importing diffusers here: this process only times others

        import torch

        return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "device": torch.cuda.get_device_name(0) if self.cuda else f"CPU ({os.cpu_count()} cores)",
                "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": version("diffusers"),
                "transformers": version("transformers"), "python": sys.version.split()[0], "size": self.size,
                "tiny": self.args.tiny, "steps": self.steps, "pairs": self.args.pairs, "budget_s": self.args.budget}

    def model(self) -> Path:
        """The tiny model, or the SD1.5-shaped random one saved in fp32 (the diffusers script trains fp32 weights
        under autocast; fp16 weights would fail its fp16 gradient unscaling)."""
        import torch

        if self.args.tiny:
            from tinv_ui.tiny_model import tiny_model_dir

            return tiny_model_dir(self.args.cache_dir)
        return bench.build_sd15(self.args.work / "models" / "sd15-random-fp32", self.args.cache_dir, torch.float32)

    # -- child processes -----------------------------------------------------------------------------------------
    def diffusers(self, model: Path, images: Path, label: str, precision: str, batch: int, accum: int, pair: int,
                  est: float) -> None:
        if not self.fits(f"diffusers {label} (pair {pair})", est):
            return
        out = self.args.work / "versus-diffusers"
        cmd = [sys.executable, str(ANCHOR), "--pretrained_model_name_or_path", str(model), "--train_data_dir",
               str(images), "--learnable_property", "object", "--placeholder_token", "<bench-tok>",
               "--initializer_token", "toy", "--resolution", str(self.size), "--train_batch_size", str(batch),
               "--gradient_accumulation_steps", str(accum), "--max_train_steps", str(self.steps),
               "--learning_rate", "5e-4", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
               "--seed", "0", "--mixed_precision", precision, "--save_steps", "100000",
               "--checkpointing_steps", "100000", "--output_dir", str(out)]
        rec = self.child(cmd, r"Steps:.*?\|\s*(\d+)/(\d+)", batch * accum, est, f"diffusers-{pair}-{batch}",
                         loop=r"\*\*\*\*\* Running training \*\*\*\*\*")
        self.emit({"impl": "diffusers", "recipe": label, "pair": pair,
                   "precision": {"no": "fp32"}.get(precision, precision), "batch": batch, "grad_accum": accum, **rec})

    def tinv_cli(self, model: Path, images: Path, label: str, precision: str, batch: int, accum: int, pair: int,
                 est: float) -> None:
        if not self.fits(f"tinv-ui {label} (pair {pair})", est):
            return
        work = self.args.work / "versus-tinv"
        fresh_embedding_file(model, work / "embeddings" / "versusemb.pt")
        cmd = [sys.executable, "-m", "tinv_ui", "--model", str(model), "--device", self.device,
               "--cache-dir", str(self.args.cache_dir), "--embeddings-dir", str(work / "embeddings"),
               "--outputs-dir", str(work / "outputs"), "train", "--embedding", "versusemb", "--dataset-dir",
               str(images), "--template", "subject", "--width", str(self.size), "--height", str(self.size),
               "--batch-size", str(batch), "--gradient-accumulation", str(accum), "--max-steps", str(self.steps),
               "--seed", "0", "--preview-every", "0", "--save-every", "0", "--compile", "off"]
        rec = self.child(cmd, r"^step (\d+)/(\d+)", batch * accum, est, f"tinv-{pair}-{batch}", loop=r"^started: ")
        self.emit({"impl": "tinv-ui", "recipe": label, "pair": pair, "precision": "app default", "batch": batch,
                   "grad_accum": accum, **rec})

    def child(self, cmd: list[str], progress: str, samples_per_step: int, est: float, tag: str,
              loop: str) -> dict[str, Any]:
        """Run `cmd`; stamp its training-loop line (`loop`) and each new optimizer step; poll its peak memory."""
        pattern, loop_pattern = re.compile(progress), re.compile(loop)
        loop_s: list[float] = []
        seen: dict[int, float] = {}
        tail: list[str] = []
        peak: list[float] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env, cwd=str(ROOT))
        done = threading.Event()

        def pump(stream) -> None:
            buf = b""
            while chunk := os.read(stream.fileno(), 65536):
                now = time.perf_counter() - t0
                parts = re.split(rb"[\r\n]", buf + chunk)
                buf = parts.pop()
                for raw in parts:
                    line = raw.decode("utf-8", "replace")
                    if line.strip():
                        tail.append(line)
                        del tail[:-40]
                    if not loop_s and loop_pattern.search(line):
                        loop_s.append(now)
                    m = pattern.search(line)
                    if m and int(m.group(1)) > 0 and int(m.group(1)) not in seen:
                        seen[int(m.group(1))] = now

        def poll() -> None:
            while not done.wait(0.25):
                v = peak_memory_gib(proc.pid, self.cuda)
                if v is not None:
                    peak.append(v)

        threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
        threads.append(threading.Thread(target=poll, daemon=True))
        for t in threads:
            t.start()
        rc: int | str = "interrupted"
        try:
            rc = proc.wait(timeout=max(10.0, min(est * 3, self.left() - 5)))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:  # also on Ctrl-C or SIGTERM: never leave a child training on its own
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        done.set()
        for t in threads:
            t.join(5)
        (self.args.out / f"{tag}.log").write_text("\n".join(tail) + "\n")
        rec: dict[str, Any] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 2), "steps_seen": len(seen),
                               "peak_gib": round(max(peak), 3) if peak else None,
                               "loop_s": round(loop_s[0], 2) if loop_s else None,
                               "peak_kind": "nvidia-smi, this process" if self.cuda else "CPU resident set (VmHWM)"}
        rec.update(rates(seen, samples_per_step))
        if rc != 0:
            rec["error_tail"] = tail[-8:]
        return rec

    # -- in-process figures for the targets table (CUDA) ---------------------------------------------------------
    def targets(self, model: Path, images: Path) -> None:
        import torch

        from tinv_ui.config import ModelSpec, Paths
        from tinv_ui.library import EmbeddingLibrary
        from tinv_ui.studio import Studio

        work = self.args.work / "versus-inproc"
        paths = Paths(work / "embeddings", work / "outputs", work / "models", self.args.cache_dir)
        paths.embeddings_dir.mkdir(parents=True, exist_ok=True)
        studio = Studio(paths)
        clock = bench.Clock(torch.device(self.device))
        startup = bench.measure_startup(studio, ModelSpec(str(model), device=self.device), images, self.size, clock)
        self.emit({"impl": "tinv-ui", "section": "startup", **startup})
        ctx = {"name": "benchemb", "dataset": images, "size": self.size, "paths": paths,
               "library": EmbeddingLibrary(paths.embeddings_dir)}
        eager = bench.Plan(batches=(), modes=("eager",), warmup=5, compiled_warmup=10, steps=30, gen_repeats=3)
        for batch, est in ((1, 20), (8, 25), (16, 30)):
            if self.fits(f"tinv-ui train() bs{batch} eager", est):
                self.emit({"impl": "tinv-ui", "section": "train", **bench.measure_training(
                    studio, ctx, batch, "eager", eager, clock)})
        for batch, est in ((1, 20), (8, 25)):
            if self.fits(f"tinv-ui render() bs{batch} eager", est):
                self.emit({"impl": "tinv-ui", "section": "generate", "mode": "eager", **bench.measure_generation(
                    studio, batch, self.size, eager, clock)})
        if self.fits("stock pipeline fp16 eager", 45):
            stock_generation(self, model, compiled=False)
        for batch, est in ((1, 110), (16, 120)):
            if self.fits(f"tinv-ui train() bs{batch} compiled", est):
                self.emit({"impl": "tinv-ui", "section": "train", **bench.measure_training(
                    studio, ctx, batch, "compiled", eager, clock)})
        for batch, est in ((1, 100), (8, 100)):
            if self.fits(f"tinv-ui render() bs{batch} compiled", est):
                self.emit({"impl": "tinv-ui", "section": "generate", "mode": "compiled", **bench.measure_generation(
                    studio, batch, self.size, eager, clock, compiled=True)})
        if self.fits("stock pipeline fp16 compiled", 120):
            stock_generation(self, model, compiled=True)


def stock_generation(run: Run, model: Path, compiled: bool) -> None:
    """The plain `StableDiffusionPipeline` in fp16 (as the peer baseline), Euler a, 20 steps, CFG 7.5."""
    import gc

    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False).to(run.device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.unet = torch.compile(pipe.unet.to(memory_format=torch.channels_last))
    for batch in (1, 8) if not compiled else (1,):
        kw = dict(num_inference_steps=20, guidance_scale=7.5, num_images_per_prompt=batch, height=run.size,
                  width=run.size)
        pipe(bench.PROMPT, **kw)  # warm-up (and compilation)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            pipe(bench.PROMPT, **kw)
        torch.cuda.synchronize()
        s = (time.perf_counter() - t) / 3
        run.emit({"impl": "diffusers", "section": "generate", "mode": "compiled" if compiled else "eager",
                  "precision": "fp16", "batch": batch, "s_per_batch": round(s, 4), "s_per_image": round(s / batch, 4),
                  "images_per_s": round(batch / s, 3)})
    del pipe
    gc.collect()
    torch.cuda.empty_cache()


# -- helpers --------------------------------------------------------------------------------------------------------
def rates(seen: dict[int, float], samples_per_step: int) -> dict[str, Any]:
    """Start-up (process start -> first optimizer step done) and samples/s over the steps after the first third."""
    if not seen:
        return {}
    steps = sorted(seen)
    out: dict[str, Any] = {"first_step_s": round(seen[steps[0]], 2)}
    first = steps[len(steps) // 3]  # the first steps carry allocator and kernel warm-up
    last = steps[-1]
    if last > first:
        span = seen[last] - seen[first]
        out.update(samples_per_s=round(samples_per_step * (last - first) / span, 3),
                   steps_per_s=round((last - first) / span, 3), timed_steps=last - first)
    return out


def peak_memory_gib(pid: int, cuda: bool) -> float | None:
    """The process's memory now (GPU: its nvidia-smi share) or its peak so far (CPU: VmHWM), in GiB."""
    if cuda:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            p, _, mib = line.partition(",")
            if p.strip() == str(pid) and mib.strip().isdigit():
                return int(mib) / 1024
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) / 2**20 if m else None


def fresh_embedding_file(model: Path, path: Path) -> None:
    """A 1-vector embedding at step 0 (what diffusers' script trains) of the model's text width, seeded random:
    only the speed is compared, so the initial values do not matter."""
    import torch

    from tinv_ui import formats
    from tinv_ui.embedding import Embedding

    config = json.loads((model / "text_encoder" / "config.json").read_text())
    width = int(config.get("hidden_size") or config["text_config"]["hidden_size"])
    vectors = torch.randn(1, width, generator=torch.Generator().manual_seed(0)) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    formats.write(Embedding(path.stem, vectors, step=0), path)


# -- the table ------------------------------------------------------------------------------------------------------
def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def pair_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per recipe: medians over the pairs of samples/s, start-up and peak memory, and tinv-ui / diffusers."""
    out = []
    children = [r for r in results["runs"] if "recipe" in r]
    for recipe in dict.fromkeys(r["recipe"] for r in children):
        row: dict[str, Any] = {"recipe": recipe}
        for impl in ("tinv-ui", "diffusers"):
            runs = [r for r in children if r["recipe"] == recipe and r["impl"] == impl and r["rc"] == 0]
            row[impl] = {k: _median(runs, k) for k in ("samples_per_s", "steps_per_s", "loop_s", "first_step_s",
                                                       "peak_gib")}
            row[impl]["runs"] = len(runs)
        t, d = row["tinv-ui"], row["diffusers"]
        row["ratios"] = {k: round(t[k] / d[k], 2) if t[k] and d[k] else None
                         for k in ("samples_per_s", "loop_s", "first_step_s", "peak_gib")}
        out.append(row)
    return out


def targets_rows(results: dict[str, Any], pairs: list[dict[str, Any]]) -> list[tuple[str, Any, Any, str]]:
    """(metric, tinv-ui, diffusers, target) for the issue's targets table."""
    runs = results["runs"]
    train = [r for r in runs if r.get("section") == "train"]
    gen = [r for r in runs if r.get("section") == "generate"]
    by_recipe = {p["recipe"]: p for p in pairs}
    docs, best = by_recipe.get("docs fp32 bs1 ga4"), by_recipe.get("best fp16 bs8")

    def pick(rows, fn, key, impl):
        rows = [r for r in rows if r["impl"] == impl and r.get(key) is not None]
        return fn(r[key] for r in rows) if rows else None

    tinv_children = [p["tinv-ui"]["samples_per_s"] for p in pairs if p["tinv-ui"]["samples_per_s"]]
    tinv_best = max([r["samples_per_s"] for r in train] + tinv_children, default=None)
    diff_best = max([p["diffusers"]["samples_per_s"] for p in pairs if p["diffusers"]["samples_per_s"]], default=None)
    b1 = [r for r in train if r["batch"] == 1]
    b1_best = max(b1, key=lambda r: r["steps_per_s"]) if b1 else None
    return [
        ("training samples/s, best batch", tinv_best, diff_best, ">= 150"),
        ("optimizer steps/s, batch 1", b1_best and b1_best["steps_per_s"],
         docs and docs["diffusers"]["steps_per_s"], ">= 20"),
        ("peak memory at batch 1, GiB", b1_best and b1_best["peak_gib"], docs and docs["diffusers"]["peak_gib"],
         "<= 3"),
        ("20-step 512 px image, batch 1, s", pick([g for g in gen if g["batch"] == 1], min, "s_per_image", "tinv-ui"),
         pick([g for g in gen if g["batch"] == 1], min, "s_per_image", "diffusers"), "<= 0.45"),
        ("images/s at batch 8", pick([g for g in gen if g["batch"] == 8], max, "images_per_s", "tinv-ui"),
         pick([g for g in gen if g["batch"] == 8], max, "images_per_s", "diffusers"), ">= 9"),
        (f"start-up to first step, {NUM_IMAGES} images, s", (best or docs or {}).get("tinv-ui", {}).get("first_step_s"),
         (best or docs or {}).get("diffusers", {}).get("first_step_s"), "< 15"),
    ]


def table(results: dict[str, Any]) -> str:
    m = results["meta"]
    pairs = pair_summary(results)
    lines = [f"versus: {m.get('device')} | torch {m.get('torch')} | diffusers {m.get('diffusers')} | transformers "
             f"{m.get('transformers')} | {m.get('size')} px | {m.get('steps')} steps per child | {m.get('date')}"]
    hdr = (f"{'recipe':<20} {'impl':<10} {'runs':>4} {'samples/s':>10} {'steps/s':>8} {'to loop s':>9} "
           f"{'to 1st step s':>13} {'peak GiB':>9}")
    lines += ["", hdr, "-" * len(hdr)]
    for p in pairs:
        for impl in ("tinv-ui", "diffusers"):
            v = p[impl]
            lines.append(f"{p['recipe']:<20} {impl:<10} {v['runs']:>4} {_fmt(v['samples_per_s']):>10} "
                         f"{_fmt(v['steps_per_s']):>8} {_fmt(v['loop_s']):>9} {_fmt(v['first_step_s']):>13} "
                         f"{_fmt(v['peak_gib']):>9}")
        r = p["ratios"]
        lines.append(f"{'':<20} ratio tinv-ui/diffusers: samples/s {_fmt(r['samples_per_s'])}x (>1: faster), "
                     f"start-up to first step {_fmt(r['first_step_s'])}x, to loop {_fmt(r['loop_s'])}x (<1: sooner), "
                     f"peak memory {_fmt(r['peak_gib'])}x")
    lines.append("to loop: process start to the training loop (tinv-ui 'started:', diffusers '***** Running "
                 "training *****'); to 1st step: to the first optimizer step done")
    lines.append("peak: " + ("each process's own GPU memory in nvidia-smi" if "CPU" not in str(m.get("device"))
                             else "each process's peak resident set (VmHWM), CPU"))
    if any(r.get("section") for r in results["runs"]):
        rows = targets_rows(results, pairs)
        lines += ["", f"{'target metric':<40} {'tinv-ui':>10} {'diffusers':>10} {'target':>8}"]
        lines += [f"{name:<40} {_fmt(t):>10} {_fmt(d):>10} {target:>8}" for name, t, d, target in rows]
        lines.append("tinv-ui peak at batch 1: torch.cuda.max_memory_allocated of the in-process run; diffusers: "
                     "nvidia-smi of its docs-recipe process (includes the CUDA context)")
    if results["skipped"]:
        lines += ["", "skipped (time budget): " + "; ".join(x["phase"] for x in results["skipped"])]
    if results.get("fatal"):
        lines += ["", "FATAL: " + results["fatal"]]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
