"""A1111's image embeddings (`modules/textual_inversion/image_embedding.py`): the embedding dict carried inside a PNG/WebP.

Two carriers, both written, so a file survives tools that strip text chunks:
- a PNG `tEXt` chunk `sd-ti-embedding` = base64(JSON) where tensors are `{"TORCHTENSOR": [[...]]}`;
- the pixels: the zlib-compressed JSON split into low/high nibbles, each nibble array laid out as an
  h×W×3 block, decorated in the high bits, scrambled in the low bits with an LCG stream, and placed left
  and right of the picture on a black canvas. Decoding crops the black border and reverses the steps.

The layout is byte-compatible with A1111 (same LCG, padding, pattern and order), so images written here
load there and vice versa. WebP is written lossless (pixels only: WebP has no tEXt chunk).

Reading is bounded (an image in embeddings/ may be hostile): the pixel count is checked from the header
before decoding (`MAX_PIXELS`), the zlib stream in the pixels and the text chunk may yield at most
`MAX_JSON_BYTES` of JSON, and Pillow's own text-chunk limits are reported as such.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

TEXT_KEY = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
CHANNELS = 3
CARD_SIZE = 256  # the default picture carrying the data when the caller gives none
MAX_PIXELS = 4096 * 4096  # A1111 writes a card of a few hundred pixels plus the data columns
MAX_JSON_BYTES = 8 * 1024 * 1024  # 75 SDXL vectors are about 3 MB of JSON


class ImageDataError(ValueError):
    """Embedding data was found in an image but cannot be decoded."""


# -- JSON with tensors (A1111's {"TORCHTENSOR": [...]} encoding) ----------------------------------------------
def _encode_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {TENSOR_KEY: obj.detach().cpu().tolist()}
    raise TypeError(f"{type(obj).__name__} cannot be stored in an image embedding")


def _decode_hook(d: dict) -> Any:
    if TENSOR_KEY in d:
        return torch.tensor(d[TENSOR_KEY], dtype=torch.float64)  # float64 from the list, as A1111
    return d


def to_json(data: dict) -> str:
    """JSON text of an embedding dict, tensors as `{"TORCHTENSOR": nested list}`."""
    return json.dumps(data, default=_encode_default)


def from_json(text: str | bytes) -> dict:
    """Inverse of `to_json`: every `TORCHTENSOR` object becomes a float64 tensor.

    `ImageDataError` when it is not embedding JSON (including nesting too deep to parse, or a
    `TORCHTENSOR` that holds no numbers)."""
    if len(text) > MAX_JSON_BYTES:
        raise ImageDataError(f"its embedding data is {len(text) / 2**20:.0f} MB of JSON, over the "
                             f"{MAX_JSON_BYTES // 2**20} MB limit")
    try:
        return json.loads(text, object_hook=_decode_hook)
    except RecursionError as e:
        raise ImageDataError("its embedding data nests too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageDataError("its embedding data is not valid JSON") from e
    except (TypeError, RuntimeError, OverflowError) as e:  # raised by torch.tensor in _decode_hook
        raise ImageDataError(f"a {TENSOR_KEY} value in it holds no numeric vectors") from e


def to_b64(data: dict) -> str:
    """The `sd-ti-embedding` text-chunk value: base64 of the UTF-8 JSON."""
    return base64.b64encode(to_json(data).encode("utf-8")).decode("ascii")


def from_b64(text: str | bytes) -> dict:
    """Decode a `sd-ti-embedding` chunk value; `ImageDataError` when it is not valid base64 JSON."""
    if len(text) > MAX_JSON_BYTES * 4 // 3 + 4:
        raise ImageDataError(f"its {TEXT_KEY} text chunk is over the {MAX_JSON_BYTES // 2**20} MB limit")
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ImageDataError(f"its {TEXT_KEY} text chunk is damaged (not valid base64 JSON)") from e
    try:
        return from_json(raw)
    except ImageDataError as e:
        raise ImageDataError(f"its {TEXT_KEY} text chunk is damaged: {e}") from e


# -- pixel codec (the picture A1111 draws around the data) ----------------------------------------------------
_LCG_A, _LCG_C, _LCG_MASK = 1664525, 1013904223, 0xFFFFFFFF
_LCG_BLOCK = 4096


def _lcg_tables() -> tuple[np.ndarray, np.ndarray]:
    """Jump-ahead tables: k+1 steps from state s give (A[k]*s + C[k]) mod 2^32."""
    mults, adds = np.empty(_LCG_BLOCK, np.uint64), np.empty(_LCG_BLOCK, np.uint64)
    a_k, c_k = 1, 0
    for k in range(_LCG_BLOCK):
        a_k, c_k = (a_k * _LCG_A) & _LCG_MASK, (c_k * _LCG_A + _LCG_C) & _LCG_MASK
        mults[k], adds[k] = a_k, c_k
    return mults, adds


_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def lcg_stream(count: int, seed: int = 0) -> np.ndarray:
    """`count` outputs of A1111's LCG (m=2^32, a=1664525, c=1013904223), each `state % 255`, as uint8.

    Computed 4096 states at a time with jump-ahead tables; uint64 arithmetic wraps mod 2^64, which
    keeps every result exact mod 2^32.
    """
    global _TABLES
    if _TABLES is None:
        _TABLES = _lcg_tables()
    mults, adds = _TABLES
    out = np.empty(count, dtype=np.uint8)
    state = np.uint64(seed)
    for start in range(0, count, _LCG_BLOCK):
        states = (mults * state + adds) & np.uint64(_LCG_MASK)
        n = min(_LCG_BLOCK, count - start)
        out[start : start + n] = states[:n] % np.uint64(255)
        state = states[-1]
    return out


def xor_block(block: np.ndarray) -> np.ndarray:
    """XOR the low nibbles with the LCG stream (row-major, channel fastest; restarts per block)."""
    rand = lcg_stream(block.size).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), rand & 0x0F)


def style_block(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """XOR a grid of grey ellipses into the high nibbles (pure decoration; decoding drops it)."""
    h, w = block.shape[:2]
    canvas = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(canvas)
    i = 0
    for x in range(-6, w, 8):
        for row, y in enumerate(range(-6, h, 8)):
            offset = 4 if row % 2 == 0 else 0  # every other row shifted 4 px
            shade = int(shades[i % len(shades)])
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    return block ^ (np.asarray(canvas, dtype=np.uint8) & 0xF0)


def _edge_shades(data: dict) -> np.ndarray:
    """Ellipse shades from the first vector's first ≤1024 values: |v| / max|v| × 255."""
    if "string_to_param" in data:
        t = next(iter(data["string_to_param"].values()))
    else:
        t = data.get("clip_g", data.get("clip_l"))
    values = np.abs(np.asarray(t.detach().cpu().reshape(t.shape[0], -1)[0][:1024].tolist(), dtype=np.float64))
    top = values.max() if values.size else 0.0
    if top == 0:  # zero vectors: A1111 would divide by zero; plain black ellipses instead
        return np.zeros(max(values.size, 1), dtype=np.uint8)
    return (values / top * 255).astype(np.uint8)


