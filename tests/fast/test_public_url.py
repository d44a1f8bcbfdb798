"""QLORA_PUBLIC_URL: the URLs the API answers name the address users reach it at, not the one a proxy
forwarded the request to (tests/fast: an app on SQLite and local storage, requests through its ASGI
interface, whose address is http://testserver)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.jobs import states
from app.jobs.tables import Artifact, Job
from app.main import create_app
from app.storage import make_key, storage_from_settings
from app.teams.service import create_key, create_team
from tests.deployment import stored_spec
from tests.fast.conftest import make_settings

DATA = b"an adapter archive " * 1000


def client_and_job(settings: Settings, session) -> tuple[TestClient, str]:
    """A client of team-a's and a succeeded job of its whose adapter holds DATA, stored for real."""
    team = create_team(session, "team-a")
    _key, secret = create_key(session, "team-a")
    job = Job(team_id=team.id, status=states.SUCCEEDED, base_model="tiny", queue="gpu-default", spec=stored_spec(),
              name="sft")
    session.add(job)
    session.flush()
    with storage_from_settings(settings).writer(make_key(team.id, "artifacts")) as writer:
        writer.write(DATA)
        stored = writer.commit()
    session.add(Artifact(job_id=job.id, kind="adapter", storage_key=stored.key, bytes=stored.size, sha256=stored.sha256))
    session.commit()
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {secret}"}), job.id


def test_without_it_the_urls_name_the_address_the_request_came_to(settings, session):
    client, job_id = client_and_job(settings, session)
    [adapter] = client.get(f"/jobs/{job_id}/artifacts").json()
    assert adapter["download_url"] == f"http://testserver/jobs/{job_id}/artifacts/adapter"
    assert client.get(f"/jobs/{job_id}/artifacts/adapter/link").json()["url"].startswith(
        f"http://testserver/jobs/{job_id}/artifacts/adapter/signed?key_id=")


def test_with_it_the_download_url_and_a_browsers_link_are_where_users_reach_the_api(settings, session):
    """Behind a TLS proxy that mounts the API under /ml, on the proxy's host; the link, taken back to the
    API's own path as the proxy does, downloads the archive with no key."""
    public = make_settings(settings.home, public_url="https://qlora.example.com/ml/")
    client, job_id = client_and_job(public, session)
    [adapter] = client.get(f"/jobs/{job_id}/artifacts").json()
    assert adapter["download_url"] == f"https://qlora.example.com/ml/jobs/{job_id}/artifacts/adapter"
    link = client.get(f"/jobs/{job_id}/artifacts/adapter/link").json()["url"]
    assert link.startswith(f"https://qlora.example.com/ml/jobs/{job_id}/artifacts/adapter/signed?key_id=")
    forwarded = link.removeprefix("https://qlora.example.com/ml")
    anyone = TestClient(create_app(public))
    assert anyone.get(forwarded).content == DATA
    assert anyone.get(forwarded.replace("signature=", "signature=0")).status_code == 403


@pytest.mark.parametrize("value", ["qlora.example.com", "ftp://qlora.example.com", "https://", "https://q.example.com:99999",
                                   "https://q.example.com/?a=1", "https://q.example.com/#top", "https://q example.com"])
def test_a_public_url_users_could_not_follow_is_refused_at_start_naming_the_form(tmp_path, value):
    with pytest.raises(ValueError, match=r"QLORA_PUBLIC_URL must be http\(s\)://HOST\[:PORT\]\[/PATH\]"):
        Settings(home=tmp_path, public_url=value)


def test_a_public_url_with_a_password_is_refused_without_printing_it(tmp_path):
    with pytest.raises(ValueError, match="no user or password") as refused:
        Settings(home=tmp_path, public_url="https://admin:hunter2@qlora.example.com")
    assert "hunter2" not in str(refused.value)
