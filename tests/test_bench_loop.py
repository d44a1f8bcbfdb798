"""The event-loop benchmark runs end to end at a small size: it seeds a long curve and another team's job, serves
them from two API processes, and probes each quiet and while page pullers run. Behaviour only, never timing
(DESIGN.md, Testing)."""

import json

from bench import loop_bench


def test_loop_benchmark_probes_both_sides_quiet_and_under_page_pullers(tmp_path):
    out = tmp_path / "loop_bench.json"

    assert loop_bench.main(["--points", "25000", "--pullers", "2", "--probes", "6", "--baseline", "HEAD",
                            "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    for side in ("before", "after"):
        [run] = results["runs"][side]
        for phase in ("quiet", "loaded"):
            assert len(run[phase]["job"]) == 3 and len(run[phase]["health"]) == 3  # the kinds in turn
        assert run["pages_before_probes"] >= 2  # every puller had a full page before the probes began
        for kind in loop_bench.PROBES:
            assert results["stats"][side][kind]["ratio_median"] > 0
