"""The embeddings folder as a library: what is loaded, what was skipped and why, and name clashes.

Compared with A1111's `EmbeddingDatabase` (`modules/textual_inversion/textual_inversion.py`), on purpose:
- a rescan happens when any candidate file's (relative path, size, mtime_ns, inode) changed, so adding,
  deleting, overwriting in place and changes in subfolders are all seen (A1111 watches only the
  folder's own mtime and misses the last two);
- parsed files and their sha256 are cached per (path, size, mtime_ns, inode): a rescan re-reads only
  what changed;
- a file that cannot be used is listed in `skipped` with the reason, never silently dropped, and one
  bad file never aborts the scan: reading a file ends in "loaded" or "skipped: <reason>", whatever it
  holds (formats.read bounds the cost of each file), including links that loop or point nowhere and
  file names that are not valid UTF-8 (shown with U+FFFD for the bad bytes);
- the same name in two files keeps one deterministically (shallower path, then alphabetical) and
  says so in `collisions`; names that tokenize alike, or that are a real vocabulary word, are reported.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import formats
from .embedding import Embedding
from .errors import EmbeddingFormatError, TinvError
from .fileio import file_sha256

if TYPE_CHECKING:
    from .studio import Studio

log = logging.getLogger(__name__)

WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL CLIP-G only", 32: "tiny test model"}

_StatKey = tuple[str, int, int, int]  # (relative posix path, size, mtime_ns, inode)


@dataclass(frozen=True)
class LibraryEntry:
    """A loaded embedding: its prompt name, file, contents and the file's sha256."""

    name: str
    path: Path
    embedding: Embedding
    sha256: str

    @property
    def shorthash(self) -> str:
        """First 12 hex of the file's sha256 (A1111's `TI hashes` infotext value)."""
        return self.sha256[:12]


@dataclass(frozen=True)
class Skipped:
    """A candidate file that is not usable, and why."""

    path: Path
    name: str
    reason: str


@dataclass(frozen=True)
class _Parsed:
    """Cached result of reading one file version: an embedding (with sha256), an error, or 'not one'."""

    embedding: Embedding | None
    sha256: str = ""
    error: str = ""


def width_label(width: int) -> str:
    """`768 (SD 1.x)`: a width with the model family it belongs to, when known."""
    family = WIDTH_FAMILIES.get(width)
    return f"{width} ({family})" if family else str(width)


def printable(text: str) -> str:
    """`text` as UTF-8 can show it: bytes of a non-UTF-8 file name (surrogate escapes) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def fit_problem(emb: Embedding, expected_width: int | None, expected_parts: tuple[int, int] | None) -> str:
    """Why an embedding cannot be used with the loaded model (its family, SD 1.x/2.x vs SDXL, or its width), or
    "". `expected_width`/`expected_parts`: the studio's `embedding_width`/`embedding_parts` (None: no model)."""
    family = _family_mismatch(emb, expected_width, expected_parts)
    if family or expected_width is None or emb.width == expected_width:
        return family
    return f"width {width_label(emb.width)} does not fit the loaded model's {width_label(expected_width)}; load a matching model"


def _family_mismatch(emb: Embedding, expected_width: int | None, expected_parts: tuple[int, int] | None) -> str:
    """Why an embedding cannot be used with the loaded model's family (SD 1.x/2.x vs SDXL), or ""."""
    if expected_parts is not None:
        if not emb.is_sdxl:
            return (f"an SD 1.x/2.x embedding (width {width_label(emb.width)}) does not fit the loaded SDXL model, "
                    "which needs clip_l + clip_g pairs; load an SD 1.x/2.x model to use it")
        have = (int(emb.parts["clip_l"].shape[1]), int(emb.parts["clip_g"].shape[1]))
        if have != tuple(expected_parts):
            return (f"its SDXL pair is {have[0]} + {have[1]} wide; the loaded SDXL model needs "
                    f"{expected_parts[0]} + {expected_parts[1]}; load a matching model")
    elif emb.is_sdxl and expected_width is not None and emb.width != expected_width:
        return (f"an SDXL embedding (clip_l + clip_g, width {width_label(emb.width)}) does not fit the loaded "
                f"SD 1.x/2.x model (width {width_label(expected_width)}); load an SDXL model to use it")
    return ""


def _is_candidate(name: str) -> bool:
    lower = name.lower()
    if name.startswith("."):  # hidden files, and our atomic temp files `.<name>.XXXX.tmp`
        return False
    if ".preview." in lower:  # A1111 preview images beside image embeddings
        return False
    return os.path.splitext(lower)[1] in formats.EMBEDDING_SUFFIXES


