"""Putting an embedding's name into a prompt where the cursor is, with the separators a person would type.

`insert_at(prompt, name, start, end)` replaces the selection `start:end` (an empty one is the caret) by the
name and returns the new prompt and the caret position after the name:

- after nothing, whitespace or an opening bracket nothing is added ("art by " → "art by name", "(" → "(name");
- after a comma a space ("a photo," → "a photo, name");
- after a word at the end of the prompt ", " (the name is a new tag: "a cat" → "a cat, name");
- after a word inside the prompt a space ("a photo of| in the rain" → "a photo of name in the rain"), the
  separator A1111 puts between a prompt and an inserted extra network (its `extra_networks_add_text_separator`);
- before a word a space; before whitespace, punctuation or a closing bracket nothing.

Caret positions come from the browser (JavaScript `selectionStart`/`selectionEnd`, UTF-16 code units); they
are converted to Python string indices here, and anything out of range is clamped (they arrive over HTTP).
"""

from __future__ import annotations

OPENERS = "([{<"
TIGHT_AFTER = ",.;:)]}>|"  # characters that take no space before them


def insert_at(prompt: str, name: str, start: int | None = None, end: int | None = None) -> tuple[str, int]:
    """(`prompt` with `name` in place of `prompt[start:end]`, the caret position just after the name).

    `start`/`end` are UTF-16 offsets as a browser reports them; None (or no caret known) means the end.
    """
    prompt = prompt or ""
    start = _index(prompt, start)
    end = max(start, _index(prompt, end if end is not None else start))
    before, after = prompt[:start], prompt[end:]
    if not after.strip():  # at the end: trailing spaces the person typed stay, nothing dangles after the name
        after = ""
    head = before + _left_separator(before, at_end=not after) + name
    return head + _right_separator(after) + after, _utf16_length(head)


def _left_separator(before: str, at_end: bool) -> str:
    last = before[-1:]
    if not last or last.isspace() or last in OPENERS:
        return ""
    if last == ",":
        return " "
    return ", " if at_end else " "


def _right_separator(after: str) -> str:
    first = after[:1]
    if not first or first.isspace() or first in TIGHT_AFTER:
        return ""
    return " "


def _index(text: str, utf16_offset: int | None) -> int:
    """The Python index of a UTF-16 offset into `text`, clamped to the text (None: its end)."""
    if utf16_offset is None:
        return len(text)
    units = 0
    for i, ch in enumerate(text):
        if units >= utf16_offset:
            return i
        units += 2 if ord(ch) > 0xFFFF else 1
    return len(text)


def _utf16_length(text: str) -> int:
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)
