"""GET /metrics in Prometheus' text format, for the operators' dashboards and alerts.

Aggregates only (no team's names or ids), so it needs no key: scrapers rarely carry one.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from app.deps import SessionDep
from app.operations import service

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(session: SessionDep):
    return PlainTextResponse(service.prometheus_text(session), media_type="text/plain; version=0.0.4")
