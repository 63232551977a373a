"""Training images: listing, decoding, captions, size buckets, the latent cache and the batch sampler.

Follows A1111's dataset (`modules/textual_inversion/dataset.py`, `PersonalizedBase`) with its quirks fixed:
- the folder is listed non-recursively and every file is tried with Pillow (no extension list); files that
  are not usable are reported with a reason instead of being skipped silently;
- EXIF orientation is applied; palette/RGB images with transparency become RGBA; the alpha channel is kept
  only as a loss weight (the RGB is used as is, not composited);
- huge images: anything above `MAX_PIXELS` (8192 x 8192 = 64 MP) is refused with a reason before it is decoded,
  except JPEGs, which Pillow can decode directly at 1/2, 1/4 or 1/8 scale ("draft" mode) when that brings them
  under the limit; this guards against decompression bombs without rejecting big camera photos;
- captions come from a `.txt` sidecar (any encoding, stripped) or the file name (`^[-\\d]+\\s*` removed, then the
  optional regex's matches joined);
- images are resized to the training size (bicubic, stretching like A1111), or with `keep_size` rounded down to a
  multiple of 8 and grouped in same-size buckets;
- horizontal flips (p = 0.5) are really applied: the mirrored image is encoded into the cache too;
- alpha weights are resized to the latent size with (width, height) in the right order;
- each image keeps its size before resizing, for SDXL's size conditioning (`LatentCache.time_ids`).
"""

from __future__ import annotations

import logging
import math
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import regex as bounded_re  # the `regex` package: a time limit per match, and it releases the GIL meanwhile
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import LatentSampling
from .errors import ConfigError, DatasetError
from .templates import decode_text

log = logging.getLogger(__name__)

