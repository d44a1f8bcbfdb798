"""Every query on jobs and their events, metrics, checkpoints and artifacts. Status changes are compare-and-set.

A team reads through readable_jobs(team_id): every read the API serves takes the team and builds on
it, jobs by narrowing it, a job's events, metrics, checkpoints and artifacts by `job_id IN (that job,
if the team's)`, so a read that forgets the team cannot be written. The reads without a team say whom
they are for: the worker and the reaper, which act for whichever team owns the job, and the
operators' aggregates.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import cast

import sqlalchemy as sa
from sqlalchemy import BindParameter, CursorResult, Row, Select, String, Text, Update, bindparam, delete, func, select, update
from sqlalchemy.orm import Session, aliased

from app.db import UTCDateTime, database_now, insert_for, utcnow
from app.jobs import states
from app.jobs.tables import Artifact, Checkpoint, Job, JobEvent, JobMetric, QuantizedBase
from app.pagination import newest_first, newest_first_shape, newest_first_values


def readable_jobs(team_id: str | BindParameter[str]) -> Select[Job]:
    """The jobs a team may read: where every team-facing read of jobs and of what they own starts."""
    return select(Job).where(Job.team_id == team_id)


def _readable_job_id(team_id: str, job_id: str) -> Select:
    """The job's id if the team may read it (else nothing): the scope of a read of its rows."""
    return readable_jobs(team_id).with_only_columns(Job.id).where(Job.id == job_id)


def get(session: Session, team_id: str, job_id: str) -> Job | None:
    return session.scalars(readable_jobs(team_id).where(Job.id == job_id)).one_or_none()


def readable_id(session: Session, team_id: str, job_id: str) -> str | None:
    """The job's id if the team may read it: whether it is there, without reading the row."""
    return session.scalar(_readable_job_id(team_id, job_id))


# What a job's answer shows (JobOut), for the reads every poller makes: plain rows, no ORM object made
# and tracked per job, and the JSON columns as the text the database holds, which the answer embeds as
# it is (schemas.job_json) instead of decoding and encoding it again: a page of fifty jobs holds fifty
# specs and summaries (docs/performance.md). A page of jobs shows all of it but the heartbeat (schemas.JobListItem).
JOB_LIST_VIEW = (Job.id, Job.name, sa.cast(Job.user_metadata, Text).label("metadata"), Job.status, Job.base_model,
                 Job.dataset_id, Job.validation_dataset_id, Job.initial_job_id, sa.cast(Job.spec, Text).label("spec"),
                 Job.queue, Job.attempt, Job.trained_tokens, Job.error, sa.cast(Job.summary, Text).label("summary"),
                 Job.created_at, Job.started_at, Job.finished_at, Job.step, Job.total_steps, Job.priority, Job.preemptions,
                 Job.phase)
JOB_VIEW = (*JOB_LIST_VIEW, Job.heartbeat_at)
# Built once: a status poll binds its team and job into it rather than building and caching a statement.
_VIEW_BY_ID = readable_jobs(bindparam("team_id", type_=String)).with_only_columns(*JOB_VIEW).where(Job.id == bindparam("job_id"))


def view(session: Session, team_id: str, job_id: str) -> Row | None:
    return session.connection().execute(_VIEW_BY_ID, {"team_id": team_id, "job_id": job_id}).one_or_none()


def view_page(session: Session, team_id: str, status: str | None, cursor: str | None, limit: int) -> list[Row]:
    return list(session.connection().execute(_view_page(by_status=bool(status), after=bool(cursor)),
                                             _view_page_values(team_id, status, cursor, limit)))


def view_page_spec_chars(session: Session, team_id: str, status: str | None, cursor: str | None,
                         limit: int) -> list[int]:
    """The length of each spec on view_page's page of `limit` jobs (and the one past it), read without the specs."""
    values = _view_page_values(team_id, status, cursor, limit)
    return list(session.connection().scalars(_view_page(by_status=bool(status), after=bool(cursor), sizes=True), values))


def _view_page_values(team_id: str, status: str | None, cursor: str | None, limit: int) -> dict:
    values = {"team_id": team_id, **newest_first_values(cursor, limit)}
    if status:
        values["status"] = status
    return values


# A spec's length in characters, as the database holds it (JSON text): what a page of jobs weighs.
SPEC_CHARS = func.coalesce(func.length(sa.cast(Job.spec, Text)), 0)


@functools.cache
def _view_page(*, by_status: bool, after: bool, sizes: bool = False) -> Select:
    """GET /jobs's statement in each of its four shapes, built once like _VIEW_BY_ID: building it for
    each poll was a sixth of a page's time in the profile. With `sizes`, each job's SPEC_CHARS instead."""
    query = readable_jobs(bindparam("team_id", type_=String)).with_only_columns(*((SPEC_CHARS,) if sizes else JOB_LIST_VIEW))
    if by_status:
        query = query.where(Job.status == bindparam("status", type_=String))
    return newest_first_shape(query, Job, after=after)


def get_any_team(session: Session, job_id: str) -> Job | None:
    """For the worker, which acts for whichever team owns the job."""
    return session.get(Job, job_id)


def unfinished_on_model_any_team(session: Session, base_model: str) -> dict[str, int]:
    """For an admin removing a base model: how many jobs of every team, by status, have not finished on it."""
    rows = session.execute(sa.select(Job.status, sa.func.count()).where(
        Job.base_model == base_model, Job.status.in_(states.ACTIVE)).group_by(Job.status))
    return {status: count for status, count in rows}


