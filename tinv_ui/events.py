"""Typed events yielded by long-running work (training, generation).

A small closed set of frozen dataclasses. The UI renders them with one `match`, the CLI prints them
with another, and tests assert on their order. Failures are exceptions, never events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Started:
    """A run passed its pre-flight checks and is about to take its first step."""

    name: str
    initial_step: int
    total_steps: int
    num_images: int
    log_dir: Path | None
    message: str = ""


@dataclass(frozen=True)
class Step:
    """One optimizer step (training) or one denoising step (generation) is done."""

    step: int
    total: int
    elapsed: float
    eta: float | None
    loss: float | None = None
    lr: float | None = None


@dataclass(frozen=True)
class Preview:
    """Preview images at a training step, saved under the run's `images/` folder."""

    step: int
    images: tuple[Any, ...]
    prompt: str
    paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Saved:
    """An embedding file was written (a periodic copy, or the final file when `final`)."""

    step: int
    path: Path
    final: bool = False


@dataclass(frozen=True)
class Finished:
    """A training run ended (completed or interrupted); `path` is the embedding that holds its result."""

    step: int
    path: Path | None
    interrupted: bool
    message: str


@dataclass(frozen=True)
class Generated:
    """Images from one generation request, with their infotexts, seeds and saved paths."""

    images: tuple[Any, ...]
    infotexts: tuple[str, ...]
    seeds: tuple[int, ...]
    paths: tuple[Path, ...] = field(default=())


@dataclass(frozen=True)
class Compared:
    """A step comparison's grid: one labelled cell per rendered copy, saved with its infotext.

    `interrupted` runs keep the cells rendered before the stop (`steps` lists those); with no cell, `grid` and
    `path` are None."""

    steps: tuple[int, ...]
    seed: int
    grid: Any | None
    infotext: str
    path: Path | None = None
    interrupted: bool = False


Event = Started | Step | Preview | Saved | Finished | Generated | Compared


def format_duration(seconds: float | None) -> str:
    """A `Step`'s elapsed time or ETA as a clock: 1234.5 -> '20:34', 4000 -> '1:06:40'; None -> '?'."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
