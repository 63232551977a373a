"""EmbeddingLibrary: scanning, change detection, skipped reasons, collisions and warnings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinv_ui import formats
from tinv_ui.embedding import Embedding
from tinv_ui.errors import TinvError
from tinv_ui.library import EmbeddingLibrary


def _write(path: Path, n: int = 2, d: int = 32, seed: int = 0, name: str | None = None) -> Path:
    vec = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return formats.write(Embedding(name or path.stem, vec, step=0), path)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "embeddings"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    from tinv_ui.tiny_model import load_clip_tokenizer

    return load_clip_tokenizer(cache_dir)


def test_scan_loads_sorted_with_hashes(folder):
    _write(folder / "zeta.pt")
    _write(folder / "Alpha.safetensors", n=3)
    _write(folder / "beta.bin", n=1)
    lib = EmbeddingLibrary(folder)
    assert lib.refresh() is True
    assert lib.names() == ["Alpha", "beta", "zeta"]
    entry = lib.get("Alpha")
    assert entry.path == folder / "Alpha.safetensors" and entry.embedding.num_vectors == 3
    assert entry.sha256 == hashlib.sha256(entry.path.read_bytes()).hexdigest()
    assert lib.hashes()["Alpha"] == entry.shorthash and len(entry.shorthash) == 12
    assert set(lib.vectors()) == {"Alpha", "beta", "zeta"} and lib.vectors()["beta"].shape == (1, 32)
    assert lib.skipped == [] and lib.collisions == [] and lib.warnings == []


def test_get_is_case_insensitive_and_lists_names_when_missing(folder):
    _write(folder / "MyStyle.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.get("mystyle").name == "MyStyle"
    with pytest.raises(TinvError, match="MyStyle") as info:
        lib.get("nope")
    assert "'nope'" in str(info.value)


def test_missing_folder_is_empty(tmp_path):
    lib = EmbeddingLibrary(tmp_path / "absent")
    assert lib.refresh() is True and lib.loaded == {} and lib.refresh() is False


def test_refresh_detects_add_delete_overwrite_and_subfolders(folder):
    _write(folder / "a.pt")
    lib = EmbeddingLibrary(folder)
    assert lib.refresh() is True
    assert lib.refresh() is False  # nothing changed: no rescan
    _write(folder / "b.pt")
    assert lib.refresh() is True and lib.names() == ["a", "b"]
    (folder / "b.pt").unlink()
    assert lib.refresh() is True and lib.names() == ["a"]
    # overwrite in place, same size, through the same inode (A1111 misses this)
    old = lib.get("a").embedding.vectors.clone()
    fresh = folder.parent / "tmp.pt"
    _write(fresh, seed=99)
    with open(folder / "a.pt", "r+b") as f:
        f.write(fresh.read_bytes())
    st = (folder / "a.pt").stat()
    os.utime(folder / "a.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert lib.refresh() is True
    assert not torch.equal(lib.get("a").embedding.vectors, old)
    # a change inside a subfolder (A1111 misses this too)
    (folder / "sub" / "deeper").mkdir(parents=True)
    assert lib.refresh() is False  # an empty folder is not a change
    _write(folder / "sub" / "deeper" / "c.safetensors")
    assert lib.refresh() is True and lib.names() == ["a", "c"]


def test_force_rescans(folder):
    _write(folder / "a.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.refresh(force=True) is True


def test_ignored_files(folder):
    _write(folder / "real.pt")
    _write(folder / ".hidden.pt")
    (folder / ".real.pt.abc123.tmp").write_bytes((folder / "real.pt").read_bytes())  # our atomic temp file
    (folder / ".half.pt").write_bytes(b"")  # a hidden file with an embedding suffix
    (folder / ".git").mkdir()
    _write(folder / ".git" / "inside.pt")
    _write(folder / "real.preview.png")
    formats.write_optim(folder / "real.pt", formats.read(folder / "real.pt"), {"state": {}, "param_groups": []})
    (folder / "notes.txt").write_text("x")
    (folder / "cfg.json").write_text("{}")
    Image.new("RGB", (16, 16), (250, 250, 250)).save(folder / "photo.png")  # a picture, not an embedding
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == ["real"] and lib.skipped == []


def test_image_embedding_uses_its_internal_name(folder):
    _write(folder / "card.png", name="inside-name")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == ["inside-name"] and lib.get("inside-name").path.name == "card.png"


def test_bad_files_are_skipped_with_reasons_and_do_not_abort(folder):
    _write(folder / "good.pt")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "junk.safetensors").write_bytes(b"\x00\x01junk")
    torch.save({"foo": 1}, folder / "weird.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == ["good"]
    reasons = {s.path.name: s.reason for s in lib.skipped}
    assert set(reasons) == {"empty.pt", "junk.safetensors", "weird.pt"}
    assert "empty" in reasons["empty.pt"]
    assert "'foo'" in reasons["weird.pt"]
    assert {s.name for s in lib.skipped} == {"empty", "junk", "weird"}


@pytest.mark.parametrize(
    ("width", "expected", "words"),
    [(768, 1024, ["768 (SD 1.x)", "1024 (SD 2.x)", "load a matching model"]),
     (1024, 768, ["1024 (SD 2.x)", "768 (SD 1.x)"]),
     (768, 32, ["768 (SD 1.x)", "32 (tiny test model)"])],
)
def test_width_mismatch_is_skipped(folder, width, expected, words):
    _write(folder / "other.pt", d=width)
    _write(folder / "fits.pt", d=expected)
    lib = EmbeddingLibrary(folder)
    lib.refresh(expected_width=expected)
    assert lib.names() == ["fits"]
    (skip,) = lib.skipped
    assert skip.name == "other" and all(w in skip.reason for w in words)
    assert lib.refresh(expected_width=width) is True  # another model: re-evaluated
    assert lib.names() == ["other"]


def test_sdxl_width_reported(folder):
    parts = {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}
    formats.write(Embedding("xl", parts=parts), folder / "xl.safetensors")
    lib = EmbeddingLibrary(folder)
    lib.refresh(expected_width=768)
    assert "2048 (SDXL)" in lib.skipped[0].reason
    lib.refresh(expected_width=2048)
    assert lib.names() == ["xl"] and lib.vectors() == {}  # SDXL pairs are not SD prompt vectors


def test_same_name_keeps_shallower_then_alphabetical(folder):
    (folder / "sub").mkdir()
    _write(folder / "sub" / "foo.pt", seed=1)
    _write(folder / "foo.safetensors", seed=2)
    _write(folder / "foo.pt", seed=3)
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.get("foo").path == folder / "foo.pt"  # shallow beats deep; then 'foo.pt' < 'foo.safetensors'
    assert len(lib.collisions) == 2
    assert all("foo.pt" in c for c in lib.collisions)
    assert any("sub/foo.pt" in c for c in lib.collisions) and any("foo.safetensors" in c for c in lib.collisions)
    assert sorted(s.path.name for s in lib.skipped) == ["foo.pt", "foo.safetensors"]


def test_names_with_the_same_tokens_collide(folder, tokenizer):
    _write(folder / "Foo.pt", seed=1)
    _write(folder / "foo.pt", seed=2)
    _write(folder / "my-thing.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh(tokenizer=tokenizer)
    assert lib.names() == ["Foo", "foo", "my-thing"]
    (msg,) = lib.collisions
    assert "'Foo'" in msg and "'foo'" in msg and "Foo.pt" in msg and "prompts use 'Foo'" in msg


def test_vocabulary_word_warning(folder, tokenizer):
    _write(folder / "cat.pt")
    _write(folder / "xq-zzqv-emb.pt")
    lib = EmbeddingLibrary(folder)
    lib.refresh(tokenizer=tokenizer)
    (warning,) = lib.warnings
    assert "'cat'" in warning and "vocabulary word" in warning


def test_partial_file_is_skipped_then_picked_up(folder):
    full = _write(folder.parent / "full.pt").read_bytes()
    (folder / "late.pt").write_bytes(full[: len(full) // 3])  # a copy in progress
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert lib.names() == [] and lib.skipped[0].name == "late"
    with open(folder / "late.pt", "ab") as f:
        f.write(full[len(full) // 3 :])
    assert lib.refresh() is True
    assert lib.names() == ["late"] and lib.skipped == []


def test_rescans_racing_a_slow_copy_never_fail_or_load_a_torn_file(folder):
    # A peer (A1111, a file manager) copies a file in without a temp name while the UI timers and the trainer
    # rescan from their own threads: every rescan succeeds, and a loaded entry always holds the whole file.
    import threading
    import time

    src = _write(folder.parent / "slow.safetensors", n=75, seed=7)
    vec, data = formats.read(src).vectors, src.read_bytes()
    lib, done, errors, torn, seen = EmbeddingLibrary(folder), threading.Event(), [], [], set()

    def copier():
        with open(folder / "slow.safetensors", "wb") as f:
            for i in range(0, len(data), 512):
                f.write(data[i:i + 512])
                f.flush()
                time.sleep(0.002)
        done.set()

    def rescanner():
        while not done.is_set():
            try:
                lib.refresh()
                entry = lib.loaded.get("slow")
                seen.add("loaded" if entry else "skipped" if any(x.name == "slow" for x in lib.skipped) else "absent")
                if entry is not None and not torch.equal(entry.embedding.vectors, vec):
                    torn.append(entry)
            except Exception as e:  # noqa: BLE001 - any exception is the failure being tested for
                errors.append(e)

    threads = [threading.Thread(target=copier)] + [threading.Thread(target=rescanner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and torn == []
    assert "skipped" in seen  # the rescans really saw the copy half-way
    lib.refresh()
    assert lib.names() == ["slow"] and torch.equal(lib.get("slow").embedding.vectors, vec) and lib.skipped == []


def test_symlink_loop_does_not_hang(folder):
    _write(folder / "a.pt")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    lib = EmbeddingLibrary(folder)
    lib.refresh()
    assert "a" in lib.names()


# -- hostile and odd files (issue 12): each ends in "loaded" or "skipped: <plain reason>", quickly ---------------
# Every file is written here, byte by byte where no tool would write it. A reason never carries Python or
# torch internals ("pop from empty list", advice to use weights_only=False).
def _torch_zip(path: Path, pickled: bytes) -> Path:
    """A torch zip whose data.pkl is `pickled` (no tensors)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{path.stem}/data.pkl", pickled)
        z.writestr(f"{path.stem}/byteorder", "little")
        z.writestr(f"{path.stem}/version", "3\n")
    return path


