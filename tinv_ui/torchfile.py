"""Torch pickle files (`.pt`, `.bin`, `.optim`): write them so every peer accepts them, and measure one
before `torch.load` touches it.

Writing. `torch.save` in torch 2.13 adds `.format_version` and `.storage_alignment` entries to its zip;
A1111's safe unpickler (`modules/safe.py`, `check_zip_filenames`) refuses any entry but `data.pkl`,
`data/N`, `version`, `byteorder` and `.data/serialization_id` under one top folder, so a plain
`torch.save` file is "malicious" there. `save` keeps torch's own pickle and tensor records and rewrites
the zip with exactly the entries A1111 accepts (the set torch 2.1 itself writes, which torch 2.1 and 2.13
both read), under a top folder named after the file's stem, as `torch.save(obj, path)` names it. Records
stay uncompressed and 64-byte aligned, as torch writes them.

Measuring. `check` walks the pickle's opcodes without running them (`pickletools.genops` only parses)
and refuses, before any unpickling or allocation:
- a pickle whose objects, counted as often as they are referenced, exceed `MAX_OBJECTS` (shared
  references that expand exponentially, the "billion laughs" of lists, dicts or tuple keys whose hashing
  alone never ends), that nest deeper than `MAX_DEPTH`, or that contain themselves;
- tensor storages declaring more than `MAX_VALUES` values in all;
- zip containers that declare more than `MAX_FILE_BYTES` unpacked.
"""

from __future__ import annotations

import io
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

MAX_FILE_BYTES = 64 * 1024 * 1024  # an SDXL embedding with 75 vectors is 0.6 MB; LoRAs and models are larger
MAX_PICKLE_BYTES = 4 * 1024 * 1024  # the pickle part alone (tensor data lives beside it)
MAX_VALUES = 4_000_000  # numbers in all tensors of one file (16 MB of float32)
MAX_OBJECTS = 200_000  # pickled objects, each counted every time it is referenced
MAX_DEPTH = 48  # nesting of containers
_ALIGN = 64

# A1111 `modules/safe.py` `check_zip_filenames`: the only entries its safe unpickler lets through.
A1111_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|(\.data\/serialization_id)|(data\.pkl))$")


class TooBigError(ValueError):
    """The file is over one of the bounds above; the message names the bound."""


class DamagedError(ValueError):
    """The pickle is not well formed (truncated or corrupt)."""


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def save(payload: Any, path: str | Path, archive_name: str | None = None) -> None:
    """`torch.save(payload)` into `path` as a zip A1111's safe unpickler accepts.

    `archive_name` is the zip's top folder (default: the stem of `path`, as `torch.save` names it); pass
    the final file's stem when `path` is a temporary name. `payload` is anything `torch.save` takes:
    nested dicts/lists/tuples of tensors, numbers, text and bytes.
    """
    path = Path(path)
    archive = archive_name or path.stem or "archive"  # torch.save(obj, path) names it the same way
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, open(path, "wb") as out, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            inner = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            name = f"{archive}/{inner}"
            if not A1111_ZIP_ENTRY.match(name):
                continue  # .format_version, .storage_alignment: torch reads the file the same without them
            entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_STORED
            # Pad the local header's extra field so the record starts on a 64-byte boundary (torch's layout).
            start = out.tell() + 30 + len(name.encode("utf-8")) + 4
            entry.extra = b"FB" + struct.pack("<H", (-start) % _ALIGN) + b"Z" * ((-start) % _ALIGN)
            dst.writestr(entry, src.read(info.filename))


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------
def check(path: Path) -> None:
    """Raise `TooBigError` or `DamagedError` when `path` is over the bounds; return when torch may load it."""
    if zipfile.is_zipfile(path):
        _check_pickle(_zip_pickle(path), 1, capped=False)
        return
    with open(path, "rb") as f:  # legacy torch file (4 pickles in a row, then raw data) or a bare pickle
        data = f.read(MAX_PICKLE_BYTES + 1)
    _check_pickle(data[:MAX_PICKLE_BYTES], 4, capped=len(data) > MAX_PICKLE_BYTES)


def _zip_pickle(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > 10_000:
                raise TooBigError(f"it holds {len(infos)} entries; an embedding file holds a handful")
            unpacked = sum(i.file_size for i in infos)
            if unpacked > MAX_FILE_BYTES:
                raise TooBigError(f"it unpacks to {_mb(unpacked)}, over the {_mb(MAX_FILE_BYTES)} limit for one file")
            pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if not pickles:
                raise DamagedError("it is a zip without a data.pkl record, not a torch file")
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise TooBigError(f"its pickle is {_mb(pickles[0].file_size)}, over the {_mb(MAX_PICKLE_BYTES)} limit")
            return z.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as e:
        if isinstance(e, (TooBigError, DamagedError)):
            raise
        raise DamagedError("its zip container is damaged") from e


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n} bytes"


_LEAF_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8", "FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "GLOBAL", "EMPTY_LIST", "EMPTY_DICT",
    "EMPTY_TUPLE", "EMPTY_SET",
}
_FROM_MARK_OPS = {"LIST", "TUPLE", "DICT", "FROZENSET"}
_EXTEND_FROM_MARK_OPS = {"APPENDS", "SETITEMS", "ADDITEMS"}
_MARK = -1


