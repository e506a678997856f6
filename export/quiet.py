"""Keeping diffusers' and transformers' own output out of sdrt's: their loggers and progress bars, for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_hub_libraries() -> Iterator[None]:
    """diffusers' and transformers' loggers at ERROR and their progress bars off for the block, restored afterwards.

    Their weight-loading and shard-writing bars take milliseconds on these models and, nested under sdrt's own
    bar, leave escape codes in logs; importing diffusers' pipeline classes warns that torchvision is absent, for
    image processors sdrt never uses."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
