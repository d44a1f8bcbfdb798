"""The worker's database work through a short outage, wherever it meets one: as it claims (a commit that landed
unheard), as it prepares an attempt, as it hands an attempt back or retries one that ran out of memory, and against a
database that drops packets instead of refusing connections. The worker's database traffic goes through a TCP link
the test cuts (tests/faults/tcp_link.py); the API and the reaper keep their own way to the database."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import boto3
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from app.db import engine_for, session_scope
from app.jobs.tables import Checkpoint, Job, QuantizedBase
from tests.deployment import BUCKET, wait_for_status, wait_until
from tests.faults.conftest import attempt_dir, curve_steps, events, job_body, lane, trainer_pids
from tests.faults.tcp_link import CuttableLink
from tests.faults.throttle import ThrottlingProxy
from worker.runner import FAULT_HOLD_AT_STEP, FAULT_OUT_OF_MEMORY, FAULT_RELEASE
from worker.supervisor import FAULT_HOLD_END, JobRun, fault_hold_end_markers, session_url

FINISHED = ("succeeded", "failed", "cancelled")
# The worker's words when one of its writes meets the outage (supervisor._write_through_outage): the link comes
# back once they are in its log, a Postgres restart as short as can be that the write still meets.
MET_THE_OUTAGE = "could not record "


@pytest.fixture
def link(faulty):
    url = make_url(faulty.settings.database_url)
    cuttable = CuttableLink((url.host or "127.0.0.1", url.port or 5432))
    yield cuttable
    cuttable.close()


def _through(faulty, link: CuttableLink) -> str:
    url = make_url(faulty.settings.database_url)
    return url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)


def _outage(link: CuttableLink, log: Path, began: list[bool]) -> None:
    """Cut the link until the worker logging to `log` says a write of its met the outage. (A 1.5 s timer could end
    it before the write came, on a loaded machine, and the test then failed for want of an outage.)"""
    link.cut()
    began.append(True)
    link.restore_when(lambda: MET_THE_OUTAGE in log.read_text(errors="replace"))


def test_a_claim_whose_commit_landed_unheard_runs_the_job_it_took(faulty, tenant, dataset_id, link, fault_report):
    """The claim's COMMIT reached the database and its answer was lost with the connection: the worker claimed
    again, took a second job, and the first stayed running, claimed by a worker that never ran it, until the
    reaper's deadline. Now the claim tried again finds the job its token took, and runs that one."""
    gpu_class = lane(faulty, "claim-landed")
    first, second = (tenant.post("/jobs", json=job_body(dataset_id, max_steps=4, gpu_class=gpu_class)).json()
                     for _ in range(2))
    run = JobRun(faulty.settings.model_copy(update={"database_url": _through(faulty, link)}), first["id"], "landed")
    link.cut_at_answer(b"COMMIT\x00")  # the claim's commit: the first this link carries

    def restore_once_refused() -> None:  # the retry meets the outage at least once, then the database is back
        wait_until(lambda: link.refused, 60, "a try of the claim to meet the outage")
        link.restore()

    restorer = threading.Thread(target=restore_once_refused, daemon=True)
    restorer.start()
    try:
        claimed = run._claim()
        restorer.join(60)
        assert link.refused, "the claim's commit never met the cut"
        assert claimed is not None and claimed.id == first["id"] and claimed.attempt == 1
        with session_scope(faulty.settings.database_url) as session:
            rows = {row.id: row for row in session.scalars(select(Job).where(Job.id.in_([first["id"], second["id"]])))}
        assert rows[second["id"]].status == "queued" and rows[second["id"]].attempt == 0  # never claimed
        assert rows[first["id"]].attempt == 1 and rows[first["id"]].worker == "landed"
        assert [e["type"] for e in events(tenant, first["id"])].count("claimed") == 1
        fault_report.append({"fault": "the database dropped the connection as a claim's commit landed",
                             "injected": 1, "survived": 1, "steps_lost": 0})
    finally:
        for job in (first, second):
            tenant.post(f"/jobs/{job['id']}/cancel")


