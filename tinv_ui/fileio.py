"""Atomic file writes (write to a temp file in the same folder, fsync, then rename over the target), and a file's sha256.

A crash, an interrupt or a full disk during a write leaves the old file intact (or no file), never a
half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


TEMP_SUFFIX = ".tmp"
# `.NAME.XXXXXXXX.tmp`: the names `atomic_path` gives its temp files (mkstemp's 8 random characters)
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


def temp_target(name: str) -> str | None:
    """The file name a temp file of ours (`.NAME.XXXXXXXX.tmp`) was about to replace, or None if it is not one."""
    found = _TEMP_NAME.match(name)
    return found.group("target") if found else None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and move the result to `path` atomically. Returns `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, as hex, read in 1 MiB blocks (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected pos ..."), not as ENOSPC,
# so an error while writing into a folder with less than this free counts as a full disk too.
DISK_NEARLY_FULL_BYTES = 1 << 20


def display_path(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it lies inside it (shorter to read), else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def existing_parent(path: str | os.PathLike) -> Path:
    """`path` itself when it exists, else its nearest existing ancestor (where a folder would be created)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def is_disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """True when `error`, raised while writing `path`, means the disk is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(existing_parent(Path(path).parent)).free < DISK_NEARLY_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_is_said(path: str | os.PathLike, advice: str, error: type[Exception] | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` into `error` (default `DiskFullError`): "the disk is full while
    writing PATH; ADVICE". An error of that type raised inside passes through unchanged."""
    from .errors import DiskFullError

    error = error or DiskFullError
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, error) or not is_disk_full(e, path):
            raise
        raise error(f"the disk is full while writing {path}; {advice}") from e


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None when they can.

    Checked without creating anything: the nearest existing part of the path must be a folder we may write.
    """
    existing = existing_parent(Path(folder).expanduser())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written (no permission, or a read-only disk)"
    return None
