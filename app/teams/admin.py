"""Teams as an admin sees and retires them: the list with what each holds, and disabling (offboarding) a
team whose project ended or whose people left, then enabling it again.

A team is never deleted: its jobs, datasets, artifacts and its usage rows (GPU-hours per team, which
accounting reads) would go with its row. Disabled, it keeps all of it, and:

- its keys answer 401 `team_disabled`, admin keys included (app/teams/service.authenticate); an API
  process trusts what it read of a key for QLORA_KEY_CACHE_S, and in that window nothing of the team can
  be queued (quotas.check_can_queue refuses it under the team's row lock);
- its queued jobs stay queued and do not start: the scheduler holds them, waiting_for "team_disabled"
  (scheduling/policy.py), and a claim checks again under the team's row lock, which disabling takes first;
- its running jobs are paused as a team's pause would: a checkpoint after the current step, then paused,
  the GPU freed, nothing lost; a job the scheduler was preempting stays paused instead of being queued again.

Enabling lifts the refusal and the hold: queued jobs start in their turn, paused jobs stay paused until the
team resumes them (it may no longer want them).
"""

from __future__ import annotations

import getpass
import os
import socket

from sqlalchemy.orm import Session

from app.db import database_now, utcnow
from app.errors import Conflict
from app.jobs import repository as jobs
from app.jobs import states
from app.pagination import Page
from app.quotas.service import lock_team, team_named
from app.teams import repository
from app.teams.schemas import TeamDisabled, TeamOut
from app.teams.service import Caller, team_disabled
from app.teams.tables import ApiKey, Team
from app.usage.repository import gpu_seconds_by_team, month_start, storage_bytes_by_team


def list_teams(session: Session) -> list[TeamOut]:
    """Every team, by name, with its live keys, jobs queued, running and paused, GPU-hours this month and
    storage kept: a handful of grouped queries, whatever the number of teams."""
    return _overview(session, repository.list_teams(session))


def _overview(session: Session, teams: list[Team]) -> list[TeamOut]:
    now = database_now(session)  # claimed_at's clock: a running attempt counts up to now
    ids = [team.id for team in teams]
    keys = repository.live_key_counts(session)
    counts = jobs.count_active_by_team(session, ids)
    gpu_s = gpu_seconds_by_team(session, month_start(now), now, now, ids)
    stored = storage_bytes_by_team(session, ids)
    out = []
    for team in teams:
        live, admin = keys.get(team.id, (0, 0))
        held = counts.get(team.id, {})
        out.append(TeamOut(
            name=team.name, id=team.id, created_at=team.created_at, disabled=team.disabled_at is not None,
            disabled_at=team.disabled_at, disabled_by=team.disabled_by, disabled_reason=team.disabled_reason,
            keys_live=live, admin_keys_live=admin,
            queued=held.get(states.QUEUED, 0), running=sum(held.get(s, 0) for s in states.WORKER_OWNED),
            paused=held.get(states.PAUSED, 0), gpu_hours_this_month=round(gpu_s.get(team.id, 0.0) / 3600, 4),
            storage_bytes=stored.get(team.id, 0)))
    return out


def jobs_of_team(session: Session, name: str, status: str | None, cursor: str | None, limit: int) -> Page:
    """The team's jobs as its own GET /jobs pages them, for an admin: once the team is disabled its keys
    answer 401, and what it holds (queued, running, paused) is what the admin deciding about it must see."""
    # Here, not at the top: the jobs service brings the API's and the queue's libraries (~0.5 s of CPU), which
    # every other `qlora admin` command would load for nothing.
    from app.jobs import service as jobs_service

    return jobs_service.team_view_page(session, team_named(session, name).id, status, cursor, limit)


def show_team(session: Session, team: Team) -> TeamOut:
    return _overview(session, [team])[0]


