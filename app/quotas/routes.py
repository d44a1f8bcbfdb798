from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from app.deps import AdminDep, CallerDep, SessionDep, SettingsDep
from app.quotas import service
from app.quotas.schemas import QuotaChanges, QuotaOut
from app.routing import CheckedJSONRoute

router = APIRouter(tags=["quotas"], route_class=CheckedJSONRoute)


@router.get("/quota", response_model=QuotaOut)
def own_quota(session: SessionDep, settings: SettingsDep, caller: CallerDep):
    """The quota of the key's team: the limits in force, which are its own (the rest are the
    deployment's defaults), and what it holds against them now."""
    return service.show_own(session, settings, caller.team_id)


@router.get("/admin/teams/{team}/quota", response_model=QuotaOut)
def team_quota(team: str, session: SessionDep, settings: SettingsDep, _: AdminDep):
    """Any team's quota and use (admin keys)."""
    return service.show(session, settings, team)


# The body is validated by service.set_quota, as `qlora admin set-quota`'s is, so that a value out of range is
# refused naming the field and what it allows; the schema documents it all the same.
@router.put("/admin/teams/{team}/quota", response_model=QuotaOut, openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": QuotaChanges.model_json_schema()}}}})
def set_team_quota(team: str, body: Annotated[dict[str, Any], Body()], session: SessionDep, settings: SettingsDep,
                   _: AdminDep):
    """Set a team's quota (admin keys): any of the five fields; null resets one to the deployment's
    default, and a field left out stays as it is."""
    return service.report(session, settings, service.set_quota(session, team, body))
