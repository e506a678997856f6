"""sdrt runtime: generate images from exported Stable Diffusion models with numpy and a backend.

Importing this package never imports torch; only the torch backend does, when it is chosen.
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a model for generation; see runtime.api.load."""
    from .api import load as _load

    return _load(*args, **kwargs)
