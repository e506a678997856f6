"""benchmarks.host_gap: the real txt2img pipeline over a stand-in backend, every gap between UNet calls timed."""

from __future__ import annotations

import json

from benchmarks import host_gap


def test_host_gap_measures_every_gap_between_unet_calls(tmp_path, capsys) -> None:
    out = tmp_path / "host_gap.json"
    host_gap.main(
        ["--steps", "3", "--runs", "2", "--unet-ms", "2", "--samplers", "Euler a", "Heun", "--json", str(out)]
    )
    record = json.loads(out.read_text())
    rows = {row["sampler"]: row for row in record["results"]}
    assert rows["Euler a"]["unet_calls"] == 3 and rows["Heun"]["unet_calls"] == 5  # Heun: 2 per step, 1 for the last
    for row in rows.values():
        assert 0 < row["median_gap_ms"] <= row["p90_gap_ms"] <= row["max_gap_ms"]
    assert record["meta"]["shape"] == [1, 4, 64, 64] and record["meta"]["unet_ms"] == 2
    assert "Euler a" in capsys.readouterr().out
