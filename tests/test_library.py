"""EmbeddingLibrary: scanning, change detection, skipped reasons, collisions and warnings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinv_ui import formats
from tinv_ui.embedding import Embedding
from tinv_ui.errors import TinvError
from tinv_ui.library import EmbeddingLibrary


def _write(path: Path, n: int = 2, d: int = 32, seed: int = 0, name: str | None = None) -> Path:
    vec = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return formats.write(Embedding(name or path.stem, vec, step=0), path)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "embeddings"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    from tinv_ui.tiny_model import load_clip_tokenizer

    return load_clip_tokenizer(cache_dir)


def test_scan_loads_sorted_with_hashes(folder):
    _write(folder / "zeta.pt")
    _write(folder / "Alpha.safetensors", n=3)
    _write(folder / "beta.bin", n=1)
    lib = EmbeddingLibrary(folder)
    assert lib.refresh() is True
    assert lib.names() == ["Alpha", "beta", "zeta"]
    entry = lib.get("Alpha")
    assert entry.path == folder / "Alpha.safetensors" and entry.embedding.num_vectors == 3
    assert entry.sha256 == hashlib.sha256(entry.path.read_bytes()).hexdigest()
    assert lib.hashes()["Alpha"] == entry.shorthash and len(entry.shorthash) == 12
    assert set(lib.vectors()) == {"Alpha", "beta", "zeta"} and lib.vectors()["beta"].shape == (1, 32)
    assert lib.skipped == [] and lib.collisions == [] and lib.warnings == []


def test_get_is_case_insensitive_and_lists_names_when_missing(folder):
    _write(folder / "MyStyle.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.get("mystyle").name == "MyStyle"
    with pytest.raises(TinvError, match="MyStyle") as info:
        lib.get("nope")
    assert "'nope'" in str(info.value)


def test_missing_folder_is_empty(tmp_path):
    lib = EmbeddingLibrary(tmp_path / "absent")
    assert lib.refresh() is True and lib.loaded == {} and lib.refresh() is False


def test_refresh_detects_add_delete_overwrite_and_subfolders(folder):
    _write(folder / "a.pt")
    lib = EmbeddingLibrary(folder)
    assert lib.refresh() is True
    assert lib.refresh() is False  # nothing changed: no rescan
    _write(folder / "b.pt")
    assert lib.refresh() is True and lib.names() == ["a", "b"]
    (folder / "b.pt").unlink()
    assert lib.refresh() is True and lib.names() == ["a"]
    # overwrite in place, same size, through the same inode (A1111 misses this)
    old = lib.get("a").embedding.vectors.clone()
    fresh = folder.parent / "tmp.pt"
    _write(fresh, seed=99)
    with open(folder / "a.pt", "r+b") as f:
        f.write(fresh.read_bytes())
    st = (folder / "a.pt").stat()
    os.utime(folder / "a.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert lib.refresh() is True
    assert not torch.equal(lib.get("a").embedding.vectors, old)
    # a change inside a subfolder (A1111 misses this too)
    (folder / "sub" / "deeper").mkdir(parents=True)
    assert lib.refresh() is False  # an empty folder is not a change
    _write(folder / "sub" / "deeper" / "c.safetensors")
    assert lib.refresh() is True and lib.names() == ["a", "c"]


def test_force_rescans(folder):
    _write(folder / "a.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.refresh(force=True) is True


def test_ignored_files(folder):
    _write(folder / "real.pt")
    _write(folder / ".hidden.pt")
    (folder / ".real.pt.abc123.tmp").write_bytes((folder / "real.pt").read_bytes())  # our atomic temp file
    (folder / ".half.pt").write_bytes(b"")  # a hidden file with an embedding suffix
    (folder / ".git").mkdir()
    _write(folder / ".git" / "inside.pt")
    _write(folder / "real.preview.png")
    formats.write_optim(folder / "real.pt", formats.read(folder / "real.pt"), {"state": {}, "param_groups": []})
    (folder / "notes.txt").write_text("x")
    (folder / "cfg.json").write_text("{}")
    Image.new("RGB", (16, 16), (250, 250, 250)).save(folder / "photo.png")  # a picture, not an embedding
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == ["real"] and lib.skipped == []


def test_image_embedding_uses_its_internal_name(folder):
    _write(folder / "card.png", name="inside-name")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == ["inside-name"] and lib.get("inside-name").path.name == "card.png"


def test_bad_files_are_skipped_with_reasons_and_do_not_abort(folder):
    _write(folder / "good.pt")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "junk.safetensors").write_bytes(b"\x00\x01junk")
    torch.save({"foo": 1}, folder / "weird.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == ["good"]
    reasons = {s.path.name: s.reason for s in lib.skipped}
    assert set(reasons) == {"empty.pt", "junk.safetensors", "weird.pt"}
    assert "empty" in reasons["empty.pt"]
    assert "'foo'" in reasons["weird.pt"]
    assert {s.name for s in lib.skipped} == {"empty", "junk", "weird"}


@pytest.mark.parametrize(
    ("width", "expected", "words"),
    [(768, 1024, ["768 (SD 1.x)", "1024 (SD 2.x)", "load a matching model"]),
     (1024, 768, ["1024 (SD 2.x)", "768 (SD 1.x)"]),
     (768, 32, ["768 (SD 1.x)", "32 (tiny test model)"])],
)
def test_width_mismatch_is_skipped(folder, width, expected, words):
    _write(folder / "other.pt", d=width)
    _write(folder / "fits.pt", d=expected)
    lib = EmbeddingLibrary(folder)
    lib.refresh(expected_width=expected)
    assert lib.names() == ["fits"]
    (skip,) = lib.skipped
    assert skip.name == "other" and all(w in skip.reason for w in words)
    assert lib.refresh(expected_width=width) is True  # another model: re-evaluated
    assert lib.names() == ["other"]


def test_sdxl_width_reported(folder):
    parts = {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}
    formats.write(Embedding("xl", parts=parts), folder / "xl.safetensors")
    lib = EmbeddingLibrary(folder)
    lib.refresh(expected_width=768)
    assert "2048 (SDXL)" in lib.skipped[0].reason
    lib.refresh(expected_width=2048)
    assert lib.names() == ["xl"] and lib.vectors() == {}  # SDXL pairs are not SD prompt vectors


def test_same_name_keeps_shallower_then_alphabetical(folder):
    (folder / "sub").mkdir()
    _write(folder / "sub" / "foo.pt", seed=1)
    _write(folder / "foo.safetensors", seed=2)
    _write(folder / "foo.pt", seed=3)
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.get("foo").path == folder / "foo.pt"  # shallow beats deep; then 'foo.pt' < 'foo.safetensors'
    assert len(lib.collisions) == 2
    assert all("foo.pt" in c for c in lib.collisions)
    assert any("sub/foo.pt" in c for c in lib.collisions) and any("foo.safetensors" in c for c in lib.collisions)
    assert sorted(s.path.name for s in lib.skipped) == ["foo.pt", "foo.safetensors"]


def test_names_with_the_same_tokens_collide(folder, tokenizer):
    _write(folder / "Foo.pt", seed=1)
    _write(folder / "foo.pt", seed=2)
    _write(folder / "my-thing.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh(tokenizer=tokenizer)
    assert lib.names() == ["Foo", "foo", "my-thing"]
    (msg,) = lib.collisions
    assert "'Foo'" in msg and "'foo'" in msg and "Foo.pt" in msg and "prompts use 'Foo'" in msg


def test_vocabulary_word_warning(folder, tokenizer):
    _write(folder / "cat.pt")
    _write(folder / "xq-zzqv-emb.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh(tokenizer=tokenizer)
    (warning,) = lib.warnings
    assert "'cat'" in warning and "vocabulary word" in warning


def test_partial_file_is_skipped_then_picked_up(folder):
    full = _write(folder.parent / "full.pt").read_bytes()
    (folder / "late.pt").write_bytes(full[: len(full) // 3])  # a copy in progress
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == [] and lib.skipped[0].name == "late"
    with open(folder / "late.pt", "ab") as f:
        f.write(full[len(full) // 3 :])
    assert lib.refresh() is True
    assert lib.names() == ["late"] and lib.skipped == []


def test_rescans_racing_a_slow_copy_never_fail_or_load_a_torn_file(folder):
    # A peer (A1111, a file manager) copies a file in without a temp name while the UI timers and the trainer
    # rescan from their own threads: every rescan succeeds, and a loaded entry always holds the whole file.
    import threading
    import time

    src = _write(folder.parent / "slow.safetensors", n=75, seed=7)
    vec, data = formats.read(src).vectors, src.read_bytes()
    lib, done, errors, torn, seen = EmbeddingLibrary(folder), threading.Event(), [], [], set()

    def copier():
        with open(folder / "slow.safetensors", "wb") as f:
            for i in range(0, len(data), 512):
                f.write(data[i:i + 512])
                f.flush()
                time.sleep(0.002)
        done.set()

    def rescanner():
        while not done.is_set():
            try:
                lib.refresh()
                entry = lib.loaded.get("slow")
                seen.add("loaded" if entry else "skipped" if any(x.name == "slow" for x in lib.skipped) else "absent")
                if entry is not None and not torch.equal(entry.embedding.vectors, vec):
                    torn.append(entry)
            except Exception as e:  # noqa: BLE001 - any exception is the failure being tested for
                errors.append(e)

    threads = [threading.Thread(target=copier)] + [threading.Thread(target=rescanner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and torn == []
    assert "skipped" in seen  # the rescans really saw the copy half-way
    lib.refresh()
    assert lib.names() == ["slow"] and torch.equal(lib.get("slow").embedding.vectors, vec) and lib.skipped == []


def test_symlink_loop_does_not_hang(folder):
    _write(folder / "a.pt")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert "a" in lib.names()
