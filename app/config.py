"""Settings: environment only (QLORA_*), checked at start.

With nothing set, everything lives under QLORA_HOME (~/.qlora): a SQLite database, a local
directory as object storage, and a Celery transport on the filesystem, so one machine needs no
server at all. Production points the same settings at Postgres, Redis and an S3-compatible store.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QLORA_", extra="ignore")

    home: Path = Field(Path("~/.qlora"), description="Where the embedded default keeps its database, files and queue.")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///$QLORA_HOME/qlora.db.")
    # file:///abs/path for a local directory, s3://bucket[/prefix] for S3-compatible storage.
    storage_url: str = Field("", description="Object storage; default file://$QLORA_HOME/storage.")
    s3_endpoint_url: str | None = Field(None, description="For MinIO and other S3-compatible stores.")
    s3_public_endpoint_url: str | None = Field(None, description="The store's address as users reach it, for "
                                               "download links; default the same as s3_endpoint_url.")
    s3_region: str = "us-east-1"
    # Presigned download links live long enough to start a download, not to be shared around.
    presign_expires_s: int = Field(900, ge=60, le=7 * 24 * 3600)
    broker_url: str = Field("", description="Celery broker; default a filesystem transport under $QLORA_HOME.")

    # json: one object per line with the job id (for log shippers); text: for reading in a terminal.
    log_format: Literal["json", "text"] = "json"

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = Field(2 * GIB, ge=1)

    # Jobs go to queue "gpu-<class>"; a worker listens to the queues of the GPU class it runs on.
    default_gpu_class: str = "default"
    # The GPU classes workers serve and each one's memory in GiB, e.g. {"l4": 24, "a100-80gb": 80}.
    # When set, a job is admitted only if its estimated peak fits one, and goes to the smallest that
    # fits; when empty (the embedded default), memory is not checked before a job runs.
    gpu_classes: dict[str, float] = Field(default_factory=dict)
    # The longest a job may train. The broker's visibility timeout is set above it, so a message
    # is never redelivered to a second worker while the first is still legitimately running.
    job_time_limit_s: int = Field(72 * 3600, ge=60)
    # Redis redelivers an unacknowledged message after this; 0 derives it from the time limit.
    broker_visibility_timeout_s: int = Field(0, ge=0)
    # The worker polls the training process this often: progress, metrics, cancel, heartbeat.
    supervise_interval_s: float = Field(1.0, gt=0, le=60)
    # A cancelled training process gets this long to stop after its current step before SIGKILL.
    cancel_grace_s: float = Field(120.0, gt=0)

    # A running job's worker writes a heartbeat every supervise interval. One silent for longer
    # than this has lost its worker (killed, partitioned, frozen): the reaper requeues the job and
    # it resumes from its newest checkpoint elsewhere; the old worker, if it wakes, is fenced out.
    heartbeat_deadline_s: float = Field(120.0, gt=0)
    # How often each API process looks for such jobs (0 turns its reaper off; `qlora reaper` runs one alone).
    reaper_interval_s: float = Field(15.0, ge=0)
    # A job that lost its worker this many times fails instead of trying again.
    max_attempts: int = Field(3, ge=1, le=100)
    # Checkpoints kept in object storage per job: the newest this many, plus the best by eval loss.
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    # An upload still in progress after this long belongs to a client or an API process that died:
    # its partial object (a temp file, a pending S3 multipart upload) is removed.
    stale_upload_s: float = Field(6 * 3600.0, gt=0)

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'qlora.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.home / 'storage'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.storage_url.startswith(("file://", "s3://")):
            raise ValueError(f"QLORA_STORAGE_URL must start with file:// or s3://, got {self.storage_url!r}")
        return self

    @property
    def task_time_limit_s(self) -> int:
        """Celery's hard limit for one job: training plus an hour to fetch data, merge and upload."""
        return self.job_time_limit_s + 3600

    @property
    def visibility_timeout_s(self) -> int:
        return self.broker_visibility_timeout_s or self.task_time_limit_s + 3600

    def check_timing(self) -> None:
        """The order that keeps exactly one runner per job, checked when a process starts.

        - supervise interval x 4 <= heartbeat deadline: a live worker is never taken for lost.
        - task time limit < broker visibility timeout: the broker redelivers a message only once
          the task holding it has surely ended. (A redelivery is harmless anyway: the claim is a
          compare-and-set, so this order is about not waking a second worker for nothing.)
        The heartbeat deadline is what recovers a lost worker's job, in seconds; the visibility
        timeout only ever hands out a message whose job is already settled.
        """
        if self.supervise_interval_s * 4 > self.heartbeat_deadline_s:
            raise ValueError(
                f"QLORA_HEARTBEAT_DEADLINE_S ({self.heartbeat_deadline_s}) must be at least 4x "
                f"QLORA_SUPERVISE_INTERVAL_S ({self.supervise_interval_s}), or healthy jobs would be requeued")
        if self.task_time_limit_s >= self.visibility_timeout_s:
            raise ValueError(
                f"QLORA_BROKER_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed the task time limit "
                f"(QLORA_JOB_TIME_LIMIT_S + 3600 = {self.task_time_limit_s}), or Redis would hand a running "
                "job's message to a second worker")

    @property
    def embedded(self) -> bool:
        """True when the queue needs no server: the worker must run on this machine."""
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def work_dir(self) -> Path:
        """Where a worker keeps a job's files while it trains."""
        return self.home / "work"

    @property
    def credentials_path(self) -> Path:
        """The embedded server writes its URL and first API key here; the CLI reads them."""
        return self.home / "credentials.json"

    def queue_for(self, gpu_class: str | None = None) -> str:
        return f"gpu-{gpu_class or self.default_gpu_class}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
