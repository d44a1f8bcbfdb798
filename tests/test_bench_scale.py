"""The at-scale benchmark runs end to end at a tiny size: it seeds, copies the database for the baseline,
migrates each copy to its side's schema, and every route answers 200 on both sides.

Behaviour only, never timing: the ratios belong to the benchmark's own output (DESIGN.md, Testing).
"""

import json

from sqlalchemy import text

from app.db import engine_for
from bench import scale_bench, scale_seed
from tests import services


def test_scale_benchmark_asks_every_route_of_both_sides(tmp_path):
    services.ensure_postgres()
    url = services.create_postgres_database()
    out = tmp_path / "scale_bench.json"
    try:
        exit_code = scale_bench.main(["--database-url", url, "--scale", "0.002", "--baseline", "HEAD",
                                      "--requests", "1", "--rounds", "1", "--out", str(out)])
        with engine_for(url).connect() as conn:
            counts = dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
            long_curve = conn.execute(text("SELECT status, step FROM jobs WHERE id = :j"), {
                "j": scale_seed.job_id(scale_seed.big_job_numbers(200)[-1])}).one()
    finally:
        engine_for(url).dispose()
        services.drop_postgres_database(url)
    assert exit_code == 0
    results = json.loads(out.read_text())
    assert results["ok"] is True and results["failed"] == []
    labels = [row["label"] for row in results["rows"]]
    assert len(labels) == len(set(labels)) >= 40  # the writes and every route, each once
    assert all(row["before"]["ms"] > 0 and row["after"]["ms"] > 0 for row in results["rows"])
    assert sum(counts.values()) == 200 and counts["queued"] > 0 and counts["running"] > 0
    assert tuple(long_curve) == ("running", 900)  # the last long curve runs, 90% logged
