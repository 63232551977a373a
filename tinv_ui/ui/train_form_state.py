"""The Train form follows its embedding: remembered settings, a line saying what Start will do, a fresh list.

- On page load and whenever the Embedding choice changes, every setting is filled from that embedding's running
  (or last) job, else from its newest run's settings file (`last_settings.remembered_settings`), so a new tab
  or a restarted app shows the settings that were used, and Start does not quietly launch another run.
- Under Start, one line says what Start will do: continue from step N, begin at step 0, be refused, or wait
  for the run in progress (`last_settings.start_outlook`, from the same starting point pre-flight uses).
- The embedding list picks up files dropped into embeddings/ on a timer and on focus, as Generate's does
  (`generate_tab.embedding_list_update`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..errors import TinvError
from ..jobs import JobStatus
from ..last_settings import Remembered, remembered_settings, start_outlook
from ..runs import log_root
from ..train_setup import starting_point
from .context import UIContext, library_report, md_text
from .generate_tab import LIST_REFRESH_SECONDS, embedding_list_update

if TYPE_CHECKING:
    from .train_tab import TrainTab


@dataclass
class TrainFormState:
    outlook: gr.Markdown  # what Start will do, and where the settings came from
    filled_for: gr.State  # {"name": the embedding the form was last filled for, "note": where its settings came from}
    outlook_key: gr.State  # what the outlook line was computed from (timer ticks redraw only on a change)
    report_shown: gr.State  # the library report behind this tab's embedding list
    timer: gr.Timer


def build_form_state(ctx: UIContext) -> TrainFormState:
    """The line under Start (call it where the line should be) and the per-tab states."""
    outlook = gr.Markdown("", elem_id="tinv-train-outlook")
    return TrainFormState(outlook, gr.State(None), gr.State(None), gr.State(library_report(ctx.library)),
                          gr.Timer(LIST_REFRESH_SECONDS))


def wire_form_state(ctx: UIContext, tab: TrainTab) -> None:
    """Fill on a changed embedding, redraw the outlook on a changed setting or job, refresh the list."""
    state, form = tab.form_state, tab.form
    fill_outputs = fill_outputs_of(tab)
    settings = [form.components["max_steps"], form.components["log_dir"]]
    outlook_inputs = [tab.embedding, *settings, state.filled_for, state.outlook_key]

    tab.embedding.change(
        lambda name, filled, *current: fill(ctx, tab, name, filled, *current), inputs=[tab.embedding, state.filled_for, *settings],
        outputs=fill_outputs, show_progress="hidden", api_visibility="private",
    )
    for trigger in (form.components["max_steps"].change, form.components["log_dir"].blur, state.timer.tick):
        trigger(lambda *args: outlook_update(ctx, *args), inputs=outlook_inputs, outputs=[state.outlook, state.outlook_key],
                show_progress="hidden", api_visibility="private")

    def list_update(shown: str) -> list[Any]:
        dropdown, _, report = embedding_list_update(ctx, shown)
        return [dropdown, report]

    for trigger in (state.timer.tick, tab.embedding.focus):
        trigger(list_update, inputs=state.report_shown, outputs=[tab.embedding, state.report_shown],
                show_progress="hidden", api_visibility="private")


def fill_on_page_load(ctx: UIContext, tab: TrainTab, page_loaded: Any) -> None:
    """After the page's load event has chosen the embedding (`app_ui.build_ui`), fill the form for it."""
    settings = [tab.form.components["max_steps"], tab.form.components["log_dir"]]
    page_loaded.then(lambda name, *current: fill(ctx, tab, name, None, *current), inputs=[tab.embedding, *settings],
                     outputs=fill_outputs_of(tab), show_progress="hidden", api_visibility="private")


def fill_outputs_of(tab: TrainTab) -> list[Any]:
    return [tab.form.components[k] for k in _filled_fields(tab)] + [
        tab.form_state.outlook, tab.form_state.filled_for, tab.form_state.outlook_key]


