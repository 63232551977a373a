"""Speed and memory settings of a training run: channels-last, attention, gradient checkpointing, the compile
policy, VAE offload, mixed precision and multi-GPU (accelerate). None of them changes what is learned.

Each setting is applied to the studio's pipeline under its lock for the run and undone on exit, also under
the lock, so a Generate request served between two steps sees a usable model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

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
