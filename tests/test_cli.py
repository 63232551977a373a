"""The command line: create, embeddings, train (Ctrl-C saves) and generate end to end; options from the configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinv_ui import cli, formats
from tinv_ui.config import Compile, GenerateConfig, TrainConfig, field_help
from tinv_ui.errors import ConfigError
from tinv_ui.embedding import Embedding
from tinv_ui.events import RENDERING_PREVIEW, Finished, Generated, Phase, Preview, Saved, Started, Step

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cache_dir: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tinv_ui", "--cache-dir", str(cache_dir), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def built_cache(cache_dir) -> Path:
    """The session cache with the tiny model built, so the subprocesses don't rebuild it."""
    from tinv_ui.tiny_model import load_clip_tokenizer, tiny_model_dir

    tiny_model_dir(cache_dir)
    load_clip_tokenizer(cache_dir)
    return cache_dir


def test_create_then_list(tmp_path, built_cache):
    emb_dir = tmp_path / "emb"
    proc = run_cli("create", "--name", "café-ñ", "--initializer", "a red cat", "--num-vectors", "2",
                   "--embeddings-dir", str(emb_dir), cache_dir=built_cache)
    assert proc.returncode == 0, proc.stderr
    assert f"Created: {emb_dir / 'café-ñ.pt'}" in proc.stdout
    emb = formats.read(emb_dir / "café-ñ.pt")
    assert emb.num_vectors == 2 and emb.step == 0 and emb.width == 32
    # a bad file beside it, listed with its reason
    (emb_dir / "broken.pt").write_bytes(b"not a torch file")
    proc = run_cli("embeddings", "--json", "--embeddings-dir", str(emb_dir), cache_dir=built_cache)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["loaded"]["café-ñ"]["vectors"] == 2 and report["loaded"]["café-ñ"]["step"] == 0
    assert len(report["loaded"]["café-ñ"]["hash"]) == 12
    assert report["skipped"][0]["name"] == "broken" and "corrupt" in report["skipped"][0]["reason"]


def test_user_error_is_one_line_exit_2_without_traceback(tmp_path, built_cache):
    emb_dir = tmp_path / "emb"
    formats.write(Embedding("taken", torch.zeros(1, 32)), emb_dir / "taken.pt")
    proc = run_cli("create", "--name", "taken", "--embeddings-dir", str(emb_dir), cache_dir=built_cache)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: name: an embedding called 'taken' already exists")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["create", "--name", "../escape"], "'/'"),
        (["create", "--name", "ok", "--num-vectors", "0"], "num_vectors is 0"),
        (["train", "--dataset-dir", "imgs"], "embedding is empty"),
        (["generate", "--sampler", "nope"], "sampler 'nope' is unknown"),
        (["generate", "--width", "100"], "width is 100; it must be a multiple of 8"),
    ],
)
def test_config_errors_exit_2_before_loading_a_model(tmp_path, capsys, args, words):
    code = cli.main([*args, "--embeddings-dir", str(tmp_path / "emb"), "--cache-dir", str(tmp_path / "no-cache")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words in err
    assert not (tmp_path / "no-cache").exists()  # failed before any model was built or loaded
    assert not (tmp_path / "emb").exists()


def test_embeddings_text_report_with_width(tmp_path, built_cache):
    emb_dir = tmp_path / "emb"
    formats.write(Embedding("sd1", torch.zeros(2, 768)), emb_dir / "sd1.safetensors")
    formats.write(Embedding("cat", torch.zeros(1, 1024), step=40), emb_dir / "cat.pt")
    proc = run_cli("embeddings", "--width", "1024", "--embeddings-dir", str(emb_dir), cache_dir=built_cache)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "loaded (1)" in out and "cat: 1 vectors, width 1024, step 40" in out
    assert "skipped (1)" in out and "768 (SD 1.x) does not fit the loaded model's 1024 (SD 2.x)" in out
    assert "warnings:" in out and "'cat' is a single vocabulary word" in out


def test_options_are_generated_from_the_configs():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--embedding", "e", "--dataset-dir", "d", "--learn-rate", "0.01:10, 0.001",
                              "--max-steps", "20", "--flip", "--no-save-optimizer-state", "--clip-grad-mode", "norm"])
    cfg = cli.config_from_args(TrainConfig, args)
    assert (cfg.embedding, cfg.max_steps, cfg.flip, cfg.save_optimizer_state) == ("e", 20, True, False)
    assert cfg.clip_grad_mode.value == "norm" and cfg.learn_rate == "0.01:10, 0.001"
    assert cfg.batch_size == TrainConfig.__dataclass_fields__["batch_size"].default
    gen = cli.config_from_args(GenerateConfig, parser.parse_args(["generate", "--prompt", "x", "--no-save", "--cfg-scale", "5"]))
    assert gen == GenerateConfig(prompt="x", save=False, cfg_scale=5.0)
    create = parser.parse_args(["create", "--name", "n", "--format", "safetensors", "--overwrite"])
    assert create.file_format == "safetensors" and create.overwrite is True


