"""The embedded default: `qlora serve` with no configuration at all runs a real job end to end, and
schedules two teams' jobs by fair share."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import httpx
import pytest
from sqlalchemy import select

from tests import services
from tests.deployment import ROOT, upload, wait_for_status
from worker.runner import FAULT_HOLD_AT_STEP
from worker.training.tiny import demo_spec


def start_serve(home, port: int, log_name: str = "serve.log", extra_env: dict | None = None) -> subprocess.Popen:
    """`qlora serve` with nothing configured but HOME (QLORA_HOME defaults to ~/.qlora) and the port, once it answers."""
    return serve_answering(home, port, launch_serve(home, port, log_name, extra_env), log_name)


def launch_serve(home, port: int, log_name: str = "serve.log", extra_env: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_"))}
    env.update(HOME=str(home), QLORA_PORT=str(port), **(extra_env or {}))
    log = open(home / log_name, "ab")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def serve_answering(home, port: int, proc: subprocess.Popen, log_name: str = "serve.log") -> subprocess.Popen:
    credentials = home / ".qlora" / "credentials.json"
    deadline = time.monotonic() + 120
    while True:
        try:
            if credentials.exists() and httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (home / log_name).read_text()
        time.sleep(0.3)


def kill_groups(*procs: subprocess.Popen | None) -> None:
    """SIGKILL to each serve's process group (those started), should a test end before it is gone."""
    for proc in procs:
        try:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def demo_model_placed(tmp_path, tiny_model_dir) -> None:
    """The demo model a first `serve` on the test's home (tmp_path) builds, there beforehand: the suite's tiny model
    is the same build (build_tiny_model, seed 0), and the first start only does what is missing (app/bootstrap.py),
    so it registers this copy instead of importing torch and training a tokenizer again, seconds of every test's
    start. Building it is test_embedded_default_trains_a_job_with_nothing_configured's to check."""
    (tmp_path / ".qlora").mkdir(mode=0o700)  # as serve makes its home: its owner's alone
    shutil.copytree(tiny_model_dir, tmp_path / ".qlora" / "models" / "tiny-demo")


@pytest.fixture
def embedded_from_nothing(tmp_path):
    """A `serve` started on an empty home: its first start makes everything, the demo model too."""
    yield from serving(tmp_path)


@pytest.fixture
def embedded(tmp_path, demo_model_placed):
    """A `serve` whose home has the demo model already (demo_model_placed)."""
    yield from serving(tmp_path)


