"""Autocast training encodes prompts with a half copy of the frozen text encoder, cast once per run.

The copy is made on CUDA only; here it is forced on with bf16 autocast on the CPU (which torch supports), so
the run takes the code path a GPU run takes: what the UNet, the optimizer and the studio's encoder see.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinv_ui import formats, train_setup, training
from tinv_ui.config import CreateConfig, TrainConfig
from tinv_ui.create import create_embedding
from tinv_ui.events import Step
from tinv_ui.library import EmbeddingLibrary
from tinv_ui.tokens import PromptEncoder
from tinv_ui.train_speed import half_text_encoder, half_text_encoder_wanted

NAME = "halfemb"
PROMPTS = [f"a painting of {NAME}, (bright:1.2) colours", f"{NAME}"]


def test_only_cuda_autocast_runs_get_the_half_encoder():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert half_text_encoder_wanted(cuda, torch.bfloat16) and half_text_encoder_wanted(cuda, torch.float16)
    assert not half_text_encoder_wanted(cuda, None)  # an fp32 CUDA run: no autocast, nothing recast
    assert not half_text_encoder_wanted(cpu, None)  # the CPU path stays exactly as it is
    assert not half_text_encoder_wanted(cpu, torch.bfloat16)


def _encode_and_backward(studio, text_encoder, vectors):
    encoder = PromptEncoder(studio.tokenizer, text_encoder, {NAME: vectors})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond, _ = encoder.encode(PROMPTS, min_chunks=2)
    cond.float().square().sum().backward()
    return cond.detach(), vectors.grad.detach().clone()


def test_the_half_copy_computes_what_autocast_computes_and_leaves_the_studio_encoder_alone(studio):
    te = studio.text_encoder
    before = {k: v.clone() for k, v in te.state_dict().items()}
    initial = torch.randn(2, studio.embedding_width, generator=torch.Generator().manual_seed(0))
    half = half_text_encoder(te, torch.bfloat16)

    linears = [m for m in half.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad for m in linears)
    assert {p.dtype for n, p in half.named_parameters() if "layer_norm" in n or "embedding" in n} == {torch.float32}
    # the fp32 embeddings and layer norms are the studio's own tensors, not a second copy
    shared = dict(te.named_parameters())
    assert all(p is shared[n] for n, p in half.named_parameters() if p.dtype == torch.float32)

    expected = _encode_and_backward(studio, te, nn.Parameter(initial.clone()))
    got = _encode_and_backward(studio, half, nn.Parameter(initial.clone()))
    assert torch.equal(got[0], expected[0])  # the conditioning, bit for bit
    assert got[1].dtype == torch.float32 and torch.equal(got[1], expected[1])  # the vectors' gradient
    assert torch.isfinite(got[1]).all() and got[1].abs().sum() > 0
    # the studio's encoder (Generate's, between two steps) is still fp32 and unchanged
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in te.state_dict().items())


@pytest.fixture
def forced_bf16_run(monkeypatch):
    """Make the trainer take its CUDA autocast path on the CPU: bf16 autocast and the half encoder."""
    monkeypatch.setattr(train_setup, "amp_dtype", lambda studio: torch.bfloat16)
    monkeypatch.setattr(train_setup, "half_text_encoder_wanted", lambda device, amp: amp is not None)
    copies, runs, grads = [], [], []

    def counting_copy(text_encoder, dtype):
        copies.append(half_text_encoder(text_encoder, dtype))
        return copies[-1]

    def recording_prepare(*args, **kwargs):
        run = real_prepare(*args, **kwargs)
        run.vectors.register_hook(lambda g: grads.append(g.detach().clone()))
        runs.append(run)
        return run

    real_prepare = training.prepare
    monkeypatch.setattr(train_setup, "half_text_encoder", counting_copy)
    monkeypatch.setattr(training, "prepare", recording_prepare)
    return copies, runs, grads


def test_a_bf16_autocast_run_casts_the_encoder_once_and_trains_fp32_vectors(studio, paths, images, forced_bf16_run):
    copies, runs, grads = forced_bf16_run
    path = create_embedding(studio, CreateConfig(name=NAME, initializer="painting", num_vectors=2), paths.embeddings_dir)
    initial = formats.read(path).vectors
    weight_dtypes = []  # the q_proj weight's dtype at every encoder forward of the run
    first_linear = None

    cfg = TrainConfig(embedding=NAME, dataset_dir=str(images), template="subject_filewords", max_steps=3, width=64,
                      height=64, learn_rate="0.05", save_every=0, preview_every=0, seed=1, batch_size=1,
                      gradient_accumulation=2, save_optimizer_state=False)
    events = training.train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths)
    steps = 0
    for event in events:
        if first_linear is None and copies:
            first_linear = next(m for m in copies[0].modules() if isinstance(m, nn.Linear))
            first_linear.register_forward_pre_hook(lambda m, a: weight_dtypes.append(m.weight.dtype))
        steps += isinstance(event, Step)
    assert steps == 3
    (run,) = runs
    assert len(copies) == 1 and run.encoder.text_encoder is copies[0]  # cast once, for the whole run
    assert run.encoder.text_encoder is not studio.text_encoder
    assert weight_dtypes == [torch.bfloat16] * 6  # 3 steps of two micro-batches: never an fp32 weight to recast
    # AdamW updates the fp32 vectors themselves, with fp32 finite gradients
    assert run.optimizer.param_groups[0]["params"] == [run.vectors] and run.vectors.dtype == torch.float32
    assert len(grads) == 6 and all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
                                   for g in grads)
    trained = formats.read(path).vectors
    assert trained.dtype == torch.float32 and torch.isfinite(trained).all() and not torch.equal(trained, initial)
    assert studio.text_encoder.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_half_run_encodes_with_the_half_copy(paths, images, monkeypatch):
    """On a GPU the real decision applies: the run's encoder has half linear weights, the studio's stays fp32."""
    from tinv_ui.config import ModelSpec
    from tinv_ui.studio import Studio

    own = Studio(paths)
    own.load(ModelSpec("tiny", device="cuda"))
    runs, real_prepare = [], training.prepare
    monkeypatch.setattr(training, "prepare", lambda *a, **kw: runs.append(real_prepare(*a, **kw)) or runs[-1])
    path = create_embedding(own, CreateConfig(name=NAME, initializer="painting", num_vectors=2), paths.embeddings_dir)
    initial = formats.read(path).vectors
    cfg = TrainConfig(embedding=NAME, dataset_dir=str(images), template="subject_filewords", max_steps=3, width=64,
                      height=64, learn_rate="0.05", save_every=0, preview_every=0, seed=1, save_optimizer_state=False)
    assert sum(isinstance(e, Step) for e in training.train(own, cfg, EmbeddingLibrary(paths.embeddings_dir), paths)) == 3
    (run,) = runs
    linears = [m for m in run.encoder.text_encoder.modules() if isinstance(m, nn.Linear)]
    assert {m.weight.dtype for m in linears} == {own.dtype} and own.text_encoder.dtype == torch.float32
    trained = formats.read(path).vectors
    assert torch.isfinite(trained).all() and not torch.equal(trained, initial)
