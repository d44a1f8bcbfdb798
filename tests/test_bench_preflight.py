"""The preflight benchmark runs end to end at a small size and reports what it measured.

Behaviour only, never timing: the figure belongs to the benchmark's own output (DESIGN.md, Testing)."""

import json
import tempfile

from bench import preflight_bench


def test_preflight_benchmark_uploads_then_preflights_through_the_api(tmp_path, monkeypatch):
    out = tmp_path / "preflight_bench.json"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # where the bench's own folders go
    assert preflight_bench.main(["--rows", "300", "--runs", "1", "--out", str(out)]) == 0
    assert [p.name for p in temporary.glob("qlora-*")] == []  # its model and dataset go with it (13 MB a run were left)
    results = json.loads(out.read_text())
    assert results["ok"] is True and results["rows"] == 300
    assert results["upload_s"] > 0 and len(results["preflight_s"]) == 1 and results["ratio_to_upload"] > 0
    assert results["tokens"] > 300
