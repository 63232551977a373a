"""The header's model picker: checkpoints found in models/ plus the clearly labeled tiny test model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..config import ModelSpec
from ..confine import looks_like_path
from ..errors import BusyError, ModelLoadError
from ..sdxl import width_label
from ..studio import Studio, list_models
from ..tiny_model import TINY_LABEL, TINY_SDXL, TINY_SDXL_LABEL
from .context import UIContext
from .errors import user_errors

TINY = "tiny"


@dataclass
class ModelPicker:
    dropdown: gr.Dropdown
    refresh: gr.Button
    load: gr.Button
    status: gr.Markdown


def model_choices(ctx: UIContext) -> list[tuple[str, str]]:
    """(label, value) pairs: every checkpoint/diffusers folder in models/, then the tiny test models."""
    choices = [(name, name) for name in list_models(ctx.paths.models_dir)]
    current = current_source(ctx)
    if current and current != TINY and current not in {v for _, v in choices}:
        choices.insert(0, (current, current))  # loaded from a path or hub id outside models/
    return choices + [(TINY_LABEL, TINY), (TINY_SDXL_LABEL, TINY_SDXL)]


def current_source(ctx: UIContext) -> str | None:
    """The picker value of the loaded model (its name relative to models/ when it lives there)."""
    spec = ctx.studio.spec
    if spec is None:
        return None
    if spec.is_tiny:
        return TINY
    path = Path(spec.source)
    try:
        return str(path.resolve().relative_to(ctx.paths.models_dir.resolve()))
    except ValueError:
        return spec.source


def model_status(ctx: UIContext) -> str:
    """One line: which model is loaded, its family, where, in which dtype, at which native size; then the last
    failed load, if any (e.g. a broken `--model` the app started without)."""
    studio = ctx.studio
    failed = f"  \n⚠ Not loaded: {studio.load_error}" if studio.load_error else ""
    if studio.info is None:
        return "No model loaded: pick one and press **Load**." + failed
    info = studio.info
    note = " (random weights: images are noise, for testing only)" if info.is_tiny else f" ({info.kind})"
    return (f"Loaded **{info.label}**{note} on {studio.device} · {str(studio.dtype).removeprefix('torch.')} · "
            f"native {info.resolution}px · embeddings {width_label(studio.pipeline)}{failed}")


def page_model_state(ctx: UIContext) -> tuple[gr.Dropdown, str]:
    """What a page shows of the loaded model when it is opened or reloaded: the picker set to it (with
    today's choices) and the status line. Built at page load, not at app start, so a model loaded since then
    (from any tab) is the one shown."""
    return gr.Dropdown(choices=model_choices(ctx), value=current_source(ctx)), model_status(ctx)


def build_model_picker(ctx: UIContext) -> ModelPicker:
    """The model row: dropdown, refresh, Load button and a status line."""
    with gr.Row():
        dropdown = gr.Dropdown(
            model_choices(ctx), value=current_source(ctx), label="Model", allow_custom_value=True, scale=6,
            elem_id="tinv-model-picker",
            info="Checkpoints (.safetensors/.ckpt) and diffusers folders in models/, or a path or hub id.",
        )
        refresh = gr.Button("Refresh", scale=0, min_width=110, elem_classes="tinv-side-button")
        load = gr.Button("Load", variant="primary", scale=0, min_width=110, elem_classes="tinv-side-button")
    status = gr.Markdown(model_status(ctx), elem_id="tinv-model-status")

    refresh.click(lambda: gr.Dropdown(choices=model_choices(ctx)), outputs=dropdown, api_name="refresh_models")
    return ModelPicker(dropdown, refresh, load, status)


def loading_message(ctx: UIContext, source: str | None) -> str:
    """What the status line says the moment Load is pressed (a checkpoint can take a minute to load)."""
    if not source or ctx.training_running():
        return model_status(ctx)  # the load itself refuses with the reason
    label = {TINY: TINY_LABEL, TINY_SDXL: TINY_SDXL_LABEL}.get(source, source)
    return f"Loading **{label}**… a checkpoint can take a minute; the current model stays loaded if this fails."


def load_model(ctx: UIContext, source: str | None) -> str:
    """Load `source` into the studio (refused while training: the run would continue on another model)."""
    if not source:
        raise ModelLoadError("No model selected: pick a checkpoint from models/ or the tiny test model.")
    if ctx.training_running():
        raise BusyError("Training is running; interrupt it before switching models.")
    check_model_source(ctx, source)
    ctx.studio.load(ModelSpec(source))
    if ctx.xformers:
        enable_xformers(ctx.studio)
    ctx.refresh_library(force=True)
    return model_status(ctx)


def check_model_source(ctx: UIContext, source: str) -> None:
    """Refuse a model path outside the folders web requests may use; the tiny models and hub ids pass.

    The path checked is the one `Studio.load` opens: `source` itself, else `source` inside models/.
    """
    if source in (TINY, TINY_SDXL):
        return
    path = Path(source)
    if not path.exists() and (ctx.paths.models_dir / source).exists():
        path = ctx.paths.models_dir / source
    owner, _, repo = source.partition("/")
    hub_id = bool(owner and repo) and not looks_like_path(owner) and not looks_like_path(repo)
    if hub_id and not path.exists():
        return
    ctx.confine(path.absolute(), "model")


def enable_xformers(studio: Studio) -> bool:
    """Use xformers attention for the loaded model when CUDA and xformers are available; False otherwise."""
    return studio.set_attention(xformers=True)


def wire_load(ctx: UIContext, picker: ModelPicker):
    """Wire the Load button; returns the load event so the app can chain dropdown refreshes after it.

    The status line says "Loading …" at once (no queue), then shows the loaded model, or, when the load
    fails, the model that is still loaded with the reason the other was not (the error is also a toast), and
    the picker goes back to the loaded model: it never shows a model that is not the one in use.
    """
    shown = picker.load.click(lambda source: loading_message(ctx, source), inputs=picker.dropdown,
                              outputs=picker.status, queue=False, api_visibility="private")
    event = shown.then(
        user_errors(lambda source: load_model(ctx, source)),
        inputs=picker.dropdown,
        outputs=picker.status,
        concurrency_id="gpu",
        api_name="load_model",
    )
    event.failure(lambda: page_model_state(ctx), outputs=[picker.dropdown, picker.status], queue=False,
                  api_visibility="private")
    return event
