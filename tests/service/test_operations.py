"""Operations: Prometheus metrics at /metrics, and JSON logs naming the job on every line about it."""

from __future__ import annotations

import json

from tests.deployment import upload, wait_for_status
from worker.training.tiny import demo_spec


def samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} for one metric in Prometheus' text format."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name):]] = float(value)
    return out


def test_metrics_and_json_logs(deployment, worker, team_a, demo_data):
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=10, logging_steps=5, save_steps=10)
    spec["output"] = {"merge": False}
    job = team_a.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()
    waiting = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": "metrics-queue", **spec}).json()
    assert wait_for_status(team_a, job["id"], ("succeeded", "failed"), deployment=deployment)["status"] == "succeeded"

    response = deployment.client(None).get("/metrics")  # scrapers carry no key; nothing team-specific is shown
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert samples(text, "qlora_jobs")['{status="succeeded"}'] >= 1
    assert samples(text, "qlora_jobs")['{status="queued"}'] >= 1
    assert samples(text, "qlora_queue_depth")['{queue="gpu-metrics-queue"}'] == 1
    durations = samples(text, "qlora_job_duration_seconds_count")
    buckets = samples(text, "qlora_job_duration_seconds_bucket")
    assert durations['{status="succeeded"}'] >= 1
    assert buckets['{status="succeeded",le="+Inf"}'] == durations['{status="succeeded"}']
    assert "# TYPE qlora_worker_peak_memory_bytes gauge" in text
    assert "# TYPE qlora_worker_gpu_utilization_ratio gauge" in text
    assert not samples(text, "qlora_worker_gpu_utilization_ratio")  # CPU workers have no NVML to ask
    assert job["id"] not in text and "team-a" not in text
    team_a.post(f"/jobs/{waiting['id']}/cancel")

    api_lines = [json.loads(line) for line in deployment.log("api").splitlines() if line.startswith("{")]
    about_job = [line for line in api_lines if job["id"] in line["message"]]
    assert about_job and all(line["job_id"] == job["id"] for line in about_job)

    worker_log = (deployment.home / "worker-shared.log").read_text().splitlines()
    records = [json.loads(line) for line in worker_log if line.startswith("{")]
    assert {"worker", "trainer"} <= {r["process"] for r in records}
    trainer = [r for r in records if r["process"] == "trainer" and r.get("job_id") == job["id"]]
    supervisor = [r for r in records if r["process"] == "worker" and r.get("job_id") == job["id"]]
    assert trainer and supervisor
    # Celery's own lines about the task carry the job too (its id is in the task's arguments).
    assert all(r.get("job_id") for r in records if r["process"] == "trainer")
    not_json = [line for line in worker_log if line.strip() and not line.startswith("{")]
    assert not not_json, not_json[:5]
