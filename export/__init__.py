"""Offline stage: diffusers checkpoint -> ONNX artifacts + manifest (needs the export extras)."""

from .onnx_export import export_model

__all__ = ["export_model"]
