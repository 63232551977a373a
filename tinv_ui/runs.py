"""Earlier training runs, read back from their folders: what the Train panel's run history lists and opens.

A run writes `<log root>/<date>/<name>[_runK]/` (train_setup `_output_dir`) holding `embeddings/<name>-<N>.*`
copies (with `.optim` beside them), `images/<name>-<N>.png` previews, `textual_inversion_loss.csv` and one
`settings-<stamp>.json` per start (a resumed run adds one). Everything here only reads, and reads defensively:
the folders may hold files of other tools or of a run killed mid-write, so a file that does not parse is
left out, never raised, and every read is bounded in size.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import EMBEDDING_SUFFIXES, IMAGE_EMBEDDING_SUFFIXES

log = logging.getLogger(__name__)

LOSS_CSV = "textual_inversion_loss.csv"
MAX_SETTINGS_BYTES = 1 << 20  # a settings JSON we write is a few KB
MAX_CSV_BYTES = 64 << 20  # ~1.5 M rows; more is not a loss log of ours
MAX_RUNS = 500  # newest run folders listed
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_RUN_SUFFIX = re.compile(r"_run\d+$", re.IGNORECASE)
_COPY_SUFFIXES = tuple(s for s in EMBEDDING_SUFFIXES if s not in IMAGE_EMBEDDING_SUFFIXES)


@dataclass(frozen=True)
class RunRecord:
    """One run folder as found on disk.

    `copies` and `previews` map a step to its file (the `<name>-<N>` naming); `settings` is the newest
    settings JSON's content (A1111's keys, ours under "tinv_ui"), `{}` when none could be read.
    """

    folder: Path
    name: str
    started: _dt.datetime
    copies: dict[int, Path] = field(default_factory=dict)
    previews: dict[int, Path] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    settings_path: Path | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The `TrainConfig` fields the run was started with (tinv-ui runs only; `{}` for others)."""
        config = self.settings.get("tinv_ui", {}).get("config") if isinstance(self.settings.get("tinv_ui"), dict) else None
        return dict(config) if isinstance(config, dict) else {}

    @property
    def max_steps(self) -> int | None:
        steps = self.settings.get("steps")
        return steps if isinstance(steps, int) and not isinstance(steps, bool) else None

    @property
    def loss_csv(self) -> Path:
        return self.folder / LOSS_CSV

    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) rows of the run's loss CSV, in file order; rows that do not parse are skipped."""
        return read_losses(self.loss_csv)

    def last_step(self, losses: list[tuple[int, float]] | None = None) -> int:
        """The newest step the run reached on disk: its last loss row, copy or preview (0 when none).
        `losses`: the rows already read with `losses()` (a loss CSV may be long; it is read once)."""
        rows = self.losses() if losses is None else losses
        steps = [rows[-1][0]] if rows else []
        return max(steps + list(self.copies) + list(self.previews), default=0)

    def final_loss(self, losses: list[tuple[int, float]] | None = None) -> float | None:
        rows = self.losses() if losses is None else losses
        return rows[-1][1] if rows else None


def log_root(outputs_dir: Path) -> Path:
    """Where runs go when the form's log folder is empty (train_setup `_log_root`)."""
    return outputs_dir / "train"


def list_runs(root: Path, name: str | None = None, limit: int = MAX_RUNS) -> list[RunRecord]:
    """Runs under `root` (`<root>/<YYYY-MM-DD>/<folder>`), newest first; only those of embedding `name` when given.

    A folder counts as a run when it holds a settings JSON, a loss CSV, copies or previews.
    """
    folders: list[Path] = []
    try:
        days = sorted((d for d in root.iterdir() if _DAY.fullmatch(d.name) and d.is_dir()), reverse=True)
    except OSError:
        return []
    for day in days:
        try:
            folders += [f for f in day.iterdir() if f.is_dir() and not f.is_symlink()]
        except OSError:
            continue
    runs = []
    for folder in folders:
        run = read_run(folder)
        if run is not None and (name is None or run.name.lower() == name.lower()):
            runs.append(run)
    runs.sort(key=lambda r: (r.started, str(r.folder)), reverse=True)
    return runs[:limit]


