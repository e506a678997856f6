"""benchmarks.cpu on the tiny checkpoint: one round, sdrt and diffusers each in a process of its own, the record's
medians, speedups, image differences and skip reasons."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import cpu


def test_cpu_benchmark_writes_a_well_formed_record(tiny_sd1, shared_engines, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' torch on one thread of the two shared cores
    out = tmp_path / "cpu.json"
    variants = "sdrt-onnxruntime-fp32,diffusers-torch-fp32,diffusers-torch-fp32-jemalloc"
    argv = ["--model", str(tiny_sd1), "--engines", str(shared_engines), "--sizes", "64", "--rounds", "1",
            "--steps", "2", "--variants", variants, "--jemalloc", str(tmp_path / "missing.so"),
            "--workdir", str(tmp_path), "--out", str(out)]  # fmt: skip
    record = cpu.main(argv)
    assert json.loads(out.read_text()) == record
    assert record["command"].startswith("python -m benchmarks.cpu --model")
    assert record["device"]["cores"] >= 1 and isinstance(record["device"]["flags"]["avx512f"], bool)
    assert record["device"]["model_name"] and "onnxruntime" in record["versions"]
    assert record["environment"]["OMP_NUM_THREADS"] == "1" and record["rounds_done"] == {"64": 1}
    block = record["results"]["64"]
    results = block["variants"]
    skipped = results["diffusers-torch-fp32-jemalloc"]
    assert skipped["status"] == "skipped" and "missing.so is not a file" in skipped["reason"]
    assert record["skipped"] == {"diffusers-torch-fp32-jemalloc": skipped["reason"]}

    sdrt, peer = results["sdrt-onnxruntime-fp32"], results["diffusers-torch-fp32"]
    for result in (sdrt, peer):
        assert result["status"] == "ok" and result["rounds"] == 1
        assert result["unet_calls"] == 2  # Euler: one UNet call per step, uncond and cond in one batch
        total = result["end_to_end_s"]
        assert total["min"] == total["median"] == total["max"] == total["runs"][0] > 0
        unet = 2 * result["unet_step_s"]["median"]
        assert 0 < result["text_encoder_s"]["median"] + unet + result["vae_decode_s"]["median"] < total["median"]
        assert 0.05 < result["peak_rss_gib"]["median"] < 8
        assert result["speedup_end_to_end"] == round(peer["end_to_end_s"]["median"] / total["median"], 3)
    assert peer["speedup_end_to_end"] == 1.0 and peer["allocator"] == ["default"]
    parity = sdrt["image_difference"]["diffusers-torch-fp32"]  # the same seed and sampler: the same image
    assert parity["max_abs"] <= 3 and parity["mean_abs"] < 0.5

    targets = block["targets"]
    exact = targets["best_exact_sdrt_over_diffusers_fp32"]
    assert exact["variant"] == "sdrt-onnxruntime-fp32" and exact["value"] == sdrt["speedup_end_to_end"]
    assert exact["pass"] == (exact["value"] >= 1.8)
    assert targets["best_sdrt_over_diffusers_bf16"]["pass"] is None  # torch bf16 was not run: not measured
    memory = targets["peak_rss_sdrt_at_most_diffusers_fp32"]
    assert memory["pass"] == (sdrt["peak_rss_gib"]["median"] <= peer["peak_rss_gib"]["median"])


def test_rounds_rotate_and_arguments_are_checked(capsys) -> None:
    names = ["a", "b", "c"]
    assert [cpu.rotated(names, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], names]
    for argv in (["--variants", "sdrt-onnxruntime-fp16"], ["--sizes", "100"], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cpu.parse_args(argv)
        assert exit_info.value.code == 2
    assert "unknown variants ['sdrt-onnxruntime-fp16']" in capsys.readouterr().err


def test_budget_starts_no_round_that_the_last_one_says_would_overrun() -> None:
    unlimited, budget = cpu.Budget(None), cpu.Budget(1.0)
    assert unlimited.allows_another_round(0) and budget.allows_another_round(0)
    budget.round_done()
    assert budget.allows_another_round(1)  # the first round took about nothing
    budget.last_round = 61.0  # a round as long as the whole minute
    assert not budget.allows_another_round(2) and unlimited.allows_another_round(2)


def test_a_worker_that_fails_is_recorded_with_its_error_line(tmp_path) -> None:
    args = argparse.Namespace(model_folder=tmp_path / "absent", engines=tmp_path / "engines", worker_timeout=120,
                              lock=None)  # fmt: skip
    name = "sdrt-onnxruntime-fp32"
    result = cpu.run_worker(name, args, 64, 1, None, cpu.worker_env(name, None))
    assert result["failed"].startswith("exit 1: runtime.errors.ModelError: model") and "absent" in result["failed"]
