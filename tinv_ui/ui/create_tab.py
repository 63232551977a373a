"""The "Create embedding" tab: widgets ↔ `CreateConfig` → `create.create_embedding`."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..config import CreateConfig
from ..errors import BusyError
from ..fileio import display_path
from .context import UIContext
from .errors import user_errors
from .forms import Form


@dataclass
class CreateTab:
    form: Form
    button: gr.Button
    status: gr.Textbox
    created: gr.State  # the new embedding's name, for the app to select it in every dropdown
    event: object  # the Create click, so the app can chain dropdown refreshes with `.success`


def build_create_tab(ctx: UIContext) -> CreateTab:
    """Name, initialization text, vectors per token, overwrite, format; Create; "Created: PATH"."""
    form = Form(CreateConfig, "create")
    with gr.Row():
        with gr.Column(scale=3):
            form.add("name", "Name", placeholder="my-style", info="File name without extension; also the word you type in prompts.")
            form.add("initializer", "Initialization text")
            form.add("num_vectors", "Number of vectors per token", slider=True)
            with gr.Row():
                form.add("overwrite", "Overwrite an existing embedding of the same name")
                form.add("file_format", "File format")
            button = gr.Button("Create embedding", variant="primary")
        with gr.Column(scale=2):
            status = gr.Textbox(label="Status", interactive=False, lines=2, buttons=["copy"], elem_id="tinv-create-status")
            gr.Markdown(
                "A new embedding starts from the vectors of its initialization text (`*` by default; empty = zeros). "
                "Train it in the **Train** tab, then type its name in a prompt in **Generate**."
            )
    created = gr.State("")

    @form.handler
    @user_errors
    def create(data: dict) -> tuple[str, str]:
        from ..create import create_embedding

        cfg = form.config(data)
        refuse_the_trained_embedding(ctx, cfg.name)
        path = create_embedding(ctx.studio, cfg, ctx.paths.embeddings_dir)
        ctx.refresh_library()
        return f"Created: {display_path(path)}", path.stem

    event = button.click(create, inputs=form.inputs, outputs=[status, created], concurrency_id="gpu", api_name="create_embedding")
    return CreateTab(form, button, status, created, event)


def refuse_the_trained_embedding(ctx: UIContext, name: str) -> None:
    """Refuse to create (or overwrite) the embedding a run is training: the run's next save would replace it."""
    job = ctx.runner.current
    if job is None:
        return
    snap = job.snapshot()
    if snap.status == "running" and name.strip().lower() == job.cfg.embedding.strip().lower():
        raise BusyError(f"name: {job.cfg.embedding!r} is being trained (the run at step {snap.step}/{snap.total}); "
                        "interrupt that run first, or choose another name.")
