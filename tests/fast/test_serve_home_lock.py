"""Two `qlora serve`s started on one QLORA_HOME while a killed serve's local worker still holds its lock: both wait
for that worker, then one runs and the other is refused (exit 2) as any second serve is. Before, both blocked on
the lock; the one that did not get it waited on for as long as the other ran, then started unannounced."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.deployment import wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVE = """
import sys
import typer
from app.cli.processes import _hold_home
from app.config import get_settings
try:
    _hold_home(get_settings())  # of QLORA_HOME
except typer.Exit as refused:  # what `qlora serve` exits with
    sys.exit(refused.exit_code)
print("took", flush=True)
sys.stdin.read()
"""


def _a_dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _serve(home: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SERVE], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "QLORA_HOME": str(home), **env})


def test_of_two_serves_waiting_for_a_killed_ones_worker_one_runs_and_the_other_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    worker_lock = open(home / "serve.lock", "a+")  # the killed serve's worker, which inherited its lock
    fcntl.flock(worker_lock, fcntl.LOCK_EX)
    worker_lock.write(f"pid {_a_dead_pid()}")
    worker_lock.flush()
    serves = [_serve(home) for _ in range(2)]
    try:
        for serve in serves:
            assert serve.stderr is not None
            assert "was stopped outright" in serve.stderr.readline()
        worker_lock.close()  # the worker handed its job back and stopped
        wait_until(lambda: any(serve.poll() is not None for serve in serves), timeout=30,
                   what="one of the two serves to be refused")
        (refused,) = [serve for serve in serves if serve.poll() is not None]
        (runs,) = [serve for serve in serves if serve is not refused]
        assert refused.returncode == 2
        assert refused.stderr is not None and "another qlora serve" in refused.stderr.read()
        assert runs.stdout is not None and runs.stdout.readline() == "took\n"
    finally:
        for serve in serves:
            serve.kill()
            serve.wait()


def test_a_serve_that_takes_the_home_requeues_only_what_the_dead_local_workers_claims_hold(settings, session, make_job):
    """The next `serve` on a home whose last one was killed with its local worker requeues, at once, the job that
    worker's claim took (the home's lock, now this serve's, proves that worker gone), with an event saying why, and
    sends it to its queue. Nothing else: not a job of a worker started by hand on the home (its marker holds no
    lock: it may be running), nor one claimed by another worker, nor one the dead worker's claim took that has moved
    on to a later attempt since."""
    import json

    from app.broker import RUN_JOB_TASK
    from app.cli.processes import _requeue_what_the_last_serve_held
    from app.jobs import states
    from app.jobs.tables import Job, JobEvent
    from tests.fast.conftest import received
    from worker.supervisor import held_marker

    def running(token: str, attempt: int = 1) -> str:
        return make_job(states.RUNNING, attempt=attempt, worker="laptop:cpu", claim_token=token, step=40)

    dead, by_hand, other, moved_on = running("a" * 32), running("b" * 32), running("c" * 32), running("e" * 32, 2)
    settings.work_dir.mkdir(parents=True)
    markers = {n: held_marker(settings) for n in (101, 102, 103)}  # three workers' (this process holds their locks)
    markers[101].write_text(json.dumps({"claim_token": "a" * 32, "home_lock": True, "job_id": dead, "attempt": 1}))
    markers[102].write_text(json.dumps({"claim_token": "b" * 32, "home_lock": False, "job_id": by_hand, "attempt": 1}))
    markers[103].write_text(json.dumps({"claim_token": "d" * 32, "home_lock": True}))  # attempt 1 of moved_on's

    _requeue_what_the_last_serve_held(settings)

    statuses = {job_id: session.get(Job, job_id).status for job_id in (dead, by_hand, other, moved_on)}
    assert statuses == {dead: "queued", by_hand: "running", other: "running", moved_on: "running"}
    assert session.get(Job, dead).lost_workers == 1  # a lost attempt, as the reaper counts a silent worker's
    event = session.query(JobEvent).filter_by(job_id=dead, type="requeued").one()
    assert "stopped outright at step 40" in event.message and "without handing the job back" in event.message
    assert received(settings, "gpu-default") == [(RUN_JOB_TASK, [dead])]  # sent: no wait for the dead serve's lease
    assert not markers[101].exists() and not markers[103].exists() and markers[102].exists()


def test_a_job_being_handed_back_as_its_serve_was_killed_is_queued_sent_and_said_so(settings, session, make_job, capsys):
    """A job pausing to make way (preempted, or handed back by a worker stopping on Ctrl-C) when the whole process
    group was SIGKILLed: the next `serve` ends the attempt as paused, which queues it again at once. Before, that was
    reported as "paused": nothing was sent (it waited for the dead serve's scheduler lease) and serve said "paused"."""
    import json

    from app.broker import RUN_JOB_TASK
    from app.cli.processes import _requeue_what_the_last_serve_held
    from app.jobs import states
    from app.jobs.tables import Job
    from tests.fast.conftest import received
    from worker.supervisor import held_marker

    handed = make_job(states.PAUSING, attempt=1, worker="laptop:cpu", claim_token="f" * 32, preempting=True, step=7)
    settings.work_dir.mkdir(parents=True)
    held_marker(settings).write_text(json.dumps({"claim_token": "f" * 32, "home_lock": True}))

    _requeue_what_the_last_serve_held(settings)

    assert session.get(Job, handed).status == states.QUEUED
    assert received(settings, "gpu-default") == [(RUN_JOB_TASK, [handed])]
    assert capsys.readouterr().out.split()[-1] == "requeued"


def test_a_requeued_job_whose_message_the_broker_refuses_is_said_to_be_queued_unsent(settings, session, make_job, capsys):
    """The broker out of reach as the next `serve` requeues the dead worker's job: the job is queued (committed), only
    its message is not sent. `serve` says so, and that the scheduler sends it; before, it said plainly "requeued"."""
    import json

    from app.cli.processes import _requeue_what_the_last_serve_held
    from app.jobs import states
    from app.jobs.tables import Job
    from worker.supervisor import held_marker

    left = make_job(states.RUNNING, attempt=1, worker="laptop:cpu", claim_token="9" * 32, step=3)
    settings.work_dir.mkdir(parents=True)
    held_marker(settings).write_text(json.dumps({"claim_token": "9" * 32, "home_lock": True}))

    _requeue_what_the_last_serve_held(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))

    assert session.get(Job, left).status == states.QUEUED
    said = " ".join(capsys.readouterr().out.split())
    assert "requeued, but its message could not be sent to its queue" in said and "the scheduler sends it" in said


