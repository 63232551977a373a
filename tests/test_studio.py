"""The model holder: a failed load keeps the previous model, a switch releases the old one, the lock."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from tinv_ui.config import ModelSpec
from tinv_ui.errors import BusyError, ModelLoadError
from tinv_ui.studio import Studio


@pytest.fixture
def own_studio(paths, cache_dir):
    """A studio of this test's own (the session `studio` fixture is shared and must stay loaded)."""
    studio = Studio(paths)
    studio.load(ModelSpec("tiny"))
    return studio


def test_a_failed_load_keeps_the_previous_model(own_studio, paths):
    (paths.models_dir / "broken.safetensors").write_bytes(b"\x00" * 100)
    (paths.models_dir / "not-a-model").mkdir()
    unet = own_studio.pipeline.unet
    for source in ("broken.safetensors", str(paths.models_dir / "not-a-model"), "no/such/thing/here"):
        with pytest.raises(ModelLoadError):
            own_studio.load(ModelSpec(source))
        assert own_studio.loaded and own_studio.pipeline.unet is unet
        assert own_studio.info.is_tiny and own_studio.spec.is_tiny
    assert not own_studio.busy_with  # the lock was given back each time


def test_switching_models_releases_the_old_one(own_studio):
    old = weakref.ref(own_studio.pipeline.unet)
    own_studio.load(ModelSpec("tiny"))
    gc.collect()
    assert old() is None, "the previous UNet is still referenced after a switch"
    assert own_studio.loaded


def test_the_lock_names_its_holder_and_times_out(own_studio):
    inside, release = threading.Event(), threading.Event()

    def hold():
        with own_studio.session(what="training x (step 3/10)"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(10)
        assert own_studio.busy_with == "training x (step 3/10)"
        with pytest.raises(BusyError, match=r"training x \(step 3/10\)"):
            with own_studio.session(timeout=0.05):
                pass
    finally:
        release.set()
        t.join()
    with own_studio.session(timeout=1):
        assert own_studio.busy_with == ""  # holder text is only kept for named sessions


def test_a_hub_id_is_fetched_through_diffusers_and_labelled_with_the_id(own_studio, paths, monkeypatch):
    # No network in tests: huggingface_hub's download and diffusers' from_pretrained are replaced. The id is
    # asked for as given, without local_files_only (a hub id is the one source that may download), and the
    # repo's model_index.json picks the pipeline: SD or SDXL.
    import huggingface_hub
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from tinv_ui.tiny_model import tiny_model_dir, tiny_sdxl_model_dir

    folders = {"someone/sd-model": tiny_model_dir(paths.cache_dir), "someone/sdxl-model": tiny_sdxl_model_dir(paths.cache_dir)}

    def fake_download(repo_id, filename, **kw):
        if repo_id not in folders:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return str(folders[repo_id] / filename)

    calls = []

    def fake_for(pipeline_class):
        real = pipeline_class.from_pretrained.__func__

        def fake(cls, source, **kw):
            calls.append((cls.__name__, source, kw))
            return real(cls, folders[source], local_files_only=True, safety_checker=None)

        return classmethod(fake)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_pretrained", fake_for(cls))
    info = own_studio.load(ModelSpec("someone/sd-model"))
    assert calls == [("StableDiffusionPipeline", "someone/sd-model", {"safety_checker": None, "requires_safety_checker": False})]
    assert (info.label, info.name, info.hash, info.is_tiny) == ("someone/sd-model", "sd-model", None, False)
    assert own_studio.info is info and own_studio.loaded
    with pytest.raises(ModelLoadError, match="Could not load model 'someone/offline-model': We couldn't connect"):
        own_studio.load(ModelSpec("someone/offline-model"))
    assert own_studio.info is info  # the failed fetch kept the loaded model
    info = own_studio.load(ModelSpec("someone/sdxl-model"))
    assert calls[-1][:2] == ("StableDiffusionXLPipeline", "someone/sdxl-model")
    assert isinstance(own_studio.pipeline, StableDiffusionXLPipeline) and own_studio.is_sdxl


@pytest.mark.parametrize(
    ("spec", "cuda", "bf16", "want"),
    [
        (ModelSpec("tiny"), False, False, ("cpu", "float32")),
        (ModelSpec("tiny"), True, True, ("cuda", "bfloat16")),
        (ModelSpec("tiny"), True, False, ("cuda", "float16")),
        (ModelSpec("tiny", device="cpu"), True, True, ("cpu", "float32")),
        (ModelSpec("tiny", dtype="float16"), False, False, ("cpu", "float16")),
    ],
)
def test_pick_device_dtype(monkeypatch, spec, cuda, bf16, want):
    import torch

    from tinv_ui.studio import pick_device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    device, dtype = pick_device_dtype(spec)
    assert (device.type, dtype) == (want[0], getattr(torch, want[1]))


def test_an_unknown_dtype_is_refused_with_the_choices():
    from tinv_ui.studio import pick_device_dtype

    with pytest.raises(ModelLoadError, match="dtype 'float8' is unknown; use float16, bfloat16 or float32"):
        pick_device_dtype(ModelSpec("tiny", dtype="float8"))


# -- what the picker lists, and the folders and files that load (issue: "models just work") ---------------------------
def _tiny_pipeline(paths):
    from diffusers import StableDiffusionPipeline

    from tinv_ui.tiny_model import tiny_model_dir

    return StableDiffusionPipeline.from_pretrained(tiny_model_dir(paths.cache_dir), local_files_only=True,
                                                   safety_checker=None)


def test_a_diffusers_folder_is_listed_once_as_the_folder_never_its_parts(paths):
    from tinv_ui.studio import list_models

    _tiny_pipeline(paths).save_pretrained(paths.models_dir / "sd15-diffusers")  # unet/*.safetensors, vae/..., text_encoder/...
    (paths.models_dir / "sub").mkdir()
    (paths.models_dir / "sub" / "anime.ckpt").write_bytes(b"x")
    (paths.models_dir / "v1-5.safetensors").write_bytes(b"x")
    assert list_models(paths.models_dir) == ["sd15-diffusers", "sub/anime.ckpt", "v1-5.safetensors"]


def test_a_folder_of_fp16_variant_files_loads(own_studio, paths):
    """What `from_pretrained(..., variant="fp16")` downloads: only `*.fp16.safetensors` weight files."""
    import torch

    pipe = _tiny_pipeline(paths).to(torch.float16)
    folder = paths.models_dir / "sd-fp16"
    pipe.save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    info = own_studio.load(ModelSpec(str(folder)))
    assert (info.label, info.is_tiny) == ("sd-fp16", False)
    want = pipe.unet.state_dict()
    got = own_studio.pipeline.unet.state_dict()
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)