def unfinished_on_model_locked(session: Session, base_model: str) -> list[Job]:
    """For an admin removing a base model by force: the unfinished jobs of every team on it, their rows locked in
    id order (after the model's row, as a job's creation takes the model's and then writes its own)."""
    return list(session.scalars(select(Job).where(Job.base_model == base_model, Job.status.in_(states.ACTIVE))
                                .order_by(Job.id).with_for_update()))


ANY_METADATA: Mapping[str, str] = MappingProxyType({})  # list_page's `metadata` that filters nothing


def list_page(session: Session, team_id: str, status: str | None, cursor: str | None, limit: int,
              metadata: Mapping[str, str] | None = ANY_METADATA) -> list[Job]:
    """A page of the team's jobs; with `metadata`, only those whose metadata holds each of its pairs,
    and with None only those that have none (OpenAI's metadata[k]=v and metadata=null)."""
    return list(session.scalars(_page_of(_listed(session, team_id, metadata), status, cursor, limit)))


def list_page_spec_chars(session: Session, team_id: str, status: str | None, cursor: str | None, limit: int,
                         metadata: Mapping[str, str] | None = ANY_METADATA) -> list[int]:
    """The length of each spec on list_page's page of `limit` jobs (and the one past it), read without the jobs."""
    query = _listed(session, team_id, metadata).with_only_columns(SPEC_CHARS)
    return list(session.scalars(_page_of(query, status, cursor, limit)))


def _listed(session: Session, team_id: str, metadata: Mapping[str, str] | None) -> Select[Job]:
    query = readable_jobs(team_id)
    if metadata is None:
        return query.where(sa.or_(Job.user_metadata.is_(None), sa.cast(Job.user_metadata, Text) == "null"))
    dialect = session.get_bind().dialect.name
    return query.where(*(_metadata_holds(dialect, key, value) for key, value in metadata.items()))


def _metadata_holds(dialect: str, key: str, value: str) -> sa.ColumnElement[bool]:
    """The job's metadata maps `key` to `value`. Postgres' ->> takes the key as a parameter. SQLite's
    JSON paths ($."key") miss a key holding a quote or any non-ASCII character (the column stores
    "\\u00e9" for "é", and the path is matched against that text), so there the pairs are read with
    json_each, which decodes them. Neither uses an index: the team's jobs are all read."""
    if dialect == "sqlite":
        pairs = func.json_each(Job.user_metadata).table_valued("key", "value")
        return sa.exists().where(pairs.c.key == key, pairs.c.value == value)
    return Job.user_metadata[key].as_string() == value


def _page_of(query: Select, status: str | None, cursor: str | None, limit: int) -> Select:
    if status:
        query = query.where(Job.status == status)
    return newest_first(query, Job, cursor, limit)


def transition(session: Session, job_id: str, to: str, *, attempt: int | None = None,
               only_from: Iterable[str] | None = None, silent_before: datetime | None = None, **values) -> bool:
    """UPDATE jobs SET status=:to ... WHERE id=:id AND status IN (legal sources) [AND attempt=:attempt]
    [AND its last sign of life < :silent_before].

    True if this call made the change. False means someone else changed the job first (or, with
    `attempt`, that the caller's lease on the job is gone; with `silent_before`, that its worker spoke since):
    the caller must not act as if it won. `silent_before` is the reaper's: a heartbeat written after it read
    the job silent, and before this, keeps the job with its worker (the update reads the row as it is now).
    """
    sources = tuple(only_from) if only_from is not None else states.sources_of(to)
    query = update(Job).where(Job.id == job_id, Job.status.in_(sources))
    if attempt is not None:
        query = query.where(Job.attempt == attempt)
    if silent_before is not None:
        query = query.where(_last_sign_of_life() < silent_before)
    if to == states.QUEUED:
        # It waits for a worker from now, whatever it did before; by the database's clock, which every host reads
        # alike: a worker requeueing a job dated it by its own, and an API host read that wait off by the skew.
        values.setdefault("queued_at", database_now(session))
    return _rows_changed(session, query.values(status=to, **values)) == 1


def lock(session: Session, job_id: str) -> None:
    """The job's row locked until the commit (on SQLite a no-op: its writers go one at a time)."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def claim(session: Session, job_id: str, worker: str, now, token: str | None = None) -> int | None:
    """queued → running, taking the next attempt number, marked with the claim's `token` (landed_claim). Returns
    the attempt, or None if not claimable."""
    changed = _rows_changed(session, update(Job)
                            .where(Job.id == job_id, Job.status == states.QUEUED)
                            .values(status=states.RUNNING, attempt=Job.attempt + 1, worker=worker, claim_token=token,
                                    started_at=func.coalesce(Job.started_at, now), claimed_at=now, heartbeat_at=now,
                                    error=None, preempting=False, continuing=False))
    if changed != 1:
        return None
    return session.scalar(select(Job.attempt).where(Job.id == job_id))


def set_phase(session: Session, job_id: str, attempt: int, phase: str) -> None:
    """What the attempt does now (worker/training/protocol.PHASES); only this attempt's word counts."""
    session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt).values(phase=phase))


def landed_claim(session: Session, token: str) -> Job | None:
    """The job a claim marked `token` took, while that attempt still runs (a worker-owned state). Few jobs run at
    once, so the status index finds it; only a claim tried again asks."""
    return session.scalars(select(Job).where(Job.status.in_(states.WORKER_OWNED), Job.claim_token == token)).first()


