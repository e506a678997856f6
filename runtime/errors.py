"""Typed errors of sdrt. Each carries a one-line message meant for a person; the CLI prints it and exits 2."""


class SdrtError(Exception):
    """Base class of every error sdrt raises on purpose."""


class InvalidRequestError(SdrtError, ValueError):
    """A generation request or option is out of range or malformed (size, steps, sampler, ...)."""


class ModelError(SdrtError):
    """A model folder, manifest or artifact is missing, unreadable, corrupt or stale."""


class BackendUnavailableError(SdrtError):
    """The chosen backend cannot run here (package not installed, no device)."""


class NumericalError(SdrtError):
    """The computation produced NaN or Inf (for example an fp16 overflow in the VAE)."""


class OutputError(SdrtError):
    """An output file cannot be written (missing folder, unknown format)."""
