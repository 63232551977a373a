"""Resume and crash safety of the trainer: exact resume, recovery after kill -9, a full disk, the files' format."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinv_ui import formats, train_setup
from tinv_ui.config import CreateConfig, Paths, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.errors import TrainingError
from tinv_ui.events import Phase, Saved, Started, Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train

NAME = "resumer"
ROOT = Path(__file__).resolve().parent.parent


def make_embedding(studio, paths, overwrite=False) -> Path:
    cfg = CreateConfig(name=NAME, initializer="painting", num_vectors=2, overwrite=overwrite)
    return create_embedding(studio, cfg, paths.embeddings_dir)


def config(images, **kw) -> TrainConfig:
    base = dict(embedding=NAME, dataset_dir=str(images), template="subject_filewords", max_steps=4, width=64,
                height=64, learn_rate="0.05", save_every=0, preview_every=0, preview_steps=2, seed=7, batch_size=1)
    return TrainConfig(**{**base, **kw})


def run(studio, paths, cfg, stop=None):
    """The run's events without its `Phase`s (tests/test_progress.py checks those)."""
    return [e for e in train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths, stop) if not isinstance(e, Phase)]


# -- exact resume ------------------------------------------------------------------------------------------
def test_two_steps_then_resume_to_four_equals_four_steps_bit_for_bit(studio, paths, images):
    """Flips, random latent samples, shuffled tags and a resume in the middle of an epoch: every RNG continues."""
    knobs = dict(flip=True, latent_sampling="random", shuffle_tags=True, tag_dropout=0.3, seed=-1)
    path = make_embedding(studio, paths)
    straight = run(studio, paths, config(images, seed=7, **{k: v for k, v in knobs.items() if k != "seed"}))
    four = formats.read(path).vectors

    make_embedding(studio, paths, overwrite=True)
    first = run(studio, paths, config(images, max_steps=2, **{**knobs, "seed": 7}))
    second = run(studio, paths, config(images, max_steps=4, **knobs))  # seed -1: the saved seed continues
    resumed = formats.read(path)
    assert resumed.step == 4 and torch.equal(resumed.vectors, four)
    losses = lambda events: [e.loss for e in events if isinstance(e, Step)]  # noqa: E731
    assert losses(first) + losses(second) == losses(straight)
    assert "continues as if it had never stopped" in second[0].message


def test_a_resume_from_an_a1111_optim_keeps_adamw_and_says_the_data_order_is_fresh(studio, paths, images):
    path = make_embedding(studio, paths)
    run(studio, paths, config(images, max_steps=2))
    saved = torch.load(formats.optim_path(path), map_location="cpu")
    a1111 = {"hash": saved["hash"], "optimizer_state_dict": saved["optimizer_state_dict"]}  # what A1111 writes
    torch.save(a1111, formats.optim_path(path))
    events = run(studio, paths, config(images, max_steps=4))
    started = events[0]
    assert started.initial_step == 2
    assert "optimizer state was restored" in started.message and "fresh data order from seed 7" in started.message
    assert formats.read(path).step == 4
    sidecar = torch.load(formats.optim_path(path), map_location="cpu")  # ours again, still readable as A1111's
    assert {"hash", "optimizer_state_dict"} <= set(sidecar) and sidecar["hash"] == formats.read(path).checksum()
    assert float(sidecar["optimizer_state_dict"]["state"][0]["step"]) == 4  # AdamW's state went on from 2


# -- messages and formats --------------------------------------------------------------------------------------
def test_a_batch_size_above_the_image_count_is_said_at_the_start(studio, paths, images):
    make_embedding(studio, paths)
    started = run(studio, paths, config(images, max_steps=1, batch_size=16))[0]
    assert isinstance(started, Started)
    assert "batch_size 16 is more than the 4 images: each batch holds 4." in started.message