MAX_PIXELS = 8192 * 8192  # 64 MP: larger images are refused before decoding (or drafted smaller, for JPEG)
MIN_KEEP_SIZE = 64  # with keep_size, smaller images cannot go through the UNet's downsampling
# Training-image files by suffix: what an upload keeps. (A dataset folder tries every file with PIL, and says
# why one is not an image; `formats.IMAGE_EMBEDDING_SUFFIXES` are embeddings stored in pictures, another thing.)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_SUFFIX = ".txt"  # `IMAGE.txt` beside an image holds its caption
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class _Skip(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class DatasetImage:
    """One usable image: its file, caption, RGB pixels at the training size and optional alpha (mode L)."""

    path: Path
    caption: str
    image: Image.Image
    alpha: Image.Image | None = None
    original_size: tuple[int, int] | None = None  # (width, height) of the file before resizing; None: `size`

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.image.size


@dataclass(frozen=True)
class Dataset:
    """The usable images of a folder (sorted by file name) and the files that were skipped, with reasons."""

    folder: Path
    images: tuple[DatasetImage, ...]
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Image indices grouped by (width, height)."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.images):
            out.setdefault(item.size, []).append(i)
        return out


# -- captions ------------------------------------------------------------------------------------------


# A file name is short: any sane pattern matches it in microseconds. One that needs longer backtracks
# catastrophically (`(a|aa)+$`) and would hold the CPU for hours; it is stopped and named instead.
REGEX_TIMEOUT_SECONDS = 0.25


def compile_filename_regex(pattern: str) -> bounded_re.Pattern | None:
    """The `filename_regex` setting compiled, or None when empty; a bad pattern is a `ConfigError`."""
    if not pattern:
        return None
    try:
        return bounded_re.compile(pattern)
    except (bounded_re.error, re.error, ValueError, OverflowError, RecursionError) as e:
        raise ConfigError(f"filename_regex {pattern!r} is not a valid regular expression ({e}); e.g. use \\w+") from e


def filename_matches(regex: bounded_re.Pattern, text: str) -> list[str]:
    """The whole matches of `filename_regex` in `text`, or a `ConfigError` naming it when it runs too long."""
    try:
        return [m.group(0) for m in regex.finditer(text, timeout=REGEX_TIMEOUT_SECONDS, concurrent=True)]
    except TimeoutError:
        raise ConfigError(
            f"filename_regex {regex.pattern!r} took over {REGEX_TIMEOUT_SECONDS} s on the file name {text[:80]!r} "
            "and was stopped: it backtracks without end (nested repeats such as (a+)+ or (a|aa)+). Simplify it, "
            "e.g. \\w+ or [^_]+."
        ) from None


def caption_for(path: Path, regex: bounded_re.Pattern | None = None, join: str = " ") -> str:
    """The caption of an image: its `.txt` sidecar (stripped), else its file name (as A1111's
    `PersonalizedBase.__init__` in `modules/textual_inversion/dataset.py`).

    For file names a leading run of digits/dashes is removed (`000001-1-a man.png` -> "a man"); with a regex,
    only its matches (whole matches, also when the pattern has groups) are kept, joined with `join`.
    """
    for suffix in (CAPTION_SUFFIX, CAPTION_SUFFIX.upper()):
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            try:
                return decode_text(sidecar.read_bytes()).strip()
            except OSError as e:
                raise _Skip(f"its caption {sidecar.name} cannot be read ({e.strerror or e})") from None
    text = _LEADING_NUMBERS.sub("", path.stem)
    if regex is not None:
        text = join.join(filename_matches(regex, text))
    return text


# -- images ----------------------------------------------------------------------------------------------


def _open_limited(path: Path) -> Image.Image:
    """Open lazily and refuse (or, for JPEG, draft-decode smaller) anything above MAX_PIXELS.

    The file's own (width, height) is kept in `info["full_size"]` (a draft decode makes `size` smaller)."""
    try:
        with warnings.catch_warnings():  # our own limit below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise _Skip("not an image") from None
    except Image.DecompressionBombError as e:
        raise _Skip(f"refused as a decompression bomb ({e})") from None
    w, h = img.size
    img.info["full_size"] = (w, h)
    if w * h > MAX_PIXELS and img.format == "JPEG":
        # draft() decodes at 1/2, 1/4 or 1/8 scale, the smallest that stays at least the requested size; asking
        # for half the target side makes the result land below the limit (each side < 2x the request).
        half = math.sqrt(MAX_PIXELS / (w * h)) / 2
        img.draft("RGB", (max(1, int(w * half)), max(1, int(h * half))))
    if img.size[0] * img.size[1] > MAX_PIXELS:
        img.close()
        side = math.isqrt(MAX_PIXELS)
        raise _Skip(f"{w}x{h} is over the {side}x{side} pixel limit; downscale it first")
    return img


def _to_rgb_and_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """RGB pixels and the alpha channel (None when the image has none); 16-bit greyscale is scaled to 8 bits."""
    if img.mode in ("P", "RGB", "L") and "transparency" in img.info:
        img = img.convert("RGBA")  # palette / single-colour transparency -> a real alpha channel
    alpha = img.getchannel("A") if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") else None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB"), alpha


def _target_size(size: tuple[int, int], train_size: tuple[int, int] | None) -> tuple[int, int]:
    if train_size is not None:
        return train_size
    w, h = size[0] // 8 * 8, size[1] // 8 * 8
    if min(w, h) < MIN_KEEP_SIZE:
        raise _Skip(f"{size[0]}x{size[1]} is too small to train at its own size (keep_size needs {MIN_KEEP_SIZE} px)")
    return w, h


def load_image(path: Path, train_size: tuple[int, int] | None, keep_alpha: bool) -> tuple[Image.Image, Image.Image | None]:
    """Decode one image: EXIF orientation, RGB + optional alpha, resized to `train_size` (None = keep size)."""
    rgb, alpha, _ = _load_image(path, train_size, keep_alpha)
    return rgb, alpha


def _load_image(path: Path, train_size: tuple[int, int] | None,
                keep_alpha: bool) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
    """`load_image`, plus the image's (width, height) upright, before any resizing (SDXL's original size)."""
    try:
        img = _open_limited(path)
        with img:
            full = img.info.get("full_size", img.size)
            before = img.size
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.size != before:  # an EXIF rotation by 90 degrees swaps the sides
                full = (full[1], full[0])
            rgb, alpha = _to_rgb_and_alpha(img)
    except _DECODE_ERRORS as e:
        raise _Skip(f"cannot be decoded ({e})") from None
    size = _target_size(rgb.size, train_size)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)  # stretches, like A1111: no crop
        alpha = alpha.resize(size, Image.Resampling.BICUBIC) if alpha is not None else None
    return rgb, (alpha if keep_alpha else None), full