def _vectors_pickle_prefix() -> bytes:
    """A protocol-2 pickle of {"string_to_param": {"*": float32 numpy [2, 8]}}, left open (no STOP) so that
    more items can be set into the dict."""
    import pickle

    import numpy as np

    return pickle.dumps({"string_to_param": {"*": np.ones((2, 8), np.float32)}}, protocol=2)[:-1]


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE


def _deep_dict_pt(path: Path, depth: int = 5000) -> None:
    # {"string_to_param": ..., "junk": {"a": {"a": ... 5000 levels}}}: torch.save cannot even write this
    body = _unicode("junk") + (b"}" + _unicode("a")) * depth + b"}" + b"s" * depth + b"s"
    _torch_zip(path, _vectors_pickle_prefix() + body + b".")


def _laughs_dict_pt(path: Path) -> None:
    # 60 levels of {"a": d, "b": d} sharing one d: 2^60 paths in a 1 KB file
    d: dict = {}
    for _ in range(60):
        d = {"a": d, "b": d}
    torch.save({"junk": d, "string_to_param": {"*": torch.ones(2, 8)}}, path)


def _laughs_tuple_key_pt(path: Path) -> None:
    # the key is 60 levels of (t, t): merely hashing it while building the dict takes 2^60 steps.
    # BINGET i, BINGET i, TUPLE2, BINPUT i+1; then EMPTY_DICT, BINGET 60, BININT1 1, SETITEM
    body = b"\x80\x02)q\x00" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) for i in range(60))
    _torch_zip(path, body + b"}h" + bytes([60]) + b"K\x01s.")


