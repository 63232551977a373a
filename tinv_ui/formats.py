"""Read and write embedding files in every layout the TI ecosystem uses: A1111 (`EmbeddingDatabase.load_from_file`
in `modules/textual_inversion/textual_inversion.py`), diffusers' `load_textual_inversion`, kohya, ComfyUI, InvokeAI.

Layouts we read (detected from the keys, not the file name; see `_from_dict`):
- **a1111**: `.pt` dict with `string_to_param {"*": [n, d]}` plus name/step/sd_checkpoint metadata;
- **rinongal**: the original repo's `.pt`, whose `string_to_param` is an `nn.ParameterDict`;
- **sdxl**: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`, kept together in `Embedding.parts`;
- **kohya**: `{"emb_params": [n, d]}` in `.safetensors` or `.pt`;
- **diffusers**: `{token: [d] | [n, d]}` in `.bin` / `.safetensors` (1-D tensors become `[1, d]`);
- **image**: PNG/WebP carrying the A1111 dict in an `sd-ti-embedding` text chunk or in its pixels
  (codec in `image_embedding.py`).

Pickles (`.pt`, `.bin`) are loaded with `torch.load(weights_only=True)` plus a short allow-list of the
harmless types A1111-era files contain. Anything else is refused before it runs (`UnsafeFileError`).
Every write goes through `fileio.atomic_write`, so a crash never leaves a half-written embedding, and
pickles are written by `torchfile.save`, whose zip A1111's safe unpickler accepts.

Reading is bounded before any big allocation (a file may be hostile): the file size, the pickle's
expanded object count and nesting, the values a safetensors header or a tensor declares, an image's
pixels and its inflated data (limits below and in `torchfile.py`, `image_embedding.py`). A file over a
bound, or holding anything odd, raises `EmbeddingFormatError` with a plain reason; nothing else escapes.
"""

from __future__ import annotations

import collections
import collections.abc
import json
import logging
import math
import pickle
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .embedding import Embedding
from .errors import EmbeddingFormatError, UnsafeFileError
from . import torchfile
from .fileio import atomic_write

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin")
IMAGE_EMBEDDING_SUFFIXES = (".png", ".webp")
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", *IMAGE_EMBEDDING_SUFFIXES)
LAYOUTS = ("a1111", "kohya", "diffusers", "sdxl", "image")
A1111_TOKEN_ID = 265  # the constant A1111 writes under string_to_token; ignored on load
META_KEYS = ("sd_checkpoint", "sd_checkpoint_name")  # kept verbatim on every round trip that can hold them

# Bounds on what one file may hold (see the module docstring); tinv_ui/torchfile.py has the pickle ones.
MAX_FILE_BYTES = torchfile.MAX_FILE_BYTES
MAX_VALUES = torchfile.MAX_VALUES
MAX_VECTORS = 1000  # A1111 allows 75 per embedding
MAX_WIDTH = 8192  # CLIP-L 768, OpenCLIP-H 1024, SDXL-G 1280
MAX_ABS_VALUE = 1e4  # trained vectors stay well under 10; past 65504 they overflow half precision
MAX_STEP = 10**9
MAX_SAFETENSORS_HEADER = 1024 * 1024


# Where each kind of file this app writes loads: the README's "Where the files load" table is this table
# (tests/test_formats.py checks that, and checks every "yes" with each peer's loading rule).
# Columns: file, layout, A1111, ComfyUI, InvokeAI, diffusers `load_textual_inversion`, tinv-ui.
PEER_COLUMNS = ("File", "Layout", "A1111", "ComfyUI", "InvokeAI", "diffusers", "tinv-ui")
WHERE_FILES_LOAD = (
    ("NAME.pt", "a1111", "yes", "yes", "yes", "yes", "yes"),
    ("NAME.bin", "diffusers", "yes", "yes", "yes", "yes", "yes"),
    ("NAME.safetensors", "kohya", "yes", "yes", "yes", "with `token=`", "yes"),
    ("NAME.safetensors (SDXL)", "sdxl", "yes", "yes", "yes", "no", "yes"),
    ("NAME.pt (SDXL)", "sdxl", "yes", "yes", "yes", "no", "yes"),
    ("NAME.png", "image", "yes", "no", "no", "no", "yes"),
    ("NAME.webp", "image", "yes", "no", "no", "no", "yes"),
    ("NAME.pt.optim", "optimizer state", "yes", "-", "-", "-", "yes"),
)


