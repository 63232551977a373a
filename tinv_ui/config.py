"""Configuration dataclasses: every user-visible knob, documented once, validated once.

Each field carries `metadata={"help": ..., "min": ..., "max": ...}`; the CLI builds its `--help` and the UI
its `info=` and slider ranges from it, so a range lives in exactly one place. `__post_init__` raises
`ConfigError` naming the field to change.
"""

from __future__ import annotations

import enum
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


def knob(default: Any, help: str, min: float | None = None, max: float | None = None, **kw: Any) -> Any:
    """A dataclass field with its help text and range in metadata."""
    meta = {"help": help, "min": min, "max": max}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class FieldSpec:
    """What the CLI and the UI form need to offer one config field: its default and kind (help: `field_help`)."""

    name: str
    default: Any
    kind: str  # "bool", "choice" (an Enum: `choices` are its values), "int", "float" or "text"
    choices: tuple[str, ...] = ()

    @property
    def shown_default(self) -> Any:
        """The default as a widget or an option shows it (an Enum's value)."""
        return self.default.value if isinstance(self.default, enum.Enum) else self.default


def field_spec(cls: type, name: str) -> FieldSpec:
    """The default and kind of field `name` of config class `cls` (the one place both front ends read them)."""
    f = next(f for f in fields(cls) if f.name == name)
    default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None
    if isinstance(default, bool):
        return FieldSpec(name, default, "bool")
    if isinstance(default, enum.Enum):
        return FieldSpec(name, default, "choice", tuple(e.value for e in type(default)))
    if isinstance(default, (int, float)):
        return FieldSpec(name, default, type(default).__name__)
    # str, or None: then the annotation ("int | None") says what to parse
    kind = {"int": "int", "float": "float"}.get(str(f.type).split("|")[0].strip(), "text")
    return FieldSpec(name, default, kind)