def _zlib_bomb_png(path: Path, inflated: int = 1 << 30) -> None:
    """An image embedding whose pixel data inflates to `inflated` bytes of JSON-looking text."""
    import zlib

    import numpy as np

    from tinv_ui import image_embedding

    def block(data: bytes) -> bytes:  # a raw deflate block that references nothing before it (full flush)
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        return z.compress(data) + z.flush(zlib.Z_FULL_FLUSH)

    head, body = b'{"name": "', b"A" * (1 << 20)
    checksum = zlib.adler32(head)
    for _ in range(inflated >> 20):
        checksum = zlib.adler32(body, checksum)
    repeated = block(body) * (inflated >> 20)  # the same bytes inflate to the same MB, a thousand times over
    stream = b"\x78\xda" + block(head) + repeated + b"\x03\x00" + checksum.to_bytes(4, "big")
    raw = np.frombuffer(stream, np.uint8)
    h = 256
    low = image_embedding.xor_block(image_embedding._pad_cyclic(raw & 0x0F, h))
    high = image_embedding.xor_block(image_embedding._pad_cyclic(raw >> 4, h))
    canvas = Image.new("RGB", (low.shape[1] + high.shape[1] + 10, h))
    canvas.paste(Image.fromarray(low), (0, 0))
    canvas.paste(Image.new("RGB", (8, h), (90, 90, 90)), (low.shape[1] + 1, 0))
    canvas.paste(Image.fromarray(high), (low.shape[1] + 10, 0))
    canvas.save(path)


