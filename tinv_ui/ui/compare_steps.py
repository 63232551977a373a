"""The Train tab's "Compare steps" view: pick a run and some of its saved steps, render one image per copy with
one prompt and seed, and see (and find saved) the labelled grid. The work is `compare.compare_steps`.

The run is chosen by its key in the listing (`runs.run_key`); a key from the browser is looked up in a fresh
listing, never opened as a path. Rendering goes through the "gpu" queue, like Generate, and the studio lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import gradio as gr

from .. import compare, runs
from ..config import SAMPLERS, GenerateConfig
from ..events import Compared, Generated, Step, format_duration
from ..fileio import display_path
from ..runs import RunRecord, log_root
from .context import UIContext, progress_html
from .errors import user_errors
from .forms import Form

FIELDS = ("prompt", "negative_prompt", "sampler", "steps", "cfg_scale", "seed", "width", "height")


@dataclass
class CompareView:
    run: gr.Dropdown
    refresh: gr.Button
    steps: gr.CheckboxGroup
    form: Form
    render: gr.Button
    stop: gr.Button
    progress: gr.HTML
    grid: gr.Image
    saved: gr.Textbox
    infotext: gr.Textbox

    @property
    def run_outputs(self) -> list:
        """What picking a run fills in: the run list, its steps, and the form from its preview settings."""
        return [self.run, self.steps] + [self.form.components[k] for k in FIELDS]


def build_compare_tab(ctx: UIContext) -> CompareView:
    """The "Compare steps" tab, built inside the Train tab's `gr.Tabs`; opening it lists the runs as they are now
    (a run may have finished since the page loaded)."""
    with gr.Tab("Compare steps", id="compare", elem_id="tinv-train-compare") as tab:
        view = _build_view(ctx)
    tab.select(lambda key: run_updates(ctx, key), inputs=view.run, outputs=view.run_outputs, show_progress="hidden",
               api_visibility="private")
    return view


def _build_view(ctx: UIContext) -> CompareView:
    gr.Markdown("Render one image per saved copy of a training run, with one prompt and seed, to choose the best "
                f"step. At most {compare.MAX_CELLS} steps per grid; saved to outputs/compare/ with its parameters.")
    form = Form(GenerateConfig, "compare")
    with gr.Row():
        # Gradio's own choice checks would refuse API clients (their session never saw the listing) and name
        # no field: `compare.find_run` and `compare.check_steps` check against the listing on disk instead.
        run = gr.Dropdown([], value=None, label="Training run", scale=6, elem_id="tinv-compare-run", allow_custom_value=True,
                          info="Runs under outputs/train that saved copies (Save a copy every N steps), newest first.")
        refresh = gr.Button("Refresh", scale=0, min_width=100, elem_classes="tinv-side-button")
    steps = gr.CheckboxGroup([], value=[], label="Steps to compare", elem_id="tinv-compare-copies")
    steps.preprocess = lambda payload: list(payload or [])
    form.add("prompt", "Prompt", lines=2, info="Must contain the embedding's name.")
    form.add("negative_prompt", "Negative prompt", info=None)
    with gr.Row():
        form.register("sampler", gr.Dropdown(list(SAMPLERS), value="Euler a", label="Sampling method"))
        form.add("steps", "Sampling steps", slider=True, info=None)
        form.add("cfg_scale", "CFG scale", slider=True, step=0.5, info=None)
    with gr.Row():
        form.add("seed", "Seed", info="-1 = one random seed for every cell.")
        form.add("width", "Width", step=8, value=ctx.native_resolution, info=None)
        form.add("height", "Height", step=8, value=ctx.native_resolution, info=None)
    with gr.Row():
        render = gr.Button("Render comparison", variant="primary", elem_id="tinv-compare-render")
        stop = gr.Button("Stop", variant="stop", elem_id="tinv-compare-stop")
    progress = gr.HTML(progress_html(0, 0, "Pick a run and steps, then render.", "idle"), elem_id="tinv-compare-progress")
    grid = gr.Image(label="Comparison", type="filepath", format="png", interactive=False, height=320,
                    elem_id="tinv-compare-grid")
    saved = gr.Textbox(label="Saved to", interactive=False, buttons=["copy"], elem_id="tinv-compare-saved")
    infotext = gr.Textbox(label="Parameters", lines=3, interactive=False, elem_id="tinv-compare-infotext")
    view = CompareView(run, refresh, steps, form, render, stop, progress, grid, saved, infotext)
    _wire(ctx, view)
    return view


def _wire(ctx: UIContext, view: CompareView) -> None:
    stops: dict[str, threading.Event] = {}  # per browser tab (Gradio session), while its comparison runs
    root = log_root(ctx.paths.outputs_dir)
    inputs = [view.run, view.steps] + [view.form.components[k] for k in FIELDS]
    outputs = [view.progress, view.grid, view.saved, view.infotext]

    @user_errors
    def render(run_key: str | None, chosen: list[int] | None, prompt: str, negative_prompt: str, sampler: str,
               steps: float, cfg_scale: float, seed: float, width: float, height: float, request: gr.Request):
        run = compare.find_run(root, run_key)
        values = dict(zip(FIELDS, (prompt, negative_prompt, sampler, steps, cfg_scale, seed, width, height)))
        cfg = view.form.config(values, batch_size=1, batch_count=1, save=False)
        chosen = compare.check_steps(run, chosen or [])
        stop = stops[request.session_hash] = threading.Event()
        try:
            yield from _render_updates(ctx, view, run, chosen, cfg, stop)
        finally:
            if stops.get(request.session_hash) is stop:  # a later request of this tab may have replaced it
                del stops[request.session_hash]

    def stop(request: gr.Request) -> Any:
        event = stops.get(request.session_hash)
        if event is None:
            gr.Warning("No comparison is rendering.")
        else:
            event.set()

    def pick_run(run_key: str | None) -> list[Any]:
        return run_updates(ctx, run_key)

    view.render.click(render, inputs=inputs, outputs=outputs, concurrency_id="gpu", api_name="compare_steps")
    view.stop.click(stop, api_name="stop_compare")
    view.run.input(pick_run, inputs=view.run, outputs=view.run_outputs, api_visibility="private")
    for trigger in (view.refresh.click, view.run.focus):
        trigger(pick_run, inputs=view.run, outputs=view.run_outputs, show_progress="hidden", api_visibility="private")


def run_choices(ctx: UIContext) -> dict[str, tuple[str, RunRecord]]:
    """key -> (label, run) of every run with copies, newest first; labels read
    'alpha · 2026-12-03 14:05 · steps 500–3000 (6) · alpha_run2'."""
    root = log_root(ctx.paths.outputs_dir)
    return {runs.run_key(run): (_run_label(run), run) for run in compare.runs_with_copies(root)}


def _run_label(run: RunRecord) -> str:
    steps = list(run.copies)
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]} ({len(steps)})"
    return f"{run.name} · {run.started:%Y-%m-%d %H:%M} · {span} · {run.folder.name}"


def run_updates(ctx: UIContext, run_key: str | None) -> list[Any]:
    """[run list, steps, prompt, negative, sampler, steps, cfg, seed, width, height] for `run_key` (default: newest).

    The form takes the run's preview settings, so the grid starts from what its previews showed."""
    listed = run_choices(ctx)
    key = run_key if isinstance(run_key, str) and run_key in listed else next(iter(listed), None)
    if key is None:
        return [gr.Dropdown(choices=[], value=None), gr.CheckboxGroup(choices=[], value=[])] + [gr.skip()] * len(FIELDS)
    run = listed[key][1]
    s = run.settings
    res = ctx.native_resolution

    def setting(name: str, default: Any, kind: type) -> Any:
        value = s.get(name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else default

    seed = setting("preview_seed", -1, int)
    return [
        gr.Dropdown(choices=[(label, k) for k, (label, _) in listed.items()], value=key),
        gr.CheckboxGroup(choices=[(f"step {n}", n) for n in run.copies], value=compare.default_steps(list(run.copies))),
        compare.default_prompt(run),
        setting("preview_negative_prompt", "", str),
        s["preview_sampler_name"] if s.get("preview_sampler_name") in SAMPLERS else "Euler a",
        setting("preview_steps", 20, int),
        setting("preview_cfg_scale", 7.0, (int, float)),
        seed,
        setting("preview_width", res, int),
        setting("preview_height", res, int),
    ]


def _render_updates(ctx: UIContext, view: CompareView, run: RunRecord, chosen: list[int], cfg: GenerateConfig,
                    stop: threading.Event):
    """Drive `compare.compare_steps`, yielding updates for [progress, grid, saved, infotext]."""
    if ctx.studio.busy_with:
        yield {view.progress: progress_html(0, 1, f"Waiting for the model ({ctx.studio.busy_with})...", "running")}
    drawn: list = []  # the images so far: the grid fills in as they come (the saved file is the final grid)
    for event in compare.compare_steps(ctx.studio, run, chosen, cfg, ctx.library, ctx.paths, stop):
        match event:
            case Step(step=step, total=total, eta=eta):
                label = (f"{run.name}: image {len(drawn) + 1}/{len(chosen)} (step {chosen[len(drawn)]}) · "
                         f"ETA {format_duration(eta)}")
                yield {view.progress: progress_html(step, total, label)}
            case Generated(images=images):
                drawn.append(images[0])
                yield {view.grid: compare.compose_grid(drawn, [f"step {s}" for s in chosen[:len(drawn)]])}
            case Compared(path=None):
                yield {view.progress: progress_html(0, 1, "Stopped before the first image; nothing saved.", "interrupted"),
                       view.grid: None, view.saved: "", view.infotext: ""}
            case Compared():
                done = f"Stopped: {len(event.steps)} of {len(chosen)} steps" if event.interrupted else \
                    f"Done: {len(event.steps)} steps"
                yield {view.progress: progress_html(1, 1, f"{done}, seed {event.seed}; grid saved.",
                                                    "interrupted" if event.interrupted else "finished"),
                       view.grid: str(event.path), view.saved: display_path(event.path), view.infotext: event.infotext}
