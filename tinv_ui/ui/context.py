"""What every tab needs: the studio, the embeddings library, the training runner and the folders.

One `UIContext` is built per app in `build_ui`; nothing here is global.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import Paths
from ..confine import Confinement
from ..jobs import JobStatus, TrainingRunner
from ..library import EmbeddingLibrary, printable
from ..studio import Studio


@dataclass
class UIContext:
    """The app's long-lived objects, passed to every tab builder."""

    studio: Studio
    library: EmbeddingLibrary
    runner: TrainingRunner
    paths: Paths
    xformers: bool = False
    compile: bool = False  # default of the Generate panel's "torch.compile the UNet" box (app.py --compile)
    confinement: Confinement | None = None  # folders web requests may use; default: the app's own folders

    def __post_init__(self) -> None:
        if self.confinement is None:
            self.confinement = Confinement.for_app(self.paths)

    def confine(self, path: str | Path, setting: str) -> Path:
        """`path` resolved when a web request may use it, else a `ConfigError` naming `setting` and --allow-dir."""
        return self.confinement.check(path, setting)

    def refresh_library(self, force: bool = False) -> bool:
        """Rescan the embeddings folder for the loaded model's width; True when something changed."""
        return self.library.rescan_for(self.studio, force=force)

    def embedding_names(self) -> list[str]:
        return list(self.library.names())

    @property
    def native_resolution(self) -> int:
        """The loaded model's native size (64 for the tiny model); 512 when nothing is loaded."""
        info = self.studio.info
        return int(info.resolution) if info else 512

    def training_running(self) -> bool:
        job = self.runner.current
        return job is not None and job.snapshot().status == JobStatus.RUNNING


def progress_html(done: int, total: int, label: str, state: str = "running") -> str:
    """A small progress bar with a text label (`state` picks the colour: running, finished, failed, idle)."""
    pct = 0 if total <= 0 else max(0.0, min(100.0, 100.0 * done / total))
    return (
        f'<div class="tinv-progress tinv-{html.escape(state)}" role="progressbar" aria-valuenow="{pct:.0f}" '
        f'aria-valuemin="0" aria-valuemax="100"><div class="tinv-bar" style="width:{pct:.1f}%"></div>'
        f'<span class="tinv-label">{html.escape(label)}</span></div>'
    )


MAX_PLOT_POINTS = 1000  # the loss curve is downsampled beyond this many steps


def loss_frame(losses: list[tuple[int, float]]) -> pd.DataFrame | None:
    """The loss curve's points; None (no chart) before the first step: vega warns "Infinite extent" on every
    page load and poll when it is given an empty frame."""
    if not losses:
        return None
    if len(losses) > MAX_PLOT_POINTS:
        stride = -(-len(losses) // MAX_PLOT_POINTS)
        losses = losses[::stride] + [losses[-1]]
    # Explicit dtypes: steps are whole numbers, losses floats, however the list was built.
    frame = pd.DataFrame(losses, columns=["step", "loss"])
    return frame.astype({"step": "int64", "loss": "float64"})


def preview_caption(path: Path) -> str:
    """`images/<name>-<step>.png` → 'step <step>' (the name is already in the progress line or the run's title)."""
    match = re.search(r"-(\d+)$", path.stem)
    return f"step {match.group(1)}" if match else path.stem


_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|~$:])")


def md_text(text: str) -> str:
    """`text` (a file or embedding name, a reason) as Markdown that renders it literally: HTML and Markdown
    characters are escaped, and bytes of a non-UTF-8 file name show as U+FFFD."""
    text = printable(str(text))
    return html.escape(_MARKDOWN_PUNCTUATION.sub(r"\\\1", text), quote=False).replace("\n", " ")


def library_report(library) -> str:
    """Markdown: how many embeddings are loaded, which were skipped and why, collisions and warnings.

    Names come from files anyone may drop into the folder, so every piece of text is shown literally.
    """
    names = library.names()
    shown = ", ".join(md_text(n) for n in names)
    lines = [f"**{len(names)} embedding{'s' if len(names) != 1 else ''} loaded**" + (f": {shown}" if names else "")]
    for s in library.skipped:
        lines.append(f"- skipped <code>{md_text(s.name)}</code> ({md_text(s.path.name)}): {md_text(s.reason)}")
    lines += [f"- collision: {md_text(c)}" for c in library.collisions]
    lines += [f"- warning: {md_text(w)}" for w in library.warnings]
    return "\n".join(lines)


CSS = """
.tinv-progress { position: relative; height: 28px; border-radius: 6px; overflow: hidden;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.tinv-bar { position: absolute; inset: 0 auto 0 0; background: var(--color-accent-soft); transition: width .3s; }
.tinv-finished .tinv-bar { background: #bbf7d0; }
.tinv-failed .tinv-bar, .tinv-interrupted .tinv-bar { background: #fde68a; }
.tinv-label { position: relative; display: block; line-height: 28px; padding: 0 10px; font-size: 0.9em;
  color: var(--body-text-color); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#tinv-header h1 { margin: 0; font-size: 1.4em; }
#tinv-model-status p { margin: 0; }
.tinv-side-button { align-self: flex-end; margin-bottom: 10px; }
/* In a group, side-by-side blocks of unequal height (a filled upload zone beside an empty one) fill the row,
   so no strip of the group's grey background shows under the shorter one. */
.gr-group .row > .block, .gr-group .row > .form { align-self: stretch; }
/* Advanced settings: at least 220px per field, so a row of three wraps to two before labels wrap to three lines. */
#tinv-train-advanced .form > .block { min-width: min(220px, 100%) !important; }
"""

# Gradio's client stands in for EventSource with an object whose close() only says console.warn("Method not
# implemented."); every file upload closes one (its progress stream), two warnings per upload. The stream has
# ended by then, so nothing is lost: those exact warnings are dropped, every other message is kept.
# (gradio-app/gradio issue #12002.)
HEAD = """<script>
(() => {
  const warn = console.warn.bind(console);
  console.warn = (...args) => { if (!(args.length === 1 && args[0] === "Method not implemented.")) warn(...args); };
})();
</script>"""
