"""Disabling a team (offboarding) on SQLite: its keys are refused saying why, its queued jobs are held with
the reason while another team's start, its running jobs are asked to pause (one being preempted stays
paused), nothing of it is deleted, and no admin disables the last way in. With a real worker and Postgres:
tests/service/test_team_offboarding.py."""

from __future__ import annotations

import pytest

from app.datasets.tables import Dataset
from app.db import session_scope
from app.errors import Conflict, Unauthorized
from app.jobs import repository as jobs_repository
from app.jobs import runs, states
from app.jobs import service as jobs_service
from app.jobs.tables import Job, JobAttempt, JobEvent
from app.scheduling import service as scheduling
from app.teams import admin
from app.teams import repository as teams_repository
from app.teams.service import authenticate, create_key, create_team, hash_key, revoke_key, sign, signer
from tests.fast.test_scheduling_service import add_job, claim, standing
from tests.services import in_a_thread_of_its_own


def refused(fn) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        fn()
    return caught.value


def test_a_disabled_teams_keys_are_refused_saying_so_and_work_again_once_enabled(session, settings, world):
    team_a, caller_a = world["team-a"]
    _, secret = create_key(session, "team-a", admin=True)  # its admin keys too
    create_key(session, "team-b", admin=True)  # another team's admin: disabling team-a locks nobody out
    session.commit()
    link = sign(session, caller_a, "a link")
    paused = add_job(session, team_a, status=states.PAUSED, attempt=1)

    admin.disable_team(session, "team-a")
    session.commit()
    error = refused(lambda: authenticate(session, hash_key(secret)))
    assert error.code == "team_disabled" and "team 'team-a' is disabled" in error.message
    assert "qlora admin enable-team team-a" in error.message
    assert teams_repository.live_keys(session, [caller_a.key_id]) == set()  # its streams end at their next poll
    with pytest.raises(Exception, match="this link is not valid"):
        signer(session, caller_a.key_id, "a link", link)
    # A key read just before (an API process trusts it for QLORA_KEY_CACHE_S) queues nothing meanwhile.
    assert refused(lambda: jobs_service.resume(session, settings, caller_a, paused)).code == "team_disabled"
    session.rollback()
    assert session.get(Job, paused).status == states.PAUSED

    admin.enable_team(session, "team-a")
    session.commit()
    assert authenticate(session, hash_key(secret)).team_id == team_a.id
    assert signer(session, caller_a.key_id, "a link", link).team_id == team_a.id


def test_a_disabled_teams_queued_jobs_wait_saying_why_while_another_teams_start(session, settings, world):
    team_a, caller_a = world["team-a"]
    team_b = world["team-b"][0]
    held = add_job(session, team_a, age_s=60)  # older: it would go first
    admin.disable_team(session, "team-a")
    session.commit()
    assert standing(settings, jobs_service.view(session, caller_a, held)) == (1, "team_disabled")
    assert claim(settings, held) is None  # its message finds nothing it may start
    other = add_job(session, team_b, age_s=1)
    assert claim(settings, held, "w2").id == other
    session.expire_all()
    assert session.get(Job, held).status == states.QUEUED

    admin.enable_team(session, "team-a")
    session.commit()
    assert standing(settings, jobs_service.view(session, caller_a, held)) == (1, "no_worker")  # no worker here
    assert claim(settings, held, "w3").id == held


def test_a_claim_that_read_the_team_enabled_checks_again_under_its_lock(session, settings, world, monkeypatch):
    """A claim reads every team's share, then locks the chosen job's team: a team disabled in between
    (disabling takes the same lock) must not have its job started."""
    team_a = world["team-a"][0]
    job_id = add_job(session, team_a)
    read = scheduling.team_shares
    reads = []

    def shares_then_disabled(*args, **kwargs):
        shares = read(*args, **kwargs)
        if not reads:  # the claim's first read, of every team; its second is of the team it locked
            reads.append(shares)
            with session_scope(settings.database_url) as other:
                admin.disable_team(other, "team-a")
        return shares

    monkeypatch.setattr(scheduling, "team_shares", shares_then_disabled)
    assert claim(settings, job_id) is None
    session.expire_all()
    assert session.get(Job, job_id).status == states.QUEUED


