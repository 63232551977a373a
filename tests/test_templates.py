"""Templates: shipped files, lookup, [filewords]/[name] filling, shuffle, dropout, pre-flight check."""

import codecs
import random

import pytest

from tinv_ui.errors import ConfigError
from tinv_ui.templates import PromptBuilder, Template, decode_text, list_templates, load_template

SHIPPED = {"style": 19, "style_filewords": 19, "subject": 27, "subject_filewords": 27, "none": 1}


@pytest.mark.parametrize("name, count", SHIPPED.items())
def test_shipped_templates_have_name_in_every_line(name, count):
    t = load_template(name)
    assert len(t.lines) == count
    t.check()  # does not raise
    assert all("[name]" in line for line in t.lines)
    assert all("[filewords]" in line for line in t.lines) == name.endswith("_filewords")


def test_list_templates_includes_shipped_and_extra_dir(tmp_path):
    (tmp_path / "mine.txt").write_text("a [name]\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    assert set(SHIPPED) <= set(list_templates())
    names = list_templates(tmp_path)
    assert "mine" in names and "notes" not in names
    assert names == sorted(names, key=str.lower)


def test_load_by_name_with_suffix_by_path_and_from_extra_dir(tmp_path):
    assert load_template("style.txt").lines == load_template("style").lines
    f = tmp_path / "custom.txt"
    f.write_text("\n  a photo of [name]  \n\n[name], [filewords]\n", encoding="utf-8")
    t = load_template(str(f))
    assert t.lines == ("a photo of [name]", "[name], [filewords]")  # stripped, empty lines dropped
    assert load_template("custom", extra_dir=tmp_path).lines == t.lines


def test_unknown_and_empty_templates_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'nope' was not found.*style_filewords"):
        load_template("nope")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_template(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="template is empty"):
        load_template("")


def test_check_rejects_lines_without_name(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("a photo of [name]\npicture\na [filewords]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_template(f).check()
    msg = str(e.value)
    assert "template 'bad' has no [name] in 2 of 3 lines (line 2, 3 of the non-empty lines)" in msg
    assert "no gradient" in msg
    assert "picture" not in msg and "a [filewords]" not in msg  # never the file's content: it may be any file


def builder(lines, **kw):
    return PromptBuilder(Template("t", None, tuple(lines)), "myemb", **kw)


def test_filewords_is_replaced_first_then_name():
    b = builder(["[filewords] by [name]"])
    # a literal [name] inside a caption is substituted too (A1111's order)
    assert b("a photo of [name], red", random.Random(0)) == "a photo of myemb, red by myemb"


def test_tags_are_joined_with_comma_and_not_trimmed():
    b = builder(["[name]: [filewords]"], shuffle_tags=True)
    rng = random.Random(3)
    out = {b("a, b, c", rng) for _ in range(50)}
    # tags keep their leading spaces and are joined with ',' only
    assert "myemb: a, b, c" in out
    assert all(sorted(p[len("myemb: "):].split(",")) == [" b", " c", "a"] for p in out)
    assert len(out) > 1  # shuffled


def test_no_shuffle_keeps_order_and_lines_are_drawn_fresh_each_time():
    b = builder(["one [name] [filewords]", "two [name] [filewords]", "three [name] [filewords]"])
    rng = random.Random(0)
    out = [b("x, y", rng) for _ in range(60)]
    assert {p.split()[0] for p in out} == {"one", "two", "three"}  # a fresh line every use
    assert all(p.endswith("myemb x, y") for p in out)


def test_tag_dropout_drops_about_p_of_the_tags():
    b = builder(["[filewords]"], tag_dropout=0.5)
    rng = random.Random(1)
    caption = ",".join(f"t{i}" for i in range(20))
    kept = [len([t for t in b(caption, rng).split(",") if t]) for _ in range(200)]
    mean = sum(kept) / len(kept)
    assert 8 < mean < 12
    assert builder(["[filewords]"], tag_dropout=1.0)(caption, rng) == ""
    assert builder(["[filewords]"], tag_dropout=0.0)(caption, rng) == caption


def test_every_line_fills_each_line_without_randomness():
    b = builder(["a [name]", "b [name], [filewords]"], shuffle_tags=True, tag_dropout=0.9)
    assert b.every_line("x, y") == ["a myemb", "b myemb, x, y"]


@pytest.mark.parametrize(
    "data, text",
    [
        ("héllo".encode("utf-8"), "héllo"),
        (codecs.BOM_UTF8 + "héllo".encode("utf-8"), "héllo"),
        ("héllo".encode("utf-16"), "héllo"),  # BOM included by the codec
        (codecs.BOM_UTF16_BE + "héllo".encode("utf-16-be"), "héllo"),
        ("héllo".encode("utf-32"), "héllo"),
        ("héllo".encode("latin-1"), "héllo"),  # not valid UTF-8: latin-1 fallback
        (b"\xff\xfe\x00", "ÿþ\x00"),  # a broken UTF-16 BOM still decodes (latin-1), never raises
    ],
)
def test_decode_text_never_crashes(data, text):
    assert decode_text(data) == text
