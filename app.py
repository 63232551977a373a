"""Start the tinv-ui web app: `python app.py [--host 127.0.0.1] [--port 7860] [--model tiny|PATH|hub-id] ...`.

Binds to 127.0.0.1 unless told otherwise; `--share` or a non-loopback `--host` exposes the app (and the
files it can read and write) to others, so a warning is logged and `--auth user:pass` is recommended.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from tinv_ui.confine import is_loopback  # light: no torch or gradio

log = logging.getLogger("tinv_ui.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="tinv-ui: create, train and use Textual Inversion embeddings in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    p.add_argument("--model", default=None,
                   help="'tiny' (random weights, for testing), a checkpoint/diffusers folder, a name in models/, or a hub id. "
                        "Default: the first checkpoint in models/, else the tiny model.")
    p.add_argument("--embeddings-dir", type=Path, default=Path("embeddings"), help="Embeddings folder (default embeddings/).")
    p.add_argument("--outputs-dir", type=Path, default=Path("outputs"), help="Outputs folder (default outputs/).")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="Checkpoints folder (default models/).")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="Cache folder (tiny model, converted checkpoints).")
    p.add_argument("--share", action="store_true", help="Create a public gradio.live link (exposes the app!).")
    p.add_argument("--xformers", action="store_true", help="Use xformers attention when CUDA and xformers are available.")
    p.add_argument("--compile", action="store_true",
                   help="Tick 'torch.compile the UNet' in the Generate panel: each new image size/batch size compiles "
                        "once (about a minute on a GPU), later images are faster.")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="Require this login.")
    p.add_argument("--allow-dir", type=Path, action="append", default=[], metavar="PATH",
                   help="Also let the page use this folder (dataset, template, log folder, model); repeatable. "
                        "By default paths typed into the page must lie in the embeddings, outputs, models and "
                        "textual_inversion_templates folders.")
    args = p.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not all(args.auth.split(":", 1))):
        p.error("--auth must look like user:password")
    return args


def exposure_warning(host: str, share: bool, auth: str | None) -> str | None:
    """The warning to log when the app is reachable from other machines, else None."""
    where = []
    if share:
        where.append("the internet (--share)")
    if not is_loopback(host):
        where.append(f"the network (--host {host})")
    if not where:
        return None
    login = "" if auth else " Add --auth user:pass to require a login."
    return (f"tinv-ui is exposed to {' and '.join(where)}: anyone who can reach it can run the GPU and read/write "
            f"files in the embeddings, outputs and dataset folders.{login}")


def default_model(models_dir: Path) -> str:
    """The first checkpoint in models/, else the tiny test model."""
    from tinv_ui.studio import list_models

    found = list_models(models_dir)
    return str(models_dir / found[0]) if found else "tiny"


def load_startup_model(studio, model: str | None, models_dir: Path) -> None:
    """Load `--model` (default: the first checkpoint in models/). When it cannot be loaded the app still starts,
    on the tiny test model: the console gets one line saying why, and the page's status line shows it too."""
    from tinv_ui.config import ModelSpec

    studio.load_or_fall_back(ModelSpec(model if model is not None else default_model(models_dir)))


def main(argv: list[str] | None = None) -> None:
    """Parse args, load the model, build the UI and serve it until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request Gradio makes to itself
    args = parse_args(argv)
    if warning := exposure_warning(args.host, args.share, args.auth):
        log.warning(warning)

    from tinv_ui.config import Paths
    from tinv_ui.jobs import TrainingRunner
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.studio import Studio
    from tinv_ui.ui import build_ui, launch
    from tinv_ui.ui.model_picker import enable_xformers

    paths = Paths(args.embeddings_dir, args.outputs_dir, args.models_dir, args.cache_dir)
    for folder in (paths.embeddings_dir, paths.outputs_dir, paths.models_dir):
        folder.mkdir(parents=True, exist_ok=True)
    studio = Studio(paths)
    load_startup_model(studio, args.model, paths.models_dir)
    if args.xformers:
        enable_xformers(studio)
    library = EmbeddingLibrary(paths.embeddings_dir)
    runner = TrainingRunner(studio, library, paths)
    for folder in args.allow_dir:
        if not folder.is_dir():
            log.warning("--allow-dir %s is not a folder (yet); it is allowed anyway.", folder)
    demo = build_ui(studio, library, runner, paths, xformers=args.xformers, compile=args.compile,
                    allow_dirs=args.allow_dir)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    log.info("serving on http://%s:%d", args.host, args.port)
    launch(demo, paths, args.host, args.port, share=args.share, auth=auth)


if __name__ == "__main__":
    main()
