"""Speed and memory settings of a training run: channels-last, attention, gradient checkpointing, the compile
policy, VAE offload, mixed precision and multi-GPU (accelerate). None of them changes what is learned.

Each setting is applied to the studio's pipeline under its lock for the run and undone on exit, also under
the lock, so a Generate request served between two steps sees a usable model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import TrainingError
from .studio import Studio

log = logging.getLogger(__name__)

# torch.compile pays off only on long runs: ~1 min to compile an SD UNet vs ~60 ms saved per batch-1 micro-batch
# on an H100 (109 -> 48 ms, bench/README.md), so about 1000 micro-batches to break even.
COMPILE_MIN_MICRO_BATCHES = 1000
VAE_OFFLOAD_BELOW_FREE_BYTES = 3 * 2**30  # move the VAE to RAM when less GPU memory than this is free


def want_compile(cfg: TrainConfig, device: torch.device, micro_batches: int) -> bool:
    """compile "on" always; "auto" on CUDA for runs long enough to pay back the compile time."""
    if cfg.compile == "on":
        return True
    return cfg.compile == "auto" and device.type == "cuda" and micro_batches >= COMPILE_MIN_MICRO_BATCHES


def amp_dtype(studio: Studio) -> torch.dtype | None:
    """The autocast dtype: the studio's half dtype on CUDA, None (fp32, no autocast) elsewhere."""
    half = (torch.float16, torch.bfloat16)
    return studio.dtype if studio.device.type == "cuda" and studio.dtype in half else None


def half_text_encoder_wanted(device: torch.device, amp: torch.dtype | None) -> bool:
    """Whether the run encodes prompts with a half-precision copy of the text encoder (`half_text_encoder`):
    on CUDA under autocast only. The CPU runs in fp32 without autocast and keeps the studio's encoder."""
    return device.type == "cuda" and amp in (torch.float16, torch.bfloat16)


def half_text_encoder(text_encoder: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the frozen text encoder whose `nn.Linear` weights and biases are cast to `dtype` once.

    Under autocast every linear layer casts its fp32 weight to the half dtype on every call: frozen weights
    are not in autocast's cast cache (it keeps only leaves that require grad), so a run recast the whole
    encoder on every micro-batch. Only the Linear layers are cast, the tensors autocast casts anyway, so the
    copy computes what the fp32 encoder computes under autocast; embeddings and layer norms stay fp32, and
    are shared with the studio's encoder, not copied. The studio's encoder is untouched (Generate requests
    served between two steps keep it in fp32). The trained vectors are fp32 and spliced into the token
    lookup's fp32 output, so their gradients and AdamW's update stay fp32.
    """
    linears = [m for m in text_encoder.modules() if isinstance(m, nn.Linear)]
    cast = {id(p) for m in linears for p in m.parameters(recurse=False)}
    # deepcopy's memo: every other tensor is shared as is; each Linear tensor maps to its half copy
    memo: dict[int, Any] = {id(t): t for t in (*text_encoder.parameters(), *text_encoder.buffers())
                            if id(t) not in cast}
    for m in linears:
        for p in m.parameters(recurse=False):
            memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(text_encoder, memo)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (the fast layout for convolutions there), contiguous elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def adamw_speed_options(device: torch.device) -> dict[str, bool]:
    """AdamW's fused CUDA kernel where the device has one; the plain loop on the CPU (same arithmetic)."""
    return {"fused": True} if device.type == "cuda" else {}


@contextlib.contextmanager
def tuned_unet(studio: Studio, cfg: TrainConfig, compile_unet: bool) -> Iterator[Any]:
    """Speed/memory settings on the studio's UNet for the run (channels_last on CUDA, xformers, gradient
    checkpointing, torch.compile); all undone on exit. Yields the module to call.

    Attention is switched by the studio (`Studio.set_attention`), its one owner. Gradient checkpointing in
    diffusers checks `torch.is_grad_enabled()`, not train mode, and uses non-reentrant checkpoints, so the
    frozen UNet stays in eval mode and its weights still get no gradient.
    """
    unet = studio.pipeline.unet
    cuda = studio.device.type == "cuda"
    turned_on_xformers = cfg.xformers and not studio.xformers and studio.set_attention(xformers=True)
    with studio.session(what="preparing training"):
        if cuda:
            unet.to(memory_format=torch.channels_last)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # dynamic=False: one static graph per batch shape (CUDA graphs need static shapes anyway)
        call = torch.compile(unet, mode="reduce-overhead" if cuda else None, dynamic=False) if compile_unet else unet
    try:
        yield call
    finally:
        with studio.session(what="finishing training"):
            if cfg.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            if cuda:
                unet.to(memory_format=torch.contiguous_format)
        if turned_on_xformers and studio.loaded and studio.pipeline.unet is unet:
            studio.set_attention(xformers=False)


def vae_offload_wanted(device: torch.device) -> bool:
    """True on a CUDA device with less than `VAE_OFFLOAD_BELOW_FREE_BYTES` free (never on the CPU)."""
    return device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < VAE_OFFLOAD_BELOW_FREE_BYTES


@contextlib.contextmanager
def offloaded_vae(studio: Studio, force: bool = False) -> Iterator[Any]:
    """On CUDA with little free memory (or when `force`d), keep the VAE in RAM during training.

    The VAE gets accelerate's CPU-offload hook: any encode/decode (our previews, or a Generate request served
    between two steps) moves it to the GPU first, and diffusers pipelines see the right execution device.
    Yields the hook (None when not offloaded); `hook.offload()` sends the VAE back to RAM.
    """
    device = studio.device
    if not (force or vae_offload_wanted(device)):
        yield None
        return
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    vae = studio.pipeline.vae
    with studio.session(what="preparing training"):
        _, hook = cpu_offload_with_hook(vae, execution_device=device)
    log.info("VAE moved to RAM for training (little free GPU memory)")
    try:
        yield hook
    finally:
        with studio.session(what="finishing training"):
            remove_hook_from_module(vae)
            vae.to(device)


def distributed_accelerator() -> Any:
    """One `accelerate.Accelerator` when launched with `accelerate launch` (WORLD_SIZE > 1), else None.

    Create it ONCE per process, in the CLI only: accelerate's state is a process-wide singleton, so a web app
    must never build one per run. Precision is handled by our own autocast, so it gets no mixed_precision.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from accelerate import Accelerator

    # Without CUDA, accelerate only forms a (gloo) process group when told to use the CPU; otherwise every
    # process would train alone and all of them would write the same files.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != world:
        raise TrainingError(f"WORLD_SIZE is {world} but accelerate joined {accelerator.num_processes} process(es); "
                            "start multi-GPU runs with `accelerate launch -m tinv_ui train ...`.")
    return accelerator
