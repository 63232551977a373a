"""tokens.py: emphasis parsing, embedding matching on token ids, chunking, splicing and reversibility."""

from __future__ import annotations

import pytest
import torch

from tinv_ui.tokens import CHUNK_TOKENS, PLACEHOLDER_ID, PromptEncoder, PromptTokenizer, parse_emphasis, spliced


# -- emphasis parse table (A1111's own examples) ----------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("[less]", [("less", 1 / 1.1)]),
        ("(x:1.5) y", [("x", 1.5), (" y", 1.0)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
          (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_emphasis(text, expected):
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


# -- helpers --------------------------------------------------------------------------------------------------
def _rows(studio, word: str) -> torch.Tensor:
    ids = studio.tokenizer(word, add_special_tokens=False).input_ids
    return studio.text_encoder.get_input_embeddings().weight[ids].detach().clone()


def _vec(studio, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, studio.embedding_width, generator=torch.Generator().manual_seed(seed))


def _state(studio):
    emb = studio.text_encoder.get_input_embeddings()
    te = getattr(studio.text_encoder, "text_model", studio.text_encoder)
    return len(studio.tokenizer), emb.weight.detach().clone(), te.embeddings.token_embedding


# -- matching -----------------------------------------------------------------------------------------------------
def test_embedding_vectors_replace_the_word(studio):
    """An embedding whose vector is cat's row encodes exactly like the word 'cat'."""
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {"zqxemb": _rows(studio, "cat")})
    with torch.no_grad():
        with_emb, used = enc.encode(["a photo of zqxemb"])
        plain, none_used = enc.encode(["a photo of cat"])
    assert used == ["zqxemb"] and none_used == []
    assert torch.equal(with_emb, plain)


def test_case_insensitive_and_longest_match(studio):
    tok = PromptTokenizer(studio.tokenizer, {"MyStyle": 1, "mystyle-xl": 2})
    short = tok("a MYSTYLE photo")
    assert short.used == ["MyStyle"]
    longer = tok("a mystyle-xl photo")
    assert longer.used == ["mystyle-xl"]  # the longer id sequence wins over its prefix
    assert longer.ids[0].count(PLACEHOLDER_ID) == 2


def test_multi_vector_embedding_uses_its_slots(studio):
    tok = PromptTokenizer(studio.tokenizer, {"threevec": 3})
    plain = tok("a cat")
    out = tok("a threevec cat")
    assert out.token_count == plain.token_count + 3
    assert out.fixes == [(0, 2, "threevec")]  # after BOS and "a"
    assert out.ids[0][2:5] == [PLACEHOLDER_ID] * 3


def test_emphasis_applies_to_every_vector(studio):
    out = PromptTokenizer(studio.tokenizer, {"threevec": 3})("a (threevec:1.2) cat")
    assert out.weights[0][2:5] == pytest.approx([1.2] * 3)
    assert out.weights[0][1] == 1.0 and out.weights[0][5] == 1.0


def test_emphasis_scales_the_encoder_output_then_restores_its_mean(studio):
    # A1111: z *= weights per token, then z *= old_mean / new_mean. The tiny model's final LayerNorm has a zero
    # bias (outputs of mean ~0); give it a real model's kind of offset for this test.
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {})
    norm = getattr(studio.text_encoder, "text_model", studio.text_encoder).final_layer_norm
    with torch.no_grad():
        norm.bias += 0.5
        try:
            plain, _ = enc.encode(["a photo of a cat"])
            weighted, _ = enc.encode(["a photo of a (cat:1.5)"])
        finally:
            norm.bias -= 0.5
    weights = torch.ones(plain.shape[1])
    weights[5] = 1.5  # BOS, a, photo, of, a, cat
    expected = plain * weights[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    assert not torch.equal(plain, weighted)
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())


def test_emphasis_on_a_zero_mean_output_stays_finite(studio):
    # Where the mean is ~0 the ratio would be 0/0 (A1111 gives NaN images); the scaled output is kept instead.
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {})
    with torch.no_grad():
        plain, _ = enc.encode(["a photo of a cat"])
        weighted, _ = enc.encode(["a photo of a (cat:1.5)"])
    assert plain.mean().abs() < 1e-4 * plain.abs().mean()  # the tiny model's case
    assert torch.isfinite(weighted).all()
    torch.testing.assert_close(weighted[0, 5], plain[0, 5] * 1.5)
    torch.testing.assert_close(weighted[0, 4], plain[0, 4])


