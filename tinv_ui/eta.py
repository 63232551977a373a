"""How long a training run still needs: its training steps, previews and saves, each timed as it happens.

The trainer counts, up front, the steps, previews and saves still to come (`RunTimes.for_run`), marks the end of
each one (`lap`), and asks `eta()` for the seconds left: each kind's count times its expected duration. A
preview can cost as much as dozens of steps, so an ETA from steps alone ("0:06" while a minute is left) is
not an estimate of the run at all.

Expected durations:
- a step: the mean of the recent steps (a window, so the slow first epoch of a lazily encoded latent cache
  fades out); the very first step is left out once there are others (CUDA warm-up, torch.compile);
- a preview: the mean of the previews rendered so far; before the first one, `preview_steps` sampling steps of
  half a micro-batch's time each (`SAMPLING_STEP_PER_MICRO_BATCH`);
- a save: the mean of the saves so far; before the first one, one training step (a few KB written).

Timing is wall time between marks: every second of the run is counted in exactly one kind, also the time the
consumer of the events takes. No device value is read (no host sync): the marks are `time.perf_counter()`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

STEP, PREVIEW, SAVE = "step", "preview", "save"
RECENT_STEPS = 32  # the window of step durations the step estimate averages
# A sampling step with CFG (the UNet forward on 2 latents) over a training micro-batch (forward and backward),
# as measured for SD 1.5 at 512 px on an H100: 57 ms per sampling step (20 steps in 1.14 s), 109 ms per training
# step at batch 1. Only the first preview's estimate uses it; later ones use the measured previews.
SAMPLING_STEP_PER_MICRO_BATCH = 0.5


class RunTimes:
    """Durations of a run's steps, previews and saves, and what is still to come of each."""

    def __init__(self, steps: int, previews: int, saves: int, preview_steps: int, micro_batches: int = 1,
                 clock: Callable[[], float] | None = None) -> None:
        self.left = {STEP: steps, PREVIEW: previews, SAVE: saves}
        self.preview_steps = preview_steps
        self.micro_batches = micro_batches  # per optimizer step (gradient accumulation)
        self._clock = clock or time.perf_counter
        self._mark = self._clock()
        self._first_step: float | None = None
        self._steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self._done: dict[str, list[float]] = {PREVIEW: [], SAVE: []}

    @classmethod
    def for_run(cls, first_step: int, total: int, preview_every: int, save_every: int, preview_steps: int,
                micro_batches: int = 1, main: bool = True, clock: Callable[[], float] | None = None) -> RunTimes:
        """The counts of a run that takes steps `first_step + 1 .. total`: a preview and a copy at every multiple
        of `preview_every` / `save_every` (0: never), and the final file. Other processes than the main one of a
        data-parallel run write nothing."""
        steps = range(first_step + 1, total + 1)
        previews = sum(1 for s in steps if preview_every and s % preview_every == 0) if main else 0
        saves = sum(1 for s in steps if save_every and s % save_every == 0) + 1 if main else 0
        return cls(len(steps), previews, saves, preview_steps, micro_batches, clock)

    def restart(self) -> None:
        """Start timing now (the time before, e.g. preparing the run, belongs to no kind)."""
        self._mark = self._clock()

    def lap(self, kind: str) -> float:
        """One `kind` (STEP, PREVIEW, SAVE) just ended: record the time since the last mark; returns it."""
        now = self._clock()
        seconds, self._mark = now - self._mark, now
        if kind == STEP:
            if self._first_step is None:
                self._first_step = seconds
            else:
                self._steps.append(seconds)
        else:
            self._done[kind].append(seconds)
        self.left[kind] = max(0, self.left[kind] - 1)
        return seconds

    def expected(self, kind: str) -> float | None:
        """Expected seconds of one `kind`; None before the first step is timed."""
        if kind == STEP:
            recent = self._steps or ([self._first_step] if self._first_step is not None else [])
            return sum(recent) / len(recent) if recent else None
        if self._done[kind]:
            return sum(self._done[kind]) / len(self._done[kind])
        step = self.expected(STEP)
        if step is None:
            return None
        if kind == PREVIEW:
            return self.preview_steps * step / self.micro_batches * SAMPLING_STEP_PER_MICRO_BATCH
        return step

    def eta(self) -> float | None:
        """Seconds until the run ends: steps, previews and saves still to come; None before a step is timed."""
        total = 0.0
        for kind, count in self.left.items():
            if count:
                each = self.expected(kind)
                if each is None:
                    return None
                total += count * each
        return total