class _Graph:
    """Objects of a pickle as nodes (index → child indices), built from its opcodes without running it."""

    def __init__(self) -> None:
        self.children: list[list[int]] = []
        self.values: list[Any] = []
        self.storages: list[int] = []  # persistent ids (tensor storages)

    def node(self, children: list[int] | None = None, value: Any = None) -> int:
        self.children.append(children or [])
        self.values.append(value)
        return len(self.children) - 1


def _check_pickle(data: bytes, max_pickles: int, capped: bool) -> None:
    """Measure up to `max_pickles` pickles in a row; `capped`: `data` is the first part of a longer file."""
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            return
        graph = _Graph()
        try:
            _build(graph, stream)
        except _Unknown:
            return  # an opcode torch's safe loader refuses anyway; it reports the file itself
        except (ValueError, EOFError, IndexError, KeyError, UnicodeDecodeError, struct.error) as e:
            if isinstance(e, TooBigError):
                raise
            if capped:
                raise TooBigError(f"its pickle is over the {_mb(MAX_PICKLE_BYTES)} limit") from e
            raise DamagedError("its pickle is damaged (truncated or corrupt)") from e
        _measure(graph)


class _Unknown(Exception):
    pass


def _build(g: _Graph, stream: io.BytesIO) -> None:
    stack: list[int] = []
    memo: dict[int, int] = {}

    def pop_mark() -> list[int]:
        items: list[int] = []
        while stack:
            top = stack.pop()
            if top == _MARK:
                return items[::-1]
            items.append(top)
        raise DamagedError("its pickle is damaged (unbalanced marks)")

    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if len(g.children) > MAX_OBJECTS:
            raise TooBigError(f"its pickle holds more than {MAX_OBJECTS:,} objects")
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return
        if name == "MARK":
            stack.append(_MARK)
        elif name in _LEAF_OPS:
            stack.append(g.node(value=arg if isinstance(arg, (int, str)) and not isinstance(arg, bool) else None))
        elif name in _FROM_MARK_OPS:
            stack.append(g.node(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            items = stack[-k:]
            del stack[-k:]
            stack.append(g.node(items))
        elif name == "APPEND":
            item = stack.pop()
            g.children[stack[-1]].append(item)
        elif name in _EXTEND_FROM_MARK_OPS:
            items = pop_mark()
            g.children[stack[-1]].extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            g.children[stack[-1]].extend((key, value))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg)])
        elif name == "STACK_GLOBAL":
            del stack[-2:]
            stack.append(g.node())
        elif name in ("REDUCE", "NEWOBJ"):
            args, func = stack.pop(), stack.pop()
            stack.append(g.node([func, args]))
        elif name == "NEWOBJ_EX":
            kwargs, args, cls = stack.pop(), stack.pop(), stack.pop()
            stack.append(g.node([cls, args, kwargs]))
        elif name == "BUILD":
            state = stack.pop()
            g.children[stack[-1]].append(state)
        elif name == "BINPERSID":
            pid = stack.pop()
            g.storages.append(pid)
            stack.append(g.node([pid]))
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        else:
            raise _Unknown(name)
    raise DamagedError("its pickle is truncated")


def _measure(g: _Graph) -> None:
    """Expanded size and depth of every node, iteratively (a DAG walk: linear in the pickle's length)."""
    n = len(g.children)
    size = [0] * n
    depth = [0] * n
    state = [0] * n  # 0 new, 1 on the walk's path, 2 done
    for root in range(n):
        if state[root]:
            continue
        todo = [(root, False)]
        while todo:
            node, leaving = todo.pop()
            if leaving:
                kids = g.children[node]
                size[node] = min(MAX_OBJECTS + 1, 1 + sum(size[k] for k in kids))
                depth[node] = 1 + max((depth[k] for k in kids), default=0)
                state[node] = 2
                if size[node] > MAX_OBJECTS:
                    raise TooBigError(f"its shared references expand to more than {MAX_OBJECTS:,} objects "
                                      "(a \"billion laughs\" file)")
                if depth[node] > MAX_DEPTH:
                    raise TooBigError(f"its data nests more than {MAX_DEPTH} levels deep")
                continue
            if state[node] == 2:
                continue
            if state[node] == 1:
                raise TooBigError("its data contains itself (a reference loop)")
            state[node] = 1
            todo.append((node, True))
            for k in g.children[node]:
                if state[k] == 1:
                    raise TooBigError("its data contains itself (a reference loop)")
                if state[k] == 0:
                    todo.append((k, False))
    values = 0
    for pid in g.storages:  # ('storage', StorageType, key, location, numel)
        kids = g.children[pid]
        numel = g.values[kids[4]] if len(kids) > 4 else None
        if isinstance(numel, int):
            values += max(numel, 0)
    if values > MAX_VALUES:
        raise TooBigError(f"its tensors declare {values:,} values, over the {MAX_VALUES:,} limit for one file")
