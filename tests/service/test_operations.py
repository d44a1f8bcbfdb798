"""Operations: Prometheus metrics at /metrics, JSON logs naming the job on every line about it, and /health."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

from sqlalchemy import text

from app.config import Settings
from app.db import engine_for, session_scope
from app.operations.service import FinishedJobs, prometheus_text
from app.routing import JSON_REQUESTS_PER_KEY
from app.shares import TeamShares
from bench.metrics_bench import checks, samples, seed_jobs
from tests import services
from tests.deployment import lane, upload, wait_for_status
from tests.service.test_quota_cli import qlora
from worker.training.tiny import demo_spec

METRICS_CLASS = lane("metrics-queue")  # no worker serves it until a test starts one


def test_metrics_and_json_logs(deployment, worker, team_a, demo_data):
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=10, logging_steps=5, save_steps=10)
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}  # no eval report: nothing here reads one
    job = team_a.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()
    waiting = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": METRICS_CLASS, **spec}).json()
    assert wait_for_status(team_a, job["id"], ("succeeded", "failed"), deployment=deployment)["status"] == "succeeded"

    response = deployment.client(None).get("/metrics")  # scrapers carry no key; nothing team-specific is shown
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert samples(text, "qlora_jobs")['{status="succeeded"}'] >= 1
    assert samples(text, "qlora_jobs")['{status="queued"}'] >= 1
    assert samples(text, "qlora_queue_depth")[f'{{queue="gpu-{METRICS_CLASS}"}}'] == 1
    served = {f'{{queue="{deployment.settings.queue_for(c)}"}}' for c in deployment.settings.served_gpu_classes}
    assert served <= samples(text, "qlora_queue_depth").keys()  # an empty queue is 0, not missing
    alive = samples(text, "qlora_workers_alive")
    assert alive[f'{{queue="{deployment.settings.queue_for()}"}}'] >= 1  # the shared worker, idle by now
    assert alive[f'{{queue="gpu-{METRICS_CLASS}"}}'] == 0
    assert samples(text, "qlora_queue_oldest_wait_seconds")[f'{{queue="gpu-{METRICS_CLASS}"}}'] > 0
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


# Rows PostgreSQL has read so far in this transaction from the jobs' tables: rows by sequential scans,
# entries by index scans, over the tables and each of their indexes (its per-transaction statistics).
ROWS_READ = text("SELECT sum(pg_stat_get_xact_tuples_returned(oid)) FROM pg_class WHERE oid IN ("
                 "SELECT 'jobs'::regclass UNION SELECT 'job_metrics'::regclass UNION SELECT indexrelid "
                 "FROM pg_index WHERE indrelid IN ('jobs'::regclass, 'job_metrics'::regclass))")


def scrape(database_url: str) -> tuple[str, int]:
    """A scrape by a newly started API process after its first one: the text, and the rows it read."""
    finished_jobs = FinishedJobs()
    settings = Settings(database_url=database_url)
    with session_scope(database_url) as session:
        prometheus_text(session, finished_jobs, settings)  # a new process reads the finished jobs once
    with session_scope(database_url) as session:
        before = session.scalar(ROWS_READ)
        body = prometheus_text(session, finished_jobs, settings)
        return body, session.scalar(ROWS_READ) - before


def test_a_scrape_reads_no_more_rows_with_2000_finished_jobs_than_with_10():
    """What /metrics costs the database, counted in rows read rather than timed (bench/metrics_bench.py
    times it at 100,000): the same active jobs, 10 finished jobs and then 2,000, each with its loss curve."""
    services.ensure_postgres()
    database_url = services.create_migrated_postgres_database()
    try:
        made = seed_jobs(database_url, finished=10, points=5)
        body, rows_small = scrape(database_url)
        assert all(checks(body, made).values()), checks(body, made)
        made += seed_jobs(database_url, finished=1_990, points=5, queued=0, running=0, seed=1)
        body, rows_large = scrape(database_url)
        assert all(checks(body, made).values()), checks(body, made)
        assert rows_large <= rows_small, f"a scrape read {rows_large} rows with 2,000 finished jobs, {rows_small} with 10"
    finally:
        engine_for(database_url).dispose()
        services.drop_postgres_database(database_url)


def test_a_team_held_at_its_share_shows_as_requests_in_progress_and_waiting(deployment):
    """An operator sees on /metrics that a team is being queued by its share of the API process's requests in
    progress (app/shares.py): its requests in progress, those waiting, and that one team waits, naming none.
    The team's requests are held in progress by their bodies, which never come: each is counted in its
    team's share before its route reads its body."""
    share = TeamShares(deployment.settings.request_slots).share(teams=1)
    waiting = 2
    keys = [deployment.team_key("metrics-shares", admin=True) for _ in range(-(-(share + waiting) // JSON_REQUESTS_PER_KEY))]
    host, port = urlsplit(deployment.url).hostname, urlsplit(deployment.url).port
    held = []

    def totals() -> dict[str, float]:
        text = deployment.client(None).get("/metrics").text
        assert "metrics-shares" not in text
        return {name: sum(samples(text, name).values()) for name in (
            "qlora_api_requests_in_progress", "qlora_api_requests_waiting", "qlora_api_teams_waiting", "qlora_api_team_most_waiting")}

    try:
        for i in range(share + waiting):  # POST /models, an admin's JSON route, its body promised and never sent
            conn = socket.create_connection((host, port), timeout=10)
            conn.sendall(f"POST /models HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {keys[i % len(keys)]}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
            held.append(conn)
        # The GET /metrics that reads them is in progress too, in the share of the requests without a key (KEYLESS).
        expected = {"qlora_api_requests_in_progress": share + 1, "qlora_api_requests_waiting": waiting,
                    "qlora_api_teams_waiting": 1, "qlora_api_team_most_waiting": waiting}
        deadline = time.monotonic() + 30
        while (seen := totals()) != expected:  # the requests reach the API process
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
    finally:
        for conn in held:
            conn.close()  # their clients leave: the requests end, and those waiting after them
    deadline = time.monotonic() + 30
    while (seen := totals())["qlora_api_requests_in_progress"] > 1 or seen["qlora_api_requests_waiting"]:  # > 1: itself
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)


def test_health_answers_a_head_probe_as_a_get(deployment):
    """Load balancers probe with HEAD as often as with GET: it answered 405."""
    with deployment.client(None) as client:
        assert client.head("/health").status_code == 200
        assert client.get("/health").json() == {"status": "ok"}


def test_a_queue_with_jobs_waiting_and_no_worker_alive_is_named(deployment, team_a, demo_data):
    """/health answers for the API alone (a load balancer must not drain it because the GPUs are gone);
    /metrics and `qlora admin status` say which queue has jobs waiting and no worker, and a worker counts
    from its start, idle, until it stops."""
    queue = f"gpu-{METRICS_CLASS}"

    def scrape_queue() -> tuple[float, float]:
        text = deployment.client(None).get("/metrics").text
        label = f'{{queue="{queue}"}}'
        return samples(text, "qlora_workers_alive")[label], samples(text, "qlora_queue_depth")[label]

    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": METRICS_CLASS, **demo_spec("tiny")}).json()
    try:
        assert deployment.client(None).get("/health").json() == {"status": "ok"}
        assert scrape_queue() == (0, 1)
        status = qlora(deployment.env, "admin", "status")
        assert status.returncode == 0, status.stderr
        shown = {q["queue"]: q for q in json.loads(status.stdout)["queues"]}[queue]
        assert (shown["workers_alive"], shown["queued"], shown["stranded"]) == (0, 1, True)
        assert f"no worker alive for queue {queue} while 1 job waits" in status.stderr
        assert f"qlora worker --gpu-class {METRICS_CLASS}" in status.stderr
    finally:
        team_a.post(f"/jobs/{job['id']}/cancel")  # before a worker of the class starts: it would train it

    proc = deployment.start_worker(METRICS_CLASS, name="metrics-worker")
    try:
        deadline = time.monotonic() + 60
        while scrape_queue()[0] != 1:
            assert time.monotonic() < deadline, deployment.log("worker-metrics-worker")
            time.sleep(0.5)
        status = qlora(deployment.env, "admin", "status")
        shown = {q["queue"]: q for q in json.loads(status.stdout)["queues"]}[queue]
        assert shown["last_seen"]["worker"] == "metrics-worker" and not shown["stranded"]
        assert queue not in status.stderr
    finally:
        deployment.stop(proc)
    assert proc.returncode == 0
    assert scrape_queue() == (0, 0)  # a worker that stopped cleanly stops counting at once
    shown = {q["queue"]: q for q in json.loads(qlora(deployment.env, "admin", "status").stdout)["queues"]}[queue]
    assert shown["last_seen"] is None
