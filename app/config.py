"""Settings: environment only (QLORA_*), checked at start.

With nothing set, everything lives under QLORA_HOME (~/.qlora): a SQLite database, a local
directory as object storage, and a Celery transport on the filesystem, so one machine needs no
server at all. Production points the same settings at Postgres, Redis and an S3-compatible store.
"""

from __future__ import annotations

import difflib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The range of a team's weight (its quota's, and QLORA_DEFAULT_WEIGHT): the most is 100,000 times the least. The
# least keeps a share a plain number: a share is GPU time used divided by the weight, and a weight of 1e-320 (taken
# while the range was only > 0) made it inf for any use at all, so that such teams tied however much each had used.
# A team meant to get nothing has max_running 0; at 0.01 a team gets a hundredth of a weight-1 team's GPU time
# while both have work waiting, and what the others leave free.
MIN_WEIGHT = 0.01
MAX_WEIGHT = 1000.0

GIB = 1024**3
MIB = 1024**2


# What QLORA_DATABASE_URL takes (Settings checks it; `qlora admin` names it where a URL fails).
DATABASE_URL_FORMS = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"


# QLORA_* variables that are not settings, read by name elsewhere: the client's (app/cli/api_client.py), the
# host-side directory docker-compose.yml mounts at /models, and the fault injections the fault tests set
# (app/db.py, worker/).
NOT_SETTINGS = {"QLORA_URL", "QLORA_API_KEY", "QLORA_MODELS_DIR"}
NOT_SETTINGS_PREFIXES = ("QLORA_FAULT_",)


