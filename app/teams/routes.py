from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.db import after_commit
from app.deps import AdminDep, SessionDep
from app.jobs.schemas import JobPage, job_page_json
from app.routing import CheckedJSONRoute
from app.teams import admin
from app.teams.schemas import DisableTeam, TeamDisabled, TeamOut

router = APIRouter(tags=["teams"], route_class=CheckedJSONRoute)


@router.get("/admin/teams", response_model=list[TeamOut])
def list_teams(session: SessionDep, _: AdminDep):
    """Every team (admin keys): its live keys, jobs queued, running and paused, GPU-hours this month, storage
    kept, and whether it is disabled."""
    return admin.list_teams(session)


@router.post("/admin/teams/{team}/disable", response_model=TeamDisabled)
def disable_team(team: str, request: Request, session: SessionDep, caller: AdminDep, body: DisableTeam | None = None):
    """Disable a team (admin keys): its keys answer 401, its queued jobs do not start, its running jobs pause
    at a checkpoint; nothing of it is deleted. Refused (409) for the caller's own team and for the last team
    whose admin keys work. The body is optional: `{"reason": "..."}` is shown to admins and to the team."""
    disabled = admin.disable_team(session, team, caller=caller, reason=body.reason if body else None)
    # This process forgets the team's keys once the change is committed; the others within QLORA_KEY_CACHE_S.
    after_commit(session, lambda: request.app.state.callers.forget_team(disabled.id))
    return disabled


@router.get("/admin/teams/{team}/jobs", response_model=JobPage)
def list_team_jobs(team: str, session: SessionDep, _: AdminDep, status: str | None = None, cursor: str | None = None,
                   limit: int = 50):
    """A team's jobs, newest first, paged as the team's own GET /jobs (admin keys): a disabled team's too,
    whose keys answer 401. 404 for a team that does not exist."""
    found = admin.jobs_of_team(session, team, status, cursor, limit)
    return Response(job_page_json(found.data, found.next_cursor), media_type="application/json")


@router.post("/admin/teams/{team}/enable", response_model=TeamOut)
def enable_team(team: str, session: SessionDep, caller: AdminDep):
    """Enable a disabled team again (admin keys of another team): its keys work and its queued jobs start in
    their turn; its paused jobs stay paused until it resumes them."""
    return admin.enable_team(session, team, caller=caller)