# A training process orphaned by the SIGKILL of its serve's process group, stuck where it does not look for its worker
# (a model's load, a merge, an upload): it holds the home's lock, inherited, and runs as `-m worker.runner` does.
STUCK_TRAINING = """
import fcntl, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
print("holding", flush=True)
time.sleep(600)
"""


def test_a_serve_waiting_for_a_stuck_training_process_names_it_and_says_to_kill_it(tmp_path):
    """The next `serve` waits for the orphaned training process of the one killed with its process group. One that
    does not stop held it for ever, saying only that the dead serve's worker should stop, and "Ctrl-C to give up".
    Now the wait names the process and its job, and once QLORA_HEARTBEAT_DEADLINE_S has passed says to kill it; once
    killed, the serve takes the home."""
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    stuck = subprocess.Popen([sys.executable, "-c", STUCK_TRAINING, str(home / "serve.lock"), "-m", "worker.runner"],
                             stdout=subprocess.PIPE, text=True)
    serve = None
    try:
        assert stuck.stdout is not None and stuck.stdout.readline() == "holding\n"
        (home / "serve.lock").write_text(f"pid {_a_dead_pid()}")  # the killed serve's
        from app.config import Settings
        from worker.supervisor import held_marker

        held_marker(Settings(home=home)).write_text(json.dumps(
            {"claim_token": "a" * 32, "home_lock": True, "job_id": "j-stuck", "attempt": 2, "training_pid": stuck.pid}))
        serve = _serve(home, QLORA_HEARTBEAT_DEADLINE_S="1", QLORA_SUPERVISE_INTERVAL_S="0.25")
        assert serve.stderr is not None
        assert f"training process pid {stuck.pid} (job j-stuck)" in serve.stderr.readline()
        said = serve.stderr.readline()
        assert f"pid {stuck.pid} (training job j-stuck) still holds" in said and f"`kill {stuck.pid}` to go on" in said
        stuck.kill()
        assert serve.stdout is not None and serve.stdout.readline() == "took\n"
    finally:
        for process in (stuck, serve):
            if process is not None:
                process.kill()
                process.wait()


