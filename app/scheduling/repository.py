"""The scheduler's queries: what every team holds, and what waits and runs in one GPU class. They
read across teams by design (the scheduler weighs teams against each other); nothing here is answered
to a team as it is: a team sees only its own jobs' positions (service.standings)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Label, Row, Select, case, false, func, null, select, true, update
from sqlalchemy.orm import InstrumentedAttribute, Session, SessionTransaction

from app.jobs import states
from app.jobs.tables import Job, JobAttempt, JobMetric
from app.operations.tables import Worker
from app.teams.tables import Team


def teams(session: Session, team_ids: Collection[str] | None = None) -> list[Team]:
    query = select(Team)
    if team_ids is not None:
        query = query.where(Team.id.in_(team_ids))
    return list(session.scalars(query))


def running_claims(session: Session, team_ids: Collection[str] | None = None,
                   paced: Collection[str] | None = ()) -> list[Row]:
    """(team_id, claimed_at, status, total_steps, first_step, first_at, last_step, last_at) of every job holding a
    GPU (of these teams'), of every class: a team's share counts them all, and its budget what they have still to
    come. first_* and last_* are the first and newest train points logged since the claim (None: none yet), as
    jobs.repository.train_points_since reads them for one job: here as four correlated subqueries (a column each),
    each one seek of the (job_id, created_at, id) index, so that the pace of every running job (one per GPU) costs
    no statement more. Only for the jobs of the teams in `paced` (those with a monthly budget, the one rule that reads
    the pace; None: every team's, as where a default budget holds for all): the others' are None, and cost nothing
    (a CASE runs its subquery only for the rows it is asked for). On bench/scale_seed.py's database (50 jobs
    running) the statement took 0.3 ms before the pace; 0.65 ms with none asked, 1.5 ms with every job's (None), and
    3.7 ms with 200 teams named in `paced`."""
    claimed_at = func.coalesce(Job.claimed_at, Job.started_at)
    since = select(JobMetric).where(JobMetric.job_id == Job.id, JobMetric.kind == "train",
                                    JobMetric.created_at >= claimed_at).limit(1)
    first = since.order_by(JobMetric.created_at, JobMetric.id)
    newest = since.order_by(JobMetric.created_at.desc(), JobMetric.id.desc())
    is_paced = true() if paced is None else Job.team_id.in_(paced) if paced else false()

    def pace(point: Select, column: InstrumentedAttribute, name: str) -> Label:
        return case((is_paced, point.with_only_columns(column).scalar_subquery()), else_=null()).label(name)

    query = select(Job.team_id, claimed_at, Job.status, Job.total_steps,
                   pace(first, JobMetric.step, "first_step"), pace(first, JobMetric.created_at, "first_at"),
                   pace(newest, JobMetric.step, "last_step"), pace(newest, JobMetric.created_at, "last_at")
                   ).where(Job.status.in_(states.WORKER_OWNED))
    if team_ids is not None:
        query = query.where(Job.team_id.in_(team_ids))
    return list(session.execute(query))


def waiting(session: Session, queue: str) -> list[Row]:
    """(id, team_id, priority, created_at, dispatched_at, continuing) of the jobs queued in one GPU class."""
    return list(session.execute(select(Job.id, Job.team_id, Job.priority, Job.created_at, Job.dispatched_at,
                                       Job.continuing)
                                .where(Job.status == states.QUEUED, Job.queue == queue)))


def resuming(session: Session, team_ids: Collection[str]) -> dict[str, int]:
    """How many jobs of each of these teams will run again mid-run: queued again (continuing), or pausing or paused to
    be (preempting). Asked for the teams with a monthly budget only, which counts them (policy.TeamShare.resuming)."""
    again = ((Job.status == states.QUEUED) & Job.continuing.is_(True)) | \
        (Job.status.in_((states.PAUSING, states.PAUSED)) & Job.preempting.is_(True))
    return {team_id: count for team_id, count in session.execute(
        select(Job.team_id, func.count()).where(Job.team_id.in_(team_ids), again).group_by(Job.team_id))}


def queues_with_waiting(session: Session) -> list[str]:
    return list(session.scalars(select(Job.queue).where(Job.status == states.QUEUED).distinct()))


def running_in(session: Session, queue: str) -> list[Row]:
    """(id, team_id, priority, claimed_at, attempt, status, heard_at) of the jobs holding a GPU of one class;
    heard_at is its worker's last sign of life, as the reaper reads it (jobs.repository.stale_jobs)."""
    return list(session.execute(select(Job.id, Job.team_id, Job.priority, func.coalesce(Job.claimed_at, Job.started_at),
                                       Job.attempt, Job.status,
                                       func.coalesce(Job.heartbeat_at, Job.started_at).label("heard_at"))
                                .where(Job.status.in_(states.WORKER_OWNED), Job.queue == queue)))


def queue_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.queue).where(Job.id == job_id))


