"""The /metrics benchmark runs end to end at a tiny size and reports what it measured.

Behaviour only, never timing: the ratio belongs to the benchmark's own output (DESIGN.md, Testing).
"""

import json

from bench import metrics_bench


def test_metrics_benchmark_scrapes_a_short_and_a_long_history(tmp_path):
    out = tmp_path / "metrics_bench.json"

    exit_code = metrics_bench.main(["--small", "3", "--large", "60", "--points", "3", "--scrapes", "3",
                                    "--out", str(out)])

    assert exit_code == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True
    sizes = results["sizes"]
    assert [sizes["small"]["finished_jobs"], sizes["large"]["finished_jobs"]] == [3, 60]
    for size in sizes.values():
        assert size["errors"] == 0 and size["first_scrape_status"] == 200
        assert size["metrics"]["requests"] == size["health"]["requests"] == 3
        assert size["checks"] and all(size["checks"].values()), size["checks"]  # the scrape counted what was seeded
    assert results["scrape_ratio_p50"] > 0 and results["health_ratio_p50"] > 0