def claimed_with(session: Session, tokens: Collection[str]) -> list[Job]:
    """The jobs the claims marked `tokens` took, while those attempts still run (a worker-owned state), of every team:
    for a `serve` requeueing what its home's dead local worker held. Rows locked in id order before any attempt is
    ended, as stale_jobs takes them and for the same reason."""
    if not tokens:
        return []
    return list(session.scalars(select(Job).where(Job.status.in_(states.WORKER_OWNED), Job.claim_token.in_(tokens))
                                .order_by(Job.id).with_for_update()))


def preempt(session: Session, job_id: str, attempt: int, *, counted: bool = True) -> bool:
    """running → pausing, to be queued again once paused (requeue_preempted), fenced by the attempt the
    caller saw: for another team's job (counted in `preemptions`), or, not counted, because its worker
    is shutting down (runs.hand_back)."""
    values: dict = {"status": states.PAUSING, "preempting": True}
    if counted:
        values["preemptions"] = Job.preemptions + 1
    return _rows_changed(session, update(Job)
                         .where(Job.id == job_id, Job.attempt == attempt, Job.status == states.RUNNING)
                         .values(**values)) == 1


def preempting(session: Session, job_id: str, attempt: int) -> bool:
    """Whether the attempt is being paused to be queued again (preempted, or handed back by its worker)."""
    return bool(session.scalar(select(Job.preempting).where(Job.id == job_id, Job.attempt == attempt)))


def requeue_preempted(session: Session, job_id: str, attempt: int) -> bool:
    """paused → queued, only for a job the scheduler preempted (not one its team paused). It is continuing: the
    monthly budget does not hold it back (policy.claim_order)."""
    return _rows_changed(session, update(Job)
                         .where(Job.id == job_id, Job.attempt == attempt, Job.status == states.PAUSED,
                                Job.preempting.is_(True))
                         .values(status=states.QUEUED, preempting=False, continuing=True, worker=None,
                                 dispatched_at=None, queued_at=database_now(session))) == 1


def keep_paused(session: Session, job_id: str) -> bool:
    """The team paused a job the scheduler is preempting: once paused it stays so, not queued again."""
    return _rows_changed(session, update(Job).where(Job.id == job_id, Job.preempting.is_(True),
                                                    Job.status.in_((states.PAUSING, states.PAUSED)))
                         .values(preempting=False)) == 1


def touch(session: Session, job_id: str, attempt: int, **values) -> bool:
    """A fenced write by the job's current runner (heartbeat, progress). False: the lease is gone."""
    return _rows_changed(session, update(Job)
                         .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(states.WORKER_OWNED))
                         .values(**values)) == 1


def _rows_changed(session: Session, statement: Update) -> int:
    """Run a compare-and-set UPDATE; how many rows matched says whether this caller won."""
    result = session.execute(statement.execution_options(synchronize_session=False))
    return cast(CursorResult, result).rowcount


def status_of(session: Session, job_id: str) -> tuple[str, int] | None:
    """For the worker: the status of the job it runs, read between steps (cancelling means: stop)."""
    row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    return (row[0], row[1]) if row else None


def add_event(session: Session, job_id: str, type: str, level: str = "info", message: str = "", *,
              attempt: int = 0, step: int | None = None, data: dict | None = None,
              at: datetime | None = None) -> JobEvent:
    """Dated `at`, or by the database's clock (database_now): as the job's claimed_at and heartbeats are, and the
    metric points the /v1 feed orders events among. On the writer's own clock (a worker's, an API host's), an
    event of a worker an hour behind sorted an hour before the points logged beside it."""
    event = JobEvent(job_id=job_id, attempt=attempt, type=type, level=level, step=step, message=message, data=data,
                     created_at=database_now(session) if at is None else at)
    session.add(event)
    return event


def events_told(session: Session, job_id: str, attempt: int) -> set[tuple[str, int | None, str]]:
    """For the worker: (type, step, message) of each event the attempt has recorded."""
    rows = session.execute(select(JobEvent.type, JobEvent.step, JobEvent.message)
                           .where(JobEvent.job_id == job_id, JobEvent.attempt == attempt))
    return {(row[0], row[1], row[2]) for row in rows}


def has_event(session: Session, job_id: str, type: str, attempt: int) -> bool:
    return session.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.attempt == attempt,
                                                    JobEvent.type == type).limit(1)) is not None


def events(session: Session, team_id: str, job_id: str, after: int | None, limit: int) -> list[JobEvent]:
    """The job's events oldest first, after the event with id `after`."""
    query = select(JobEvent).where(JobEvent.job_id.in_(_readable_job_id(team_id, job_id)))
    if after is not None:
        query = query.where(JobEvent.id > after)
    return list(session.scalars(query.order_by(JobEvent.id).limit(limit)))


def upsert_metric(session: Session, job_id: str, values: dict, at: datetime | None = None) -> None:
    """Insert a point of the curve, or replace the one at the same (kind, step): a step redone
    after a resume must not appear twice. Dated `at`, or by the database's clock (database_now), the redone step
    anew: the job's pace in its current attempt (pace.finish_at) reads the points logged since its claimed_at,
    which is the database's clock. On a worker's own clock, one an hour behind left the estimate unknown for the
    attempt's first hour, and one ahead counted the earlier attempt's points and the wait between attempts."""
    insert = insert_for(session)
    row = {"job_id": job_id, **values, "created_at": database_now(session) if at is None else at}
    stmt = insert(JobMetric).values(**row)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["job_id", "kind", "step"],
        set_={k: stmt.excluded[k] for k in row if k not in ("job_id", "kind", "step")},
    ))


def delete_metrics_after(session: Session, job_id: str, step: int) -> None:
    """For the worker: points past a checkpoint belong to work that was lost; the resumed run logs them again."""
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > step))


