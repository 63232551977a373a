"""Errors the user can act on. Every message says what is wrong and what to change.

The UI turns any `TinvError` into a readable message in one place (`tinv_ui/ui/errors.py`);
anything else is a bug and propagates unchanged.
"""


class TinvError(Exception):
    """Base class of every error whose message is meant for the user."""


class ConfigError(TinvError, ValueError):
    """A setting is out of range or two settings contradict each other. The message names the field."""


class EmbeddingFormatError(TinvError):
    """A file is not an embedding we can read (unknown layout, corrupt, empty)."""


class UnsafeFileError(EmbeddingFormatError):
    """A pickle tried to load code or objects outside the allow-list; it was refused, not run."""


class ShapeMismatchError(TinvError):
    """An embedding's width does not fit the loaded model's text encoder."""


class InvalidNameError(TinvError):
    """An embedding or file name is unsafe or already taken."""


class BusyError(TinvError):
    """The GPU (or the training slot) is in use; the message says by what."""


class DatasetError(TinvError):
    """The dataset folder has no usable image, or its captions cannot be read."""


class ModelLoadError(TinvError):
    """A model could not be loaded; the message says which file and why."""


class TrainingError(TinvError):
    """Training had to stop (NaN/inf loss, disk full, ...); the last good embedding is kept."""


class DiskFullError(TinvError, OSError):
    """A write stopped because the disk is full; the previous file (if any) is kept whole."""
