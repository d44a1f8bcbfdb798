"""The wrong-key benchmark runs end to end at a tiny size and reports what it measured.

Behaviour only, never timing: the figures belong to the benchmark's own output (DESIGN.md, Testing)."""

import json

from bench import wrong_key_bench


def test_wrong_key_benchmark_measures_a_known_key_a_wrong_one_sent_again_and_made_up_ones(tmp_path):
    out = tmp_path / "wrong_key_bench.json"
    assert wrong_key_bench.main(["--clients", "2", "--seconds", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    phases = results["phases"]
    assert list(phases) == [wrong_key_bench.KNOWN, wrong_key_bench.REPEATED, wrong_key_bench.FRESH]
    assert set(phases[wrong_key_bench.KNOWN]["statuses"]) == {"200"}
    for name in (wrong_key_bench.REPEATED, wrong_key_bench.FRESH):
        assert set(phases[name]["statuses"]) == {"401"} and phases[name]["requests"] > 0
        assert phases[name]["p50_ratio"] > 0 and phases[name]["req_per_s_ratio"] > 0
