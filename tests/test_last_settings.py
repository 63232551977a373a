"""What the Train form shows for an embedding (its job's or newest run's settings, each value checked) and the
line saying what Start will do, which must agree with where pre-flight really starts."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from tinv_ui import formats
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.errors import ConfigError
from tinv_ui.jobs import JobSnapshot, JobStatus
from tinv_ui.last_settings import checked_values, remembered_settings, start_outlook
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.train_setup import preflight, starting_point


def write_settings(root: Path, day: str, folder: str, stamp: str, config: dict, name: str = "emb") -> Path:
    run = root / day / folder
    run.mkdir(parents=True, exist_ok=True)
    path = run / f"settings-{stamp}.json"
    path.write_text(json.dumps({"embedding_name": name, "tinv_ui": {"config": config}}), encoding="utf-8")
    return path


def saved(**kw) -> dict:
    cfg = TrainConfig(embedding="emb", dataset_dir="/data/emb", **kw)
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()}


def test_saved_values_are_checked_one_by_one_and_wrong_ones_are_reported():
    config = {**saved(max_steps=400, preview_every=5, clip_grad_mode="norm"), "width": 100, "batch_size": True,
              "learn_rate": ["0.1"], "preview_sampler": "No such sampler", "seed": 2**40, "template": "x" * 5000,
              "embedding": "someone-else", "unknown": 1}
    values, skipped = checked_values(config)
    assert values["max_steps"] == 400 and values["preview_every"] == 5 and values["dataset_dir"] == "/data/emb"
    assert values["clip_grad_mode"] == "norm" and values["compile"] == "auto"  # as the dropdowns show them
    for wrong in ("width", "batch_size", "learn_rate", "preview_sampler", "seed", "template", "embedding", "unknown"):
        assert wrong not in values
    assert sorted(s.split(" ")[0] for s in skipped) == ["batch_size", "learn_rate", "preview_sampler", "seed",
                                                        "template", "width"]
    assert "width (width is 100; it must be a multiple of 8.)" in skipped
    assert "batch_size (not a whole number)" in skipped
    TrainConfig(embedding="emb", **values)  # what is kept builds a config


def test_the_job_wins_then_the_newest_settings_file_then_nothing(tmp_path):
    root = tmp_path / "train"
    write_settings(root, "2026-12-01", "emb", "2026-12-01-10-00-00", saved(max_steps=100))
    write_settings(root, "2026-12-02", "emb_run2", "2026-12-02-09-00-00", saved(max_steps=200))
    # A resume on 12-03 wrote its settings into the older folder: the newest file counts, not the folder.
    write_settings(root, "2026-12-01", "emb", "2026-12-03-08-00-00", saved(max_steps=300, preview_every=7))
    write_settings(root, "2026-12-04", "other", "2026-12-04-08-00-00", saved(max_steps=999), name="other")
    found = remembered_settings("EMB", None, False, root)
    assert found.values["max_steps"] == 300 and found.values["preview_every"] == 7
    assert found.source == "the run of 2026-12-01 10:00" and found.skipped == ()

    job_cfg = TrainConfig(embedding="emb", dataset_dir="/d", max_steps=400, preview_every=5)
    assert remembered_settings("emb", job_cfg, True, root).values["max_steps"] == 400
    assert remembered_settings("emb", job_cfg, True, root).source == "the run in progress"
    assert remembered_settings("other", job_cfg, False, root).values["max_steps"] == 999  # the job trains another
    assert remembered_settings("new-one", job_cfg, False, root).values == {}
    assert remembered_settings("emb", None, False, tmp_path / "missing").source == ""


def snapshot(status, name="emb", step=12, total=400):
    return JobSnapshot(status, name, step, total, None, [], [], None, "", None)


@pytest.mark.parametrize("step, max_steps, job, expected", [
    (0, 400, None, "Start begins a new run of emb: steps 0 → 400."),
    (150, 400, None, "Start continues emb from step 150 to 400"),
    (400, 400, None, "emb is already at step 400: Start would be refused. Raise Max steps above 400"),
    (150, 400, snapshot(JobStatus.FINISHED), "Start continues emb from step 150 to 400"),
    (None, 400, snapshot(JobStatus.RUNNING), "A run of this embedding is in progress (step 12/400): Start is refused"),
    (None, 400, snapshot(JobStatus.RUNNING, name="other"), "A run of other is in progress (step 12/400)"),
    (0, None, None, "Set Max steps to see what Start will do."),
])
def test_start_outlook_says_what_start_does(step, max_steps, job, expected):
    assert expected in start_outlook("emb", max_steps, step, job)


def test_the_outlook_step_is_where_pre_flight_starts_even_from_a_killed_runs_copy(studio, paths, images):
    path = create_embedding(studio, CreateConfig(name="resumed", initializer="cat"), paths.embeddings_dir)
    library = EmbeddingLibrary(paths.embeddings_dir)
    # A run killed after its step-6 copy and before its final save: the copy is newer than the file.
    copies = paths.outputs_dir / "train" / "2026-12-01" / "resumed" / "embeddings"
    copies.mkdir(parents=True)
    emb = formats.read(path)
    formats.write(emb.with_vectors(emb.all_vectors, step=6), copies / "resumed-6.pt")
    later = path.stat().st_mtime_ns + 10**9
    os.utime(copies / "resumed-6.pt", ns=(later, later))

    start, *_ = starting_point(studio, "resumed", "", library, paths)
    cfg = TrainConfig(embedding="resumed", dataset_dir=str(images), template="subject", width=64, height=64, max_steps=10)
    assert start.step == preflight(studio, cfg, library, paths).initial_step == 6
    assert start_outlook("resumed", 10, start.step, None).startswith("Start continues resumed from step 6 to 10")
    with pytest.raises(ConfigError, match="already been trained for 6 steps"):
        preflight(studio, TrainConfig(**{**asdict(cfg), "max_steps": 6}), library, paths)
    assert "already at step 6: Start would be refused" in start_outlook("resumed", 6, start.step, None)