def losses_at(session: Session, job_id: str, step: int) -> tuple[float | None, float | None]:
    """For the worker: the train loss last logged at or before step, and the eval loss measured at
    step, if any (what a new checkpoint is recorded with)."""
    train = session.scalar(select(JobMetric.train_loss).where(
        JobMetric.job_id == job_id, JobMetric.kind == "train", JobMetric.step <= step)
        .order_by(JobMetric.step.desc()).limit(1))
    eval_ = session.scalar(select(JobMetric.eval_loss).where(
        JobMetric.job_id == job_id, JobMetric.kind == "eval", JobMetric.step == step))
    return train, eval_


def metrics(session: Session, team_id: str, job_id: str, kind: str, columns: Sequence[str], after: int,
            limit: int, through: int | None = None) -> Sequence[Row]:
    """The first `limit` points of one series (kind train or eval) past step `after` (-1: from its start), by
    step, as tuples of `columns`. Each series is its own walk of the (job_id, kind, step) index that stops
    after `limit` rows: one query ordered by (step, kind) over both sorted every point of the job first (2.2 s
    of SQL at 510,000 points), a page or not. Tuples of the columns a page shows, not ORM rows: building an
    ORM object per point, then a pydantic model from it, was most of a page's cost (bench/curve_bench.py)."""
    # On the session's connection: core rows, without the ORM's loading of each (a third of the query's cost).
    query = (select(*(getattr(JobMetric, column) for column in columns))
             .where(JobMetric.job_id.in_(_readable_job_id(team_id, job_id)), JobMetric.kind == kind, JobMetric.step > after))
    if through is not None:
        query = query.where(JobMetric.step <= through)
    return session.connection().execute(query.order_by(JobMetric.step).limit(limit)).all()


def metric_extent(session: Session, team_id: str, job_id: str) -> dict[str, tuple[int, int, int]]:
    """For each series of the curve that has points (train, eval): (points, first step, last step), from the
    (job_id, kind, step) index alone."""
    return {kind: (count, first, last) for kind, count, first, last in session.connection().execute(
        select(JobMetric.kind, func.count(), func.min(JobMetric.step), func.max(JobMetric.step))
        .where(JobMetric.job_id.in_(_readable_job_id(team_id, job_id))).group_by(JobMetric.kind))}


def metric_buckets(session: Session, team_id: str, job_id: str, kind: str, loss_column: str, first: int, width: int,
                   through: int, from_step: int | None = None) -> list[tuple[int, int, int | None, int | None, int, int]]:
    """One series cut into buckets of `width` steps from step `first` (up to `through`; from `from_step` on, a
    bucket's first step, where given): for each bucket with points, by step, its first and last step, the first
    step of its lowest and of its highest loss (None where no point of it has a loss), its count of points and
    the id of its last point (what the thinned view's kept buckets check against: app/jobs/thinned.py). One
    aggregating pass in the database, then a few index lookups a bucket, one row a bucket out: the rows never
    come to Python (a pass over 510,000 of them there held the API's event loop for seconds)."""
    loss = getattr(JobMetric, loss_column)
    readable = JobMetric.job_id.in_(_readable_job_id(team_id, job_id))
    in_series = [readable, JobMetric.kind == kind, JobMetric.step <= through]
    if from_step is not None:  # the (job_id, kind, step) index read from there on: the cost of the buckets read only
        in_series.append(JobMetric.step >= from_step)
    bucket_of = (JobMetric.step - first) // width
    per_bucket = (select(func.min(JobMetric.step).label("head"), func.max(JobMetric.step).label("tail"),
                         func.min(loss).label("low"), func.max(loss).label("high"), func.count().label("points"))
                  .where(*in_series).group_by(bucket_of).subquery())
    # Each bucket's steps of its lowest and highest loss and its last point's id: correlated subqueries, each a
    # range (or one entry) of the (job_id, kind, step) index per bucket, so a cost linear in the points whatever
    # the planner believes. Joining the points to their bucket on `(step - first) / width = bucket` instead had
    # Postgres, with statistics older than the points (a running job's), estimate a few rows and loop over
    # every bucket for every point: 0.6-1 s at 20,000 points, quadratic (bench/curve_bench.py --buckets). The
    # points are the job's by id: the buckets they are read for are the readable job's only.
    in_bucket = [JobMetric.job_id == job_id, JobMetric.kind == kind,
                 JobMetric.step.between(per_bucket.c.head, per_bucket.c.tail)]

    def first_step_where(*where) -> sa.ScalarSelect:
        return select(func.min(JobMetric.step)).where(*in_bucket, *where).scalar_subquery()

    tail_id = (select(JobMetric.id).where(JobMetric.job_id == job_id, JobMetric.kind == kind,
                                          JobMetric.step == per_bucket.c.tail).scalar_subquery())
    query = (select(per_bucket.c.head, per_bucket.c.tail, first_step_where(loss == per_bucket.c.low),
                    first_step_where(loss == per_bucket.c.high), per_bucket.c.points, tail_id)
             .order_by(per_bucket.c.head))
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return [tuple(row) for row in connection.execute(query)]
    # Without JIT compilation, for this statement only: Postgres cannot tell how many buckets `(step - first) / width`
    # makes and takes one a point, and the cost it then expects (three subqueries a bucket) is past jit_above_cost:
    # compiling took 200 ms, running 10 (20,000 points, fresh statistics: bench/curve_bench.py --buckets).
    # In a transaction the setting is the transaction's (it goes back at its end if the statement fails: a statement
    # put back in a `finally` there raised "transaction aborted" in place of the statement's own error). In
    # autocommit (app.db.read_only, the thinned route's reads) it is the connection's, put back whatever happens.
    dbapi_connection = connection.connection.dbapi_connection
    autocommit = bool(dbapi_connection is not None and dbapi_connection.autocommit)
    jit = connection.execute(select(func.current_setting("jit"),
                                    func.set_config("jit", "off", not autocommit))).scalar_one()
    if autocommit:
        try:
            return [tuple(row) for row in connection.execute(query)]
        finally:
            if not connection.invalidated:  # a dropped connection is not given back to the pool
                connection.execute(select(func.set_config("jit", jit, False)))
    rows = [tuple(row) for row in connection.execute(query)]
    connection.execute(select(func.set_config("jit", jit, True)))
    return rows