def _huge_plain_png(path: Path, side: int = 13000) -> None:
    """A valid 13000x13000 1-bit PNG written row by row (21 MB of pixels, a few KB on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _big_ztxt_png(path: Path) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1024), zip=True)  # over Pillow's limit
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def _deep_json_png(path: Path) -> None:
    import base64

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode())
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def _sparse_safetensors(path: Path) -> None:
    # a valid header declaring 500 x 50000 float32 (100 MB), over a sparse file: nothing real on disk
    import json

    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [500, 50000], "data_offsets": [0, 100_000_000]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 100_000_000)


HOSTILE = {
    # name: (writer, words the skip reason must contain); None instead of words: the file loads
    "object-array.pt": (lambda p: torch.save({"string_to_param": {"*": __import__("numpy").array([[1.0, "a"]], dtype=object)}}, p),
                        ["ObjectDType", "only tensors, numbers and text"]),
    "text-array.pt": (lambda p: torch.save({"string_to_param": {"*": __import__("numpy").array([["a", "b"]])}}, p),
                      ["StrDType", "only tensors, numbers and text"]),
    "float8.pt": (lambda p: torch.save({"string_to_param": {"*": torch.ones(2, 32).to(torch.float8_e4m3fn)}}, p), None),
    "step-inf.pt": (lambda p: torch.save({"string_to_param": {"*": torch.ones(2, 32)}, "step": float("inf")}, p), None),
    "step-huge.pt": (lambda p: torch.save({"string_to_param": {"*": torch.ones(2, 32)}, "step": 10**40}, p), None),
    "huge-values.pt": (lambda p: torch.save({"string_to_param": {"*": torch.full((2, 32), 1e38)}}, p),
                       ["1e+38", "over the 10000 limit"]),
    "stride0-view.pt": (lambda p: torch.save({"string_to_param": {"*": torch.zeros(1, 1).expand(10**6, 10**6)}}, p),
                        ["(1000000, 1000000)", "at most 1000 vectors"]),
    "deep-dict.pt": (_deep_dict_pt, ["nests more than 48 levels"]),
    "laughs-dict.pt": (_laughs_dict_pt, ["billion laughs", "200,000"]),
    "laughs-tuple-key.pt": (_laughs_tuple_key_pt, ["billion laughs", "200,000"]),
    "pop-empty.pt": (lambda p: p.write_bytes(b"\x80\x02a."), ["not a readable torch file", "damaged"]),
    "sparse-100mb.safetensors": (_sparse_safetensors, ["95 MB", "over the 64 MB limit"]),
    "zlib-bomb.png": (_zlib_bomb_png, ["inflates to over 8 MB"]),
    "plain-13000px.png": (_huge_plain_png, ["13000x13000", "not decoded"]),
    "big-ztxt.png": (_big_ztxt_png, ["Pillow's safety limits", "1 MB per chunk"]),
    "deep-json.png": (_deep_json_png, ["nests too deeply"]),
}


def _high_water_kb() -> int:
    """This process's peak resident memory so far (VmHWM), in KB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def refresh_in_child(folder: Path, seconds: float = 20, extra_memory: int = 1 << 30) -> dict:
    """`EmbeddingLibrary(folder).refresh()` in a forked child limited to `seconds` and `extra_memory` bytes
    more address space than it starts with; returns what it loaded and skipped, or fails the test.

    A child, because a hostile file can hang inside C code (hashing a tuple) that no thread or signal
    interrupts, and can ask for more memory than the machine has; the child is killed instead. Also
    returns the rescan's `seconds` and the growth of the child's peak memory (`peak_mb`).
    """
    import pickle
    import resource
    import select
    import signal
    import time

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: limit, scan, report, exit without running the parent's cleanup
        try:
            os.close(read_end)
            vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (vm + extra_memory, vm + extra_memory))
            high_water_before = _high_water_kb()
            start = time.perf_counter()
            lib = EmbeddingLibrary(folder)
            lib.refresh()
            out = {"loaded": {n: (e.embedding.vectors, e.embedding.step) for n, e in lib.loaded.items()},
                   "skipped": [(s.path.name, s.name, s.reason) for s in lib.skipped],
                   "seconds": time.perf_counter() - start, "peak_mb": (_high_water_kb() - high_water_before) / 1024}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(e).__name__}: {e}"[:2000]}
        os.write(write_end, pickle.dumps(out))
        os._exit(0)
    os.close(write_end)
    data, deadline = b"", time.monotonic() + seconds
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the rescan did not return within {seconds} s")
            block = os.read(read_end, 1 << 20)
            if not block:
                break
            data += block
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert data, "the rescan's process died (out of memory?)"
    out = pickle.loads(data)
    assert "error" not in out, f"the rescan raised {out['error']}"
    return out