def latest_run(root: Path, name: str) -> RunRecord | None:
    """The run of embedding `name` whose settings file is newest (a resumed run adds a newer one to an older
    folder), among those that recorded their settings; None when there is none."""
    recorded = [run for run in list_runs(root, name) if run.config and run.settings_path is not None]
    return max(recorded, key=lambda run: run.settings_path.name, default=None)


def run_key(run: RunRecord) -> str:
    """How the page names a run: its folder relative to the log root (`<date>/<folder>`)."""
    return f"{run.folder.parent.name}/{run.folder.name}"


def find_run(root: Path, key: str) -> RunRecord | None:
    """The listed run (`list_runs(root)`) whose `run_key` is `key`, or None: a key that came from a web page
    is only ever matched against the listing, never opened as a path."""
    return next((run for run in list_runs(root) if run_key(run) == key), None) if isinstance(key, str) else None


def read_run(folder: Path) -> RunRecord | None:
    """The run in `folder`, or None when it holds nothing a run writes."""
    settings_files = _settings_files(folder)
    settings, settings_path = {}, None
    for path in reversed(settings_files):  # the newest readable one
        settings = _read_settings(path)
        if settings:
            settings_path = path
            break
    name = settings.get("embedding_name") if isinstance(settings.get("embedding_name"), str) else None
    name = name or _RUN_SUFFIX.sub("", folder.name)
    copies = _steps_of(folder / "embeddings", name, _COPY_SUFFIXES)
    previews = _steps_of(folder / "images", name, (".png",))
    if not (settings_files or copies or previews or (folder / LOSS_CSV).is_file()):
        return None
    return RunRecord(folder, name, _started(settings, settings_files, folder), copies, previews, settings, settings_path)


def read_losses(path: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of a loss CSV (A1111's columns: step,epoch,epoch_step,loss,learn_rate)."""
    try:
        if path.stat().st_size > MAX_CSV_BYTES:
            log.warning("%s is over %d MB; not read", path, MAX_CSV_BYTES >> 20)
            return []
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines()[1:]:
        parts = line.split(",")
        try:
            step, loss = int(parts[0]), float(parts[3])
        except (IndexError, ValueError):
            continue
        if step >= 0 and loss == loss and abs(loss) != float("inf"):
            rows.append((step, loss))
    return rows


def _settings_files(folder: Path) -> list[Path]:
    """`settings-*.json` in `folder`, oldest first (their names carry the start time)."""
    try:
        return sorted(p for p in folder.glob("settings-*.json") if p.is_file())
    except OSError:
        return []


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_SETTINGS_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _steps_of(folder: Path, name: str, suffixes: tuple[str, ...]) -> dict[int, Path]:
    """{N: path} for the `<name>-<N><suffix>` files in `folder` (temp files and other names are ignored)."""
    pattern = re.compile(rf"{re.escape(name)}-(\d{{1,9}})", re.IGNORECASE)
    found: dict[int, Path] = {}
    try:
        files = sorted(folder.iterdir())
    except OSError:
        return found
    for path in files:
        match = pattern.fullmatch(path.stem)
        if match and path.suffix.lower() in suffixes and path.is_file():
            found.setdefault(int(match.group(1)), path)
    return dict(sorted(found.items()))


def _started(settings: dict[str, Any], settings_files: list[Path], folder: Path) -> _dt.datetime:
    """When the run started: its first settings file's time stamp, else the settings' "datetime", else the
    folder's modification time."""
    candidates = [p.stem.removeprefix("settings-")[:19] for p in settings_files[:1]]
    for text, fmt in [(c, "%Y-%m-%d-%H-%M-%S") for c in candidates] + [(settings.get("datetime"), "%Y-%m-%d %H:%M:%S")]:
        try:
            return _dt.datetime.strptime(str(text), fmt)
        except ValueError:
            continue
    try:
        return _dt.datetime.fromtimestamp(folder.stat().st_mtime)
    except OSError:
        return _dt.datetime.fromtimestamp(0)