def _candidates(folder: Path) -> tuple[list[Path], list[str]]:
    """Files worth trying, and skip reasons for the rest. `.txt` sidecars of other files are captions."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name.lower())
    stems = {p.with_suffix("") for p in entries if p.is_file() and p.suffix.lower() != CAPTION_SUFFIX}
    files, skipped = [], []
    for p in entries:
        if p.is_dir():
            skipped.append(f"{p.name}: a folder (subfolders are not read)")
        elif p.suffix.lower() == CAPTION_SUFFIX and p.with_suffix("") in stems:
            continue  # a caption sidecar
        elif p.is_file():
            files.append(p)
    return files, skipped


def load_dataset(
    folder: str | Path,
    train_size: tuple[int, int] | None,
    filename_regex: str = "",
    filename_join: str = " ",
    keep_alpha: bool = False,
) -> Dataset:
    """Read every usable image of `folder` (non-recursive). `train_size=None` keeps each image's own size.

    Raises `DatasetError` when the folder is missing or has no usable image (listing what was skipped).
    """
    folder = Path(folder).expanduser()
    images, skipped = [], []
    for item in read_dataset(folder, train_size, filename_regex, filename_join, keep_alpha):
        (images if isinstance(item, DatasetImage) else skipped).append(item)
    if not images:
        listing = "; ".join(skipped) if skipped else "the folder is empty"
        raise DatasetError(f"dataset_dir {str(folder)!r} has no usable image ({listing}). Add png/jpg/webp images.")
    for line in skipped:
        log.info("dataset: skipped %s", line)
    return Dataset(folder, tuple(images), tuple(skipped))


def read_dataset(
    folder: str | Path,
    train_size: tuple[int, int] | None,
    filename_regex: str = "",
    filename_join: str = " ",
    keep_alpha: bool = False,
) -> Iterator[DatasetImage | str]:
    """`load_dataset` one file at a time, in its order: each usable image, or a skipped file's "name: reason".

    The listing is checked first (a missing folder is a `DatasetError`, a bad regex a `ConfigError`); each
    image is decoded only when it is asked for, so a caller can stop early and hold one image at a time (the
    Train panel's dataset preview reads the folder exactly as training will, within a time limit).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"dataset_dir {str(folder)!r} is not a folder: give the folder of training images.")
    regex = compile_filename_regex(filename_regex)
    files, skipped = _candidates(folder)
    return _read(files, skipped, train_size, regex, filename_join, keep_alpha)


def _read(files: list[Path], skipped: list[str], train_size: tuple[int, int] | None,
          regex: bounded_re.Pattern | None, join: str, keep_alpha: bool) -> Iterator[DatasetImage | str]:
    yield from skipped
    for path in files:
        try:
            rgb, alpha, full = _load_image(path, train_size, keep_alpha)
            yield DatasetImage(path, caption_for(path, regex, join), rgb, alpha, full)
        except _Skip as e:
            yield f"{path.name}: {e}"


# -- latent cache -------------------------------------------------------------------------------------------


def pixels_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3]
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def alpha_weight(alpha: Image.Image | None, latent_size: tuple[int, int]) -> torch.Tensor:
    """Loss weight [1, h, w] from an alpha channel: resized to (w, h), shifted to min 0, scaled to mean 1.

    No alpha, or a constant alpha, gives all ones.
    """
    w, h = latent_size
    if alpha is None:
        return torch.ones(1, h, w)
    small = alpha.resize((w, h), Image.Resampling.BOX)  # (width, height): A1111 swapped them
    weight = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]
    weight = weight - weight.min()
    mean = float(weight.mean())
    return weight / mean if mean > 0 else torch.ones(1, h, w)