def test_disabling_pauses_the_running_jobs_and_deletes_nothing(session, settings, world):
    team_a, caller_a = world["team-a"]
    running, preempted, cancelling = (add_job(session, team_a, age_s=age) for age in (30, 20, 10))
    for job_id in (running, preempted, cancelling):
        assert claim(settings, job_id).id == job_id
    with session_scope(settings.database_url) as s:
        assert jobs_repository.preempt(s, preempted, 1)  # the scheduler is pausing it for another team
    jobs_service.cancel(session, caller_a, cancelling)
    queued = add_job(session, team_a)
    session.commit()

    disabled = admin.disable_team(session, "team-a")
    session.commit()
    assert sorted(disabled.pausing) == sorted([running, preempted])
    assert (disabled.disabled, disabled.running, disabled.queued) == (True, 3, 1)
    session.expire_all()
    statuses = {job_id: (session.get(Job, job_id).status, session.get(Job, job_id).preempting)
                for job_id in (running, preempted, cancelling, queued)}
    assert statuses == {running: (states.PAUSING, False), preempted: (states.PAUSING, False),
                        cancelling: (states.CANCELLING, False), queued: (states.QUEUED, False)}
    event = session.query(JobEvent).filter_by(job_id=running, type="pause_requested").one()
    assert "an admin disabled the team" in event.message and "checkpoint" in event.message

    # The workers saw pausing, saved a checkpoint and stopped: paused, the preempted one too (not queued again).
    for job_id in (running, preempted):
        with session_scope(settings.database_url) as s:
            assert runs.finish(s, job_id, 1, states.PAUSED)
    session.expire_all()
    assert [session.get(Job, j).status for j in (running, preempted)] == [states.PAUSED, states.PAUSED]
    assert session.query(JobAttempt).filter(JobAttempt.team_id == team_a.id).count() == 3  # usage rows stay
    assert session.get(Dataset, "data-team-a") is not None

    again = admin.disable_team(session, "team-a")  # already disabled: its date stays, nothing more to pause
    assert again.disabled_at == disabled.disabled_at and again.pausing == []
    enabled = admin.enable_team(session, "team-a")
    session.commit()
    assert (enabled.disabled, enabled.paused) == (False, 2)
    session.expire_all()
    assert session.get(Job, running).status == states.PAUSED  # until the team resumes it


def test_no_admin_disables_the_last_way_in(session, settings, world):
    team_a, caller_a = world["team-a"]
    key, _ = create_key(session, "team-a", admin=True)
    session.commit()
    with pytest.raises(Conflict, match="holds the last admin keys that work") as caught:
        admin.disable_team(session, "team-a")
    assert caught.value.code == "last_admin"
    session.rollback()

    create_team(session, "ops")
    ops_key, _ = create_key(session, "ops", admin=True)
    session.commit()
    from app.teams.service import Caller

    ops = Caller.of(teams_repository.team_by_name(session, "ops"), ops_key)
    own = Caller.of(team_a, key)
    with pytest.raises(Conflict, match="this admin key belongs to team 'team-a'"):
        admin.disable_team(session, "team-a", caller=own)  # over HTTP: its own key would be refused
    session.rollback()
    assert admin.disable_team(session, "team-a", caller=ops).disabled
    session.commit()
    with pytest.raises(Conflict, match="team 'ops' holds the last admin keys"):
        admin.disable_team(session, "ops")  # team-a's admin keys no longer work
    session.rollback()


def test_the_list_of_teams_shows_what_each_holds(session, settings, world):
    team_a, team_b = world["team-a"][0], world["team-b"][0]
    create_key(session, "team-a", admin=True)
    teams_repository.key_by_id_or_prefix(session, world["team-b"][1].key_id)[0].revoked_at = team_b.created_at
    session.commit()
    add_job(session, team_a)
    add_job(session, team_a, status=states.PAUSED, attempt=1)
    add_job(session, team_a, status=states.SUCCEEDED, attempt=1)
    admin.disable_team(session, "team-b")
    session.commit()
    listed = {t.name: t for t in admin.list_teams(session)}
    a, b = listed["team-a"], listed["team-b"]
    assert (a.keys_live, a.admin_keys_live, a.queued, a.running, a.paused, a.disabled) == (2, 1, 1, 0, 1, False)
    assert (b.keys_live, b.admin_keys_live, b.queued, b.disabled) == (0, 0, 0, True)
    assert a.storage_bytes == 10 and b.disabled_at is not None


