"""Rows of docs/reliability.md proved through the core (the browser side is in test_browser_reliability.py).

Most rows have their test beside the module they exercise (the table names it); the ones here cut across
modules: a real 12000x12000 file, a folder of every awkward image kind trained end to end, an interrupt or
a full disk in the middle of a save, and names that are long, unicode or try to leave their folder.
"""

from __future__ import annotations

import errno
import struct
import threading
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_images
from tinv_ui import formats, torchfile, training
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.dataset import load_dataset
from tinv_ui.errors import DatasetError
from tinv_ui.events import Finished, Phase, Saved, Started
from tinv_ui.jobs import TrainingRunner
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.tokens import PromptTokenizer
from tinv_ui.uploads import MANIFEST, MAX_NAME, import_uploads, safe_file_name

NAME = "relemb"


@pytest.fixture
def emb_path(studio, paths):
    return create_embedding(studio, CreateConfig(name=NAME, initializer="painting", num_vectors=2), paths.embeddings_dir)


def config(folder: Path, **kw) -> TrainConfig:
    base = dict(embedding=NAME, dataset_dir=str(folder), template="subject_filewords", max_steps=2, width=64,
                height=64, learn_rate="0.02", save_every=0, preview_every=0, seed=1)
    return TrainConfig(**{**base, **kw})


def train_events(studio, paths, cfg, stop=None) -> list:
    """The run's events without its `Phase`s (tests/test_progress.py checks those)."""
    events = training.train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths, stop)
    return [e for e in events if not isinstance(e, Phase)]


def leftovers(*folders: Path) -> list[Path]:
    """Temp files of atomic writes (`.<name>.XXXX.tmp`) left anywhere under `folders`."""
    return [p for f in folders for p in f.rglob("*.tmp")]


