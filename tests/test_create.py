"""create_embedding: initializer rows (repeat/truncate, SD2 subsample), zeros, overwrite rules and unsafe names."""

from __future__ import annotations

import pytest
import torch

from tinv_ui import formats
from tinv_ui.config import CreateConfig
from tinv_ui.create import create_embedding, init_token_ids, spread_rows
from tinv_ui.errors import ConfigError, InvalidNameError


def _rows(studio, text: str) -> torch.Tensor:
    ids = studio.tokenizer(text, add_special_tokens=False).input_ids
    return studio.text_encoder.get_input_embeddings().weight[ids].detach().float()


@pytest.mark.parametrize(
    ("initializer", "n", "pattern"),
    [
        ("cat", 4, [0, 0, 0, 0]),  # T < n: repeated
        ("red cat", 4, [0, 0, 1, 1]),  # t0,t0,t1,t1
        ("red cat", 1, [0]),
        ("a red cat", 2, [0, 1]),  # T > n: the first n tokens
        ("a red cat", 5, [0, 0, 1, 1, 2]),  # floor(i*3/5)
        ("a red cat", 3, [0, 1, 2]),
    ],
)
def test_initializer_rows(studio, paths, initializer, n, pattern):
    path = create_embedding(studio, CreateConfig(name="e", initializer=initializer, num_vectors=n), paths.embeddings_dir)
    emb = formats.read(path)
    rows = _rows(studio, initializer)
    assert rows.shape[0] == len(initializer.split())  # one CLIP token per word here
    assert torch.equal(emb.vectors, rows[pattern])
    assert emb.step == 0 and emb.width == studio.embedding_width


@pytest.mark.parametrize(
    ("initializer", "n", "pattern"),
    [
        ("a big red cat", 2, [0, 2]),  # floor(i*4/2): evenly subsampled, not the first two
        ("one two three four five six", 3, [0, 2, 4]),
        ("a red cat", 5, [0, 0, 1, 1, 2]),  # T < n repeats as on SD1
    ],
)
def test_sd2_width_subsamples_the_initializer_evenly(studio, paths, monkeypatch, initializer, n, pattern):
    # A1111 tokenizes SD 2.x initializers with OpenCLIP and no truncation; the model family is told by width.
    monkeypatch.setattr(type(studio), "embedding_width", property(lambda self: 1024))
    path = create_embedding(studio, CreateConfig(name="e2", initializer=initializer, num_vectors=n),
                            paths.embeddings_dir)
    rows = _rows(studio, initializer)
    assert rows.shape[0] == len(initializer.split())
    assert torch.equal(formats.read(path).vectors, rows[pattern])


def test_init_token_ids_truncates_only_on_request(studio):
    ids = studio.tokenizer("a red cat", add_special_tokens=False).input_ids
    assert init_token_ids(studio.tokenizer, "a red cat", 2) == ids[:2]
    assert init_token_ids(studio.tokenizer, "a red cat", 2, truncate=False) == ids


def test_cat_is_one_clip_token(studio):
    assert studio.tokenizer("cat", add_special_tokens=False).input_ids == [2368]


def test_spread_rows_table():
    rows = torch.arange(3.0).unsqueeze(1)
    assert spread_rows(rows, 7).squeeze(1).tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_empty_initializer_gives_zeros(studio, paths):
    path = create_embedding(studio, CreateConfig(name="z", initializer="", num_vectors=3), paths.embeddings_dir)
    emb = formats.read(path)
    assert torch.equal(emb.vectors, torch.zeros(3, studio.embedding_width))


def test_whitespace_initializer_is_refused(studio, paths):
    with pytest.raises(ConfigError, match="initializer has no tokens; leave it empty for zero vectors"):
        create_embedding(studio, CreateConfig(name="w", initializer="   ", num_vectors=2), paths.embeddings_dir)
    assert list(paths.embeddings_dir.iterdir()) == []


def test_file_layout_and_default_initializer(studio, paths):
    path = create_embedding(studio, CreateConfig(name="star"), paths.embeddings_dir)
    assert path == (paths.embeddings_dir / "star.pt").resolve()
    raw = torch.load(path, weights_only=True)
    assert raw["name"] == "star" and raw["step"] == 0 and raw["sd_checkpoint"] is None
    assert raw["string_to_token"] == {"*": 265}
    assert torch.equal(raw["string_to_param"]["*"], _rows(studio, "*"))


def test_safetensors_format(studio, paths):
    path = create_embedding(studio, CreateConfig(name="s", initializer="cat", num_vectors=2, file_format="safetensors"),
                            paths.embeddings_dir)
    assert path.suffix == ".safetensors"
    emb = formats.read(path)
    assert emb.meta["format"] == "kohya" and emb.step == 0 and torch.equal(emb.vectors, _rows(studio, "cat")[[0, 0]])


def test_existing_file_needs_overwrite(studio, paths):
    first = create_embedding(studio, CreateConfig(name="dup", initializer="cat"), paths.embeddings_dir)
    before = first.read_bytes()
    with pytest.raises(InvalidNameError, match="already exists.*overwrite"):
        create_embedding(studio, CreateConfig(name="dup", initializer="dog"), paths.embeddings_dir)
    assert first.read_bytes() == before  # the refused create left the file byte for byte as it was
    path = create_embedding(studio, CreateConfig(name="dup", initializer="dog", num_vectors=2, overwrite=True),
                            paths.embeddings_dir)
    assert torch.equal(formats.read(path).vectors, _rows(studio, "dog")[[0, 0]])
    assert sorted(p.name for p in paths.embeddings_dir.iterdir()) == ["dup.pt"]  # no temp files left


def test_same_name_in_another_format(studio, paths):
    create_embedding(studio, CreateConfig(name="x", file_format="safetensors"), paths.embeddings_dir)
    with pytest.raises(InvalidNameError, match="already exists"):
        create_embedding(studio, CreateConfig(name="x"), paths.embeddings_dir)
    with pytest.raises(InvalidNameError, match="x.safetensors.*another format"):
        create_embedding(studio, CreateConfig(name="x", overwrite=True), paths.embeddings_dir)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../x", "'/'"),
        ("a/b", "'/'"),
        ("..", "'.'"),
        (".hidden", "'.'"),
        ("", "empty"),
        ("a\\b", "contains"),
        ("x" * 121, "at most 120"),
        ("é" * 110, "200 bytes"),
        ("nul\x00byte", "contains"),
    ],
)
def test_unsafe_names_are_refused(studio, paths, name, words):
    with pytest.raises(InvalidNameError) as info:
        create_embedding(studio, CreateConfig(name=name), paths.embeddings_dir)
    assert "name" in str(info.value)
    assert words in str(info.value)
    assert not any(paths.embeddings_dir.parent.rglob("x.pt")) and list(paths.embeddings_dir.iterdir()) == []


def test_unicode_name_is_allowed(studio, paths):
    path = create_embedding(studio, CreateConfig(name="café-ñ", initializer="cat"), paths.embeddings_dir)
    assert path.name == "café-ñ.pt" and path.parent == paths.embeddings_dir.resolve()


def test_studio_is_left_unchanged_and_unlocked(studio, paths):
    before = studio.text_encoder.get_input_embeddings().weight.detach().clone()
    n_tokens = len(studio.tokenizer)
    create_embedding(studio, CreateConfig(name="u", initializer="a red cat", num_vectors=3), paths.embeddings_dir)
    assert len(studio.tokenizer) == n_tokens
    assert torch.equal(studio.text_encoder.get_input_embeddings().weight, before)
    assert studio.busy_with == ""
