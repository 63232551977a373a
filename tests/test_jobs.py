"""Background training jobs: snapshot, one run at a time, stop, failures, Generate between training steps."""

import threading
import time

import pytest
from conftest import blocked_in_session, wait_until
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tinv_ui import formats
from tinv_ui.config import CreateConfig, GenerateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.errors import BusyError, ConfigError, DatasetError, TinvError
from tinv_ui.generation import render
from tinv_ui.jobs import TrainingRunner
from tinv_ui.library import EmbeddingLibrary

NAME = "jobemb"


@pytest.fixture
def runner(studio, paths):
    create_embedding(studio, CreateConfig(name=NAME, initializer="cat", num_vectors=1), paths.embeddings_dir)
    r = TrainingRunner(studio, EmbeddingLibrary(paths.embeddings_dir), paths)
    yield r
    if r.current is not None:  # never leave a thread training on the shared studio
        r.current.stop()
        assert r.current.wait(60)


def config(images, **kw):
    base = dict(embedding=NAME, dataset_dir=str(images), template="subject", max_steps=4, width=64, height=64,
                learn_rate="0.01", save_every=2, preview_every=2, preview_steps=1, seed=3)
    return TrainConfig(**{**base, **kw})


def wait_for(condition, timeout=60.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_job_runs_to_the_end_and_its_snapshot_tells_everything(runner, images, paths):
    assert runner.current is None
    job = runner.start(config(images))
    assert job.wait(60)
    snap = job.snapshot()
    assert snap.status == "finished" and snap.name == NAME and (snap.step, snap.total) == (4, 4)
    assert [s for s, _ in snap.losses] == [1, 2, 3, 4] and all(loss > 0 for _, loss in snap.losses)
    assert [p.name for p in snap.previews] == [f"{NAME}-2.png", f"{NAME}-4.png"]
    assert snap.last_saved == paths.embeddings_dir / f"{NAME}.pt" and snap.eta == 0
    assert snap.message == f"Training finished at step 4; saved to {snap.last_saved}"
    assert snap.log_dir is not None and snap.log_dir.is_dir()
    assert runner.current is job and not job.running
    assert formats.read(snap.last_saved).step == 4


def test_a_second_start_is_refused_and_stop_saves(runner, images, paths):
    job = runner.start(config(images, max_steps=100_000, preview_every=0, save_every=0))
    wait_for(lambda: job.snapshot().step >= 1)
    with pytest.raises(BusyError, match=rf"a training run for {NAME} is already running \(step \d+/100000\); stop it first"):
        runner.start(config(images))
    job.stop()
    assert job.wait(60)
    snap = job.snapshot()
    assert snap.status == "interrupted"
    assert snap.message == f"Training interrupted at step {snap.step}; saved to {paths.embeddings_dir / f'{NAME}.pt'}"
    assert formats.read(snap.last_saved).step == snap.step
    second = runner.start(config(images, max_steps=snap.step + 1))  # the slot is free again
    assert second.wait(60) and second.snapshot().status == "finished"


def test_generation_takes_the_lock_between_training_steps(runner, images, studio):
    # What AdamW is about to apply, step by step, and who holds the lock at that moment.
    steps = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: steps.append(studio.busy_with))
    try:
        job = runner.start(config(images, max_steps=100_000, preview_every=0, save_every=0))
        trainer = next(t for t in threading.enumerate() if t.name == f"tinv-train-{NAME}")
        wait_for(lambda: len(steps) >= 2)
        with studio.session(timeout=30, what="generate"):  # served between two steps, not after the run
            held_at = len(steps)
            wait_until(lambda: blocked_in_session(trainer), "the trainer waits for the lock")
            images_out = render(studio, GenerateConfig(prompt=f"a {NAME}", steps=2, width=64, height=64, seed=1), {})
            assert len(steps) == held_at  # the trainer does no step while we hold the lock
            assert job.snapshot().status == "running"
        wait_for(lambda: len(steps) > held_at)  # and it goes on afterwards
        job.stop()
        assert job.wait(60) and job.snapshot().status == "interrupted"
    finally:
        hook.remove()
    assert images_out[0].image.size == (64, 64)
    assert all(holder.startswith(f"training {NAME} (step ") for holder in steps)  # each step holds the lock


def test_pre_flight_errors_are_raised_by_start_and_leave_the_last_job_current(runner, images, tmp_path):
    # A wrong setting is the caller's to show next to the form; it must not become a "failed" job that
    # replaces the one the panel shows.
    first = runner.start(config(images))
    assert first.wait(60) and first.snapshot().status == "finished"
    with pytest.raises(TinvError, match="'missing-one' is not loaded"):
        runner.start(config(images, embedding="missing-one"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable image"):
        runner.start(config(tmp_path / "empty", max_steps=5))
    with pytest.raises(ConfigError, match="max_steps is 4, but 'jobemb' has already been trained for 4 steps"):
        runner.start(config(images))
    assert runner.current is first and first.snapshot().status == "finished"
    assert not [t for t in threading.enumerate() if t.name == f"tinv-train-{NAME}"]


def test_a_nan_run_fails_with_the_reason_and_keeps_the_file(runner, images, paths, monkeypatch):
    # What the Train panel's message box shows comes from the job snapshot: the NaN stop must reach it.
    from tinv_ui import training

    real = training.diffusion_loss
    calls = []

    def nan_on_third(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(training, "diffusion_loss", nan_on_third)
    job = runner.start(config(images, max_steps=10, save_every=0, preview_every=0))
    assert job.wait(60)
    snap = job.snapshot()
    assert snap.status == "failed" and snap.step == 2
    assert snap.message.startswith("Training stopped at step 3: the loss became nan.")
    assert "kept as it was after step 2" in snap.message and "Lower learn_rate" in snap.message
    kept = formats.read(paths.embeddings_dir / f"{NAME}.pt")
    assert kept.step == 2

