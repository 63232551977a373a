"""Honest progress: a training run says which phase it is in before the phase's work starts, and its ETA counts
the previews and saves still to come, measured as they happen (tinv_ui/eta.py), down to the job snapshot the
Train tab shows (tinv_ui/jobs.py)."""

import re
from types import SimpleNamespace

import pytest

from tinv_ui import eta as eta_module
from tinv_ui import training
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.eta import PREVIEW, SAVE, STEP, RunTimes
from tinv_ui.events import ENCODING_LATENTS, LOADING_IMAGES, RENDERING_PREVIEW, SAVING, Phase, Saved, Started, Step
from tinv_ui.jobs import JobStatus, TrainingJob
from tinv_ui.train_setup import preflight
from tinv_ui.library import EmbeddingLibrary

NAME = "progemb"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def emb(studio, paths):
    return create_embedding(studio, CreateConfig(name=NAME, num_vectors=2), paths.embeddings_dir)


def config(images, **kw) -> TrainConfig:
    base = dict(embedding=NAME, dataset_dir=str(images), template="subject_filewords", max_steps=4, width=64,
                height=64, save_every=2, preview_every=2, preview_steps=3, seed=1)
    return TrainConfig(**{**base, **kw})


def describe(event) -> tuple:
    match event:
        case Phase():
            return ("Phase", event.text)
        case Started():
            return ("Started", event.initial_step)
        case Saved():
            return ("Saved", event.step, event.final)
        case _:
            return (type(event).__name__, event.step)


def test_phases_come_in_order_each_before_its_work(studio, paths, images, emb):
    events, seen_on_disk = [], {}
    for event in training.train(studio, config(images), EmbeddingLibrary(paths.embeddings_dir), paths):
        events.append(event)
        if isinstance(event, Phase) and event.step is not None:  # what exists when the phase is announced
            folder = events[2].log_dir
            seen_on_disk[event.text] = sorted(p.name for p in folder.rglob(f"{NAME}-{event.step}.*"))
    assert [describe(e) for e in events] == [
        ("Phase", "loading images (checking the settings and the dataset)"),
        ("Phase", "encoding latents of 4 images (each as the first steps use it)"),
        ("Started", 0), ("Step", 1), ("Step", 2),
        ("Phase", "saving a copy at step 2"), ("Saved", 2, False),
        ("Phase", "rendering preview at step 2"), ("Preview", 2),
        ("Step", 3), ("Step", 4),
        ("Phase", "saving a copy at step 4"), ("Saved", 4, False),
        ("Phase", "rendering preview at step 4"), ("Preview", 4),
        ("Phase", "saving the final file at step 4"), ("Saved", 4, True), ("Finished", 4),
    ]
    assert [e.name for e in events if isinstance(e, Phase)] == [
        LOADING_IMAGES, ENCODING_LATENTS, SAVING, RENDERING_PREVIEW, SAVING, RENDERING_PREVIEW, SAVING]
    # Announced before the work: the copy is not written yet when "saving" comes, nor the PNG at "rendering".
    assert seen_on_disk["saving a copy at step 2"] == []
    assert seen_on_disk["rendering preview at step 2"] == [f"{NAME}-2.pt", f"{NAME}-2.pt.optim"]
    # The last training prompt: the step's first image's prompt, with the embedding in it.
    prompts = [e.prompt for e in events if isinstance(e, Step)]
    assert len(prompts) == 4 and all(re.fullmatch(rf".* {NAME}, a red thing number \d", p) for p in prompts)


