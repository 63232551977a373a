"""Embedding file formats: every layout both ways, bit-exact; detection; unsafe and broken files."""

from __future__ import annotations

import os
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tinv_ui import formats, image_embedding
from tinv_ui.embedding import Embedding
from tinv_ui.errors import EmbeddingFormatError, UnsafeFileError


def _vectors(n: int = 3, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _emb(n: int = 3, d: int = 32, name: str = "my-emb", step: int | None = 7) -> Embedding:
    return Embedding(name, _vectors(n, d), step=step, meta={"sd_checkpoint": "0123456789", "sd_checkpoint_name": "m1"})


def _sdxl(n: int = 2) -> Embedding:
    return Embedding("xl", parts={"clip_l": _vectors(n, 768, 1), "clip_g": _vectors(n, 1280, 2)}, step=5)


# -- round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("file", "layout", "fmt", "keeps_meta"),
    [
        ("e.pt", None, "a1111", True),
        ("e.safetensors", None, "kohya", True),
        ("e.bin", None, "diffusers", False),
        ("e.pt", "kohya", "kohya", False),
        ("e.safetensors", "diffusers", "diffusers", True),
        ("e.png", None, "image-text", True),
        ("e.webp", None, "image-pixels", True),
    ],
)
def test_round_trip_is_bit_exact(tmp_path, file, layout, fmt, keeps_meta):
    emb = _emb()
    path = formats.write(emb, tmp_path / file, layout)
    back = formats.read(path)
    assert torch.equal(back.vectors, emb.vectors)
    assert back.vectors.dtype == torch.float32
    assert back.meta["format"] == fmt
    if fmt.startswith("image"):
        assert back.name == "my-emb"  # image embeddings carry their own name
    else:
        assert back.name == "e"  # file stem, A1111 rule
    if keeps_meta:
        assert back.step == 7
        assert back.meta["sd_checkpoint"] == "0123456789"
        assert back.meta["sd_checkpoint_name"] == "m1"


def test_a1111_pt_layout_is_exactly_the_webui_dict(tmp_path):
    path = formats.write(_emb(), tmp_path / "e.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert raw["string_to_token"] == {"*": 265}
    assert list(raw["string_to_param"]) == ["*"]
    assert raw["string_to_param"]["*"].shape == (3, 32) and raw["string_to_param"]["*"].dtype == torch.float32
    assert (raw["name"], raw["step"]) == ("my-emb", 7)


def test_safetensors_is_kohya_emb_params(tmp_path):
    from safetensors.torch import load_file

    formats.write(_emb(), tmp_path / "e.safetensors")
    assert list(load_file(tmp_path / "e.safetensors")) == ["emb_params"]


def test_diffusers_token_override_and_1d_tensor(tmp_path):
    emb = _emb(n=1)
    formats.write(emb, tmp_path / "e.bin", token="<cat-toy>")
    raw = torch.load(tmp_path / "e.bin", weights_only=True)
    assert list(raw) == ["<cat-toy>"]
    torch.save({"<tok>": emb.vectors[0].clone()}, tmp_path / "one.bin")  # old diffusers: a 1-D [d]
    back = formats.read(tmp_path / "one.bin")
    assert back.vectors.shape == (1, 32) and torch.equal(back.vectors, emb.vectors)
    formats.write(back, tmp_path / "again.bin")  # written back 1-D, as it came
    assert torch.load(tmp_path / "again.bin", weights_only=True)["<tok>"].shape == (32,)


@pytest.mark.parametrize("file, step", [("xl.safetensors", 5), ("xl.pt", None), ("xl.png", 5)])
def test_sdxl_pair_round_trip(tmp_path, file, step):
    emb = _sdxl()
    back = formats.read(formats.write(emb, tmp_path / file))
    assert back.is_sdxl and back.width == 2048 and back.num_vectors == 2
    assert all(torch.equal(back.parts[k], emb.parts[k]) for k in ("clip_l", "clip_g"))
    # the step survives only in .safetensors metadata: A1111 crashes on anything but the pair in a .pt or image
    assert back.step == (5 if file.endswith(".safetensors") else None)


def test_sdxl_cannot_be_written_as_single_tensor_layout(tmp_path):
    with pytest.raises(EmbeddingFormatError, match="sdxl"):
        formats.write(_sdxl(), tmp_path / "x.bin", layout="diffusers")


def test_rinongal_parameter_dict_is_read(tmp_path):
    vec = _vectors(2, 32)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "embeddings.pt")
    back = formats.read(tmp_path / "embeddings.pt")
    assert back.meta["format"] == "rinongal"
    assert torch.equal(back.vectors, vec) and not back.vectors.requires_grad


