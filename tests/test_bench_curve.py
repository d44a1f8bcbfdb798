"""The long-curve benchmark runs end to end at a small size: it seeds a curve, serves it from two API
processes and reads it whole through the CLI's pages. Behaviour only, never timing (DESIGN.md, Testing)."""

import json

from bench import curve_bench


def test_curve_benchmark_reads_the_whole_curve_from_both_sides(tmp_path):
    out = tmp_path / "curve_bench.json"

    # HEAD against itself: both sides page, and the curve (25,000 train and 500 eval points) takes 3 pages.
    assert curve_bench.main(["--points", "25000", "--baseline", "HEAD", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    for side in ("before", "after"):
        assert [run["points"] for run in results["runs"][side]["whole"]] == [25_500]
        assert results["runs"][side]["whole"][0]["requests"] == 3
        assert all(run["points"] == 10_000 for run in results["runs"][side]["first"])
        assert results["memory"][side]["peak_rss_after_first_poll"] >= results["memory"][side]["peak_rss_before"] > 0
