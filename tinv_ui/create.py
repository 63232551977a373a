"""Create a new embedding file from initializer text (A1111's `create_embedding` in
`modules/textual_inversion/textual_inversion.py`).

Vector i of n copies token row floor(i*T/n) of the initializer's T tokens (the text tokenized without
BOS/EOS and truncated to n): fewer tokens than vectors repeat in order (t0,t0,t1,t1), more are cut.
Rows are the raw token embeddings, before position embeddings. An empty initializer gives zeros.

With an SDXL model the embedding is a pair: the same token ids (both SDXL tokenizers use CLIP's BPE) are
looked up in each encoder's table, giving `clip_l` [n, 768] and `clip_g` [n, 1280]; the file format `auto`
then writes `.safetensors` with exactly those two tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import formats
from .config import CreateConfig, EmbeddingFileFormat
from .embedding import Embedding, sanitize_name
from .fileio import disk_full_is_said
from .errors import ConfigError, InvalidNameError

if TYPE_CHECKING:
    from .studio import Studio

log = logging.getLogger(__name__)

# File systems allow 255 bytes per name; the atomic-write temp name (".<file>.XXXXXXXX.tmp") and the
# ".optim" sidecar add up to ~25 bytes, so the embedding's own file name must stay well below.
MAX_FILENAME_BYTES = 200


# Text-encoder widths whose A1111 tokenizer is OpenCLIP (SD 2.x): there the initializer is not truncated,
# its tokens are subsampled evenly instead (A1111 `create_embedding` in `modules/textual_inversion/textual_inversion.py`).
OPENCLIP_WIDTHS = frozenset({1024})


def init_token_ids(tokenizer, text: str, num_vectors: int, truncate: bool = True) -> list[int]:
    """Token ids of the initializer, no BOS/EOS.

    `truncate` (A1111's SD1 rule) keeps at most the first `num_vectors`; without it (the SD2/OpenCLIP rule)
    all tokens are returned and `spread_rows` subsamples them evenly.
    """
    if text == "":
        return []
    ids = list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
    if not ids:
        raise ConfigError("initializer has no tokens; leave it empty for zero vectors.")
    return ids[:num_vectors] if truncate else ids


def spread_rows(rows: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """`[num_vectors, d]` from T rows: vector i is row floor(i*T/num_vectors) (repeats, or even subsampling)."""
    t = rows.shape[0]
    index = torch.tensor([i * t // num_vectors for i in range(num_vectors)], dtype=torch.long)
    return rows[index].clone()


def resolve_format(file_format: EmbeddingFileFormat, sdxl: bool = False) -> EmbeddingFileFormat:
    """`auto` → safetensors for SDXL (clip_l/clip_g, what A1111, ComfyUI, InvokeAI and civitai use), else pt."""
    file_format = EmbeddingFileFormat(file_format)
    if file_format != EmbeddingFileFormat.AUTO:
        return file_format
    return EmbeddingFileFormat.SAFETENSORS if sdxl else EmbeddingFileFormat.A1111_PT


def target_path(embeddings_dir: Path, name: str, file_format: EmbeddingFileFormat) -> Path:
    """`<dir>/<name>.<ext>`, refusing names that would escape the folder or exceed file-name limits."""
    filename = f"{name}.{resolve_format(file_format).value}"
    if len(filename.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise InvalidNameError(f"name is {len(name.encode('utf-8'))} bytes in UTF-8; the file name must fit in "
                               f"{MAX_FILENAME_BYTES} bytes. Use a shorter name.")
    folder = Path(embeddings_dir).resolve()
    path = folder / filename
    if path.parent != folder:  # sanitize_name already refuses '/', this is the belt to its braces
        raise InvalidNameError(f"name {name!r} would leave the embeddings folder; use a plain name.")
    return path


def check_target(cfg: CreateConfig, embeddings_dir: str | Path, sdxl: bool = False) -> Path:
    """The file `cfg` would create, after the name and overwrite checks (no model needed; `sdxl` resolves
    the `auto` format)."""
    name = sanitize_name(cfg.name, "name")
    path = target_path(Path(embeddings_dir), name, resolve_format(cfg.file_format, sdxl))
    check_existing(path, cfg.overwrite)
    return path


def check_existing(path: Path, overwrite: bool) -> None:
    """Refuse to replace a file (or shadow one of another format) unless overwrite is on (also the rule of
    `use_step.use_step`)."""
    same_name = [path.with_suffix(s) for s in formats.EMBEDDING_SUFFIXES if path.with_suffix(s).exists()]
    if same_name and not overwrite:
        raise InvalidNameError(
            f"name: an embedding called {path.stem!r} already exists ({same_name[0].name}); "
            "turn on overwrite to replace it, or choose another name."
        )
    others = [p for p in same_name if p.suffix != path.suffix]
    if others:  # overwriting would leave two files with one name; the library could pick the old one
        raise InvalidNameError(
            f"name: {others[0].name} has the same name in another format; delete it first or set "
            f"file_format to {others[0].suffix.lstrip('.')}."
        )


def create_embedding(studio: Studio, cfg: CreateConfig, embeddings_dir: str | Path) -> Path:
    """Create `<embeddings_dir>/<name>.pt|.safetensors` with step 0 and return its path."""
    with studio.session(what="creating an embedding"):
        sdxl = studio.is_sdxl
        path = check_target(cfg, embeddings_dir, sdxl=sdxl)
        name = path.stem
        # SD 2.x (OpenCLIP) subsamples a long initializer; SD 1.x and SDXL (one id list for both tables) cut it.
        truncate = sdxl or studio.embedding_width not in OPENCLIP_WIDTHS
        ids = init_token_ids(studio.tokenizer, cfg.initializer, cfg.num_vectors, truncate=truncate)
        pipe = studio.pipeline
        if sdxl:
            parts = {"clip_l": _initial_vectors(pipe.text_encoder, ids, cfg.num_vectors),
                     "clip_g": _initial_vectors(pipe.text_encoder_2, ids, cfg.num_vectors)}
            vectors = None
        else:
            parts, vectors = {}, _initial_vectors(pipe.text_encoder, ids, cfg.num_vectors)
    info = studio.info
    embedding = Embedding(name, vectors, step=0, parts=parts, meta={"sd_checkpoint": None, "sd_checkpoint_name": None})
    with disk_full_is_said(path, "free some space and create it again (an existing file of that name is unchanged)."):
        formats.write(embedding, path)
    log.info("created %s (%d vectors from %r, model %s)", path, cfg.num_vectors, cfg.initializer,
             info.label if info else "?")
    return path


def _initial_vectors(text_encoder, ids: list[int], num_vectors: int) -> torch.Tensor:
    """`[num_vectors, width]` float32 CPU rows of `text_encoder`'s token table for `ids` (zeros without ids)."""
    matrix = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        if not ids:
            return torch.zeros(num_vectors, matrix.shape[1], dtype=torch.float32)
        rows = matrix[torch.tensor(ids, device=matrix.device)].detach().to("cpu", torch.float32)
        return spread_rows(rows, num_vectors)
