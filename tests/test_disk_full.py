"""A full or read-only disk, for real: a small tmpfs mounted by the test (needs root, as in CI; skipped otherwise).

Create and Generate must say the disk is full (not a generic error) and keep the files already there whole;
a log folder on a read-only disk is refused naming `log_dir`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

from tinv_ui import generation
from tinv_ui.config import CreateConfig, GenerateConfig, Paths
from tinv_ui.create import create_embedding
from tinv_ui.errors import DiskFullError
from tinv_ui.events import Generated
from tinv_ui.fileio import folder_problem
from tinv_ui.library import EmbeddingLibrary


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A tmpfs at `folder` with mount `options`; skips the test (saying why) when it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root); run as root to test a real full disk")
    folder.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); a real full disk is not tested")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=1m") as folder:
        yield folder


def fill(folder: Path) -> None:
    """Write until the disk says ENOSPC: nothing more fits."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        (folder / "probe").write_bytes(b"\0" * 4096)
    assert info.value.errno == errno.ENOSPC
    (folder / "probe").unlink(missing_ok=True)


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_create_on_a_full_disk_says_so_and_keeps_the_old_file(studio, small_disk, cache_dir):
    embeddings = small_disk / "embeddings"
    old = create_embedding(studio, CreateConfig(name="full", initializer="*", num_vectors=1), embeddings)
    before = old.read_bytes()
    fill(small_disk)

    for cfg in (CreateConfig(name="full", initializer="cat", num_vectors=8, overwrite=True),
                CreateConfig(name="new-one", initializer="cat", num_vectors=8)):
        with pytest.raises(DiskFullError) as info:
            create_embedding(studio, cfg, embeddings)
        assert str(info.value).startswith(f"the disk is full while writing {embeddings.resolve() / cfg.name}.pt; "
                                          "free some space and create it again")
    assert old.read_bytes() == before
    assert files_in(embeddings) == {"full.pt"}  # no temp file, no half of a new one


def test_generate_on_a_full_disk_says_so_and_keeps_the_saved_images(studio, small_disk, cache_dir):
    paths = Paths(small_disk / "embeddings", small_disk / "outputs", small_disk / "models", cache_dir)
    paths.embeddings_dir.mkdir()
    cfg = GenerateConfig(prompt="a cat", steps=2, width=64, height=64, seed=5)
    events = list(generation.generate(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    (first,) = [e for e in events if isinstance(e, Generated)][0].paths
    before = first.read_bytes()
    fill(small_disk)

    with pytest.raises(DiskFullError) as info:
        list(generation.generate(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    assert "the disk is full while writing" in str(info.value) and "untick 'Save images'" in str(info.value)
    assert first.read_bytes() == before
    assert files_in(paths.outputs_dir) == {str(first.relative_to(paths.outputs_dir))}


def test_a_log_folder_on_a_read_only_disk_is_refused(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        assert "cannot be written (no permission, or a read-only disk)" in folder_problem(folder / "logs" / "run")
    afile = tmp_path / "a-file"
    afile.write_text("x", encoding="utf-8")
    assert folder_problem(afile / "logs") == f"{afile} is a file, not a folder"
    assert folder_problem(tmp_path / "new" / "logs") is None