def serving(tmp_path):
    proc = start_serve(tmp_path, services.free_port())
    yield tmp_path, json.loads((tmp_path / ".qlora" / "credentials.json").read_text()), proc
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:  # the test stopped it
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_embedded_default_trains_a_job_with_nothing_configured(embedded_from_nothing, demo_data):
    home, credentials, _ = embedded_from_nothing
    assert (home / ".qlora" / "qlora.db").exists()  # SQLite
    assert "building the tiny demo model" in (home / "serve.log").read_text()
    client = httpx.Client(base_url=credentials["url"], headers={"Authorization": f"Bearer {credentials['api_key']}"},
                          timeout=60)
    assert [m["name"] for m in client.get("/models").json()] == ["tiny-demo"]
    dataset = upload(client, demo_data["train"]).json()
    assert dataset["status"] == "ready"
    spec = demo_spec("tiny-demo")
    spec["training"].update(max_steps=40, logging_steps=5, save_steps=20)
    job = client.post("/jobs", json={"dataset_id": dataset["id"], **spec}).json()
    done = wait_for_status(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=300)
    assert done["status"] == "succeeded", done["error"]
    curve = client.get(f"/jobs/{job['id']}/metrics").json()["train"]
    assert curve[-1]["train_loss"] < 0.6 * curve[0]["train_loss"]
    response = client.get(f"/jobs/{job['id']}/artifacts/adapter")  # local storage: streamed by the API
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = tar.getnames()
    assert "adapter/adapter_model.safetensors" in names and "adapter/adapter_config.json" in names
    # Stored where the embedded default keeps things: a local directory under QLORA_HOME.
    assert any((home / ".qlora" / "storage").rglob("*"))

    # Fair share on the embedded default too (SQLite, the local transport, the local worker): another
    # team's job starts before the third of a backlog queued ahead of it.
    from app.db import session_scope
    from app.teams.service import create_key, create_team

    with session_scope(f"sqlite:///{home / '.qlora' / 'qlora.db'}") as session:
        create_team(session, "second-team")
        second_key = create_key(session, "second-team")[1]
    second = httpx.Client(base_url=credentials["url"], headers={"Authorization": f"Bearer {second_key}"}, timeout=60)
    spec["training"].update(max_steps=2, logging_steps=1, save_steps=1000)
    # No merge and no eval report: the order the jobs start in is what is checked, and a report (two
    # models' answers and losses) costs each job far more CPU time than its two steps.
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}
    backlog = [client.post("/jobs", json={"dataset_id": dataset["id"], **spec}).json()["id"] for _ in range(4)]
    other = second.post("/jobs", json={"dataset_id": upload(second, demo_data["train"]).json()["id"], **spec}).json()
    other_done = wait_for_status(second, other["id"], ("succeeded", "failed", "cancelled"), timeout=300)
    assert other_done["status"] == "succeeded", other_done["error"]
    started = [client.get(f"/jobs/{job_id}").json()["started_at"] for job_id in backlog]
    assert len([at for at in started if at is not None and at < other_done["started_at"]]) <= 2, (started, other_done)
    for job_id in backlog:
        client.post(f"/jobs/{job_id}/cancel")


def test_sigterm_to_serve_alone_stops_its_local_worker(embedded):
    """What a supervisor's stop, `kill PID` and `docker stop` send: SIGTERM to `serve` only, not to its
    process group. uvicorn re-raises it after its own graceful shutdown; `serve` must still stop the
    worker it started, not leave it running orphaned (on the GPU, taking jobs from the queue)."""
    home, _, proc = embedded
    worker = int(re.search(r"started a local worker \(pid (\d+)\)", (home / "serve.log").read_text()).group(1))
    os.kill(worker, 0)  # running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM  # ended by the signal, as its sender expects, once the worker stopped
    with pytest.raises(ProcessLookupError):  # stopped and reaped by serve, not reparented and still running
        os.kill(worker, 0)
    with pytest.raises(ProcessLookupError):  # nothing of the service is left in its process group
        os.killpg(proc.pid, 0)


def test_sigkill_to_serve_stops_its_local_worker_which_hands_back_its_job(tmp_path, demo_data, demo_model_placed):
    """`kill -9` (or the OOM killer) gives `serve` no chance to stop its worker. That worker used to run on
    orphaned: its job trained on with no API in front of it, and the next `serve` on the same home started a
    second worker beside it, both taking jobs. Now the worker stops by itself as on SIGTERM: its job saves a
    checkpoint, is queued again, and the next `serve` resumes it from there."""
    port = services.free_port()
    # The training process holds after step 2 until the hand-back's pause releases it: on a quiet machine
    # a short job would otherwise finish before the worker notices.
    proc = start_serve(tmp_path, port, extra_env={FAULT_HOLD_AT_STEP: "2"})
    try:
        sigkill_serve_then_start_it_again(tmp_path, port, proc, demo_data)
    finally:
        kill_groups(proc)  # the first serve's group, should the test end before it is gone