def metric_ids_only_grow(session: Session) -> bool:
    """Whether a point written gets an id past every id a point ever had (what the thinned view's kept buckets
    tell a deleted and rewritten point by): on Postgres, from a sequence that never hands one out twice. SQLite
    gives a new row the largest id + 1 (a rowid table, no AUTOINCREMENT): after a resume deleted a job's newest
    points, the points it logs again take their ids back."""
    return session.get_bind().dialect.name == "postgresql"


def newest_metric_id(session: Session, team_id: str, job_id: str) -> int:
    """The highest id of the job's points (0: none), from the (job_id, id) index: a point written later has a
    higher one (each series' points are written by the one attempt that holds the job, one report at a time)."""
    return session.connection().execute(select(func.coalesce(func.max(JobMetric.id), 0)).where(
        JobMetric.job_id == _readable_job_id(team_id, job_id).scalar_subquery())).scalar_one()  # curve_changes: why =


_TRAIN_POINTS_SINCE = (
    select(JobMetric.step, JobMetric.created_at)
    .where(JobMetric.job_id == readable_jobs(bindparam("team_id", type_=String)).with_only_columns(Job.id)
           .where(Job.id == bindparam("job_id")).scalar_subquery(),
           JobMetric.kind == "train", JobMetric.created_at >= bindparam("since", type_=UTCDateTime())).limit(1))
# Built once, as _VIEW_BY_ID: jobs.retrieve() polls them.
_FIRST_TRAIN_POINT_SINCE = _TRAIN_POINTS_SINCE.order_by(JobMetric.created_at, JobMetric.id)
_NEWEST_TRAIN_POINT_SINCE = _TRAIN_POINTS_SINCE.order_by(JobMetric.created_at.desc(), JobMetric.id.desc())


def train_points_since(session: Session, team_id: str, job_id: str, since: datetime) -> list[tuple[int, datetime]]:
    """(step, created_at) of the job's first and newest train points logged at or after `since` (none, one or
    two), each one seek of the (job_id, created_at, id) index, however long the curve: what the job's pace in
    its current attempt is read from (jobs.retrieve() polls it)."""
    values = {"team_id": team_id, "job_id": job_id, "since": since}
    first = session.connection().execute(_FIRST_TRAIN_POINT_SINCE, values).first()
    if first is None:
        return []
    newest = session.connection().execute(_NEWEST_TRAIN_POINT_SINCE, values).one()
    return [(first.step, first.created_at), (newest.step, newest.created_at)]


@dataclass(frozen=True)
class CurveChanges:
    """What changed of a job's curve since its points up to id `since` were read (curve_changes)."""

    ends: dict[str, tuple[int, int]]  # each series with points: its first and last step
    newest_id: int  # the highest id of its points (0: none)
    earliest_new_step: int | None  # the lowest step of a point with an id past `since` (None: no such point)
    ids_at: dict[tuple[str, int], int | None]  # the id of the point at each (kind, step) asked (None: none there)


def curve_changes(session: Session, team_id: str, job_id: str, since: int,
                  at: Sequence[tuple[str, int]]) -> CurveChanges:
    """In one statement (one snapshot), each an index's ends or range, so a cost with no term in the curve's
    length: each series' first and last step ((job_id, kind, step)), the newest point's id and the lowest step
    of the points past id `since` ((job_id, id): the points written since, only), and the id of the point at
    each of `at` (the unique (job_id, kind, step))."""
    # `= (the job's id if readable)`, not `IN (...)`: an equality to one value that Postgres's planner can take the
    # ends of an index with (min/max as a one-row index scan); with IN, each aggregate read all of the job's points.
    readable = JobMetric.job_id == _readable_job_id(team_id, job_id).scalar_subquery()

    def one(column, *where) -> sa.ScalarSelect:
        return select(column).where(readable, *where).scalar_subquery()

    def end(kind: str, order) -> sa.ScalarSelect:
        # ORDER BY ... LIMIT 1, not min()/max(): Postgres takes an aggregate's ends of the index only where it
        # estimates that cheaper, and with statistics older than the points (a running job's) it estimated one
        # row and read all of the series (20,000 index entries a poll, tests/service/test_curve_pages.py).
        return select(JobMetric.step).where(readable, JobMetric.kind == kind).order_by(order).limit(1).scalar_subquery()

    kinds = ("train", "eval")
    columns = [end(kind, order) for kind in kinds for order in (JobMetric.step, JobMetric.step.desc())]
    columns += [one(func.coalesce(func.max(JobMetric.id), 0)), one(func.min(JobMetric.step), JobMetric.id > since)]
    columns += [one(JobMetric.id, JobMetric.kind == kind, JobMetric.step == step) for kind, step in at]
    row = session.connection().execute(select(*columns)).one()
    ends = {kind: (row[2 * n], row[2 * n + 1]) for n, kind in enumerate(kinds) if row[2 * n] is not None}
    return CurveChanges(ends, row[4], row[5], dict(zip(at, row[6:], strict=True)))