@pytest.mark.parametrize("file", list(HOSTILE))
def test_a_hostile_file_is_loaded_or_skipped_with_a_plain_reason(folder, file):
    writer, words = HOSTILE[file]
    writer(folder / file)
    _write(folder / "good.pt")
    out = refresh_in_child(folder)
    assert "good" in out["loaded"]
    stem = file.rsplit(".", 1)[0]
    if words is None:
        vectors, step = out["loaded"][stem]
        assert vectors.dtype == torch.float32 and step is None
        assert out["skipped"] == []
        return
    ((name, shown, reason),) = out["skipped"]
    assert name == file and shown == stem and stem not in out["loaded"]
    for word in words:
        assert word in reason, reason
    for internal in ("pop from", "weights_only", "Traceback", "WeightsUnpickler", "Error"):
        assert internal not in reason, reason


def test_float8_vectors_load_as_their_float32_values(folder):
    t = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)).to(torch.float8_e4m3fn)
    torch.save({"string_to_param": {"*": t}, "step": 3}, folder / "f8.pt")
    vectors, step = refresh_in_child(folder)["loaded"]["f8"]
    assert torch.equal(vectors, t.float()) and step == 3


def test_links_that_loop_or_dangle_are_listed_as_skipped(folder):
    _write(folder / "good.pt")
    (folder / "loop-a.pt").symlink_to(folder / "loop-b.pt")
    (folder / "loop-b.pt").symlink_to(folder / "loop-a.pt")
    (folder / "dangling.pt").symlink_to(folder / "gone.pt")
    out = refresh_in_child(folder)
    assert list(out["loaded"]) == ["good"]
    reasons = {name: reason for name, _, reason in out["skipped"]}
    assert set(reasons) == {"loop-a.pt", "loop-b.pt", "dangling.pt"}
    assert "symbolic link that points to itself in a loop" in reasons["loop-a.pt"]
    assert "symbolic link that points to a file that does not exist" in reasons["dangling.pt"]


