"""Fixtures for the service tests: one deployment in the production shape, shared by the session."""

from __future__ import annotations

import pytest

from tests.deployment import start_deployment, stop_deployment


@pytest.fixture(scope="session")
def deployment(backing_services, tmp_path_factory, tiny_model_dir):
    """Postgres, Redis broker, S3 storage, one API process. Workers are started by the tests
    that need them; the queue names are unique to this test session."""
    d = start_deployment(tmp_path_factory.mktemp("deployment"), backing_services, tiny_model_dir)
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


