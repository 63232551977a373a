"""Prompts → text-encoder conditioning, with embeddings spliced into the token lookup (A1111 semantics).

How an embedding gets into a prompt, exactly as AUTOMATIC1111 does it (`modules/sd_hijack_clip.py`,
`modules/sd_hijack.py` `EmbeddingsWithFixes`, `modules/sd_emphasis.py`):
- the prompt is split into (text, weight) segments by emphasis syntax: `(word)`, `(word:1.3)`, `[word]`, `BREAK`;
- each segment is tokenized; an embedding name matches where its token ids appear (longest match wins,
  so matching is case-insensitive, like CLIP itself);
- a matched embedding takes `num_vectors` of the 75 slots of a chunk; a chunk is BOS + 75 + EOS = 77;
- at encode time a `VectorSplice` wrapped around the token-embedding layer overwrites those slots with the
  embedding's vectors, and emphasis weights multiply the encoder's output (then the mean is restored).

Nothing is added to the tokenizer and no row is added to the embedding matrix, so using embeddings is
reversible by construction: `spliced()` puts the original layer back even when its body raises. During
training the spliced vectors are the trainable parameter itself, so gradients reach only them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

CHUNK_TOKENS = 75  # slots per chunk, between BOS and EOS
PLACEHOLDER_ID = 0  # any in-vocabulary id: those slots are overwritten by the splice

_RE_ATTENTION = re.compile(
    r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""", re.X
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces, A1111's `parse_prompt_attention`.

    `(a)` ×1.1, `[a]` ÷1.1, `(a:1.5)` ×1.5, `\\(` a literal bracket, `BREAK` → ("BREAK", -1).
    >>> parse_emphasis("a (b:1.5) c")
    [('a ', 1.0), ('b', 1.5), (' c', 1.0)]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge neighbours with the same weight
        if res[i][1] == res[i + 1][1] and res[i][1] != -1:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


@dataclass
class TokenizedPrompt:
    """A prompt as chunks of 77 ids, per-id weights, and where each embedding's vectors go."""

    ids: list[list[int]]  # [chunks][77]
    weights: list[list[float]]  # [chunks][77]
    fixes: list[tuple[int, int, str]] = field(default_factory=list)  # (chunk, position, embedding name)
    used: list[str] = field(default_factory=list)  # embedding names in order of first use
    token_count: int = 0  # slots used, embeddings counted by their vectors (A1111's counter)


class PromptTokenizer:
    """Tokenizes prompts and finds embedding names in them by token ids (longest match)."""

    def __init__(self, tokenizer, num_vectors: Mapping[str, int]) -> None:
        self.tokenizer = tokenizer
        self.num_vectors = dict(num_vectors)
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        # After the first EOS a chunk is padded with the tokenizer's pad id: EOS for SD 1.x (CLIP), 0 ("!")
        # for SD 2.x (OpenCLIP), as A1111's `id_pad` does; SD 2 was trained that way.
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = self.eos if pad is None else int(pad)
        self._index: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in self.num_vectors:
            ids = tuple(self._ids(name))
            if ids:
                self._index.setdefault(ids[0], []).append((ids, name))
        for candidates in self._index.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)

    def _match(self, ids: list[int], i: int) -> tuple[str, int] | None:
        for cand, name in self._index.get(ids[i], ()):
            if tuple(ids[i : i + len(cand)]) == cand:
                return name, len(cand)
        return None

    def __call__(self, prompt: str) -> TokenizedPrompt:
        out = TokenizedPrompt(ids=[], weights=[])
        cur: list[int] = []
        cur_w: list[float] = []
        cur_fixes: list[tuple[int, str]] = []

        def close_chunk() -> None:
            nonlocal cur, cur_w, cur_fixes
            out.token_count += len(cur)
            pad = CHUNK_TOKENS - len(cur)
            chunk = len(out.ids)
            out.ids.append([self.bos] + cur + [self.eos] + [self.pad] * pad)
            out.weights.append([1.0] + cur_w + [1.0] * (pad + 1))
            out.fixes.extend((chunk, pos + 1, name) for pos, name in cur_fixes)
            cur, cur_w, cur_fixes = [], [], []

        for text, weight in parse_emphasis(prompt):
            if weight == -1:  # BREAK
                close_chunk()
                continue
            ids = self._ids(text)
            i = 0
            while i < len(ids):
                match = self._match(ids, i)
                if match is None:
                    if len(cur) == CHUNK_TOKENS:
                        close_chunk()
                    cur.append(ids[i])
                    cur_w.append(weight)
                    i += 1
                    continue
                name, n_ids = match
                n_vec = min(self.num_vectors[name], CHUNK_TOKENS)
                if len(cur) + n_vec > CHUNK_TOKENS:
                    close_chunk()
                cur_fixes.append((len(cur), name))
                cur.extend([PLACEHOLDER_ID] * n_vec)
                cur_w.extend([weight] * n_vec)
                if name not in out.used:
                    out.used.append(name)
                i += n_ids
        if cur or not out.ids:
            close_chunk()
        return out


