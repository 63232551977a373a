"""Command line: `python -m tinv_ui create | embeddings | train | generate`.

The options of `create`, `train` and `generate` are generated from the config dataclasses, so their names,
defaults, ranges and help are the ones the UI shows. Events from training and generation are printed one
line each to stdout (this module is the only place that writes to stdout); errors the user can act on
print one line to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (Compile, CreateConfig, FieldSpec, GenerateConfig, ModelSpec, Paths, TrainConfig, field_help,
                     field_range, field_spec)
from .errors import TinvError
from .events import Finished, Generated, Phase, Preview, Saved, Started, Step, format_duration

if TYPE_CHECKING:  # for the type hints only; the commands import them where they are used
    from .library import EmbeddingLibrary
    from .studio import Studio

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
OPTION_ALIASES = {"file_format": ("--format",)}  # short names kept for the documented create command


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- options from dataclasses ----------------------------------------------------------------------------
def _help(cls: type, spec: FieldSpec) -> str:
    text = field_help(cls, spec.name)
    lo, hi = field_range(cls, spec.name)
    if lo is not None or hi is not None:
        text += f" Range {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}."
    return f"{text} (default: {spec.shown_default!r})".replace("%", "%%")


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` option per dataclass field, typed from its default, help from its metadata."""
    for f in fields(cls):
        spec = field_spec(cls, f.name)
        flags = [f"--{f.name.replace('_', '-')}", *OPTION_ALIASES.get(f.name, ())]
        kw: dict[str, Any] = {"dest": f.name, "default": spec.shown_default, "help": _help(cls, spec)}
        if spec.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction if spec.default else "store_true"
        elif spec.kind == "choice":
            kw.update(type=str, choices=list(spec.choices))
            if isinstance(spec.default, Compile):  # a bare `--compile` still means on
                kw.update(nargs="?", const=Compile.ON.value)
        else:
            kw["type"] = {"int": int, "float": float}.get(spec.kind, str)
        parser.add_argument(*flags, **kw)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build `cls` from the parsed options (its `__post_init__` validates and names bad fields)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# -- shared setup ---------------------------------------------------------------------------------------------
def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before or after the command (after it, they only override when given)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--model", default=default("tiny"), help="Model: 'tiny' or 'tiny-sdxl', a diffusers folder, a checkpoint "
                        "file (or its name in --models-dir) or a hub id. (default: 'tiny')")
    parser.add_argument("--device", default=default(None), help="cuda, cpu, ...; default: cuda if available.")
    parser.add_argument("--dtype", default=default(None), help="float16, bfloat16 or float32; default: automatic.")
    for name, value in (("embeddings-dir", "embeddings"), ("outputs-dir", "outputs"), ("models-dir", "models"),
                        ("cache-dir", ".cache")):
        parser.add_argument(f"--{name}", type=Path, default=default(Path(value)), help=f"(default: {value})")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False), help="Log progress details.")


def _paths(args: argparse.Namespace) -> Paths:
    return Paths(args.embeddings_dir, args.outputs_dir, args.models_dir, args.cache_dir)


def _studio(args: argparse.Namespace) -> Studio:
    from .studio import Studio

    if not args.verbose:  # library chatter and progress bars would drown the CLI's own lines
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
    studio = Studio(_paths(args))
    info = studio.load(ModelSpec(args.model, device=args.device, dtype=args.dtype))
    log.info("model: %s", info.label)
    return studio


def _library(args: argparse.Namespace, studio: Studio | None = None, width: int | None = None,
             tokenizer: Any = None) -> EmbeddingLibrary:
    from .library import EmbeddingLibrary

    library = EmbeddingLibrary(args.embeddings_dir)
    if studio is not None:
        library.rescan_for(studio)
    else:  # `embeddings --width N` without a model: check against the width asked for
        library.refresh(expected_width=width, tokenizer=tokenizer)
    return library


# -- event printing -------------------------------------------------------------------------------------------
def format_event(event: Any) -> list[str]:
    """The lines the CLI prints for one event."""
    match event:
        case Phase():
            return [f"{event.text}..."]
        case Started():
            logs = f", logs in {event.log_dir}" if event.log_dir else ""
            lines = [f"started: {event.name} from step {event.initial_step} to {event.total_steps} "
                     f"on {event.num_images} images{logs}"]
            return lines + ([event.message] if event.message else [])
        case Step():
            extra = "".join(f" {k}={v:.6g}" for k, v in (("loss", event.loss), ("lr", event.lr)) if v is not None)
            return [f"step {event.step}/{event.total}{extra} elapsed {format_duration(event.elapsed)} eta {format_duration(event.eta)}"]
        case Preview():
            where = ", ".join(str(p) for p in event.paths) or f"{len(event.images)} images (not saved)"
            return [f"preview at step {event.step}: {where}"]
        case Saved():
            return [f"saved{' final' if event.final else ''} at step {event.step}: {event.path}"]
        case Finished():
            state = "interrupted" if event.interrupted else "finished"
            where = f" ({event.path})" if event.path and str(event.path) not in event.message else ""
            return [f"{state} at step {event.step}: {event.message}{where}"]
        case Generated():
            return [f"image seed {seed}: {path}" for seed, path in zip(event.seeds, event.paths)] or \
                   [f"image seed {seed} (not saved): {text}" for seed, text in zip(event.seeds, event.infotexts)]
    raise TypeError(f"unknown event {type(event).__name__}")