# -- dataset -------------------------------------------------------------------------------------------------------
def write_big_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit greyscale PNG of any size, streamed row by row (12000x12000 is 18 MB of pixels, 20 kB on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_12000_pixel_square_image_is_skipped_before_decoding(tmp_path):
    folder = tmp_path / "d"
    write_images(folder, 2)
    write_big_png(folder / "huge.png", 12000, 12000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(folder / "huge.png") as img:
            assert img.size == (12000, 12000)  # a real, readable file
    d = load_dataset(folder, (64, 64))
    assert len(d.images) == 2
    assert d.skipped == ("huge.png: 12000x12000 is over the 8192x8192 pixel limit; downscale it first",)


def awkward_folder(folder: Path) -> Path:
    """Mixed sizes and modes, EXIF rotation, a corrupt file, a non-image, captions in three encodings."""
    folder.mkdir(parents=True)
    Image.new("RGB", (96, 64), "red").save(folder / "wide.png")
    Image.new("RGB", (48, 120), "blue").save(folder / "tall.jpg")
    Image.new("RGBA", (80, 80), (0, 255, 0, 128)).save(folder / "rgba.png")
    pal = Image.new("P", (64, 64), 3)
    pal.putpalette([i % 256 for i in range(768)])
    pal.save(folder / "palette.png", transparency=3)
    rotated = Image.new("RGB", (80, 64), "white")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    Image.new("I;16", (64, 64), 40000).save(folder / "sixteen.png")
    Image.new("CMYK", (64, 64), (0, 50, 100, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (64, 64), "gray").save(folder / "pic.webp")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "wide.txt").write_bytes("tête, crème".encode("utf-16"))
    (folder / "tall.txt").write_bytes("naïve café".encode("cp1252"))
    (folder / "rgba.txt").write_bytes(b"\xef\xbb\xbfbom caption")
    return folder


def test_awkward_images_train_and_are_reported(studio, paths, emb_path, tmp_path):
    folder = awkward_folder(tmp_path / "awkward")
    for keep_size in (False, True):
        events = train_events(studio, paths, config(folder, keep_size=keep_size, batch_size=2, flip=True,
                                                    use_alpha_weight=True, max_steps=2 * (1 + keep_size)))
        started, finished = events[0], events[-1]
        assert isinstance(started, Started) and started.num_images == 8 - keep_size
        assert "broken.png" in started.message and "notes.pdf" in started.message
        if keep_size:  # trained at its own size, an image must be at least 64 px (the tiny model's minimum)
            assert "tall.jpg: 48x120 is too small to train at its own size" in started.message
        assert isinstance(finished, Finished) and finished.step == 2 * (1 + keep_size) and not finished.interrupted
        assert finished.message.endswith(started.message[started.message.index(" Skipped: "):])  # said again at the end
    d = load_dataset(folder, (64, 64))
    captions = {i.path.name: i.caption for i in d.images}
    assert captions["wide.png"] == "tête, crème" and captions["tall.jpg"] == "naïve café"
    assert captions["rgba.png"] == "bom caption"
    assert {i.path.name: i.size for i in load_dataset(folder, None).images}["rotated.jpg"] == (64, 80)


def test_an_empty_or_imageless_folder_stops_before_any_work(studio, paths, emb_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    before = emb_path.read_bytes()
    with pytest.raises(DatasetError, match="dataset_dir.*folder is empty"):
        train_events(studio, paths, config(empty))
    (empty / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(DatasetError, match=r"no usable image \(a.pdf: not an image\)"):
        train_events(studio, paths, config(empty))
    assert emb_path.read_bytes() == before and not any((paths.outputs_dir / "train").rglob("*"))


# -- training: interrupts and full disks during a save ----------------------------------------------------------------
def test_interrupt_pressed_during_a_save_lets_the_save_finish_then_stops(studio, paths, images, emb_path, monkeypatch):
    stop = threading.Event()
    real_write = formats.write

    def write_and_press_interrupt(emb, path, *a, **kw):
        if path.name == f"{NAME}-2.pt":
            stop.set()  # the user presses Interrupt while the step-2 copy is being written
        return real_write(emb, path, *a, **kw)

    monkeypatch.setattr(formats, "write", write_and_press_interrupt)
    events = train_events(studio, paths, config(images, max_steps=10, save_every=2), stop)
    copy = next(e.path for e in events if isinstance(e, Saved) and not e.final)
    assert formats.read(copy).step == 2  # the copy is whole
    assert events[-1].interrupted and events[-1].step == 2
    assert events[-1].message == f"Training interrupted at step 2; saved to {emb_path}"
    assert formats.read(emb_path).step == 2 and formats.read_optim(emb_path, formats.read(emb_path)) is not None
    assert leftovers(paths.embeddings_dir, paths.outputs_dir) == []


def _dies_halfway(exc: BaseException, when):
    """A torch-file writer (`torchfile.save`, what every .pt/.optim write goes through) that writes half of the
    real bytes and then fails with `exc`, for saves `when(path)` picks."""
    real_save = torchfile.save

    def save(obj, f, *a, **kw):
        if not when(Path(f)):
            return real_save(obj, f, *a, **kw)
        real_save(obj, f, *a, **kw)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise exc

    return save


def test_a_hard_kill_inside_a_write_keeps_the_previous_file(studio, paths, images, emb_path, monkeypatch):
    """Ctrl-C twice (KeyboardInterrupt) in the middle of writing the final file: the old file stays whole."""
    before = emb_path.read_bytes()
    monkeypatch.setattr(torchfile, "save", _dies_halfway(KeyboardInterrupt(), lambda p: p.name.startswith(f".{NAME}.pt.")))
    with pytest.raises(KeyboardInterrupt):
        train_events(studio, paths, config(images, max_steps=2))
    assert emb_path.read_bytes() == before and formats.read(emb_path).step == 0
    assert leftovers(paths.embeddings_dir, paths.outputs_dir) == []
    assert studio.busy_with == "" and not studio.pipeline.unet.is_gradient_checkpointing


@pytest.mark.parametrize("which", ["periodic copy", "final file"])
def test_disk_full_during_a_save_is_a_clear_error_and_loses_nothing(studio, paths, images, emb_path, monkeypatch, which):
    before = emb_path.read_bytes()
    target = f".{NAME}-2.pt." if which == "periodic copy" else f".{NAME}.pt."
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torchfile, "save", _dies_halfway(full, lambda p: p.name.startswith(target)))
    runner = TrainingRunner(studio, EmbeddingLibrary(paths.embeddings_dir), paths)
    job = runner.start(config(images, max_steps=3, save_every=2))
    assert job.wait(120)
    snap = job.snapshot()
    assert snap.status == "failed"
    assert "the disk is full while writing" in snap.message and "free some space" in snap.message
    assert emb_path.read_bytes() == before  # the library file is the one from before the run, whole
    assert leftovers(paths.embeddings_dir, paths.outputs_dir) == []
    assert not list((paths.outputs_dir / "train").rglob(f"{NAME}-2.pt")) or which == "final file"
    assert studio.busy_with == ""


# -- names -------------------------------------------------------------------------------------------------------
def test_long_and_unicode_upload_names_are_cut_kept_apart_and_stay_inside(tmp_path):
    src = tmp_path / "browser"
    src.mkdir()
    files = []
    for i, raw in enumerate(["x" * 240 + "a.png", "x" * 240 + "b.png", "e\u0301lan \U0001f600.PNG", "日本語.jpg"]):
        (src / str(i)).mkdir()  # Gradio keeps each upload in a folder of its own, under the browser's name
        files.append(src / str(i) / raw)
        Image.new("RGB", (8, 8)).save(files[-1], format="PNG")
    result = import_uploads(files, tmp_path / "outputs", label="../../" + "ñ" * 300)
    names = sorted(p.name for p in result.folder.iterdir() if p.name != MANIFEST)
    assert result.images == 4 and len(set(n.lower() for n in names)) == 4
    assert all(len(n) <= MAX_NAME + 4 for n in names)
    assert "élan _.png" in names and "日本語.jpg" in names  # NFC-normalised, the emoji replaced
    assert result.folder.parent.resolve() == (tmp_path / "outputs" / "datasets").resolve()
    assert result.folder.name.startswith("ñ" * 60 + "-")  # the label is cut, not refused
    assert safe_file_name("../" * 50 + "x.png") == "x.png"


def test_unicode_embedding_names_work_in_prompts(studio, paths):
    create_embedding(studio, CreateConfig(name="café-ñ", initializer="cat"), paths.embeddings_dir)
    library = EmbeddingLibrary(paths.embeddings_dir)
    library.refresh(expected_width=studio.embedding_width, tokenizer=studio.tokenizer)
    assert library.names() == ["café-ñ"]
    out = PromptTokenizer(studio.tokenizer, {"café-ñ": 1})("a photo of CAFÉ-Ñ")
    assert out.used == ["café-ñ"]
