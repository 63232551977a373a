"""What the Train form shows for an embedding, and what Start would do with it.

`remembered_settings`: the settings of the embedding's running (or last) job in this app, else those of its
newest run on disk (the `settings-*.json` every start writes, `runs.py`), so they survive a closed tab and a
restart. A file's values are untrusted: each one is checked against `TrainConfig` on its own and a value that
fails is left out with the reason, never shown.

`start_outlook`: one sentence near Start, from the step the run would start at (`train_setup.starting_point`,
the same function pre-flight uses) and the form's max steps: continue, start from step 0, refused, or busy.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .config import TrainConfig, field_spec
from .errors import ConfigError
from .jobs import JobSnapshot, JobStatus
from .runs import latest_run

MAX_TEXT = 4096  # a text setting longer than this is not one the form wrote
NOT_REMEMBERED = ("embedding",)  # the form's own choice: the settings are looked up for it


@dataclass(frozen=True)
class Remembered:
    """Form values by field name (as widgets show them: enums by value), where they came from, and what was
    left out (``"max_steps (max_steps is 0; it must be at least 1.)"``)."""

    values: dict[str, Any]
    source: str  # "" when nothing was found
    skipped: tuple[str, ...] = ()


def remembered_settings(name: str, job_cfg: TrainConfig | None, job_running: bool, log_root: Path) -> Remembered:
    """The settings to show for embedding `name`: `job_cfg` (this app's running or last job) when it trains
    `name`, else the newest run of `name` under `log_root` that recorded its settings, else none."""
    if job_cfg is not None and job_cfg.embedding.lower() == name.strip().lower():
        values = {k: _shown(v) for k, v in asdict(job_cfg).items() if k not in NOT_REMEMBERED}
        return Remembered(values, "the run in progress" if job_running else "the last run")
    run = latest_run(log_root, name)
    if run is None:
        return Remembered({}, "")
    values, skipped = checked_values(run.config)
    return Remembered(values, f"the run of {run.started:%Y-%m-%d %H:%M}", skipped)


def checked_values(config: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The fields of a saved `TrainConfig` dict that pass `TrainConfig`'s own checks, one by one; unknown keys
    are ignored, wrong ones reported as "field (reason)"."""
    values: dict[str, Any] = {}
    skipped: list[str] = []
    for f in fields(TrainConfig):
        if f.name in NOT_REMEMBERED or f.name not in config:
            continue
        value = config[f.name]
        problem = _type_problem(f.name, value)
        if not problem:
            try:  # placeholders for the two fields that may not be empty; the field itself is the one checked
                checked = TrainConfig(**{"embedding": "x", "dataset_dir": "x", f.name: value})
                values[f.name] = _shown(getattr(checked, f.name))
                continue
            except ConfigError as e:
                problem = str(e)
        skipped.append(f"{f.name} ({problem})")
    return values, tuple(skipped)


def _type_problem(name: str, value: Any) -> str:
    kind = field_spec(TrainConfig, name).kind
    if kind == "bool":
        return "" if isinstance(value, bool) else "not true/false"
    if kind in ("int", "float"):
        number = isinstance(value, int) or (kind == "float" and isinstance(value, float))
        if isinstance(value, bool) or not number or not math.isfinite(value):
            return f"not a {'whole ' if kind == 'int' else ''}number"
        return ""
    if not isinstance(value, str):
        return "not text"
    return "" if len(value) <= MAX_TEXT else f"longer than {MAX_TEXT} characters"


def _shown(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def start_outlook(name: str, max_steps: Any, start_step: int | None, job: JobSnapshot | None,
                  problem: str = "") -> str:
    """One sentence: what Start does now for embedding `name` with the form's `max_steps`.

    `start_step` is the step a run would start at (`train_setup.starting_point`), None with `problem` when the
    embedding cannot be trained (not found, does not fit the model); `job` is the app's current job.
    """
    if job is not None and job.status == JobStatus.RUNNING:
        what = "this embedding" if job.name.lower() == name.strip().lower() else job.name
        return (f"A run of {what} is in progress (step {job.step}/{job.total}): Start is refused until it ends; "
                "Interrupt stops it and saves.")
    if not name.strip():
        return "Pick an embedding to train (create one in the first tab)."
    if start_step is None:
        return f"Start would be refused: {problem}"
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, float)) or not math.isfinite(max_steps):
        return "Set Max steps to see what Start will do."
    max_steps = int(max_steps)
    if start_step >= max_steps:
        return (f"{name} is already at step {start_step}: Start would be refused. Raise Max steps above {start_step} "
                "to continue it, or create it again (Create tab, overwrite) to start over.")
    if start_step == 0:
        return f"Start begins a new run of {name}: steps 0 → {max_steps}."
    return (f"Start continues {name} from step {start_step} to {max_steps} (Max steps counts the steps of every "
            "run of this embedding).")
