"""The one place where core errors become UI messages.

A `TinvError` is meant for the user: it becomes a `gr.Error` toast with its message, never a traceback.
Anything else is a bug and propagates unchanged (Gradio logs it and shows a generic error).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import gradio as gr

from ..errors import TinvError

log = logging.getLogger(__name__)


def as_gr_error(error: TinvError) -> gr.Error:
    """A `gr.Error` with the error's own message (its class name only as the title)."""
    log.info("user error: %s", error)
    return gr.Error(str(error), title=_title(error), print_exception=False)


def _title(error: TinvError) -> str:
    name = type(error).__name__.removesuffix("Error")
    words = "".join(f" {c}" if c.isupper() else c for c in name).strip()
    return words or "Error"


def user_errors(fn: Callable) -> Callable:
    """Decorate a Gradio handler (function or generator) so `TinvError` shows as a readable `gr.Error`."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            gen = fn(*args, **kwargs)
            try:
                yield from gen
            except TinvError as e:
                raise as_gr_error(e) from None
            finally:
                gen.close()  # reach the core generator's `finally` now, not at garbage collection

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TinvError as e:
            raise as_gr_error(e) from None

    return wrapper
