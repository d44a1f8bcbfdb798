from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, IdMixin, UTCDateTime, new_id, utcnow


class Job(IdMixin, Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_team_created", "team_id", "created_at", "id"),)

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # Up to 16 short key/value strings of the caller's own (the OpenAI API's `metadata`).
    user_metadata: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSON)  # the engine's JobSpec as validated at creation
    base_model: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True)
    validation_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True)
    # The ids the job was created with, kept when the dataset is deleted (the two above turn null): the job was
    # trained on it, and an OpenAI client reads back the training_file it sent. Null in a row an older release
    # inserted during a rolling upgrade (the view falls back to dataset_id), or backfilled (0024) after a delete.
    created_dataset_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_validation_dataset_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The finished job (of the same team) whose adapter this one starts from: SFT, then DPO from it.
    # Kept when that job is deleted (SET NULL would erase the lineage): it names what the adapter grew from.
    initial_job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    queue: Mapped[str] = mapped_column(String(100))
    # Incremented by every claim; a worker's writes carry it, so a worker that lost the job
    # (the job was requeued under it) can no longer change it: a fencing token.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Workers lost so far (a pause and resume also takes a new attempt, but loses nothing).
    lost_workers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The token of the claim that took the current attempt, one per claim a worker makes: a claim tried again after
    # its connection dropped finds by it the job its first try took, if that commit landed (runs.landed_claim).
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    # What the running attempt is doing (worker/training/protocol.PHASES), from the worker's newest "phase" event:
    # past the last step a job still evaluates, saves, merges, reports and uploads, for minutes to hours.
    phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # The eval report of a job that succeeded (worker/training/report.py): also stored as its "report"
    # artifact, kept here to be served without a trip to storage. Never in the job's own answer (JOB_VIEW).
    report: Mapped[dict | None] = mapped_column(JSON, nullable=True, deferred=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When a "job X is ready" message was last handed to the broker; null while it still has to be
    # (the broker was down at creation, or the job was just requeued): the reaper sends those.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the job last entered the queue again (requeued, resumed); null: it waits since its creation. How
    # long it has waited for a worker, for the operators (/metrics, `qlora admin status`): created_at alone
    # would count a requeued job's whole past as waiting.
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Within its team: 0 low, 1 normal, 2 high (app/scheduling/policy.PRIORITIES).
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # When the current attempt was claimed: its GPU time counts from here (JobAttempt has every attempt).
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The scheduler asked this running job to pause for another team's: once paused, it is queued again.
    preempting: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa.false())
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Queued again by the service mid-run (preempted, handed back by a stopping worker, its worker lost, out of
    # memory), until its next claim: it goes on past its team's monthly GPU-hour budget, which holds back starts,
    # not work under way (app/scheduling/policy.py). A team's own resume of a job it paused is a start.
    continuing: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa.false())


class JobAttempt(Base):
    """One attempt of a job on a GPU, from its claim to its end (finished, paused, preempted, or its
    worker lost): the usage ledger. A pause ends an attempt and a resume starts the next, so paused
    time is never counted."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_job_attempts_job_attempt"),
                      Index("ix_job_attempts_team_claimed", "team_id", "claimed_at"),
                      Index("ix_job_attempts_ended", "ended_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # Denormalised from the job: usage is read per team and period, over jobs of every status.
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(100))
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # null: still running
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)  # the job's state when it ended
    # Tokens this attempt trained (the job's count at its end less at its start; a resumed attempt
    # that redoes steps after its checkpoint counts them again: the GPU did that work twice).
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_at_claim: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class JobEvent(Base):
    __tablename__ = "job_events"
    # A live stream reads a job's events past the last id it sent (migration 0010); the OpenAI events list reads
    # the newest first by (created_at, id) (0025). Either serves the foreign key's cascade: no index on job_id alone.
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),
                      Index("ix_job_events_job_created", "job_id", "created_at", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    type: Mapped[str] = mapped_column(String(50))
    level: Mapped[str] = mapped_column(String(10))  # info | warning | error
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobMetric(Base):
    """One point of the loss curve. (job, kind, step) is unique: a step redone after a resume
    replaces its point instead of doubling it."""

    __tablename__ = "job_metrics"
    # A live stream reads past the last id it sent (0010); the OpenAI events list, which shows each point as an
    # event, reads the newest first by (created_at, id): without its index, a sort of all of a job's points per
    # page (0.6 s for 500,000, migration 0025). No index on job_id alone: each of these three leads with it.
    __table_args__ = (UniqueConstraint("job_id", "kind", "step", name="uq_job_metrics_job_kind_step"),
                      Index("ix_job_metrics_job_id_id", "job_id", "id"),
                      Index("ix_job_metrics_job_created", "job_id", "created_at", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))  # train | eval
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    grad_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_seen: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    gpu_utilization: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0..1, where NVML reports it
    # method dpo (worker/training/protocol.py TrainPoint): null for sft
    reward_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_chosen: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_rejected: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_margin: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    # (job_id, bytes): a team's stored bytes (quota, usage) are summed from its jobs' rows read from this index
    # alone, not from a scan of every team's rows (migration 0025).
    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_artifacts_job_kind"),
                      Index("ix_artifacts_job_bytes", "job_id", "bytes"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # adapter | merged | report
    storage_key: Mapped[str] = mapped_column(String(300))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Checkpoint(Base):
    """A complete training checkpoint in object storage. The row is written only after the upload
    has finished, so a resume can never pick a half-written one."""

    __tablename__ = "checkpoints"
    # (job_id, bytes): as for artifacts, a team's checkpoint bytes summed from this index alone (migration 0025).
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),
                      Index("ix_checkpoints_job_bytes", "job_id", "bytes"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(300))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Tokens trained up to this step (None: saved before they were recorded): an attempt that resumes from it
    # counts its tokens from here, the steps it redoes included (app/usage/ledger.py).
    tokens_seen: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QuantizedBase(Base):
    """A base model already quantized, in object storage: later jobs on the same model, revision and
    quantization load it instead of reading and quantizing the full weights (time to first step)."""

    __tablename__ = "quantized_bases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of what identifies the weights
    storage_key: Mapped[str] = mapped_column(String(300))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    identity: Mapped[dict] = mapped_column(JSON)  # what the key was made from, for people reading the table
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Set when stored and whenever a job loads it: an entry no job used for QLORA_QUANTIZED_CACHE_KEEP_DAYS is
    # pruned (app/jobs/quantized_cache.py). Keys change with library versions and weights, so old ones never hit again.
    # The server default is for workers of a release before migration 0020 still storing entries (0023).
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=sa.text("CURRENT_TIMESTAMP"))