class NotAnEmbeddingImage(EmbeddingFormatError):
    """An image with neither an `sd-ti-embedding` chunk nor pixel data: a preview, not an embedding."""


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
def read(path: str | Path) -> Embedding:
    """Load the embedding in `path`, whatever its layout.

    The name is the file stem (A1111 rule), except for image embeddings, which carry their own name.
    `meta["format"]` records the layout found. Raises `EmbeddingFormatError` (unknown layout, corrupt,
    empty, NaN) or `UnsafeFileError` (a pickle that wanted to run code; it was not run).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingFormatError(f"{path.name}: {suffix or 'no extension'} is not an embedding file; "
                                   f"use one of {', '.join(EMBEDDING_SUFFIXES)}.")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EmbeddingFormatError(f"{path.name}: cannot be read ({e.strerror}).") from e
    if size == 0:
        raise EmbeddingFormatError(f"{path.name} is empty (0 bytes); delete it or copy the file again.")
    if size > MAX_FILE_BYTES:
        raise EmbeddingFormatError(f"{path.name} is {size / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB limit "
                                   "for an embedding (is it a LoRA or a model? those go elsewhere).")
    try:
        if suffix in IMAGE_EMBEDDING_SUFFIXES:
            return _read_image(path)
        if suffix in PICKLE_SUFFIXES:
            data, file_meta = _load_pickle(path), {}
        else:
            data, file_meta = _load_safetensors(path)
        emb = _from_dict(data, path.stem, path.name)
        return _with_file_meta(emb, file_meta)
    except EmbeddingFormatError:
        raise
    except MemoryError as e:
        raise EmbeddingFormatError(f"{path.name}: not enough memory to read it; it is not a usable embedding.") from e
    except RecursionError as e:
        raise EmbeddingFormatError(f"{path.name}: its data nests too deeply to be an embedding.") from e
    except Exception as e:  # noqa: BLE001 - whatever a hostile file triggers, the answer is "not usable"
        log.debug("reading %s failed", path, exc_info=True)
        raise EmbeddingFormatError(f"{path.name} holds data that is not a usable embedding "
                                   f"({type(e).__name__} while reading it).") from e


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise EmbeddingFormatError(f"{path.name} is not a valid safetensors file (truncated or corrupt).") from e


def _check_safetensors_header(path: Path) -> None:
    """Read the JSON header ourselves and refuse declared sizes over the bounds before any tensor is built."""
    corrupt = EmbeddingFormatError(f"{path.name} is not a valid safetensors file (truncated or corrupt).")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt
        length = int.from_bytes(head, "little")
        if length > MAX_SAFETENSORS_HEADER:
            raise EmbeddingFormatError(f"{path.name}: its safetensors header is {length:,} bytes, over the "
                                       f"{MAX_SAFETENSORS_HEADER:,} byte limit for an embedding.")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as e:
            raise corrupt from e
    if not isinstance(header, dict):
        raise corrupt
    values = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise corrupt
        values += math.prod(shape)
    if values > MAX_VALUES:
        raise EmbeddingFormatError(f"{path.name}: its tensors declare {values:,} values, over the {MAX_VALUES:,} "
                                   "limit for an embedding.")


def _safe_globals() -> list[Any]:
    """The types an A1111-era pickle may name; each only rebuilds data, none can run code."""
    import numpy as np

    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    allowed: list[Any] = [
        torch.nn.ParameterDict, torch.nn.Parameter, collections.OrderedDict, set,  # rinongal ParameterDict
        np.ndarray, np.dtype,
        (multiarray.scalar, "numpy.core.multiarray.scalar"), (multiarray.scalar, "numpy._core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    ]
    allowed += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return allowed


_RE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_RE_BUILD = re.compile(r"but got <class '([\w.]+)'>")  # torch's refusal to BUILD a type outside the allow-list


def _load_pickle(path: Path) -> Any:
    try:
        torchfile.check(path)
    except torchfile.TooBigError as e:
        raise EmbeddingFormatError(f"{path.name} was not loaded: {e}.") from e
    except torchfile.DamagedError as e:
        raise EmbeddingFormatError(f"{path.name} is not a readable torch file (truncated or corrupt): {e}.") from e
    except OSError as e:
        raise EmbeddingFormatError(f"{path.name}: cannot be read ({e.strerror or 'I/O error'}).") from e
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            # torch warns about protocol-4 pickles before refusing them; the refusal below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = _RE_GLOBAL.search(text)
        if found or ("unsupported" in text.lower() and _is_pickle_stream(path)):
            what = f"it asks for {found.group(1)}" if found else "it uses pickle instructions outside the safe subset"
            raise UnsafeFileError(
                f"{path.name} was refused and not executed: {what}, which an embedding never needs. "
                "Only load files from sources you trust; ask for a .safetensors version."
            ) from e
        built = _RE_BUILD.search(text)
        if built:
            raise EmbeddingFormatError(f"{path.name} was not loaded: it holds a {built.group(1)} object, and an "
                                       "embedding holds only tensors, numbers and text.") from e
        # torch's own text advises weights_only=False, which would run the file: not repeated here
        raise EmbeddingFormatError(f"{path.name} is not a readable torch file (truncated or corrupt).") from e
    except Exception as e:  # noqa: BLE001 - torch reports damaged files through many exception types
        log.debug("torch.load(%s) failed", path, exc_info=True)
        raise EmbeddingFormatError(f"{path.name} is not a readable torch file (truncated or corrupt).") from e


def _is_pickle_stream(path: Path) -> bool:
    """True for a torch zip or a well-formed raw pickle: refusing it is then a safety decision, while
    random bytes (which the restricted unpickler also calls "unsupported") are just a corrupt file.
    Parsing opcodes with pickletools executes nothing."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
    except (ValueError, EOFError, UnicodeDecodeError):
        return False
    return True