def field_help(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def field_range(cls: type, name: str) -> tuple[float | None, float | None]:
    f = next(f for f in fields(cls) if f.name == name)
    return f.metadata.get("min"), f.metadata.get("max")


def _check_ranges(obj: Any) -> None:
    for f in fields(obj):
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        value = getattr(obj, f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if lo is not None and value < lo:
            raise ConfigError(f"{f.name} is {value}; it must be at least {lo}.")
        if hi is not None and value > hi:
            raise ConfigError(f"{f.name} is {value}; it must be at most {hi}.")


def _check_choice(obj: Any, name: str, choices: type[enum.Enum]) -> None:
    """Field `name` as a member of `choices`, or a `ConfigError` that lists them (values arrive as text)."""
    try:
        object.__setattr__(obj, name, choices(getattr(obj, name)))
    except ValueError:
        raise ConfigError(f"{name} is {str(getattr(obj, name))[:40]!r}; choose one of "
                          f"{', '.join(c.value for c in choices)}.") from None


SEED_MAX = 2**32 - 1  # torch, numpy and A1111's infotexts all take 32-bit seeds


def _check_seeds(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value != -1 and not 0 <= value <= SEED_MAX:
            raise ConfigError(f"{name} is {value}; use a whole number from 0 to {SEED_MAX}, or -1 for a random seed.")


class ClipGrad(str, enum.Enum):
    DISABLED = "disabled"
    VALUE = "value"
    NORM = "norm"


class LatentSampling(str, enum.Enum):
    ONCE = "once"  # one posterior sample per image, drawn when the cache is built
    DETERMINISTIC = "deterministic"  # the posterior mean
    RANDOM = "random"  # a fresh sample every time the image is used


class Compile(str, enum.Enum):
    """torch.compile of the UNet, for training and generation alike."""

    AUTO = "auto"  # training: when the run is long enough to pay off; generation: on a CUDA device
    ON = "on"
    OFF = "off"

    @classmethod
    def of(cls, value: Any) -> "Compile":
        """A `Compile` from its value, or from a checkbox's bool (True: on, False: off)."""
        if isinstance(value, bool):
            return cls.ON if value else cls.OFF
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"compile is {value!r}; use auto, on or off.") from None


class EmbeddingFileFormat(str, enum.Enum):
    AUTO = "auto"  # pt for SD 1.x/2.x, safetensors for SDXL (the clip_l/clip_g file every SDXL tool shares)
    A1111_PT = "pt"  # A1111 dict with string_to_param (every peer reads it); SDXL: only clip_l and clip_g
    SAFETENSORS = "safetensors"  # {"emb_params": [n, d]} (kohya / A1111 / ComfyUI / InvokeAI)


@dataclass(frozen=True)
class SamplerSpec:
    """How an A1111 sampler name is drawn: a diffusers scheduler class, its extra config, A1111's "Schedule type"."""

    scheduler: str  # diffusers class name, built from the model's own scheduler config
    options: dict[str, Any]
    schedule_type: str  # the infotext's "Schedule type"


# The one sampler table: the UI lists, the config checks and generation builds from it.
SAMPLER_TABLE: dict[str, SamplerSpec] = {
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler", {}, "Automatic"),
    "Euler": SamplerSpec("EulerDiscreteScheduler", {}, "Automatic"),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler", {}, "Automatic"),
    "DPM++ 2M Karras": SamplerSpec("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "Karras"),
    "DDIM": SamplerSpec("DDIMScheduler", {"clip_sample": False}, "Automatic"),  # SD never clips x0
    "UniPC": SamplerSpec("UniPCMultistepScheduler", {}, "Automatic"),
    "Heun": SamplerSpec("HeunDiscreteScheduler", {}, "Automatic"),
    "LMS": SamplerSpec("LMSDiscreteScheduler", {}, "Automatic"),
}
SAMPLERS = tuple(SAMPLER_TABLE)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: the built-in tiny test model, a diffusers folder, a single-file checkpoint or a hub id."""

    source: str = knob("tiny", "'tiny' or 'tiny-sdxl' (random weights, for tests), a diffusers folder, a .safetensors/.ckpt file, or a hub id.")
    device: str | None = knob(None, "cuda, cpu, ...; default: cuda if available, else cpu.")
    dtype: str | None = knob(None, "float16, bfloat16 or float32; default: bf16/fp16 on CUDA, fp32 on CPU.")

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"


@dataclass(frozen=True)
class CreateConfig:
    """The Create embedding panel."""

    name: str = knob("", "File name without extension; the word you type in prompts.")
    initializer: str = knob("*", "Text whose token vectors start the embedding; empty = zeros.")
    num_vectors: int = knob(1, "Vectors per token (1-75). More vectors hold more detail but use prompt space.", 1, 75)
    overwrite: bool = knob(False, "Replace an existing embedding file of the same name.")
    file_format: EmbeddingFileFormat = knob(EmbeddingFileFormat.AUTO, "auto (pt for SD 1.x/2.x, safetensors for SDXL), "
                                            "pt (A1111 layout) or safetensors.")

    def __post_init__(self) -> None:
        _check_ranges(self)
        _check_choice(self, "file_format", EmbeddingFileFormat)


@dataclass(frozen=True)
class TrainConfig:
    """The Train panel. Defaults are A1111's except where A1111's were slow or wrong (noted per field)."""

    embedding: str = knob("", "Name of the embedding to train (from the embeddings folder).")
    dataset_dir: str = knob("", "Folder of training images (png, jpg, webp, ...); captions from .txt sidecars or file names.")
    template: str = knob("style_filewords", "Prompt template: a shipped name (style, style_filewords, subject, subject_filewords, none) or a file path. Every line needs [name]; a fresh random line is used each time an image is.")
    learn_rate: str = knob("0.005", "Learning rate or schedule, e.g. '0.005:100, 1e-3:1000, 1e-5' (each rate until "
                           "that step). Unlike A1111 a schedule never ends training early: the last rate continues "
                           "until max_steps.")
    batch_size: int = knob(1, "Images per micro-batch.", 1, 256)
    gradient_accumulation: int = knob(1, "Micro-batches per optimizer step.", 1, 1024)
    max_steps: int = knob(3000, "Total optimizer steps, counted across resumes (A1111 default 100000 was a footgun).", 1, 10_000_000)
    width: int = knob(512, "Training width in pixels (multiple of 8).", 64, 2048)
    height: int = knob(512, "Training height in pixels (multiple of 8).", 64, 2048)
    keep_size: bool = knob(False, "Do not resize: train at each image's own size (rounded down to a multiple of 8), grouped in buckets.")
    clip_grad_mode: ClipGrad = knob(ClipGrad.DISABLED, "Gradient clipping: disabled, value or norm (applied to unscaled gradients).")
    clip_grad_value: str = knob("0.1", "Clip threshold; accepts the schedule syntax.")
    latent_sampling: LatentSampling = knob(LatentSampling.DETERMINISTIC, "once, deterministic (posterior mean) or random.")
    use_alpha_weight: bool = knob(False, "Use the PNG alpha channel as per-pixel loss weight.")
    shuffle_tags: bool = knob(False, "Shuffle comma-separated caption tags each time a prompt is built.")
    tag_dropout: float = knob(0.0, "Probability of dropping each caption tag.", 0.0, 1.0)
    flip: bool = knob(False, "Randomly mirror images horizontally (actually applied, unlike A1111).")
    filename_regex: str = knob("", "Keep only these regex matches of file names when building captions.")
    filename_join: str = knob(" ", "Join string for the regex matches.")
    preview_every: int = knob(500, "Render preview images every N steps; 0 disables.", 0, 10_000_000)
    save_every: int = knob(500, "Save a copy of the embedding every N steps as <name>-<N> in its own format (exactly N steps; A1111's held N-1); 0 disables.", 0, 10_000_000)
    preview_prompt: str = knob("", "Prompt for previews; empty = the first prompt of the current batch.")
    preview_negative_prompt: str = knob("", "Negative prompt for previews.")
    preview_steps: int = knob(20, "Sampling steps for previews.", 1, 150)
    preview_cfg: float = knob(7.0, "CFG scale for previews.", 1.0, 30.0)
    preview_seed: int = knob(1234, "Fixed seed so previews are comparable across steps.")
    preview_sampler: str = knob("Euler a", "Sampler for the preview images (the Generate panel's list).")
    seed: int = knob(-1, "Training seed; -1 = random.")
    save_optimizer_state: bool = knob(True, "Write an A1111 .optim sidecar so a resumed run keeps its AdamW state.")
    save_image_with_stored_embedding: bool = knob(False, "With each preview also write image_embeddings/<name>-<N>.png "
                                                  "in the run folder: the preview carrying the embedding at step N "
                                                  "(A1111's 'Save images with embedding in PNG chunks'; it loads in "
                                                  "A1111 and here). Needs preview_every.")
    write_csv_every: int = knob(1, "Append to the loss CSV every N steps; 0 disables.", 0, 10_000_000)
    gradient_checkpointing: bool = knob(False, "Trade speed for memory on small GPUs.")
    compile: Compile = knob(Compile.AUTO, "torch.compile the UNet: auto (when the run is long enough to pay off), on, off.")
    xformers: bool = knob(False, "Use xformers attention if installed (SDPA is used otherwise).")
    log_dir: str = knob("", "Run logs folder; default <outputs>/train.")

    def __post_init__(self) -> None:
        _check_ranges(self)
        _check_seeds(self, "seed", "preview_seed")
        _check_choice(self, "clip_grad_mode", ClipGrad)
        _check_choice(self, "latent_sampling", LatentSampling)
        if not self.embedding.strip():
            raise ConfigError("embedding is empty: pick the embedding to train (create one first).")
        if not str(self.dataset_dir).strip():
            raise ConfigError("dataset_dir is empty: give the folder of training images.")
        if not self.learn_rate.strip():
            raise ConfigError("learn_rate is empty: use e.g. 0.005 or '0.005:100, 1e-3:1000, 1e-5'.")
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ConfigError(f"{name} is {getattr(self, name)}; it must be a multiple of 8.")
        object.__setattr__(self, "compile", Compile.of(self.compile))
        if self.preview_sampler not in SAMPLERS:
            raise ConfigError(f"preview_sampler {self.preview_sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}.")


@dataclass(frozen=True)
class GenerateConfig:
    """The Generate panel."""

    prompt: str = knob("", "Prompt; embedding names are used as words, (word:1.2) changes emphasis.")
    negative_prompt: str = knob("", "Negative prompt; embeddings work here too.")
    sampler: str = knob("Euler a", "Sampling method.")
    steps: int = knob(20, "Sampling steps.", 1, 150)
    cfg_scale: float = knob(7.0, "Classifier-free guidance scale.", 1.0, 30.0)
    seed: int = knob(-1, "Seed; -1 = random (the seed used is shown).")
    width: int = knob(512, "Width in pixels (multiple of 8).", 64, 2048)
    height: int = knob(512, "Height in pixels (multiple of 8).", 64, 2048)
    batch_count: int = knob(1, "How many batches to run one after another.", 1, 100)
    batch_size: int = knob(1, "Images per batch.", 1, 16)
    clip_skip: int = knob(1, "Use the output of the n-th last text-encoder layer (1 = last).", 1, 12)
    save: bool = knob(True, "Save PNGs with infotext to outputs/txt2img.")
    compile: Compile = knob(Compile.OFF, "torch.compile the UNet (on, off, or auto: on a CUDA device): the first image "
                            "of each size and batch size waits for the compile (about a minute on a GPU), later ones "
                            "are faster (about 2.5x for SD 1.5 on a big GPU).")

    def __post_init__(self) -> None:
        _check_ranges(self)
        object.__setattr__(self, "compile", Compile.of(self.compile))
        _check_seeds(self, "seed")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}.")
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ConfigError(f"{name} is {getattr(self, name)}; it must be a multiple of 8.")


@dataclass(frozen=True)
class Paths:
    """Where the app keeps its files."""

    embeddings_dir: Path = Path("embeddings")
    outputs_dir: Path = Path("outputs")
    models_dir: Path = Path("models")
    cache_dir: Path = Path(".cache")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, Path(getattr(self, f.name)))