def test_a_disabled_teams_admin_key_still_trusted_elsewhere_cannot_enable_its_team(settings, session):
    """Two API processes, each with its own key cache: one read team-a's admin key just before another
    disabled team-a. For QLORA_KEY_CACHE_S it still trusts that key, which must not enable its own team."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    create_team(session, "team-a")
    create_team(session, "team-b")
    _, key_a = create_key(session, "team-a", admin=True)
    _, key_b = create_key(session, "team-b", admin=True)
    session.commit()
    one = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key_a}"}, raise_server_exceptions=False)
    two = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key_b}"}, raise_server_exceptions=False)
    assert one.get("/admin/teams").status_code == 200  # process one now trusts team-a's key for a while

    assert two.post("/admin/teams/team-a/disable").status_code == 200
    refused = one.post("/admin/teams/team-a/enable")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "team_disabled"
    session.expire_all()
    assert teams_repository.team_by_name(session, "team-a").disabled_at is not None

    enabled = two.post("/admin/teams/team-a/enable")  # another team's admin does
    assert enabled.status_code == 200 and enabled.json()["disabled"] is False


def test_an_admin_key_revoked_or_disabled_is_refused_at_once_though_an_api_process_kept_it(settings, session):
    """An API process keeps what it read of a key for QLORA_KEY_CACHE_S (up to a minute). An admin key acts on every
    team: one revoked (leaked, say), or whose team was disabled, went on disabling teams and setting quotas for that
    long in every process that had read it."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    for name in ("ops", "ops-2", "team-b"):
        create_team(session, name)
    revoked, key = create_key(session, "ops", admin=True)
    _, key_2 = create_key(session, "ops-2", admin=True)
    create_key(session, "team-b", admin=True)  # a third team's admin: disabling ops-2 locks nobody out
    session.commit()
    api = create_app(settings.model_copy(update={"key_cache_s": 60}))
    client = TestClient(api, raise_server_exceptions=False)
    for secret in (key, key_2):
        assert client.get("/admin/teams", headers={"Authorization": f"Bearer {secret}"}).status_code == 200  # kept

    revoke_key(session, revoked.id)
    admin.disable_team(session, "ops-2")
    session.commit()
    for secret, code in ((key, "unauthorized"), (key_2, "team_disabled")):
        auth = {"Authorization": f"Bearer {secret}"}
        refused = client.put("/admin/teams/team-b/quota", json={"max_running": 0}, headers=auth)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == code
        assert client.get("/jobs", headers=auth).status_code == 401  # nor kept for the key's other requests
    session.expire_all()
    assert teams_repository.team_by_name(session, "team-b").max_running is None


def test_an_admin_key_revoked_reads_no_other_teams_usage_though_an_api_process_kept_it(settings, session):
    """GET /usage?all_teams=true is an admin request (every team's names, GPU time and storage): it reads its key
    again, as /admin/... does. It trusted the key cache, so a revoked (leaked) admin key read every team's usage
    for QLORA_KEY_CACHE_S (up to a minute) in each API process that had read it."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    create_team(session, "ops")
    revoked, key = create_key(session, "ops", admin=True)
    session.commit()
    client = TestClient(create_app(settings.model_copy(update={"key_cache_s": 60})), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/usage", params={"all_teams": "true"}, headers=auth).status_code == 200  # the key is kept

    revoke_key(session, revoked.id)
    session.commit()
    refused = client.get("/usage", params={"all_teams": "true"}, headers=auth)
    assert refused.status_code == 401, refused.text


def test_a_key_read_in_flight_when_its_team_is_disabled_is_not_kept(session, world):
    """The process that served the disable forgets the team's keys; a read of one of them that began before
    the disable committed (it saw the team enabled) and ends after the forget must not put it back for
    QLORA_KEY_CACHE_S."""
    import asyncio

    from app.teams.service import CallerCache

    team_a, caller_a = world["team-a"]

    async def race() -> tuple[object, object]:
        cache = CallerCache(60)
        read_began, disabled = asyncio.Event(), asyncio.Event()

        async def read():
            read_began.set()
            await disabled.wait()  # the read saw the team enabled; the disable commits meanwhile
            return caller_a
        request = asyncio.ensure_future(cache.get_or_read("key-hash", read))
        await read_began.wait()
        cache.forget_team(team_a.id)  # after the disable's commit
        disabled.set()
        return await request, cache.get("key-hash")

    answered, kept = in_a_thread_of_its_own(lambda: asyncio.run(race()))  # whatever loop this thread holds
    assert answered == caller_a  # the request that began before the disable is answered as it was read
    assert kept is None  # but the next request reads the key again, and is refused


def test_who_disabled_a_team_and_why_is_kept_and_told_to_the_team(settings, session):
    """Admins later read who disabled a team and why, and the team's refused requests say why: before, only
    the date was kept and a team's users read "disabled" with no reason to act on."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    create_team(session, "team-a")
    create_team(session, "team-b")
    _, key_a = create_key(session, "team-a")
    admin_key, key_b = create_key(session, "team-b", admin=True)
    session.commit()
    app = create_app(settings)
    ops = TestClient(app, headers={"Authorization": f"Bearer {key_b}"}, raise_server_exceptions=False)
    team = TestClient(app, headers={"Authorization": f"Bearer {key_a}"}, raise_server_exceptions=False)

    for body, field in (({"reason": "a\nb"}, "reason"), ({"reason": ""}, "reason"), ({"reason": "x" * 501}, "reason"),
                        ({"reason": 7}, "reason"), ({"why": "typo"}, "why")):
        bad = ops.post("/admin/teams/team-a/disable", json=body)
        assert bad.status_code == 422 and field in bad.text, (body, bad.text)
    assert teams_repository.team_by_name(session, "team-a").disabled_at is None  # nothing done

    disabled = ops.post("/admin/teams/team-a/disable", json={"reason": "project Zephyr ended; ask #ml-platform"})
    assert disabled.status_code == 200, disabled.text
    by = f"admin key {admin_key.prefix}… of team 'team-b'"
    assert (disabled.json()["disabled_by"], disabled.json()["disabled_reason"]) == (
        by, "project Zephyr ended; ask #ml-platform")
    listed = {t["name"]: t for t in ops.get("/admin/teams").json()}
    assert listed["team-a"]["disabled_reason"] == "project Zephyr ended; ask #ml-platform"
    assert listed["team-b"]["disabled_by"] is None
    refusal = team.get("/jobs").json()["error"]
    assert refusal["code"] == "team_disabled" and "(project Zephyr ended; ask #ml-platform)" in refusal["message"]

    since = listed["team-a"]["disabled_at"]
    again = ops.post("/admin/teams/team-a/disable").json()  # no reason: the first one stays, and the date
    assert (again["disabled_at"], again["disabled_reason"]) == (since, "project Zephyr ended; ask #ml-platform")
    again = ops.post("/admin/teams/team-a/disable", json={"reason": "archived"}).json()  # a new reason replaces it
    assert (again["disabled_at"], again["disabled_reason"], again["disabled_by"]) == (since, "archived", by)

    enabled = ops.post("/admin/teams/team-a/enable").json()
    assert (enabled["disabled_at"], enabled["disabled_by"], enabled["disabled_reason"]) == (None, None, None)
    assert team.get("/jobs").status_code == 200


