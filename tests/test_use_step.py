"""Use step N of an earlier run (`tinv_ui.use_step`): the run's copy becomes a library embedding."""

from __future__ import annotations

import pytest
import torch

from tinv_ui import formats, runs
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.errors import ConfigError, InvalidNameError
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.training import train
from tinv_ui.use_step import use_step

BASE = dict(dataset_dir="", template="subject_filewords", max_steps=4, width=64, height=64, learn_rate="0.05",
            save_every=2, preview_every=0, seed=7, batch_size=1)


def _trained_run(studio, paths, images, name="alpha"):
    create_embedding(studio, CreateConfig(name=name, initializer="painting"), paths.embeddings_dir)
    list(train(studio, TrainConfig(**{**BASE, "embedding": name, "dataset_dir": str(images)}),
               EmbeddingLibrary(paths.embeddings_dir), paths))
    [run] = runs.list_runs(runs.log_root(paths.outputs_dir))
    return run


def test_a_step_is_written_bit_exact_with_its_step_optimizer_state_and_new_name_and_loads(studio, paths, images):
    run = _trained_run(studio, paths, images)
    copy = formats.read(run.copies[2])
    final = formats.read(paths.embeddings_dir / "alpha.pt")
    assert final.step == 4 and not torch.equal(final.vectors, copy.vectors)

    path = use_step(run, 2, "alpha-best", paths.embeddings_dir)

    assert path == (paths.embeddings_dir / "alpha-best.pt").resolve()
    data = torch.load(path, weights_only=True)
    assert data["name"] == "alpha-best" and data["step"] == 2
    assert torch.equal(data["string_to_param"]["*"], copy.vectors)  # bit for bit
    assert formats.optim_path(path).read_bytes() == formats.optim_path(run.copies[2]).read_bytes()
    library = EmbeddingLibrary(paths.embeddings_dir)
    library.rescan_for(studio)
    assert library.names() == ["alpha", "alpha-best"]
    assert torch.equal(library.get("alpha-best").embedding.vectors, copy.vectors)


def test_overwrite_is_refused_without_the_flag_and_training_then_continues_the_run_exactly(studio, paths, images):
    run = _trained_run(studio, paths, images)
    own = paths.embeddings_dir / "alpha.pt"
    before = own.read_bytes()
    with pytest.raises(InvalidNameError, match="already exists.*turn on overwrite"):
        use_step(run, 2, "alpha", paths.embeddings_dir)
    assert own.read_bytes() == before

    use_step(run, 2, "alpha", paths.embeddings_dir, overwrite=True)
    assert formats.read(own).step == 2
    # The run's .optim came along: two more steps give the run's own step 4, bit for bit.
    list(train(studio, TrainConfig(**{**BASE, "embedding": "alpha", "dataset_dir": str(images)}),
               EmbeddingLibrary(paths.embeddings_dir), paths))
    assert torch.equal(formats.read(own).vectors, formats.read(run.copies[4]).vectors)


def test_bad_names_other_formats_and_unknown_steps_are_refused(studio, paths, images):
    run = _trained_run(studio, paths, images)
    for name, message in (("../escape", "contains '/'"), ("", "name is empty"), (".hidden", "may not start")):
        with pytest.raises(InvalidNameError, match=message):
            use_step(run, 2, name, paths.embeddings_dir)
    formats.write(formats.read(run.copies[2]), paths.embeddings_dir / "taken.safetensors")
    with pytest.raises(InvalidNameError, match="taken.safetensors has the same name in another format"):
        use_step(run, 2, "taken", paths.embeddings_dir, overwrite=True)
    with pytest.raises(ConfigError, match="no copy at step 3; its copies are at steps 2, 4"):
        use_step(run, 3, "alpha-3", paths.embeddings_dir)
    assert sorted(p.name for p in paths.embeddings_dir.iterdir()) == ["alpha.pt", "alpha.pt.optim", "taken.safetensors"]


def test_an_sdxl_pt_pair_keeps_its_step_in_the_optim_that_comes_along(sdxl_studio, paths, images):
    from tinv_ui.tiny_model import TINY_SDXL_RESOLUTION
    from tinv_ui.train_setup import with_sidecar_step

    create_embedding(sdxl_studio, CreateConfig(name="xl", initializer="painting", num_vectors=2, file_format="pt"),
                     paths.embeddings_dir)
    cfg = TrainConfig(**{**BASE, "embedding": "xl", "dataset_dir": str(images), "template": "subject", "max_steps": 2,
                         "save_every": 1, "width": TINY_SDXL_RESOLUTION, "height": TINY_SDXL_RESOLUTION})
    list(train(sdxl_studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    [run] = runs.list_runs(runs.log_root(paths.outputs_dir))

    path = use_step(run, 1, "xl-first", paths.embeddings_dir)

    assert sorted(torch.load(path, weights_only=True)) == ["clip_g", "clip_l"]  # what every SDXL tool reads
    used, copy = with_sidecar_step(path, formats.read(path)), formats.read(run.copies[1])
    assert used.step == 1 and all(torch.equal(used.parts[k], copy.parts[k]) for k in ("clip_l", "clip_g"))
    library = EmbeddingLibrary(paths.embeddings_dir)
    library.rescan_for(sdxl_studio)
    assert library.names() == ["xl", "xl-first"]
