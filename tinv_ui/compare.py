"""Step comparison: one image per saved copy of a training run, same prompt and seed, as one labelled grid.

This is how people choose the best step: A1111 users build it by hand with the X/Y plot script
(`scripts/xyz_grid.py`), one column per `<name>-<N>` copy. Here the Train panel's "Compare steps" view does it:

1. `compare_steps` checks the request (the run's copies, at most `MAX_CELLS`, the prompt uses the embedding)
   and reads every chosen copy before drawing anything, so a bad file is refused at once;
2. each copy is rendered under the studio lock with `generation.render`, exactly as Generate would draw it
   with that copy's vectors under the embedding's name (one image per lock hold, so training steps and
   other requests interleave);
3. the cells are laid out with a "step N" label above each (A1111's `images.draw_grid_annotations`) and the
   grid is saved atomically under `outputs/compare/` with an A1111 infotext that names the run and the steps.

It yields `Step` per denoising step (across all cells), one `Generated` per cell and a final `Compared`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from . import formats, generation, runs, sdxl
from .config import GenerateConfig, Paths
from .embedding import Embedding
from .errors import ConfigError, TinvError
from .events import Compared, Generated, Step
from .fileio import disk_full_is_said, file_sha256
from .library import fit_problem
from .runs import RunRecord, list_runs
from .tokens import PromptTokenizer

if TYPE_CHECKING:
    from .library import EmbeddingLibrary
    from .studio import Studio

MAX_CELLS = 16  # copies in one grid: 16 cells of 1024 px are already a 8192 px wide image
MAX_COLUMNS = 8
FOLDER = "compare"  # outputs/compare/


@dataclass(frozen=True)
class _Copy:
    step: int
    path: Path
    embedding: Embedding
    hash: str


def compare_steps(studio: Studio, run: RunRecord, steps: Sequence[int], cfg: GenerateConfig,
                  library: EmbeddingLibrary, paths: Paths, stop: threading.Event | None = None,
                  ) -> Iterator[Step | Generated | Compared]:
    """Render `cfg` once per chosen copy of `run` with one seed, then save the labelled grid.

    `cfg`'s batch settings are ignored (one image per copy); a seed of -1 is drawn once for every cell.
    Setting `stop` ends the comparison after the current denoising step: the cells already drawn are
    still composed and saved (`Compared.interrupted`).
    """
    chosen = check_steps(run, steps)
    generation.check_clip_skip(studio, cfg.clip_skip)
    # 1. The other embeddings of the library stay usable in the prompt; the run's own name is the copy.
    library.rescan_for(studio)
    others = sdxl.library_pairs(library) if studio.is_sdxl else library.vectors()
    others = {n: v for n, v in others.items() if n.lower() != run.name.lower()}
    hashes = library.hashes()
    copies = [_read_copy(studio, run, step) for step in chosen]
    _check_prompt_uses(studio, cfg.prompt, run.name, {**others, run.name: _vectors(copies[0].embedding)})
    cfg = replace(cfg, seed=generation.resolve_seed(cfg.seed), batch_size=1, batch_count=1, save=False)
    pipeline = studio.pipeline  # every cell must come from the model the copies were checked against

    # 2. One cell per copy, each under the lock; steps are counted across the whole grid for the progress bar.
    total, t0 = len(copies) * cfg.steps, time.perf_counter()
    cells: list[tuple[int, Image.Image]] = []
    interrupted = False
    for i, copy in enumerate(copies):
        if stop is not None and stop.is_set():
            interrupted = True
            break
        vectors = {**others, run.name: _vectors(copy.embedding)}
        rendered = None
        what = f"comparing steps of {run.name}: step {copy.step} ({i + 1}/{len(copies)})"
        with studio.session(what=what), contextlib.closing(generation._render_streaming(
                studio, cfg, vectors, {**hashes, run.name: copy.hash})) as items:
            if studio.pipeline is not pipeline:  # a model was loaded between two cells
                raise TinvError("the model was changed during the step comparison, so its images would not be "
                                "comparable; nothing was saved. Render the comparison again.")
            for item in items:
                if isinstance(item, tuple):
                    done = i * cfg.steps + round(item[0] / item[1] * cfg.steps)
                    elapsed = time.perf_counter() - t0
                    yield Step(done, total, elapsed, elapsed / done * (total - done) if done else None)
                    if stop is not None and stop.is_set():
                        break  # closing the stream stops the render at its next step, still under the lock
                else:
                    rendered = item[0]
        if rendered is None:
            interrupted = True
            break
        cells.append((copy.step, rendered.image))
        yield Generated((rendered.image,), (rendered.infotext,), (rendered.seed,))

    # 3. The grid, saved outside the lock (disk writes need no GPU).
    if not cells:
        yield Compared((), cfg.seed, None, "", None, interrupted)
        return
    done_steps = tuple(step for step, _ in cells)
    grid = compose_grid([image for _, image in cells], [f"step {step}" for step in done_steps])
    text = grid_infotext(studio, cfg, run, [c for c in copies if c.step in done_steps], paths)
    path = next_grid_path(paths, run.name)
    with disk_full_is_said(path, "free some space and render the comparison again."):
        generation.save_png(grid, path, text)
    yield Compared(done_steps, cfg.seed, grid, text, path, interrupted)


# -- the request -------------------------------------------------------------------------------------------
def runs_with_copies(root: Path) -> list[RunRecord]:
    """The runs under `root` that saved at least one copy, newest first."""
    return [run for run in list_runs(root) if run.copies]


def find_run(root: Path, key: str | None) -> RunRecord:
    """The listed run with copies named `key` (`runs.run_key`), else a `ConfigError`: a client's choice is looked
    up in the listing (`runs.find_run`), never opened as a path."""
    run = runs.find_run(root, key)
    if run is None or not run.copies:
        raise ConfigError(f"run {key!r} is not among the training runs with saved copies in {root}; "
                          "refresh the list and pick one.")
    return run


def check_steps(run: RunRecord, steps: Sequence[Any]) -> list[int]:
    """The chosen steps, sorted: each one a copy of `run`, at least one and at most `MAX_CELLS`."""
    try:
        chosen = sorted({int(s) for s in steps})
    except (TypeError, ValueError):
        raise ConfigError("steps: pick steps from the list of the run's saved copies.") from None
    if not chosen:
        raise ConfigError("steps: none chosen; tick at least one saved step to compare.")
    if len(chosen) > MAX_CELLS:
        raise ConfigError(f"steps: {len(chosen)} chosen; one grid holds at most {MAX_CELLS}. Untick some "
                          "(every second or third step still shows the trend).")
    missing = [s for s in chosen if s not in run.copies]
    if missing:
        raise ConfigError(f"steps: {', '.join(map(str, missing))} not saved by run {run.name} "
                          f"(it has {_some(run.copies)}).")
    return chosen


def _some(steps: Sequence[int], shown: int = 8) -> str:
    """'500, 1000, …, 3000 (12 copies)' for a message: a run may hold hundreds of copies."""
    steps = list(steps)
    if len(steps) <= shown:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:shown - 1]))}, …, {steps[-1]} ({len(steps)} copies)"


def default_steps(available: Sequence[int], limit: int = MAX_CELLS) -> list[int]:
    """All saved steps, or `limit` of them evenly spaced from the first to the last."""
    steps = sorted(available)
    if len(steps) <= limit:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (limit - 1))] for i in range(limit)})


def default_prompt(run: RunRecord) -> str:
    """The run's preview prompt when it names the embedding, else 'a photo of <name>'."""
    prompt = run.settings.get("preview_prompt")
    if isinstance(prompt, str) and run.name.lower() in prompt.lower():
        return prompt
    return f"a photo of {run.name}"


