"""The "Train" tab: widgets ↔ `TrainConfig`; the run lives in `jobs.TrainingRunner`, the tab only watches it.

Training runs on a background job owned by the app (docs/design.md, "Long work"), so it survives a closed or reloaded
tab. Every open tab polls the runner's current job with a `gr.Timer` and redraws only what changed;
Start while a run is active shows the runner's `BusyError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from .. import confine
from ..config import SAMPLERS, TrainConfig, field_help
from ..errors import ConfigError, TinvError
from ..events import LOADING_IMAGES, format_duration
from ..fileio import display_path, folder_problem
from ..jobs import JobStatus
from ..templates import find_template, list_templates
from .compare_steps import build_compare_tab
from .context import UIContext, loss_frame, preview_caption, progress_html
from .dataset_preview import build_upload_area, wire_dataset_area
from .errors import user_errors
from .forms import Form
from .run_history import RunHistory, build_run_history
from .train_form_state import TrainFormState, build_form_state, wire_form_state

POLL_SECONDS = 1.0
MAX_GALLERY = 12  # newest previews shown (three rows, all in view: the gallery grows, it does not scroll)


@dataclass
class TrainTab:
    embedding: gr.Dropdown
    refresh: gr.Button
    form: Form
    folder_upload: gr.UploadButton
    files_upload: gr.File
    upload_note: gr.Markdown
    start: gr.Button
    interrupt: gr.Button
    progress: gr.HTML
    gallery: gr.Gallery
    plot: gr.LinePlot
    saved: gr.Textbox
    message: gr.Textbox
    seen: gr.State  # what this browser tab already shows of the job (so polls send only changes)
    timer: gr.Timer
    last_prompt: gr.Textbox  # the last training prompt (A1111's "Last prompt")
    newest: gr.Image  # the newest preview, large, with its step
    form_state: TrainFormState
    runs: RunHistory  # the "Runs" view (earlier runs, "Use this step")

    @property
    def watch_outputs(self) -> list:
        return [self.progress, self.gallery, self.plot, self.saved, self.message, self.last_prompt, self.newest,
                self.seen]


def user_template_dir(ctx: UIContext) -> Path:
    """User templates: `textual_inversion_templates/` beside the embeddings folder (A1111's folder name)."""
    return confine.user_template_dir(ctx.paths)


def check_paths(ctx: UIContext, cfg: TrainConfig) -> None:
    """Refuse a dataset, template or log folder outside the folders web requests may use (`confine`)."""
    ctx.confine(cfg.dataset_dir, "dataset_dir")
    if cfg.log_dir.strip():
        ctx.confine(cfg.log_dir, "log_dir")
        if problem := folder_problem(cfg.log_dir):
            raise ConfigError(f"log_dir {cfg.log_dir!r} cannot hold the run's logs: {problem}. Give a folder, or "
                              "leave it empty for outputs/train.")
    template = cfg.template.strip()
    if confine.looks_like_path(template):
        ctx.confine(template, "template")  # before looking: "not found" would tell what exists outside
    ctx.confine(find_template(template), "template")  # a bare name may still be a file in the working folder


def template_choices(ctx: UIContext) -> list[tuple[str, str]]:
    """Shipped templates by name, then the user's `.txt` files by path (the trainer loads either)."""
    folder = user_template_dir(ctx)
    user = sorted(folder.glob("*.txt"), key=lambda p: p.name.lower()) if folder.is_dir() else []
    return [(name, name) for name in list_templates()] + [(f"{p.stem} (yours)", str(p)) for p in user]


def build_train_tab(ctx: UIContext) -> TrainTab:
    """Build the tab (settings left, live progress right) and wire its events; returns its components."""
    form = Form(TrainConfig, "train")
    timer = gr.Timer(POLL_SECONDS)  # every open page polls the job with it (and the Runs view watches it end)
    with gr.Row():
        with gr.Column(scale=6):
            embedding, refresh = _embedding_row(ctx, form)
            dataset = build_upload_area(form)
            _main_settings(ctx, form, ctx.native_resolution)
            with gr.Accordion("Advanced", open=False, elem_id="tinv-train-advanced"):
                _advanced_settings(ctx, form)
            with gr.Row():
                start = gr.Button("Start training", variant="primary")
                interrupt = gr.Button("Interrupt", variant="stop")
            form_state = build_form_state(ctx)
        with gr.Column(scale=5), gr.Tabs(elem_id="tinv-train-views"):
            with gr.Tab("Current run", id="current", elem_id="tinv-train-current"):
                progress = gr.HTML(progress_html(0, 0, "No training run yet.", "idle"), elem_id="tinv-train-progress")
                last_prompt = gr.Textbox(label="Last training prompt", interactive=False, elem_id="tinv-train-prompt")
                newest = gr.Image(label="Newest preview", type="filepath", interactive=False, height=320,
                                  visible=False, elem_id="tinv-train-newest")
                gallery = gr.Gallery(label="Previews", format="png", columns=4, fit_columns=False, height="auto",
                                     object_fit="contain", elem_id="tinv-train-previews")
                plot = gr.LinePlot(None, x="step", y="loss", title="Loss", height=240, elem_id="tinv-loss-plot")
                saved = gr.Textbox(label="Last saved file", interactive=False, buttons=["copy"], elem_id="tinv-train-saved")
                message = gr.Textbox(label="Message", interactive=False, lines=2, elem_id="tinv-train-message")
            runs_view = build_run_history(ctx, progress, timer)
            build_compare_tab(ctx)
    tab = TrainTab(embedding, refresh, form, dataset.folder, dataset.files, dataset.note, start, interrupt, progress,
                   gallery, plot, saved, message, gr.State({}), timer, last_prompt=last_prompt,
                   newest=newest, form_state=form_state, runs=runs_view)
    _wire(ctx, tab)
    wire_dataset_area(ctx, form, embedding, dataset, check_paths)
    wire_form_state(ctx, tab)
    return tab


def _wire(ctx: UIContext, tab: TrainTab) -> None:
    form = tab.form

    def poll(seen: dict) -> list[Any]:
        return job_view(ctx, seen)

    @form.handler
    @user_errors
    def start_training(data: dict) -> Iterator[tuple[Any, Any]]:
        ctx.runner.check_idle()  # "already running" matters more than this tab's settings
        cfg = form.config(data)
        # Pre-flight (reading every image of the dataset) runs in this request, before the job exists: say so.
        yield f"{cfg.embedding}: {LOADING_IMAGES} (checking the settings and the dataset)...", gr.skip()
        try:  # every check of the settings, pre-flight's too, answers here with the field's label
            check_paths(ctx, cfg)
            ctx.runner.start(cfg)
        except TinvError as e:
            last = ctx.runner.current
            yield (last.snapshot().message if last else ""), gr.skip()  # the panel keeps the last job; the toast says why
            raise type(e)(form.labelled(str(e))) from None
        yield f"Training {cfg.embedding} started.", {}  # an empty `seen` makes the next poll redraw everything

    tab.timer.tick(poll, inputs=tab.seen, outputs=tab.watch_outputs, show_progress="hidden", api_name="poll_training")
    tab.refresh.click(lambda: _embedding_update(ctx), outputs=tab.embedding, api_name="refresh_train_embeddings")
    template = form.components["template"]
    template.focus(lambda: gr.Dropdown(choices=template_choices(ctx)), outputs=template, api_visibility="private")
    tab.start.click(start_training, inputs=form.inputs, outputs=[tab.message, tab.seen], api_name="start_training").success(
        poll, inputs=tab.seen, outputs=tab.watch_outputs, show_progress="hidden", api_visibility="private"
    )
    tab.interrupt.click(lambda: interrupt_training(ctx), outputs=tab.message, api_name="interrupt_training")


def _embedding_row(ctx: UIContext, form: Form) -> tuple[gr.Dropdown, gr.Button]:
    with gr.Row():
        names = ctx.embedding_names()
        embedding = form.register("embedding", gr.Dropdown(
            names, value=names[0] if names else None, label="Embedding", allow_custom_value=True, scale=6,
            info="The embedding to train (create one in the first tab). Its file is updated in place.",
        ))
        refresh = gr.Button("Refresh", scale=0, min_width=100, elem_classes="tinv-side-button")
    return embedding, refresh


def _main_settings(ctx: UIContext, form: Form, res: int) -> None:
    form.register("template", gr.Dropdown(
        template_choices(ctx), value="style_filewords", label="Prompt template", allow_custom_value=True,
        info=field_help(TrainConfig, "template"),
    ))
    form.add("learn_rate", "Learning rate (schedule)")
    with gr.Row():
        form.add("batch_size", "Batch size")
        form.add("gradient_accumulation", "Gradient accumulation")
        form.add("max_steps", "Max steps")
    with gr.Row():
        form.add("width", "Width", slider=True, step=8, value=res)
        form.add("height", "Height", slider=True, step=8, value=res)
    with gr.Row():
        form.add("preview_every", "Preview every N steps")
        form.add("save_every", "Save a copy every N steps")
    with gr.Row():
        form.add("preview_prompt", "Preview prompt", scale=3)
        form.add("preview_seed", "Preview seed", scale=1)


def _advanced_settings(ctx: UIContext, form: Form) -> None:
    with gr.Row():
        form.add("keep_size", "Do not resize images")
        form.add("flip", "Random horizontal flip")
        form.add("use_alpha_weight", "Alpha channel as loss weight")
    with gr.Row():
        form.add("clip_grad_mode", "Gradient clipping")
        form.add("clip_grad_value", "Clip value")
        form.add("latent_sampling", "Latent sampling")
    with gr.Row():
        form.add("shuffle_tags", "Shuffle tags")
        form.add("tag_dropout", "Tag dropout", slider=True, step=0.05)
    with gr.Row():
        form.add("filename_regex", "Filename regex")
        form.add("filename_join", "Filename join string")
    form.add("preview_negative_prompt", "Preview negative prompt")
    with gr.Row():
        form.register("preview_sampler", gr.Dropdown(list(SAMPLERS), value="Euler a", label="Preview sampler",
                                                     info=field_help(TrainConfig, "preview_sampler")))
        form.add("preview_steps", "Preview steps", slider=True)
        form.add("preview_cfg", "Preview CFG scale", slider=True, step=0.5)
    with gr.Row():
        form.add("seed", "Training seed")
        form.add("write_csv_every", "Write loss CSV every N steps")
        form.add("log_dir", "Log folder")
    with gr.Row():
        form.add("save_optimizer_state", "Save optimizer state (.optim)")
        form.add("gradient_checkpointing", "Gradient checkpointing")
        form.add("save_image_with_stored_embedding", "Save images with embedding in PNG chunks")
    with gr.Row():
        form.add("xformers", "xformers attention", value=ctx.xformers)
        form.add("compile", "torch.compile")


def _embedding_update(ctx: UIContext, select: str | None = None) -> Any:
    ctx.refresh_library()
    names = ctx.embedding_names()
    return gr.Dropdown(choices=names, value=select) if select else gr.Dropdown(choices=names)


def interrupt_training(ctx: UIContext) -> str:
    """Ask the running job to stop; it saves the embedding at its current step."""
    job = ctx.runner.current
    if job is None or job.snapshot().status != JobStatus.RUNNING:
        gr.Warning("No training is running.")
        return gr.skip()
    job.stop()
    return "Interrupting: the embedding is saved at the current step."


def job_view(ctx: UIContext, seen: dict) -> list[Any]:
    """Updates for [progress, gallery, plot, saved, message, last_prompt, newest, seen]; unchanged parts are skipped."""
    job = ctx.runner.current
    if job is None:
        return [gr.skip()] * 7 + [seen]
    snap = job.snapshot()
    # The label holds the phase and the ETA, which change between steps (a preview, a save, the countdown).
    now = {"job": id(job), "status": snap.status, "step": snap.step, "label": _progress_label(snap),
           "previews": len(snap.previews), "saved": display_path(snap.last_saved) if snap.last_saved else "",
           "message": snap.message, "prompt": snap.prompt}

    def changed(*keys: str) -> bool:
        return any(seen.get(k) != now[k] for k in ("job", *keys))

    return [
        progress_html(snap.step, snap.total, now["label"], snap.status.value) if changed("status", "label")
        else gr.skip(),
        _gallery_value(snap.previews) if changed("previews") else gr.skip(),
        loss_frame(list(snap.losses)) if changed("step") else gr.skip(),
        now["saved"] if changed("saved") else gr.skip(),
        snap.message if changed("message", "status") else gr.skip(),
        snap.prompt if changed("prompt") else gr.skip(),
        _newest_value(snap.previews) if changed("previews") else gr.skip(),
        now,
    ]


def _progress_label(snap) -> str:
    """'emb: step 40/400 · ETA 1:23 · loss 0.1234 · rendering preview at step 40' while running (the ETA counts
    the previews and saves to come); the status instead of ETA and phase once the run ended."""
    head = f"{snap.name}: step {snap.step}/{snap.total}"
    loss = f" · loss {snap.losses[-1][1]:.4f}" if snap.losses else ""
    if snap.status == JobStatus.RUNNING:
        eta = f" · ETA {format_duration(snap.eta)}" if snap.eta is not None else ""
        phase = f" · {snap.phase}" if snap.phase else ""
        return f"{head}{eta}{loss}{phase}"
    return f"{head} · {snap.status.value}{loss}"


def _newest_value(previews: list[Path]) -> Any:
    """The newest preview, large, labelled with its step (hidden until a run has one)."""
    if not previews:
        return gr.Image(value=None, visible=False)
    newest = Path(previews[-1])
    return gr.Image(value=str(newest), label=f"Newest preview: {preview_caption(newest)}", visible=True)


def _gallery_value(previews: list[Path]) -> list[tuple[str, str]]:
    newest = list(previews)[-MAX_GALLERY:][::-1]
    return [(str(p), preview_caption(Path(p))) for p in newest]