def _as_tensor(value: Any, where: str, key: str) -> torch.Tensor:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":  # object, text, int arrays: no vectors there
            raise EmbeddingFormatError(f"{where}: {key} holds {value.dtype.name} values; expected floating point vectors.")
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFormatError(f"{where}: {key} holds {type(value).__name__}, not a tensor.")
    t = value.detach()
    if t.dim() == 1:  # diffusers' single-vector files store [d]
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] == 0:
        raise EmbeddingFormatError(f"{where}: {key} has shape {_shape(value)}; expected [num_vectors, width].")
    # Before anything allocates: a view can declare a huge shape over a one-number storage (stride 0).
    if t.shape[0] > MAX_VECTORS or t.shape[1] > MAX_WIDTH or t.numel() > MAX_VALUES:
        raise EmbeddingFormatError(f"{where}: {key} has shape {_shape(value)}; an embedding has at most "
                                   f"{MAX_VECTORS} vectors of width {MAX_WIDTH}.")
    if not t.is_floating_point():
        raise EmbeddingFormatError(f"{where}: {key} has dtype {str(t.dtype).removeprefix('torch.')}; "
                                   "expected floating point vectors.")
    t = t.to("cpu", torch.float32).contiguous()  # float8/bfloat16 included: checked as float32 below
    if not torch.isfinite(t).all():
        raise EmbeddingFormatError(
            f"{where}: {key} contains NaN or infinite values (a training run diverged); "
            "use an earlier saved copy of this embedding."
        )
    biggest = float(t.abs().max())
    if biggest > MAX_ABS_VALUE:
        raise EmbeddingFormatError(
            f"{where}: {key} holds a value of {biggest:.3g}, over the {MAX_ABS_VALUE:g} limit (trained vectors stay "
            "well under 10; such values overflow half precision and give black images). Use an earlier copy."
        )
    return t


def _shape(value: Any) -> str:
    shape = tuple(getattr(value, "shape", ()))
    return str(shape) if len(shape) <= 8 else f"({len(shape)} dimensions)"


def _from_dict(data: Any, name: str, where: str, source: str = "") -> Embedding:
    """Detect the layout of a loaded dict by its keys (a flat chain, in A1111's detection order)."""
    if not isinstance(data, collections.abc.Mapping):
        raise EmbeddingFormatError(f"{where} holds a {type(data).__name__}, not an embedding dict.")
    if "string_to_param" in data:
        # A1111 dict, or the original repo's ParameterDict: exactly one term, under whatever key it has.
        fmt, emb = _read_a1111(data, name, where)
    elif "clip_g" in data and "clip_l" in data:
        # SDXL: both encoders' vectors, kept together (width 768 + 1280).
        fmt, emb = "sdxl", _read_sdxl(data, name, where)
    elif "emb_params" in data:
        # kohya sd-scripts (SD 1.x/2.x).
        fmt, emb = "kohya", Embedding(name, _as_tensor(data["emb_params"], where, "emb_params"))
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        # diffusers concept {token: tensor}: the token text is kept only to write it back.
        fmt, emb = "diffusers", _read_diffusers(data, name, where)
    else:
        # Anything else: say which keys we saw, so the user can tell what tool wrote the file.
        keys = [_short_repr(k) for k in list(data.keys())[:13]]
        shown = ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else "") if keys else "none"
        raise EmbeddingFormatError(
            f"{where}: unknown embedding layout (keys found: {shown}); expected string_to_param (A1111), "
            "clip_l + clip_g (SDXL), emb_params (kohya) or a single {token: tensor} (diffusers)."
        )
    return _finish(emb, data, source or fmt)


