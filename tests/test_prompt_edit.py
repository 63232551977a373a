"""Where "Insert embedding" puts a name: at the caret or over the selection, with the separators a person types."""

from __future__ import annotations

import pytest

from tinv_ui.prompt_edit import insert_at


@pytest.mark.parametrize(("prompt", "start", "end", "expected"), [
    ("", 0, 0, "emb"),
    ("art by ", 7, 7, "art by emb"),
    ("a photo,", 8, 8, "a photo, emb"),
    ("a cat", 5, 5, "a cat, emb"),  # appended after a word: a new tag
    ("(", 1, 1, "(emb"),
    ("a photo of in the rain", 10, 10, "a photo of emb in the rain"),  # inside: words, not tags
    ("a photo of  in the rain", 11, 11, "a photo of emb in the rain"),  # between the two spaces: none added
    ("a photo, in the rain", 8, 8, "a photo, emb in the rain"),
    ("masterpiece, best quality", 0, 0, "emb masterpiece, best quality"),
    ("a (cat:1.2)", 3, 6, "a (emb:1.2)"),  # the selection "cat" is replaced
    ("a photo of OLD, dark", 11, 14, "a photo of emb, dark"),
    ("art by ", None, None, "art by emb"),  # no caret known: the end
])
def test_the_name_goes_to_the_caret_with_sensible_separators(prompt, start, end, expected):
    text, caret = insert_at(prompt, "emb", start, end)
    assert text == expected
    assert text[:caret].endswith("emb")  # the caret lands just after the name


def test_browser_offsets_are_utf16_and_out_of_range_offsets_are_clamped():
    # "🙂" is two UTF-16 units in the browser, one character here
    assert insert_at("🙂 by ", "emb", 6, 6) == ("🙂 by emb", 9)
    assert insert_at("a cat", "emb", 999, 999)[0] == "a cat, emb"
    assert insert_at("a cat", "emb", -5, -5)[0] == "emb a cat"
    assert insert_at("a cat", "emb", 4, 1)[0] == "a ca emb t"  # end before start: an empty selection at start