def a_job_held_at_step_2(home, demo_data) -> tuple[httpx.Client, str]:
    """A job of the serve started with FAULT_HOLD_AT_STEP=2 on `home`, once it trains step 2 (held there until a
    hand-back's pause releases it); with the client that made it."""
    credentials = json.loads((home / ".qlora" / "credentials.json").read_text())
    client = httpx.Client(base_url=credentials["url"], headers={"Authorization": f"Bearer {credentials['api_key']}"},
                          timeout=60)
    spec = demo_spec("tiny-demo")
    spec["training"].update(max_steps=6, logging_steps=1, save_steps=1000)  # the hand-back saves the one it resumes from
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}
    job_id = client.post("/jobs", json={"dataset_id": upload(client, demo_data["train"]).json()["id"], **spec}).json()["id"]
    deadline = time.monotonic() + 300
    while (client.get(f"/jobs/{job_id}").json()["progress"] or {}).get("step", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    return client, job_id


def sigkill_serve_then_start_it_again(tmp_path, port: int, proc: subprocess.Popen, demo_data) -> None:
    worker = int(re.search(r"started a local worker \(pid (\d+)\)", (tmp_path / "serve.log").read_text()).group(1))
    client, job_id = a_job_held_at_step_2(tmp_path, demo_data)

    os.kill(proc.pid, signal.SIGKILL)  # serve alone: its worker is left without a parent
    proc.wait(10)
    deadline = time.monotonic() + 120
    while True:  # gone, not just orphaned (reaped by init: kill 0 fails once it has exited)
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the worker of a killed serve is still running"
        time.sleep(0.5)

    restarted = start_serve(tmp_path, port, "serve-again.log")
    try:
        done = wait_for_status(client, job_id, ("succeeded", "failed", "cancelled"), timeout=300)
        assert done["status"] == "succeeded", done["error"]
        events = client.get(f"/jobs/{job_id}/events").json()
        types = [e["type"] for e in events]
        assert {"pause_requested", "paused", "requeued"} <= set(types), types
        resumed = next(e for e in events if e["type"] == "resumed")
        assert resumed["attempt"] == 2 and resumed["step"] >= 2, resumed  # from the hand-back's checkpoint
        assert done["attempt"] == 2
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(60)


def test_a_closed_terminal_stops_serve_as_sigterm_does_and_its_job_is_handed_back(tmp_path, demo_data,
                                                                                  demo_model_placed):
    """Closing the terminal `make run` runs in signals SIGHUP to its process group. It ended `serve` on the spot,
    and its local worker's pool process, which supervised the training: the job stayed `running` until the reaper's
    deadline, then lost the attempt and the steps since its last checkpoint. Now it stops as on SIGTERM."""
    from app.db import session_scope
    from app.jobs.tables import Job, JobEvent

    proc = start_serve(tmp_path, services.free_port(), extra_env={FAULT_HOLD_AT_STEP: "2"})
    try:
        _, job_id = a_job_held_at_step_2(tmp_path, demo_data)
        os.killpg(proc.pid, signal.SIGHUP)  # what the terminal sends as it closes
        assert proc.wait(120) == -signal.SIGTERM  # stopped as on SIGTERM: the API, then the worker it stops
    finally:
        kill_groups(proc)
    with session_scope(f"sqlite:///{tmp_path / '.qlora' / 'qlora.db'}") as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.lost_workers) == ("queued", 0)  # handed back, for the next serve
        types = set(session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)))
        assert {"pause_requested", "paused", "requeued"} <= types, types