def metrics_at(session: Session, team_id: str, job_id: str, kind: str, columns: Sequence[str],
               steps: Sequence[int]) -> list[Row]:
    """The points of one series at these steps, by step, as tuples of `columns`: a few hundred steps a query,
    under every backend's limit on bound parameters."""
    rows: list[Row] = []
    for start in range(0, len(steps), 500):
        rows += session.connection().execute(
            select(*(getattr(JobMetric, column) for column in columns))
            .where(JobMetric.job_id.in_(_readable_job_id(team_id, job_id)), JobMetric.kind == kind,
                   # The range too: with statistics older than the points Postgres took the IN list as a filter
                   # on all of the series, not as the index's bounds (20,000 entries for the few steps of a poll).
                   JobMetric.step.between(min(steps[start:start + 500]), max(steps[start:start + 500])),
                   JobMetric.step.in_(steps[start:start + 500])).order_by(JobMetric.step)).all()
    return rows


def artifacts(session: Session, team_id: str, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id.in_(_readable_job_id(team_id, job_id)))
                                .order_by(Artifact.kind)))


def artifact(session: Session, team_id: str, job_id: str, kind: str) -> Artifact | None:
    return session.scalars(select(Artifact).where(
        Artifact.job_id.in_(_readable_job_id(team_id, job_id)), Artifact.kind == kind)).one_or_none()


def put_artifact(session: Session, job_id: str, kind: str, storage_key: str, size: int, sha256: str) -> str | None:
    """The job's artifact of this kind, added or replacing one an earlier attempt stored before it was
    lost; the replaced one's storage key, or None."""
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind))
    if row is None:
        session.add(Artifact(job_id=job_id, kind=kind, storage_key=storage_key, bytes=size, sha256=sha256))
        return None
    if row.storage_key == storage_key:
        # This very record, tried again (worker/supervisor.py) after its commit went through but the answer was
        # lost with the connection: the object is the one recorded, and not to be deleted as a replaced one.
        return None
    replaced = row.storage_key
    row.storage_key, row.bytes, row.sha256, row.created_at = storage_key, size, sha256, utcnow()
    return replaced


def delete_artifacts_except(session: Session, job_id: str, kinds: Collection[str]) -> list[str]:
    """For the worker: the job's artifacts of any other kind than `kinds` deleted; their storage keys."""
    rows = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind.not_in(kinds))))
    for row in rows:
        session.delete(row)
    return [row.storage_key for row in rows]


def stale_jobs(session: Session, cutoff: datetime) -> list[Job]:
    """For the reaper: jobs a worker owns whose worker has been silent since before cutoff, of every
    team; a job that never sent a heartbeat counts from its claim. Their rows are locked, in id order, before
    the reaper ends any attempt (which takes the job's team's row: usage.ledger): a job ending takes its own row,
    then its team's, and so must the reaper, all its jobs' rows first. Taking them one job at a time, the reaper
    held one team's row (its first job's end) while it waited for another job of that team, whose worker, back
    from silence, held that job's row and waited for the team's: Postgres ended one with "deadlock detected"
    (the reaper's whole pass, or the worker's end, rolled back). A job whose row another transaction holds (its
    worker, back, ending it) is left to the next pass rather than waited for: a transaction a frozen host left open
    on one job's row would otherwise hold up the reaping of every job. On SQLite the lock is a no-op: its writers go
    one at a time."""
    return list(session.scalars(
        select(Job).where(Job.status.in_(states.WORKER_OWNED), _last_sign_of_life() < cutoff)
        .order_by(Job.id).with_for_update(skip_locked=True)))


def _last_sign_of_life() -> sa.ColumnElement:
    return func.coalesce(Job.heartbeat_at, Job.started_at)


def mark_dispatched(session: Session, job_id: str, now: datetime) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.status == states.QUEUED)
                    .values(dispatched_at=now).execution_options(synchronize_session=False))


def add_checkpoint(session: Session, job_id: str, attempt: int, step: int, key: str, size: int, sha256: str,
                   train_loss: float | None, eval_loss: float | None, tokens_seen: int | None = None) -> Checkpoint:
    """A new checkpoint, or the same step saved again by a later attempt (it replaces the old row)."""
    old = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)).one_or_none()
    if old is not None:
        session.delete(old)
        session.flush()
    row = Checkpoint(job_id=job_id, attempt=attempt, step=step, storage_key=key, bytes=size, sha256=sha256,
                     train_loss=train_loss, eval_loss=eval_loss, tokens_seen=tokens_seen)
    session.add(row)
    return row


def checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    """For the worker (resume, pruning), which acts for whichever team owns the job; a team reads
    readable_checkpoints."""
    return _checkpoints(session, Checkpoint.job_id == job_id)


def readable_checkpoints(session: Session, team_id: str, job_id: str) -> list[Checkpoint]:
    return _checkpoints(session, Checkpoint.job_id.in_(_readable_job_id(team_id, job_id)))


def _checkpoints(session: Session, of_job) -> list[Checkpoint]:
    """Oldest first: the newest is the one a resume starts from."""
    return list(session.scalars(select(Checkpoint).where(of_job).order_by(Checkpoint.step)))


def checkpoint(session: Session, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    """For the worker: one checkpoint of the job it runs."""
    return session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                    Checkpoint.id == checkpoint_id)).one_or_none()


def delete_checkpoint(session: Session, checkpoint: Checkpoint) -> None:
    session.delete(checkpoint)


def delete_all_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    """Every checkpoint row of the job, deleted; the rows as they were (their keys and sizes)."""
    rows = checkpoints(session, job_id)
    for row in rows:
        session.delete(row)
    return rows


