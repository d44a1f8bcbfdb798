"""bench/tool_rows_bench.py runs end to end at a tiny size and reports what it measured.

Behaviour only, never timing: the ratio belongs to the benchmark's own output (DESIGN.md, Testing)."""

import json

from bench import tool_rows_bench


def test_tool_rows_benchmark_reads_both_rows_whole_and_reports_the_ratio(tmp_path):
    out = tmp_path / "tool_rows_bench.json"
    tool_rows_bench.main(["--small", "20", "--large", "200", "--runs", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert (results["small"]["calls"], results["large"]["calls"]) == (20, 200)
    assert results["small"]["read_whole"] and results["large"]["read_whole"]
    assert results["per_call_ratio"] == results["large"]["per_call_us"] / results["small"]["per_call_us"] > 0
