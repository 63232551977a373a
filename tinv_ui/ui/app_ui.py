"""`build_ui`: the whole page (header with model picker, three tabs) wired to one `UIContext`.

Nothing is built at import time. Cross-tab wiring lives here: after Create or a model load, every
embedding dropdown on the page is refreshed (and the new embedding selected for training).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from .. import __version__
from ..config import Paths
from ..confine import Confinement, is_loopback
from ..jobs import TrainingRunner
from ..library import EmbeddingLibrary
from ..studio import Studio
from .context import CSS, HEAD, UIContext, library_report
from .create_tab import build_create_tab
from .generate_tab import GenerateTab, build_generate_tab
from .model_picker import build_model_picker, page_model_state, wire_load
from .server_guard import ServerGuard
from .train_form_state import fill_on_page_load
from .train_tab import TrainTab, build_train_tab

TITLE = "tinv-ui: Textual Inversion"


def build_ui(studio: Studio, library: EmbeddingLibrary, runner: TrainingRunner, paths: Paths, *, xformers: bool = False, compile: bool = False,
             allow_dirs: Iterable[str | Path] = ()) -> gr.Blocks:
    """The app's Blocks for this studio/library/runner. Queue and launch with `launch()`.

    Paths typed into the page are confined to the app's folders plus `allow_dirs` (app.py --allow-dir).
    """
    ctx = UIContext(studio, library, runner, paths, xformers=xformers, compile=compile,
                    confinement=Confinement.for_app(paths, allow_dirs))
    ctx.refresh_library()
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nCreate, train and use embeddings · v{__version__}", elem_id="tinv-header")
        picker = build_model_picker(ctx)
        with gr.Tabs():
            with gr.Tab("Create embedding", id="create", elem_id="tinv-create-tab"):
                create = build_create_tab(ctx)
            with gr.Tab("Train", id="train", elem_id="tinv-train-tab"):
                train = build_train_tab(ctx)
            with gr.Tab("Generate", id="generate", elem_id="tinv-generate-tab"):
                generate = build_generate_tab(ctx)

        def sync_embeddings(select: str | None = None) -> list[Any]:
            return embedding_updates(ctx, train, generate, select)

        outputs = [train.embedding, generate.insert, generate.library_info]
        sizes = [train.form.components[k] for k in ("width", "height")] + [generate.form.components[k] for k in ("width", "height")]
        # A page opened (or reloaded) later gets today's embeddings, with the running job's one selected, and
        # the model loaded now: picker, status line and width/height at its native size.
        page_loaded = demo.load(lambda: sync_embeddings(_embedding_to_select(ctx)) + list(page_model_state(ctx))
                  + [ctx.native_resolution] * 4,
                  outputs=outputs + [picker.dropdown, picker.status] + sizes, api_visibility="private")
        fill_on_page_load(ctx, train, page_loaded)  # then the Train form shows that embedding's settings
        create.event.success(sync_embeddings, inputs=create.created, outputs=outputs, api_visibility="private")
        train.runs.used_event.success(sync_embeddings, inputs=train.runs.used, outputs=outputs, api_visibility="private")
        wire_load(ctx, picker).success(
            lambda: sync_embeddings() + [ctx.native_resolution] * 4, outputs=outputs + sizes, api_visibility="private"
        )
    return demo


def _embedding_to_select(ctx: UIContext) -> str | None:
    """The running (or last) job's embedding when it still exists, else the first name."""
    names = ctx.embedding_names()
    job = ctx.runner.current
    if job is not None and job.cfg.embedding in names:
        return job.cfg.embedding
    return names[0] if names else None


def embedding_updates(ctx: UIContext, train: TrainTab, generate: GenerateTab, select: str | None) -> list[Any]:
    """[train dropdown, generate dropdown, library report] after a rescan; `select` is chosen for training."""
    ctx.refresh_library()
    names = ctx.embedding_names()
    train_update = gr.Dropdown(choices=names, value=select) if select else gr.Dropdown(choices=names)
    return [train_update, gr.Dropdown(choices=names), library_report(ctx.library)]


def launch(
    demo: gr.Blocks,
    paths: Paths,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    prevent_thread_lock: bool = False,
) -> tuple[Any, str, str]:
    """Queue and launch `demo`: loopback by default; GPU events run one at a time (`concurrency_id="gpu"`).

    `ServerGuard` sits in front of Gradio: Host names are checked when bound to loopback (not with `share`,
    whose tunnel uses its own name), cross-site writes are refused and wrong logins are throttled.
    """
    demo.queue(default_concurrency_limit=1, max_size=64)
    guard = Middleware(ServerGuard, check_host=is_loopback(host) and not share, port=port)
    return demo.launch(
        app_kwargs={"middleware": [guard]},
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        prevent_thread_lock=prevent_thread_lock,
        theme=gr.themes.Soft(),
        css=CSS,
        head=HEAD,
        footer_links=["api", "settings"],
        # Previews, saved images and uploaded datasets live here; Gradio serves only allowed folders.
        allowed_paths=[str(paths.outputs_dir.resolve())],
        show_error=False,
        quiet=True,
    )