def test_an_admin_lists_a_disabled_teams_jobs_which_its_own_keys_cannot(settings, session, world):
    """Before, a disabled team's jobs were counts in list-teams: its keys answer 401, and no admin route listed
    another team's jobs, so an admin deciding what to do with it could not see which jobs it holds."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    team_a = world["team-a"][0]
    _, key_a = create_key(session, "team-a")
    _, admin_b = create_key(session, "team-b", admin=True)
    _, plain_b = create_key(session, "team-b")
    session.commit()
    queued = [add_job(session, team_a, age_s=60 - n) for n in range(3)]  # the newest last
    paused = add_job(session, team_a, status=states.PAUSED, attempt=1)
    add_job(session, world["team-b"][0])  # another team's: never in team-a's list
    app = create_app(settings)
    ops = TestClient(app, headers={"Authorization": f"Bearer {admin_b}"}, raise_server_exceptions=False)
    team = TestClient(app, headers={"Authorization": f"Bearer {key_a}"}, raise_server_exceptions=False)
    own = team.get("/jobs").json()
    assert ops.post("/admin/teams/team-a/disable").status_code == 200
    assert team.get("/jobs").status_code == 401

    listed = ops.get("/admin/teams/team-a/jobs")
    assert listed.status_code == 200, listed.text
    assert [j["id"] for j in listed.json()["data"]] == [paused, *reversed(queued)]  # newest first, as GET /jobs
    assert listed.json()["data"] == own["data"]  # the team's own page, field for field
    assert [j["id"] for j in ops.get("/admin/teams/team-a/jobs", params={"status": "paused"}).json()["data"]] == [paused]
    first = ops.get("/admin/teams/team-a/jobs", params={"limit": 2}).json()
    rest = ops.get("/admin/teams/team-a/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in first["data"] + rest["data"]] == [paused, *reversed(queued)] and rest["next_cursor"] is None

    bad = ops.get("/admin/teams/team-a/jobs", params={"status": "sleeping"})
    assert bad.status_code == 422 and "status: must be one of" in bad.json()["error"]["message"]
    missing = ops.get("/admin/teams/team-z/jobs")
    assert missing.status_code == 404 and "no team 'team-z'" in missing.json()["error"]["message"]
    long = ops.get("/admin/teams/" + "z" * 6000 + "/jobs")  # said as an excerpt, as every error says what was sent
    assert long.status_code == 404 and len(long.json()["error"]["message"]) < 300, len(long.text)
    not_admin = TestClient(app, headers={"Authorization": f"Bearer {plain_b}"}, raise_server_exceptions=False)
    assert not_admin.get("/admin/teams/team-a/jobs").status_code == 403
