"""The list-polling benchmark runs end to end at a small size: it seeds a team's jobs, serves them from two API
processes, measures a 200 and a 304 of the list against /health, and polls across heartbeats and steps. Behaviour
only, never timing (DESIGN.md, Testing)."""

import json

from bench import list_poll_bench


def test_list_poll_benchmark_measures_both_sides_and_polls_across_heartbeats(tmp_path):
    out = tmp_path / "list_poll_bench.json"

    assert list_poll_bench.main(["--jobs", "30", "--clients", "2", "--seconds", "0.5", "--polls", "4",
                                 "--baseline", "HEAD", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    for side in ("before", "after"):
        found = results["sides"][side]
        assert found["cost"]["list_bytes"] > 0
        for phase in ("health", "list_200", "list_304"):
            assert found["cost"][phase]["requests"] > 0 and found["cost"][phase]["ratio_to_health"] > 0
        assert found["cost"]["list_304"]["not_modified_share"] > 0.5  # all but each client's first poll
        # HEAD is this checkout: both sides leave the heartbeat out of the list, and a step is news to both.
        assert found["heartbeats"]["not_modified_share"] == 1 and found["heartbeats"]["bytes_per_poll"] == 0
        assert found["steps"]["not_modified"] == 0
