"""Earlier runs read back from disk (`tinv_ui.runs`): what the run history lists, from real training runs."""

from __future__ import annotations

import json

import pytest

from tinv_ui import runs
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.events import Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train


def _train(studio, paths, images, name, **kw):
    base = dict(embedding=name, dataset_dir=str(images), template="subject_filewords", max_steps=4, width=64,
                height=64, learn_rate="0.05", save_every=2, preview_every=4, preview_steps=2, seed=7, batch_size=1)
    return list(train(studio, TrainConfig(**{**base, **kw}), EmbeddingLibrary(paths.embeddings_dir), paths))


def test_runs_of_real_training_are_listed_newest_first_with_their_copies_previews_losses_and_settings(
        studio, paths, images):
    create_embedding(studio, CreateConfig(name="alpha", initializer="painting"), paths.embeddings_dir)
    create_embedding(studio, CreateConfig(name="beta", initializer="painting"), paths.embeddings_dir)
    alpha_events = _train(studio, paths, images, "alpha")
    _train(studio, paths, images, "beta", max_steps=2, save_every=1, preview_every=0, learn_rate="0.01")

    root = runs.log_root(paths.outputs_dir)
    listed = runs.list_runs(root)
    assert sorted(r.name for r in listed) == ["alpha", "beta"]
    alpha = runs.list_runs(root, "ALPHA")[0]  # names match as the library does: case-insensitively
    assert sorted(alpha.copies) == [2, 4] and sorted(alpha.previews) == [4]
    assert alpha.copies[2].name == "alpha-2.pt" and alpha.copies[2].is_file()
    assert alpha.previews[4].name == "alpha-4.png"
    assert alpha.losses() == [(e.step, pytest.approx(e.loss, abs=1e-6)) for e in alpha_events if isinstance(e, Step)]
    assert alpha.last_step() == 4 and alpha.final_loss() == alpha.losses()[-1][1]
    assert alpha.max_steps == 4 and alpha.config["learn_rate"] == "0.05" and alpha.config["embedding"] == "alpha"
    assert runs.latest_run(root, "beta").config["learn_rate"] == "0.01"
    assert runs.latest_run(root, "nobody") is None


def test_foreign_broken_and_hostile_files_are_left_out_never_raised(tmp_path):
    root = tmp_path / "train"
    run = root / "2026-01-02" / "gamma_run2"
    (run / "embeddings").mkdir(parents=True)
    (run / "images").mkdir()
    (run / "embeddings" / "gamma-10.pt").write_bytes(b"x")
    (run / "embeddings" / "gamma-10.pt.optim").write_bytes(b"x")
    (run / "embeddings" / "gamma-x.pt").write_bytes(b"x")
    (run / "embeddings" / "other-5.pt").write_bytes(b"x")
    (run / "images" / "gamma-12.png").write_bytes(b"x")
    (run / "settings-2026-01-02-10-00-00.json").write_text("[1, 2]")  # valid JSON, not a settings object
    (run / "settings-2026-01-02-11-00-00.json").write_text("{not json")
    (run / runs.LOSS_CSV).write_text("step,epoch,epoch_step,loss,learn_rate\n1,0,1,0.5,0.1\nbad row\n3,0,3,nan,0.1\n"
                                     "12,0,12,0.25,0.1\n")
    (root / "2026-01-02" / "empty").mkdir()
    (root / "not-a-day").mkdir()
    (root / "2026-01-02" / "loop").symlink_to(root / "2026-01-02")

    [found] = runs.list_runs(root)
    assert found.name == "gamma" and found.settings == {} and found.config == {}
    assert list(found.copies) == [10] and list(found.previews) == [12]
    assert found.losses() == [(1, 0.5), (12, 0.25)] and found.last_step() == 12
    assert found.started.isoformat() == "2026-01-02T10:00:00"  # the first settings file's stamp
    assert runs.list_runs(tmp_path / "missing") == []


def test_oversized_settings_and_loss_files_are_not_read(tmp_path, monkeypatch):
    run = tmp_path / "2026-01-02" / "delta"
    run.mkdir(parents=True)
    settings = run / "settings-2026-01-02-10-00-00.json"
    settings.write_text(json.dumps({"embedding_name": "delta", "pad": "x" * 100}))
    (run / runs.LOSS_CSV).write_text("step,epoch,epoch_step,loss,learn_rate\n1,0,1,0.5,0.1\n")
    assert runs.read_run(run).settings["embedding_name"] == "delta"
    monkeypatch.setattr(runs, "MAX_SETTINGS_BYTES", 64)
    monkeypatch.setattr(runs, "MAX_CSV_BYTES", 16)
    again = runs.read_run(run)
    assert again.settings == {} and again.losses() == []


def test_runs_are_listed_newest_first_by_start_time(tmp_path):
    for day, folder, stamp in [("2026-01-02", "a", "2026-01-02-09-00-00"), ("2026-01-03", "b", "2026-01-03-08-00-00"),
                               ("2026-01-02", "c", "2026-01-02-23-00-00")]:
        (tmp_path / day / folder).mkdir(parents=True)
        (tmp_path / day / folder / f"settings-{stamp}.json").write_text(json.dumps({"embedding_name": folder}))
    assert [r.name for r in runs.list_runs(tmp_path)] == ["b", "c", "a"]


def test_a_run_is_found_by_its_key_only_when_listed(tmp_path):
    root = tmp_path / "train"
    run = root / "2026-01-02" / "eps"
    run.mkdir(parents=True)
    (run / runs.LOSS_CSV).write_text("step,epoch,epoch_step,loss,learn_rate\n1,0,1,0.5,0.1\n")
    (root / "2026-01-02" / "not-a-run").mkdir()
    [listed] = runs.list_runs(root)
    assert runs.run_key(listed) == "2026-01-02/eps"
    assert runs.find_run(root, "2026-01-02/eps").folder == run
    for key in ("2026-01-02/not-a-run", "2026-01-02/eps/..", "../train/2026-01-02/eps", str(run), "", None):
        assert runs.find_run(root, key) is None