def _stuck_training_process() -> subprocess.Popen:
    """A training process stuck where it does not look for its worker (a model's load, a merge, an upload), in a session
    of its own as the worker starts one, running as `-m worker.runner` does."""
    stuck = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)", "-m",
                              "worker.runner"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert stuck.stdout is not None and stuck.stdout.readline() == "up\n"
    return stuck


def test_serve_whose_local_worker_died_stops_its_training_process_then_requeues_its_job_at_once(settings, session,
                                                                                                 make_job):
    """serve's local worker killed alone (by hand, the out-of-memory killer) while `serve` runs: the job it held stayed
    `running` until its heartbeats were QLORA_HEARTBEAT_DEADLINE_S old. Now serve, seeing it end, kills the training
    process its marker names (which would otherwise train on until its current step ends: here, never) and requeues the
    job its claim took, with an event saying why, and sends it. Its worker's lock free is what says that worker's pool
    process is gone too."""
    from app.broker import RUN_JOB_TASK
    from app.cli.processes import LocalWorker
    from app.jobs import states
    from app.jobs.tables import Job, JobEvent
    from tests.fast.conftest import received
    from worker.supervisor import HELD_DIR

    dead = make_job(states.RUNNING, attempt=1, worker="laptop:cpu", claim_token="a" * 32, step=7)
    held = settings.work_dir / HELD_DIR
    held.mkdir(parents=True)
    stuck = _stuck_training_process()
    try:
        (held / f"{'1' * 32}.lock").touch()  # the dead worker's lock: nothing holds it any more
        attempt_dir = settings.work_dir / dead / "attempt-1"
        (attempt_dir / "quantized-base").mkdir(parents=True)
        (attempt_dir / "quantized-base" / "model.safetensors").write_bytes(b"x" * 1024)
        (held / f"{'1' * 32}.json").write_text(json.dumps(
            {"claim_token": "a" * 32, "home_lock": True, "job_id": dead, "attempt": 1, "training_pid": stuck.pid}))

        LocalWorker(settings, {})._requeue_what_it_held(4242, "was killed by SIGKILL")

        assert stuck.wait(10) == -9  # killed, not left to stop by itself
        job = session.get(Job, dead)
        assert (job.status, job.lost_workers) == (states.QUEUED, 1)
        event = session.query(JobEvent).filter_by(job_id=dead, type="requeued").one()
        assert "the local worker laptop:cpu (pid 4242) was killed by SIGKILL at step 7 without handing the job back" \
            in event.message and "requeued for try 2" in event.message, event.message
        assert received(settings, "gpu-default") == [(RUN_JOB_TASK, [dead])]
        assert not (held / f"{'1' * 32}.json").exists()
        assert not (settings.work_dir / dead).exists()  # its attempt's directory too: nothing of it runs any more
    finally:
        stuck.kill()
        stuck.wait()


def test_an_attempt_whose_pool_process_outlived_its_worker_is_left_alone(settings, session, make_job):
    """A worker's pool process that outlives it (where the kernel does not end it with its parent) still holds the
    worker's lock and may still write its attempt's end: serve neither kills its training process nor ends its attempt."""
    from app.jobs import states
    from worker.supervisor import claims_of_ended_local_worker, held_marker

    running = make_job(states.RUNNING, attempt=1, worker="laptop:cpu", claim_token="b" * 32, step=7)
    settings.work_dir.mkdir(parents=True)
    stuck = _stuck_training_process()
    try:
        held_marker(settings).write_text(json.dumps(  # its lock held by this process, as by a pool process
            {"claim_token": "b" * 32, "home_lock": True, "job_id": running, "attempt": 1, "training_pid": stuck.pid}))

        (settings.work_dir / running / "attempt-1").mkdir(parents=True)
        assert claims_of_ended_local_worker(settings, wait_s=0.5) == {}
        assert stuck.poll() is None and (settings.work_dir / running / "attempt-1").is_dir()
    finally:
        stuck.kill()
        stuck.wait()
