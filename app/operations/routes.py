"""GET /metrics in Prometheus' text format, for the operators' dashboards and alerts.

Aggregates only (no team's names or ids), so it needs no key: scrapers rarely carry one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from app.db import allow_long_statements
from app.deps import SessionDep, SettingsDep
from app.operations import service
from app.routing import CheckedJSONRoute
from app.shares import SharesNow

router = APIRouter(tags=["operations"], route_class=CheckedJSONRoute)


async def shares_now(request: Request) -> SharesNow:
    """This process's team shares, read on the event loop that changes them (an async dependency runs there;
    the route's thread could see them mid-change)."""
    return request.app.state.team_shares.now()


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, session: SessionDep, settings: SettingsDep, shares: Annotated[SharesNow, Depends(shares_now)]):
    """Costs the same with ten finished jobs or a hundred thousand (see service.FinishedJobs). A process's first
    scrape reads the whole history once: bounded by QLORA_API_LONG_STATEMENT_TIMEOUT_S, not the requests' bound."""
    allow_long_statements(session, settings.api_long_statement_timeout_s)
    text = service.prometheus_text(session, request.app.state.finished_jobs, settings, shares)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
