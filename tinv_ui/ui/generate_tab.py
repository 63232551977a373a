"""The "Generate" tab: widgets ↔ `GenerateConfig` → `generation.generate` events → gallery, progress, infotext.

The embeddings folder is rescanned before every generation (in the core) and the embedding list here
refreshes on a timer, on focus and on its button, so files dropped into embeddings/ appear without a
restart. During training a request waits for the current training step (the studio lock), never fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from .. import generation
from ..config import SAMPLERS, GenerateConfig
from ..events import Generated, Step, format_duration
from ..prompt_edit import insert_at
from .context import UIContext, library_report, progress_html
from .errors import user_errors
from .forms import Form

LIST_REFRESH_SECONDS = 3.0


@dataclass
class GenerateTab:
    form: Form
    insert: gr.Dropdown
    caret: gr.Textbox  # hidden: the prompt's selection "start,end" read in the browser when a name is picked
    refresh: gr.Button
    library_info: gr.Markdown
    button: gr.Button
    progress: gr.HTML
    gallery: gr.Gallery
    infotext: gr.Textbox
    seed_used: gr.Markdown
    infotexts: gr.State  # one infotext per gallery image, shown when the image is selected
    report_shown: gr.State  # the library report this browser tab shows (list refreshes send only changes)
    timer: gr.Timer

    @property
    def result_outputs(self) -> list:
        return [self.progress, self.gallery, self.infotext, self.seed_used, self.infotexts]


def build_generate_tab(ctx: UIContext) -> GenerateTab:
    """Build the tab (prompts, embedding picker, settings left, results right) and wire its events."""
    form = Form(GenerateConfig, "generate")
    with gr.Row():
        with gr.Column(scale=5):
            form.add("prompt", "Prompt", lines=3, placeholder="a photo of my-style", info=None)
            form.add("negative_prompt", "Negative prompt", lines=2, info=None)
        with gr.Column(scale=1, min_width=180):
            button = gr.Button("Generate", variant="primary", size="lg", elem_id="tinv-generate")
            seed_used = gr.Markdown("", elem_id="tinv-seed-used")
    with gr.Row():
        insert = gr.Dropdown(ctx.embedding_names(), value=None, label="Insert embedding", allow_custom_value=True, scale=4,
                             info="Pick one to put its name in the prompt at the cursor.", elem_id="tinv-insert-embedding")
        refresh = gr.Button("Refresh", scale=0, min_width=100, elem_classes="tinv-side-button")
    caret = gr.Textbox("", visible=False, elem_id="tinv-prompt-caret")
    report = library_report(ctx.library)
    library_info = gr.Markdown(report, elem_id="tinv-library-info")
    with gr.Row():
        with gr.Column(scale=4):
            _settings(form, ctx.native_resolution, ctx.compile)
        with gr.Column(scale=6):
            progress = gr.HTML(progress_html(0, 0, "Ready.", "idle"), elem_id="tinv-generate-progress")
            gallery = gr.Gallery(label="Images", format="png", columns=2, height=380, object_fit="contain", elem_id="tinv-gallery")
            infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False, buttons=["copy"],
                                  elem_id="tinv-infotext")
    tab = GenerateTab(form, insert, caret, refresh, library_info, button, progress, gallery, infotext, seed_used,
                      gr.State([]), gr.State(report), gr.Timer(LIST_REFRESH_SECONDS))
    _wire(ctx, tab)
    return tab


def _wire(ctx: UIContext, tab: GenerateTab) -> None:
    form = tab.form
    prompt = form.components["prompt"]

    @form.handler
    @user_errors
    def generate(data: dict):
        yield from run_generation(ctx, form.config(data), tab)

    def list_update(shown: str, force: bool = False) -> list[Any]:
        return embedding_list_update(ctx, shown, force)

    tab.button.click(generate, inputs=form.inputs, outputs=tab.result_outputs, concurrency_id="gpu", api_name="generate")
    prompt.submit(generate, inputs=form.inputs, outputs=tab.result_outputs, concurrency_id="gpu", api_visibility="private")
    tab.insert.input(insert_name, inputs=[prompt, tab.insert, tab.caret], outputs=[prompt, tab.insert, tab.caret],
                     js=READ_CARET, api_visibility="private").then(None, inputs=tab.caret, js=PLACE_CARET)
    tab.gallery.select(_selected_infotext, inputs=tab.infotexts, outputs=tab.infotext, api_visibility="private")
    list_outputs = [tab.insert, tab.library_info, tab.report_shown]
    for trigger in (tab.timer.tick, tab.insert.focus):
        trigger(list_update, inputs=tab.report_shown, outputs=list_outputs, show_progress="hidden", api_visibility="private")
    tab.refresh.click(lambda shown: list_update(shown, True), inputs=tab.report_shown, outputs=list_outputs,
                      api_name="refresh_embeddings")


def _settings(form: Form, res: int, compile_default: bool) -> None:
    form.register("sampler", gr.Dropdown(list(SAMPLERS), value="Euler a", label="Sampling method"))
    form.add("steps", "Sampling steps", slider=True)
    form.add("cfg_scale", "CFG scale", slider=True, step=0.5)
    form.add("seed", "Seed", info="-1 = random; the seed used is shown above.")
    with gr.Row():
        form.add("width", "Width", slider=True, step=8, value=res, info=None)
        form.add("height", "Height", slider=True, step=8, value=res, info=None)
    with gr.Row():
        form.add("batch_count", "Batch count", slider=True, info=None)
        form.add("batch_size", "Batch size", slider=True, info=None)
    with gr.Accordion("More", open=False):
        form.add("clip_skip", "Clip skip", slider=True)
        form.add("save", "Save images to outputs/txt2img")
        form.add("compile", "torch.compile the UNet", value=compile_default)


def run_generation(ctx: UIContext, cfg: GenerateConfig, tab: GenerateTab):
    """Drive `generation.generate`, yielding dict updates for the tab's result outputs."""
    if ctx.studio.busy_with:
        yield {tab.progress: progress_html(0, 1, f"Waiting for the model ({ctx.studio.busy_with})...", "running")}
    if generation.compiles(cfg, ctx.studio.device):
        yield {tab.progress: progress_html(0, 1, "Starting... torch.compile is on: a new image size or batch size "
                                                 "compiles first (about a minute on a GPU).", "running")}
    images: list[Any] = []
    infotexts: list[str] = []
    seeds: list[int] = []
    for event in generation.generate(ctx.studio, cfg, ctx.library, ctx.paths):
        match event:
            case Step(step=step, total=total, eta=eta):
                yield {tab.progress: progress_html(step, total, f"Step {step}/{total} · ETA {format_duration(eta)}")}
            case Generated():
                images += [str(p) for p in event.paths] if event.paths else list(event.images)
                infotexts += event.infotexts
                seeds += event.seeds
                yield {tab.gallery: images, tab.infotext: infotexts[0], tab.seed_used: _seed_text(seeds), tab.infotexts: infotexts}
    # The last update carries everything: API clients (gradio_client) only see the final one.
    yield {tab.progress: progress_html(1, 1, f"Done: {len(images)} image(s).", "finished"), tab.gallery: images,
           tab.infotext: infotexts[0] if infotexts else "", tab.seed_used: _seed_text(seeds) if seeds else "",
           tab.infotexts: infotexts}