def test_ctrl_c_hands_back_the_running_job_and_starts_no_other(tmp_path, demo_data, demo_model_placed):
    """Ctrl-C to `make run` (SIGINT to its process group) while a job trains and another waits. The local
    queue's Celery loop reads messages once more after the signal, for up to 2 s: the running job, handed
    back within that, freed the worker, which took the waiting job's message and claimed a job again (attempt
    2 of the one just handed back); `serve` killed it 30 s later, and that job stayed `running`, lost, until
    the reaper's deadline. Now its message goes back to the queue for the next start. The preflight process
    printed a KeyboardInterrupt traceback on the way out."""
    from app.db import session_scope
    from app.jobs.tables import Job, JobEvent

    proc = start_serve(tmp_path, services.free_port(), extra_env={FAULT_HOLD_AT_STEP: "2"})
    try:
        client, running = a_job_held_at_step_2(tmp_path, demo_data)
        spec = demo_spec("tiny-demo")
        spec["training"].update(max_steps=2)
        waiting = client.post("/jobs", json={"dataset_id": upload(client, demo_data["train"]).json()["id"],
                                             **spec}).json()["id"]
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
        proc.wait(120)
    finally:
        kill_groups(proc)
    with session_scope(f"sqlite:///{tmp_path / '.qlora' / 'qlora.db'}") as session:
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_([running, waiting])))}
        assert (jobs[running].status, jobs[running].attempt, jobs[running].lost_workers) == ("queued", 1, 0)
        assert (jobs[waiting].status, jobs[waiting].attempt) == ("queued", 0)
        claims = session.scalars(select(JobEvent.attempt).where(JobEvent.type == "claimed")).all()
        assert claims == [1], claims  # the running job's first attempt, nothing claimed while stopping
    assert "KeyboardInterrupt" not in (tmp_path / "serve.log").read_text()


def test_a_serve_started_as_a_killed_ones_worker_hands_back_its_job_waits_for_that_worker(tmp_path, demo_data,
                                                                                           demo_model_placed):
    """`serve` killed outright leaves its worker running until it has handed its job back (a checkpoint saved, a
    merge finished). The home's lock went with `serve`: one started meanwhile ran a second worker beside the first,
    which took the next queued job, two trainings at once on one GPU. Here the first worker's attempt end is held
    (QLORA_FAULT_HOLD_END) so that it is still there, deterministically, as the second `serve` starts."""
    from app.config import Settings
    from worker.supervisor import FAULT_HOLD_END, fault_hold_end_markers

    port = services.free_port()
    first = start_serve(tmp_path, port, extra_env={FAULT_HOLD_AT_STEP: "2", FAULT_HOLD_END: "1"})
    second = None
    try:
        client, job_id = a_job_held_at_step_2(tmp_path, demo_data)
        os.kill(first.pid, signal.SIGKILL)  # serve alone: its worker hands the job back, then holds at its end
        first.wait(10)
        held, release = fault_hold_end_markers(Settings(home=tmp_path / ".qlora"), job_id)
        deadline = time.monotonic() + 120
        while not held.exists():
            assert time.monotonic() < deadline, "the first worker never reached its attempt's end"
            time.sleep(0.2)

        second = launch_serve(tmp_path, port, "serve-again.log")
        deadline = time.monotonic() + 120
        while "waiting for its local worker" not in (tmp_path / "serve-again.log").read_text():
            assert "started a local worker" not in (tmp_path / "serve-again.log").read_text(), "a second worker started"
            assert second.poll() is None and time.monotonic() < deadline, (tmp_path / "serve-again.log").read_text()
            time.sleep(0.2)
        release.touch()  # the first worker ends its attempt and stops: the second serve goes on
        serve_answering(tmp_path, port, second, "serve-again.log")
        assert client.get(f"/jobs/{job_id}").json()["status"] in ("queued", "running")
    finally:
        kill_groups(first, second)