def _short_repr(key: Any) -> str:
    """A key as the user may see it: text and numbers in short, anything else by its type."""
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        text = repr(key) if not isinstance(key, int) or abs(key) < 10**12 else "a huge number"
        return text if len(text) <= 40 else text[:37] + "...'"
    return f"a {type(key).__name__}"


def _read_a1111(data: collections.abc.Mapping, name: str, where: str) -> tuple[str, Embedding]:
    params = data["string_to_param"]
    fmt = "rinongal" if isinstance(params, torch.nn.ParameterDict) else "a1111"
    if not isinstance(params, (collections.abc.Mapping, torch.nn.ParameterDict)) or len(params) != 1:
        count = len(params) if hasattr(params, "__len__") else "no"
        raise EmbeddingFormatError(f"{where}: string_to_param has {count} terms; an embedding file must hold exactly one.")
    ((key, value),) = params.items()
    return fmt, Embedding(name, _as_tensor(value, where, f"string_to_param[{key!r}]"), meta={"token_key": key})


def _read_sdxl(data: collections.abc.Mapping, name: str, where: str) -> Embedding:
    parts = {k: _as_tensor(data[k], where, k) for k in ("clip_l", "clip_g")}
    if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
        raise EmbeddingFormatError(f"{where}: clip_l has {parts['clip_l'].shape[0]} vectors but clip_g "
                                   f"{parts['clip_g'].shape[0]}; they must match.")
    return Embedding(name, parts=parts)


def _read_diffusers(data: collections.abc.Mapping, name: str, where: str) -> Embedding:
    ((token, value),) = data.items()
    if not isinstance(token, str):
        raise EmbeddingFormatError(f"{where}: its single key is a {type(token).__name__}, not a token text.")
    meta = {"token": token, "squeezed": value.dim() == 1}  # written back 1-D if it came 1-D
    return Embedding(name, _as_tensor(value, where, repr(token)), meta=meta)


def _finish(emb: Embedding, data: collections.abc.Mapping, fmt: str) -> Embedding:
    """Attach what every layout may carry beside its tensors: step, checkpoint, internal name, dtype."""
    for key in META_KEYS:
        value = data.get(key)
        emb.meta.setdefault(key, value if value is None or (isinstance(value, str) and len(value) <= 256) else None)
    if isinstance(data.get("name"), str) and len(data["name"]) <= 256:
        emb.meta.setdefault("internal_name", data["name"])
    emb.meta["format"] = fmt
    dtype = _first_dtype(data)
    if dtype is not None and dtype != torch.float32 and not fmt.startswith("image"):  # JSON decodes as float64
        emb.meta["dtype"] = str(dtype).removeprefix("torch.")
    step = _int_or_none(data.get("step"))
    return replace(emb, step=step) if step is not None else emb


def _first_dtype(data: Any) -> torch.dtype | None:
    """The dtype of the first tensor, looking two levels deep (string_to_param's); never a full walk."""
    for value in data.values() if isinstance(data, collections.abc.Mapping) else ():
        if isinstance(value, torch.Tensor):
            return value.dtype
        if isinstance(value, collections.abc.Mapping):
            for inner in value.values():
                if isinstance(inner, torch.Tensor):
                    return inner.dtype
    return None


