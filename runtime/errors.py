"""Typed errors of sdrt. Each carries a one-line message meant for a person; the CLI prints it and exits 2."""


class SdrtError(Exception):
    """Base class of every error sdrt raises on purpose."""


class InvalidRequestError(SdrtError, ValueError):
    """A generation request or option is out of range or malformed (size, steps, sampler, ...)."""


class ModelError(SdrtError):
    """A model folder, manifest or artifact is missing, unreadable, corrupt or stale."""


class ArtifactError(ModelError):
    """An exported ONNX artifact (or its manifest) is missing or corrupt: exporting the checkpoint again fixes it.
    The only error on which loading re-exports; engine, driver and backend failures never do."""


class BackendUnavailableError(SdrtError):
    """The chosen backend cannot run here (package not installed, no device)."""


class NumericalError(SdrtError):
    """The computation produced NaN or Inf (for example an fp16 overflow in the VAE)."""


class ResourceError(SdrtError):
    """A request needs more of a resource (memory, prompt length) than the configured budget allows; the message
    names what fits. Raised before any work where it can be estimated, else when an allocation fails."""


class AllocationError(ResourceError):
    """An allocation failed while generating (the backend or numpy ran out of memory); the message names the size
    that was asked for. The request is over what the machine can give now, not malformed."""


class OutputError(SdrtError):
    """An output file cannot be written (missing folder, unknown format)."""


# ---------------------------------------------------------------------------------------------- serving


class ServiceError(SdrtError):
    """A request to the serving layer (runtime.serving) did not complete; the subclasses say why."""


class RequestCancelled(ServiceError):
    """The request was cancelled (by its caller, a client that went away, shutdown, or skipped after an interrupt)."""


class RequestTimeout(ServiceError):
    """The request did not finish within its timeout."""


class ServiceClosed(ServiceError):
    """The service is shut down (or shutting down) and takes no new requests."""


class QueueFull(ServiceError):
    """The service's queue is at its configured limit; retry later."""


class LoraError(SdrtError, ValueError):
    """A LoRA cannot be used: unknown name, unreadable file, or weights that do not fit the model."""