def unknown_variables(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """What an operator set as QLORA_* that no setting reads, each with the setting it most likely meant. Left
    unread, a mistyped QLORA_DATABSE_URL put `qlora serve --no-worker` of a Postgres deployment on a SQLite file
    of its own (a first start's team, key and demo model made there), and a mistyped QLORA_BROKER_URL had a
    worker wait on a local queue no API sends to, counted alive all the while."""
    settings = {f"QLORA_{name.upper()}" for name in Settings.model_fields}
    unknown = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads names in any case
        if not upper.startswith("QLORA_") or upper in settings or upper in NOT_SETTINGS \
                or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        meant = difflib.get_close_matches(upper, sorted(settings), n=1, cutoff=0.75)
        unknown.append(f"{name} (did you mean {meant[0]}?)" if meant else name)
    return unknown


# What each setting given as JSON looks like, for the error that a value that is not JSON gets.
JSON_EXAMPLES = {"gpu_classes": "a JSON object of GiB by class, e.g. '{\"l4\": 22.49, \"h100\": 79.65}'",
                 "host_memory": "a JSON object of GiB by class, e.g. '{\"l4\": 40}'",
                 "extra_gpu_classes": "a JSON list of class names, e.g. '[\"a100\"]'",
                 "model_roots": "a JSON list of absolute directories, e.g. '[\"/models\"]'"}


SQLITE_URL_ESCAPES = str.maketrans({"%": "%25", "?": "%3F", "#": "%23"})


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite file at `path`. SQLAlchemy reads a `?` as the start of the URL's query
    and decodes `%XX`: with the path pasted in as it was, a QLORA_HOME such as `/data/run?1` or `/data/a%41` named
    another file than the home's qlora.db (`/data/run`, `/data/aA/qlora.db`), and `qlora serve` failed ("unable to
    open database file") or, worse, used a database outside its home. Those two are escaped (and `#`); the rest
    of the path stays as typed, as SQLAlchemy reads it back."""
    return "sqlite:///" + str(path).translate(SQLITE_URL_ESCAPES)


class Settings(BaseSettings):
    # An empty variable is as if unset: `QLORA_HOME=` (or a compose file's `${QLORA_HOME:-}`) would otherwise
    # put the database, the credentials and the demo model in whatever directory the command runs in.
    # hide_input_in_errors: a refused setting's message must not print the others (keys, passwords in URLs).
    model_config = SettingsConfigDict(env_prefix="QLORA_", extra="ignore", env_ignore_empty=True,
                                      hide_input_in_errors=True)

    home: Path = Field(Path("~/.qlora"), description="Where the embedded default keeps its database, files and queue.")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///$QLORA_HOME/qlora.db.")
    # file:///abs/path for a local directory, s3://bucket[/prefix] for S3-compatible storage.
    storage_url: str = Field("", description="Object storage; default file://$QLORA_HOME/storage.")
    s3_endpoint_url: str | None = Field(None, description="For MinIO and other S3-compatible stores.")
    s3_public_endpoint_url: str | None = Field(None, description="The store's address as users reach it, for "
                                               "download links; default the same as s3_endpoint_url.")
    s3_region: str = "us-east-1"
    # The API's address as users reach it, behind a TLS proxy: the base of the URLs the API answers (app/urls.py).
    public_url: str | None = Field(None, description="The API's address as users reach it (https://host[/path]); "
                                   "default the address each request came to.")
    # Presigned download links live long enough to start a download, not to be shared around.
    presign_expires_s: int = Field(900, ge=60, le=7 * 24 * 3600)
    broker_url: str = Field("", description="Celery broker; default a filesystem transport under $QLORA_HOME.")

    # json: one object per line with the job id (for log shippers); text: for reading in a terminal;
    # auto: text where stderr is a terminal, json elsewhere (a pipe, a file, a container).
    log_format: Literal["auto", "json", "text"] = "auto"

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port, which the OS picks (the benches and tests start so)
    # API processes `qlora serve` starts on one host, sharing its port (as uvicorn's and gunicorn's
    # workers do). Each has database pools of its own (app/db.py), so the database's max_connections
    # bounds this. Background loops (the reaper, the scheduler) work in one of them at a time: the lease holder.
    api_workers: int = Field(1, ge=1, le=64)
    max_upload_bytes: int = Field(2 * GIB, ge=1)
    # A request body a route reads whole (JSON: a job, a model): an API process holds about three
    # times it while parsing. The largest valid job is far below (256 eval prompts of 20,000 characters
    # are 5 MB in ASCII, 15 MB in UTF-8 Chinese); uploads stream, under max_upload_bytes instead.
    max_json_bytes: int = Field(16 * MIB, ge=64 * 1024)
    # Slow or silent clients (app/connections.py): a request's line and headers must arrive within
    # this long of the connection's opening, and a body that stops arriving for the second closes the
    # connection (time the server itself is not reading never counts), as does one that goes on arriving
    # for the second after its answer was sent (a GET's, read by no route), so none holds one without end.
    header_timeout_s: float = Field(30.0, gt=0, le=3600)
    body_idle_timeout_s: float = Field(60.0, gt=0, le=3600)
    # A client that stops reading its answer for this long has its connection closed, and what the API held
    # of the answer for it dropped (as nginx's send_timeout): an answer the API wrote and the client never read
    # stayed in the process's memory for as long as the client kept the connection open.
    send_idle_timeout_s: float = Field(60.0, gt=0, le=3600)
    # Connections one client (an IPv4 address, an IPv6 /64) may hold in one API process that have waited
    # 2 s or more for their request (silent, or mid-headers): past it, the newest from there is answered
    # 503 (app/connections.py).
    # A client's requests follow its connections at once; connections in a request or idle between two
    # are not counted. 0: no limit (behind a proxy that passes connections through from one address and
    # bounds each client itself; one that reads the request before connecting, as nginx does, is never counted).
    max_pending_connections_per_client: int = Field(256, ge=0)
    # Live job streams (GET /jobs/{id}/stream) one API key may hold open at once in one API process:
    # each holds a socket and polls the database every second. A dashboard tab or `qlora` watching a
    # job holds one; beyond the cap a stream answers 429.
    max_streams_per_key: int = Field(10, ge=1)
    # Uploads (POST /datasets, POST /v1/files) one API key may have in flight at once in one API process:
    # each holds a socket and, until it is stored, up to a storage part in memory (8 MiB on S3) for as
    # long as its client keeps sending, however slowly. A client uploading its files one at a time, or a
    # few at once, holds one or a few; beyond the cap an upload answers 429 before its body is read.
    max_uploads_per_key: int = Field(8, ge=1)
    # Downloads the API streams itself (a dataset's file, an artifact on local storage, a signed link's) one API
    # key may have in flight at once in one API process: each holds a socket, an open file or a connection to
    # the store, and up to a chunk (1 MiB) in memory for as long as its client reads, however slowly. A
    # download manager splitting a file into parts holds a few; beyond the cap a download answers 429.
    max_downloads_per_key: int = Field(16, ge=1)
    # Requests one API process has in progress at once, shared among the teams that have some (app/shares.py):
    # three quarters of them split equally among the busy teams, a quarter kept so a team that arrives starts
    # at once. With 8, a team alone holds 6, two busy teams 3 each. Small on purpose: a request in progress also
    # takes turns of the process's one event loop (and GIL), so another team's poll waits about as long as the
    # requests in progress beside it take: beside a team's 30 at once another team's polls took 11 to 17 times
    # as long as alone at the median, beside its 9 to 18 (24 slots) 4 times, beside its 3 to 6 (8 slots) 3.7 to 5
    # times (docs/performance.md). The process's CPU serves a lone team's polls about as fast with 6 in progress
    # as with 30. Under the database pool (16 + 8) and the 40 route threads: a team at its share never waits for
    # a connection another team's requests hold.
    request_slots: int = Field(8, ge=1)
    # How long an API process trusts what it read of an API key (its team, whether it is an admin key,
    # that it is not revoked) before reading it again: every poll would otherwise cost two queries. A
    # revoked key stops working within this long everywhere (at once in the process that revoked it).
    # A key refused (no such key, or revoked) is refused this long without a read (CallerCache.refused).
    # 0 reads the key on every request.
    key_cache_s: float = Field(2.0, ge=0, le=60)
    # How long an API process keeps the order of a GPU class's queued jobs (GET /jobs/{id}'s
    # queue_position and waiting_for) before reading it again: reading it weighs every waiting job and
    # every team's share, too much for each poll of a queued job. A position shown may be this old; a
    # job queued since is always placed. 0 reads the order on every poll.
    standings_cache_s: float = Field(1.0, ge=0, le=60)
    # Child processes per API process that tokenize a job's data for preflight (POST /jobs/preflight,
    # and POST /jobs's check that a job can learn): each holds a tokenizer library (~0.5 GB) once used;
    # more preflights than this at once wait. 0 turns preflight off (jobs are created unchecked).
    preflight_processes: int = Field(1, ge=0, le=16)

    # Jobs go to queue "gpu-<class>"; a worker listens to the queues of the GPU class it runs on.
    # The default class is where a job goes that names none and that admission does not place, and
    # what a worker started without --gpu-class serves; it must be a class workers serve.
    default_gpu_class: str = "default"
    # The GPU classes workers serve and each one's memory in GiB as the card reports it (nvidia-smi's MiB / 1024),
    # e.g. {"l4": 22.49, "h100": 79.65}: a "24 GB" L4 has 22.49 GiB, and admission's "auto" decisions hold the job to it.
    # When set, a job is admitted only if its estimated peak fits one, and goes to the smallest that
    # fits; when empty (the embedded default), memory is not checked before a job runs.
    gpu_classes: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # The host (CPU) memory in GiB a job on one GPU of a class may hold, by class, e.g. {"l4": 40, "h100": 200}: the
    # host's RAM shared among its GPUs, less what its processes take without a job. Activation offload pins a
    # step's kept activations there (8 GiB for Llama 3 8B at 32k tokens) and a paged optimizer's overflow pages
    # there; where a class's is given, admission counts both against it (a job needing more is refused, and
    # "auto" does not turn offload on past it). A class without one: host memory is not checked, and the
    # created event says so.
    host_memory: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # More classes workers serve, by name only, e.g. ["a100"]: a job may ask for one, and its memory is
    # not checked there. A job asking for a class that is in neither list (nor the default) is refused:
    # it would wait forever on a queue no worker listens to.
    extra_gpu_classes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Where base models may be registered from (POST /models, `qlora admin add-model --path`), e.g. ["/models"]:
    # a model's path must be a directory under one of these, on every host. Without it: <home>/models, the
    # service's own (where the demo model is built). An admin key may then name no other file of a host.
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Operator ceilings on what a spec may ask for, checked when a job is created (none: the spec's own
    # ranges). A longer sequence or a larger micro-batch needs more GPU memory than admission may know
    # of (a class without its memory configured, a model without config.json); more steps hold a GPU longer.
    max_seq_length: int | None = Field(None, ge=8)
    max_steps: int | None = Field(None, ge=1)
    # per_device_batch_size; "auto" is sized no larger where admission resolves it (GPU classes configured).
    max_micro_batch: int | None = Field(None, ge=1)
    # A paged optimizer's state (paged_adamw_*) may page to CPU memory when the GPU is full: admission
    # admits a job whose resident peak fits and whose overflow is at most this share of that state (1: all
    # of it may page, at the cost of moving it over PCIe each optimizer step; 0: the whole peak must fit).
    max_paged_fraction: float = Field(1.0, ge=0, le=1)
    # The longest one attempt of a job may take, from its claim to its final state (downloads, training
    # and uploads). The worker stops an attempt past it and records the job failed, naming this limit;
    # Celery's hard limit (this + 1 h) only backs that up. The broker's visibility timeout is set above
    # both, so a message is never redelivered to a second worker while the first is still running.
    job_time_limit_s: int = Field(72 * 3600, ge=10)
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
    # How long a worker waits on a database connection that does not answer (connecting, or a query whose packets
    # are dropped: a failover that moved the address, a partition) before it counts the connection as dropped and
    # tries again: libpq's connect_timeout, tcp_user_timeout and TCP keepalives (worker/supervisor.session_url).
    # Without them one try could hang for the kernel's retransmission timeout (15 minutes on Linux), far past
    # the heartbeat deadline. 0: a quarter of the heartbeat deadline, between 2 s (libpq's least) and 30 s.
    worker_database_timeout_s: int = Field(0, ge=0, le=3600)
    # How long an API process waits on a database connection that does not answer (connecting, a query whose
    # packets are dropped, a pooled connection while others are connecting) before the request answers 503
    # database_unavailable: libpq's connect_timeout, tcp_user_timeout and TCP keepalives, and the pool's checkout
    # timeout (app/db.api_database_url). Without them a database that dropped packets held every route thread
    # for minutes. 2 is libpq's least.
    api_database_timeout_s: int = Field(10, ge=2, le=3600)
    # A statement of a request that runs longer than this (a lock held by a stuck transaction elsewhere, a
    # pathological plan) is cancelled by Postgres and the request answers 503 database_busy, rolled back. 0: no
    # bound. /metrics, whose first scrape reads the whole job history, gets API_LONG_STATEMENT_TIMEOUT_S instead;
    # the CLI (admin commands, `qlora reaper`), migrations and the API's reaper and scheduler loops are not bound.
    api_statement_timeout_s: float = Field(30.0, ge=0, le=86400)
    api_long_statement_timeout_s: float = Field(600.0, ge=0, le=86400)
    # How often the reaper looks for such jobs: every API process runs one (0 turns it off there; `qlora
    # reaper` runs one alone), and only the holder of the "reaper" lease works (app/operations/lease.py).
    reaper_interval_s: float = Field(15.0, ge=0)
    # A job that lost this many attempts (its worker silent, its training process killed, storage or the
    # database out of reach) fails instead of trying again.
    max_attempts: int = Field(3, ge=1, le=100)
    # A worker that could not run an attempt because storage or the database was out of reach waits this
    # long, doubled for each earlier attempt of the job (at most 5 minutes), before it hands the job back:
    # an outage of minutes would otherwise use up max_attempts in seconds, and fail every queued job.
    out_of_reach_wait_s: float = Field(30.0, ge=0, le=300)
    # Checkpoints kept in object storage per job: the newest this many, plus the best by eval loss.
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    # A queued job whose "job X is ready" went to the broker this long ago and is still unclaimed is sent
    # again by the scheduler: its message may be gone (a worker took it, but its claim failed on a database
    # blip). A duplicate is harmless, since the claim is a compare-and-set; a job waiting for a busy GPU
    # class gets one duplicate per this interval, which the worker that takes it acknowledges at once.
    redispatch_after_s: float = Field(300.0, gt=0)
    # A download or upload of a base model, checkpoint or artifact that lasts longer than this gets a
    # progress event this often ("uploading merged model, 6.2 of 16 GiB"); shorter ones get none.
    transfer_event_interval_s: float = Field(30.0, gt=0)
    # An upload still in progress after this long belongs to a client or an API process that died:
    # its partial object (a temp file, a pending S3 multipart upload) is removed.
    stale_upload_s: float = Field(6 * 3600.0, gt=0)
    # A pre-quantized base (the worker's cache of 4-bit weights, ~35 GB for a 65B model) that no job has loaded
    # for this many days is deleted by the reaper: after a library upgrade or a changed or retired base model its
    # key is never asked for again. A job that needs it later quantizes the base afresh (minutes) and stores it
    # again. 0 keeps every entry for ever (`qlora admin prune-quantized-bases --older-than` still prunes by hand).
    quantized_cache_keep_days: float = Field(30.0, ge=0)

    # Sharing the GPU pool between teams (app/scheduling/, docs/scheduling.md). Each team's quota is set by
    # an admin (`qlora admin set-quota`); these are the values of a team that has none set. None: no limit.
    # A team's share of the pool against the others' (Kueue's weight, Slurm's shares), MIN_WEIGHT to MAX_WEIGHT.
    default_weight: float = Field(1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)
    # Jobs of one team training at once, over every GPU class.
    default_max_running: int | None = Field(None, ge=0)
    # Jobs of one team waiting at once: a script in a loop must not queue without bound (rule 9).
    default_max_queued: int | None = Field(1000, ge=0)
    # GPU-hours a team may use per calendar month (UTC); a job that would start past it stays queued.
    default_gpu_hours_per_month: float | None = Field(None, ge=0)
    # Datasets, artifacts and checkpoints a team may keep in object storage, in GiB.
    default_storage_gib: float | None = Field(None, ge=0)
    # How fast past GPU time stops counting against a team's fair share: Slurm's PriorityDecayHalfLife
    # (default 7 days there too). Shorter forgets sooner; longer evens out use over weeks.
    fair_share_half_life_s: float = Field(7 * 24 * 3600.0, gt=0)
    # The scheduler (one per deployment, the holder of the "scheduler" lease) looks this often: it
    # sends "job X is ready" for jobs a quota held back and now free, and preempts for fair share.
    scheduler_interval_s: float = Field(5.0, ge=0)
    # A team below its fair share whose job waits while every GPU of its class is busy may pause (at a
    # checkpoint) the newest job of the team furthest above its share; off: jobs wait for a free GPU.
    preemption: bool = True
    # No job is preempted before it has trained this long in its attempt: no thrashing, and every
    # attempt gets past its load and first checkpoint.
    min_runtime_before_preempt_s: float = Field(600.0, ge=0)
    # A queued job counts as waiting for a busy class (rather than for a worker about to take its
    # message) once it has waited this long without a claim.
    preempt_after_wait_s: float = Field(30.0, ge=0)

    @field_validator("gpu_classes", "host_memory", "extra_gpu_classes", "model_roots", mode="before")
    @classmethod
    def _json(cls, value: Any, info: ValidationInfo) -> Any:
        # Decoded here, not by pydantic-settings (NoDecode): its error for a value that is not JSON (QLORA_MODEL_ROOTS=
        # /models, written as a path) was a 145-line traceback naming no variable; here it is the one line every
        # other refused setting is (app/cli main). Settings(extra_gpu_classes='["a"]') is decoded here too.
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            example = JSON_EXAMPLES[info.field_name or ""]
            raise ValueError(f"not JSON: give {example}; got {value[:200]!r}") from None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        form = "http(s)://HOST[:PORT][/PATH], the API's address as users reach it"
        parts = urlsplit(value)
        if parts.username is not None:  # not echoed: it may hold a password
            raise ValueError(f"QLORA_PUBLIC_URL must be {form}, with no user or password in it")
        try:
            parts.port  # noqa: B018 (urlsplit checks the port only when it is read)
            well_formed = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            well_formed = False
        if not well_formed or parts.query or parts.fragment or any(c.isspace() for c in value):
            raise ValueError(f"QLORA_PUBLIC_URL must be {form}, with no query or fragment; got {value[:200]!r}")
        return value.rstrip("/")  # the routes' paths begin with their own "/"

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        unknown = unknown_variables(os.environ)
        if unknown:
            raise ValueError(f"{'; '.join(unknown)[:400]}: not a setting of this release (README, Configuration). "
                             "Correct or unset it: a setting misspelled would be ignored, and its default used")
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = sqlite_url(self.home / "qlora.db")
        if not self.storage_url:
            self.storage_url = f"file://{self.home / 'storage'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.database_url.startswith(("postgres://", "postgresql://")):
            # The form hosts hand out; SQLAlchemy would read it as psycopg2, which is not installed (psycopg 3 is).
            self.database_url = "postgresql+psycopg://" + self.database_url.split("://", 1)[1]
        if not self.database_url.startswith(("sqlite:///", "postgresql+psycopg://")):
            scheme = self.database_url.split("://", 1)[0] if "://" in self.database_url else "no scheme"
            raise ValueError(f"QLORA_DATABASE_URL must be {DATABASE_URL_FORMS} "
                             f"(postgres:// and postgresql:// are read as the latter), got {scheme[:40]!r}")
        if not self.storage_url.startswith(("file://", "s3://")):
            raise ValueError(f"QLORA_STORAGE_URL must start with file:// or s3://, got {self.storage_url!r}")
        relative = [str(root) for root in self.model_roots if not root.expanduser().is_absolute()]
        if relative:
            raise ValueError(f"QLORA_MODEL_ROOTS must be absolute directories; {relative[0][:200]!r} is not")
        self.model_roots = [Path(os.path.normpath(root.expanduser())) for root in self.model_roots]
        # Only a class QLORA_GPU_CLASSES sizes is estimated at admission: host memory given for another (a class by
        # name only, or the embedded default's) would be accepted here and never checked.
        unknown = [name for name in self.host_memory if name not in self.gpu_classes]
        if unknown or not all(0 < gib <= 1e6 for gib in self.host_memory.values()):  # NaN fails too
            raise ValueError(f"QLORA_HOST_MEMORY must give a positive GiB for classes workers serve "
                             f"({', '.join(self.gpu_classes) or 'none with its memory in QLORA_GPU_CLASSES'}); "
                             f"got {str(self.host_memory)[:200]!r}")
        if self.default_gpu_class not in self.served_gpu_classes:
            raise ValueError(
                f"QLORA_DEFAULT_GPU_CLASS {self.default_gpu_class!r} is not one of the GPU classes workers serve "
                f"({', '.join(self.served_gpu_classes)}): jobs that name no class would wait on a queue no worker "
                "listens to; set it to one of them, or add it to QLORA_EXTRA_GPU_CLASSES")
        return self

    @property
    def allowed_model_roots(self) -> list[Path]:
        """QLORA_MODEL_ROOTS, or the service's own <home>/models where none are given."""
        return self.model_roots or [self.home / "models"]

    @property
    def served_gpu_classes(self) -> list[str]:
        """The GPU classes a job may ask for: those with their memory, then those by name only. Without
        QLORA_GPU_CLASSES the default class is one (the embedded default: one worker, serving it)."""
        default = [] if self.gpu_classes else [self.default_gpu_class]
        return list(dict.fromkeys([*default, *self.gpu_classes, *self.extra_gpu_classes]))

    @property
    def task_time_limit_s(self) -> int:
        """Celery's hard limit for one job: a backstop an hour past the worker's own limit, for a worker
        stuck where it cannot stop itself."""
        return self.job_time_limit_s + 3600

    @property
    def database_timeout_s(self) -> int:
        """QLORA_WORKER_DATABASE_TIMEOUT_S, or what it derives: a quarter of the heartbeat deadline, so that a
        worker riding out an outage gets several tries inside it, between libpq's least (2 s) and 30 s."""
        return self.worker_database_timeout_s or min(30, max(2, int(self.heartbeat_deadline_s // 4)))

    @property
    def visibility_timeout_s(self) -> int:
        return self.broker_visibility_timeout_s or self.task_time_limit_s + 3600

    def check_timing(self) -> None:
        """The order that keeps exactly one runner per job, checked when a process starts.

        - supervise interval x 4 <= heartbeat deadline: a live worker is never taken for lost.
        - redispatch deadline >= scheduler interval: the scheduler looks that often, so a shorter deadline
          would send every job waiting for a busy GPU class again on each pass.
        - worker database timeout x 2 <= heartbeat deadline (when set): a worker riding out an outage gets a try
          after one given up, before the deadline.
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
        if self.scheduler_interval_s and self.redispatch_after_s < self.scheduler_interval_s:
            raise ValueError(
                f"QLORA_REDISPATCH_AFTER_S ({self.redispatch_after_s}) must be at least QLORA_SCHEDULER_INTERVAL_S "
                f"({self.scheduler_interval_s}): the scheduler looks only that often, so a shorter deadline would "
                "send every waiting job again on each of its passes")
        if self.worker_database_timeout_s and self.worker_database_timeout_s * 2 > self.heartbeat_deadline_s:
            raise ValueError(
                f"QLORA_WORKER_DATABASE_TIMEOUT_S ({self.worker_database_timeout_s}) must be at most half "
                f"QLORA_HEARTBEAT_DEADLINE_S ({self.heartbeat_deadline_s}): a worker riding out a database outage "
                "must get to try again, on a new connection, before the reaper takes its job")
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