def _int_or_none(value: Any) -> int | None:
    """A step count, or None when it is missing or not a plausible one (NaN, inf, negative, 1e300, text)."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit() or len(value) > 12:
            return None
        value = int(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_STEP:
        return value
    return None


def _with_file_meta(emb: Embedding, file_meta: dict[str, str]) -> Embedding:
    """Take step/checkpoint from safetensors metadata (where we keep them, since the tensors can't)."""
    if not file_meta:
        return emb
    for key in META_KEYS:
        if key in file_meta and len(file_meta[key]) <= 256:
            emb.meta[key] = file_meta[key]
    if "name" in file_meta and len(file_meta["name"]) <= 256:
        emb.meta["internal_name"] = file_meta["name"]
    step = _int_or_none(file_meta.get("step"))
    if step is not None and emb.step is None:
        emb = replace(emb, step=step)
    return emb


def _read_image(path: Path) -> Embedding:
    from . import image_embedding

    try:
        data, source = image_embedding.read_image_data(path)
    except image_embedding.ImageDataError as e:
        raise EmbeddingFormatError(f"{path.name} was not loaded: {e}.") from e
    if data is None:
        raise NotAnEmbeddingImage(f"{path.name} is an image without embedding data (a preview?).")
    internal = data.get("name") if isinstance(data, collections.abc.Mapping) else None
    name = internal if isinstance(internal, str) and 0 < len(internal) <= 256 else path.stem
    return _from_dict(data, name, path.name, source=source)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def layout_for(path: Path, embedding: Embedding) -> str:
    """The layout a file name implies: .pt A1111, .safetensors kohya (SDXL pair; diffusers files stay
    diffusers), .bin diffusers, .png/.webp image."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EMBEDDING_SUFFIXES:
        return "image"
    if embedding.is_sdxl:
        return "sdxl"
    if suffix == ".safetensors" and embedding.meta.get("format") == "diffusers":
        return "diffusers"  # a diffusers learned_embeds.safetensors keeps its {token: tensor} layout
    return {".pt": "a1111", ".safetensors": "kohya", ".bin": "diffusers"}.get(suffix, "")


def write(embedding: Embedding, path: str | Path, layout: str | None = None, *, token: str | None = None,
          image: Any = None) -> Path:
    """Write `embedding` to `path` atomically and return the path.

    `layout` overrides the one implied by the suffix: "a1111", "kohya" (`emb_params`), "diffusers"
    (`{token: tensor}`, token defaults to the one read or the name), "sdxl" or "image" (PNG/WebP; `image`
    is the picture to carry the data, a plain card by default).
    """
    path = Path(path)
    layout = layout or layout_for(path, embedding)
    if not layout:
        raise EmbeddingFormatError(f"{path.name}: the suffix {path.suffix or '(none)'} names no embedding layout; "
                                   f"use one of {', '.join(EMBEDDING_SUFFIXES)}.")
    if layout not in LAYOUTS:
        raise EmbeddingFormatError(f"{path.name}: layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}.")
    _check_writable(embedding, layout, path)
    if layout == "image":
        from . import image_embedding

        data = a1111_dict(embedding)
        return atomic_write(path, lambda tmp: image_embedding.save_embedding_image(tmp, data, image, path.suffix))
    tensors = _tensors_for(embedding, layout, token)
    if path.suffix.lower() == ".safetensors":
        return atomic_write(path, lambda tmp: _save_safetensors(tensors, tmp, _safetensors_meta(embedding)))
    payload = a1111_dict(embedding) if layout in ("a1111", "sdxl") else tensors
    return atomic_write(path, lambda tmp: torchfile.save(payload, tmp, archive_name=path.stem))


def _check_writable(embedding: Embedding, layout: str, path: Path) -> None:
    tensors = [embedding.vectors] if embedding.vectors is not None else list(embedding.parts.values())
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise EmbeddingFormatError(f"{path.name}: the vectors contain NaN or infinite values; not written.")
    if embedding.is_sdxl and layout not in ("sdxl", "image"):
        raise EmbeddingFormatError(f"{path.name}: an SDXL embedding (clip_l + clip_g) can only be written as "
                                   "layout 'sdxl' (.safetensors or .pt).")
    if not embedding.is_sdxl and layout == "sdxl":
        raise EmbeddingFormatError(f"{path.name}: layout 'sdxl' needs clip_l + clip_g parts; this embedding has one tensor.")
    if (layout == "image") != (path.suffix.lower() in IMAGE_EMBEDDING_SUFFIXES):
        raise EmbeddingFormatError(f"{path.name}: layout {layout!r} does not fit the suffix {path.suffix or '(none)'}; "
                                   f"image embeddings are {' or '.join(IMAGE_EMBEDDING_SUFFIXES)} files and only they.")
    if layout == "a1111" and path.suffix.lower() == ".safetensors":
        raise EmbeddingFormatError(f"{path.name}: the A1111 dict is a pickle; write it to a .pt file "
                                   "(or use layout 'kohya' for .safetensors).")


def _clean(t: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: torch.save would otherwise store a view's whole underlying storage.
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def _tensors_for(embedding: Embedding, layout: str, token: str | None) -> dict[str, torch.Tensor]:
    if layout == "sdxl":
        return {k: _clean(embedding.parts[k]) for k in ("clip_l", "clip_g")}
    vectors = _clean(embedding.vectors)
    if layout == "diffusers":
        key = token or embedding.meta.get("token") or embedding.name
        squeeze = embedding.meta.get("squeezed") and vectors.shape[0] == 1
        return {key: vectors[0].clone() if squeeze else vectors}
    return {"emb_params": vectors}


def a1111_dict(embedding: Embedding) -> dict[str, Any]:
    """The A1111 `.pt` dict (`Embedding.save` in `modules/textual_inversion/textual_inversion.py`); SDXL embeddings are their clip_l/clip_g pair and nothing else.

    A1111's SDXL branch (`create_embedding_from_data`) calls `.detach()` on every value of the dict, so a
    `name` or `step` beside the pair would crash it; an SDXL pair keeps its metadata only in .safetensors.
    """
    if embedding.is_sdxl:
        return {"clip_l": _clean(embedding.parts["clip_l"]), "clip_g": _clean(embedding.parts["clip_g"])}
    base: dict[str, Any] = {"name": embedding.name, "step": embedding.step}
    base.update({k: embedding.meta.get(k) for k in META_KEYS})
    return {"string_to_token": {"*": A1111_TOKEN_ID}, "string_to_param": {"*": _clean(embedding.vectors)}, **base}


def _safetensors_meta(embedding: Embedding) -> dict[str, str]:
    meta = {"name": embedding.name}
    if embedding.step is not None:
        meta["step"] = str(embedding.step)
    meta.update({k: str(embedding.meta[k]) for k in META_KEYS if embedding.meta.get(k) is not None})
    return meta


def _save_safetensors(tensors: dict[str, torch.Tensor], tmp: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp), metadata=meta)


# ----------------------------------------------------------------------------------------------------
# Optimizer sidecar (A1111 `Embedding.save` writes `<file>.optim`)
# ----------------------------------------------------------------------------------------------------
def optim_path(embedding_path: str | Path) -> Path:
    """`<file>.optim` beside the embedding (A1111: `name.pt.optim`)."""
    p = Path(embedding_path)
    return p.with_name(p.name + ".optim")


def write_optim(embedding_path: str | Path, embedding: Embedding, optimizer_state_dict: dict,
                extra: dict | None = None) -> Path:
    """Write the optimizer state next to the embedding, tagged with the vectors' checksum.

    `extra` adds keys beside A1111's two (A1111 reads only `hash` and `optimizer_state_dict`)."""
    payload = {**(extra or {}), "hash": embedding.checksum(), "optimizer_state_dict": optimizer_state_dict}
    path = optim_path(embedding_path)
    return atomic_write(path, lambda tmp: torchfile.save(payload, tmp, archive_name=path.stem))


def read_optim(embedding_path: str | Path, embedding: Embedding) -> dict | None:
    """The saved optimizer state, or None when there is none or it belongs to other vectors."""
    sidecar = read_optim_sidecar(embedding_path, embedding)
    return None if sidecar is None else sidecar["optimizer_state_dict"]


def read_optim_sidecar(embedding_path: str | Path, embedding: Embedding) -> dict | None:
    """The whole `.optim` dict (`optimizer_state_dict` plus any extra keys), or None as `read_optim`.

    A damaged sidecar is not worth failing a run over: it is logged and ignored (training restarts
    AdamW from scratch, as A1111 does).
    """
    path = optim_path(embedding_path)
    if not path.is_file():
        return None
    try:
        data = _load_pickle(path)
    except EmbeddingFormatError as e:
        log.warning("ignoring optimizer state %s: %s", path.name, e)
        return None
    if not isinstance(data, dict) or "optimizer_state_dict" not in data:
        log.warning("ignoring optimizer state %s: unexpected layout", path.name)
        return None
    if data.get("hash") != embedding.checksum():
        log.info("optimizer state %s belongs to other vectors (hash %s); starting fresh", path.name, data.get("hash"))
        return None
    return data