def test_fp16_weights_reach_their_device_in_fp16(own_studio, paths, monkeypatch):
    """An fp16 model is moved to its device in fp16 and cast there, never expanded to fp32 on the CPU first
    (that doubles the RAM a load needs: SD 1.5 would not load on an 8 GB machine)."""
    import torch

    folder = paths.models_dir / "sd-half"
    _tiny_pipeline(paths).to(torch.float16).save_pretrained(folder)
    moves, real_to = [], torch.nn.Module.to

    def to(module, *args, **kwargs):
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if device is not None and type(module).__name__ in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"):
            moves.append((type(module).__name__, {p.dtype for p in module.parameters()}))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    own_studio.load(ModelSpec(str(folder), device="cpu"))
    assert sorted(moves) == [("AutoencoderKL", {torch.float16}), ("CLIPTextModel", {torch.float16}),
                             ("UNet2DConditionModel", {torch.float16})]
    # ...and once there, cast to what the device runs: fp32 on the CPU (the text encoder always fp32).
    pipe = own_studio.pipeline
    assert (pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (torch.float32,) * 3


def test_the_model_hash_is_read_once_per_file_version(own_studio, paths, monkeypatch, tmp_path):
    """The hash (infotext "Model hash") is cached by path, size and mtime: loading the same file again does
    not read it again; a changed file is hashed anew."""
    import builtins
    import hashlib
    import io
    import os

    from safetensors.torch import save_file

    import tinv_ui.checkpoints as checkpoints
    from test_checkpoints import to_ldm
    from tinv_ui.tiny_model import build_tiny_pipeline, tiny_model_dir

    unet, vae, text_encoder, _, _ = build_tiny_pipeline(seed=7)
    path = paths.models_dir / "tiny-sd1.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm(unet, vae, text_encoder).items()}, str(path))
    real_load = checkpoints.load_single_file  # the tiny file needs the tiny configs, not the shipped SD 1.5 ones
    monkeypatch.setattr(checkpoints, "load_single_file",
                        lambda p, cache_dir: real_load(p, cache_dir, config=tiny_model_dir(cache_dir)))
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(path):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    want = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # Path.open / read_bytes go through io.open
    first = own_studio.load(ModelSpec(path.name)).hash
    assert first == want and opened, "the first load must hash the file"
    opened.clear()
    assert own_studio.load(ModelSpec(path.name)).hash == first
    assert opened == [], "the second load read the file again to hash it"
    # A new version of the file (same size, new bytes and mtime): hashed again.
    monkeypatch.undo()  # back to the real open
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last tensor's last byte: still a valid file
    path.write_bytes(bytes(data))
    monkeypatch.setattr(checkpoints, "load_single_file",
                        lambda p, cache_dir: real_load(p, cache_dir, config=tiny_model_dir(cache_dir)))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert own_studio.load(ModelSpec(path.name)).hash == hashlib.sha256(bytes(data)).hexdigest()[:10]


def test_a_broken_startup_model_falls_back_to_tiny_and_keeps_the_reason(paths, caplog):
    import logging

    from tinv_ui.studio import Studio

    (paths.models_dir / "broken.safetensors").write_bytes(b"\x00" * 100)
    studio = Studio(paths)
    with caplog.at_level(logging.ERROR, logger="tinv_ui"):
        info = studio.load_or_fall_back(ModelSpec("broken.safetensors"))
    assert info.is_tiny and studio.loaded
    assert studio.load_error.startswith("broken.safetensors is not a readable .safetensors file")
    assert "\n" not in studio.load_error
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(studio.load_error) and "tiny test model" in errors[0]
    studio.load(ModelSpec("tiny"))  # a later good load clears it
    assert studio.load_error is None
