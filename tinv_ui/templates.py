"""Prompt templates: text files of prompt lines with `[name]` (the embedding) and `[filewords]` (the caption).

Prompt construction follows A1111 (`PersonalizedBase.create_text` in `modules/textual_inversion/dataset.py`): pick a random line; split the caption on `,` (tags are not
trimmed); drop each tag with probability `tag_dropout`; optionally shuffle; replace `[filewords]` with the
tags joined by `,`; THEN replace `[name]` (so a literal `[name]` inside a caption is substituted too).

Difference from A1111: a fresh random line (and a fresh shuffle/dropout) is drawn every time an image is
used. A1111 freezes one line per image for the whole run unless shuffle or dropout is on.

The shipped templates (`tinv_ui/prompt_templates/`) are written for this project in the spirit and line
counts of A1111's: `style`, `style_filewords` (19 lines), `subject`, `subject_filewords` (27 lines) and
`none`, which is just `[name]` (A1111's `none.txt` had no `[name]` at all, so the embedding got no gradient).
"""

from __future__ import annotations

import codecs
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

SHIPPED_DIR = Path(__file__).parent / "prompt_templates"
NAME_TAG = "[name]"
FILEWORDS_TAG = "[filewords]"


def decode_text(data: bytes) -> str:
    """Decode a small text file whatever its encoding: BOM (UTF-8/UTF-16/UTF-32), else UTF-8, else latin-1.

    latin-1 maps every byte, so this never raises: odd encodings give odd characters, not a crash.
    """
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: LE BOMs overlap
        (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                break  # a BOM followed by garbage: fall through to the byte-wise decodings
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


@dataclass(frozen=True)
class Template:
    """A loaded template: its name, file and non-empty stripped lines."""

    name: str
    path: Path
    lines: tuple[str, ...]

    def check(self) -> None:
        """Raise `ConfigError` if any line lacks `[name]`: those prompts would train nothing."""
        missing = [number for number, line in enumerate(self.lines, 1) if NAME_TAG not in line]
        if missing:
            # Line numbers, never the lines: the file may not be a template at all, and a message must not
            # disclose what it holds.
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(
                f"template {self.name!r} has no [name] in {len(missing)} of {len(self.lines)} lines (line {shown} "
                "of the non-empty lines): the embedding would get no gradient from those prompts. Add [name] to "
                "every line or pick another template (e.g. style_filewords or subject_filewords)."
            )


def list_templates(extra_dir: str | Path | None = None) -> list[str]:
    """Names of the shipped templates plus the `.txt` files in `extra_dir` (sorted, case-insensitive)."""
    names = {p.stem for p in SHIPPED_DIR.glob("*.txt")}
    if extra_dir is not None and Path(extra_dir).is_dir():
        names |= {p.stem for p in Path(extra_dir).glob("*.txt") if p.is_file()}
    return sorted(names, key=str.lower)


def find_template(name_or_path: str | Path, extra_dir: str | Path | None = None) -> Path:
    """The file `load_template` would read for this name or path (a `ConfigError` when there is none)."""
    return _find(name_or_path, extra_dir)


def _find(name_or_path: str | Path, extra_dir: str | Path | None) -> Path:
    raw = str(name_or_path).strip()
    if not raw:
        raise ConfigError("template is empty: choose one of " + ", ".join(list_templates(extra_dir)) + ".")
    path = Path(raw).expanduser()
    if path.is_file():
        return path
    stem = raw[:-4] if raw.lower().endswith(".txt") else raw
    for folder in ([Path(extra_dir)] if extra_dir is not None else []) + [SHIPPED_DIR]:
        candidate = folder / f"{stem}.txt"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"template {raw!r} was not found: choose one of {', '.join(list_templates(extra_dir))}, "
        "or give the path of a .txt file with one prompt per line."
    )


def load_template(name_or_path: str | Path, extra_dir: str | Path | None = None) -> Template:
    """Load a template by shipped name, by name in `extra_dir`, or by file path. Empty lines are dropped."""
    path = _find(name_or_path, extra_dir)
    lines = tuple(s for s in (line.strip() for line in decode_text(path.read_bytes()).splitlines()) if s)
    if not lines:
        raise ConfigError(f"template {path.name!r} is empty: write one prompt per line, each with [name].")
    return Template(path.stem, path, lines)


@dataclass(frozen=True)
class PromptBuilder:
    """Builds training prompts from a template for one embedding name (see the module docstring)."""

    template: Template
    name: str
    shuffle_tags: bool = False
    tag_dropout: float = 0.0

    def fill(self, line: str, caption: str, rng: random.Random) -> str:
        """Fill one template line: `[filewords]` first, then `[name]` (A1111's order)."""
        tags = caption.split(",")
        if self.tag_dropout > 0:
            tags = [t for t in tags if rng.random() > self.tag_dropout]
        if self.shuffle_tags:
            rng.shuffle(tags)
        return line.replace(FILEWORDS_TAG, ",".join(tags)).replace(NAME_TAG, self.name)

    def __call__(self, caption: str, rng: random.Random) -> str:
        """A prompt for one use of an image: a fresh random line every call."""
        return self.fill(rng.choice(self.template.lines), caption, rng)

    def every_line(self, caption: str) -> list[str]:
        """Each template line filled with `caption` (no dropout/shuffle), for pre-flight checks."""
        plain = PromptBuilder(self.template, self.name)
        return [plain.fill(line, caption, random.Random(0)) for line in self.template.lines]