def test_a_serve_started_after_its_whole_process_group_was_killed_resumes_the_job_at_once(tmp_path, demo_data,
                                                                                           demo_model_placed):
    """SIGKILL to `serve`'s whole process group (`kill -9 -PGID`, the out-of-memory killer, a laptop crash) takes its
    local worker too, with no hand-back: the job stayed `running` until its heartbeats were QLORA_HEARTBEAT_DEADLINE_S
    old (2 minutes by default), although the next `serve`, holding the home's lock its worker held, knows that worker
    is gone. Now that `serve` requeues the job before its API answers. The deadline is an hour here: the reaper
    cannot be what requeues it. The training process, in a session of its own, outlives the kill; the new `serve`
    waits for it (it holds the lock too and stops by itself once its worker is gone) rather than train beside it."""
    port = services.free_port()
    long_deadline = {"QLORA_HEARTBEAT_DEADLINE_S": "3600"}
    # Held after step 3, once the checkpoint of step 2 is stored; released by the kill (its worker gone).
    first = start_serve(tmp_path, port, extra_env={**long_deadline, FAULT_HOLD_AT_STEP: "3"})
    again = None
    try:
        client, job_id = a_job_held_at_step_3_past_checkpoint_2(tmp_path, demo_data, first)
        os.killpg(first.pid, signal.SIGKILL)  # serve, its local worker and its pool process, all at once
        first.wait(10)
        again = start_serve(tmp_path, port, "serve-again.log", extra_env=long_deadline)
        # Requeued by the time the new serve answers: attempt 1 was held by nobody any more.
        job = client.get(f"/jobs/{job_id}").json()
        assert (job["status"], job["attempt"]) in (("queued", 1), ("running", 2)), job
        done = wait_for_status(client, job_id, ("succeeded", "failed", "cancelled", "paused"), timeout=300)
        assert (done["status"], done["attempt"]) == ("succeeded", 2), done
        events = client.get(f"/jobs/{job_id}/events").json()
        requeued = next(e for e in events if e["type"] == "requeued")
        assert requeued["attempt"] == 1 and "without handing the job back" in requeued["message"], requeued
        resumed = next(e for e in events if e["type"] == "resumed")
        assert resumed["attempt"] == 2 and resumed["step"] == 2, resumed  # from the checkpoint of step 2
        assert not any(e["type"] == "started" and e["attempt"] == 2 and e["step"] == 0 for e in events), events
    finally:
        kill_groups(first, again)