def test_compile_is_one_type_and_a_bare_flag_still_means_on():
    parser = cli.build_parser()

    def generate(*extra):
        return cli.config_from_args(GenerateConfig, parser.parse_args(["generate", "--prompt", "x", *extra])).compile

    def train(*extra):
        args = parser.parse_args(["train", "--embedding", "e", "--dataset-dir", "d", *extra])
        return cli.config_from_args(TrainConfig, args).compile

    assert (generate(), generate("--compile"), generate("--compile", "auto")) == (Compile.OFF, Compile.ON, Compile.AUTO)
    assert (train(), train("--compile", "off"), train("--compile")) == (Compile.AUTO, Compile.OFF, Compile.ON)
    assert GenerateConfig(compile=True).compile is Compile.ON  # the Generate panel's checkbox
    with pytest.raises(ConfigError, match="compile is 'sometimes'; use auto, on or off"):
        TrainConfig(embedding="e", dataset_dir="d", compile="sometimes")


def test_global_options_work_before_and_after_the_command():
    parser = cli.build_parser()
    before = parser.parse_args(["--embeddings-dir", "A", "embeddings"])
    after = parser.parse_args(["embeddings", "--embeddings-dir", "B", "--model", "m"])
    default = parser.parse_args(["embeddings"])
    assert before.embeddings_dir == Path("A") and after.embeddings_dir == Path("B") and after.model == "m"
    assert default.model == "tiny" and default.embeddings_dir == Path("embeddings")


