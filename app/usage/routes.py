from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CallerDep, SessionDep
from app.routing import CheckedJSONRoute
from app.usage import service
from app.usage.schemas import UsageReport

router = APIRouter(tags=["usage"], route_class=CheckedJSONRoute)

WHEN = "An ISO 8601 date (its UTC midnight) or datetime (UTC unless it names its offset; in a URL write + as %2B)."


@router.get("/usage", response_model=UsageReport)
def usage(session: SessionDep, caller: CallerDep,
          from_: Annotated[str | None, Query(alias="from", description=f"{WHEN} Default: the start of this month (UTC).",
                                             examples=["2025-05-01"])] = None,
          to: Annotated[str | None, Query(description=f"{WHEN} Excluded. Default: now.", examples=["2025-06-01"])] = None,
          all_teams: Annotated[bool, Query(description="Every team's usage, not only yours: admin keys only.")] = False):
    """GPU time (from each attempt's claim to its end: pauses excluded, a running attempt up to now) and
    trained tokens in [from, to), by job and by UTC day, and the storage the team keeps now. At most
    366 days at once. With all_teams=true (an admin key), every team."""
    return service.report(session, caller, from_, to, all_teams)
