"""The CPU benchmark's results: per-variant medians and spread over the rounds, the image differences, the speedup
over diffusers, issue 20's targets, and the Markdown table."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from benchmarks.cpu_worker import DIFFUSERS_BF16, DIFFUSERS_FP32, DIFFUSERS_FP32_JEMALLOC, SDRT_FP32, VARIANTS

MEASURES = ("text_encoder_s", "unet_step_s", "vae_decode_s", "end_to_end_s", "peak_rss_gib")
# issue 20, at 512x512 in one run: sdrt's best exact path, its best path at all, and its memory
TARGET_EXACT = 1.8  # over diffusers torch fp32 end to end
TARGET_ANY = 2.5  # over diffusers torch fp32 end to end
TARGET_ANY_OVER_BF16 = 1.3  # over diffusers torch bf16 end to end


def spread(values: list[float]) -> dict:
    """Median, min and max of a variant's rounds (and the rounds themselves, in run order)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def summarize(runs: list[dict]) -> dict:
    """One variant at one size: its rounds (worker outputs) -> medians and spread per measure.

    A round that failed is kept with its reason; a variant with no finished round is "failed"."""
    done = [r for r in runs if "failed" not in r]
    failures = [r["failed"] for r in runs if "failed" in r]
    if not done:
        return {"status": "failed", "reason": failures[0] if failures else "not run", "rounds": 0}
    summary: dict = {"status": "ok", "rounds": len(done)}
    for key in MEASURES:
        values = [r[key] for r in done if r.get(key) is not None]
        summary[key] = spread(values) if values else None
    summary["unet_calls"] = done[0].get("unet_calls")
    summary["allocator"] = sorted({r.get("allocator", "default") for r in done})
    summary["load_s"] = spread([r["load_s"] for r in done])
    if failures:
        summary["failed_rounds"] = failures
    return summary


def image_difference(image: Path, reference: Path) -> dict:
    """Mean and max absolute difference of two uint8 images, in 8-bit levels (0..255)."""
    a = np.load(image).astype(np.int16)
    b = np.load(reference).astype(np.int16)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    diff = np.abs(a - b)
    return {"mean_abs": round(float(diff.mean()), 4), "max_abs": int(diff.max())}


def add_comparisons(variants: dict[str, dict], images: dict[str, Path]) -> None:
    """Fill in each finished variant's speedup_end_to_end (diffusers torch fp32's median over its own) and its
    image difference to its family's fp32 image (sdrt onnxruntime fp32 also against diffusers torch fp32)."""
    peer = _median(variants, DIFFUSERS_FP32, "end_to_end_s")
    for name, result in variants.items():
        if result.get("status") != "ok":
            continue
        own = result["end_to_end_s"]["median"]
        result["speedup_end_to_end"] = round(peer / own, 3) if peer else None
        pairs = {VARIANTS[name].reference} if VARIANTS[name].reference else set()
        if name == SDRT_FP32:
            pairs.add(DIFFUSERS_FP32)
        result["image_difference"] = {
            ref: image_difference(images[name], images[ref])
            for ref in sorted(pairs)
            if ref in images and name in images
        }


def targets(variants: dict[str, dict]) -> dict:
    """Issue 20's targets from this size's medians: pass, fail, or None where a needed variant did not run."""
    peer = _median(variants, DIFFUSERS_FP32, "end_to_end_s")
    bf16 = _median(variants, DIFFUSERS_BF16, "end_to_end_s")
    sdrt = {n: r for n, r in variants.items() if VARIANTS[n].family == "sdrt" and r.get("status") == "ok"}
    exact = {n: r for n, r in sdrt.items() if VARIANTS[n].exact}
    best_exact = min(exact, key=lambda n: exact[n]["end_to_end_s"]["median"], default=None)
    best_any = min(sdrt, key=lambda n: sdrt[n]["end_to_end_s"]["median"], default=None)

    def ratio(over: float | None, name: str | None) -> float | None:
        return round(over / variants[name]["end_to_end_s"]["median"], 3) if over and name else None

    def check(value: float | None, bound: float) -> dict:
        return {"value": value, "target": bound, "pass": None if value is None else value >= bound}

    checks = {
        "best_exact_sdrt_over_diffusers_fp32": {"variant": best_exact, **check(ratio(peer, best_exact), TARGET_EXACT)},
        "best_sdrt_over_diffusers_fp32": {"variant": best_any, **check(ratio(peer, best_any), TARGET_ANY)},
        "best_sdrt_over_diffusers_bf16": {"variant": best_any, **check(ratio(bf16, best_any), TARGET_ANY_OVER_BF16)},
    }
    # "against the peer at its best": diffusers fp32 with or without jemalloc, whichever was faster here
    best_peer = min(filter(None, (peer, _median(variants, DIFFUSERS_FP32_JEMALLOC, "end_to_end_s"))), default=None)
    checks["best_exact_sdrt_over_best_diffusers_fp32"] = {
        "variant": best_exact,
        **check(ratio(best_peer, best_exact), TARGET_EXACT),
    }
    checks["best_sdrt_over_best_diffusers_fp32"] = {
        "variant": best_any,
        **check(ratio(best_peer, best_any), TARGET_ANY),
    }
    checks["peak_rss_sdrt_at_most_diffusers_fp32"] = _memory_check(variants, sdrt)
    return checks