class VectorSplice(nn.Module):
    """Wraps a token-embedding layer; writes embedding vectors over chosen (row, position) slots."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.fixes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, positions, vectors

    @property
    def weight(self) -> torch.Tensor:  # so code asking for `.weight` (resize, width) still works
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)  # [B, T, d]
        if self.fixes is None:
            return out
        rows, pos, vectors = self.fixes
        # Out-of-place index_put: the frozen lookup is untouched; gradients flow only into `vectors`.
        return out.index_put((rows, pos), vectors.to(out.dtype))


def _text_model(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)  # transformers 5 has no .text_model


@contextlib.contextmanager
def spliced(text_encoder) -> Iterator[VectorSplice]:
    """Install a `VectorSplice` on the text encoder for the block; always restores the original layer."""
    emb_module = _text_model(text_encoder).embeddings
    original = emb_module.token_embedding
    splice = original if isinstance(original, VectorSplice) else VectorSplice(original)
    emb_module.token_embedding = splice
    try:
        yield splice
    finally:
        splice.fixes = None
        emb_module.token_embedding = original


def _apply_emphasis(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis: scale each token's output by its weight, then restore each chunk's mean.

    A mean that is (nearly) zero cannot be restored by a ratio (A1111 would divide by ~0 and get inf/NaN);
    such a chunk keeps the plain scaled output.
    """
    mean_before = z.mean(dim=(1, 2), keepdim=True)
    z = z * w.unsqueeze(-1)
    mean_after = z.mean(dim=(1, 2), keepdim=True)
    usable = mean_after.abs() > 1e-4 * z.abs().mean(dim=(1, 2), keepdim=True)
    return z * torch.where(usable, mean_before / torch.where(usable, mean_after, 1.0), 1.0)


def _to_device(data, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of Python values (or a CPU tensor) on `device` without waiting for the copy.

    `torch.tensor(..., device="cuda")` copies from pageable memory and blocks the host until the GPU has run
    everything queued before it; from pinned memory with `non_blocking` the host queues the copy and goes on
    (the caching host allocator keeps the pinned buffer alive until the copy is done).
    """
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PromptEncoder:
    """Encodes prompts to conditioning with the given embeddings (`name -> [n, d] tensor`).

    `encode` never reads a device value back to the host: every decision (chunks, splice slots, whether any
    emphasis applies) is made from the Python token lists, so on CUDA the host queues the text encoder and
    runs ahead (into the UNet, during training) instead of waiting for it.
    """

    def __init__(self, tokenizer, text_encoder, vectors: Mapping[str, torch.Tensor]) -> None:
        self.text_encoder = text_encoder
        self.vectors = dict(vectors)
        self.tokenize = PromptTokenizer(tokenizer, {k: int(v.shape[0]) for k, v in self.vectors.items()})
        self._empty: TokenizedPrompt | None = None  # the padding chunk, tokenized on first use

    @property
    def empty(self) -> TokenizedPrompt:
        """The empty prompt, which fills the chunks a shorter prompt lacks."""
        if self._empty is None:
            self._empty = self.tokenize("")
        return self._empty

    def encode(self, prompts: list[str], clip_skip: int = 1, max_chunks: int | None = None,
               min_chunks: int = 1) -> tuple[torch.Tensor, list[str]]:
        """Conditioning `[B, 77*chunks, d]` for `prompts` (all padded to the same chunk count) and the
        embedding names used. `max_chunks=1` truncates to one chunk; `min_chunks` pads with empty-prompt
        chunks up to that count (a compiled UNet keeps one shape when captions vary in length)."""
        toks = [self.tokenize(p) for p in prompts]
        n_chunks = max(min_chunks, *(len(t.ids) for t in toks))
        if max_chunks is not None:
            n_chunks = min(n_chunks, max_chunks)
        ids, weights, rows, pos, names = [], [], [], [], []
        for b, t in enumerate(toks):
            for c in range(n_chunks):
                src = t if c < len(t.ids) else self.empty
                cc = c if c < len(t.ids) else 0
                ids.append(src.ids[cc])
                weights.append(src.weights[cc])
                for chunk, p, name in src.fixes:
                    if chunk == cc and src is t:
                        rows.append(b * n_chunks + c)
                        pos.append(p)
                        names.append(name)
        used = [n for t in toks for n in t.used]
        emphasis = any(w != 1.0 for row in weights for w in row)  # decided here, not by reading `w` back
        device = self.text_encoder.device
        ids_t = _to_device(ids, device)
        w = _to_device(weights, device, torch.float32) if emphasis else None
        with spliced(self.text_encoder) as splice:
            if rows:
                splice.fixes = self._fixes(rows, pos, names, len(ids[0]), device)
            z = self._hidden_states(ids_t, clip_skip)
        if w is not None:
            z = _apply_emphasis(z, w.to(z.dtype))
        z = z.reshape(len(prompts), n_chunks * z.shape[1], z.shape[2])
        return z, list(dict.fromkeys(used))

    def _hidden_states(self, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        """The text encoder's per-token output for `ids` `[rows, 77]` (SDXL's encoders override this)."""
        out = self.text_encoder(ids, output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            return _text_model(self.text_encoder).final_layer_norm(out.hidden_states[-clip_skip])
        return out[0]

    def _fixes(self, rows, pos, names, seq_len, device):
        r_idx, p_idx, vecs = [], [], []
        for r, p, name in zip(rows, pos, names):
            v = self.vectors[name]
            n = min(v.shape[0], seq_len - 1 - p)  # never run over the final EOS slot
            r_idx += [r] * n
            p_idx += range(p, p + n)
            vecs.append(v[:n])
        vectors = torch.cat([_to_device(v, device) for v in vecs])
        return _to_device(r_idx, device), _to_device(p_idx, device), vectors