def _seed_text(seeds: list[int]) -> str:
    """'Seed used: **N**' (and the last seed when a request made several images)."""
    return f"Seed used: **{seeds[0]}**" + (f" (to {seeds[-1]})" if len(seeds) > 1 else "")


# The prompt box keeps its selection when the picker takes the focus: read it as the name is picked, and put
# the caret after the inserted name afterwards, so a second pick lands after the first.
READ_CARET = """(prompt, name, caret) => {
  const box = document.querySelector("#tinv-generate-prompt textarea");
  return [prompt, name, box ? box.selectionStart + "," + box.selectionEnd : ""];
}"""
PLACE_CARET = """(caret) => {
  const box = document.querySelector("#tinv-generate-prompt textarea");
  const at = parseInt(caret, 10);
  if (box && at >= 0) { box.focus(); box.setSelectionRange(at, at); }
}"""


def insert_name(prompt: str, name: str | None, caret: str = "") -> tuple[Any, Any, Any]:
    """[prompt, picker, caret]: `name` put at the prompt's caret "start,end" (the end when unknown) with
    separators (`prompt_edit.insert_at`), the picker reset, the caret just after the name."""
    if not name:
        return gr.skip(), gr.skip(), gr.skip()
    start, end = _caret(caret)
    text, after = insert_at(prompt or "", name, start, end)
    return text, gr.Dropdown(value=None), str(after)


def _caret(caret: str) -> tuple[int | None, int | None]:
    """(start, end) from the browser's "start,end"; (None, None) when it is missing or not two numbers."""
    parts = str(caret or "").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) < 10 for p in parts):
        return None, None
    return int(parts[0]), int(parts[1])


def embedding_list_update(ctx: UIContext, shown: str, force: bool = False) -> list[Any]:
    """[dropdown, report, report] after a rescan; skipped (no redraw) when this session already shows it."""
    ctx.refresh_library(force=force)
    report = library_report(ctx.library)
    if report == shown and not force:
        return [gr.skip(), gr.skip(), shown]
    return [gr.Dropdown(choices=ctx.embedding_names()), report, report]


def _selected_infotext(infotexts: list[str], evt: gr.SelectData) -> Any:
    return infotexts[evt.index] if 0 <= evt.index < len(infotexts) else gr.skip()