def _pad_cyclic(nibbles: np.ndarray, h: int) -> np.ndarray:
    # Both steps always add at least one unit; padding repeats the data (np.resize), it is not zeros.
    size = nibbles.shape[0] + (h - nibbles.shape[0] % h)
    size = size + (h * CHANNELS - size % (h * CHANNELS))
    return np.resize(nibbles, size).reshape((h, -1, CHANNELS))


def insert_data(image: Image.Image, data: dict) -> Image.Image:
    """Compose [low-nibble block][black col][image][black col][high-nibble block] on a black canvas."""
    image = image.convert("RGB")
    raw = np.frombuffer(zlib.compress(to_json(data).encode("utf-8"), level=9), np.uint8)
    h = image.size[1]
    shades = _edge_shades(data)
    low = xor_block(style_block(_pad_cyclic(raw & 0x0F, h), shades))
    high = xor_block(style_block(_pad_cyclic(raw >> 4, h), shades[::-1]))
    im_low, im_high = Image.fromarray(low, mode="RGB"), Image.fromarray(high, mode="RGB")
    canvas = Image.new("RGB", (im_low.size[0] + image.size[0] + im_high.size[0] + 2, h), (0, 0, 0))
    canvas.paste(im_low, (0, 0))
    canvas.paste(image, (im_low.size[0] + 1, 0))
    canvas.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return canvas


