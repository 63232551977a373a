"""Copy browser uploads (a chosen folder or files) into a dataset folder under outputs/datasets/.

Gradio hands us temp paths, one folder per file, with the browser's file name; a folder upload loses its
structure, so subfolders are flattened into one folder. Names come from the client, so they are untrusted:
directory parts and `..` are stripped, only safe characters are kept, and duplicates get a numeric suffix.
Nothing outside the dataset folder is written.

Uploading the same files again reuses their folder instead of making a copy each time: each upload folder
holds a manifest (`.tinv-upload.json`, hidden, so the dataset reader passes over it) with the sha256 of every
file under its name; an upload with the same {name: sha256} reuses the folder. An upload of captions only
(`.txt` files, no image) goes into the current upload folder beside the images of the same name.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .dataset import CAPTION_SUFFIX, IMAGE_SUFFIXES
from .errors import ConfigError
from .fileio import atomic_write, atomic_write_text, file_sha256

CAPTION_SUFFIXES = {CAPTION_SUFFIX}
MAX_NAME = 120
MAX_LABEL = 60  # of the dataset folder's name, before its time stamp
MANIFEST = ".tinv-upload.json"  # in each upload folder: {"files": {name: sha256}}
MAX_MANIFEST_BYTES = 16 << 20  # a manifest larger than this is not ours (or not worth reading): ignored
NOT_KEPT = "not an image or a .txt caption"
NO_IMAGE = "not the .txt caption of an image in the dataset folder"


@dataclass(frozen=True)
class ImportedDataset:
    """Where the uploaded files went, how many images/captions were kept and which names were ignored."""

    folder: Path
    images: int
    captions: int
    ignored: tuple[str, ...]  # the browser's names of the files not written
    why_ignored: str = NOT_KEPT
    reused: bool = False  # the same files were uploaded before: their folder is used again, nothing copied
    captions_only: bool = False  # .txt files written beside the images of the current upload folder


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


def receive_uploads(files: list[str | Path], outputs_dir: Path, label: str = "",
                    current: str | Path = "") -> ImportedDataset:
    """An upload from the page: captions only go into the current upload folder (`current`, the Dataset folder
    field), anything else becomes (or reuses) an upload folder of its own."""
    kept = [Path(safe_file_name(Path(f).name)).suffix.lower() for f in files]
    if kept and CAPTION_SUFFIX in kept and not IMAGE_SUFFIXES.intersection(kept):
        folder = upload_folder(current, outputs_dir)
        if folder is None:
            raise ConfigError(
                "dataset_dir: these are captions only (.txt) and go beside their images, but the Dataset folder "
                "is not an uploaded one (outputs/datasets/...). Upload the images first (or with their captions), "
                "or put the .txt files beside the images in your own folder.")
        return import_captions(files, folder)
    return import_uploads(files, outputs_dir, label)


def upload_folder(current: str | Path, outputs_dir: Path) -> Path | None:
    """`current` when it is an upload folder (a folder directly in outputs/datasets/), else None."""
    if not str(current).strip():
        return None
    folder = Path(current).expanduser()
    datasets = (Path(outputs_dir) / "datasets").resolve()
    return folder if folder.resolve().parent == datasets and folder.is_dir() else None  # as the field says it


def import_uploads(files: list[str | Path], outputs_dir: Path, label: str = "") -> ImportedDataset:
    """Copy uploaded images and .txt captions into a dataset folder; other files are ignored.

    The folder is new, unless an earlier upload of exactly these files (names and bytes) is still as it left
    it: then that folder is returned and nothing is copied."""
    taken: set[str] = set()
    chosen: list[tuple[Path, str, str]] = []  # (uploaded file, name in the folder, sha256)
    ignored: list[str] = []
    for src in map(Path, files):
        name = safe_file_name(src.name)
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES | CAPTION_SUFFIXES:
            ignored.append(src.name)
            continue
        chosen.append((src, _unique(name, taken), file_sha256(src)))
    hashes = {name: sha for _, name, sha in chosen}
    images = sum(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in hashes)
    counts = dict(images=images, captions=len(hashes) - images, ignored=tuple(ignored))
    if hashes and (earlier := _earlier_upload(outputs_dir, hashes)) is not None:
        return ImportedDataset(earlier, reused=True, **counts)
    folder = _new_folder(outputs_dir, label)
    for src, name, _ in chosen:
        atomic_write(folder / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    if hashes:  # written last: a folder whose copy was cut short has none and is never reused
        _write_manifest(folder, hashes)
    return ImportedDataset(folder, **counts)


def import_captions(files: list[str | Path], folder: Path) -> ImportedDataset:
    """Write uploaded `.txt` captions beside the images of the same name (case-insensitive) in `folder`,
    replacing their captions; a caption without an image there is ignored. The manifest follows the change."""
    images = {p.stem.lower(): p for p in folder.iterdir()
              if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES}
    written: dict[str, str] = {}
    ignored: list[str] = []
    for src in map(Path, files):
        name = Path(safe_file_name(src.name))
        image = images.get(name.stem.lower())
        if image is None or name.suffix.lower() != CAPTION_SUFFIX:
            ignored.append(src.name)
            continue
        dest = image.with_suffix(CAPTION_SUFFIX)
        atomic_write(dest, lambda tmp, src=src: shutil.copyfile(src, tmp))
        written[dest.name] = file_sha256(dest)
    if written and (hashes := _read_manifest(folder)) is not None:
        _write_manifest(folder, {**hashes, **written})
    return ImportedDataset(folder, 0, len(written), tuple(ignored), NO_IMAGE, captions_only=True)


def _new_folder(outputs_dir: Path, label: str) -> Path:
    folder = dataset_folder(outputs_dir, label)
    n = 1
    while folder.exists():  # two uploads in the same second
        folder = folder.with_name(f"{folder.name.rsplit('~', 1)[0]}~{n}")
        n += 1
    folder.mkdir(parents=True)
    return folder


def _write_manifest(folder: Path, hashes: dict[str, str]) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps({"files": hashes}, indent=1))


def _read_manifest(folder: Path) -> dict[str, str] | None:
    """The {name: sha256} a folder's manifest records, or None when it has none (or one that is not ours)."""
    path = folder / MANIFEST
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return None
    return files


def _earlier_upload(outputs_dir: Path, hashes: dict[str, str]) -> Path | None:
    """The upload folder that holds exactly these files (names and bytes, re-checked now), if any."""
    root = Path(outputs_dir) / "datasets"
    if not root.is_dir():
        return None
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.is_symlink():
            continue
        if _read_manifest(folder) != hashes:  # recorded for other files (or no manifest)
            continue
        present = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
        if present == set(hashes) and all(file_sha256(folder / n) == sha for n, sha in hashes.items()):
            return folder  # unchanged since: nothing added, removed or edited
    return None
