"""The API load benchmark runs end to end at a tiny size and reports what it measured.

Behaviour only, never timing: speed belongs to the benchmark's own output (DESIGN.md, Testing).
"""

import json

import pytest

from bench import api_load


@pytest.mark.parametrize("client", ["httpx", "raw"])
def test_api_load_benchmark_reports_load_and_a_streamed_upload(tmp_path, client):
    out = tmp_path / "api_load.json"

    exit_code = api_load.main(["--clients", "4", "--seconds", "1", "--jobs", "20", "--upload-mib", "8",
                               "--client", client, "--out", str(out)])

    assert exit_code == 0
    results = json.loads(out.read_text())
    assert {"config", "machine", "endpoints", "jobs_mix", "upload", "ok"} <= results.keys()
    assert results["ok"] is True
    endpoints = results["endpoints"]
    polled = {name + api_load.CONDITIONAL for name in ("GET /jobs/{id}", "GET /jobs?limit=50")}
    openai = {api_load.RETRIEVE, api_load.OPENAI_LISTING}
    assert set(endpoints) == {"GET /health", api_load.HEALTH_FRESH, "GET /jobs/{id}", "GET /jobs?limit=50"} | polled | openai
    for name, stats in endpoints.items():
        assert {"requests", "req_per_s", "p50_ms", "p90_ms", "p99_ms", "errors", "ratio_to_health"} <= stats.keys()
        assert stats["requests"] > 0, name
        assert stats["errors"] == 0, f"{name}: {stats['first_error']}"
    status = endpoints["GET /jobs/{id}"]
    assert isinstance(status["p50_ms"], float) and status["p50_ms"] > 0
    # Plain polls never get a 304; pollers that send back their ETag do, for the jobs that did not move.
    assert status["not_modified_share"] == 0 and results["jobs_mix"]["not_modified_share"] == 0
    assert endpoints["GET /jobs/{id}" + api_load.CONDITIONAL]["not_modified_share"] > 0
    assert 0 < results["conditional_mix"]["not_modified_share"] < 1
    # The API's own CPU per request, read from /proc for each phase, and the client's.
    assert results["config"]["client"] == client
    for phase in (endpoints["GET /health"], endpoints[api_load.HEALTH_FRESH], results["jobs_mix"],
                  results["conditional_mix"], results["openai_mix"]):
        assert phase["api_cpu_ms_per_request"] > 0 and phase["client_cpu_ms_per_request"] > 0

    upload = results["upload"]
    assert upload["dataset"]["status"] == "ready"
    assert upload["dataset"]["rows"] == upload["rows"] > 0
    assert upload["dataset"]["bytes"] == upload["bytes"] <= 8 * 2**20
    assert all(upload["checks"].values()), upload["checks"]
    # The memory readings are real numbers from /proc (their size is the benchmark's to report).
    assert upload["api_rss_before_bytes"] > 0
    assert upload["api_rss_peak_bytes"] >= upload["api_rss_after_bytes"] > 0
    assert isinstance(upload["delta_fraction_of_upload"], float)