def test_a_database_outage_as_an_attempt_prepares_costs_no_attempt(faulty, tenant, dataset_id, link, fault_report):
    """Postgres restarted as the worker fetched the job's data: the lookup of the cached quantized base that
    follows failed, and the attempt was handed back as lost (the job trained on attempt 2, after the worker's wait
    for the outage). Now the worker rides the outage out, and the job succeeds on its first attempt."""
    s3 = ThrottlingProxy(faulty.settings.s3_endpoint_url)
    began: list[bool] = []
    log = faulty.home / "worker-prepare-outage.log"
    s3.trip("GET", "/datasets/", lambda: _outage(link, log, began))  # the data is on its way: the lookups come next
    worker = faulty.start_worker(name="prepare-outage", extra_env={"QLORA_DATABASE_URL": _through(faulty, link),
                                                                   "QLORA_S3_ENDPOINT_URL": s3.url})
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=2, save_steps=2)).json()
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        story = events(tenant, job["id"])
        assert began, "the outage never began: no dataset was fetched"
        assert done["status"] == "succeeded" and done["attempt"] == 1, [(e["type"], e["message"]) for e in story]
        assert "requeued" not in [e["type"] for e in story]
        worker_log = (faulty.home / "worker-prepare-outage.log").read_text(errors="replace")
        assert link.refused and "the cached quantized base" in worker_log and "out of reach" in worker_log
        fault_report.append({"fault": "the database out of reach as an attempt prepares", "injected": 1,
                             "survived": 1, "steps_lost": 0})
    finally:
        link.restore()
        faulty.stop(worker)
        s3.close()


@pytest.mark.parametrize("ending", ["killed", "out_of_memory"])
def test_a_database_outage_as_an_attempt_is_handed_back_is_ridden_out(faulty, tenant, dataset_id, link, ending,
                                                                      fault_report):
    """The attempt ended with no fault of the job's (its training process killed), or ran out of memory, and
    Postgres restarted just as the worker wrote so: the write was not tried again, the job stayed running and
    silent until the reaper's deadline, and the reaper queued it as for a lost worker (after out of memory, with
    the micro-batch that did not fit). Now the worker rides the outage out and writes the end itself."""
    env = {"QLORA_DATABASE_URL": _through(faulty, link), FAULT_HOLD_END: "1"}
    env |= {FAULT_HOLD_AT_STEP: "3"} if ending == "killed" else {FAULT_OUT_OF_MEMORY: "2:4"}
    worker = faulty.start_worker(name=f"end-outage-{ending}", extra_env=env)
    body = job_body(dataset_id, max_steps=6, save_steps=2)
    body["training"]["gradient_accumulation_steps"] = 1
    job = tenant.post("/jobs", json=body).json()
    held, release = fault_hold_end_markers(faulty.settings, job["id"])
    try:
        if ending == "killed":
            wait_until(lambda: max(curve_steps(tenant, job["id"]), default=0) >= 2, 180, "attempt 1 held at step 3")
            for pid in trainer_pids(job["id"], attempt=1):
                os.killpg(pid, signal.SIGKILL)
        wait_until(held.exists, 180, "attempt 1 ended, its worker held before writing so")
        _outage(link, faulty.home / f"worker-end-outage-{ending}.log", [])
        release.touch()
        requeued = wait_until(lambda: [e for e in events(tenant, job["id"]) if e["type"] == "requeued"], 60,
                              "the job queued again")
        said = requeued[0]["message"]
        assert "stopped sending heartbeats" not in said, said  # the reaper's words: the worker gave up
        expected = "the training process was killed by SIGKILL" if ending == "killed" else "micro-batch 4"
        assert expected in said, said
        worker_log = (faulty.home / f"worker-end-outage-{ending}.log").read_text(errors="replace")
        assert link.refused and "the database is out of reach" in worker_log
        fault_report.append({"fault": f"the database out of reach as a worker hands back an attempt ({ending})",
                             "injected": 1, "survived": 1, "steps_lost": 0})
    finally:
        release.touch()
        faulty.stop(worker)
        release.unlink(missing_ok=True)
        link.restore()
        tenant.post(f"/jobs/{job['id']}/cancel")


