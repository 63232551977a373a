"""What a training run will take from its dataset folder, worked out before Start (the Train panel's preview).

The folder is read by the trainer's own functions with the form's settings: `dataset.read_dataset` (the files
`load_dataset` keeps, their captions and sizes, the skipped files with reasons) and `train_setup.prompt_builder`
(the template and its `[name]` / `[filewords]` filling), so the preview cannot drift from what training does.
The work is bounded: one image is decoded at a time (with the dataset reader's pixel limit), only the first
`MAX_THUMBNAILS` get a small JPEG thumbnail, and reading stops after `TIME_LIMIT_SECONDS` (the rest is then
checked when training starts).
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .config import TrainConfig
from .dataset import DatasetImage, read_dataset
from .templates import NAME_TAG
from .train_setup import prompt_builder, train_size

MAX_THUMBNAILS = 48  # images shown with a thumbnail; the others are counted ("and N more")
THUMBNAIL_PX = 128  # longest side of a thumbnail, in pixels
TIME_LIMIT_SECONDS = 20.0  # reading stops here: a folder of thousands of camera photos must not hold the page


@dataclass(frozen=True)
class PreviewImage:
    """One image training will use: its file name, caption, prompts, size bucket and a small thumbnail."""

    name: str
    caption: str  # what `[filewords]` becomes
    prompts: tuple[str, ...]  # each template line filled (training picks one at random each time)
    bucket: tuple[int, int]  # (width, height) it is trained at
    original_size: tuple[int, int]  # (width, height) of the file
    thumbnail: bytes | None = None  # JPEG, longest side THUMBNAIL_PX; None beyond MAX_THUMBNAILS


@dataclass(frozen=True)
class DatasetPreview:
    """The usable images (in training order) and the skipped files ("name: reason") of a dataset folder."""

    folder: Path
    template: str
    images: tuple[PreviewImage, ...]
    skipped: tuple[str, ...]
    complete: bool = True  # False: the time limit stopped the reading; `images`/`skipped` are a prefix
    seconds: float = 0.0

    @property
    def buckets(self) -> dict[tuple[int, int], int]:
        """Images per (width, height), largest bucket first."""
        return dict(Counter(item.bucket for item in self.images).most_common())


def preview_dataset(cfg: TrainConfig, name: str = "", *, max_thumbnails: int = MAX_THUMBNAILS,
                    time_limit: float = TIME_LIMIT_SECONDS,
                    clock: Callable[[], float] = time.monotonic) -> DatasetPreview:
    """Read `cfg.dataset_dir` as a run with `cfg` would, for the embedding `name` ("" shows `[name]`).

    Raises what training's pre-flight raises for the same settings: `ConfigError` (template, regex) and
    `DatasetError` (no such folder). A folder without any usable image is not an error here: the preview
    lists why each file was skipped.
    """
    start = clock()
    builder = prompt_builder(cfg, name.strip() or NAME_TAG)
    images: list[PreviewImage] = []
    skipped: list[str] = []
    complete = True
    for item in read_dataset(cfg.dataset_dir, train_size(cfg), cfg.filename_regex, cfg.filename_join):
        if clock() - start > time_limit:  # checked after the next file is read: this one counts as unread
            complete = False
            break
        if isinstance(item, DatasetImage):
            thumb = thumbnail(item.image) if len(images) < max_thumbnails else None
            images.append(PreviewImage(item.path.name, item.caption, tuple(builder.every_line(item.caption)),
                                       item.size, item.original_size or item.size, thumb))
        else:
            skipped.append(item)
    return DatasetPreview(Path(cfg.dataset_dir), builder.template.name, tuple(images), tuple(skipped), complete,
                          clock() - start)


def folder_listing(folder: str | Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of each entry of `folder`, sorted: equal listings mean an unchanged folder (a
    preview of it can be kept). Empty when it is not a readable folder."""
    try:
        entries = list(Path(folder).expanduser().iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            info = entry.stat()
        except OSError:
            continue
        out.append((entry.name, info.st_size, info.st_mtime_ns))
    return sorted(out)


def thumbnail(image: Image.Image, side: int = THUMBNAIL_PX) -> bytes:
    """`image` (the pixels training uses) shrunk to at most `side` pixels, as JPEG bytes."""
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    small.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()
