"""Learning-rate (and clip-value) schedules in AUTOMATIC1111's syntax: `0.005:100, 1e-3:1000, 1e-5`.

Meaning, as in A1111's `modules/textual_inversion/learn_schedule.py`:
- a comma-separated list of `rate:step` pairs; "use `rate` until the optimizer step count reaches `step`";
- a bare `rate`, or `step == -1`, means "until max_steps" and ends the list (later entries are ignored);
- pairs whose step is at or below the current (resumed) step are skipped;
- a step above max_steps is clamped to max_steps and ends the list;
- empty entries (a trailing comma) are ignored; `step` must be an integer, so `1e3` is refused.

One deliberate difference: in A1111 a schedule whose last pair ends before max_steps (`0.005:100`) silently
ENDS TRAINING at that step. Here the last rate simply continues until max_steps; training always runs to
max_steps (or until you stop it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

EXAMPLE = "0.005:100, 1e-3:1000, 1e-5"


@dataclass(frozen=True)
class Schedule:
    """Parsed schedule: `pairs` are A1111's `(rate, until_step)` list; `rate_at(step)` gives the rate to use."""

    pairs: tuple[tuple[float, int], ...]
    max_steps: int
    text: str = ""

    def rate_at(self, step: int) -> float:
        """The rate for the optimizer update that follows `step` completed steps.

        The first pair whose end step is above `step` wins; past the last end step the last rate continues
        (A1111 would stop training there instead).
        """
        for rate, until in self.pairs:
            if step < until:
                return rate
        return self.pairs[-1][0]

    def describe(self) -> str:
        """Human-readable form, e.g. '0.005 until step 100, then 0.001 until step 3000'."""
        return ", then ".join(f"{rate:g} until step {until}" for rate, until in self.pairs)


def _fail(field_name: str, text: str, reason: str) -> ConfigError:
    return ConfigError(
        f"{field_name} {text!r} is not a valid schedule ({reason}). Use a number such as 0.005, or rate:step "
        f"pairs such as '{EXAMPLE}' (each rate is used until that step; a bare rate or step -1 means until max_steps)."
    )


def _parse_rate(raw: str, field_name: str, text: str) -> float:
    try:
        rate = float(raw)
    except ValueError:
        raise _fail(field_name, text, f"{raw.strip()!r} is not a number") from None
    if not math.isfinite(rate) or rate < 0:
        raise _fail(field_name, text, f"{raw.strip()!r} must be a finite number >= 0")
    return rate


def _parse_step(raw: str, field_name: str, text: str) -> int:
    try:
        step = int(raw)  # like A1111: '1e3' or '100.0' is not an integer step
    except ValueError:
        raise _fail(field_name, text, f"step {raw.strip()!r} is not a whole number") from None
    if step < -1 or step == 0:
        raise _fail(field_name, text, f"step {step} must be positive, or -1 for 'until max_steps'")
    return step


def parse_schedule(text: str, max_steps: int, initial_step: int = 0, field_name: str = "learn_rate") -> Schedule:
    """Parse `text` for a run that starts at `initial_step` and ends at `max_steps`.

    Raises `ConfigError` naming `field_name` (learn_rate or clip_grad_value) with an example.
    """
    pairs: list[tuple[float, int]] = []
    last_rate: float | None = None
    for entry in str(text).split(","):
        if not entry.strip():
            continue
        parts = entry.split(":")
        if len(parts) > 2:
            raise _fail(field_name, text, f"{entry.strip()!r} has more than one ':'")
        rate = _parse_rate(parts[0], field_name, text)
        last_rate = rate
        if len(parts) == 1:  # a bare rate: until max_steps, and the list ends here
            pairs.append((rate, max_steps))
            break
        step = _parse_step(parts[1], field_name, text)
        if step == -1:
            pairs.append((rate, max_steps))
            break
        if step > initial_step:
            pairs.append((rate, min(step, max_steps)))
            if step > max_steps:
                break
    if last_rate is None:
        raise _fail(field_name, text, "it is empty")
    if not pairs:  # resumed past every pair: the last rate continues (A1111 raised here)
        pairs.append((last_rate, max_steps))
    return Schedule(tuple(pairs), max_steps, str(text))
