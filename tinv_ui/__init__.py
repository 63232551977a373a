"""tinv-ui: create, train and use Textual Inversion embeddings.

Importing this package is cheap: it pulls in neither torch-heavy modules nor gradio.
"""

__version__ = "0.1.0"
