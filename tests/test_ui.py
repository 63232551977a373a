"""The web UI in-process: helpers (uploads, forms, errors, app args) and a loopback round trip via gradio_client."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import app
from browser_app import free_port
from conftest import write_images
from tinv_ui.config import GenerateConfig
from tinv_ui.errors import BusyError, ConfigError, InvalidNameError
from tinv_ui.ui.errors import user_errors
from tinv_ui.ui.forms import Form
from tinv_ui.ui.generate_tab import insert_name
from tinv_ui.uploads import MANIFEST, import_uploads, safe_file_name


# -- uploads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cat.png", "cat.png"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\Windows\\x.PNG", "x.png"),
        ("sub/dir/a b (1).jpg", "a b (1).jpg"),
        ("<script>.png", "_script_.png"),
        ("..png", "_png"),
        (".hidden.png", "hidden.png"),
        ("a..b.png", "a_b.png"),
        ("..", "file"),
        ("", "file"),
        ("élan.webp", "élan.webp"),
    ],
)
def test_safe_file_name(raw, expected):
    assert safe_file_name(raw) == expected


def test_import_uploads_copies_images_and_captions_only(tmp_path):
    src = tmp_path / "browser"
    images = write_images(src / "one", 2, captions=True)
    dup = write_images(src / "two", 1)[0]  # same file name as images[0], from another "subfolder"
    (src / "evil.sh").write_text("rm -rf /")
    files = [*images, images[0].with_suffix(".txt"), dup, src / "evil.sh"]
    outputs = tmp_path / "outputs"
    result = import_uploads(files, outputs, label="../my emb")
    assert result.folder.parent == outputs / "datasets"
    assert result.folder.name.startswith("my_emb-")
    assert (result.images, result.captions, result.ignored) == (3, 1, ("evil.sh",))
    names = sorted(p.name for p in result.folder.iterdir() if p.name != MANIFEST)
    assert names == sorted([images[0].name, images[1].name, images[0].with_suffix(".txt").name,
                            images[0].stem + "-1.png"])
    assert (result.folder / images[0].name).read_bytes() == images[0].read_bytes()
    again = import_uploads(files[:1], outputs, label="../my emb")  # same second: a fresh folder, not a merge
    assert again.folder != result.folder


# -- forms, errors, small handlers ----------------------------------------------------------------------
def test_form_builds_config_and_names_api_parameters():
    with gr.Blocks():
        form = Form(GenerateConfig, "test")
        form.add("prompt", "Prompt")
        form.add("steps", "Steps", slider=True)
        form.add("cfg_scale", "CFG", slider=True)
    handler = form.handler(lambda values: form.config(values))
    cfg = handler("a cat", 12.0, 7)  # sliders send floats; ints are restored
    assert (cfg.prompt, cfg.steps, cfg.cfg_scale) == ("a cat", 12, 7.0) and isinstance(cfg.steps, int)
    assert list(__import__("inspect").signature(handler).parameters) == ["prompt", "steps", "cfg_scale"]
    with pytest.raises(ConfigError, match="steps is empty"):
        handler("a", None, 7)
    with pytest.raises(ConfigError, match="whole number"):
        handler("a", 2.5, 7)
    with pytest.raises(ConfigError, match="steps is 0"):
        handler("a", 0, 7)


def test_user_errors_turns_tinv_errors_into_readable_gr_errors():
    @user_errors
    def fails(kind: str):
        raise {"tinv": InvalidNameError("name 'a/b' contains '/'"), "bug": KeyError("x")}[kind]

    with pytest.raises(gr.Error) as info:
        fails("tinv")
    assert info.value.message == "name 'a/b' contains '/'"
    assert info.value.title == "Invalid Name"
    with pytest.raises(KeyError):  # bugs are not disguised as user errors
        fails("bug")

    @user_errors
    def stream():
        yield 1
        raise BusyError("The model is busy (training); wait for it or stop it.")

    gen = stream()
    assert next(gen) == 1
    with pytest.raises(gr.Error, match="busy"):
        next(gen)


def test_insert_name_appends_with_separator():
    assert insert_name("", "emb")[0] == "emb"
    assert insert_name("a cat", "emb")[0] == "a cat, emb"
    assert insert_name("a cat,", "emb")[0] == "a cat, emb"
    assert insert_name("(", "emb")[0] == "(emb"


def test_job_view_sends_only_what_changed(tmp_path):
    from dataclasses import replace

    from tinv_ui.jobs import JobSnapshot
    from tinv_ui.ui.train_tab import job_view

    class Job:
        snap = JobSnapshot(status="running", name="emb", step=3, total=10, eta=12.0, losses=[(1, 0.5), (2, 0.4), (3, 0.3)],
                           previews=[tmp_path / "emb-2.png"], last_saved=None, message="", log_dir=None,
                           phase="training", prompt="a photo of emb, red")

        def snapshot(self):
            return self.snap

    class Runner:
        current = Job()

    ctx = type("Ctx", (), {"runner": Runner()})()
    progress, gallery, plot, saved, message, prompt, newest, seen = job_view(ctx, {})
    assert "emb: step 3/10 · ETA 0:12 · loss 0.3000 · training" in progress
    assert gallery == [(str(tmp_path / "emb-2.png"), "step 2")]
    assert list(plot["step"]) == [1, 2, 3] and str(plot["loss"].dtype) == "float64"
    assert prompt == "a photo of emb, red"
    assert newest.visible and newest.label == "Newest preview: step 2" and newest.value["path"].endswith("emb-2.png")
    again = job_view(ctx, seen)
    assert all(isinstance(u, dict) and u.get("__type__") == "update" for u in again[:7])  # gr.skip() everywhere
    assert again[7] == seen
    # A preview starts: same step, but the label says so (and its ETA), nothing else is sent.
    Job.snap = replace(Job.snap, phase="rendering preview at step 3", eta=9.0)
    progress, *rest, seen = job_view(ctx, seen)
    assert "emb: step 3/10 · ETA 0:09 · loss 0.3000 · rendering preview at step 3" in progress
    assert all(isinstance(u, dict) and u.get("__type__") == "update" for u in rest)


def test_model_picker_lists_models_and_loads(paths):
    from tinv_ui.errors import ModelLoadError
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.studio import Studio
    from tinv_ui.tiny_model import TINY_LABEL, TINY_SDXL_LABEL
    from tinv_ui.ui.context import UIContext
    from tinv_ui.ui.model_picker import load_model, model_choices

    (paths.models_dir / "sd15.safetensors").write_bytes(b"x")
    (paths.models_dir / "diffusers-model").mkdir()
    (paths.models_dir / "diffusers-model" / "model_index.json").write_text("{}")

    class Runner:
        current = None

    ctx = UIContext(Studio(paths), EmbeddingLibrary(paths.embeddings_dir), Runner(), paths)
    assert model_choices(ctx) == [("diffusers-model", "diffusers-model"), ("sd15.safetensors", "sd15.safetensors"),
                                  (TINY_LABEL, "tiny"), (TINY_SDXL_LABEL, "tiny-sdxl")]
    with pytest.raises(ModelLoadError, match="No model selected"):
        load_model(ctx, "")
    status = load_model(ctx, "tiny")
    assert "tiny test model (random weights)" in status and "native 64px" in status
    assert ctx.native_resolution == 64


# -- app.py ------------------------------------------------------------------------------------------------
def test_app_passes_share_auth_xformers_and_compile_through(tmp_path, cache_dir, monkeypatch):
    import tinv_ui.ui
    import tinv_ui.ui.model_picker as model_picker

    launched, xformers_for = [], []
    monkeypatch.setattr(tinv_ui.ui, "launch", lambda demo, paths, host, port, **kw: launched.append((demo, paths, host, port, kw)))
    monkeypatch.setattr(model_picker, "enable_xformers", lambda studio: xformers_for.append(studio) or False)
    app.main(["--model", "tiny", "--share", "--xformers", "--compile", "--auth", "alice:s3:cret", "--host", "0.0.0.0",
              "--port", "7999", "--embeddings-dir", str(tmp_path / "e"), "--outputs-dir", str(tmp_path / "o"),
              "--models-dir", str(tmp_path / "m"), "--cache-dir", str(cache_dir)])
    [(demo, paths, host, port, kw)] = launched
    assert (host, port, kw) == ("0.0.0.0", 7999, {"share": True, "auth": ("alice", "s3:cret")})
    assert paths.embeddings_dir == tmp_path / "e" and (tmp_path / "o").is_dir() and (tmp_path / "m").is_dir()
    assert len(xformers_for) == 1 and xformers_for[0].info.is_tiny  # the startup model got xformers
    boxes = [b for b in demo.blocks.values() if isinstance(b, gr.Checkbox)]
    assert [b.value for b in boxes if b.label in ("torch.compile the UNet", "xformers attention")] == [True, True]


def test_app_binds_loopback_and_warns_when_exposed():
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert app.exposure_warning("127.0.0.1", False, None) is None
    assert app.exposure_warning("localhost", False, None) is None
    assert app.exposure_warning("::1", False, None) is None
    lan = app.exposure_warning("0.0.0.0", False, None)
    assert "exposed to the network (--host 0.0.0.0)" in lan and "--auth" in lan
    assert "the internet (--share)" in app.exposure_warning("127.0.0.1", True, "u:p")
    assert "--auth" not in app.exposure_warning("127.0.0.1", True, "u:p")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "nopassword"])


def test_compile_flag_ticks_the_generate_panel_box(studio, paths):
    from tinv_ui.jobs import TrainingRunner
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.ui import build_ui

    assert app.parse_args(["--compile"]).compile and not app.parse_args([]).compile
    library = EmbeddingLibrary(paths.embeddings_dir)
    for flag in (False, True):
        demo = build_ui(studio, library, TrainingRunner(studio, library, paths), paths, compile=flag)
        boxes = [b for b in demo.blocks.values() if isinstance(b, gr.Checkbox) and b.label == "torch.compile the UNet"]
        assert [b.value for b in boxes] == [flag]


def test_every_create_and_train_setting_has_help_text(studio, paths):
    # The Generate panel keeps A1111's compact, self-explaining layout (prompt, size, batch); the Create and
    # Train settings each carry their config field's help.
    from tinv_ui.jobs import TrainingRunner
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.ui.context import UIContext
    from tinv_ui.ui.create_tab import build_create_tab
    from tinv_ui.ui.train_tab import build_train_tab

    library = EmbeddingLibrary(paths.embeddings_dir)
    ctx = UIContext(studio, library, TrainingRunner(studio, library, paths), paths)
    with gr.Blocks():
        forms = [build_create_tab(ctx).form, build_train_tab(ctx).form]
    settings = {name: c for form in forms for name, c in form.components.items()}
    assert len(settings) > 30 and {"preview_sampler", "template", "name"} <= set(settings)
    missing = [name for name, c in settings.items() if not (getattr(c, "info", None) or "").strip()]
    assert missing == [], " ".join(missing)


def test_generate_panel_says_a_compiled_request_compiles_first(studio, paths, monkeypatch):
    from types import SimpleNamespace

    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.ui import generate_tab
    from tinv_ui.ui.context import UIContext

    monkeypatch.setattr(generate_tab.generation, "generate", lambda *a: iter(()))
    ctx = UIContext(studio, EmbeddingLibrary(paths.embeddings_dir), None, paths)
    tab = SimpleNamespace(progress="progress", gallery="gallery", infotext="infotext", seed_used="seed", infotexts="all")
    for flag in (False, True):
        first = next(generate_tab.run_generation(ctx, GenerateConfig(prompt="x", compile=flag), tab))
        assert ("compiles first" in first["progress"]) is flag


def test_default_model_prefers_models_folder(tmp_path):
    assert app.default_model(tmp_path) == "tiny"
    (tmp_path / "b.safetensors").write_bytes(b"x")
    (tmp_path / "a.ckpt").write_bytes(b"x")
    assert app.default_model(tmp_path) == str(tmp_path / "a.ckpt")


# -- in-process server + gradio_client ---------------------------------------------------------------------
@contextlib.contextmanager
def serving(studio, paths, tmp_path, monkeypatch):
    """The app for `studio` on a free loopback port, with a client: (client, library, runner); closed (and any
    training stopped) afterwards."""
    from tinv_ui.jobs import TrainingRunner
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.ui import build_ui, launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    library = EmbeddingLibrary(paths.embeddings_dir)
    runner = TrainingRunner(studio, library, paths)
    demo = build_ui(studio, library, runner, paths, allow_dirs=[tmp_path])  # the tests' datasets live there
    _, url, _ = launch(demo, paths, port=free_port(), prevent_thread_lock=True)
    client = Client(url, verbose=False)
    try:
        yield client, library, runner
    finally:
        if runner.current is not None:
            runner.current.stop()
            runner.current.wait(30)
        client.close()
        demo.close()


@pytest.fixture
def served(studio, paths, tmp_path, monkeypatch):
    """The app on the tiny model: (client, runner, paths)."""
    with serving(studio, paths, tmp_path, monkeypatch) as (client, _library, runner):
        yield client, runner, paths


def create_kwargs(name: str, **kw) -> dict:
    base = {"name": name, "initializer": "*", "num_vectors": 2, "overwrite": False, "file_format": "pt"}
    return {**base, **kw}


def generate_kwargs(prompt: str, **kw) -> dict:
    cfg = GenerateConfig(prompt=prompt, steps=2, width=64, height=64, seed=77)
    base = {k: getattr(cfg, k) for k in ("prompt", "negative_prompt", "sampler", "steps", "cfg_scale", "seed", "width",
                                         "height", "batch_count", "batch_size", "clip_skip", "save")}
    return {**base, **kw}


def test_round_trip_create_generate_and_errors(served):
    client, _, paths = served
    status = client.predict(**create_kwargs("ui-emb"), api_name="/create_embedding")
    assert status == f"Created: {paths.embeddings_dir / 'ui-emb.pt'}"
    assert (paths.embeddings_dir / "ui-emb.pt").is_file()

    with pytest.raises(AppError) as info:
        client.predict(**create_kwargs("bad/name"), api_name="/create_embedding")
    assert "bad/name" in str(info.value) and "Traceback" not in str(info.value)

    progress, gallery, infotext, seed_used = client.predict(**generate_kwargs("a photo of ui-emb"), api_name="/generate")
    assert "Done: 1 image" in progress
    assert len(gallery) == 1
    assert 'TI hashes: "ui-emb: ' in infotext and "Seed: 77," in infotext
    assert "77" in seed_used
    saved = next(paths.outputs_dir.rglob("*.png"))
    with Image.open(saved) as img:
        assert img.text["parameters"] == infotext


def test_generate_request_with_compile_uses_the_compiled_unet(served, studio, monkeypatch):
    """The panel's box reaches the core: one torch.compile of the studio's UNet, reused by the next request."""
    import torch

    client, _, _ = served
    real_compile, made = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: made.append(m) or real_compile(m, backend="eager", **kw))
    try:
        for _ in range(2):
            progress, gallery, _, _ = client.predict(**generate_kwargs("a cat", compile=True, save=False), api_name="/generate")
            assert "Done: 1 image" in progress and len(gallery) == 1
        assert made == [studio.pipeline.unet]
    finally:
        studio._compiled_unet = None  # the session studio is shared: leave it as found


def test_round_trip_training_busy_and_interrupt(served, images):
    client, runner, paths = served
    client.predict(**create_kwargs("trained"), api_name="/create_embedding")
    defaults = {p["parameter_name"]: p["parameter_default"]
                for p in client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/start_training"]["parameters"]}
    assert defaults["width"] == 64  # the tiny model's native size
    train = {**defaults, "embedding": "trained", "dataset_dir": str(images), "max_steps": 500, "preview_every": 0,
             "save_every": 0, "template": "style_filewords"}
    message = client.predict(**train, api_name="/start_training")
    assert message == "Training trained started."
    with pytest.raises(AppError, match="(?i)running|busy"):
        client.predict(**train, api_name="/start_training")
    with pytest.raises(AppError, match="interrupt it before switching models"):
        client.predict("tiny", api_name="/load_model")
    # Generating during training waits for a step boundary and works (with the half-trained embedding).
    progress, gallery, infotext, _ = client.predict(**generate_kwargs("a photo of trained", save=False), api_name="/generate")
    assert len(gallery) == 1 and 'TI hashes: "trained: ' in infotext
    assert runner.current.snapshot().status == "running"
    deadline = time.monotonic() + 30
    while runner.current.snapshot().step < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Interrupting" in client.predict(api_name="/interrupt_training")
    runner.current.wait(30)
    snap = runner.current.snapshot()
    assert snap.status == "interrupted"
    assert Path(paths.embeddings_dir / "trained.pt").is_file()