def _depth_then_alpha(rel: str) -> tuple[int, str]:
    return rel.count("/"), rel


class EmbeddingLibrary:
    """The embeddings in one folder (recursively). Call `refresh()` before use; it is cheap when idle."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.loaded: dict[str, LibraryEntry] = {}
        self.skipped: list[Skipped] = []
        self.collisions: list[str] = []
        self.warnings: list[str] = []
        self._signature: Any = None
        self._cache: dict[_StatKey, _Parsed] = {}
        self._lock = threading.Lock()  # the UI and the trainer may refresh from different threads

    # -- scanning ---------------------------------------------------------------------------------------
    def refresh(self, expected_width: int | None = None, tokenizer: Any = None, force: bool = False,
                expected_parts: tuple[int, int] | None = None) -> bool:
        """Rescan if any file changed (or the width/tokenizer to check against did, or `force`).

        Returns True when a rescan happened. `expected_width` moves embeddings of another width to
        `skipped`; `tokenizer` enables the same-prompt-word and vocabulary-word checks. `expected_parts`
        (clip_l, clip_g widths) says the loaded model is SDXL: only such pairs are usable then.
        """
        with self._lock:
            files = self._candidates()
            tok_key = None if tokenizer is None else (id(tokenizer), len(tokenizer))
            signature = (tuple(files), expected_width, tok_key, expected_parts)
            if not force and signature == self._signature:
                return False
            if force:
                self._cache.clear()
            self._rebuild(files, expected_width, tokenizer, expected_parts)
            self._signature = signature
            return True

    def rescan_for(self, studio: Studio, force: bool = False) -> bool:
        """`refresh` for the studio's loaded model: its vector width and tokenizer (no model: no width check).

        Every caller (generation, training, the UI, the CLI) passes the same pair, so none forces a rebuild
        on another's behalf.
        """
        if not studio.loaded:
            return self.refresh(force=force)
        return self.refresh(expected_width=studio.embedding_width, tokenizer=studio.tokenizer, force=force,
                            expected_parts=studio.embedding_parts)

    def _candidates(self) -> list[_StatKey]:
        """Every candidate file with its stat key, sorted: the cheap change signature."""
        out: list[_StatKey] = []
        for path in self._walk():
            rel = path.relative_to(self.folder).as_posix()
            try:
                st = path.stat()
            except OSError as e:
                if not path.is_symlink():
                    continue  # deleted between listing and stat
                out.append((rel, -1, e.errno or 0, 0))  # a dangling link or a link loop: listed as skipped
                continue
            out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
        return sorted(out)

    def _walk(self) -> Iterator[Path]:
        if not self.folder.is_dir():
            return
        seen: set[str] = set()
        for root, dirs, files in os.walk(self.folder, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a symlink loop: each real folder is read once
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if _is_candidate(name):
                    yield Path(root) / name

    def _parse(self, key: _StatKey) -> _Parsed:
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        path = self.folder / key[0]
        shown = printable(key[0])
        try:
            if key[1] == -1:
                what = "points to itself in a loop" if key[2] == errno.ELOOP else "points to a file that does not exist"
                parsed = _Parsed(None, error=f"{shown}: it is a symbolic link that {what}; fix or delete the link")
            elif shown != key[0]:
                parsed = _Parsed(None, error=f"{shown}: its file name is not valid UTF-8 (shown with \ufffd for the bad "
                                             "bytes); rename the file")
            else:
                emb = formats.read(path)
                parsed = _Parsed(emb, sha256=file_sha256(path))
        except formats.NotAnEmbeddingImage:
            parsed = _Parsed(None)  # an ordinary picture: not listed anywhere, like A1111
        except EmbeddingFormatError as e:
            parsed = _Parsed(None, error=str(e))
        except OSError as e:  # vanished or unreadable mid-scan; the next refresh sees its new state
            parsed = _Parsed(None, error=f"{shown}: cannot be read ({e.strerror or 'I/O error'})")
        except Exception as e:  # noqa: BLE001 - one file never breaks the library, whatever it holds
            log.warning("reading %s failed", shown, exc_info=True)
            parsed = _Parsed(None, error=f"{shown}: could not be read as an embedding ({type(e).__name__})")
        self._cache[key] = parsed
        return parsed

    def _rebuild(self, files: list[_StatKey], expected_width: int | None, tokenizer: Any,
                 expected_parts: tuple[int, int] | None = None) -> None:
        # 1. read every file (cached per file version); bad files go to skipped with their reason
        live = set(files)
        self._cache = {k: v for k, v in self._cache.items() if k in live}
        skipped: list[Skipped] = []
        by_name: dict[str, list[LibraryEntry]] = {}
        for key in sorted(files, key=lambda k: _depth_then_alpha(k[0])):
            path = self.folder / key[0]
            parsed = self._parse(key)
            if parsed.error:
                skipped.append(Skipped(path, printable(path.stem), parsed.error))
                continue
            if parsed.embedding is None:
                continue
            emb = parsed.embedding
            # 2. family and width check against the loaded model
            if reason := fit_problem(emb, expected_width, expected_parts):
                skipped.append(Skipped(path, emb.name, reason))
                continue
            by_name.setdefault(emb.name, []).append(LibraryEntry(emb.name, path, emb, parsed.sha256))
        # 3. same name in several files: keep the shallowest, then alphabetical (the sort order above)
        collisions: list[str] = []
        loaded: dict[str, LibraryEntry] = {}
        for name, entries in by_name.items():
            keep, *others = entries
            loaded[name] = keep
            for other in others:
                collisions.append(f"name {name!r} is used by {self._rel(keep.path)} and {self._rel(other.path)}; "
                                  f"using {self._rel(keep.path)}. Rename one of the files.")
                skipped.append(Skipped(other.path, name, f"same name as {self._rel(keep.path)}, which is used "
                                                         "instead; rename this file"))
        # 4. sort case-insensitively (ties: exact string, so the order never depends on the walk)
        loaded = dict(sorted(loaded.items(), key=lambda kv: (kv[0].lower(), kv[0])))
        warnings: list[str] = []
        if tokenizer is not None:
            collisions += self._token_collisions(loaded, tokenizer, warnings)
        self.loaded, self.skipped, self.collisions, self.warnings = loaded, skipped, collisions, warnings
        log.info("embeddings: %d loaded, %d skipped from %s", len(loaded), len(skipped), self.folder)

    def _token_collisions(self, loaded: dict[str, LibraryEntry], tokenizer: Any, warnings: list[str]) -> list[str]:
        """Names that read as the same prompt word; names that are a single vocabulary word."""
        groups: dict[tuple[int, ...], list[str]] = {}
        for name in loaded:
            try:
                ids = tuple(tokenizer(name, add_special_tokens=False, truncation=False, verbose=False).input_ids)
            except Exception:  # noqa: BLE001 - an odd internal name of an image embedding must not break the scan
                warnings.append(f"{name!r} cannot be tokenized; rename its file.")
                continue
            if not ids:
                warnings.append(f"{name!r} tokenizes to nothing and can never match a prompt; rename its file.")
                continue
            groups.setdefault(ids, []).append(name)
            if len(ids) == 1:
                warnings.append(f"{name!r} is a single vocabulary word: every prompt using the word {name!r} "
                                "will use this embedding instead. Rename the file if that is not intended.")
        messages = []
        for names in groups.values():
            if len(names) > 1:  # the prompt tokenizer takes the first registered (our sorted order)
                files = ", ".join(self._rel(loaded[n].path) for n in names)
                messages.append(f"names {', '.join(repr(n) for n in names)} are the same prompt word to the "
                                f"tokenizer ({files}); prompts use {names[0]!r}. Rename the others.")
        return messages

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.folder).as_posix()
        except ValueError:
            return str(path)

    # -- access ---------------------------------------------------------------------------------------------
    def get(self, name: str) -> LibraryEntry:
        """The entry called `name` (exact, else the one case-insensitive match); TinvError if missing."""
        loaded = self.loaded
        if name in loaded:
            return loaded[name]
        folded = [n for n in loaded if n.lower() == name.lower()]
        if len(folded) == 1:
            return loaded[folded[0]]
        available = ", ".join(loaded) or "none"
        skipped = [s for s in self.skipped if s.name.lower() == name.lower()]
        why = f" It was skipped: {skipped[0].reason}." if skipped else ""
        raise TinvError(f"embedding {name!r} is not loaded from {self.folder}.{why} Available: {available}.")

    def names(self) -> list[str]:
        """Loaded names, sorted case-insensitively."""
        return list(self.loaded)

    def vectors(self) -> dict[str, torch.Tensor]:
        """name -> `[n, d]` vectors for prompt encoding (SDXL pairs are left out: SD models only)."""
        return {n: e.embedding.vectors for n, e in self.loaded.items() if e.embedding.vectors is not None}

    def hashes(self) -> dict[str, str]:
        """name -> 12-hex sha256 short hash, for the infotext's `TI hashes`."""
        return {n: e.shorthash for n, e in self.loaded.items()}