def a_job_held_at_step_3_past_checkpoint_2(home, demo_data, serve: subprocess.Popen) -> tuple[httpx.Client, str]:
    """A 5-step job (a checkpoint every 2) of the serve started with FAULT_HOLD_AT_STEP=3 on `home`, once it is held
    after step 3 with the checkpoint of step 2 recorded; with the client that made it."""
    credentials = json.loads((home / ".qlora" / "credentials.json").read_text())
    client = httpx.Client(base_url=credentials["url"], timeout=60,
                          headers={"Authorization": f"Bearer {credentials['api_key']}"})
    spec = demo_spec("tiny-demo")
    spec["training"].update(max_steps=5, logging_steps=1, save_steps=2)
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}
    job_id = client.post("/jobs", json={"dataset_id": upload(client, demo_data["train"]).json()["id"], **spec}).json()["id"]
    deadline = time.monotonic() + 300
    # Held at step 3, and the checkpoint of step 2 recorded: the worker may report a checkpoint a round after the
    # progress that passed it (appended between its reads of the two), and a kill in that gap resumed from step 0.
    while ((client.get(f"/jobs/{job_id}").json()["progress"] or {}).get("step", 0) < 3
           or 2 not in {c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints").json()}):
        assert time.monotonic() < deadline and serve.poll() is None, (home / "serve.log").read_text()
        time.sleep(0.3)
    return client, job_id


def a_short_job_succeeds(credentials: dict, demo_data) -> None:
    """A two-step job of the demo task, created through the API, succeeds: a local worker takes jobs."""
    client = httpx.Client(base_url=credentials["url"], headers={"Authorization": f"Bearer {credentials['api_key']}"},
                          timeout=60)
    spec = demo_spec("tiny-demo")
    spec["training"].update(max_steps=2, save_steps=1000)
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}
    job_id = client.post("/jobs", json={"dataset_id": upload(client, demo_data["train"]).json()["id"], **spec}).json()["id"]
    done = wait_for_status(client, job_id, ("succeeded", "failed", "cancelled"), timeout=300)
    assert done["status"] == "succeeded", done["error"]


def test_a_local_worker_that_dies_is_started_again(embedded, demo_data):
    """Killed by hand or by the out-of-memory killer, serve's worker was gone for good: jobs waited queued
    behind an API that answered, with nothing to say why."""
    home, credentials, _proc = embedded

    def workers() -> list[int]:
        return [int(pid) for pid in re.findall(r"started a local worker \(pid (\d+)\)", (home / "serve.log").read_text())]

    [first] = workers()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(workers()) < 2:
        assert time.monotonic() < deadline, (home / "serve.log").read_text()
        time.sleep(0.3)
    assert f"the local worker (pid {first}) was killed by SIGKILL" in (home / "serve.log").read_text()
    a_short_job_succeeds(credentials, demo_data)


def test_a_local_worker_killed_alone_has_its_job_requeued_at_once_and_resumed_by_the_next(tmp_path, demo_data,
                                                                                          demo_model_placed):
    """SIGKILL to serve's local worker alone (by hand, or the out-of-memory killer choosing it) while a job trains:
    serve, its parent, saw it end and started another, but the job stayed `running` until its heartbeats were
    QLORA_HEARTBEAT_DEADLINE_S old (2 minutes by default), and only then was it requeued. Now serve requeues it
    at once, once the worker's training process is gone too, and the next worker resumes it from its checkpoint.
    The deadline is ten minutes here, longer than the test waits: the reaper cannot be what requeues it."""
    from app.config import Settings
    from worker.runner import FAULT_RELEASE

    home = tmp_path / ".qlora"
    # Held after step 3, once the checkpoint of step 2 is stored: the kill comes mid-job, past a checkpoint.
    serve = start_serve(tmp_path, services.free_port(),
                        extra_env={"QLORA_HEARTBEAT_DEADLINE_S": "600", FAULT_HOLD_AT_STEP: "3"})
    try:
        client, job_id = a_job_held_at_step_3_past_checkpoint_2(tmp_path, demo_data, serve)
        [worker] = re.findall(r"started a local worker \(pid (\d+)\)", (tmp_path / "serve.log").read_text())
        os.kill(int(worker), signal.SIGKILL)  # the worker's main process alone; serve lives on

        # The next worker resumes the job and is held again after step 3: let it go on.
        deadline = time.monotonic() + 300
        while (job := client.get(f"/jobs/{job_id}").json())["attempt"] < 2 or (job["progress"] or {}).get("step", 0) < 3:
            assert job["status"] in ("running", "queued") and job["attempt"] <= 2, job
            assert time.monotonic() < deadline, f"not resumed: {job}\n{(tmp_path / 'serve.log').read_text()}"
            time.sleep(0.3)
        # Never twice: the killed worker's training process is gone as the next trains.
        assert subprocess.run(["pgrep", "-f", f"worker.runner .*{job_id}/attempt-1"], capture_output=True).returncode == 1
        work_dir = Settings(home=home).work_dir
        assert not (work_dir / job_id / "attempt-1").exists()  # removed once nothing of it ran: not left to a sweep
        (work_dir / job_id / "attempt-2" / FAULT_RELEASE).touch()

        done = wait_for_status(client, job_id, ("succeeded", "failed", "cancelled", "paused"), timeout=300)
        assert (done["status"], done["attempt"]) == ("succeeded", 2), done
        events = client.get(f"/jobs/{job_id}/events").json()
        requeued = [e for e in events if e["type"] == "requeued"]
        assert len(requeued) == 1 and requeued[0]["attempt"] == 1, requeued
        said = requeued[0]["message"]
        assert f"(pid {worker}) was killed by SIGKILL at step 3 without handing the job back" in said, said
        assert "requeued for try 2" in said, said
        resumed = next(e for e in events if e["type"] == "resumed")
        assert resumed["attempt"] == 2 and resumed["step"] == 2, resumed  # from the checkpoint of step 2
        assert not any(e["type"] == "started" and e["attempt"] == 2 and e["step"] == 0 for e in events), events
        assert serve.poll() is None  # serve ran on throughout, with its next worker
        assert len(re.findall(r"started a local worker", (tmp_path / "serve.log").read_text())) == 2
    finally:
        kill_groups(serve)


def test_serve_on_a_taken_port_says_so_before_it_makes_anything(tmp_path):
    """It used to make the first start's team and key, save them with the address of the server already
    there, start a worker, and only then fail in uvicorn: the saved key then answered 401 there."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_"))}
        env.update(HOME=str(tmp_path), QLORA_PORT=str(port))
        done = subprocess.run([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "QLORA_PORT" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".qlora").exists()  # no key, no database, no worker


def test_an_unreadable_local_message_is_skipped_and_a_worker_celery_ends_on_an_error_is_started_again(
        embedded, demo_data):
    """A message file of the local queue that is empty or cut short (a full disk as the API sent it, a crash
    before the file reached the disk) crashed the worker's consumer: Celery logged `Unrecoverable error` and
    ended the worker, whose exit status `qlora worker` dropped (0), so serve took it for a clean stop and
    started none again; every job after it waited queued for ever behind an API that answered. Now such a
    file is skipped (app/local_queue.py), and a worker Celery ends on an error all the same (here: a file
    that is JSON but no message) exits 1 and is started again."""
    home, credentials, _proc = embedded

    def workers() -> list[int]:
        return [int(pid) for pid in re.findall(r"started a local worker \(pid (\d+)\)", (home / "serve.log").read_text())]

    def wait_for(pattern: str, times: int = 1) -> None:
        deadline = time.monotonic() + 60
        while len(re.findall(pattern, (home / "serve.log").read_text())) < times:
            assert time.monotonic() < deadline, (home / "serve.log").read_text()
            time.sleep(0.3)

    [first] = workers()
    wait_for(r'"celery.apps.worker", "message": "[^"]*ready\.')  # taking messages: its queue exists
    queue = home / ".qlora" / "broker" / "queue"
    name = f"{'0' * 8}-0000-0000-0000-{'0' * 12}.gpu-default.msg"
    (queue / f"0000001_{name}").write_bytes(b"")  # left by a failed send
    (queue / f"0000002_{name}").write_bytes(b'{"body": "eyJ')  # cut short by a crash
    wait_for(r"skipped a message of queue gpu-default that could not be read", times=2)
    assert workers() == [first] and "Unrecoverable error" not in (home / "serve.log").read_text()
    (queue / f"0000003_{name}").write_bytes(b"[]")  # JSON, but no message: the consumer ends on it
    deadline = time.monotonic() + 60
    while len(workers()) < 2:
        assert time.monotonic() < deadline, (home / "serve.log").read_text()
        time.sleep(0.3)
    log = (home / "serve.log").read_text()
    assert "Unrecoverable error" in log and f"the local worker (pid {first}) exited with code 1" in log
    a_short_job_succeeds(credentials, demo_data)


def test_a_second_serve_on_the_same_home_is_refused_naming_the_first(embedded):
    """Two `serve` on one QLORA_HOME started two local workers, which trained two jobs at once on one machine.
    The second now exits 2 naming the first; the first goes on serving, and once it is gone (here: killed
    outright, which leaves no lock behind) another starts."""
    home, credentials, proc = embedded
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_"))}
    env.update(HOME=str(home), QLORA_PORT=str(services.free_port()))
    second = subprocess.run([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"another qlora serve (pid {proc.pid}) runs on QLORA_HOME={home / '.qlora'}" in second.stderr
    assert "Traceback" not in second.stderr
    assert httpx.get(f"{credentials['url']}/health", timeout=10).status_code == 200  # the first goes on
    proc.kill()
    proc.wait(30)
    again = start_serve(home, services.free_port(), "serve-again.log")  # answers: it started
    os.killpg(again.pid, signal.SIGTERM)
    again.wait(60)