def test_a_run_that_finished_cut_off_from_the_database_leaves_nothing_in_storage(faulty, tenant, dataset_id, link,
                                                                                  fault_report):
    """A worker cut off from the database (not from storage) past the deadline: the reaper gives its job another
    attempt, and its training process, which the worker keeps alive, trains to the end and stores its checkpoints
    and the base it quantized for the cache. Once the worker reaches the database again, its lease is lost and what
    was never recorded is deleted: the checkpoints were, the quantized base (35 GB for a 65B model) was left, a
    stray under shared/ that no row names."""
    gpu_class = lane(faulty, "cut-off")  # a class of its own: its quantized base is not cached yet
    s3 = boto3.client("s3", endpoint_url=faulty.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = faulty.settings.storage_url.split("/", 3)[3]

    def unrecorded() -> set[str]:
        with session_scope(faulty.settings.database_url) as session:
            recorded = set(session.scalars(select(QuantizedBase.storage_key)))
            recorded |= set(session.scalars(select(Checkpoint.storage_key)))
            team_id = session.get(Job, job["id"]).team_id
        listed = set()
        for shelf in ("shared/quantized-bases/", f"{team_id}/checkpoints/"):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/{shelf}"):
                listed |= {o["Key"].removeprefix(f"{prefix}/") for o in page.get("Contents", [])}
        return listed - recorded

    worker = faulty.start_worker(gpu_class=gpu_class, name="cut-off", extra_env={
        "QLORA_DATABASE_URL": _through(faulty, link), FAULT_HOLD_AT_STEP: "3"})
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=4, save_steps=2, gpu_class=gpu_class)).json()
    try:
        wait_until(lambda: [c for c in tenant.get(f"/jobs/{job['id']}/checkpoints").json() if c["step"] == 2], 180,
                   "attempt 1 held after step 3, its checkpoint 2 recorded")
        strays_before = unrecorded()  # another test's, if any
        link.cut()
        wait_until(lambda: tenant.get(f"/jobs/{job['id']}").json()["status"] == "queued", 60,
                   "the reaper to queue the silent worker's job again")
        (attempt_dir(faulty, job["id"]) / FAULT_RELEASE).touch()
        wait_until(lambda: not trainer_pids(job["id"], attempt=1), 180, "attempt 1's run to end, cut off")
        link.restore()
        log = faulty.home / "worker-cut-off.log"
        wait_until(lambda: "lease lost; stopping without writing" in log.read_text(errors="replace"), 60,
                   "the worker to learn it lost the job")
        assert unrecorded() - strays_before == set()
        fault_report.append({"fault": "a worker cut off from the database while its run finished", "injected": 1,
                             "survived": 1, "steps_lost": 0})
    finally:
        link.restore()
        tenant.post(f"/jobs/{job['id']}/cancel")
        faulty.stop(worker)


def test_a_write_through_a_database_that_drops_packets_gives_the_try_up_and_lands(faulty, link):
    """A failover that drops packets instead of refusing connections (an address moved, a partition): with no
    connect timeout a worker's try waited for an answer that never came, far past the heartbeat deadline, and the
    ride-out never got to try again. Now a try unanswered for QLORA_WORKER_DATABASE_TIMEOUT_S (here its default, a
    quarter of the 5 s deadline, so libpq's least: 2 s) is given up, and the next one lands once the database is
    back."""
    run = JobRun(faulty.settings.model_copy(update={"database_url": _through(faulty, link)}), "none", "black-hole")
    link.black_hole()
    answered: list[int] = []
    writer = threading.Thread(target=lambda: answered.append(
        run._write_through_outage("a probe", lambda session: session.execute(text("select 1")).scalar_one())),
        daemon=True)
    writer.start()
    wait_until(lambda: link.swallowed, 60, "the first try to reach the hole")
    link.restore()  # the database is back, but the first try's connection stays silent: only a new one can answer
    writer.join(60)
    assert answered == [1] and link.swallowed == 1


def test_a_worker_connection_says_when_it_is_dead(faulty):
    """What bounds a try whose connection goes silent after it was made (sent data unacknowledged, an answer that
    never comes): TCP keepalives and tcp_user_timeout on the socket of every connection a worker makes. A loopback
    proxy cannot drop packets (its kernel acknowledges them), so the socket is read back instead."""
    timeout_s = faulty.settings.database_timeout_s
    with engine_for(session_url(faulty.settings)).connect() as connection:
        pgconn = connection.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
        sock = socket.socket(fileno=os.dup(pgconn.socket))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == timeout_s * 1000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == max(1, timeout_s // 3)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    finally:
        sock.close()
