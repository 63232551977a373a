"""The Gradio web UI: a thin layer over the core (`build_ui(studio, library, runner, paths)`).

Only this package imports gradio. Importing it builds nothing: `build_ui` makes the Blocks, `launch` serves them.
"""

from .app_ui import build_ui, launch

__all__ = ["build_ui", "launch"]