def _read_copy(studio: Studio, run: RunRecord, step: int) -> _Copy:
    path = run.copies[step]
    try:
        emb = formats.read(path)
    except TinvError as e:
        raise ConfigError(f"steps: the copy for step {step} cannot be used: {e}") from None
    if problem := fit_problem(emb, studio.embedding_width, studio.embedding_parts):  # the library's own rule
        model = run.settings.get("model_name")
        trained_on = f" ({model})" if isinstance(model, str) and model else ""
        raise ConfigError(f"run {run.name}: its copy at step {step} cannot be used: {problem}. Load the model it "
                          f"was trained on{trained_on}.")
    return _Copy(step, path, emb, file_sha256(path)[:12])


def _vectors(emb: Embedding) -> Any:
    """What `generation.render` takes for one name: `[n, d]` vectors, or an SDXL {"clip_l", "clip_g"} pair."""
    return dict(emb.parts) if emb.is_sdxl else emb.vectors


def _check_prompt_uses(studio: Studio, prompt: str, name: str, vectors: Mapping[str, Any]) -> None:
    """Refuse a prompt in which `name` is not found as the encoder finds it (a longer name may hide it)."""
    counts = {n: int((v["clip_l"] if isinstance(v, Mapping) else v).shape[0]) for n, v in vectors.items()}
    if name not in PromptTokenizer(studio.tokenizer, counts)(prompt).used:
        raise ConfigError(f"prompt does not use the embedding {name!r}, so every cell would be the same image; "
                          f"put {name} in the prompt (for example 'a photo of {name}').")