def _memory_check(variants: dict[str, dict], sdrt: dict[str, dict]) -> dict:
    """Every finished sdrt variant's median peak RSS against diffusers torch fp32's (each in its own process)."""
    peer = _median(variants, DIFFUSERS_FP32, "peak_rss_gib")
    per_variant = {n: r["peak_rss_gib"]["median"] for n, r in sdrt.items()}
    each = {n: None if peer is None else v <= peer for n, v in per_variant.items()}
    return {
        "diffusers_fp32_gib": None if peer is None else round(peer, 3),
        "sdrt_gib": {n: round(v, 3) for n, v in per_variant.items()},
        "pass_per_variant": each,
        "pass": None if peer is None or not each else all(each.values()),  # every sdrt variant measured
    }


def _median(variants: dict[str, dict], name: str, key: str) -> float | None:
    result = variants.get(name)
    if not result or result.get("status") != "ok" or not result.get(key):
        return None
    return result[key]["median"]


def markdown(record: dict) -> str:
    """One table per size: the medians (min-max), peak RSS, speedup and image difference of every variant."""
    lines = []
    for size, block in record["results"].items():
        rounds = record.get("rounds_done", {}).get(size, record["rounds"])
        lines += [f"\n{size}x{size}, {record['steps']} steps, {rounds} interleaved rounds, "
                  f"{record['device']['model_name']} ({record['device']['cores']} cores)\n",
                  "| variant | text encoder s | UNet step s | VAE decode s | end to end s | peak RSS GiB | speedup | "
                  "image difference (mean / max, 8-bit) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in block["variants"].items():
            if r["status"] != "ok":
                reason = r["reason"][:120].replace("|", "/")  # a table cell
                lines.append(f"| {name} | {r['status']}: {reason} | | | | | | |")
                continue
            cells = [_cell(r[k], "{:.2f}" if k == "peak_rss_gib" else "{:.3g}") for k in MEASURES]
            diffs = "; ".join(f"{d['mean_abs']:.2f} / {d['max_abs']} vs {ref}" for ref, d in
                              r.get("image_difference", {}).items() if "error" not in d) or "-"  # fmt: skip
            speedup = "-" if r.get("speedup_end_to_end") is None else f"{r['speedup_end_to_end']:.2f}x"
            lines.append(f"| {name} | {' | '.join(cells)} | {speedup} | {diffs} |")
        for check, result in block["targets"].items():
            lines.append(f"- {check}: {_verdict(result)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _cell(value: dict | None, form: str) -> str:
    if value is None:
        return "-"
    if value["min"] == value["max"]:
        return form.format(value["median"])
    return f"{form.format(value['median'])} ({form.format(value['min'])}-{form.format(value['max'])})"


def _verdict(result: dict) -> str:
    verdict = {True: "pass", False: "FAIL", None: "not measured"}[result["pass"]]
    if "value" in result and result["value"] is None:
        return f"{verdict} (a variant it needs did not run)"
    if "value" in result:
        return f"{verdict} ({result['value']}x, target {result['target']}x, {result['variant']})"
    return f"{verdict} (diffusers fp32 {result['diffusers_fp32_gib']} GiB; sdrt {result['sdrt_gib']})"
