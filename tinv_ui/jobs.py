"""Training runs that outlive a browser tab: a background thread drains `training.train` into a snapshot.

The UI starts a run with `TrainingRunner.start(cfg)` and polls `runner.current.snapshot()`; closing or
reloading the page does not touch the thread, so the page can re-attach to the running job. `start` runs the
pre-flight checks (`train_setup.preflight`) before it starts the thread: a wrong setting raises there, in the
request that asked for the run, and the last job stays the current one; only a failure during the run itself
ends a job as FAILED. The studio
lock is still taken per optimizer step inside `train`, so Generate requests are served between steps.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Paths, TrainConfig
from .errors import BusyError, TinvError
from .events import TRAINING, Finished, Phase, Preview, Saved, Started, Step
from .train_setup import Plan, preflight
from .training import train

if TYPE_CHECKING:
    from .library import EmbeddingLibrary
    from .studio import Studio

log = logging.getLogger(__name__)

MAX_LOSSES = 10_000  # newest (step, loss) points kept for the loss chart
MAX_PREVIEWS = 64  # newest preview image paths kept


class JobStatus(str, enum.Enum):
    """Where a job stands; the value is also the UI progress bar's colour class (`tinv-<value>`)."""

    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a job's progress, safe to read from any thread."""

    status: JobStatus
    name: str
    step: int
    total: int
    eta: float | None
    losses: list[tuple[int, float]]
    previews: list[Path]
    last_saved: Path | None
    message: str
    log_dir: Path | None
    phase: str = ""  # what the run is doing now, e.g. "rendering preview at step 40" ("" once it ended)
    prompt: str = ""  # the last training prompt (of the last step's first image)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", JobStatus(self.status))


class TrainingJob:
    """One training run on a daemon thread. Use `TrainingRunner.start` to create it."""

    def __init__(self, studio: Studio, cfg: TrainConfig, library: EmbeddingLibrary, paths: Paths, plan: Plan,
                 clock=time.perf_counter) -> None:
        self.cfg = cfg
        self._args = (studio, cfg, library, paths)
        self._plan = plan
        self._clock = clock  # the ETA counts down with it (the trainer's `eta.RunTimes` uses perf_counter too)
        self._eta_from: tuple[float, float, float] | None = None  # (eta, its lowest value, when it was given)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._losses: deque[tuple[int, float]] = deque(maxlen=MAX_LOSSES)
        self._previews: deque[Path] = deque(maxlen=MAX_PREVIEWS)
        self._snap = JobSnapshot(JobStatus.RUNNING, plan.name, plan.initial_step, cfg.max_steps, None, [], [], None,
                                 "Preparing (latents, optimizer)...", None, "starting")
        self._thread = threading.Thread(target=self._run, name=f"tinv-train-{cfg.embedding}", daemon=True)

    def start(self) -> "TrainingJob":
        """Start the thread (once). Returns self."""
        self._thread.start()
        return self

    def _run(self) -> None:
        events = train(*self._args, stop=self._stop, plan=self._plan)
        try:
            for event in events:
                self._apply(event)
        except TinvError as e:
            self._update(status=JobStatus.FAILED, phase="", message=str(e))
        except Exception as e:  # a bug: keep the traceback in the log and show something readable
            log.exception("training %s failed", self.cfg.embedding)
            self._update(status=JobStatus.FAILED, phase="",
                         message=f"Training failed with an unexpected error: {type(e).__name__}: {e}")
        finally:
            events.close()
            if self.snapshot().status == JobStatus.RUNNING:  # ended without Finished or an error: never leave it running
                self._update(status=JobStatus.FAILED, phase="",
                             message="Training ended without finishing; see the log.")

    def _apply(self, event) -> None:
        match event:
            case Phase():
                # While a preview or a save runs the ETA counts down, but not below what is left after it.
                countdown = None
                if event.eta is not None:
                    floor = event.eta - (event.expected or 0.0)
                    countdown = (event.eta, max(0.0, floor), self._clock())
                self._update(phase=event.text, eta=event.eta, countdown=countdown)
            case Started():
                self._update(name=event.name, step=event.initial_step, total=event.total_steps, log_dir=event.log_dir,
                             message=event.message, phase=TRAINING)
            case Step():
                with self._lock:
                    self._losses.append((event.step, float(event.loss)))
                self._update(step=event.step, eta=event.eta, phase=TRAINING, prompt=event.prompt)
            case Preview():
                with self._lock:
                    self._previews.extend(event.paths)
                self._update(phase=TRAINING)
            case Saved():
                self._update(last_saved=event.path, **({} if event.final else {"phase": TRAINING}))
            case Finished():
                status = JobStatus.INTERRUPTED if event.interrupted else JobStatus.FINISHED
                self._update(status=status, step=event.step, eta=0.0, message=event.message,
                             last_saved=event.path or self._snap.last_saved, phase="")

    def _update(self, countdown: tuple[float, float, float] | None = None, **changes) -> None:
        """Change the snapshot; `countdown` (eta, its lowest value, clock time) lets `snapshot` count the ETA
        down until the next update (only a `Phase` gives one)."""
        with self._lock:
            self._snap = replace(self._snap, **changes)
            self._eta_from = countdown

    def snapshot(self) -> JobSnapshot:
        """The job's progress now (copies of the loss and preview lists; the ETA as of now)."""
        with self._lock:
            snap = replace(self._snap, losses=list(self._losses), previews=list(self._previews))
            if self._eta_from is not None and snap.status == JobStatus.RUNNING:
                eta, lowest, given = self._eta_from
                snap = replace(snap, eta=max(lowest, eta - (self._clock() - given)))
            return snap

    @property
    def running(self) -> bool:
        """True until the thread has ended."""
        return self._thread.is_alive() or self._snap.status == JobStatus.RUNNING

    def stop(self) -> None:
        """Ask the run to stop after the current step; it saves the embedding and finishes as "interrupted"."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


@dataclass
class TrainingRunner:
    """Owns the one training slot of an app: at most one run at a time."""

    studio: Studio
    library: EmbeddingLibrary
    paths: Paths
    _current: TrainingJob | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, cfg: TrainConfig) -> TrainingJob:
        """Start training `cfg` on a background thread; `BusyError` if a run is still active.

        The pre-flight checks run here, first: their `TinvError` (a setting to change) reaches the caller and
        leaves `current` as it was.
        """
        with self._lock:
            self.check_idle()
            plan = preflight(self.studio, cfg, self.library, self.paths)
            self._current = TrainingJob(self.studio, cfg, self.library, self.paths, plan).start()
            return self._current

    def check_idle(self) -> None:
        """Raise `BusyError` naming the active run, if there is one."""
        job = self._current
        if job is not None and job.running:
            snap = job.snapshot()
            raise BusyError(f"a training run for {snap.name} is already running (step {snap.step}/{snap.total}); "
                            "stop it first.")

    @property
    def current(self) -> TrainingJob | None:
        """The running or last finished job (None before the first start)."""
        return self._current
