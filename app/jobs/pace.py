"""How far a running job has left to go, at the pace of its current attempt: what GET /jobs/{id} and /v1's
jobs.retrieve() show as `estimated_finish` (jobs.service.estimated_finish), and what the monthly budget counts a
running job for (scheduling.service.team_shares). One function, so that the time a team is told its job ends and
the time its budget holds back for it are the same."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from app.jobs import states


def finish_at(status: str, total_steps: int | None, points: Sequence[tuple[int, datetime]]) -> datetime | None:
    """When the job's last step is expected: the time between the attempt's first and newest train points
    (`points`: (step, logged at), as jobs.repository.train_points_since reads them) over the steps between them,
    carried on from the newest point to the job's total. None where that is not known: a job not running (a
    pausing or cancelling one stops early), one whose attempt has logged fewer than two points (or two at one step),
    or one without a total (before the worker counts it). Merging and the eval report come after the last step."""
    if status != states.RUNNING or not total_steps or len(points) < 2 or points[1][0] <= points[0][0]:
        return None
    (first_step, first_at), (last_step, last_at) = points[0], points[1]
    per_step = (last_at - first_at) / (last_step - first_step)
    try:
        return last_at + per_step * max(total_steps - last_step, 0)
    except OverflowError:  # past the year 9999 (a worker's clock that jumped between two points): not known
        return None
