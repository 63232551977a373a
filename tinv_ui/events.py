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
    prompt: str = ""  # training: the prompt of the step's first image (A1111's "Last prompt")


# The phases of a training run, in the order a run goes through them (previews and saves recur).
LOADING_IMAGES = "loading images"
ENCODING_LATENTS = "encoding latents"
TRAINING = "training"
RENDERING_PREVIEW = "rendering preview"
SAVING = "saving"
PHASES = (LOADING_IMAGES, ENCODING_LATENTS, TRAINING, RENDERING_PREVIEW, SAVING)


@dataclass(frozen=True)
class Phase:
    """A training run enters a phase. Sent BEFORE the phase's work, so a consumer shows it while it happens.

    Training itself is entered by `Started` and continues with each `Step`, `Preview` and non-final `Saved`.
    `eta`: seconds left at this moment, counting this phase's work, which is expected to take `expected`
    seconds (None: not known yet).
    """

    name: str  # one of PHASES
    text: str  # what to show, e.g. "rendering preview at step 40"
    step: int | None = None
    eta: float | None = None
    expected: float | None = None


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


Event = Phase | Started | Step | Preview | Saved | Finished | Generated | Compared


def format_duration(seconds: float | None) -> str:
    """A `Step`'s elapsed time or ETA as a clock: 1234.5 -> '20:34', 4000 -> '1:06:40'; None -> '?'."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
