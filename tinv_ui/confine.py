"""Which folders a request from the web may read or write.

The web app confines every path that arrives over HTTP (the dataset folder, a template file, the log
folder, a model path) to the app's own folders plus the folders its owner allowed when starting it
(`python app.py --allow-dir PATH`, repeatable). A path is resolved first (`~`, `..` and symlinks, as the
core will when it opens it), so a link inside an allowed folder that points outside is refused too. The local CLI does not
use this: its user already owns the machine.

Refusals name the setting and the flag, and never read the file, so they cannot disclose its content.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from .config import Paths
from .errors import ConfigError
from .fileio import display_path
from .templates import SHIPPED_DIR

ALLOW_FLAG = "--allow-dir"


def user_template_dir(paths: Paths) -> Path:
    """User templates: `textual_inversion_templates/` beside the embeddings folder (A1111's folder name)."""
    return paths.embeddings_dir.parent / "textual_inversion_templates"


class Confinement:
    """The folders web requests may use; `check` refuses any path outside them."""

    def __init__(self, roots: Iterable[str | os.PathLike]) -> None:
        self.roots = tuple(dict.fromkeys(Path(r).resolve() for r in roots))

    @classmethod
    def for_app(cls, paths: Paths, allowed: Iterable[str | os.PathLike] = ()) -> Confinement:
        """The app's folders (embeddings, outputs with uploaded datasets, models, templates) plus `allowed`."""
        return cls([paths.embeddings_dir, paths.outputs_dir, paths.models_dir, user_template_dir(paths),
                    SHIPPED_DIR, *allowed])

    def contains(self, path: str | os.PathLike) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved == root or resolved.is_relative_to(root) for root in self.roots)

    def check(self, path: str | os.PathLike, setting: str) -> Path:
        """`path` resolved, when it lies inside an allowed folder; else a `ConfigError` naming `setting`."""
        raw = os.fspath(path)
        if "\x00" in raw:
            raise ConfigError(f"{setting} contains a NUL character; give a plain folder or file path.")
        if not self.contains(raw):
            raise ConfigError(
                f"{setting} {raw!r} is outside the folders this app may use from the web "
                f"({', '.join(display_path(r) for r in self.roots)}). Put the files in one of them, or restart the app "
                f"with {ALLOW_FLAG} FOLDER to allow another folder."
            )
        return Path(raw).expanduser().resolve()


def looks_like_path(value: str) -> bool:
    """True for values meant as a path (absolute, `./`, `../`, `~`, with a separator) rather than a name."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or "/" in value or "\\" in value
            or os.sep in value)


def is_loopback(bind: str) -> bool:
    """True when the app is bound to a loopback address or name (127.0.0.0/8, ::1, localhost)."""
    if bind.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False
