"""Speed settings of a training run: attention switched by the studio under its lock, AdamW's kernel choice."""

from __future__ import annotations

import torch

from tinv_ui import studio as studio_module
from tinv_ui import train_speed
from tinv_ui.config import TrainConfig


def test_attention_is_switched_by_the_studio_under_its_lock(studio, monkeypatch):
    pipe, seen = studio.pipeline, []
    monkeypatch.setattr(pipe, "enable_xformers_memory_efficient_attention", lambda: seen.append(("on", studio.busy_with)))
    monkeypatch.setattr(pipe, "disable_xformers_memory_efficient_attention", lambda: seen.append(("off", studio.busy_with)))
    assert studio.set_attention(xformers=True) is False and not studio.xformers  # the CPU: no xformers, SDPA stays
    assert seen == []
    monkeypatch.setattr(studio_module, "xformers_usable", lambda device: True)
    try:
        assert studio.set_attention(xformers=True) is True and studio.xformers
        assert studio.set_attention(xformers=True) is True  # already on: nothing switched twice
        assert studio.set_attention(xformers=False) is False
    finally:
        studio.xformers = False
    assert seen == [("on", "switching attention"), ("off", "switching attention")]


def test_training_turns_xformers_on_for_the_run_and_back_off(studio, monkeypatch):
    calls = []
    monkeypatch.setattr(studio, "set_attention", lambda xformers: calls.append(xformers) or xformers)
    with train_speed.tuned_unet(studio, TrainConfig(embedding="e", dataset_dir="d", xformers=True), False) as unet:
        assert unet is studio.pipeline.unet and calls == [True]
    assert calls == [True, False]
    calls.clear()
    with train_speed.tuned_unet(studio, TrainConfig(embedding="e", dataset_dir="d", xformers=False), False):
        pass
    assert calls == []  # not asked: the app's own setting is left alone


def test_adamw_is_fused_on_cuda_only():
    assert train_speed.adamw_speed_options(torch.device("cpu")) == {}
    assert train_speed.adamw_speed_options(torch.device("cuda", 0)) == {"fused": True}
    vectors = torch.nn.Parameter(torch.zeros(2, 4))
    torch.optim.AdamW([vectors], lr=0.1, **train_speed.adamw_speed_options(vectors.device))  # the CPU path builds


def test_the_trainer_syncs_with_the_host_once_per_step_and_clones_nothing(studio, paths, images, monkeypatch):
    """Between two Step events the trainer's own code reads one value set back from the device (loss and the
    vectors' magnitude together, for the NaN guard) and allocates no copy of the vectors."""
    import sys
    from pathlib import Path

    from tinv_ui.config import CreateConfig
    from tinv_ui.create import create_embedding
    from tinv_ui.events import Step
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.training import train

    own = {"training.py", "train_setup.py", "train_outputs.py", "train_speed.py"}
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "clone"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            if Path(sys._getframe(1).f_code.co_filename).name in own:
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    create_embedding(studio, CreateConfig(name="syncs", num_vectors=2), paths.embeddings_dir)
    cfg = TrainConfig(embedding="syncs", dataset_dir=str(images), template="subject", max_steps=4, width=64, height=64,
                      save_every=0, preview_every=0, seed=1, gradient_accumulation=2)
    per_step = []
    for event in train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths):
        if isinstance(event, Step):
            per_step.append(list(calls))
        calls.clear()
    assert per_step == [["tolist"]] * 4