def test_numpy_scalar_step_is_allowed(tmp_path):
    torch.save({"string_to_param": {"*": _vectors()}, "step": np.int64(12), "name": "x"}, tmp_path / "n.pt")
    assert formats.read(tmp_path / "n.pt").step == 12


def test_half_precision_file_is_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": _vectors().half()}, tmp_path / "h.safetensors")
    back = formats.read(tmp_path / "h.safetensors")
    assert back.vectors.dtype == torch.float32 and back.meta["dtype"] == "float16"
    assert torch.equal(back.vectors, _vectors().half().float())


def test_cuda_saved_style_requires_grad_tensor_is_read(tmp_path):
    t = _vectors().requires_grad_(True)
    torch.save({"string_to_param": {"*": t}, "name": "x", "step": 3}, tmp_path / "g.pt")
    back = formats.read(tmp_path / "g.pt")
    assert not back.vectors.requires_grad and torch.equal(back.vectors, t.detach())


# -- detection errors ------------------------------------------------------------------------------------
def test_unknown_layout_lists_the_keys(tmp_path):
    torch.save({"foo": 1, "bar": _vectors()}, tmp_path / "u.pt")
    with pytest.raises(EmbeddingFormatError) as info:
        formats.read(tmp_path / "u.pt")
    assert "'foo'" in str(info.value) and "'bar'" in str(info.value) and "u.pt" in str(info.value)


def test_multiple_terms_are_refused(tmp_path):
    torch.save({"string_to_param": {"*": _vectors(), "x": _vectors()}}, tmp_path / "m.pt")
    with pytest.raises(EmbeddingFormatError, match="2 terms"):
        formats.read(tmp_path / "m.pt")