@dataclass
class LatentCache:
    """VAE latents of every image, encoded once; index 1 of each entry is the mirrored image (when flipping).

    `mean[i]` is [F, 4, h, w] (F = 2 with flips, else 1); `std[i]` is kept only for `random` sampling, where a
    fresh sample `mean + std * noise` is drawn each time the image is used. `weight[i]` is [F, 1, h, w].
    A lazy cache (`pending` set) encodes each image's group on the first batch that uses it; `fill()` the rest.
    `time_ids` [N, 6] is each image's SDXL size conditioning (see `size_conditioning`).
    """

    mean: list[torch.Tensor | None]
    std: list[torch.Tensor | None] | None = None
    weight: list[torch.Tensor] | None = None
    flips: bool = False
    pending: "_GroupEncoder | None" = field(default=None, repr=False)
    time_ids: torch.Tensor | None = None

    def time_ids_for(self, indices: Sequence[int]) -> torch.Tensor:
        """SDXL's `time_ids` [B, 6] for one micro-batch (a mirrored image has the same: nothing is cropped)."""
        return self.time_ids[list(indices)]

    def batch(self, indices: Sequence[int], flipped: Sequence[bool], generator: torch.Generator | None = None):
        """Latents [B, 4, h, w] (float32) and weights [B, 1, h, w] (or None) for one micro-batch."""
        if self.pending is not None:
            self.fill(indices)
        sel = [(i, int(f and self.flips)) for i, f in zip(indices, flipped)]
        latents = torch.stack([self.mean[i][f] for i, f in sel])
        if self.std is not None:
            std = torch.stack([self.std[i][f] for i, f in sel])
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            latents = latents + std * noise
        weights = torch.stack([self.weight[i][f] for i, f in sel]) if self.weight is not None else None
        return latents, weights

    def fill(self, indices: Sequence[int] | None = None) -> None:
        """Encode the groups of `indices` (None: every image) that are not encoded yet."""
        if self.pending is not None:
            self.pending.encode(self, range(len(self.mean)) if indices is None else indices)
            if all(m is not None for m in self.mean):
                self.pending = None  # drops the VAE reference


# Images per VAE call, for 512 x 512 images (smaller ones pack more, larger fewer): batching the encode makes
# the latent cache several times faster than one image per call, while the activations of one call stay small
# (the encoder's widest layer is 128 channels at full resolution: ~0.5 GiB per 512 px image in fp32).
ENCODE_BATCH_PIXELS = 8 * 512 * 512
ENCODE_BATCH_IMAGES = 8  # and at most this many images, so a lazy cache's first step encodes few of them
# On the CPU a batch costs the same per image as single encodes (compute-bound): one image per call there, so a
# lazy cache encodes just the images each step uses (what diffusers' script does every step).
ENCODE_BATCH_IMAGES_CPU = 1


def _encode_batch(vae, imgs: Sequence[Image.Image], flips: bool, device, dtype):
    """Posterior mean and std [N, F, 4, h, w] (float32, scaled) of same-size images and, with flips, mirrors."""
    x = torch.stack([pixels_to_tensor(img) for img in imgs])  # [N, 3, H, W]
    if flips:
        x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # image, mirror, image, mirror, ...
    dist = vae.encode(x.to(device, dtype)).latent_dist
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    mean, std = (dist.mean.float() - shift) * scale, dist.std.float() * scale
    per_image = 2 if flips else 1
    return mean.unflatten(0, (len(imgs), per_image)), std.unflatten(0, (len(imgs), per_image))


