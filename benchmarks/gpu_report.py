"""The GPU benchmark's results: the header every result carries, the Markdown table, the writer that saves both
after every system, and the speedup over diffusers."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

DIFFUSERS = "diffusers fp16 SDPA"  # the peer's row


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-bindings"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def markdown(result: dict) -> str:
    rows = ["| system | end to end ms | UNet step ms | text encoder ms | VAE ms | host/step ms | memory MiB |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = ("end_to_end_ms", "unet_step_ms", "text_encoder_ms", "vae_decode_ms", "host_per_step_ms",
            "device_memory_mib")  # fmt: skip
    for r in result["systems"]:
        if "error" in r:
            rows.append(f"| {r['system']} | failed: {r['error'][:160]} | | | | | |")
            continue
        rows.append("| " + " | ".join([r["system"], *("-" if r[k] is None else str(r[k]) for k in keys)]) + " |")
    speedup = result.get("speedup_vs_diffusers")
    model, cfg = result.get("model", "sd15-shaped"), result.get("cfg_scale", 7.5)
    rows.append(f"\n{result['device']}, {model}, {result['steps']} steps, {result['size']}x{result['size']}, batch 1, "
                f"CFG {cfg}; best sdrt speedup over diffusers end to end: {speedup}")  # fmt: skip
    return "\n".join(rows) + "\n"


class Writer:
    """Writes the result (JSON and Markdown, atomically) after every system, so a later failure or timeout keeps
    what finished."""

    def __init__(self, folder: Path, stem: str):
        self.folder, self.stem = folder, stem

    def __call__(self, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown(result))):
            path = self.folder / f"{self.stem}{suffix}"
            scratch = path.with_name(f".{path.name}.tmp")
            scratch.write_text(text, encoding="utf-8")
            scratch.replace(path)


def header(args: argparse.Namespace, device: dict) -> dict:
    return {
        **device,
        "python": platform.python_version(),
        "versions": versions(),
        "command": " ".join(["python -m benchmarks.gpu", *(sys.argv[1:] if sys.argv[0].endswith("gpu.py") else [])]),
        "model": getattr(args, "model", "sd15-shaped"),
        "size": args.size,
        "steps": args.steps,
        "cfg_scale": getattr(args, "cfg", 7.5),
        "runs": args.runs,
        "systems": [],
        "speedup_vs_diffusers": None,
    }


def speedup(systems: list[dict]) -> float | None:
    """diffusers' end-to-end time over the fastest sdrt system's (None where either is missing)."""
    peer = next((s["end_to_end_ms"] for s in systems if s["system"] == DIFFUSERS and "error" not in s), None)
    best = min((s["end_to_end_ms"] for s in systems if s["system"] != DIFFUSERS and "error" not in s), default=None)
    return round(peer / best, 3) if peer and best else None
