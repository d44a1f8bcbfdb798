"""bench/rows_bench.py runs end to end at a tiny size and reports what it measured.

Behaviour only, never memory figures: the bytes per token belong to the benchmark's own output (DESIGN.md, Testing)."""

import json

from bench import rows_bench


def test_rows_benchmark_builds_the_same_dataset_both_ways_and_reports_bytes_per_token(tmp_path):
    out = tmp_path / "rows_bench.json"
    assert rows_bench.main(["--tokens", "20000", "--row-tokens", "100", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["same_dataset"] is True
    for way in ("lists", "prepared", "arrow"):
        half, whole = results[way]["runs"]
        assert 0 < half["tokens"] < whole["tokens"]
        assert "held_bytes_per_token" in results[way] and "peak_bytes_per_token" in results[way]
