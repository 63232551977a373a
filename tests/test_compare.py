"""Step comparison (`tinv_ui.compare`): one cell per saved copy, each the image Generate draws with that copy,
under the lock one image at a time, saved as a labelled grid with infotext; refusals and interrupts."""

from __future__ import annotations

import datetime
import json
import re
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import wait_until
from PIL import Image

from tinv_ui import compare, formats, generation, runs
from tinv_ui.config import GenerateConfig, Paths
from tinv_ui.embedding import Embedding
from tinv_ui.errors import ConfigError, DiskFullError
from tinv_ui.events import Compared, Generated, Step
from tinv_ui.library import EmbeddingLibrary

CFG = GenerateConfig(prompt="a photo of alpha", negative_prompt="blurry", steps=2, width=64, height=64, seed=1234,
                     save=False)


def copy_vectors(width: int, step: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(step)) * 3


def write_run(paths, name: str, steps, width: int = 32, parts: tuple[int, int] | None = None, day="2026-12-03"):
    """A run folder as training leaves it: `<name>-<N>` copies and a settings JSON."""
    folder = runs.log_root(paths.outputs_dir) / day / name
    for step in steps:
        if parts:
            v = copy_vectors(sum(parts), step)
            emb = Embedding(f"{name}-{step}", parts={"clip_l": v[:, :parts[0]], "clip_g": v[:, parts[0]:]}, step=step)
            formats.write(emb, folder / "embeddings" / f"{name}-{step}.safetensors")
        else:
            formats.write(Embedding(f"{name}-{step}", copy_vectors(width, step), step=step),
                          folder / "embeddings" / f"{name}-{step}.pt")
    (folder / "settings-2026-12-03-10-00-00.json").write_text(json.dumps(
        {"embedding_name": name, "preview_prompt": f"a painting of {name}", "steps": max(steps)}))
    return runs.read_run(folder)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def cells_of(grid: Image.Image, n: int, size: int = 64) -> tuple[list[Image.Image], list[Image.Image]]:
    """(label bands, cells) of a one-row grid of `n` cells of `size` px."""
    band = grid.height - size
    cells = [grid.crop((i * size, band, (i + 1) * size, grid.height)) for i in range(n)]
    labels = [grid.crop((i * size, 0, (i + 1) * size, band)) for i in range(n)]
    return labels, cells


def run_all(studio, paths, run, steps, cfg=CFG, **kw):
    return list(compare.compare_steps(studio, run, steps, cfg, EmbeddingLibrary(paths.embeddings_dir), paths, **kw))


def test_each_cell_is_the_render_of_its_copy_with_the_seed_and_the_grid_is_saved_with_infotext(studio, paths):
    run = write_run(paths, "alpha", [2, 4, 6])
    # The library's own "alpha" (the final file) must not be what the cells draw: each cell uses its copy.
    formats.write(Embedding("alpha", copy_vectors(32, 99)), paths.embeddings_dir / "alpha.pt")
    events = run_all(studio, paths, run, [6, 2])
    assert [type(e).__name__ for e in events] == ["Step", "Step", "Generated"] * 2 + ["Compared"]
    assert [(e.step, e.total) for e in events if isinstance(e, Step)] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    result = events[-1]
    assert result.steps == (2, 6) and result.seed == 1234 and not result.interrupted

    on_disk = Image.open(result.path)
    assert result.path.parent == paths.outputs_dir / "compare" and result.path.name.startswith("alpha-")
    assert (on_disk.width, on_disk.height > 64) == (128, True)  # one row of two 64 px cells under their labels
    labels, cells = cells_of(on_disk, 2)
    for step, cell in zip((2, 6), cells):
        alone = generation.render(studio, CFG, {"alpha": copy_vectors(32, step)})[0].image
        assert np.array_equal(pixels(cell), pixels(alone)), f"cell of step {step}"
    assert np.abs(pixels(cells[0]) - pixels(cells[1])).max() > 10  # the copies differ, so do the cells
    for band in labels:
        assert pixels(band).min() < 100  # dark text on the white band
    assert not np.array_equal(pixels(labels[0]), pixels(labels[1]))  # "step 2" vs "step 6"

    text = on_disk.text["parameters"]
    assert text.startswith("a photo of alpha\nNegative prompt: blurry\nSteps: 2, ")
    assert "Seed: 1234," in text and 'Embedding steps: "2, 6"' in text
    assert "Training run: train/2026-12-03/alpha," in text
    hashes = [formats_hash(run.copies[s]) for s in (2, 6)]
    assert f'TI hashes: "alpha-2: {hashes[0]}, alpha-6: {hashes[1]}"' in text
    assert text == result.infotext


