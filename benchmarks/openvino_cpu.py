"""OpenVINO against ONNX Runtime on the CPU, over one artifact folder: one UNet call (batch 2: the CFG pair) and one
VAE decode at one size, the variants interleaved (A B C A B C ...) in one process; medians and spread per variant,
the outputs' differences to ONNX Runtime fp32, and OpenVINO's start-up (compile into an empty model cache, then a
second start that imports it).

    flock /work/bench/heavy.lock python -m benchmarks.openvino_cpu --artifacts DIR --size 512 --rounds 5 --json OUT

Variants: onnxruntime fp32 (the exported graph, as OnnxRuntimeSession opens it), openvino fp32, openvino bf16 (only
where the CPU plugin lists BF16; otherwise recorded as unsupported with the CPU's capabilities); with --static also
openvino fp32 compiled for the benchmark's shapes only (what compiling per shape would gain over the dynamic model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


def _inputs(size: int, hidden: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    latent = size // 8
    unet = {
        "sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),  # [2B, 4, h, w]
        "timestep": np.full(2, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32),  # [2B, 77, D]
    }
    return {"unet": unet, "vae_decoder": {"latent": rng.standard_normal((1, 4, latent, latent), dtype=np.float32)}}


def _timed(label: str, action, *args) -> tuple[object, float]:
    start = time.perf_counter()
    value = action(*args)
    seconds = time.perf_counter() - start
    tqdm.write(f"{label}: {seconds:.2f} s")
    return value, seconds


def _openvino_start(folder: Path, precision: str) -> dict:
    """Seconds to open the UNet and VAE decoder with an empty cache, then again from the cache it wrote."""
    from runtime.backends.openvino import CACHE_FOLDER, OpenVinoBackend

    shutil.rmtree(folder / CACHE_FOLDER, ignore_errors=True)
    result = {}
    for start in ("compile", "from_cache"):
        backend = OpenVinoBackend(folder, precision=precision)
        for component in ("unet", "vae_decoder"):
            session, seconds = _timed(f"openvino {precision} {component} {start}", backend.session, component)
            result[f"{component}_{start}_s"] = seconds
            result[f"{component}_{start}_loaded_from_cache"] = session.loaded_from_cache
        backend = None  # released before the next start opens its own
    return result


class StaticSession:
    """OpenVINO fp32 compiled for one set of input shapes (the backend compiles the dynamic model once)."""

    def __init__(self, path: Path, feeds: dict[str, np.ndarray]):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        model.reshape({name: list(value.shape) for name, value in feeds.items()})
        self._request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {port.get_any_name(): value for port, value in self._request.infer(feeds).items()}


def run(folder: Path, size: int, rounds: int, static: bool = False, out: Path | None = None) -> dict:
    """The benchmark; with `out`, the result so far is written there after every timed round."""
    import openvino as ov

    from runtime.backends.onnxruntime import OnnxRuntimeSession
    from runtime.backends.openvino import OpenVinoBackend, cpu_capabilities
    from runtime.manifest import read_manifest

    capabilities = cpu_capabilities(ov.Core())
    precisions = ["fp32"] + (["bf16"] if "BF16" in capabilities else [])
    start_up = {p: _openvino_start(folder, p) for p in precisions}
    sessions = {}
    for component in ("unet", "vae_decoder"):
        path = folder / "onnx" / f"{component}.onnx"
        sessions["onnxruntime-fp32", component] = OnnxRuntimeSession(path, component, ["CPUExecutionProvider"])
    for precision in precisions:
        backend = OpenVinoBackend(folder, precision=precision)
        for component in ("unet", "vae_decoder"):
            sessions[f"openvino-{precision}", component] = backend.session(component)
    inputs = _inputs(size, read_manifest(folder).model["text_hidden_size"])
    variants = ["onnxruntime-fp32"] + [f"openvino-{p}" for p in precisions]
    if static:
        for component, feeds in inputs.items():
            sessions["openvino-fp32-static", component] = StaticSession(folder / "onnx" / f"{component}.onnx", feeds)
        variants.append("openvino-fp32-static")
    times = {(v, c): [] for v in variants for c in inputs}
    outputs = {}
    result = {}
    for round_index in tqdm(range(rounds + 1), desc="rounds (the first is warm-up)"):
        for component, feeds in inputs.items():
            for variant in variants:
                values, seconds = _timed(f"{variant} {component}", sessions[variant, component].run, feeds)
                if round_index:
                    times[variant, component].append(seconds)
                outputs[variant, component] = next(iter(values.values()))
        if round_index:
            meta = {
                "device": f"{ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}, {os.cpu_count()} CPUs",
                "cpu_capabilities": capabilities,
                "openvino": ov.__version__,
                "python": platform.python_version(),
                "size": size,
                "unet_batch": 2,
                "vae_batch": 1,
                "rounds": round_index,
                "load_average": list(os.getloadavg()),
            }
            summary = _summary(times, outputs, variants, capabilities)
            result = {"meta": meta, "openvino_start": start_up, "summary": summary}
            if out:
                out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _summary(times: dict, outputs: dict, variants: list[str], capabilities: list[str]) -> dict:
    """Per variant and component: medians and spread, speed-up and output difference against onnxruntime fp32;
    bf16's difference to openvino fp32."""
    summary = {}
    for (variant, component), values in times.items():
        reference = outputs["onnxruntime-fp32", component]
        summary.setdefault(variant, {})[component] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "runs_s": values,
            "max_abs_diff_vs_onnxruntime_fp32": float(np.abs(outputs[variant, component] - reference).max()),
            "output_std": float(reference.std()),
        }
    for variant in variants[1:]:
        for component, entry in summary[variant].items():
            entry["speedup_vs_onnxruntime_fp32"] = (
                summary["onnxruntime-fp32"][component]["median_s"] / entry["median_s"]
            )
    if "openvino-bf16" in variants:
        for component, entry in summary["openvino-bf16"].items():
            diff = np.abs(outputs["openvino-bf16", component] - outputs["openvino-fp32", component])
            entry["max_abs_diff_vs_openvino_fp32"] = float(diff.max())
            entry["mean_abs_diff_vs_openvino_fp32"] = float(diff.mean())
    else:
        summary["openvino-bf16"] = {"unsupported": f"CPU plugin OPTIMIZATION_CAPABILITIES: {', '.join(capabilities)}"}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="an exported artifact folder")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--static", action="store_true", help="also openvino fp32 compiled for these shapes")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()
    result = run(args.artifacts, args.size, args.rounds, args.static, args.json)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