def test_help_comes_from_field_metadata(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(field_help(TrainConfig, "max_steps").split()) in text
    assert "Range 1..10000000" in text


def test_event_lines():
    lines = [
        *cli.format_event(Started("e", 0, 10, 4, Path("/logs"))),
        *cli.format_event(Step(3, 10, 2.0, 5.0, loss=0.125, lr=0.005)),
        *cli.format_event(Phase(RENDERING_PREVIEW, "rendering preview at step 5", 5, 12.0, 3.0)),
        *cli.format_event(Preview(5, ("img",), "p", (Path("/p/5.png"),))),
        *cli.format_event(Saved(5, Path("/e/e-5.pt"))),
        *cli.format_event(Saved(10, Path("/e/e.pt"), final=True)),
        *cli.format_event(Finished(10, Path("/e/e.pt"), False, "done")),
        *cli.format_event(Generated(("img",), ("info",), (42,), (Path("/o/1.png"),))),
        *cli.format_event(Generated(("img",), ("info",), (7,))),
    ]
    assert lines == [
        "started: e from step 0 to 10 on 4 images, logs in /logs",
        "step 3/10 loss=0.125 lr=0.005 elapsed 0:02 eta 0:05",
        "rendering preview at step 5...",
        "preview at step 5: /p/5.png",
        "saved at step 5: /e/e-5.pt",
        "saved final at step 10: /e/e.pt",
        "finished at step 10: done (/e/e.pt)",
        "image seed 42: /o/1.png",
        "image seed 7 (not saved): info",
    ]


def test_embeddings_check_model_uses_the_models_width(tmp_path, capsys, built_cache):
    emb_dir = tmp_path / "emb"
    formats.write(Embedding("fits", torch.zeros(2, 32)), emb_dir / "fits.pt")
    formats.write(Embedding("sd1", torch.zeros(1, 768)), emb_dir / "sd1.pt")
    code = cli.main(["embeddings", "--check-model", "--json", "--embeddings-dir", str(emb_dir),
                     "--cache-dir", str(built_cache)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and list(report["loaded"]) == ["fits"]
    assert "768 (SD 1.x) does not fit the loaded model's 32 (tiny test model)" in report["skipped"][0]["reason"]


def test_train_then_generate_headless(tmp_path, built_cache, images):
    """`python -m tinv_ui train` runs the same trainer as the app; `generate` uses the trained file."""
    folders = ["--embeddings-dir", str(tmp_path / "emb"), "--outputs-dir", str(tmp_path / "out")]
    assert run_cli("create", "--name", "clitrain", "--num-vectors", "2", *folders, cache_dir=built_cache).returncode == 0
    proc = run_cli("train", "--embedding", "clitrain", "--dataset-dir", str(images), "--max-steps", "3",
                   "--save-every", "2", "--preview-every", "0", "--width", "64", "--height", "64", "--template",
                   "subject", *folders, cache_dir=built_cache)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["loading images (checking the settings and the dataset)...",
                         "encoding latents of 4 images (each as the first steps use it)..."]
    assert lines[2].startswith("started: clitrain from step 0 to 3 on 4 images")
    assert "saving a copy at step 2..." in lines and lines[-3] == "saving the final file at step 3..."
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/3", "2/3", "3/3"]
    assert any(line.startswith("saved at step 2: ") and line.endswith("clitrain-2.pt") for line in lines)
    assert lines[-1].startswith("finished at step 3:")
    assert formats.read(tmp_path / "emb" / "clitrain.pt").step == 3

    proc = run_cli("generate", "--prompt", "a photo of clitrain", "--steps", "2", "--width", "64", "--height", "64",
                   "--seed", "5", *folders, cache_dir=built_cache)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith("image seed 5: ")
    from PIL import Image

    with Image.open(line.split(": ", 1)[1]) as img:
        assert 'TI hashes: "clitrain: ' in img.info["parameters"]


def test_two_process_data_parallel_training_on_the_cpu(tmp_path, built_cache, images):
    """`torchrun --nproc_per_node 2 -m tinv_ui train`: one process group (gloo on a CPU-only machine), one set of
    output lines and files, and gradients averaged over both processes (so the result differs from one process)."""
    results = {}
    for procs in (1, 2):
        folders = ["--embeddings-dir", str(tmp_path / f"emb{procs}"), "--outputs-dir", str(tmp_path / f"out{procs}")]
        assert run_cli("create", "--name", "dp", "--num-vectors", "2", *folders, cache_dir=built_cache).returncode == 0
        train = ["--cache-dir", str(built_cache), "train", "--embedding", "dp", "--dataset-dir", str(images),
                 "--max-steps", "3", "--save-every", "2", "--preview-every", "0", "--width", "64", "--height", "64",
                 "--template", "subject", "--seed", "9", *folders]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if procs == 2 else []
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, *launcher, "-m", "tinv_ui", *train], capture_output=True, text=True,
                              timeout=300, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        assert sum(line.startswith("started: ") for line in lines) == 1  # only the main process reports
        assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/3", "2/3", "3/3"]
        assert sorted(p.name for p in (tmp_path / f"emb{procs}").iterdir()) == ["dp.pt", "dp.pt.optim"]
        results[procs] = formats.read(tmp_path / f"emb{procs}" / "dp.pt")
    assert results[2].step == results[1].step == 3
    assert not torch.equal(results[2].vectors, results[1].vectors)  # the second process's gradients counted


def test_ctrl_c_interrupts_training_and_saves(tmp_path, built_cache, images):
    import signal

    folders = ["--embeddings-dir", str(tmp_path / "emb"), "--outputs-dir", str(tmp_path / "out")]
    assert run_cli("create", "--name", "clistop", *folders, cache_dir=built_cache).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinv_ui", "--cache-dir", str(built_cache), "train", "--embedding",
                             "clistop", "--dataset-dir", str(images), "--max-steps", "100000", "--preview-every", "0",
                             "--save-every", "0", "--width", "64", "--height", "64", *folders],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopping after this step" in err
    last = out.splitlines()[-1]
    assert last.startswith("interrupted at step ") and "saved to" in last
    step = int(last.split()[3].rstrip(":"))
    assert step >= 2 and formats.read(tmp_path / "emb" / "clistop.pt").step == step