def formats_hash(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_the_lock_is_held_for_each_image_and_free_between_them(studio, paths):
    run = write_run(paths, "alpha", [2, 4])
    holders: list[str] = []
    hook = studio.pipeline.unet.register_forward_pre_hook(lambda module, args: holders.append(studio.busy_with))
    try:
        events = compare.compare_steps(studio, run, [2, 4], CFG, EmbeddingLibrary(paths.embeddings_dir), paths)
        for event in events:
            if isinstance(event, Generated):
                # Paused between two cells: another request (a training step, Generate) gets the lock now.
                with studio.session(timeout=0, what="someone else"):
                    holders.append(studio.busy_with)
    finally:
        hook.remove()
    first, second = "comparing steps of alpha: step 2 (1/2)", "comparing steps of alpha: step 4 (2/2)"
    cfg_passes = holders.count(first)
    assert cfg_passes >= 2 and holders == [first] * cfg_passes + ["someone else"] + [second] * cfg_passes + ["someone else"]
    assert studio.busy_with == ""


def test_stop_ends_at_the_next_step_keeps_the_cells_drawn_and_frees_the_lock(studio, paths):
    run = write_run(paths, "alpha", [2, 4, 6])
    stop = threading.Event()
    events = []
    for event in compare.compare_steps(studio, run, [2, 4, 6], replace(CFG, steps=4),
                                       EmbeddingLibrary(paths.embeddings_dir), paths, stop=stop):
        events.append(event)
        if isinstance(event, Step) and event.step == 5:  # the first step of the second cell
            stop.set()
    assert [type(e).__name__ for e in events] == ["Step"] * 4 + ["Generated", "Step", "Compared"]
    result = events[-1]
    assert result.interrupted and result.steps == (2,)
    assert studio.busy_with == ""
    saved = Image.open(result.path)
    assert saved.width == 64 and 'Embedding steps: 2,' in saved.text["parameters"]

    stop_at_once = threading.Event()
    stop_at_once.set()
    assert run_all(studio, paths, run, [2], stop=stop_at_once) == [Compared((), 1234, None, "", None, True)]


def test_a_model_loaded_between_two_cells_ends_the_comparison_unsaved(cache_dir, paths):
    from tinv_ui.config import ModelSpec
    from tinv_ui.errors import TinvError
    from tinv_ui.studio import Studio

    own = Studio(Paths(cache_dir=cache_dir))  # the session studio is shared: this one is reloaded
    own.load(ModelSpec("tiny"))
    run = write_run(paths, "alpha", [2, 4])
    events = compare.compare_steps(own, run, [2, 4], CFG, EmbeddingLibrary(paths.embeddings_dir), paths)
    assert next(e for e in events if isinstance(e, Generated))
    own.load(ModelSpec("tiny"))  # as the model picker does, between two cells
    with pytest.raises(TinvError, match="the model was changed during the step comparison"):
        list(events)
    assert not (paths.outputs_dir / "compare").exists() and own.busy_with == ""


def test_wrong_requests_are_refused_before_any_rendering(studio, paths):
    run = write_run(paths, "alpha", [2, 4])
    root = runs.log_root(paths.outputs_dir)
    with pytest.raises(ConfigError, match="prompt does not use the embedding 'alpha'"):
        run_all(studio, paths, run, [2], replace(CFG, prompt="a photo of a cat"))
    # A longer library name that swallows the run's name does not count as using it.
    formats.write(Embedding("alpha-style", copy_vectors(32, 1)), paths.embeddings_dir / "alpha-style.pt")
    with pytest.raises(ConfigError, match="prompt does not use"):
        run_all(studio, paths, run, [2], replace(CFG, prompt="alpha-style"))
    with pytest.raises(ConfigError, match=r"steps: 3 not saved by run alpha \(it has 2, 4\)"):
        run_all(studio, paths, run, [2, 3])
    with pytest.raises(ConfigError, match="steps: none chosen"):
        run_all(studio, paths, run, [])
    many = write_run(paths, "many", list(range(1, 18)))
    with pytest.raises(ConfigError, match="17 chosen; one grid holds at most 16"):
        run_all(studio, paths, many, list(range(1, 18)), replace(CFG, prompt="many"))
    wide = write_run(paths, "wide", [2], width=768)
    with pytest.raises(ConfigError, match="Load the model it was trained on"):
        run_all(studio, paths, wide, [2], replace(CFG, prompt="wide"))
    run.copies[4].write_bytes(b"not an embedding")
    with pytest.raises(ConfigError, match="the copy for step 4 cannot be used"):
        run_all(studio, paths, run, [2, 4])
    assert compare.find_run(root, "2026-12-03/alpha").folder == run.folder
    for key in ("../../etc", str(run.folder), "2026-12-03/nobody", None):
        with pytest.raises(ConfigError, match="is not among the training runs"):
            compare.find_run(root, key)
    assert not (paths.outputs_dir / "compare").exists() and studio.busy_with == ""


def test_defaults_and_a_grid_file_name_that_stays_in_outputs_compare(paths):
    assert compare.default_steps([5, 10, 15]) == [5, 10, 15]
    picked = compare.default_steps(list(range(100, 3100, 100)), limit=4)
    assert picked == [100, 1100, 2000, 3000]
    run = write_run(paths, "alpha", [2])
    assert compare.default_prompt(run) == "a painting of alpha"
    assert compare.default_prompt(replace(run, settings={"preview_prompt": "a cat"})) == "a photo of alpha"
    now = datetime.datetime(2026, 12, 3, 14, 5, 6)
    assert compare.next_grid_path(paths, "alpha", now) == paths.outputs_dir / "compare" / "alpha-20261203-140506.png"
    # A run's name comes from its settings JSON: whatever it holds, the grid goes to outputs/compare/.
    for hostile in ("../../evil", "/etc/x", "..", "a\\b\x00c"):
        path = compare.next_grid_path(paths, hostile, now)
        assert path.parent == paths.outputs_dir / "compare" and not path.name.startswith("."), hostile


def test_a_full_disk_is_said_and_leaves_no_file(studio, tmp_path, cache_dir):
    """A real full disk (a small tmpfs, as tests/test_disk_full.py mounts it; skipped where it cannot be)."""
    from test_disk_full import files_in, fill, mounted_tmpfs

    with mounted_tmpfs(tmp_path / "small", "size=1m") as disk:
        paths = Paths(disk / "embeddings", disk / "outputs", disk / "models", cache_dir)
        paths.embeddings_dir.mkdir()
        run = write_run(paths, "alpha", [2])
        first = run_all(studio, paths, run, [2])[-1].path
        before = first.read_bytes()
        fill(disk)
        with pytest.raises(DiskFullError, match="the disk is full while writing .*render the comparison again"):
            run_all(studio, paths, run, [2])
        assert first.read_bytes() == before
        assert files_in(paths.outputs_dir / "compare") == {first.name}  # no temp file, no half grid


def test_sdxl_copies_are_rendered_as_pairs(sdxl_studio, paths):
    parts = sdxl_studio.embedding_parts
    run = write_run(paths, "xl", [1, 3], parts=parts)
    cfg = replace(CFG, prompt="a photo of xl", clip_skip=2)
    result = run_all(sdxl_studio, paths, run, [1, 3], cfg)[-1]
    size = cfg.width
    _, cells = cells_of(Image.open(result.path), 2, size)
    for step, cell in zip((1, 3), cells):
        v = copy_vectors(sum(parts), step)
        alone = generation.render(sdxl_studio, cfg, {"xl": {"clip_l": v[:, :parts[0]], "clip_g": v[:, parts[0]:]}})[0]
        assert np.array_equal(pixels(cell), pixels(alone.image)), f"cell of step {step}"
    assert "Clip skip" not in result.infotext and 'Embedding steps: "1, 3"' in result.infotext
    wrong = write_run(paths, "flat", [1], width=32)
    with pytest.raises(ConfigError, match="Load the model it was trained on"):
        run_all(sdxl_studio, paths, wrong, [1], replace(cfg, prompt="flat"))


def test_the_api_takes_a_run_from_the_listing_only_and_answers_with_the_grid(studio, paths, tmp_path, monkeypatch):
    from gradio_client.exceptions import AppError
    from test_ui import serving

    run = write_run(paths, "alpha", [2, 4])
    request = {"run_key": "2026-12-03/alpha", "chosen": [2, 4], "prompt": "a photo of alpha", "negative_prompt": "",
               "sampler": "Euler a", "steps": 2, "cfg_scale": 7, "seed": 5, "width": 64, "height": 64}
    with serving(studio, paths, tmp_path, monkeypatch) as (client, _library, _runner):
        job = client.submit(**request, api_name="/compare_steps")
        progress, grid, saved, infotext = job.result(timeout=120)
        # The grid fills in as the images come: a one-cell grid is shown before the final two-cell one.
        sizes = [Image.open(out[1]).size for out in job.outputs() if isinstance(out[1], str)]  # dicts: unchanged
        assert (64, 64 + 19) in sizes and sizes[-1] == (128, 64 + 19), sizes
        for bad, message in (({"run_key": str(run.folder)}, "is not among the training runs"),
                             ({"run_key": "../../../etc"}, "is not among the training runs"),
                             ({"chosen": [3]}, "3 not saved by run alpha"),
                             ({"prompt": "a cat"}, "prompt does not use the embedding 'alpha'"),
                             ({"steps": 0}, "Sampling steps: steps is 0")):
            with pytest.raises(AppError, match=re.escape(message)) as info:
                client.predict(**{**request, **bad}, api_name="/compare_steps")
            assert "Traceback" not in str(info.value)
        # Stop (same browser tab: the same Gradio session) ends a long comparison; the cells drawn are saved.
        long = client.submit(**{**request, "steps": 150, "chosen": [2, 4], "width": 128, "height": 128},
                             api_name="/compare_steps")
        wait_until(lambda: studio.busy_with.startswith("comparing steps of alpha: step 2"), "the first cell renders")
        client.predict(api_name="/stop_compare")
        stopped = long.result(timeout=120)[0]
    assert "Stopped" in stopped and "Done" not in stopped  # before the first image, or after it on a fast machine
    assert "Done: 2 steps, seed 5; grid saved." in progress
    path = paths.outputs_dir / "compare" / saved.rsplit("/", 1)[-1]
    assert saved.endswith(f"compare/{path.name}") and Image.open(grid).size == Image.open(path).size == (128, 64 + 19)
    assert Image.open(path).text["parameters"] == infotext and 'Embedding steps: "2, 4"' in infotext