def test_nan_vectors_are_refused_on_read_and_write(tmp_path):
    bad = _vectors()
    bad[1, 3] = float("nan")
    torch.save({"string_to_param": {"*": bad}}, tmp_path / "nan.pt")
    with pytest.raises(EmbeddingFormatError, match="NaN"):
        formats.read(tmp_path / "nan.pt")
    with pytest.raises(EmbeddingFormatError, match="NaN"):
        formats.write(Embedding("n", bad), tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors", ".png"])
def test_empty_file(tmp_path, suffix):
    (tmp_path / f"z{suffix}").write_bytes(b"")
    with pytest.raises(EmbeddingFormatError, match="empty"):
        formats.read(tmp_path / f"z{suffix}")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    good = formats.write(_emb(), tmp_path / f"good{suffix}").read_bytes()
    (tmp_path / f"t{suffix}").write_bytes(good[: len(good) // 2])
    with pytest.raises(EmbeddingFormatError, match="corrupt"):
        formats.read(tmp_path / f"t{suffix}")


def test_garbage_file_is_corrupt_not_unsafe(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"this is not a torch file at all")
    with pytest.raises(EmbeddingFormatError, match="corrupt") as info:
        formats.read(tmp_path / "g.pt")
    assert not isinstance(info.value, UnsafeFileError)


def test_wrong_extension(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(EmbeddingFormatError, match=".txt"):
        formats.read(tmp_path / "x.txt")


class _Payload:
    """A pickle that, if run, would create a marker file via os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle", "raw-pickle-protocol-4"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch-zip":
        torch.save({"string_to_param": {"*": _vectors()}, "x": _Payload(marker)}, path)
    else:  # a bare pickle (legacy format); no tensor, so the payload is the only global it names
        protocol = 4 if container.endswith("4") else 2
        path.write_bytes(pickle.dumps({"name": "x", "x": _Payload(marker)}, protocol=protocol))
    with pytest.raises(UnsafeFileError) as info:
        formats.read(path)
    msg = str(info.value)
    assert "refused and not executed" in msg and "evil.pt" in msg
    assert "system" in msg or "outside the safe subset" in msg
    assert not marker.exists()
    # proof the payload is real: unpickling it without the guard does create the marker
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# -- layout override -----------------------------------------------------------------------------------
def test_unknown_layout_name_on_write(tmp_path):
    with pytest.raises(EmbeddingFormatError, match="layout 'weird'"):
        formats.write(_emb(), tmp_path / "e.pt", layout="weird")


@pytest.mark.parametrize(("file", "layout"), [("e.pt", "image"), ("e.png", "a1111"), ("e.webp", "kohya")])
def test_image_layout_only_for_image_files(tmp_path, file, layout):
    with pytest.raises(EmbeddingFormatError, match="does not fit the suffix"):
        formats.write(_emb(), tmp_path / file, layout=layout)


def test_diffusers_safetensors_keeps_its_token_when_rewritten(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"<cat-toy>": _vectors(2)}, tmp_path / "learned_embeds.safetensors")
    emb = formats.read(tmp_path / "learned_embeds.safetensors")
    assert emb.meta["format"] == "diffusers"
    formats.write(emb.with_vectors(emb.vectors * 2, step=10), tmp_path / "learned_embeds.safetensors")
    assert list(load_file(tmp_path / "learned_embeds.safetensors")) == ["<cat-toy>"]
    assert formats.read(tmp_path / "learned_embeds.safetensors").step == 10


def test_a1111_layout_cannot_go_to_safetensors(tmp_path):
    with pytest.raises(EmbeddingFormatError, match=".pt"):
        formats.write(_emb(), tmp_path / "e.safetensors", layout="a1111")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    formats.write(_emb(), tmp_path / "e.pt")
    formats.write(_emb(n=5), tmp_path / "e.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.pt"]
    assert formats.read(tmp_path / "e.pt").num_vectors == 5


# -- optimizer sidecar -----------------------------------------------------------------------------------
def test_optim_sidecar_round_trip_and_hash_check(tmp_path):
    emb = _emb()
    path = formats.write(emb, tmp_path / "e.pt")
    vec = torch.nn.Parameter(emb.vectors.clone())
    opt = torch.optim.AdamW([vec], lr=0.1)
    vec.grad = torch.ones_like(vec)
    opt.step()
    assert formats.read_optim(path, emb) is None  # nothing written yet
    written = formats.write_optim(path, emb, opt.state_dict())
    assert written.name == "e.pt.optim"
    raw = torch.load(written, weights_only=True)
    assert raw["hash"] == emb.checksum() and set(raw) == {"hash", "optimizer_state_dict"}
    state = formats.read_optim(path, emb)
    assert torch.equal(state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.AdamW([torch.nn.Parameter(emb.vectors.clone())], lr=0.1)
    fresh.load_state_dict(state)
    other = emb.with_vectors(emb.vectors + 1)
    assert formats.read_optim(path, other) is None  # belongs to other vectors


def test_damaged_optim_is_ignored(tmp_path):
    emb = _emb()
    path = formats.write(emb, tmp_path / "e.pt")
    formats.optim_path(path).write_bytes(b"garbage")
    assert formats.read_optim(path, emb) is None


# -- image codec (A1111 `modules/textual_inversion/image_embedding.py`) ----------------------------------------
def test_lcg_matches_a1111_reference():
    stream = image_embedding.lcg_stream(100_100)
    assert stream[:20].tolist() == [
        253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215,
    ]
    assert int(stream[100:].astype(np.int64).sum()) == 12731374  # A1111's own self-test value
    state, naive = 0, []  # the plain recurrence, across a 4096 jump-ahead block boundary
    for _ in range(5000):
        state = (1664525 * state + 1013904223) % 2**32
        naive.append(state % 255)
    assert stream[:5000].tolist() == naive


def test_json_tensor_encoding():
    data = {"string_to_param": {"*": torch.tensor([[0.5, -1.25]])}, "step": None, "name": "x"}
    text = image_embedding.to_json(data)
    assert '"TORCHTENSOR": [[0.5, -1.25]]' in text and '"step": null' in text
    back = image_embedding.from_json(text)
    assert back["string_to_param"]["*"].dtype == torch.float64
    assert back["string_to_param"]["*"].tolist() == [[0.5, -1.25]]


def test_padding_is_cyclic_and_always_adds():
    h = 4
    block = image_embedding._pad_cyclic(np.arange(12, dtype=np.uint8), h)  # 12 is already aligned to h*3
    assert block.shape == (h, 2, 3)  # 12 -> 16 (h) -> 24 (3h)
    assert block.reshape(-1).tolist() == list(range(12)) + list(range(12))


def test_pixel_layout_black_canvas_and_separators():
    emb = _emb()
    data = formats.a1111_dict(emb)
    picture = Image.new("RGB", (40, 64), (200, 100, 50))
    out = image_embedding.insert_data(picture, data)
    arr = np.asarray(out)
    w_block = (out.size[0] - 40 - 2) // 2
    assert out.size == (2 * w_block + 42, 64)
    assert (arr[:, w_block] == 0).all() and (arr[:, w_block + 41] == 0).all()  # black separator columns
    assert (arr[:, w_block + 1 : w_block + 41] == (200, 100, 50)).all()  # picture untouched
    # decode by hand, following the spec: low nibbles, XOR with the LCG stream, high<<4 | low
    low = image_embedding.xor_block(arr[:, :w_block] & 0x0F)
    high = image_embedding.xor_block(arr[:, w_block + 42 :] & 0x0F)
    payload = zlib.decompressobj().decompress(((high << 4) | low).reshape(-1).tobytes())
    assert payload == image_embedding.to_json(data).encode()
    # high nibbles: the ellipse decoration, shaded by the first vector (reversed for the high block)
    v0 = emb.vectors[0].double().abs().numpy()
    shades = (v0 / v0.max() * 255).astype(np.uint8)
    assert image_embedding._edge_shades(data).tolist() == shades.tolist()
    blank = np.zeros((64, w_block, 3), np.uint8)
    assert np.array_equal(arr[:, :w_block] & 0xF0, image_embedding.style_block(blank, shades))
    assert np.array_equal(arr[:, w_block + 42 :] & 0xF0, image_embedding.style_block(blank, shades[::-1]))
    assert (arr[:, :w_block] & 0xF0).any()


def test_pixels_survive_a_black_border_and_missing_text_chunk(tmp_path):
    emb = _emb()
    formats.write(emb, tmp_path / "e.png")
    with Image.open(tmp_path / "e.png") as img:
        pixels = img.convert("RGB")
    framed = Image.new("RGB", (pixels.size[0] + 20, pixels.size[1] + 10))  # extra black border
    framed.paste(pixels, (7, 3))
    framed.save(tmp_path / "framed.png")  # no text chunk
    back = formats.read(tmp_path / "framed.png")
    assert back.meta["format"] == "image-pixels" and back.name == "my-emb"
    assert torch.equal(back.vectors, emb.vectors) and back.step == 7


def test_zero_vectors_image(tmp_path):
    emb = Embedding("zeros", torch.zeros(2, 32), step=0)
    formats.write(emb, tmp_path / "z.webp")
    assert torch.equal(formats.read(tmp_path / "z.webp").vectors, emb.vectors)


def test_custom_picture_is_used(tmp_path):
    picture = Image.new("RGB", (50, 70), (10, 200, 30))
    formats.write(_emb(), tmp_path / "p.png", image=picture)
    with Image.open(tmp_path / "p.png") as img:
        assert img.size[1] == 70 and img.getpixel((img.size[0] // 2, 35)) == (10, 200, 30)


def test_plain_picture_is_not_an_embedding(tmp_path):
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "photo.png")
    with pytest.raises(formats.NotAnEmbeddingImage):
        formats.read(tmp_path / "photo.png")
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[:, ::3] = 200
    Image.fromarray(stripes).save(tmp_path / "stripes.png")  # black columns, but no zlib stream
    with pytest.raises(formats.NotAnEmbeddingImage):
        formats.read(tmp_path / "stripes.png")


def test_damaged_text_chunk(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", "###not base64 json###")
    Image.new("RGB", (8, 8)).save(tmp_path / "bad.png", pnginfo=info)
    with pytest.raises(EmbeddingFormatError, match="damaged"):
        formats.read(tmp_path / "bad.png")


# -- interoperability: diffusers' own loader reads what we write --------------------------------------------
@pytest.fixture(scope="module")
def fresh_pipe(cache_dir):
    """A private pipeline (the session `studio` must not get tokens added)."""
    from diffusers import StableDiffusionPipeline

    from tinv_ui.tiny_model import tiny_model_dir

    return StableDiffusionPipeline.from_pretrained(tiny_model_dir(cache_dir), local_files_only=True, safety_checker=None)


def _assert_loaded_rows(pipe, token: str, vectors: torch.Tensor) -> None:
    """The rows diffusers' `load_textual_inversion` just added for `token` (and `token_1`) equal `vectors`."""
    try:
        rows = pipe.text_encoder.get_input_embeddings().weight
        ids = pipe.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
        assert torch.equal(rows[ids].detach(), vectors)
    finally:
        pipe.unload_textual_inversion()


@pytest.mark.parametrize(("file", "layout"), [("d.bin", None), ("d.safetensors", "diffusers"), ("a.pt", None), ("k.safetensors", None)])
def test_diffusers_load_textual_inversion_reads_our_files(tmp_path, fresh_pipe, file, layout):
    emb = _emb(n=2)
    path = formats.write(emb, tmp_path / file, layout)
    token = f"<t-{Path(file).stem}-{layout}>"
    fresh_pipe.load_textual_inversion(str(path), token=token)
    _assert_loaded_rows(fresh_pipe, token, emb.vectors)


# -- every peer reads what we write (issue 12); the README table is formats.WHERE_FILES_LOAD -------------------
# A1111 v1.10.1's safe unpickler (modules/safe.py), restated here from its rules, not copied:
# `check_zip_filenames` lets through only these zip entries, and `find_class` only these globals.
A1111_ZIP_RULE = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|(\.data\/serialization_id)|(data\.pkl))$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"),
    ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
    *{("torch", s) for s in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "float32")},
}


def a1111_refusals(path: Path) -> list[str]:
    """What A1111's safe unpickler would refuse in the torch file at `path` (empty: it loads)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        refused = [f"zip entry {n}" for n in names if not A1111_ZIP_RULE.match(n)]
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            return refused + [f"{len(pickles)} data.pkl entries"]
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(z.read(pickles[0])):
            if op.name == "GLOBAL":
                module, name = arg.split(" ", 1)
            elif op.name == "STACK_GLOBAL":
                module, name = strings[-2:]
            else:
                if isinstance(arg, str):
                    strings.append(arg)
                continue
            if (module, name) not in A1111_GLOBALS:
                refused.append(f"global {module}.{name}")
    return refused


def _optimizer_state() -> dict:
    """An AdamW state dict plus the extras a trainer may keep beside it (RNG states, counters, text, bytes)."""
    import random

    vec = torch.nn.Parameter(_vectors())
    opt = torch.optim.AdamW([vec], lr=0.1)
    vec.grad = torch.ones_like(vec)
    opt.step()
    return {**opt.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": random.Random(3).getstate()},
            "extras": [1, 2.5, "text", b"\x00\xffbytes", None, True, (3, [4.0, {"k": torch.arange(3)}])]}


def _write_kind(row: tuple, folder: Path) -> tuple[Path, dict[str, torch.Tensor], Any]:
    """Write the kind of file `row` of WHERE_FILES_LOAD names; return its path, the vectors each encoder
    should get (by width) and, for the optimizer row, the state written."""
    file, layout = row[0], row[1]
    suffix = file.split(" ")[0].removeprefix("NAME")
    name = "my-emb"
    if layout == "optimizer state":
        emb = _emb(name=name)
        state = _optimizer_state()
        return formats.write_optim(formats.write(emb, folder / f"{name}.pt"), emb, state), {}, state
    emb = _sdxl() if layout == "sdxl" else _emb(n=2, d=768, name=name)
    path = formats.write(emb, folder / f"{name}{suffix}")
    vectors = dict(emb.parts) if emb.is_sdxl else {"768": emb.vectors}
    return path, {str(t.shape[1]): t for t in vectors.values()}, None


def _same(a: Any, b: Any) -> bool:
    """Deep equality where tensors must match bit for bit (dtype and values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


ROWS = {row[0]: row for row in formats.WHERE_FILES_LOAD}


@pytest.mark.parametrize("file", [f for f, row in ROWS.items() if f.split(" ")[0].endswith((".pt", ".bin", ".optim"))])
def test_a1111_safe_unpickler_accepts_every_pickle_we_write_and_torch_reads_it_back_bit_exact(tmp_path, file):
    assert ROWS[file][2] == "yes"
    path, vectors, state = _write_kind(ROWS[file], tmp_path)
    assert a1111_refusals(path) == []
    import zipfile

    with zipfile.ZipFile(path) as z:  # the inner folder is the file's own stem, not the temp file's
        assert {n.split("/")[0] for n in z.namelist()} == {path.stem}
    raw = torch.load(path, weights_only=True)
    if state is not None:
        assert _same(raw["optimizer_state_dict"], state)
    elif "(SDXL)" in file:  # A1111's SDXL branch calls .detach() on every value: the pair and nothing else
        assert set(raw) == {"clip_l", "clip_g"} and _same(raw["clip_l"], vectors["768"]) and _same(raw["clip_g"], vectors["1280"])
    else:
        (value,) = raw["string_to_param"].values() if "string_to_param" in raw else raw.values()
        assert _same(value, vectors["768"])
    # the check can fail: a plain torch.save file (what this app wrote before) is refused by A1111
    torch.save(raw, tmp_path / "plain.pt")
    assert any(".format_version" in r for r in a1111_refusals(tmp_path / "plain.pt"))


def _peer_vectors(path: Path, width: int, peer: str) -> torch.Tensor | None:
    """The vectors ComfyUI (comfy/sd1_clip.py) or InvokeAI (TextualInversionModelRaw.from_checkpoint) take
    from `path` for an encoder of `width`, following their key precedence; None when they cannot load it."""
    from safetensors.torch import load_file

    try:
        data = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a refusal is the answer "does not load"
        return None
    by_width = {768: "clip_l", 1280: "clip_g"}
    if "string_to_param" in data:
        t = next(iter(data["string_to_param"].values()))
    elif peer == "InvokeAI" and "emb_params" in data:
        t = data["emb_params"]
    elif by_width.get(width) in data and ("clip_g" in data if peer == "InvokeAI" else True):
        t = data[by_width[width]]
    else:
        t = next(iter(data.values()))
    t = t.unsqueeze(0) if t.dim() == 1 else t
    return t if t.shape[-1] == width else None


@pytest.mark.parametrize("peer", ["ComfyUI", "InvokeAI"])
@pytest.mark.parametrize("file", [f for f in ROWS if not f.endswith(".optim")])
def test_comfyui_and_invokeai_key_rules_read_what_the_table_says(tmp_path, file, peer):
    path, vectors, _ = _write_kind(ROWS[file], tmp_path)
    says = ROWS[file][formats.PEER_COLUMNS.index(peer)]
    for width, expected in vectors.items():
        got = _peer_vectors(path, int(width), peer)
        if says == "yes":
            assert got is not None and torch.equal(got, expected)
        else:
            assert got is None


@pytest.mark.parametrize("file", [f for f in ROWS if ROWS[f][5] not in ("no", "-")])
def test_diffusers_load_textual_inversion_reads_what_the_table_says(tmp_path, fresh_pipe, file):
    # on the tiny model (width 32): the layouts are the same at any width
    layout = ROWS[file][1]
    emb = _emb(n=2, name="tok-from-file")
    path = formats.write(emb, tmp_path / f"e{file.removeprefix('NAME')}", layout)
    needs_token = ROWS[file][5] == "with `token=`"
    token = "<given>" if needs_token else "tok-from-file"
    fresh_pipe.load_textual_inversion(str(path), **({"token": token} if needs_token else {}))
    _assert_loaded_rows(fresh_pipe, token, emb.vectors)


def test_the_readme_table_is_the_code_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = [formats.PEER_COLUMNS, *formats.WHERE_FILES_LOAD]
    lines = ["| " + " | ".join(f"`{c}`" if i == 0 and c[0] == "N" else c for i, c in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(formats.PEER_COLUMNS))
    assert "\n".join(lines) in readme
