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


def test_curve_benchmark_watchers_of_a_running_job_get_the_baselines_bytes(tmp_path):
    """--watchers: clients poll the thinned view while the job appends points; each side's Postgres time is read
    from the database's own counters, and the after side's last answers are the baseline's bytes."""
    out = tmp_path / "curve_watch_bench.json"

    assert curve_bench.main(["--points", "20000", "--watchers", "2", "--seconds", "2", "--append-per-s", "40",
                             "--baseline", "HEAD", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True and results["turns"]["after"][0]["same_bytes"] is True
    for side in ("before", "after"):
        turn = results["turns"][side][0]
        assert turn["requests"] and all(request["status"] == 200 for request in turn["requests"])
        assert turn["postgres"]["active_ms"] > 0 and turn["postgres"]["rows_read"] > 0
    assert results["turns"]["after"][0]["appended_to"] > 20_000


def test_curve_benchmark_buckets_reads_the_replaced_joins_answers(tmp_path):
    """--buckets: the bucket query and the join it replaced answer alike, stale statistics and fresh."""
    out = tmp_path / "curve_buckets_bench.json"

    assert curve_bench.main(["--buckets", "3000", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    assert set(results["results"]) == {"3000 stale", "3000 analyzed"}
    assert all(row["before"] > 0 and row["after"] > 0 for row in results["results"].values())


def test_curve_benchmark_streams_reads_each_sides_stream_whole_and_polls_past_its_end(tmp_path):
    """--streams: each side's stream of the finished job is read to its end, every point of the curve, the same
    points on both sides; --polls: a watch's curve poll asked of each side, none failing."""
    out = tmp_path / "curve_stream_bench.json"

    assert curve_bench.main(["--points", "2000", "--streams", "1", "--polls", "0.5", "--repeats", "1", "--baseline", "HEAD",
                             "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    for side in ("before", "after"):
        [run] = results["runs"][side]
        assert run["points"] == 2000 + 2000 // 50 and run["api_cpu_ms"] >= 0
        [poll] = results["polls"][side]
        assert poll["polls"] > 0 and poll["errors"] == 0