# -- the grid ------------------------------------------------------------------------------------------------
def compose_grid(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """Cells left to right in rows of up to `MAX_COLUMNS`, each with its label centred in a band above it.

    The font size follows A1111's `draw_grid_annotations` ((width + height) // 25), at least 12 px.
    """
    width, height = images[0].size
    rows = math.ceil(len(images) / MAX_COLUMNS)
    columns = math.ceil(len(images) / rows)
    font_size = max(12, (width + height) // 25)
    band = int(font_size * 1.6)
    font = ImageFont.load_default(size=font_size)
    grid = Image.new("RGB", (columns * width, rows * (band + height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * width, (i // columns) * (band + height)
        draw.text((x + width / 2, y + band / 2), label, fill="black", font=font, anchor="mm")
        grid.paste(image.convert("RGB"), (x, y + band))
    return grid


def grid_infotext(studio: Studio, cfg: GenerateConfig, run: RunRecord, copies: Sequence[_Copy], paths: Paths) -> str:
    """The cells' infotext, with every copy in 'TI hashes' ('<name>-<N>: hash') and the run and its steps."""
    if studio.is_sdxl:
        cfg = replace(cfg, clip_skip=1)  # SDXL ignores clip skip, as `generation.render` writes it
    ti = generation.ti_hashes([f"{run.name}-{c.step}" for c in copies], {f"{run.name}-{c.step}": c.hash for c in copies})
    info = studio.info
    extra = {"Training run": _shown_folder(run.folder, paths),
             "Embedding steps": ", ".join(str(c.step) for c in copies)}
    return generation.infotext(cfg, cfg.seed, info.name if info else None, info.hash if info else None, ti,
                               extra=extra)


def _shown_folder(folder: Path, paths: Paths) -> str:
    """The run folder below the outputs folder ('train/2026-12-03/alpha'), or its own name."""
    try:
        return folder.relative_to(paths.outputs_dir).as_posix()
    except ValueError:
        return folder.name


def next_grid_path(paths: Paths, name: str, now: _dt.datetime | None = None) -> Path:
    """`outputs/compare/<name>-<YYYYmmdd-HHMMSS>.png`, numbered when that name is taken."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    # The name comes from the run's settings JSON, a file anyone may edit: only its safe characters reach a path.
    name = re.sub(r"[^\w. -]", "_", name)[:100].strip(". ") or "run"
    folder = paths.outputs_dir / FOLDER
    path, number = folder / f"{name}-{stamp}.png", 1
    while path.exists():
        number += 1
        path = folder / f"{name}-{stamp}-{number}.png"
    return path
