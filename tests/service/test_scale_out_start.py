"""What the processes say and do as they start on a scale-out deployment (Postgres, Redis, S3), where
no embedded first start has made the schema or the home: the API refuses to start on a database
`qlora migrate` has not made (it answered /health and failed every other request), a worker makes its
home its owner's alone and says in its log when the API would refuse jobs for its GPU class."""

from __future__ import annotations

import stat
import subprocess
import sys
import time

from app.db import engine_for
from tests import services
from tests.deployment import ROOT


def test_a_worker_keeps_its_home_private_and_says_when_no_job_can_reach_its_class(deployment, tmp_path):
    home = tmp_path / "worker-home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)  # as a umask of 022 leaves a directory made by hand
    proc = deployment.spawn("worker", "--gpu-class", "l4", "--name", "start-check", log_name="worker-start-check",
                            extra_env={"QLORA_HOME": str(home)})
    try:
        log = deployment.home / "worker-start-check.log"
        deadline = time.monotonic() + 60
        while "this worker will wait for nothing" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.2)
        said = log.read_text()
        assert "GPU class 'l4' is not one the API serves with these settings" in said
        assert "QLORA_EXTRA_GPU_CLASSES or QLORA_GPU_CLASSES" in said
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
    finally:
        deployment.stop(proc)


def test_the_api_will_not_start_on_a_database_without_its_schema(deployment, tmp_path):
    services.ensure_postgres()
    url = services.create_postgres_database()  # as a fresh Postgres is, before `qlora migrate`
    try:
        env = {**deployment.env, "QLORA_DATABASE_URL": url, "QLORA_PORT": str(services.free_port()),
               "QLORA_HOME": str(tmp_path)}
        done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--no-worker"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert ("error: the database has no schema yet: run `qlora migrate` first (with the same "
                "QLORA_DATABASE_URL)") in " ".join(done.stderr.split())
    finally:
        engine_for(url).dispose()
        services.drop_postgres_database(url)


def test_a_worker_will_not_start_on_a_database_an_older_release_migrated(deployment, tmp_path):
    """Workers updated before `qlora migrate` ran (a rolling upgrade in the wrong order): the worker says what
    to run and exits 2. Before, it started, took each job's message and failed it on a missing column
    (`column teams.disabled_at does not exist`), over and over, while the job waited."""
    from alembic import command

    from app.migrate import alembic_config

    services.ensure_postgres()
    url = services.create_postgres_database()
    try:
        command.upgrade(alembic_config(url), "0015")  # as the release that shipped 0015 left it
        env = {**deployment.env, "QLORA_DATABASE_URL": url, "QLORA_HOME": str(tmp_path)}
        done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--name", "updated-first"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "error: the database is at schema 0015, this release needs" in " ".join(done.stderr.split())
        assert "run `qlora migrate` first" in " ".join(done.stderr.split())
    finally:
        engine_for(url).dispose()
        services.drop_postgres_database(url)

def test_the_reaper_will_not_start_on_a_database_without_this_releases_schema(tmp_path):
    """`qlora reaper` started before `qlora migrate` (or updated first in a rolling upgrade) ran on, its every pass a
    traceback (`relation "leases" does not exist`, a column missing), reaping and scheduling nothing. It says what
    to run and exits 2, as `serve` and `qlora worker` do."""
    import os

    from alembic import command

    from app.migrate import alembic_config

    services.ensure_postgres()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    for revision, said in ((None, "the database has no schema yet: run `qlora migrate` first"),
                           ("0015", "the database is at schema 0015, this release needs")):
        url = services.create_postgres_database()
        try:
            if revision:
                command.upgrade(alembic_config(url), revision)  # as the release that shipped 0015 left it
            done = subprocess.run([sys.executable, "-m", "app.cli", "reaper"], cwd=ROOT, capture_output=True, text=True,
                                  env={**env, "QLORA_DATABASE_URL": url, "QLORA_HOME": str(tmp_path)}, timeout=60)
            assert done.returncode == 2, done.stdout + done.stderr
            assert f"error: {said}" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
        finally:
            engine_for(url).dispose()
            services.drop_postgres_database(url)


def test_the_api_and_the_reaper_write_only_json_lines_when_not_on_a_terminal(deployment):
    """A log collector (docker's takes stdout and stderr alike) read JSON lines and, among them, `API on http://...`
    and `reaper every 15.0s ... and` / `scheduler every ...` (one line cut in two at 80 columns), printed as text."""
    import json

    def not_json(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("{")]

    # Its stdout and stderr, as the deployment started it: the whole file (deployment.log keeps the last 5,000
    # characters, whose first line is cut, and the start line is the file's first).
    api_log = (deployment.home / "api.log").read_text(errors="replace")
    assert not not_json(api_log), not_json(api_log)[:5]
    assert any(json.loads(line)["message"].startswith("API and dashboard on http://") for line in api_log.splitlines())
    proc = deployment.spawn("reaper", log_name="reaper-json")
    try:
        log = deployment.home / "reaper-json.log"
        deadline = time.monotonic() + 60
        while "reaper every" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.2)
    finally:
        deployment.stop(proc)
    assert not not_json(log.read_text()), not_json(log.read_text())[:5]


def test_a_model_missing_on_a_worker_host_is_that_hosts_fault_not_the_jobs(deployment, worker, demo_data,
                                                                            tiny_model_dir, tmp_path):
    """The files of a registered model are not where the registry says on the worker's host: the attempt
    is lost (another worker may have them) and the events name the host and the path; before, the job
    failed at once as an invalid spec, blaming the user."""
    import shutil

    from tests.deployment import upload, wait_for_status
    from worker.training.tiny import demo_spec

    model_dir = tmp_path / "tiny-elsewhere"
    shutil.copytree(tiny_model_dir, model_dir)
    admin = deployment.client(deployment.team_key("team-scale", admin=True))
    registered = admin.post("/models", json={"name": "tiny-elsewhere", "path": str(model_dir)})
    assert registered.status_code == 201, registered.text
    model_dir.rename(tmp_path / "moved")  # as on a worker host that lacks the directory
    dataset = upload(admin, demo_data["train"]).json()
    job = admin.post("/jobs", json={"dataset_id": dataset["id"], **demo_spec("tiny-elsewhere")}).json()
    said = (f"the files of base model tiny-elsewhere are not at {model_dir} on worker shared: every worker "
            "host needs the registered models at their path")
    deadline = time.monotonic() + 120
    while not (requeued := [e for e in admin.get(f"/jobs/{job['id']}/events").json() if e["type"] == "requeued"]):
        assert time.monotonic() < deadline, admin.get(f"/jobs/{job['id']}").json()
        time.sleep(0.5)
    assert requeued[0]["message"].startswith(said) and requeued[0]["level"] == "warning"  # lost, not failed
    admin.post(f"/jobs/{job['id']}/cancel")
    done = wait_for_status(admin, job["id"], ("failed", "cancelled"), timeout=120, deployment=deployment)
    assert done["error"] is None or "invalid job spec" not in done["error"]
