"""Use step N of an earlier run: its `<name>-<N>` copy becomes `embeddings/<target>` (the run history's
"Use this step"), with Create's name and overwrite rules (`create.check_existing`).

The file is written anew rather than copied byte for byte, so that the name inside it is the target name
(A1111 and we name an embedding by its file, but a `.pt` or `.safetensors` also records a name); the
vectors are the copy's, bit for bit, at the copy's step, in the copy's format (its suffix and layout).

The copy's `.optim` comes along when it belongs to these vectors (its checksum matches): it holds AdamW's
state and the data order at step N, so training the result continues exactly as the run would have from
step N, and an SDXL `.pt` (which holds only clip_l/clip_g) keeps its step there. Without one, a sidecar
left beside a replaced file is removed: it belongs to vectors that are gone.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from . import formats
from .config import EmbeddingFileFormat
from .create import check_existing, target_path
from .embedding import sanitize_name
from .errors import ConfigError, EmbeddingFormatError
from .fileio import atomic_write, disk_full_is_said
from .runs import RunRecord
from .train_setup import with_sidecar_step

log = logging.getLogger(__name__)


def use_step(run: RunRecord, step: int, name: str, embeddings_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the run's copy at `step` to `<embeddings_dir>/<name><copy suffix>` and return that path.

    Raises `ConfigError` for a step the run has no copy of, `InvalidNameError` for a bad or taken name
    (taken: unless `overwrite`), `EmbeddingFormatError` when the copy does not read back.
    """
    copy = run.copies.get(step)
    if copy is None:
        saved = ", ".join(str(s) for s in run.copies) or "none"
        raise ConfigError(f"step: run {run.folder.name!r} has no copy at step {step}; its copies are at steps {saved}.")
    name = sanitize_name(name, "name")
    path = _target(Path(embeddings_dir), name, copy.suffix.lower())
    check_existing(path, overwrite)
    emb = with_sidecar_step(copy, formats.read(copy))
    if emb.step not in (None, step):
        raise EmbeddingFormatError(f"{copy.name} holds step {emb.step}, not {step}; it was not written by this run.")
    meta = dict(emb.meta)
    if name.lower() != run.name.lower():
        meta.pop("token", None)  # a diffusers file's token is its name's; the new name is the word now
    sidecar = formats.optim_path(copy) if formats.read_optim_sidecar(copy, emb) is not None else None
    with disk_full_is_said(path, "free some space and use the step again (an existing file of that name is unchanged)."):
        formats.write(replace(emb, name=name, step=step, meta=meta), path)
        target_optim = formats.optim_path(path)
        if sidecar is not None:
            atomic_write(target_optim, lambda tmp: shutil.copyfile(sidecar, tmp))
        elif target_optim.is_file():
            target_optim.unlink()
    log.info("used %s (step %d of run %s) as %s", copy.name, step, run.folder, path)
    return path


def _target(embeddings_dir: Path, name: str, suffix: str) -> Path:
    """`<dir>/<name><suffix>` with Create's file-name checks (a `.bin` name is as long as a `.pt` one)."""
    if suffix == ".safetensors":
        return target_path(embeddings_dir, name, EmbeddingFileFormat.SAFETENSORS)
    return target_path(embeddings_dir, name, EmbeddingFileFormat.A1111_PT).with_suffix(suffix)
