from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator
from pydantic_core import to_json
from sqlalchemy import Row

from app.jobs import states
from app.jobs.tables import Job
from app.scheduling.policy import PRIORITY_NAMES
from app.text import GPU_CLASS_PATTERN, has_control_characters
from worker.training.protocol import PHASES
from worker.training.spec import EvalSpec, JobSpec

if TYPE_CHECKING:
    from app.scheduling.service import Standing

MAX_METADATA = 16  # key/value pairs, as the OpenAI API allows
# The characters of all eval.prompts given as a list: 64 prompts of 2,000 characters (JobCreate._prompts_in_reason).
MAX_EVAL_PROMPT_CHARS = 131_072


class JobCreate(JobSpec):
    """The body of POST /jobs: the engine's job spec plus the job's own fields. The service validates
    with this model, and the OpenAPI schema documents it, so the two cannot drift."""

    name: str = Field("", max_length=200, description="One line of text, any script; shown in lists.")
    dataset_id: str = Field(min_length=1, description="The training set: an id from POST /datasets.")
    validation_dataset_id: str | None = Field(
        None, min_length=1, description="A held-out set for eval loss; null or absent for none.")
    gpu_class: str | None = Field(
        None, pattern=GPU_CLASS_PATTERN,
        description="Run on this class of GPU; by default the smallest that fits (or the default class).")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=MAX_METADATA, description="Your own string tags, returned as given.")
    priority: Literal["low", "normal", "high"] = Field(
        "normal", description="Order among your team's own queued jobs (teams are ordered by fair share first).")
    initial_job_id: str | None = Field(
        None, min_length=1, max_length=32,
        description="Start from the adapter of this job of yours (it must have succeeded, on the same base_model): "
                    "SFT first, then DPO from it. Null or absent: a fresh adapter.")

    @field_validator("name")
    @classmethod
    def _one_line(cls, name: str) -> str:
        # Postgres cannot store NUL, and a line break has no place in a listing or a download's file name.
        if has_control_characters(name):
            raise ValueError("control characters")
        return name

    @field_validator("eval")
    @classmethod
    def _prompts_in_reason(cls, eval: EvalSpec) -> EvalSpec:
        # A list is stored in the job's spec, which every poll, list page and stream message of the job carries:
        # 256 prompts of 20,000 characters made each of them 30 MB, and a create-and-cancel loop of such jobs grew
        # the database by megabytes a second, counted by no quota. The service's rule, not the engine's (`qlora
        # train` reads a spec file): longer prompts belong in a dataset, sampled by a number.
        if isinstance(eval.prompts, list) and (total := sum(map(len, eval.prompts))) > MAX_EVAL_PROMPT_CHARS:
            raise ValueError(f"prompts: {total:,} characters in all, past the {MAX_EVAL_PROMPT_CHARS:,} a job's spec "
                             "holds; put longer prompts in a validation dataset and set eval.prompts to the number "
                             "of its rows to sample")
        return eval

    @field_validator("metadata")
    @classmethod
    def _short_keys(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None and any(len(key) > 64 for key in metadata):
            raise ValueError("key over 64 characters")
        # Postgres reads a pair out of the stored JSON as text, which cannot hold NUL: one job holding it
        # failed every metadata filter of its team (GET /v1/fine_tuning/jobs?metadata[k]=v, a 500).
        if metadata is not None and any("\x00" in key or "\x00" in value for key, value in metadata.items()):
            raise ValueError("NUL character")
        return metadata


JOB_FIELDS = tuple(name for name in JobCreate.model_fields if name not in JobSpec.model_fields)


class Progress(BaseModel):
    step: int
    total_steps: int | None
    fraction: float | None
    planned: bool = Field(description="No step has trained yet: total_steps is the plan (the preflight's count at "
                                      "creation, then the trainer's), and may still change (packing \"auto\", a "
                                      "dataset longer than the preflight reads).")


class JobListItem(BaseModel):
    """A job as GET /jobs lists it: all of JobOut but its heartbeat. A running job's worker writes heartbeat_at every
    supervise interval (1 s), so with it the page, and its ETag, changed every second while any job of the team
    ran, and no poll of the list (the dashboard's, a script's) ever got a 304, though nothing it shows had changed.
    What a person reads off a list moves with the job's own state (status, step, attempt, error); a worker lost
    shows there too, once the reaper requeues or pauses its job. The heartbeat itself is GET /jobs/{id}'s, and
    its stream's (Kubernetes moved nodes' heartbeats out of the Node object that lists and watches read, into
    Leases, for the same reason)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    metadata: dict[str, str] | None = Field(default=None, validation_alias="user_metadata")
    status: str
    base_model: str
    dataset_id: str | None
    validation_dataset_id: str | None
    initial_job_id: str | None = Field(None, description="The job whose adapter this one started from, if any.")
    spec: dict[str, Any]
    queue: str
    attempt: int
    trained_tokens: int
    error: str | None
    summary: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    step: int
    total_steps: int | None
    priority: Literal["low", "normal", "high"]
    preemptions: int = Field(description="Times the scheduler paused it at a checkpoint for another team's job.")
    phase: str | None = Field(None, description="While a worker holds the job (running, cancelling, pausing): what it "
                              "does now, one of " + ", ".join(PHASES) + ". Past the last step a job still evaluates, "
                              "saves, merges, reports and uploads; it is done when its status says so. Null otherwise.")
    # Only while queued, and only in GET /jobs/{id}: 1 is the next job its GPU class starts, if no job
    # ended meanwhile; waiting_for says what it waits for: "gpu" (a free GPU of its class), "cpu" (a free worker of
    # its class, which has no GPU: waiting_detail names it), "no_worker" (no
    # worker of its class is up: waiting_detail says since when), or the quota holding it back ("max_running",
    # "gpu_hours_per_month"), or "team_disabled" (an admin disabled its team).
    queue_position: int | None = None
    waiting_for: str | None = None
    waiting_detail: str | None = None

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_name(cls, value: Any) -> Any:
        return PRIORITY_NAMES.get(value, value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _phase_while_held(self) -> Self:
        self.phase = shown_phase(self.status, self.phase)
        return self

    # pydantic documents this decorator order; mypy does not model decorated properties.
    @computed_field  # type: ignore[prop-decorator]
    @property
    def progress(self) -> Progress:
        return Progress(**progress_of(self.step, self.total_steps))

    @classmethod
    def of(cls, job: Job) -> Self:
        return cls.model_validate(job)


class JobOut(JobListItem):
    """A job as GET /jobs/{id} (and every answer about one job) shows it: JobListItem and the worker's last word."""

    heartbeat_at: datetime | None = Field(
        description="The running job's worker's last heartbeat, written every supervise interval (database clock).")


# What JobOut shows beyond JobListItem: it moves with every heartbeat and is no news to a person (the list leaves it
# out; a job's stream sends the job again only when the rest changed).
BEAT_FIELDS = frozenset(JobOut.model_fields) - frozenset(JobListItem.model_fields)


# JobOut's fields that hold JSON of the caller's or the engine's; the rest are scalars.
JOB_JSON_FIELDS = ("metadata", "spec", "summary")


def shown_phase(status: str, phase: str | None) -> str | None:
    """JobOut's `phase`, for the model and for job_json alike: the worker's newest word while it holds the job; a
    job queued again, paused or finished has none (its column keeps the last attempt's)."""
    return phase if status in states.WORKER_OWNED else None


def progress_of(step: int, total_steps: int | None) -> dict[str, Any]:
    """JobOut's `progress`, for the model and for job_json alike: every client shows the total and whether it is
    still the plan from these, none works it out for itself."""
    return {"step": step, "total_steps": total_steps, "fraction": round(step / total_steps, 4) if total_steps else None,
            "planned": step == 0 and total_steps is not None}


def job_json(row: Row, standing: Standing | None = None) -> bytes:
    """JobOut's JSON for a row of repository.JOB_VIEW (JobListItem's for one of JOB_LIST_VIEW), whose JSON columns are the text the database
    holds, and for a queued job its standing (queue_position, waiting_for, waiting_detail): the scalars as one dict through
    pydantic's encoder (building and dumping a JobOut per row was a third of a page's time in the
    profile), the JSON embedded as stored (it was validated when it was written). The same answer as
    JobOut.of(job).model_dump_json(), keys in another order (tests/fast/test_job_views.py)."""
    values = row._asdict()
    embedded = [(name, values.pop(name)) for name in JOB_JSON_FIELDS]
    values["priority"] = PRIORITY_NAMES[values["priority"]]
    values["queue_position"], values["waiting_for"], values["waiting_detail"] = (
        (standing.position, standing.waiting_for, standing.detail) if standing else (None, None, None))
    values["progress"] = progress_of(values["step"], values["total_steps"])
    values["phase"] = shown_phase(values["status"], values["phase"])
    head = to_json(values)
    tail = b"".join(b',"%s":%s' % (name.encode(), (text or "null").encode()) for name, text in embedded)
    return head[:-1] + tail + b"}"


def job_page_json(rows: list[Row], next_cursor: str | None) -> bytes:
    """JobPage's JSON for rows of repository.JOB_LIST_VIEW."""
    cursor = b"null" if next_cursor is None else json.dumps(next_cursor).encode()
    return b'{"data":[' + b",".join(job_json(row) for row in rows) + b'],"next_cursor":' + cursor + b"}"


class JobPage(BaseModel):
    data: list[JobListItem]
    next_cursor: str | None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    attempt: int
    type: str
    level: str
    step: int | None
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class TrainPoint(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    epoch: float | None
    train_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_seen: int | None
    tokens_per_second: float | None
    peak_memory_bytes: int | None
    gpu_utilization: float | None
    # method dpo (null for sft): train_loss is then the DPO loss.
    reward_accuracy: float | None = Field(None, description="dpo: share of pairs whose preferred answer scores higher.")
    reward_chosen: float | None = Field(None, description="dpo: mean implicit reward of the preferred answers.")
    reward_rejected: float | None = Field(None, description="dpo: mean implicit reward of the non-preferred answers.")
    reward_margin: float | None = Field(None, description="dpo: mean of chosen minus rejected reward.")


class EvalPoint(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    epoch: float | None
    eval_loss: float | None
    # method dpo, on the validation pairs (null for sft): eval_loss is then the DPO loss.
    reward_accuracy: float | None = None
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None


# The fields of each series' points, in the schema's order and named as job_metrics' columns are: what a curve page
# and a live stream's `metric` messages read of a point, as plain rows (no ORM object or model per point).
TRAIN_FIELDS = tuple(TrainPoint.model_fields)
EVAL_FIELDS = tuple(EvalPoint.model_fields)
FIELDS_OF = {"train": TRAIN_FIELDS, "eval": EVAL_FIELDS}
assert TRAIN_FIELDS[0] == EVAL_FIELDS[0] == "step"  # pages, cursors and streams read the step first


class MetricsNext(BaseModel):
    after_step: int | None = Field(description="The last train step of the curve read so far (null: none yet): "
                                               "pass it as `after_step`.")
    after_eval_step: int = Field(description="The last eval step read so far (0: none yet): pass it as "
                                             "`after_eval_step`.")


class MetricsOut(BaseModel):
    job_id: str
    train: list[TrainPoint]
    eval: list[EvalPoint]
    has_more: bool = Field(description="The page was cut at `limit`: ask again with `next` for the rest.")
    next: MetricsNext = Field(description="Where the next request goes on from: at once while `has_more`, "
                                          "else on the next poll, for points logged since.")


class ThinnedMetricsOut(MetricsOut):
    """GET /jobs/{id}/metrics?points=N: the whole curve's shape in at most N points."""

    thinned: bool = Field(description="Points were left out: in each bucket of `bucket_steps` steps, each series "
                                      "kept its first and last point and those of its lowest and highest loss. "
                                      "False: the curve fit in `points`, every point is here.")
    bucket_steps: int | None = Field(description="The width of a bucket in steps (null when not thinned).")
    curve_points: int = Field(description="The points the whole curve holds, train and eval.")


def points_json(value: object) -> bytes:
    """The JSON a model of these points dumps, from plain dicts and lists in the schema's field order, with no model
    per point: pydantic's encoder, as a model's (floats written alike; inf and nan as null, as a model writes them).
    A curve page (curve_json) and a stream's `metric` message (app/jobs/stream.py) write their points through it."""
    return to_json(value, inf_nan_mode="null")


def curve_json(curve: dict) -> bytes:
    """MetricsOut's JSON for service.metrics' answer: the same bytes as
    MetricsOut.model_validate(curve).model_dump_json() (tests/service/test_curve_pages.py compares the two)."""
    return points_json(curve)


class ArtifactOut(BaseModel):
    kind: str
    bytes: int
    sha256: str
    created_at: datetime
    download_url: str  # the API's download route; it redirects to a short-lived presigned URL on S3


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    attempt: int
    train_loss: float | None
    eval_loss: float | None
    bytes: int
    created_at: datetime


class PreflightOut(BaseModel):
    """POST /jobs/preflight: where the job would run and what it would train on (nothing is created)."""

    placement: dict[str, Any] = Field(description="gpu_class, the memory estimate and its note, the spec as sized "
                                                  "for that class; or the refusal (error) where no class holds it.")
    report: dict[str, Any] | None = Field(description="train and validation: rows, tokens per row (min/median/p95/max), "
                                                      "truncated and dropped rows, trained tokens and those lost to "
                                                      "truncation, rows without EOS in their labels; steps and epochs; "
                                                      "examples token by token; refusals (refusal_sets: the set each "
                                                      "is about, train or validation) and warnings. Null with a note "
                                                      "where no preflight could be made.")
    note: str = Field(description="Why there is no report, or empty.")
    can_learn: bool | None = Field(description="False where POST /jobs would refuse the job (see report.refusals).")


class ReportAnswer(BaseModel):
    answer: str
    stopped: bool = Field(description="It ended with EOS within max_new_tokens.")
    exact_match: bool | None = Field(description="Equal to the reference, surrounding whitespace stripped; "
                                                       "null without a reference.")
    f1: float | None = Field(description="Bag-of-words F1 against the reference (SQuAD's, on lowercased "
                                               "whitespace tokens); null without a reference.")


class ReportRow(BaseModel):
    line: int | None = Field(description="The dataset line the prompt was sampled from; null for a prompt of the spec.")
    prompt: str
    reference: str | None = Field(description="The row's last assistant turn (method dpo: the pair's preferred "
                                                "answer); null for a prompt of the spec.")
    # Method dpo only (absent from an sft report, and from a dpo report made before it existed).
    rejected: str | None = Field(None, description="Method dpo only: the pair's rejected answer, the one training "
                                                   "taught the model to avoid; null for a prompt of the spec.")
    prompt_truncated: bool = Field(description="Longer than max_seq_length: its start was cut, as in training.")
    base: ReportAnswer
    tuned: ReportAnswer


class ReportScores(BaseModel):
    exact_match: float | None = Field(description="Mean over the rows with a reference; null where none has one.")
    f1: float | None
    stopped: float | None = Field(description="Share of answers that ended with EOS.")
    loss: float | None = Field(description="Mean negative log-likelihood per trained token on the loss rows.")
    perplexity: float | None


class ReportMetrics(BaseModel):
    scored_rows: int = Field(description="Rows with a reference, which the means are over.")
    loss_rows: int
    loss_rows_from: Literal["validation", "train"]
    loss_tokens: int
    base: ReportScores
    tuned: ReportScores


class ReportGeneration(BaseModel):
    max_new_tokens: int
    temperature: float
    seed: int
    base: str = Field(description="Which model gave the base answers.")
    tuned: str = Field(description="Which model gave the tuned answers: the merged model where the job merged.")


class RewardPoint(BaseModel):
    step: int = Field(description="The optimizer step the evaluation ran after.")
    accuracy: float = Field(description="Share of validation pairs whose preferred answer's reward is above the "
                                        "rejected one's. 0 at step 0, where the model is its reference.")
    margin: float = Field(description="Mean of the preferred answer's reward minus the rejected one's; above 0: "
                                      "the preferred answers gained more likelihood than the rejected ones.")
    chosen: float = Field(description="Mean reward of the preferred answers: beta times the log-likelihood gained "
                                      "over the reference model.")
    rejected: float = Field(description="Mean reward of the rejected answers (it falls as they are unlearned).")
    loss: float | None = Field(description="The DPO loss on the validation pairs (log 2, 0.693, at step 0).")


class ReportRewards(BaseModel):
    pairs: int = Field(description="The validation pairs each evaluation measured.")
    reference: Literal["base", "initial_adapter"] = Field(
        description="What the rewards are measured against: the base, or a frozen copy of the starting adapter.")
    evaluations: int = Field(description="How many evaluations the run made.")
    first: RewardPoint = Field(description="The first evaluation.")
    final: RewardPoint = Field(description="The evaluation of the weights shipped: the last, or the best with "
                                           "output.use_best_checkpoint.")


class JobReport(BaseModel):
    """GET /jobs/{id}/report: the eval report made when the job succeeded (its spec's `eval` section).
    A dpo job's also has `rewards` and each row's `rejected`; an sft job's has neither key."""

    job_id: str
    prompts_from: Literal["spec", "validation", "train"]
    generation: ReportGeneration
    metrics: ReportMetrics
    rows: list[ReportRow]
    rewards: ReportRewards | None = Field(None, description="Method dpo only: DPO's implicit rewards on the validation "
                                                            "pairs, at the first evaluation and at the shipped "
                                                            "weights'; null where the job had no validation set.")