def disable_team(session: Session, name: str, *, caller: Caller | None = None, reason: str | None = None) -> TeamDisabled:
    """Disable the team and pause its running jobs, recording who asked and `reason`. `caller`: the admin key
    asking over HTTP (None: `qlora admin`, on the database itself). Disabling an already disabled team keeps its
    first date and pauses anything of it still running (nothing should be); a reason given then replaces the
    one recorded, with who gave it."""
    team = team_named(session, name)
    # Its running jobs' rows first: one of them ending meanwhile takes its row, then the team's (usage.ledger).
    holding = jobs.worker_owned_of_team(session, team.id)
    team = lock_team(session, team.id)  # before any claim of its jobs reads it (scheduling.claim_next)
    # A claim holds the team's row from its check until it commits, so one that was under way as the jobs
    # above were read started a job they could not see: read them again now that no claim can start one
    # (without this, that job trained to its end for a disabled team). Only its row is taken after the
    # team's, and only a job that ended the instant it started would take them the other way round.
    holding = jobs.worker_owned_of_team(session, team.id)
    _refuse_lockout(session, team, caller)
    if team.disabled_at is None:
        team.disabled_at = utcnow()
        team.disabled_by, team.disabled_reason = _who(session, caller), reason
    elif reason is not None:
        team.disabled_by, team.disabled_reason = _who(session, caller), reason
    pausing = [job.id for job in holding if _pause(session, job)]
    session.flush()
    return TeamDisabled(**show_team(session, team).model_dump(), pausing=pausing)


def _who(session: Session, caller: Caller | None) -> str:
    """Who is disabling, as admins read it later: the admin key (its prefix, never more of it) and its team, or
    the user and host `qlora admin` runs as (it needs no key: whoever reaches the database)."""
    if caller is not None:
        key = session.get(ApiKey, caller.key_id)
        prefix = key.prefix if key is not None else caller.key_id
        return f"admin key {prefix}… of team {caller.team_name!r}"[:300]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        user = f"uid {os.getuid()}"
    return f"qlora admin as {user} on {socket.gethostname()}"[:300]


def _refuse_lockout(session: Session, team: Team, caller: Caller | None) -> None:
    """No admin disables their own way in: not the team of the key asking, and not the last team whose admin
    keys work (the API would then have no admin left; `qlora admin` on the database always works)."""
    if caller is not None and caller.team_id == team.id:
        raise Conflict(f"this admin key belongs to team {team.name!r}: disabling it would refuse this key too. Use an "
                       f"admin key of another team, or `qlora admin disable-team {team.name}` on a host that reaches the "
                       "database", code="own_team")
    if team.disabled_at is not None:
        return
    admins = repository.teams_with_live_admin_keys(session)
    if team.id in admins and admins == {team.id}:
        raise Conflict(f"team {team.name!r} holds the last admin keys that work: disabled, the API would have no "
                       "admin left. Make an admin key for another team first (qlora admin create-key TEAM --admin), "
                       "or revoke these keys if no admin should use the API", code="last_admin")


def _pause(session: Session, job) -> bool:
    """Ask one of the team's jobs on a GPU to pause, as its team would (jobs.service.pause): True if it is
    pausing now because of this. A job being cancelled goes on to its end; one being preempted for another
    team stays paused once stopped, not queued again."""
    message = ("paused: an admin disabled the team; the training process saves a checkpoint after its current "
               "step and stops. It stays paused (checkpoints kept) until the team, enabled again, resumes it")
    if job.status == states.RUNNING:
        if not jobs.transition(session, job.id, states.PAUSING, attempt=job.attempt, only_from=[states.RUNNING],
                               preempting=False):
            return False  # it ended, or its worker was lost, meanwhile: nothing to pause
    elif not (job.status == states.PAUSING and jobs.keep_paused(session, job.id)):
        return False
    jobs.add_event(session, job.id, "pause_requested", "warning", message, attempt=job.attempt)
    return True


def enable_team(session: Session, name: str, *, caller: Caller | None = None) -> TeamOut:
    """Lift the refusal and the hold: the team's keys work again (within QLORA_KEY_CACHE_S) and its queued jobs
    start in their turn (the scheduler sends them). Its paused jobs stay paused. Enabled already: as it is.
    `caller`: the admin key asking over HTTP (None: `qlora admin`). A disabled team's own admin key is refused
    the 401 its team gets: an API process that read it before the disable still trusts it for
    QLORA_KEY_CACHE_S, and a team that could enable itself would not be disabled."""
    team = lock_team(session, team_named(session, name).id)
    if caller is not None and caller.team_id == team.id and team.disabled_at is not None:
        raise team_disabled(team)
    team.disabled_at = team.disabled_by = team.disabled_reason = None
    session.flush()
    return show_team(session, team)