def test_a_file_name_that_is_not_utf8_is_skipped_with_a_printable_reason(folder):
    good = _write(folder.parent / "src.pt")
    os.rename(good, os.path.join(os.fsencode(folder), b"caf\xe9.pt"))  # Latin-1 bytes from an old zip
    _write(folder / "good.pt")
    out = refresh_in_child(folder)
    assert list(out["loaded"]) == ["good"]
    ((_, shown, reason),) = out["skipped"]
    assert shown == "caf\ufffd" and "not valid UTF-8" in reason and "rename" in reason
    reason.encode("utf-8")  # shown in the page: must be valid text


def test_the_library_report_shows_names_and_reasons_literally(folder):
    # Anyone can drop a file into embeddings/: its name must never become HTML or Markdown in the page.
    import html
    import re

    from markdown_it import MarkdownIt

    from tinv_ui.ui.context import library_report

    hostile = ["<img src=x onerror=alert(1)>", "**x**", "[link](javascript:alert(1))", "`tick`", "a_b_c_", "# head"]
    for i, name in enumerate(hostile):
        _write(folder / f"{name}.pt", seed=i)
    _write(folder / "<i>wide<i>.pt", d=768)  # skipped (width): its name is in the skip line and the reason
    lib = EmbeddingLibrary(folder)
    lib.refresh(expected_width=32)
    assert sorted(lib.names()) == sorted(hostile)
    rendered = MarkdownIt("commonmark").render(library_report(lib))  # raw HTML allowed, as in Gradio's Markdown
    tags = set(re.findall(r"<(\w+)", rendered))
    assert tags <= {"p", "strong", "ul", "li", "code"}, tags
    text = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    for name in [*hostile, "<i>wide<i>"]:
        assert name in text, name


@pytest.mark.slow
@pytest.mark.parametrize("file", list(HOSTILE))
def test_one_hostile_file_adds_under_a_second_and_little_memory_to_a_rescan(tmp_path, file):
    # The bound: a rescan of a folder with one such file takes about a second more than without it.
    plain, with_it = tmp_path / "plain", tmp_path / "with-it"
    for folder in (plain, with_it):
        folder.mkdir()
        for i in range(5):
            _write(folder / f"good{i}.pt", seed=i)
    HOSTILE[file][0](with_it / file)
    refresh_in_child(plain)  # warm the imports (safetensors, PIL plugins) in the parent for both children
    base, hostile = refresh_in_child(plain), refresh_in_child(with_it)
    assert len(hostile["loaded"]) + len(hostile["skipped"]) == 6
    assert hostile["seconds"] - base["seconds"] < 1.0, (hostile["seconds"], base["seconds"])
    assert hostile["peak_mb"] - base["peak_mb"] < 256, (hostile["peak_mb"], base["peak_mb"])
