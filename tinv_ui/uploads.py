"""Copy browser uploads (a dropped folder or files) into a dataset folder under outputs/datasets/.

Gradio hands us temp paths, one folder per file, with the browser's file name; a folder drop loses its
structure. Names come from the client, so they are untrusted: directory parts and `..` are stripped,
only safe characters are kept, and duplicates get a numeric suffix. Nothing outside the new folder is written.
"""

from __future__ import annotations

import datetime as _dt
import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..dataset import CAPTION_SUFFIX, IMAGE_SUFFIXES
from ..fileio import atomic_write

CAPTION_SUFFIXES = {CAPTION_SUFFIX}
MAX_NAME = 120
MAX_LABEL = 60  # of the dataset folder's name, before its time stamp


@dataclass(frozen=True)
class ImportedDataset:
    """Where the uploaded files went, how many images/captions were kept and which names were ignored."""

    folder: Path
    images: int
    captions: int
    ignored: tuple[str, ...]


def safe_file_name(name: str) -> str:
    """The last path component of `name` with unsafe characters replaced by '_' (never empty, never hidden)."""
    base = PureWindowsPath(PurePosixPath(name.replace("\\", "/")).name).name
    base = unicodedata.normalize("NFC", base).replace("..", "_")
    clean = "".join(c if (c.isalnum() or c in "._- ()") else "_" for c in base).strip(" .")
    if not clean.strip("_"):
        return "file"
    stem, dot, suffix = clean.rpartition(".")
    if not dot:
        stem, suffix = clean, ""
    stem = stem[: MAX_NAME - len(suffix) - 1] or "file"
    return f"{stem}.{suffix.lower()}" if suffix else stem


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name-1`, `name-2`, ... if taken (case-insensitively: the folder may be on a case-folding disk)."""
    stem, suffix = (name.rsplit(".", 1) + [""])[:2]
    candidate, n = name, 1
    while candidate.lower() in taken:
        candidate = f"{stem}-{n}.{suffix}" if suffix else f"{stem}-{n}"
        n += 1
    taken.add(candidate.lower())
    return candidate


def dataset_folder(outputs_dir: Path, label: str, now: _dt.datetime | None = None) -> Path:
    """outputs/datasets/<label>-<YYYYmmdd-HHMMSS>, with the label made safe (default 'dataset')."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^\w.-]+", "_", label or "").strip("._")[:MAX_LABEL].strip("._") or "dataset"
    return outputs_dir / "datasets" / f"{safe}-{stamp}"


def import_uploads(files: list[str | Path], outputs_dir: Path, label: str = "") -> ImportedDataset:
    """Copy uploaded images and .txt captions into a fresh dataset folder; other files are ignored."""
    folder = dataset_folder(outputs_dir, label)
    n = 1
    while folder.exists():  # two uploads in the same second
        folder = folder.with_name(f"{folder.name.rsplit('~', 1)[0]}~{n}")
        n += 1
    folder.mkdir(parents=True)
    taken: set[str] = set()
    images = captions = 0
    ignored: list[str] = []
    for src in map(Path, files):
        name = safe_file_name(src.name)
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_SUFFIXES | CAPTION_SUFFIXES:
            ignored.append(src.name)
            continue
        dest = folder / _unique(name, taken)
        atomic_write(dest, lambda tmp, src=src: shutil.copyfile(src, tmp))
        images += suffix in IMAGE_SUFFIXES
        captions += suffix in CAPTION_SUFFIXES
    return ImportedDataset(folder, images, captions, tuple(ignored))