def _filled_fields(tab: TrainTab) -> list[str]:
    return [k for k in tab.form.components if k != "embedding"]


def fill(ctx: UIContext, tab: TrainTab, name: str | None, filled_for: dict | None, max_steps: Any = None,
         log_dir: str | None = "") -> list[Any]:
    """Updates for `fill_outputs_of(tab)`: the remembered settings of `name` (fields without one keep their
    value: `max_steps` and `log_dir` are the form's now), the outlook line, and what the form was filled for.
    Nothing changes when the form already shows `name`'s settings (a list refresh, or the load event choosing
    the same embedding)."""
    names = _filled_fields(tab)
    if not name or name == (filled_for or {}).get("name"):
        return [gr.skip()] * (len(names) + 3)
    job = ctx.runner.current
    running = ctx.training_running()
    remembered = remembered_settings(name, job.cfg if job else None, running, log_root(ctx.paths.outputs_dir))
    values = [remembered.values[k] if k in remembered.values else gr.skip() for k in names]
    max_steps = remembered.values.get("max_steps", max_steps)
    log_dir = remembered.values.get("log_dir", log_dir or "")
    filled = {"name": name, "note": settings_note(remembered)}
    line, key = outlook_line(ctx, name, max_steps, log_dir, filled)
    return values + [line, filled, key]


def settings_note(remembered: Remembered) -> str:
    """Markdown: where the filled settings came from, and which saved values were invalid and left out."""
    lines = [f"Settings of {md_text(remembered.source)}."] if remembered.source else []
    if remembered.skipped:
        lines.append("Left out (invalid in the saved settings): " + md_text("; ".join(remembered.skipped)))
    return "  \n".join(lines)


def outlook_update(ctx: UIContext, name: str | None, max_steps: Any, log_dir: str | None, filled: dict | None,
                   shown_key: Any) -> list[Any]:
    """[outlook, key]: redrawn only when the embedding, max steps, log folder or the job's state changed."""
    key = _outlook_key(ctx, name, max_steps, log_dir)
    if key == shown_key:
        return [gr.skip(), shown_key]
    return list(outlook_line(ctx, name or "", max_steps, log_dir or "", filled))


def outlook_line(ctx: UIContext, name: str, max_steps: Any, log_dir: str, filled: dict | None) -> tuple[str, Any]:
    """(Markdown, key): what Start will do for `name`, and where the form's settings came from."""
    job = ctx.runner.current
    snap = job.snapshot() if job is not None else None
    start_step, problem = None, ""
    if name and not (snap and snap.status == JobStatus.RUNNING):
        try:
            if log_dir.strip():
                ctx.confine(log_dir, "log_dir")
            emb, *_ = starting_point(ctx.studio, name, log_dir, ctx.library, ctx.paths)
            start_step = emb.step or 0
        except TinvError as e:
            problem = str(e)
    lines = [md_text(start_outlook(name, max_steps, start_step, snap, problem))]
    if filled and filled.get("name") == name and filled.get("note"):
        lines.append(filled["note"])
    return "  \n".join(lines), _outlook_key(ctx, name, max_steps, log_dir)


def _outlook_key(ctx: UIContext, name: str | None, max_steps: Any, log_dir: str | None) -> list[Any]:
    job = ctx.runner.current
    snap = job.snapshot() if job is not None else None
    running = snap is not None and snap.status == JobStatus.RUNNING
    job_state = [id(job), snap.status.value, snap.step if running else None] if snap else None
    return [name, max_steps, log_dir, job_state, _file_version(ctx, name)]


def _file_version(ctx: UIContext, name: str | None) -> list[int] | None:
    """The embedding file's size and time: a file replaced outside a run (Create, a copy put back) moves its step."""
    try:
        stat = Path(ctx.library.get(name or "").path).stat()
    except (TinvError, OSError):
        return None
    return [stat.st_size, stat.st_mtime_ns]
