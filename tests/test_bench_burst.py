"""The burst benchmark runs end to end at a small size and reports what it measured.

Behaviour only, never timing: the figure belongs to the benchmark's own output (DESIGN.md, Testing)."""

import json

from bench import burst_bench


def test_burst_and_flood_benchmarks_measure_the_calm_team_alone_and_beside_the_other_team(tmp_path):
    """Both modes in one invocation (--then-flood), so one deployment serves both: the burst of POST /jobs,
    then the flood of GETs."""
    out = tmp_path / "burst_bench.json"
    assert burst_bench.main(["--then-flood", "1", "--threads", "3", "--seconds", "2", "--rows", "300", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    assert set(results["burst"]) <= {"201", "429"} and results["burst"].get("201")
    for call in burst_bench.CALLS:
        measured = results["calm"][call]
        assert measured["alone"]["count"] > 0 and measured["beside_burst"]["count"] > 0
        assert measured["median_ratio"] > 0

    results = results["flood"]
    assert results["ok"] is True and results["mode"] == "flood"
    assert set(results["burst"]) == {"200"} and results["burst_per_s"]["alone"] > 0 and results["burst_per_s"]["beside_calm"] > 0
    assert len(results["load_avg_before"]) == 3
    for call in (*burst_bench.FLOOD_CALLS, "all"):
        measured = results["calm"][call]
        assert measured["alone"]["count"] > 0 and measured["beside_flood"]["count"] > 0
        assert measured["p50_ratio"] > 0 and measured["p99_ratio"] > 0
