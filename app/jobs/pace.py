"""How far a running job has left to go, at the pace of its current attempt: what GET /jobs/{id} and /v1's
jobs.retrieve() show as `estimated_finish` (jobs.service.estimated_finish), and what the monthly budget counts a
running job for (scheduling.service.team_shares). One function, so that the time a team is told its job ends and
the time its budget holds back for it are the same."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from app.jobs import states

LAST_SHOWN_S = datetime(9999, 12, 31, tzinfo=UTC).timestamp()  # a datetime (and a client's calendar) ends there


def finish_s(status: str, total_steps: int | None, points: Sequence[tuple[int, datetime]]) -> float | None:
    """When the job's last step is expected, in unix seconds: the time between the attempt's first and newest train
    points (`points`: (step, logged at), as jobs.repository.train_points_since reads them) over the steps between
    them, carried on from the newest point to the job's total. None where that is not known: a job not running (a
    pausing or cancelling one stops early), one whose attempt has logged fewer than two points (or two at one step),
    or one without a total (before the worker counts it). Merging and the eval report come after the last step.
    In seconds, not a datetime, so a pace that ends past any calendar (a worker's clock that jumped a day between two
    points, millions of steps left) is a number still: the budget counts such a job for all its time limit leaves."""
    if status != states.RUNNING or not total_steps or len(points) < 2 or points[1][0] <= points[0][0]:
        return None
    (first_step, first_at), (last_step, last_at) = points[0], points[1]
    per_step_s = (last_at - first_at).total_seconds() / (last_step - first_step)
    return last_at.timestamp() + per_step_s * max(total_steps - last_step, 0)


def finish_at(status: str, total_steps: int | None, points: Sequence[tuple[int, datetime]]) -> datetime | None:
    """finish_s as a time to show; None also past the year 9999 (no estimate rather than a 500 at every poll)."""
    finish = finish_s(status, total_steps, points)
    return None if finish is None or finish > LAST_SHOWN_S else datetime.fromtimestamp(finish, UTC)
