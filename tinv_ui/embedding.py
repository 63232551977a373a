"""The `Embedding` value and the words used for it everywhere in this project.

Vocabulary (used in code, UI and docs alike):
- **embedding**: the learned object or its file;
- **vectors**: its rows, a float32 CPU tensor `[num_vectors, width]`; **num_vectors**: their count;
- **token**: the word typed in prompts to use it (the file stem, A1111 style);
- **initializer**: the text whose token rows initialise the vectors;
- **step**: an optimizer step; a **micro-batch** is one part of a gradient-accumulation group.

SDXL embeddings carry two tensors (`clip_l` [n, 768] and `clip_g` [n, 1280]); they are kept together in
`parts` and their width is the sum (2048), as A1111 reports it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import InvalidNameError

MAX_NAME_LENGTH = 120


@dataclass(frozen=True)
class Embedding:
    """An embedding: a name, its vectors (or SDXL parts), the step it was trained to and free metadata."""

    name: str
    vectors: torch.Tensor | None = None  # [num_vectors, width], float32, CPU
    step: int | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: {"clip_l": .., "clip_g": ..}
    meta: dict[str, Any] = field(default_factory=dict)  # sd_checkpoint, sd_checkpoint_name, source format, ...

    def __post_init__(self) -> None:
        if self.vectors is None and not self.parts:
            raise ValueError("an Embedding needs `vectors` or SDXL `parts`")
        if self.vectors is not None and self.vectors.dim() != 2:
            raise ValueError(f"vectors must be [num_vectors, width], got shape {tuple(self.vectors.shape)}")

    @property
    def is_sdxl(self) -> bool:
        return self.vectors is None

    @property
    def num_vectors(self) -> int:
        if self.vectors is not None:
            return int(self.vectors.shape[0])
        return int(self.parts["clip_g"].shape[0])

    @property
    def width(self) -> int:
        if self.vectors is not None:
            return int(self.vectors.shape[1])
        return sum(int(t.shape[-1]) for t in self.parts.values())

    @property
    def all_vectors(self) -> torch.Tensor:
        """`[num_vectors, width]`: the vectors, or an SDXL pair's clip_l and clip_g rows side by side (what the
        trainer optimises as one tensor)."""
        if self.vectors is not None:
            return self.vectors
        return torch.cat([self.parts["clip_l"], self.parts["clip_g"]], dim=1)

    def with_vectors(self, vectors: torch.Tensor, step: int | None = None, name: str | None = None) -> "Embedding":
        """A copy with new vectors (detached float32 CPU) and optionally a new step and name.

        For an SDXL pair `vectors` is `[n, width]` as `all_vectors` lays it out; it is split into clip_l/clip_g."""
        vectors = vectors.detach().to("cpu", torch.float32).clone()
        parts: dict[str, torch.Tensor] = {}
        if self.is_sdxl:
            split = int(self.parts["clip_l"].shape[1])
            parts = {"clip_l": vectors[:, :split].clone(), "clip_g": vectors[:, split:].clone()}
            vectors = None
        return replace(
            self,
            vectors=vectors,
            parts=parts,
            step=self.step if step is None else step,
            name=self.name if name is None else name,
        )

    def checksum(self) -> str:
        """A1111's 4-hex checksum of the vectors (used to match `.optim` sidecars).

        NaN/inf vectors have no checksum: we raise here rather than crash in the middle of a save
        (A1111 issue #9071); callers check `torch.isfinite` first.
        """
        t = self.vectors if self.vectors is not None else self.parts["clip_g"]
        flat = (t.detach().reshape(-1).to(torch.float32) * 100).tolist()
        r = 0
        for v in flat:
            r = ((r * 281) ^ (int(v) * 997)) & 0xFFFFFFFF
        return f"{r & 0xFFFF:04x}"


_ALLOWED_EXTRA = set("._- ")


def sanitize_name(name: str, field_name: str = "name") -> str:
    """Check an embedding name and return it normalised (NFC, trimmed).

    Like A1111, only letters, digits, `.`, `_`, `-` and space are kept allowed; unlike A1111 we refuse
    instead of silently dropping characters, so the file name is exactly what the user typed.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{field_name}: expected text, got {type(name).__name__}")
    clean = unicodedata.normalize("NFC", name).strip()
    if not clean:
        raise InvalidNameError(f"{field_name} is empty: type a name such as 'my-style'.")
    if len(clean) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"{field_name} is {len(clean)} characters long; use at most {MAX_NAME_LENGTH}.")
    bad = sorted({c for c in clean if not (c.isalnum() or c in _ALLOWED_EXTRA)})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise InvalidNameError(
            f"{field_name} {clean!r} contains {shown}; use only letters, digits, '.', '_', '-' and spaces."
        )
    if clean.startswith(".") or re.fullmatch(r"\.+", clean):
        raise InvalidNameError(f"{field_name} {clean!r} may not start with '.'; it would be a hidden file.")
    return clean
