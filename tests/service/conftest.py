"""Fixtures for the service tests: one deployment in the production shape, shared by the session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from app.db import engine_for
from tests import services
from tests.deployment import start_deployment, stop_deployment


@pytest.fixture(scope="session")
def deployment(backing_services, tmp_path_factory, tiny_model_dir):
    """Postgres, Redis broker, S3 storage, one API process. Workers are started by the tests
    that need them; the queue names are unique to this test session."""
    d = start_deployment(tmp_path_factory.mktemp("deployment"), backing_services, tiny_model_dir)
    yield d
    stop_deployment(d)


@pytest.fixture
def deployment_of_its_own(backing_services, tmp_path, tiny_model_dir):
    """A deployment for one test, whose workers it starts with the faults it needs; a worker waits 5 s
    (QLORA_OUT_OF_REACH_WAIT_S) before it hands back a job it could not run for no fault of the job's."""
    home = tmp_path / "home"
    home.mkdir()
    d = start_deployment(home, backing_services, tiny_model_dir, out_of_reach_wait_s="5")
    yield d
    stop_deployment(d)


@pytest.fixture(scope="session")
def worker(deployment):
    """One worker on the default queue, shared by the tests that need training to happen."""
    proc = deployment.start_worker(name="shared")
    yield proc
    deployment.stop(proc)


@pytest.fixture(scope="session")
def team_a(deployment):
    return deployment.client(deployment.team_key("team-a"))


@pytest.fixture(scope="session")
def team_b(deployment):
    return deployment.client(deployment.team_key("team-b"))


# The dashboard tests' browser: one Chromium for the session, whichever module uses it.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium; installed with apt-get when missing. A failure says why, it never skips."""
    if CHROMIUM.exists():
        return CHROMIUM
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    attempts = []
    for command in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        attempts.append(f"$ {' '.join(command)} -> {done.returncode}\n{done.stderr.strip()[-1500:]}")
        if CHROMIUM.exists():
            return CHROMIUM
    pytest.fail(f"the dashboard tests need Chromium at {CHROMIUM} and could not install it "
                f"(run `apt-get update && apt-get install -y chromium` as root):\n" + "\n".join(attempts))


# Per test file, not per session: playwright's sync API runs an event loop in the main thread for as long as it
# is open, and every later test file in the same process that calls asyncio.run() failed ("cannot be called
# from a running event loop"), depending on which files --dist loadfile had run there before.
@pytest.fixture(scope="module")
def browser(chromium):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def database_url() -> Iterator[str]:
    """A Postgres database of its own at the newest schema, for a test that starts its own processes
    or reads plans and statistics; dropped afterwards."""
    services.ensure_postgres()
    url = services.create_migrated_postgres_database()
    yield url
    engine_for(url).dispose()  # our connections, before the drop
    services.drop_postgres_database(url)