def test_chunking_over_75_tokens(studio):
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {})
    prompt = " ".join(["cat"] * 80)
    tp = enc.tokenize(prompt)
    assert len(tp.ids) == 2 and all(len(c) == CHUNK_TOKENS + 2 for c in tp.ids)
    with torch.no_grad():
        cond, _ = enc.encode([prompt, "short"])
        one, _ = enc.encode([prompt], max_chunks=1)
    assert cond.shape == (2, 154, studio.embedding_width)
    assert one.shape == (1, 77, studio.embedding_width)


def test_embedding_that_does_not_fit_moves_to_next_chunk(studio):
    tok = PromptTokenizer(studio.tokenizer, {"threevec": 3})
    out = tok(" ".join(["cat"] * 74) + " threevec")
    assert len(out.ids) == 2
    assert out.fixes == [(1, 1, "threevec")]
    assert out.ids[0][75:] == [tok.eos, tok.eos]  # first chunk padded with EOS


def test_sd2_tokenizer_pads_with_its_pad_id_after_the_first_eos(studio):
    """OpenCLIP (SD 2.x) pads with id 0 after the first EOS, as A1111 does; SD 1.x pads with EOS."""
    import copy

    sd2 = copy.deepcopy(studio.tokenizer)
    sd2.pad_token = "!"
    assert sd2.pad_token_id == 0
    ids = PromptTokenizer(sd2, {})("a cat").ids[0]
    n = len(studio.tokenizer("a cat", add_special_tokens=False).input_ids)
    assert ids[: n + 2] == [sd2.bos_token_id, *ids[1 : n + 1], sd2.eos_token_id]
    assert ids[n + 2 :] == [0] * (CHUNK_TOKENS - n)
    sd1 = PromptTokenizer(studio.tokenizer, {})("a cat").ids[0]
    assert sd1[:n + 1] == ids[:n + 1] and sd1[n + 1 :] == [studio.tokenizer.eos_token_id] * (CHUNK_TOKENS - n + 1)


def test_break_starts_a_new_chunk(studio):
    out = PromptTokenizer(studio.tokenizer, {})("a cat BREAK a dog")
    assert len(out.ids) == 2


# -- reversibility and gradients -----------------------------------------------------------------------------------
def test_encoding_leaves_the_model_unchanged(studio):
    before_len, before_rows, before_module = _state(studio)
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {"threevec": _vec(studio, 3), "onevec": _vec(studio, 1, 1)})
    with torch.no_grad():
        enc.encode(["threevec and (onevec:1.3)", "nothing"])
    after_len, after_rows, after_module = _state(studio)
    assert after_len == before_len and torch.equal(after_rows, before_rows) and after_module is before_module


def test_original_layer_restored_when_the_body_raises(studio):
    _, _, before_module = _state(studio)
    with pytest.raises(RuntimeError, match="boom"):
        with spliced(studio.text_encoder) as splice:
            assert _state(studio)[2] is splice
            raise RuntimeError("boom")
    assert _state(studio)[2] is before_module
    # an encode that fails inside the text encoder (vectors of the wrong width) also restores it
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {"badwidth": torch.zeros(1, studio.embedding_width + 5)})
    with pytest.raises(RuntimeError):
        enc.encode(["badwidth"])
    assert _state(studio)[2] is before_module


