"""The Train tab's "Runs" view: earlier runs read back from `outputs/train/` (`runs.list_runs`), one opened
with its previews, loss curve and settings, and "Use this step" (`use_step.use_step`) to make one of its
copies a library embedding.

A run is named by its `runs.run_key` (`<date>/<folder>`); a key that comes back from the page is only
matched against the listing (`runs.find_run`), and a step only against that run's copies. The list is read
again when the page loads, when the view is selected, when the training job starts or ends, and on Refresh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from .. import runs
from ..errors import ConfigError
from ..fileio import display_path
from ..runs import RunRecord
from ..use_step import use_step
from .context import UIContext, loss_frame, md_text, preview_caption, progress_html
from .create_tab import refuse_the_trained_embedding
from .errors import user_errors

MAX_PREVIEWS = 48  # newest previews of an opened run shown
COLUMNS = ["Embedding", "Started", "Steps", "Final loss", "Folder"]
# (label, key in the settings JSON): A1111's keys, which every run of A1111 and of ours writes
SETTINGS_SHOWN = (
    ("Embedding", "embedding_name"), ("Model", "model_name"), ("Learning rate", "learn_rate"),
    ("Batch size", "batch_size"), ("Gradient accumulation", "gradient_step"), ("Max steps", "steps"),
    ("Started from step", "initial_step"), ("Width", "training_width"), ("Height", "training_height"),
    ("Vectors per token", "num_vectors_per_token"), ("Dataset", "data_root"), ("Images", "num_of_dataset_images"),
    ("Template", "template_file"), ("Preview every", "create_image_every"), ("Save every", "save_embedding_every"),
    ("Preview prompt", "preview_prompt"), ("Preview seed", "preview_seed"),
)


@dataclass
class RunHistory:
    table: gr.Dataframe
    run: gr.Dropdown  # the run to open; its value is a `runs.run_key`
    refresh: gr.Button
    summary: gr.Markdown
    gallery: gr.Gallery
    plot: gr.LinePlot
    settings: gr.Dataframe
    settings_json: gr.Code
    step: gr.Dropdown
    name: gr.Textbox
    overwrite: gr.Checkbox
    use: gr.Button
    status: gr.Textbox
    listed: gr.State  # the run keys in the table's row order (a clicked row opens its run)
    opened: gr.State  # the opened run's `runs.run_key` ("" = none); `runs.find_run(root, key)` gives the run
    used: gr.State  # the embedding "Use this step" wrote, for the app to select it in every dropdown
    used_event: Any  # the Use click, so the app can chain the dropdown refresh with `.success`
    job_seen: gr.State  # (job id, status) the list was last read for
    timer: gr.Timer


def build_run_history(ctx: UIContext, progress: gr.HTML, timer: gr.Timer) -> RunHistory:
    """The "Runs" tab of the Train panel's right column. `progress` is the Current run's progress bar: with no
    job in this process it says how many earlier runs the list holds. `timer` is the Train tab's poll timer: at
    each tick the view checks whether a job started or ended, and reads the list again when it did."""
    with gr.Tab("Runs", id="runs", elem_id="tinv-train-runs") as tab:
        count = gr.Markdown("", elem_id="tinv-runs-count")
        table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), headers=COLUMNS, datatype="str", interactive=False,
                             max_height=260, elem_id="tinv-runs-table")
        with gr.Row():
            run = gr.Dropdown([], value=None, label="Open run", scale=6, elem_id="tinv-runs-open",
                              info="Or click a row of the table.")
            refresh = gr.Button("Refresh", scale=0, min_width=100, elem_classes="tinv-side-button")
        summary = gr.Markdown("", elem_id="tinv-runs-summary")
        gallery = gr.Gallery(label="Previews", format="png", columns=4, fit_columns=False, height=260,
                             object_fit="contain", elem_id="tinv-runs-previews")
        plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Loss", height=220, elem_id="tinv-runs-loss")
        with gr.Row():
            step = gr.Dropdown([], value=None, label="Saved copy (step)", scale=1, elem_id="tinv-runs-step")
            name = gr.Textbox(label="Use as embedding", scale=2, elem_id="tinv-runs-name",
                              info="The run's embedding name replaces it (tick overwrite); a new name adds one.")
            overwrite = gr.Checkbox(label="Overwrite an existing embedding of the same name", scale=1,
                                    elem_id="tinv-runs-overwrite")
        use = gr.Button("Use this step", variant="primary", elem_id="tinv-runs-use")
        status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="tinv-runs-status")
        settings = gr.Dataframe(pd.DataFrame(columns=["Setting", "Value"]), headers=["Setting", "Value"],
                                datatype="str", interactive=False, label="Settings", max_height=320,
                                elem_id="tinv-runs-settings")
        with gr.Accordion("Settings JSON", open=False):
            settings_json = gr.Code("", language="json", interactive=False, elem_id="tinv-runs-json")
        # States inside the tab: a component made in the `gr.Tabs` but outside every `gr.Tab` makes Gradio draw
        # the next tab's button twice.
        listed, opened, used, job_seen = gr.State([]), gr.State(""), gr.State(""), gr.State(None)
    view = RunHistory(table, run, refresh, summary, gallery, plot, settings, settings_json, step, name, overwrite,
                      use, status, listed, opened, used, None, job_seen, timer)
    _wire(ctx, view, tab, count, progress)
    return view


def _wire(ctx: UIContext, view: RunHistory, tab: gr.Tab, count: gr.Markdown, progress: gr.HTML) -> None:
    root = runs.log_root(ctx.paths.outputs_dir)
    listing = [count, view.table, view.run, view.listed, view.job_seen, progress]

    def listing_update(selected: str | None) -> list[Any]:
        found = runs.list_runs(root)
        keys = [runs.run_key(r) for r in found]
        choices = [(_label(r), k) for r, k in zip(found, keys)]
        # the Current run's bar, while this process has run no job: earlier runs exist, they are under Runs
        idle = gr.skip() if ctx.runner.current is not None else progress_html(0, 0, _idle_label(len(found)), "idle")
        return [_count_label(len(found), root),
                pd.DataFrame([_row(r) for r in found], columns=COLUMNS),
                gr.Dropdown(choices=choices, value=selected if selected in keys else None),
                keys, _job_state(ctx), idle]

    def watch(seen: Any, selected: str | None) -> list[Any]:
        if _job_state(ctx) == seen:
            return [gr.skip()] * len(listing)  # nothing started or ended: the page keeps what it shows
        return listing_update(selected)

    def pick_row(keys: list[str], evt: gr.SelectData) -> Any:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) and evt.index else None
        return keys[row] if isinstance(row, int) and 0 <= row < len(keys) else gr.skip()

    @user_errors
    def open_run(key: str | None) -> list[Any]:
        if not key:
            return ["", [], loss_frame([]), _settings_frame({}), "", gr.Dropdown(choices=[], value=None), "", ""]
        run = _listed_run(root, key)
        losses = run.losses()
        steps = sorted(run.copies)
        return [_summary(run, losses), _previews(run), loss_frame(losses), _settings_frame(run.settings),
                json.dumps(run.settings, indent=2, ensure_ascii=False) if run.settings else "",
                gr.Dropdown(choices=steps, value=steps[-1] if steps else None), run.name, key]

    @user_errors
    def use(key: str, step: Any, name: str, overwrite: bool) -> tuple[str, str]:
        run = _listed_run(root, key)
        step = _copy_step(run, step)
        refuse_the_trained_embedding(ctx, name or "")
        path = use_step(run, step, name or "", ctx.paths.embeddings_dir, bool(overwrite))
        ctx.refresh_library()
        return _used_message(ctx, run, step, path), path.stem

    # Page load and the tab's select also write the Current run's bar: no "pending" overlay on it for those.
    gr.on(None, lambda: listing_update(None), outputs=listing, show_progress="hidden", api_visibility="private")
    tab.select(listing_update, inputs=view.run, outputs=listing, show_progress="hidden", api_visibility="private")
    view.refresh.click(listing_update, inputs=view.run, outputs=listing, api_name="list_runs")
    view.timer.tick(watch, inputs=[view.job_seen, view.run], outputs=listing, show_progress="hidden",
                    api_visibility="private")
    view.table.select(pick_row, inputs=view.listed, outputs=view.run, api_visibility="private")
    view.run.change(open_run, inputs=view.run, outputs=[view.summary, view.gallery, view.plot, view.settings,
                                                        view.settings_json, view.step, view.name, view.opened],
                    api_name="open_run")
    view.used_event = view.use.click(use, inputs=[view.opened, view.step, view.name, view.overwrite],
                                     outputs=[view.status, view.used], api_name="use_run_step")


def _count_label(count: int, root) -> str:
    where = md_text(display_path(root))
    if not count:
        return f"No runs yet in {where}: runs you start appear here."
    newest = f" (the newest {runs.MAX_RUNS})" if count >= runs.MAX_RUNS else ""
    return f"**{count} earlier run{'s' if count != 1 else ''}** in {where}{newest}"


def _idle_label(count: int) -> str:
    if not count:
        return "No training run yet."
    return f"No run in this session; {count} earlier run{'s' if count != 1 else ''} under Runs."


def _job_state(ctx: UIContext) -> tuple[int, str] | None:
    job = ctx.runner.current
    return None if job is None else (id(job), job.snapshot().status.value)


def _listed_run(root, key: Any) -> RunRecord:
    run = runs.find_run(root, key)
    if run is None:
        raise ConfigError("run: that run is not in the list (it was moved or deleted); press Refresh and pick one.")
    return run


def _copy_step(run: RunRecord, step: Any) -> int:
    """The step number the page sent (`use_step` then checks that the run has a copy at it)."""
    try:
        return int(step)
    except (TypeError, ValueError):
        saved = ", ".join(str(s) for s in run.copies) or "none"
        raise ConfigError(f"step: pick one of the run's saved copies (steps {saved}).") from None


def _label(run: RunRecord) -> str:
    return f"{run.name} · {run.started:%Y-%m-%d %H:%M} · {run.folder.name}"


def _row(run: RunRecord) -> list[str]:
    losses = run.losses()
    last, final = run.last_step(losses), run.final_loss(losses)
    steps = f"{last}/{run.max_steps}" if run.max_steps else str(last)
    loss = f"{final:.4f}" if final is not None else "-"
    return [run.name, f"{run.started:%Y-%m-%d %H:%M:%S}", steps, loss, runs.run_key(run)]


def _summary(run: RunRecord, losses: list[tuple[int, float]]) -> str:
    """Markdown: the opened run in two lines (every name is shown literally)."""
    steps = f"{run.last_step(losses)}" + (f" of {run.max_steps}" if run.max_steps else "")
    final = run.final_loss(losses)
    loss = f"{final:.4f}" if final is not None else "none recorded"
    copies = ", ".join(str(s) for s in run.copies) or "none"
    return (f"**{md_text(run.name)}**, started {run.started:%Y-%m-%d %H:%M:%S}: {steps} steps, final loss {loss}\n\n"
            f"Saved copies at steps {copies}; {len(run.previews)} previews; folder {md_text(display_path(run.folder))}")


def _previews(run: RunRecord) -> list[tuple[str, str]]:
    """The run's previews by step (the newest `MAX_PREVIEWS`), captioned "step N"."""
    return [(str(path), preview_caption(path)) for path in list(run.previews.values())[-MAX_PREVIEWS:]]


def _settings_frame(settings: dict[str, Any]) -> pd.DataFrame:
    rows = [(label, _text(settings[key])) for label, key in SETTINGS_SHOWN if settings.get(key) not in (None, "")]
    seed = settings.get("tinv_ui", {}).get("seed") if isinstance(settings.get("tinv_ui"), dict) else None
    if seed is not None:
        rows.append(("Training seed", _text(seed)))
    return pd.DataFrame(rows, columns=["Setting", "Value"])


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 300 else text[:297] + "..."


def _used_message(ctx: UIContext, run: RunRecord, step: int, path) -> str:
    """What "Use this step" did, and whether the library loads the file (another model's width, a name clash)."""
    name = path.stem
    message = f"Step {step} of {run.name} is now {display_path(path)}."
    if name not in ctx.library.loaded:
        reasons = [s.reason for s in ctx.library.skipped if s.path.resolve() == path.resolve()]
        message += f" It is not loaded: {reasons[0] if reasons else 'load a model it fits'}."
    clashes = [c for c in ctx.library.collisions if repr(name) in c]
    return " ".join([message, *clashes])