def test_the_eta_counts_previews_and_saves_and_counts_down_during_a_preview(studio, paths, images, emb, monkeypatch):
    """Steps take 1 s, copies 0.5 s, previews 10 s (a fake clock): the ETA after each event is what is left."""
    clock = Clock()
    monkeypatch.setattr(eta_module, "time", SimpleNamespace(perf_counter=clock))

    def taking(seconds, real):
        def wrapper(*args, **kwargs):
            clock.now += seconds
            return real(*args, **kwargs)
        return wrapper

    library = EmbeddingLibrary(paths.embeddings_dir)
    plan = preflight(studio, config(images), library, paths)  # as TrainingRunner.start does
    job = TrainingJob(studio, config(images), library, paths, plan, clock=clock)
    mid_preview, events, real_preview = [], [], training.render_preview

    def preview_taking_10_s(*args, **kwargs):
        if not mid_preview:  # the first one: the snapshots the page gets while it renders
            clock.now += 1
            mid_preview.append(job.snapshot())
            clock.now += 6  # past its 1.5 s estimate
            mid_preview.append(job.snapshot())
            clock.now += 3
        else:
            clock.now += 10
        return real_preview(*args, **kwargs)

    def recording(event):
        events.append(event)
        return apply(event)

    apply = job._apply
    monkeypatch.setattr(job, "_apply", recording)
    monkeypatch.setattr(training, "optimizer_step", taking(1.0, training.optimizer_step))
    monkeypatch.setattr(training, "save_copy", taking(0.5, training.save_copy))
    monkeypatch.setattr(training, "save_final", taking(0.5, training.save_final))
    monkeypatch.setattr(training, "render_preview", preview_taking_10_s)
    job.start()
    assert job.wait(120)

    etas = [(describe(e), e.eta) for e in events if isinstance(e, (Step, Phase)) and e.eta is not None]
    assert etas == [
        # 3 steps of 1 s, 2 previews estimated at preview_steps (3) half steps, 2 copies + the final file at a step each
        (("Step", 1), 9.0), (("Step", 2), 8.0),
        (("Phase", "saving a copy at step 2"), 8.0),
        (("Phase", "rendering preview at step 2"), 6.0),  # a copy measured: 0.5 s
        (("Step", 3), 12.0),  # a preview measured: 10 s, one to come
        (("Step", 4), 11.0),
        (("Phase", "saving a copy at step 4"), 11.0),
        (("Phase", "rendering preview at step 4"), 10.5),
        (("Phase", "saving the final file at step 4"), 0.5),
    ]
    assert [(e.text, e.expected) for e in events if isinstance(e, Phase) and e.expected is not None] == [
        ("saving a copy at step 2", 1.0), ("rendering preview at step 2", 1.5), ("saving a copy at step 4", 0.5),
        ("rendering preview at step 4", 10.0), ("saving the final file at step 4", 0.5)]
    during, overdue = mid_preview
    assert during.phase == "rendering preview at step 2" and during.step == 2
    assert during.eta == 5.0  # 6 s when it began, 1 s ago
    assert overdue.eta == 4.5  # never below the steps, preview and copies after this preview
    snap = job.snapshot()
    assert snap.status == JobStatus.FINISHED and snap.phase == "" and snap.eta == 0.0
    last_step = [e for e in events if isinstance(e, Step)][-1]
    assert snap.prompt == last_step.prompt and re.fullmatch(rf".* {NAME}, a red thing number \d", snap.prompt)


def test_run_times_counts_what_is_to_come_and_leaves_out_the_warm_up_step():
    clock = Clock()
    times = RunTimes.for_run(first_step=3, total=10, preview_every=4, save_every=5, preview_steps=20,
                             micro_batches=2, clock=clock)
    assert times.left == {STEP: 7, PREVIEW: 2, SAVE: 3}  # previews at 4, 8; copies at 5, 10; the final file
    assert RunTimes.for_run(3, 10, 4, 5, 20, main=False).left == {STEP: 7, PREVIEW: 0, SAVE: 0}
    assert times.eta() is None and times.expected(PREVIEW) is None  # nothing measured yet
    clock.now += 30.0  # the first step compiles
    times.lap(STEP)
    # a preview's first estimate: 20 sampling steps at half a micro-batch (a step holds 2) each
    assert times.expected(STEP) == 30.0 and times.expected(PREVIEW) == 150.0
    for _ in range(2):
        clock.now += 0.5
        times.lap(STEP)
    assert times.expected(STEP) == 0.5  # the warm-up step no longer counts
    assert times.eta() == pytest.approx(4 * 0.5 + 2 * 2.5 + 3 * 0.5)
    clock.now += 4.0
    times.lap(PREVIEW)
    assert times.expected(PREVIEW) == 4.0 and times.eta() == pytest.approx(4 * 0.5 + 4.0 + 3 * 0.5)