def test_gradients_reach_only_the_vectors(studio):
    vectors = torch.nn.Parameter(_vec(studio, 2))
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {"twovec": vectors})
    cond, used = enc.encode(["a twovec photo"])
    cond.sum().backward()
    assert used == ["twovec"] and vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in studio.text_encoder.parameters())


# -- no host syncs in encode (so on CUDA the host runs ahead of the text encoder) --------------------------------
# Reading a device value on the host (`.item()`, `bool(t)`, `torch.all(...)` in an `if`, `.tolist()`, `.cpu()`)
# makes the host wait for everything queued on the GPU.
HOST_READS = {"TensorBase.item", "TensorBase.__bool__", "TensorBase.tolist", "TensorBase.__float__",
              "TensorBase.__int__", "TensorBase.cpu", "TensorBase.numpy", "_VariableFunctionsClass.all",
              "TensorBase.all", "_VariableFunctionsClass.any", "TensorBase.any", "_VariableFunctionsClass.equal"}


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """Records the name of every torch function and tensor method called inside the block."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prompts", [["a photo of twovec"], ["a (twovec:1.2) photo " + "word " * 80, "short [cat]"]])
def test_encode_reads_nothing_back_from_the_device(studio, prompts):
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {"twovec": _vec(studio, 2)})
    with torch.no_grad():
        expected, _ = enc.encode(prompts)
        with _TorchCalls() as calls:
            cond, used = enc.encode(prompts)
    assert used == ["twovec"] and torch.equal(cond, expected)
    assert "TensorBase.index_put" in calls.names  # the recorder sees the encode's own tensor work
    assert not HOST_READS & set(calls.names), sorted(HOST_READS & set(calls.names))


def test_emphasis_is_decided_from_the_prompt_and_the_empty_prompt_is_tokenized_once(studio, monkeypatch):
    import tinv_ui.tokens as tokens

    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {})
    applied, tokenized = [], []
    emphasis, tokenize = tokens._apply_emphasis, enc.tokenize
    monkeypatch.setattr(tokens, "_apply_emphasis", lambda z, w: applied.append(w.shape) or emphasis(z, w))
    monkeypatch.setattr(enc, "tokenize", lambda p: tokenized.append(p) or tokenize(p))
    long = "word " * 80  # two chunks: the short prompt's second chunk is the empty prompt
    with torch.no_grad():
        enc.encode([long, "a cat"])
        enc.encode([long, "a cat"])
        assert applied == [] and tokenized.count("") == 1
        enc.encode(["a (cat:1.3)"])
    assert applied == [(1, 77)]


@pytest.mark.gpu
def test_encode_on_cuda_makes_no_synchronizing_call(studio):
    """CUDA's own check: with sync debug mode "error", any blocking copy or host read inside encode raises."""
    import copy

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    te = copy.deepcopy(studio.text_encoder).to("cuda")
    enc = PromptEncoder(studio.tokenizer, te, {"twovec": _vec(studio, 2)})  # CPU vectors, as generation has them
    with torch.no_grad():
        enc.encode(["warm-up"])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cond, _ = enc.encode(["a (twovec:1.2) photo " + "word " * 80, "short"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cond.is_cuda and cond.shape[:2] == (2, 154)


def test_min_chunks_pads_with_empty_prompt_chunks(studio):
    enc = PromptEncoder(studio.tokenizer, studio.text_encoder, {"twovec": _vec(studio, 2)})
    with torch.no_grad():
        plain, used = enc.encode(["a twovec photo"])
        padded, used_padded = enc.encode(["a twovec photo"], min_chunks=3)
        empty, _ = enc.encode([""])
        long_prompt = "word " * 80  # already two chunks: min_chunks=2 changes nothing
        assert torch.equal(enc.encode([long_prompt], min_chunks=2)[0], enc.encode([long_prompt])[0])
    assert padded.shape == (1, 3 * 77, plain.shape[2]) and used_padded == used == ["twovec"]
    assert torch.equal(padded[:, :77], plain)
    assert torch.equal(padded[:, 77:154], empty) and torch.equal(padded[:, 154:], empty)