def crop_black(pixels: np.ndarray) -> np.ndarray:
    """Drop outer rows/columns that have no pixel with all three channels > 0."""
    mask = (pixels > 0).all(axis=2)
    cols, rows = mask.any(axis=0), mask.any(axis=1)
    if not cols.any():
        return pixels[:0, :0]
    c0, c1 = int(cols.argmax()), mask.shape[1] - int(cols[::-1].argmax())
    r0, r1 = int(rows.argmax()), mask.shape[0] - int(rows[::-1].argmax())
    return pixels[r0:r1, c0:c1]


def extract_data(image: Image.Image) -> dict | None:
    """Decode pixel-carried data; None when the image holds none (e.g. a preview picture)."""
    nibbles = crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    zero_cols = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if zero_cols.size < 2:
        return None
    lower = xor_block(nibbles[:, : zero_cols.min(), :])
    upper = xor_block(nibbles[:, zero_cols.max() + 1 :, :])
    if lower.shape != upper.shape:
        return None
    stream = ((upper << 4) | lower).reshape(-1).tobytes()
    try:
        # trailing cyclic padding is ignored; max_length stops a zlib bomb before it is inflated
        text = zlib.decompressobj().decompress(stream, MAX_JSON_BYTES + 1)
    except zlib.error:
        return None  # black columns but no zlib stream: an ordinary picture
    if len(text) > MAX_JSON_BYTES:
        raise ImageDataError(f"the data in its pixels inflates to over {MAX_JSON_BYTES // 2**20} MB, the limit "
                             "for embedding JSON")
    try:
        return from_json(text)
    except ImageDataError as e:
        raise ImageDataError(f"the data in its pixels is damaged: {e}") from e


# -- files ----------------------------------------------------------------------------------------------
def read_image_data(path: Path) -> tuple[dict | None, str]:
    """(data, source) from an image file: the text chunk first, then the pixels; (None, "") if neither."""
    try:
        with Image.open(path) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > MAX_PIXELS:
                raise ImageDataError(f"it is {width}x{height} pixels, over the {MAX_PIXELS // 2**20} megapixel "
                                     "limit for an image embedding; it was not decoded")
            img.load()
            text = getattr(img, "text", {}).get(TEXT_KEY) or img.info.get(TEXT_KEY)
            if text:
                return from_b64(text), "image-text"
            data = extract_data(img)
    except Image.DecompressionBombError as e:
        raise ImageDataError("it is too many pixels to decode safely (Pillow's decompression-bomb limit)") from e
    except ValueError as e:
        if isinstance(e, ImageDataError):
            raise
        # Pillow refuses text chunks over PngImagePlugin.MAX_TEXT_CHUNK / MAX_TEXT_MEMORY with ValueError
        raise ImageDataError(f"its text chunks are over Pillow's safety limits "
                             f"({PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MB per chunk, "
                             f"{PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MB in all)") from e
    except (OSError, SyntaxError, EOFError) as e:
        raise ImageDataError("it is not a readable image (truncated or corrupt)") from e
    return (data, "image-pixels") if data is not None else (None, "")


def make_card(data: dict) -> Image.Image:
    """A plain dark card with the embedding's name, vectors and step: the default carrier picture."""
    card = Image.new("RGB", (CARD_SIZE, CARD_SIZE), (40, 44, 52))
    draw = ImageDraw.Draw(card)
    tensor = next(iter(data["string_to_param"].values())) if "string_to_param" in data else data["clip_g"]
    step = data.get("step")
    draw.text((12, 12), str(data.get("name") or ""), fill=(235, 235, 235), font=ImageFont.load_default(size=22))
    footer = f"{int(tensor.shape[0])}v {step if step is not None else 0}s"
    draw.text((12, CARD_SIZE - 34), footer, fill=(200, 200, 200), font=ImageFont.load_default(size=16))
    return card


def save_embedding_image(dest: Path, data: dict, image: Image.Image | None, suffix: str) -> None:
    """Write `data` into a PNG (text chunk + pixels) or a lossless WebP (pixels) at `dest`."""
    picture = insert_data(image if image is not None else make_card(data), data)
    if suffix.lower() == ".webp":
        picture.save(dest, format="WEBP", lossless=True, quality=100, exact=True)
        return
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, to_b64(data))
    picture.save(dest, format="PNG", pnginfo=info)
