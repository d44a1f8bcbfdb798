"""The thinned view's completed buckets, kept between requests (GET /jobs/{id}/metrics?points=N).

The view cuts a curve's steps into buckets of a fixed width from its first step (app/jobs/service.py,
thinned_curve). Summing them up in SQL reads every point of the curve: about 1.2 s of Postgres at 510,000
points, asked every 30 s by each open dashboard tab of a long job and by each `qlora jobs watch`, so a
hundred people watching one long run saturated the database. A bucket before the one holding the curve's
last step is complete: a running job logs steps in order, so no point lands in it again, and the points it
kept are the same on every poll. So a process keeps, per (job, points), the kept points of the completed
buckets, and a poll reads only what is past them (the buckets from the first one not complete) and a check
that what is kept still holds, from indexes' ends (repository.curve_changes): no term in the curve's length.

What is kept stops holding, and the view is computed whole again (as it was on every poll before), when:
- the bucket width or the first step changed (the curve grew past a multiple of N/8 steps: every bucket's
  bounds move; once every N/8 steps of growth, one full computation per process and (job, points));
- the job's attempt changed (a resume: points past its checkpoint are deleted and logged again);
- the point at the last step kept of a series is gone or is another row (its id): points are only deleted
  as a suffix by step (repository.delete_metrics_after, a resume), so any deletion reaching into the
  completed buckets takes that point with it;
- a point written since (an id past the newest one read then) has a step inside the completed buckets.
The ids checked are Postgres's: a sequence that never hands one out twice, and a job's points are written by
one report at a time (each holds the job's row from its first statement: repository.touch), so the points of
a job with ids up to the newest read were all there to read. SQLite gives a new row the largest id + 1, so a
point deleted and logged again can take its id back: on the embedded database the view is computed whole each
time (repository.metric_ids_only_grow). A point rewritten in place (the upsert on (job, kind, step)) keeps its
id: that is the worker's report sent again after its commit went unheard, with the very values; a step is
logged once per attempt otherwise (the final evaluation is not a second point at an eval step: recipe.evaluate).

Bounded: at most MAX_KEPT_POINTS points kept in all (least recently used entries go first), each point a
tuple of the answer's 13 columns (~0.3 KB measured, under 0.5 KB with every column set: under 40 MB per process
at the bound); an entry holds fewer than the view's `points` (5,000 at most) and a few numbers. A view whose
kept points alone pass the bound is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Points kept in all, per process: a dashboard's view is ~2,000 of them, a terminal's ~1,000, so ~40 views of
# long jobs watched at once keep their buckets; more only costs one view's whole computation per poll, as before.
MAX_KEPT_POINTS = 80_000


@dataclass(frozen=True)
class Kept:
    """One series' kept points in the completed buckets."""

    rows: tuple[tuple, ...]  # the points kept, by step, as the answer's column tuples
    points: int  # the series' points in the completed buckets (for curve_points)
    last: tuple[int, int] | None  # (step, id) of the series' last point in them; None: it has none there


@dataclass(frozen=True)
class Completed:
    """A (job, points) view's completed buckets: 0 .. buckets - 1 of `width` steps from step `first`."""

    attempt: int
    first: int
    width: int
    buckets: int
    newest_id: int  # the newest point's id when they were read: a point with a higher one was written since
    series: dict[str, Kept]

    @property
    def through(self) -> int:
        """The first step past the completed buckets."""
        return self.first + self.buckets * self.width

    @property
    def size(self) -> int:
        return sum(len(kept.rows) for kept in self.series.values())

    def last_points(self) -> list[tuple[str, int]]:
        """(kind, step) of each series' last kept point: the points whose ids say nothing was deleted."""
        return [(kind, kept.last[0]) for kind, kept in self.series.items() if kept.last is not None]

    def holds(self, attempt: int, first: int, width: int, earliest_new_step: int | None,
              ids_at: dict[tuple[str, int], int | None]) -> bool:
        """Whether these buckets are still the curve's, for a view of `width` from `first` (see the module)."""
        return (attempt == self.attempt and first == self.first and width == self.width
                and (earliest_new_step is None or earliest_new_step >= self.through)
                and all(ids_at.get((kind, kept.last[0])) == kept.last[1]
                        for kind, kept in self.series.items() if kept.last is not None))


def completed_after(known: Completed | None, attempt: int, first: int, width: int, last: int, newest_id: int,
                    read: Mapping[str, tuple[Sequence[tuple[int, int, int, int]], Sequence[Sequence]]]) -> Completed:
    """`known` (None: nothing yet) and the buckets read past it, as the completed ones now: those before the
    bucket of the curve's last step. `read`: for each series, its buckets read past `known` ((first step, last
    step, points, id of the last point) each, by step) and the points kept of them, by step."""
    buckets = max((last - first) // width, known.buckets if known else 0)
    through = first + buckets * width
    series = {}
    for kind, (bucketed, rows) in read.items():
        before = known.series[kind] if known else Kept((), 0, None)
        done = [bucket for bucket in bucketed if bucket[0] < through]
        series[kind] = Kept(before.rows + tuple(tuple(row) for row in rows if row[0] < through),
                            before.points + sum(points for _, _, points, _ in done),
                            (done[-1][1], done[-1][3]) if done else before.last)
    return Completed(attempt, first, width, buckets, newest_id, series)


class CompletedBuckets:
    """Completed buckets per (job id, points), least recently used dropped first past MAX_KEPT_POINTS points.
    Entries are immutable and replaced whole, under a lock: a view is read on the event loop (Postgres) or in a
    thread (SQLite)."""

    def __init__(self, max_points: int = MAX_KEPT_POINTS):
        self.max_points = max_points
        self._entries: OrderedDict[tuple[str, int], Completed] = OrderedDict()
        self._points = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> Completed | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, int], entry: Completed) -> None:
        with self._lock:
            self._pop(key)
            # An entry of no point (a view of 8 to 15 points has no completed bucket: one bucket, the last) saves its
            # next poll nothing, and counted as none toward the bound, such entries were never dropped: eight per job
            # whose curve is thinned, for the process's life.
            if entry.size == 0 or entry.size > self.max_points:
                return
            self._entries[key] = entry
            self._points += entry.size
            while self._points > self.max_points:
                self._pop(next(iter(self._entries)))

    def drop(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._pop(key)

    def kept_points(self) -> int:
        return self._points

    def __len__(self) -> int:
        return len(self._entries)

    def _pop(self, key: tuple[str, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._points -= entry.size