class Candidate:
    """The locks a claim takes for one candidate job (its team's row, then the job's row), in a savepoint of
    their own on Postgres, so that a candidate the claim passes over (its team disabled or at max_running, its
    job taken by another claim) gives them back at once; the one it takes keeps them to the commit.

    Held to the commit instead, a claim that passed over team A went on to wait for team B's row while holding
    A's, and two claims that had read the shares a moment apart (so in different orders) each held the row the
    other waited for: Postgres ended one with "deadlock detected", the worker's task failed with its message
    spent, and its GPU stood idle while a job it could have started waited for the scheduler to send the message
    again (QLORA_REDISPATCH_AFTER_S). Six claimers looping over four teams at max_running hit it 8 times in 40 s.

    SQLite has no row locks (one writer at a time, which a claim keeps to its commit either way), and pysqlite's
    RELEASE of a savepoint that opened the transaction commits it: there, no savepoint."""

    def __init__(self, session: Session):
        self._savepoint: SessionTransaction | None = (
            session.begin_nested() if session.get_bind().dialect.name == "postgresql" else None)

    def pass_over(self) -> None:
        if self._savepoint is not None:
            self._savepoint.rollback()

    def take(self) -> None:
        if self._savepoint is not None:
            self._savepoint.commit()  # RELEASE: the locks stay with the claim's transaction


def take_if_free(session: Session, job_id: str) -> bool:
    """Lock the queued job's row for this transaction unless another claim holds it: SKIP LOCKED on
    Postgres, so two workers choosing the same job do not queue up on it (the loser moves on to the
    next); SQLite has one writer at a time and ignores the clause. The claim after it is still the
    compare-and-set that decides."""
    return session.scalar(select(Job.id).where(Job.id == job_id, Job.status == states.QUEUED)
                          .with_for_update(skip_locked=True)) is not None


def forget_messages(session: Session, queue: str) -> None:
    """A worker took a message of this class and found no job it may start (every one held back by a
    quota): the messages of these jobs may be spent, so mark them unsent; the scheduler sends one
    again for each job once its team may start it."""
    session.execute(update(Job).where(Job.queue == queue, Job.status == states.QUEUED)
                    .values(dispatched_at=None).execution_options(synchronize_session=False))


def unsent(session: Session, queue: str, before: datetime | None = None) -> dict[str, bool]:
    """Queued jobs of the class with no message in the broker (dispatched_at null), or, with
    `before`, whose message went out before it (it may have been lost): each id with whether a message was sent."""
    condition = Job.dispatched_at.is_(None) if before is None else (Job.dispatched_at.is_(None) | (Job.dispatched_at < before))
    rows = session.execute(select(Job.id, Job.dispatched_at.is_not(None)).where(Job.queue == queue,
                                                                                 Job.status == states.QUEUED, condition))
    return {job_id: bool(sent) for job_id, sent in rows}


def idle_workers(session: Session, queue: str, alive_since: datetime) -> int:
    """Workers of the class that said they were up since `alive_since` (app/operations/workers.py) and hold no
    job now, by their name as jobs.worker records it."""
    busy = select(Job.worker).where(Job.status.in_(states.WORKER_OWNED), Job.worker.is_not(None))
    return session.scalar(select(func.count()).select_from(Worker).where(
        Worker.queue == queue, Worker.seen_at >= alive_since, Worker.name.not_in(busy))) or 0


def idle_throughout(session: Session, queue: str, alive_since: datetime, since: datetime) -> list[str]:
    """Names of the workers of the class that are up now (said so since `alive_since`), were up at `since`, hold no
    job, and claimed or ended no attempt after `since`: idle all that time, so any message of theirs in the broker
    since then would have been taken."""
    busy = select(Job.worker).where(Job.status.in_(states.WORKER_OWNED), Job.worker.is_not(None))
    active = select(JobAttempt.worker).where(JobAttempt.worker.is_not(None),
                                             (JobAttempt.claimed_at >= since) | (JobAttempt.ended_at >= since))
    return list(session.scalars(select(Worker.name).where(
        Worker.queue == queue, Worker.seen_at >= alive_since, Worker.started_at <= since,
        Worker.name.not_in(busy), Worker.name.not_in(active)).order_by(Worker.name)))


def last_worker_seen(session: Session, queue: str) -> Row | None:
    """(name, seen_at, device) of the worker of the class heard from last (app/operations/workers.py), or None when the
    class has no row: every worker of it stopped cleanly, was forgotten after a week of silence, or never ran."""
    return session.execute(select(Worker.name, Worker.seen_at, Worker.device).where(Worker.queue == queue)
                           .order_by(Worker.seen_at.desc()).limit(1)).first()