def active_jobs_starting_from(session: Session, team_id: str, job_id: str, active_statuses: tuple[str, ...]) -> list[Job]:
    """The team's jobs not yet finished whose adapter starts as this job's (initial_job_id)."""
    return list(session.scalars(readable_jobs(team_id).where(Job.initial_job_id == job_id,
                                                             Job.status.in_(active_statuses))))


def recorded_storage_keys(session: Session, keys: Collection[str]) -> set[str]:
    """Which of these storage keys a checkpoint or a quantized base's row names."""
    if not keys:
        return set()
    named = select(Checkpoint.storage_key).where(Checkpoint.storage_key.in_(keys)).union(
        select(QuantizedBase.storage_key).where(QuantizedBase.storage_key.in_(keys)))
    return set(session.scalars(named))


def delete_checkpoints_after(session: Session, job_id: str, step: int) -> list[str]:
    """Checkpoints past the one a resume starts from describe a run that is being redone."""
    rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step > step)))
    for row in rows:
        session.delete(row)
    return [row.storage_key for row in rows]


def metrics_after(session: Session, team_id: str, job_id: str, after_id: int, limit: int,
                  columns: Sequence[str]) -> Sequence[Row]:
    """Points written after the one with id `after_id`, in write order: the cursor of a live view. As tuples
    (id, kind, *columns), core rows as a curve page reads them: an ORM object per point, then a model from it,
    was most of what a stream's history cost (bench/curve_bench.py --streams).
    A point logged again after a resume is a new row, so a view following the cursor sees it again."""
    return session.connection().execute(
        select(JobMetric.id, JobMetric.kind, *(getattr(JobMetric, column) for column in columns))
        .where(JobMetric.job_id.in_(_readable_job_id(team_id, job_id)), JobMetric.id > after_id)
        .order_by(JobMetric.id).limit(limit)).all()


def metric_id_before_step(session: Session, team_id: str, job_id: str, step: int) -> int:
    """A point id to read on from with metrics_after() to meet every point of a step past `step`: just
    before the first such point, or the last point written when there is none yet (those still to come
    are written later). A point of an earlier step may still lie past it (one logged again after a resume);
    the reader skips it by its step."""
    readable = JobMetric.job_id.in_(_readable_job_id(team_id, job_id))
    first_past = session.scalar(select(func.min(JobMetric.id)).where(readable, JobMetric.step > step))
    if first_past is not None:
        return first_past - 1
    return session.scalar(select(func.max(JobMetric.id)).where(readable)) or 0


def newest_row_ids(session: Session, team_id: str, job_id: str) -> tuple[int, int]:
    """The ids of the job's newest metric point and newest event (0 where it has none), as a live view's
    cursors count them: where a stream that has seen everything stands."""
    newest = [select(func.max(table.id)).where(table.job_id.in_(_readable_job_id(team_id, job_id))).scalar_subquery()
              for table in (JobMetric, JobEvent)]
    metric, event = session.execute(select(*newest)).one()
    return metric or 0, event or 0


def count_active_by_status(session: Session) -> dict[str, int]:
    """For the operators' /metrics: jobs not finished yet, by status, over every team. The index on
    status finds them without reading the finished ones, however many there are."""
    return dict(session.execute(
        select(Job.status, func.count()).where(Job.status.in_(states.ACTIVE)).group_by(Job.status)).all())


def count_active_by_team(session: Session, team_ids: Collection[str]) -> dict[str, dict[str, int]]:
    """For the admins' list of teams: each team's jobs not finished yet, by status (teams with none absent)."""
    counts: dict[str, dict[str, int]] = {}
    rows = session.execute(select(Job.team_id, Job.status, func.count())
                           .where(Job.status.in_(states.ACTIVE), Job.team_id.in_(team_ids)).group_by(Job.team_id, Job.status))
    for team_id, status, count in rows:
        counts.setdefault(team_id, {})[status] = count
    return counts


def worker_owned_of_team(session: Session, team_id: str) -> list[Job]:
    """The team's jobs holding a GPU (running, pausing, cancelling), for disabling it (app/teams/admin.py),
    their rows locked in id order: before the team's row, as a job ending takes them (its own row, then its
    team's in usage.ledger); the other order deadlocks with it on Postgres. On SQLite the lock is a no-op:
    its writers go one at a time."""
    return list(session.scalars(select(Job).where(Job.team_id == team_id, Job.status.in_(states.WORKER_OWNED))
                                .order_by(Job.id).with_for_update()))


def waiting_by_queue(session: Session) -> dict[str, tuple[int, datetime]]:
    """For the operators (/metrics, `qlora admin status`), over every team: each queue's queued jobs, and
    since when the longest-waiting of them waits (it last entered the queue, else it was created)."""
    since = func.min(func.coalesce(Job.queued_at, Job.created_at), type_=UTCDateTime())
    rows = session.execute(select(Job.queue, func.count(), since).where(Job.status == states.QUEUED).group_by(Job.queue))
    return {queue: (count, oldest) for queue, count, oldest in rows}


def finished_between(session: Session, since: datetime | None,
                     until: datetime | None) -> list[tuple[str, datetime | None, datetime]]:
    """For the operators' /metrics: (status, started_at, finished_at) of the jobs of every team that
    finished in [since, until) (open on a side given None), found through the index on finished_at.
    started_at is None for a job cancelled before a worker claimed it."""
    query = select(Job.status, Job.started_at, Job.finished_at).where(
        Job.status.in_(states.FINISHED), Job.finished_at.is_not(None))
    if since is not None:
        query = query.where(Job.finished_at >= since)
    if until is not None:
        query = query.where(Job.finished_at < until)
    return cast(list[tuple[str, datetime | None, datetime]], [tuple(row) for row in session.execute(query)])


