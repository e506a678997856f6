"""Serving: one loaded model shared by many threads (a queue, batching, progress, cancellation, timeouts)."""

from .jobs import Job, Progress, ProgressCallback
from .service import MODES, Service, ServiceConfig

__all__ = ["MODES", "Job", "Progress", "ProgressCallback", "Service", "ServiceConfig"]