def _encode_groups(dataset: Dataset, flips: bool, device: torch.device) -> list[list[int]]:
    """Image indices in VAE calls: same-size images together, at most ENCODE_BATCH_PIXELS per call.

    The groups depend on the dataset only, never on the order images are first used, so a lazy cache holds
    exactly the latents an eager one does (a resumed run sees the same values bit for bit).
    """
    groups = []
    most = ENCODE_BATCH_IMAGES_CPU if device.type == "cpu" else ENCODE_BATCH_IMAGES
    for (w, h), members in dataset.buckets.items():
        per_call = max(1, min(most, ENCODE_BATCH_PIXELS // (w * h * (2 if flips else 1))))
        groups += [members[start : start + per_call] for start in range(0, len(members), per_call)]
    return groups


@dataclass
class _GroupEncoder:
    """What a lazy `LatentCache` needs to encode a group later: the VAE, the images, the fixed noise."""

    vae: Any
    dataset: Dataset
    flips: bool
    sampling: LatentSampling
    noise: list[torch.Tensor] | None  # `once` sampling: each image's posterior draw, made up front in order
    groups: list[list[int]]
    group_of: dict[int, int]

    def encode(self, cache: LatentCache, indices) -> None:
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        for g in dict.fromkeys(self.group_of[i] for i in indices if cache.mean[i] is None):
            group = self.groups[g]
            with torch.no_grad():
                mean, std = _encode_batch(self.vae, [self.dataset.images[i].image for i in group], self.flips,
                                          device, dtype)
            for k, i in enumerate(group):
                m = mean[k]
                if self.sampling == LatentSampling.ONCE:  # one posterior sample per image, fixed for the run
                    m = m + std[k] * self.noise[i]
                cache.mean[i] = m
                if cache.std is not None:
                    cache.std[i] = std[k]


def size_conditioning(item: DatasetImage) -> tuple[int, int, int, int, int, int]:
    """SDXL's micro-conditioning for one training image, as kohya's sd-scripts computes it: the original size
    (height, width) before resizing, the crop's top-left (top, left), the target size (height, width) of its
    bucket. Images here are resized whole (stretched, never cropped), so the crop is (0, 0), also mirrored."""
    width, height = item.original_size or item.size
    return height, width, 0, 0, item.size[1], item.size[0]


@torch.no_grad()
def build_latent_cache(
    vae, dataset: Dataset, sampling: LatentSampling, flips: bool, use_alpha: bool,
    generator: torch.Generator | None = None, lazy: bool = False,
) -> LatentCache:
    """Encode every image (and its mirror with `flips`) once; see `LatentSampling` for the three methods.

    Same-size images share VAE calls; the encoder treats each image of a batch on its own (group norm is
    per sample), so the latents equal a one-image-per-call encode up to float rounding. `lazy`: encode each
    group when a batch first uses it, so training starts after one group instead of the whole folder (the
    seeded `once` draws are still made here, in dataset order: the values do not depend on `lazy`).
    """
    device = next(vae.parameters()).device
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = int(getattr(vae.config, "latent_channels", 4))
    per_image = 2 if flips else 1
    noise = None
    if sampling == LatentSampling.ONCE:
        noise = [torch.randn((per_image, channels, item.size[1] // factor, item.size[0] // factor),
                             generator=generator, device=device) for item in dataset.images]
    weights = []
    if use_alpha:
        for item in dataset.images:
            w = alpha_weight(item.alpha, (item.size[0] // factor, item.size[1] // factor)).to(device)
            weights.append(torch.stack([w, w.flip(-1)]) if flips else w[None])
    groups = _encode_groups(dataset, flips, device)
    n = len(dataset.images)
    cache = LatentCache([None] * n, [None] * n if sampling == LatentSampling.RANDOM else None,
                        weights if use_alpha else None, flips,
                        time_ids=torch.tensor([size_conditioning(item) for item in dataset.images],
                                              dtype=torch.float32, device=device))
    cache.pending = _GroupEncoder(vae, dataset, flips, sampling, noise, groups,
                                  {i: g for g, members in enumerate(groups) for i in members})
    if not lazy:
        cache.fill()
    return cache


# -- batches -------------------------------------------------------------------------------------------------


class BucketBatchSampler:
    """Endless stream of micro-batches of image indices, each batch from one size bucket (A1111's
    `GroupedBatchSampler` in `modules/textual_inversion/dataset.py`).

    Per epoch (`N // batch_size` batches): each bucket gives its full batches from its shuffled members; the
    remaining batches come from buckets drawn in proportion to their leftovers, members drawn with replacement
    (A1111's scheme); then all batches are shuffled. The batch size is capped at the number of images.
    """

    def __init__(self, buckets: dict[tuple[int, int], list[int]], batch_size: int, rng: random.Random) -> None:
        self.groups = [list(g) for g in buckets.values()]
        self.num_images = sum(len(g) for g in self.groups)
        self.batch_size = max(1, min(batch_size, self.num_images))
        self.batches_per_epoch = self.num_images // self.batch_size
        self.rng = rng

    def epoch(self) -> list[list[int]]:
        """One epoch of batches."""
        b, batches = self.batch_size, []
        for g in self.groups:
            self.rng.shuffle(g)
            batches += [g[i * b : (i + 1) * b] for i in range(len(g) // b)]
        leftovers = [len(g) % b for g in self.groups]
        for _ in range(self.batches_per_epoch - len(batches)):
            group = self.rng.choices(self.groups, weights=leftovers)[0]
            batches.append(self.rng.choices(group, k=b))
        self.rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield from self.epoch()