def _print_events(events: Iterable[Any], quiet_steps: bool = False) -> None:
    for event in events:
        if quiet_steps and isinstance(event, Step):
            continue
        for line in format_event(event):
            _out(line)


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    """Create an embedding file from initializer text."""
    from .create import check_target, create_embedding
    from .formats import read

    cfg = config_from_args(CreateConfig, args)
    check_target(cfg, args.embeddings_dir)  # a taken or unsafe name fails before the model loads
    studio = _studio(args)
    path = create_embedding(studio, cfg, args.embeddings_dir)
    emb = read(path)
    _out(f"Created: {path}")
    _out(f"{emb.name}: {emb.num_vectors} vectors of width {emb.width}, step {emb.step}")
    return 0


def _embeddings_report(library) -> dict[str, Any]:
    loaded = {
        name: {"path": str(e.path), "vectors": e.embedding.num_vectors, "width": e.embedding.width,
               "step": e.embedding.step, "hash": e.shorthash, "format": e.embedding.meta.get("format")}
        for name, e in library.loaded.items()
    }
    skipped = [{"path": str(s.path), "name": s.name, "reason": s.reason} for s in library.skipped]
    return {"loaded": loaded, "skipped": skipped, "collisions": library.collisions, "warnings": library.warnings}


def cmd_embeddings(args: argparse.Namespace) -> int:
    """List the embeddings folder: loaded, skipped (with reasons), collisions and warnings."""
    if args.check_model:
        library = _library(args, studio=_studio(args))
    else:
        from .tiny_model import load_clip_tokenizer  # the CLIP vocabulary, for name checks without a model

        library = _library(args, width=args.width, tokenizer=load_clip_tokenizer(args.cache_dir))
    report = _embeddings_report(library)
    if args.json:
        _out(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    _out(f"loaded ({len(report['loaded'])}) from {args.embeddings_dir}:")
    for name, e in report["loaded"].items():
        _out(f"  {name}: {e['vectors']} vectors, width {e['width']}, step {e['step']}, hash {e['hash']}, {e['path']}")
    _out(f"skipped ({len(report['skipped'])}):")
    for s in report["skipped"]:
        _out(f"  {s['path']}: {s['reason']}")
    for title in ("collisions", "warnings"):
        if report[title]:
            _out(f"{title}:")
            for line in report[title]:
                _out(f"  {line}")
    return 0


def _sigint_sets(stop: threading.Event) -> Callable[[], None]:
    """First Ctrl-C asks the run to stop (it saves and finishes); a second one aborts. Returns a restore."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame) -> None:
        if stop.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()
        sys.stderr.write("stopping after this step; the embedding will be saved (Ctrl-C again to abort)\n")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)
    return lambda: None


def cmd_train(args: argparse.Namespace) -> int:
    """Train an embedding; prints each phase (loading, encoding, saving, preview) as it begins, Started, one line
    per step, saves/previews and Finished."""
    from . import training

    cfg = config_from_args(TrainConfig, args)
    # `accelerate launch -m tinv_ui train ...`: one Accelerator per process, each process on its own GPU.
    accelerator = training.distributed_accelerator()
    if accelerator is not None:
        args.device = str(accelerator.device)
    studio = _studio(args)
    library = _library(args, studio=studio)
    stop = threading.Event()
    restore = _sigint_sets(stop)
    try:
        events = training.train(studio, cfg, library, _paths(args), stop=stop, accelerator=accelerator)
        if accelerator is None or accelerator.is_main_process:
            _print_events(events)
        else:
            for _ in events:  # the other processes train in step and stay silent
                pass
    finally:
        restore()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate images with the embeddings folder's embeddings; prints each image's path and seed."""
    from . import generation

    cfg = config_from_args(GenerateConfig, args)
    studio = _studio(args)
    library = _library(args, studio=studio)
    _print_events(generation.generate(studio, cfg, library, _paths(args)), quiet_steps=not args.show_steps)
    return 0


# -- parser and entry point -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (global options, then one sub-command)."""
    parser = argparse.ArgumentParser(prog="python -m tinv_ui", description="Create, train and use Textual Inversion embeddings.")
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, func: Callable[[argparse.Namespace], int], cls: type | None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=(func.__doc__ or "").strip().splitlines()[0], description=func.__doc__)
        if cls is not None:
            add_config_options(sub, cls)
        _global_options(sub, suppress=True)
        sub.set_defaults(func=func)
        return sub

    command("create", cmd_create, CreateConfig)
    listing = command("embeddings", cmd_embeddings, None)
    listing.add_argument("--width", type=int, default=None, help="Skip embeddings of another width (e.g. 768 for SD 1.x).")
    listing.add_argument("--check-model", action="store_true", help="Load --model and check widths and names against it.")
    listing.add_argument("--json", action="store_true", help="Print the report as JSON.")
    command("train", cmd_train, TrainConfig)
    gen = command("generate", cmd_generate, GenerateConfig)
    gen.add_argument("--show-steps", action="store_true", help="Print a line per denoising step.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for errors the user can fix)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TinvError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USER_ERROR
