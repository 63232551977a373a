"""The built-in tiny test model: random weights, the real CLIP BPE tokenizer, built offline on demand.

It lets everything (UI, training, generation, tests) run on a machine with no GPU and no internet. Its
images are noise: it is labeled "tiny test model (random weights)" wherever it is shown.

The tokenizer files are made from OpenAI CLIP's BPE list, shipped in `tinv_ui/assets/`, following
`SimpleTokenizer.__init__`: 49,408 tokens, ids identical to real SD 1.x.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger(__name__)

TINY_LABEL = "tiny test model (random weights)"
TINY_VERSION = "v1"  # bump when the architecture below changes, so stale caches are rebuilt
TINY_RESOLUTION = 64
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_file() -> Path:
    path = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: the CLIP vocabulary ships with tinv_ui; restore it from git.")
    return path


def write_clip_tokenizer_files(dest: Path) -> Path:
    """Write CLIP's `vocab.json` and `merges.txt` into `dest` (offline). Returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder = {t: i for i, t in enumerate(vocab)}
    assert len(encoder) == CLIP_VOCAB_SIZE
    (dest / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return dest


def load_clip_tokenizer(cache_dir: Path):
    """The real CLIP tokenizer, built offline into `cache_dir/clip-tokenizer` once."""
    from transformers import CLIPTokenizer

    folder = cache_dir / "clip-tokenizer"
    if not (folder / "merges.txt").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".clip-", dir=cache_dir))
        write_clip_tokenizer_files(tmp)
        _replace_dir(tmp, folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _replace_dir(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(src, dest)


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny random StableDiffusionPipeline in memory (tokenizer from the shipped CLIP BPE)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(  # 4 blocks -> vae_scale_factor 8, like real SD
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, sample_size=TINY_RESOLUTION, scaling_factor=0.18215,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    return unet, vae, text_encoder, scheduler, StableDiffusionPipeline


def tiny_model_dir(cache_dir: Path) -> Path:
    """Path of the cached tiny model as a diffusers folder; built on first use (about a second)."""
    folder = Path(cache_dir) / f"tiny-sd-{TINY_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_clip_tokenizer(cache_dir)
    unet, vae, text_encoder, scheduler, pipeline_cls = build_tiny_pipeline()
    pipe = pipeline_cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save_built(pipe, folder, TINY_LABEL)


def _save_built(pipe, folder: Path, label: str) -> Path:
    """Save a freshly built tiny model as `folder`, atomically: a half-built model is never seen under its name."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    pipe.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the %s in %s", label, folder)
    return folder


# -- the tiny SDXL-shaped model ------------------------------------------------------------------------------
# Same idea, SDXL's architecture: two text encoders (CLIP-L-like, then an OpenCLIP-bigG-like one with a
# projection, padding with "!" like SDXL's second tokenizer), a UNet with `text_time` added conditioning
# (pooled text + size/crop time ids), a VAE with SDXL's scaling factor that asks to be decoded in fp32.
TINY_SDXL = "tiny-sdxl"  # its ModelSpec source
TINY_SDXL_LABEL = "tiny SDXL test model (random weights)"
TINY_SDXL_VERSION = "v1"
TINY_SDXL_RESOLUTION = 128  # not 64: the panels' default size visibly follows the loaded family
TINY_SDXL_WIDTHS = (32, 64)  # (clip_l, clip_g) token widths; real SDXL: (768, 1280)
TINY_SDXL_POOLED = 32  # text_encoder_2 projection width; real SDXL: 1280
TINY_SDXL_TIME_DIM = 8  # addition_time_embed_dim; real SDXL: 256


def build_tiny_sdxl_parts(seed: int = 0) -> dict:
    """The tiny SDXL components in memory, by their pipeline names (no tokenizers)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    l_width, g_width = TINY_SDXL_WIDTHS
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # SDXL's block layout: no attention in the first level, 2 transformers deeper
        sample_size=TINY_SDXL_RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        cross_attention_dim=l_width + g_width, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_DIM + TINY_SDXL_POOLED, norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, sample_size=TINY_SDXL_RESOLUTION, scaling_factor=0.13025,
        force_upcast=True,
    )
    ids = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
               num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=l_width, intermediate_size=37, projection_dim=l_width,
                                                hidden_act="quick_gelu", pad_token_id=49407, **ids))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=g_width, intermediate_size=73, projection_dim=TINY_SDXL_POOLED, hidden_act="gelu",
        pad_token_id=0, **ids))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, scheduler=scheduler)


def sdxl_tokenizers(cache_dir: Path):
    """SDXL's two tokenizers, offline: CLIP's BPE both times; the second pads with "!" (id 0) like OpenCLIP."""
    first = load_clip_tokenizer(cache_dir)
    second = load_clip_tokenizer(cache_dir)
    second.pad_token = "!"
    return first, second


def tiny_sdxl_model_dir(cache_dir: Path) -> Path:
    """Path of the cached tiny SDXL model as a diffusers folder; built on first use (about a second)."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(cache_dir) / f"tiny-sdxl-{TINY_SDXL_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_2 = sdxl_tokenizers(cache_dir)
    pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False, **build_tiny_sdxl_parts())
    return _save_built(pipe, folder, TINY_SDXL_LABEL)
