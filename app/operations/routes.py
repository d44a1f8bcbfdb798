"""GET /metrics in Prometheus' text format, for the operators' dashboards and alerts.

Aggregates only (no team's names or ids), so it needs no key: scrapers rarely carry one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from app.deps import SessionDep, SettingsDep
from app.operations import service
from app.routing import CheckedJSONRoute

router = APIRouter(tags=["operations"], route_class=CheckedJSONRoute)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, session: SessionDep, settings: SettingsDep):
    """Costs the same with ten finished jobs or a hundred thousand (see service.FinishedJobs)."""
    text = service.prometheus_text(session, request.app.state.finished_jobs, settings)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