def test_copies_and_the_final_file_keep_a_safetensors_embeddings_format(studio, paths, images):
    pt = make_embedding(studio, paths)
    target = pt.with_suffix(".safetensors")
    formats.write(formats.read(pt), target)
    pt.unlink()
    events = run(studio, paths, config(images, max_steps=2, save_every=1))
    copies = [e.path for e in events if isinstance(e, Saved)]
    assert [p.name for p in copies] == [f"{NAME}-1.safetensors", f"{NAME}-2.safetensors", f"{NAME}.safetensors"]
    for path in copies:
        header = int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 header size, then JSON
        assert path.read_bytes()[8:9] == b"{" and 8 + header < path.stat().st_size
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert list(f.keys()) == ["emb_params"]
    assert formats.read(copies[-1]).step == 2 and not pt.exists()
    assert formats.read(copies[0]).step == 1 and formats.optim_path(copies[0]).is_file()


# -- a hard kill ---------------------------------------------------------------------------------------------
def _stale_temp(folder: Path, target: str) -> Path:
    path = folder / f".{target}.a1b2c3d4.tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a file")
    return path


def test_after_kill_9_the_next_start_resumes_from_the_newest_copy_and_overwrites_nothing(studio, paths, images,
                                                                                           cache_dir):
    from tinv_ui.tiny_model import load_clip_tokenizer, tiny_model_dir

    tiny_model_dir(cache_dir)
    load_clip_tokenizer(cache_dir)
    emb_path = make_embedding(studio, paths)
    before = emb_path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tinv_ui", "--cache-dir", str(cache_dir), "train", "--embedding", NAME,
           "--dataset-dir", str(images), "--max-steps", "100000", "--save-every", "2", "--preview-every", "3",
           "--preview-steps", "1", "--width", "64", "--height", "64", "--template", "subject", "--seed", "3",
           "--embeddings-dir", str(paths.embeddings_dir), "--outputs-dir", str(paths.outputs_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("step 7/"):  # copies at 2, 4, 6 and previews at 3, 6 are on disk
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert emb_path.read_bytes() == before  # the killed run never reached its final save
    crashed = {p: p.read_bytes() for p in (paths.outputs_dir / "train").rglob("*") if p.is_file()}
    copies = sorted(int(p.name.split("-")[-1].split(".")[0]) for p in crashed if p.name.endswith(".pt"))
    newest = copies[-1]
    assert newest >= 6
    run_dir = next(p for p in crashed if p.name.endswith(".csv")).parent
    csv = run_dir / "textual_inversion_loss.csv"
    if int(csv.read_text(encoding="utf-8").splitlines()[-1].split(",")[0]) <= newest:
        # the CSV is flushed every few seconds: make it one flushed after the last copy, as a later kill leaves it
        csv.write_text(csv.read_text(encoding="utf-8") + f"{newest + 1},1,2,0.25,0.05\n", encoding="utf-8")
    stale = [_stale_temp(paths.embeddings_dir, f"{NAME}.pt"), _stale_temp(paths.embeddings_dir, f"{NAME}.pt.optim"),
             _stale_temp(run_dir / "embeddings", f"{NAME}-{newest + 2}.pt"), _stale_temp(run_dir, "textual_inversion_loss.csv")]
    unrelated = _stale_temp(paths.embeddings_dir, "someone-else.pt")

    events = run(studio, paths, config(images, max_steps=newest + 3, save_every=2, preview_every=3, preview_steps=1,
                                       template="subject", seed=-1, batch_size=1, write_csv_every=1))
    started = events[0]
    assert started.initial_step == newest
    assert f"Resuming from {NAME}-{newest}.pt (step {newest})" in started.message
    if formats.optim_path(run_dir / "embeddings" / f"{NAME}-{newest}.pt").is_file():  # not killed between the two
        assert "continues as if it had never stopped" in started.message  # the copy's .optim held the data order
    assert formats.read(emb_path).step == newest + 3
    for path, data in crashed.items():  # the killed run's copies and previews are untouched
        if path.suffix != ".csv":
            assert path.read_bytes() == data, f"{path} was overwritten"
    assert not any(p.exists() for p in stale) and unrelated.exists()
    for csv in (paths.outputs_dir / "train").rglob("*.csv"):
        steps = [int(row.split(",")[0]) for row in csv.read_text(encoding="utf-8").splitlines()[1:]]
        assert len(steps) == len(set(steps)) and steps == sorted(steps), f"{csv}: {steps}"
    new_csv = started.log_dir / "textual_inversion_loss.csv"
    assert [int(r.split(",")[0]) for r in new_csv.read_text(encoding="utf-8").splitlines()[1:]][-3:] == \
        [newest + 1, newest + 2, newest + 3]


def test_a_recreated_embedding_does_not_resume_from_an_earlier_runs_copies(studio, paths, images):
    path = make_embedding(studio, paths)
    stop = __import__("threading").Event()
    gen = train(studio, config(images, max_steps=50, save_every=2), EmbeddingLibrary(paths.embeddings_dir), paths, stop)
    for event in gen:
        if isinstance(event, Saved) and event.step == 2:
            break
    gen.close()  # saves step 2 to the file, after the copy: the copy is not newer
    make_embedding(studio, paths, overwrite=True)  # a fresh embedding of the same name, newer than every copy
    started = run(studio, paths, config(images, max_steps=1))[0]
    assert started.initial_step == 0 and "Resuming from" not in started.message
    assert path.is_file()


# -- a full disk ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB tmpfs (the test runs as root, as CI does); skipped with the reason otherwise."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); the disk-full test needs root"
        print(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, leave_pages: int = 0) -> None:
    """Fill the file system of `folder` with one file, then give back `leave_pages` 4 KiB pages."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    size = 0
    with contextlib.suppress(OSError):
        while True:
            size += os.write(fd, b"\0" * 65536)
    with contextlib.suppress(OSError):
        while True:
            size += os.write(fd, b"\0" * 4096)
    os.ftruncate(fd, max(0, size - leave_pages * 4096))
    os.close(fd)


@pytest.mark.parametrize("what", ["settings", "copy", "optim", "final", "preview", "csv"])
def test_a_full_disk_gives_the_documented_message_and_keeps_the_old_files(studio, cache_dir, images, small_disk,
                                                                          monkeypatch, what):
    paths = Paths(small_disk / "embeddings", small_disk / "outputs", small_disk / "models", cache_dir)
    paths.embeddings_dir.mkdir()
    path = make_embedding(studio, paths)
    monkeypatch.setattr(train_setup, "_check_disk", lambda *a: None)  # the disk filled up after the pre-flight
    if what == "optim":  # an .optim from an earlier run, to be kept
        run(studio, paths, config(images, max_steps=1, write_csv_every=0))
    before = {p: p.read_bytes() for p in paths.embeddings_dir.iterdir()}
    kw = {"settings": {}, "copy": dict(save_every=1), "optim": dict(max_steps=2), "final": {},
          "preview": dict(preview_every=1), "csv": dict(write_csv_every=1)}[what]
    cfg = config(images, **{"max_steps": 2, "write_csv_every": 0, **kw})
    if what == "settings":
        _fill(small_disk)
    events = []
    with pytest.raises(TrainingError, match=r"^the disk is full while writing .*; free some space and resume\.$") as err:
        for event in train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths):
            events.append(event)
            if isinstance(event, Started):
                _fill(small_disk, leave_pages=1 if what == "optim" else 0)
    written = {"settings": "settings-", "copy": f"{NAME}-1.pt", "optim": f"{NAME}.pt.optim", "final": f"{NAME}.pt",
               "preview": f"{NAME}-1.png", "csv": "textual_inversion_loss.csv"}[what]
    assert written in str(err.value)
    if what == "optim":  # the embedding itself was written; its previous .optim is kept whole
        assert formats.optim_path(path).read_bytes() == before[formats.optim_path(path)]
    else:
        assert {p: p.read_bytes() for p in paths.embeddings_dir.iterdir()} == before
    assert not [p for p in small_disk.rglob("*.tmp")]  # no temp file left behind
    assert not studio.busy_with