def running_devices(session: Session) -> list[tuple[str, int, float | None]]:
    """For the operators' /metrics: (worker, latest peak device memory, latest GPU utilisation) for each
    job a worker is training now, of every team. Only those jobs' newest train points are read, each
    through the (job, kind, step) index: never the loss curves of every job."""
    point = aliased(JobMetric)
    newest_step = (select(func.max(point.step))
                   .where(point.job_id == Job.id, point.kind == "train").correlate(Job).scalar_subquery())
    rows = session.execute(
        select(Job.worker, JobMetric.peak_memory_bytes, JobMetric.gpu_utilization)
        .join(JobMetric, (JobMetric.job_id == Job.id) & (JobMetric.kind == "train") & (JobMetric.step == newest_step))
        .where(Job.status.in_(states.WORKER_OWNED)))
    return [(worker or "unknown", memory or 0, utilization) for worker, memory, utilization in rows]


def quantized_base(session: Session, key: str) -> QuantizedBase | None:
    return session.scalars(select(QuantizedBase).where(QuantizedBase.key == key)).one_or_none()


def add_quantized_base(session: Session, key: str, storage_key: str, size: int, sha256: str, identity: dict) -> bool:
    """Record a cache entry; False when another job recorded the same key first (keep theirs). Its times are the
    database's clock, which the reaper prunes by (quantized_cache.prune)."""
    row = quantized_base(session, key)
    if row is not None:
        # The same object: this very record, tried again (worker/supervisor.py) after its commit went through but
        # the answer was lost with the connection. Kept: deleted as another job's duplicate, the entry would name
        # an object gone, and every later job would fail to fetch it (a 65B base: 35 GB quantized again).
        return row.storage_key == storage_key
    now = database_now(session)
    session.add(QuantizedBase(key=key, storage_key=storage_key, bytes=size, sha256=sha256, identity=identity,
                              created_at=now, last_used_at=now))
    return True


def mark_quantized_base_used(session: Session, key: str, now: datetime) -> bool:
    """One UPDATE by the unique key; False when there is no such entry (a miss, or pruned meanwhile)."""
    statement = (update(QuantizedBase).where(QuantizedBase.key == key).values(last_used_at=now)
                 .execution_options(synchronize_session=False))
    return cast(CursorResult, session.execute(statement)).rowcount == 1


def drop_quantized_base(session: Session, key: str, storage_key: str) -> bool:
    """Forget the entry `key` if it is still the one stored under `storage_key`: an entry stored again under
    the same key since (after a prune, by a job that quantized afresh) is another object, and stays."""
    statement = delete(QuantizedBase).where(QuantizedBase.key == key, QuantizedBase.storage_key == storage_key)
    return cast(CursorResult, session.execute(statement)).rowcount == 1


def quantized_bases(session: Session) -> list[QuantizedBase]:
    """Every cache entry, least recently used first (the table holds one row per model, version and class)."""
    return list(session.scalars(select(QuantizedBase).order_by(QuantizedBase.last_used_at, QuantizedBase.key)))


def delete_quantized_bases_unused_since(session: Session, used_before: datetime) -> list[QuantizedBase]:
    """Delete every entry last used before `used_before`, in one statement, and return what was deleted.
    The condition is the statement's own, so an entry a job marks used meanwhile stays (on Postgres a DELETE
    that waits for that job's UPDATE checks the row again once it commits)."""
    statement = (delete(QuantizedBase).where(QuantizedBase.last_used_at < used_before)
                 .returning(QuantizedBase).execution_options(synchronize_session=False))
    return list(session.scalars(statement))


# The OpenAI events list shows the job's events and its metric points as one feed, newest first, ordered
# by (created_at, rank, id): at the same moment an event (rank 1) is newer than a point (rank 0).
EVENT_RANK, METRIC_RANK = 1, 0


def feed_key(session: Session, team_id: str, job_id: str, table: type[JobEvent] | type[JobMetric],
             row_id: int) -> tuple[datetime, int, int] | None:
    """Where an event or a point of the team's job sits in the feed; None when it is not the job's."""
    created = session.scalar(select(table.created_at).where(
        table.job_id.in_(_readable_job_id(team_id, job_id)), table.id == row_id))
    return None if created is None else (created, EVENT_RANK if table is JobEvent else METRIC_RANK, row_id)


def feed_before(session: Session, team_id: str, job_id: str, table: type[JobEvent] | type[JobMetric],
                key: tuple[datetime, int, int] | None, limit: int) -> list:
    """The job's events (or metric points) older in the feed than `key`, newest first: read from the index
    (job_id, created_at, id) backwards, `limit` rows whatever the length of the job's curve."""
    query = select(table).where(table.job_id.in_(_readable_job_id(team_id, job_id)))
    if key is not None:
        created, rank, row_id = key
        own = EVENT_RANK if table is JobEvent else METRIC_RANK
        if own < rank:
            query = query.where(table.created_at <= created)
        elif own == rank:
            # A row comparison, not (created_at < c OR (created_at = c AND id < i)): Postgres seeks the index
            # (job_id, created_at, id) to it, where the OR is a filter over every newer row of the job (a page deep
            # in a curve of 500,000 points read 450,000 rows to skip them).
            query = query.where(sa.tuple_(table.created_at, table.id) < sa.tuple_(created, row_id))
        else:
            query = query.where(table.created_at < created)
    return list(session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit)))
