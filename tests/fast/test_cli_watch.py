"""`qlora jobs watch` run as a user runs it (a subprocess), against a stand-in for the API on loopback that
answers the routes a watch reads (the job, its curve, its events page by page as the API pages them, its
artifacts): what a pipe and a terminal get of a job's whole history, however long, and of a queued job's wait."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from urllib.parse import parse_qs, urlparse

import pytest

from tests.deployment import ROOT
from tests.fast.loopback import JsonHandler, Loopback

JOB_ID = "a" * 32
EVENT_PAGE_MOST = 1000  # the API's most per page (app.jobs.service.MAX_EVENTS); its default is 200


def a_job(status: str, **fields) -> dict:
    return {"id": JOB_ID, "name": "watched", "status": status, "step": 0, "total_steps": None, "attempt": 1,
            "progress": {"step": 0, "total_steps": None, "fraction": None}, "error": None, "queue_position": None,
            **fields}


class JobApi:
    """The routes `jobs watch` reads, answered from `jobs` and `events` the way the API answers them: the job as
    each of `jobs` in turn, then as the last; events oldest first after `after`, at most `limit` (200 by default,
    1,000 at most)."""

    def __init__(self, jobs: list[dict], events: list[dict]):
        api = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == f"/jobs/{JOB_ID}":
                    body: object = api.jobs.pop(0) if len(api.jobs) > 1 else api.jobs[0]
                elif url.path == f"/jobs/{JOB_ID}/metrics":
                    body = {"train": [], "eval": [], "has_more": False, "next": None}
                elif url.path == f"/jobs/{JOB_ID}/events":
                    after, limit = int(query.get("after", 0)), min(int(query.get("limit", 200)), EVENT_PAGE_MOST)
                    body = [e for e in api.events if e["id"] > after][:limit]
                elif url.path == f"/jobs/{JOB_ID}/artifacts":
                    body = []
                else:
                    self.send_error(404)
                    return
                self.send_json(body)

        self.jobs, self.events = jobs, events
        self._loopback = Loopback(Handler)
        self.url = self._loopback.url

    def close(self) -> None:
        self._loopback.close()


@pytest.fixture
def serve():
    servers: list[JobApi] = []

    def start(*jobs: dict, events: list[dict] = ()) -> JobApi:
        servers.append(JobApi(list(jobs), list(events)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def watch(server: JobApi, tmp_path, *args: str, terminal: bool = False, columns: int = 200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "AWS_", "NO_COLOR", "FORCE_COLOR"))} | {
        "QLORA_HOME": str(tmp_path), "QLORA_URL": server.url, "QLORA_API_KEY": "qlk_" + "x" * 43,
        "COLUMNS": str(columns), "LINES": "50", "PYTHONIOENCODING": "utf-8"}
    if terminal:
        env["FORCE_COLOR"] = "1"  # rich takes stdout for a terminal
    done = subprocess.run([sys.executable, "-m", "app.cli", "jobs", "watch", JOB_ID, "--interval", "0.2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def history(count: int, last: str) -> list[dict]:
    events = [{"id": n, "attempt": 1, "type": "checkpoint_saved", "level": "info", "step": n,
               "message": f"checkpoint of step {n} saved", "data": None, "created_at": "2026-12-07T01:45:00Z"}
              for n in range(1, count)]
    return events + [{"id": count, "attempt": 1, "type": last, "level": "error" if last == "failed" else "info",
                      "step": None, "message": f"job {last}", "data": None, "created_at": "2026-12-07T01:46:00Z"}]


def test_a_pipe_gets_every_event_of_a_job_that_ended_with_more_than_a_page(serve, tmp_path):
    """`qlora jobs watch` of a finished job with 238 events streamed the first page, 200, and stopped at
    "checkpoint of step 195 saved": the adapter_saved, finished and succeeded events after it never came."""
    server = serve(a_job("succeeded", step=2499, total_steps=2499), events=history(2500, "succeeded"))
    done = watch(server, tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    events = [r["event"]["id"] for r in records if r["kind"] == "event"]
    assert events == list(range(1, 2501))
    assert records[-1]["kind"] == "job" and records[-1]["job"]["status"] == "succeeded"


def test_a_terminal_gets_a_finished_jobs_last_events_and_how_many_it_left_out(serve, tmp_path):
    """On a terminal, a watch of a job that had ended printed none of its events; and a history of thousands would
    scroll past whole. It shows the newest, saying how many it left out and where they all are."""
    server = serve(a_job("failed", error="out of GPU memory at step 3; try a smaller per_device_batch_size"),
                   events=history(2500, "failed"))
    done = watch(server, tmp_path, terminal=True)
    assert done.returncode == 1
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)
    assert f"2,450 earlier events not shown (`qlora jobs watch {JOB_ID} --json` streams them all)" in shown, shown
    assert "failed: job failed" in shown and "checkpoint of step 2451 saved" in shown, shown
    assert "checkpoint of step 2450 saved" not in shown, shown
    assert "out of GPU memory at step 3; try a smaller per_device_batch_size" in done.stderr


def test_a_queued_job_says_why_it_waits_while_watched(serve, tmp_path):
    """`qlora jobs watch` of a queued job showed "queued, step 0/?" and nothing of its place or what it waited for,
    which `qlora jobs show` said."""
    detail = "no worker of GPU class a100 has been seen for 12 minutes; the job starts once one is up"
    queued = a_job("queued", queue_position=3, waiting_for="no_worker", waiting_detail=detail)
    done = watch(serve(queued, queued, a_job("paused")), tmp_path, terminal=True)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)
    assert "queue position 3 (waiting for a worker of its class to be up)" in shown, shown
    assert detail in shown, shown
    assert done.returncode == 1  # it ended paused: a person's to resume, not a success


def test_a_watch_that_ends_paused_says_how_the_job_goes_on(serve, tmp_path):
    """`qlora jobs watch` of a job paused at step 11 ended "job … paused at step 11/2000" (exit 1): nothing said
    that the job waits, or for what. Exit 1 stays (it did not succeed); the line says how to continue it."""
    for flags, terminal in (((), False), (("--table",), True)):
        done = watch(serve(a_job("paused", step=11, total_steps=2000)), tmp_path, *flags, terminal=terminal)
        assert done.returncode == 1, done.stderr
        assert f"job {JOB_ID} paused at step 11/2000; it waits to be resumed: `qlora jobs resume {JOB_ID}` continues " \
               "it from its newest checkpoint" in " ".join(done.stderr.split()), done.stderr


def test_a_pipe_hears_a_queued_jobs_wait_change_once_per_change(serve, tmp_path):
    """On a pipe `jobs watch` wrote a status record only when the status changed: a queued job moving from place 3
    to place 1, or from waiting for a worker to waiting for its team's quota, never reached a script. One record per
    change of the wait, none for a poll that found it unchanged."""
    jobs = [a_job("queued", queue_position=3, waiting_for="no_worker"), a_job("queued", queue_position=3, waiting_for="no_worker"),
            a_job("queued", queue_position=1, waiting_for="no_worker"), a_job("queued", queue_position=1, waiting_for="quota"),
            a_job("queued", queue_position=1, waiting_for="quota"), a_job("running", step=1, total_steps=2),
            a_job("paused", step=1, total_steps=2)]
    done = watch(serve(*jobs), tmp_path)
    assert done.returncode == 1, done.stderr  # it ended paused
    statuses = [(r["job"]["status"], r["job"]["queue_position"], r["job"].get("waiting_for"))
                for r in map(json.loads, done.stdout.splitlines()) if r["kind"] == "status"]
    assert statuses == [("queued", 3, "no_worker"), ("queued", 1, "no_worker"), ("queued", 1, "quota"),
                        ("running", None, None), ("paused", None, None)]


@pytest.mark.parametrize("status, left", [
    ("queued", "job {id} keeps its place in the queue (`qlora jobs watch {id}` to follow it again, `qlora jobs cancel "
               "{id}` to take it out)"),
    ("running", "job {id} keeps running (`qlora jobs watch {id}` to follow it again, `qlora jobs cancel {id}` to stop it)"),
    ("pausing", "job {id} goes on pausing: it saves a checkpoint and stops"),
])
def test_ctrl_c_during_a_watch_says_what_the_job_goes_on_doing(serve, tmp_path, status, left):
    """Ctrl-C during `jobs watch` said "job X keeps running" of any job, a queued one too, which runs nothing yet."""
    import signal

    server = serve(a_job(status, queue_position=2 if status == "queued" else None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {
        "QLORA_HOME": str(tmp_path), "QLORA_URL": server.url, "QLORA_API_KEY": "qlk_" + "x" * 43, "COLUMNS": "400"}
    command = subprocess.Popen([sys.executable, "-m", "app.cli", "jobs", "watch", JOB_ID, "--interval", "0.2"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert json.loads(command.stdout.readline())["job"]["status"] == status  # the watch has seen the job
    command.send_signal(signal.SIGINT)
    _, stderr = command.communicate(timeout=30)
    assert command.returncode == 130 and "Traceback" not in stderr, stderr
    assert "stopped watching; " + left.format(id=JOB_ID) in stderr, stderr
    assert status == "running" or "keeps running" not in stderr, stderr
