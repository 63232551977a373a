"""The Train panel's dataset area: one upload area (files, or a whole folder) and, under the Dataset folder
field, a preview of what a run with the form's settings will use (core: `tinv_ui/dataset_preview.py`).

The preview is rebuilt when the folder, the embedding, the template, the filename regex/join or the size
settings change (and on its button). A trigger whose settings and folder listing (names, sizes, times) are the
ones the page already shows costs that listing, not a new read of the images.
Everything shown comes from file names and captions anyone may write: it is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..config import TrainConfig
from ..dataset_preview import MAX_THUMBNAILS, TIME_LIMIT_SECONDS, DatasetPreview, folder_listing, preview_dataset
from ..errors import ConfigError, TinvError
from ..fileio import display_path
from ..library import printable
from ..uploads import receive_uploads
from .context import UIContext, md_text
from .errors import user_errors
from .forms import Form

MAX_IGNORED_SHOWN = 50  # names in the upload note and the preview's ignored list; the rest are counted
# The form fields the preview depends on, in the order the handler takes them (after the embedding).
PREVIEW_FIELDS = ("dataset_dir", "template", "filename_regex", "filename_join", "width", "height", "keep_size")
FOLDERS_NOTE = ("Drop image files and their `.txt` captions (same name as the image) below, or choose a whole "
                "folder with the button. "
                "**Subfolders are flattened**: every file of a chosen folder goes into one dataset folder in "
                "`outputs/datasets/` (same names get -1, -2); uploading the same files again reuses that folder. "
                "Captions alone (.txt only) go beside their images in the current dataset folder. "
                "A folder typed below is read without its subfolders.")


@dataclass
class DatasetArea:
    files: gr.File  # the drop zone: files and captions
    folder: gr.UploadButton  # a whole folder (the browser's folder picker)
    note: gr.Markdown  # what the last upload did
    preview: gr.HTML
    refresh: gr.Button
    shown: gr.State  # what the preview shows (settings and the folder's listing): unchanged → no new read


def build_upload_area(form: Form) -> DatasetArea:
    """The upload area, the Dataset folder field and the preview under it (wired by `wire_dataset_area`)."""
    with gr.Group(elem_id="tinv-dataset-area"):
        gr.Markdown(f"**Training images.** {FOLDERS_NOTE}", elem_id="tinv-upload-help", padding=True)
        with gr.Row(equal_height=True):
            files = gr.File(file_count="multiple", file_types=["image", ".txt"], height=140, scale=3,
                            label="Images and .txt captions", elem_id="tinv-upload-files")
            # The column holds the button's hidden file input too (a sibling of the button, not inside it).
            with gr.Column(scale=1, min_width=140, elem_id="tinv-upload-folder"):
                folder = gr.UploadButton("📁 Choose a folder…", file_count="directory", size="md",
                                         elem_id="tinv-upload-folder-button")
        form.add("dataset_dir", "Dataset folder", placeholder="/path/to/images",
                 info="Filled in by an upload; or type a folder on this machine.")
    note = gr.Markdown("", elem_id="tinv-upload-note")
    with gr.Accordion("Dataset preview: what training will use", open=True, elem_id="tinv-dataset-preview-box"):
        preview = gr.HTML(_message("Upload images or type a dataset folder to see what training will use."),
                          elem_id="tinv-dataset-preview", css_template=PREVIEW_CSS, js_on_load=None,
                          max_height=460)
        refresh = gr.Button("Refresh preview", size="sm", elem_id="tinv-dataset-preview-refresh")
    return DatasetArea(files, folder, note, preview, refresh, gr.State(None))


def wire_dataset_area(ctx: UIContext, form: Form, embedding: gr.Dropdown, area: DatasetArea,
                      check_paths: Callable[[UIContext, TrainConfig], None]) -> None:
    """Uploads fill the Dataset folder field; the preview follows the settings it depends on."""
    dataset_dir = form.components["dataset_dir"]

    @user_errors
    def upload(files: list[str] | None, name: str | None, current: str | None) -> tuple[Any, str, Any]:
        if not files:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            imported = receive_uploads(files, ctx.paths.outputs_dir, label=name or "", current=current or "")
        except ConfigError as e:
            raise ConfigError(form.labelled(str(e))) from None  # "Dataset folder: dataset_dir: ..."
        return str(imported.folder), upload_note(imported), None  # None empties the drop zone for the next one

    def refresh(name: str | None, *values: Any, force: bool = False) -> tuple[Any, Any]:
        return preview_update(ctx, form, check_paths, name, dict(zip(PREVIEW_FIELDS, values[:-1])),
                              None if force else values[-1])

    settings = [embedding, *(form.components[f] for f in PREVIEW_FIELDS), area.shown]
    # One preview at a time for all its triggers (a read of the folder is CPU work); a burst of changes runs
    # the last one only.
    preview_events = dict(inputs=settings, outputs=[area.preview, area.shown], trigger_mode="always_last",
                          show_progress="minimal", concurrency_id="tinv-dataset-preview", api_visibility="private")
    for source in (area.files, area.folder):
        source.upload(upload, inputs=[source, embedding, dataset_dir], outputs=[dataset_dir, area.note, area.files],
                      api_visibility="private").then(refresh, **preview_events)
    for field in ("dataset_dir", "template", "keep_size"):
        form.components[field].change(refresh, **preview_events)
    for field in ("filename_regex", "filename_join"):
        form.components[field].blur(refresh, **preview_events)
        form.components[field].submit(refresh, **preview_events)
    for field in ("width", "height"):
        form.components[field].release(refresh, **preview_events)
    embedding.change(refresh, **preview_events)
    area.refresh.click(lambda *v: refresh(*v, force=True), **preview_events)


def upload_note(imported) -> str:
    """Markdown: where the upload went, what was kept, and the ignored files by name with the reason."""
    where = md_text(display_path(imported.folder))
    if imported.captions_only:
        text = f"Wrote {imported.captions} caption(s) beside their images in {where}."
    elif imported.reused:
        text = (f"Same files as an earlier upload ({imported.images} image(s), {imported.captions} caption(s)): "
                f"using {where} again, nothing copied.")
    else:
        text = f"Copied {imported.images} image(s) and {imported.captions} caption(s) to {where}."
    if imported.ignored:
        names = ", ".join(md_text(n) for n in imported.ignored[:MAX_IGNORED_SHOWN])
        more = f" and {len(imported.ignored) - MAX_IGNORED_SHOWN} more" if len(imported.ignored) > MAX_IGNORED_SHOWN else ""
        text += f" Ignored {len(imported.ignored)} file(s) ({md_text(imported.why_ignored)}): {names}{more}."
    if not imported.captions_only and not imported.images:
        text += " **No images: drop PNG, JPG, WebP or other image files to train on.**"
    return text


def preview_update(ctx: UIContext, form: Form, check_paths, name: str | None, values: dict[str, Any],
                   shown: Any) -> tuple[Any, Any]:
    """(preview HTML, what it shows) for these settings; `gr.skip()` when that is what the page already shows."""
    folder = str(values.get("dataset_dir") or "").strip()
    if not folder:
        return _message("Upload images or type a dataset folder to see what training will use."), None
    try:
        cfg = TrainConfig(embedding=(name or "").strip() or "preview", dataset_dir=folder,
                          template=str(values.get("template") or ""),
                          filename_regex=str(values.get("filename_regex") or ""),
                          filename_join=" " if values.get("filename_join") is None else str(values["filename_join"]),
                          width=int(values.get("width") or 0), height=int(values.get("height") or 0),
                          keep_size=bool(values.get("keep_size")))
        check_paths(ctx, cfg)  # confined like Start: nothing outside the app's folders is read
        key = [(name or "").strip(), *map(str, values.values()), folder_listing(cfg.dataset_dir)]
        if key == shown:
            return gr.skip(), shown
        return preview_html(preview_dataset(cfg, (name or "").strip())), key
    except TinvError as e:
        return _message(form.labelled(str(e)), error=True), None


def preview_html(preview: DatasetPreview) -> str:
    """The preview as HTML: a summary, thumbnails with file name, bucket and prompt, then the ignored files."""
    n = len(preview.images)
    lines = len(preview.images[0].prompts) if preview.images else 0
    buckets = ", ".join(f"{w}×{h} ({count})" for (w, h), count in preview.buckets.items())
    parts = [f'<p class="tinv-dp-summary"><b>{n} image{"s" * (n != 1)}</b> will be used'
             + (f" · size bucket{'s' * (len(preview.buckets) != 1)} {buckets}" if n else "")
             + f" · template <code>{_esc(preview.template)}</code>"
             + (f" ({lines} lines: each time an image is used one is picked at random; the first is shown, "
                "hover for all)" if lines > 1 else "") + "</p>"]
    if not n:
        parts.append('<p class="tinv-dp-error">No usable image: training would stop here. See why below.</p>')
    figures = [_figure(item) for item in preview.images if item.thumbnail is not None]
    parts.append(f'<div class="tinv-dp-grid">{"".join(figures)}</div>')
    if n > len(figures):
        parts.append(f'<p class="tinv-dp-more">… and {n - len(figures)} more image(s) (thumbnails for the first '
                     f"{MAX_THUMBNAILS} only).</p>")
    if not preview.complete:
        parts.append(f'<p class="tinv-dp-error">Stopped reading after {TIME_LIMIT_SECONDS:.0f} s: the files after '
                     "these are checked when training starts.</p>")
    if preview.skipped:
        shown = "".join(f"<li>{_esc(s)}</li>" for s in preview.skipped[:MAX_IGNORED_SHOWN])
        more = len(preview.skipped) - MAX_IGNORED_SHOWN
        parts.append(f'<div class="tinv-dp-ignored"><b>Ignored ({len(preview.skipped)})</b><ul>{shown}</ul>'
                     + (f"<p>… and {more} more.</p>" if more > 0 else "") + "</div>")
    return f'<div class="tinv-dp">{"".join(parts)}</div>'


def _figure(item) -> str:
    src = "data:image/jpeg;base64," + base64.b64encode(item.thumbnail).decode("ascii")
    w, h = item.bucket
    return (f'<figure class="tinv-dp-item"><img src="{src}" alt="{_esc(item.name)}">'
            f'<figcaption><span class="tinv-dp-name">{_esc(item.name)}</span>'
            f'<span class="tinv-dp-bucket">{w}×{h}</span>'
            f'<span class="tinv-dp-prompt" title="{_esc(chr(10).join(item.prompts))}">{_esc(item.prompts[0])}</span>'
            "</figcaption></figure>")


def _esc(text: str) -> str:
    return html.escape(printable(str(text)), quote=True)


def _message(text: str, error: bool = False) -> str:
    return f'<div class="tinv-dp"><p class="{"tinv-dp-error" if error else "tinv-dp-summary"}">{_esc(text)}</p></div>'


PREVIEW_CSS = """
.tinv-dp { font-size: 0.9em; }
.tinv-dp p { margin: 4px 0; }
.tinv-dp-error { color: var(--error-text-color, #b91c1c); }
.tinv-dp-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(132px, 1fr)); gap: 8px; }
.tinv-dp-item { margin: 0; border: 1px solid var(--border-color-primary); border-radius: 6px; padding: 4px;
  display: flex; flex-direction: column; gap: 2px; }
.tinv-dp-item img { width: 100%; height: 110px; object-fit: contain; background: var(--background-fill-secondary); }
.tinv-dp-item figcaption { display: flex; flex-direction: column; gap: 1px; line-height: 1.25; }
.tinv-dp-name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tinv-dp-bucket { color: var(--body-text-color-subdued); }
.tinv-dp-prompt { font-style: italic; overflow-wrap: anywhere; }
.tinv-dp-ignored ul { margin: 2px 0 0 1.2em; padding: 0; }
"""
