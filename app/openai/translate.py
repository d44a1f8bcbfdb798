"""Between OpenAI's fine-tuning objects and ours.

Going out (files, jobs, events, checkpoints, errors), only shapes and names change. Coming in, a
create-job body is checked here only as far as it is OpenAI's own: its fields, `method`, the
hyperparameters and their ranges, ids with their prefixes, each named as the client sent it. What it
becomes is the body of POST /jobs, and from there the native service validates and decides as for
any job (the spec's fields, datasets, base model, GPU class; scoping; state changes)."""

from __future__ import annotations

import csv
import heapq
import io
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from app.datasets.tables import Dataset
from app.errors import Invalid, NotFound, field_errors
from app.jobs import states
from app.jobs.schemas import MAX_METADATA, EvalPoint, TrainPoint
from app.jobs.tables import Checkpoint, Job, JobEvent, JobMetric
from app.openai.ids import CHECKPOINT, EVENT, FILE, JOB, RESULTS, without_prefix
from app.pagination import MAX_ID, cursor_after
from app.scheduling.service import Standing
from app.text import counted
from worker.training.spec import LEARNING_RATES, TrainingSpec, excerpt

DEFAULT_EPOCHS = 3  # n_epochs "auto": what most small fine-tunes use, and OpenAI's usual pick
DEFAULT_MICRO_BATCH = TrainingSpec.model_fields["per_device_batch_size"].default
DEFAULT_ACCUMULATION = TrainingSpec.model_fields["gradient_accumulation_steps"].default

# Fields of ours, named as an OpenAI client knows them (for an error's `param`).
PARAM_NAMES = {
    "dataset_id": "training_file", "validation_dataset_id": "validation_file", "base_model": "model",
    "name": "suffix", "training.seed": "seed", "training.epochs": "hyperparameters.n_epochs",
    "training.learning_rate": "hyperparameters.learning_rate_multiplier",
    "training.per_device_batch_size": "hyperparameters.batch_size",
    "training.gradient_accumulation_steps": "hyperparameters.batch_size",
    "method.beta": "method.dpo.hyperparameters.beta", "method.loss": "method.dpo.hyperparameters.loss",
    "method.label_smoothing": "method.dpo.hyperparameters.label_smoothing",
}
OPENAI_FIELDS = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed",
                 "metadata", "integrations"}
# Ours, through the SDK's extra_body.
EXTRA_FIELDS = {"lora", "quantization", "training", "output", "eval", "gpu_class", "initial_job_id"}
# OpenAI's method types as ours: the hyperparameters of each sit under method[<type>]["hyperparameters"].
METHODS = {"supervised": "sft", "dpo": "dpo"}
OPENAI_METHOD = {ours: theirs for theirs, ours in METHODS.items()}
DPO_OPTIONS = ("beta", "loss", "label_smoothing")  # beta is OpenAI's; loss and label_smoothing are ours
# OpenAI's hyperparameters of every method (a dpo method's also take DPO_OPTIONS).
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")

# Our job states as OpenAI's; the ones it has no word for read as the nearest it has.
STATUS = {
    states.QUEUED: "queued", states.RUNNING: "running", states.CANCELLING: "running", states.PAUSING: "running",
    states.PAUSED: "paused", states.SUCCEEDED: "succeeded", states.FAILED: "failed", states.CANCELLED: "cancelled",
}


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def native_id(openai_id: str, prefix: str, what: str) -> str:
    """An id as OpenAI clients send it, without its prefix. A malformed one is as missing as a wrong one."""
    native = without_prefix(openai_id, prefix)
    if native is None:
        raise NotFound(f"no {what} {excerpt(openai_id)}")
    return native


def list_cursor(after: str | None, prefix: str, what: str, find: Callable[[str], Any]) -> str | None:
    """The native cursor of a list page that starts after the object `after` names (the SDK sends the last
    id of the page before). One that names none of the caller's objects is still a 404, as any missing or
    other team's id is, but one that names `after` and what to do: a loop that deletes the files it lists
    (`for f in client.files.list(): client.files.delete(f.id)`) asks for the page after a file it has just
    deleted, which cannot be placed any more (its row went with it), and a bare `no file` read as if the
    list itself were not there."""
    if not after:
        return None
    try:
        return cursor_after(find(native_id(after, prefix, what)))
    except NotFound:
        raise NotFound(f"after: no {what} {excerpt(after)} of yours, deleted since the page that listed it (or never "
                       "one): a page starts after an id that still exists; list again from the start, without after",
                       details=field_errors([("after", f"no such {what}")])) from None


def event_id(openai_id: str) -> int:
    """The number in an event id ("ftevent-<n>", as `after` pages with). Only ASCII digits within a
    serial's range: str.isdigit() also takes "²", which int() refuses, and int() takes no more than
    4300 digits; a number past any stored id fails in the database, not in the search."""
    digits = openai_id[len(EVENT):] if openai_id.startswith(EVENT) else ""
    if not (digits.isascii() and digits.isdigit() and len(digits) <= len(str(MAX_ID)) and int(digits) <= MAX_ID):
        raise Invalid(f"after: {excerpt(openai_id)} is not an event id ({EVENT}<number> from a previous page)",
                      details=field_errors([("after", "not an event id")]))
    return int(digits)


METRIC_EVENT = EVENT + "m"  # a point of the curve shown as a "metrics" event: ftevent-m<point id>


def feed_cursor(openai_id: str) -> tuple[str, int]:
    """What an events page's `after` names: ("event", id) or, for a metrics event, ("metric", id)."""
    if openai_id.startswith(METRIC_EVENT):
        return "metric", event_id(EVENT + openai_id[len(METRIC_EVENT):])
    return "event", event_id(openai_id)


_METADATA_PAIR = re.compile(r"metadata\[(.*)\]", re.DOTALL)


def metadata_filter(query: Iterable[tuple[str, str]]) -> dict[str, str] | None:
    """jobs.list()'s metadata filter from the query string, as the SDK sends it: `metadata[k]=v` for each
    pair a job's metadata must hold (none: no filter), or `metadata=null` for the jobs with none (None).
    Read from the raw query: a route's parameters would silently drop `metadata[k]`, listing every job."""
    pairs: dict[str, str] = {}
    null = False
    for name, value in query:
        pair = _METADATA_PAIR.fullmatch(name)
        if name == "metadata" and value == "null":
            null = True
        elif name == "metadata" or (pair and pairs.get(pair[1], value) != value):
            raise Invalid(f"metadata: filter with metadata[key]=value (each key once) or metadata=null, got "
                          f"{excerpt(name, quote=False)}={excerpt(value, quote=False)}",
                          details=field_errors([("metadata", "use metadata[key]=value or metadata=null")]))
        elif pair:
            pairs[pair[1]] = value
    if null and pairs:
        raise Invalid("metadata: metadata=null selects jobs without metadata; it cannot be combined with "
                      "metadata[key]=value", details=field_errors([("metadata", "null or pairs, not both")]))
    if len(pairs) > MAX_METADATA:  # no job holds more: the filter would match none, at the cost of each pair
        raise Invalid(f"metadata: at most {MAX_METADATA} pairs, as a job holds at most {MAX_METADATA}; got {len(pairs)}",
                      details=field_errors([("metadata", f"at most {MAX_METADATA} pairs")]))
    return None if null else pairs


def file_object(dataset: Dataset) -> dict:
    errors = "; ".join(f"line {e['line']}: {e['message']}" for e in dataset.errors[:5]) or None
    return {
        "id": FILE + dataset.id, "object": "file", "bytes": dataset.bytes, "created_at": unix(dataset.created_at),
        "filename": dataset.filename, "purpose": "fine-tune", "expires_at": None,
        "status": "processed" if dataset.status == "ready" else "error",
        "status_details": None if dataset.status == "ready" else
        f"{counted(dataset.error_count, 'invalid line')}; {errors}",
    }


def result_files(job: Job) -> list[str]:
    """A succeeded job's result file, as OpenAI lists it: its curve as CSV, read with files.content(id)."""
    return [RESULTS + job.id] if job.status == states.SUCCEEDED else []


RESULTS_FILENAME = "step_metrics.csv"  # OpenAI's name for it


def result_file_object(job: Job, content: bytes) -> dict:
    return {
        "id": RESULTS + job.id, "object": "file", "bytes": len(content), "created_at": unix(job.finished_at),
        "filename": RESULTS_FILENAME, "purpose": "fine-tune-results", "expires_at": None, "status": "processed",
        "status_details": None,
    }


# Each column of the result file and where it comes from: (series, field of that series' points as
# schemas.TrainPoint / EvalPoint list them, in the order a curve page's tuples hold them).
_RESULT_COLUMNS = (("step", "*", "step"), ("epoch", "*", "epoch"), ("train_loss", "train", "train_loss"),
                   ("valid_loss", "eval", "eval_loss"), ("learning_rate", "train", "learning_rate"),
                   ("grad_norm", "train", "grad_norm"), ("tokens_seen", "train", "tokens_seen"))
_DPO_COLUMNS = tuple((f"{side}_{name}", kind, name) for side, kind in (("train", "train"), ("valid", "eval"))
                     for name in ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"))
_SERIES_FIELDS = {"train": tuple(TrainPoint.model_fields), "eval": tuple(EvalPoint.model_fields)}


def results_csv(pages: Iterable[tuple[Sequence[Sequence], Sequence[Sequence]]], dpo: bool) -> bytes:
    """The curve as OpenAI's step_metrics.csv, from its pages of (train, eval) point tuples in step order (as
    jobs.service.curve_page reads them): a row per step that has a train or an eval point, train_* and valid_*
    columns as the metrics events name them (valid_loss: the eval loss), empty where the step has no such point,
    and a dpo job's rewards. No accuracy columns: this service measures none. Written page by page: a row is
    held only until the next step's point (an evaluation may come on the page after its step's train point)."""
    columns = _RESULT_COLUMNS + (_DPO_COLUMNS if dpo else ())
    # For each series, (column index, field index) of the columns it fills.
    fills = {kind: [(i, fields.index(field)) for i, (_, of, field) in enumerate(columns) if of in ("*", kind)]
             for kind, fields in _SERIES_FIELDS.items()}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(name for name, _, _ in columns)
    row: list = []
    for train, eval_ in pages:
        points = heapq.merge(((p[0], 0, "train", p) for p in train), ((p[0], 1, "eval", p) for p in eval_))
        for step, _, kind, point in points:
            if row and row[0] != step:
                writer.writerow(row)
                row = []
            row = row or [None] * len(columns)
            for column, field in fills[kind]:
                if point[field] is not None or row[column] is None:
                    row[column] = point[field]
    if row:
        writer.writerow(row)
    return out.getvalue().encode()


def hyperparameters_of(spec: dict) -> dict:
    """OpenAI's hyperparameters as the job trains. n_epochs is a whole number of epochs, or null where the job
    trains by another count: a number of steps (training.max_steps) or a fractional epochs, which OpenAI's
    n_epochs (an integer or "auto") cannot hold; spec.training beside it says which. It never reads "auto":
    "auto" was chosen when the job was created, and a job trained by max_steps chose no epochs at all."""
    training = spec["training"]
    micro = training["per_device_batch_size"]
    epochs = training.get("epochs")
    return {
        "n_epochs": int(epochs) if epochs is not None and float(epochs).is_integer() else None,
        "batch_size": micro * training["gradient_accumulation_steps"] if micro != "auto" else "auto",
        "learning_rate_multiplier": round(training["learning_rate"] / LEARNING_RATES[method_type(spec)], 6),
    }


def fine_tuned_model(job: Job, team_name: str) -> str:
    """OpenAI's "ft:<base>:<org>:<suffix>:<id>"; this service serves no inference, so the name points
    at the job whose adapter and merged model are downloaded from /jobs/{id}/artifacts."""
    return f"ft:{job.base_model}:{team_name}:{job.name}:{job.id}"


FINE_TUNED = "ft:"


def fine_tuned_job_id(model: str) -> str | None:
    """The job id a fine-tuned model's name ends with (as fine_tuned_model writes it), or None for a
    name that is not a fine-tuned model's (a base model's)."""
    return model.rsplit(":", 1)[-1] if model.startswith(FINE_TUNED) else None


def model_object(name: str, created: datetime | None, owned_by: str) -> dict:
    return {"id": name, "object": "model", "created": unix(created), "owned_by": owned_by}


def method_type(spec: dict) -> str:
    return (spec.get("method") or {"type": "sft"})["type"]


def method_of(spec: dict, hyperparameters: dict) -> dict:
    """The job's method in OpenAI's shape: {"type": "dpo", "dpo": {"hyperparameters": {..., "beta"}}}."""
    method = spec.get("method") or {"type": "sft"}
    kind = OPENAI_METHOD[method_type(spec)]
    extra = {name: method[name] for name in DPO_OPTIONS if name in method}
    return {"type": kind, kind: {"hyperparameters": {**hyperparameters, **extra}}}


def _file_id(dataset_id: str | None) -> str | None:
    return FILE + dataset_id if dataset_id else None


def job_object(job: Job, team_name: str, standing: Standing | None = None, estimated_finish: datetime | None = None) -> dict:
    """OpenAI's fine_tuning.job, and ours beside it; `standing`, a queued job's place and what it waits for, as
    GET /jobs/{id} says it, and `estimated_finish`, a running job's (jobs.service.estimated_finish): jobs.retrieve()
    reads both, a list leaves them out, as GET /jobs leaves out the standing."""
    hyperparameters = hyperparameters_of(job.spec)
    error = None
    if job.status == states.FAILED:
        error = {"code": "job_failed", "message": job.error or "the job failed", "param": None}
    return {
        "id": JOB + job.id, "object": "fine_tuning.job", "model": job.base_model,
        "created_at": unix(job.created_at), "finished_at": unix(job.finished_at),
        "fine_tuned_model": fine_tuned_model(job, team_name) if job.status == states.SUCCEEDED else None,
        "organization_id": job.team_id, "result_files": result_files(job), "status": STATUS[job.status],
        # The files it was created with, also once deleted: the job was trained on them (OpenAI keeps them too).
        "training_file": _file_id(job.created_dataset_id or job.dataset_id),
        "validation_file": _file_id(job.created_validation_dataset_id or job.validation_dataset_id),
        "hyperparameters": hyperparameters,
        "method": method_of(job.spec, hyperparameters),
        "trained_tokens": job.trained_tokens if job.status == states.SUCCEEDED else None,
        "error": error, "seed": job.spec["training"]["seed"], "metadata": job.user_metadata,
        "user_provided_suffix": job.name or None, "estimated_finish": unix(estimated_finish), "integrations": [],
        # Ours, for clients that know them: where training is and how a job is configured.
        "progress": {"step": job.step, "total_steps": job.total_steps}, "spec": job.spec,
        "queue_position": standing.position if standing else None,
        "waiting_for": standing.waiting_for if standing else None,
        "waiting_detail": standing.detail if standing else None,
        "initial_job_id": JOB + job.initial_job_id if job.initial_job_id else None,
    }


def event_object(event: JobEvent) -> dict:
    return {
        "object": "fine_tuning.job.event", "id": f"{EVENT}{event.id}", "created_at": unix(event.created_at),
        "level": {"warning": "warn"}.get(event.level, event.level), "message": event.message or event.type,
        "data": {"type": event.type, "step": event.step, "attempt": event.attempt, **(event.data or {})},
        "type": "message",
    }


# A point's fields as OpenAI's metrics events name them: train_* for a train point, valid_* for an eval one.
_REWARDS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")


def metric_event_object(point: JobMetric, total_steps: int | None) -> dict:
    """A point of the curve as OpenAI's "metrics" event: step, total_steps, train_loss (valid_loss for an
    eval point), and for a dpo job the rewards (train_reward_accuracy, train_reward_margin, ...)."""
    side = "train" if point.kind == "train" else "valid"
    data: dict[str, Any] = {"step": point.step, "total_steps": total_steps,
                            f"{side}_loss": point.train_loss if side == "train" else point.eval_loss}
    data.update({f"{side}_{name}": getattr(point, name) for name in _REWARDS if getattr(point, name) is not None})
    said = [f"{'training' if side == 'train' else 'validation'} loss={_number(data[f'{side}_loss'])}"]
    if point.reward_accuracy is not None:
        said.append(f"reward accuracy={_number(point.reward_accuracy)}")
    if point.reward_margin is not None:
        said.append(f"reward margin={_number(point.reward_margin)}")
    return {
        "object": "fine_tuning.job.event", "id": f"{METRIC_EVENT}{point.id}", "created_at": unix(point.created_at),
        "level": "info", "message": f"Step {point.step}{f'/{total_steps}' if total_steps else ''}: {', '.join(said)}",
        "data": data, "type": "metrics",
    }


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def checkpoint_object(checkpoint: Checkpoint, job: Job, team_name: str) -> dict:
    metrics: dict[str, float] = {"step": checkpoint.step}
    if checkpoint.train_loss is not None:
        metrics["train_loss"] = checkpoint.train_loss
    if checkpoint.eval_loss is not None:
        metrics["valid_loss"] = checkpoint.eval_loss
    return {
        "object": "fine_tuning.job.checkpoint", "id": CHECKPOINT + checkpoint.id,
        "created_at": unix(checkpoint.created_at), "step_number": checkpoint.step, "metrics": metrics,
        "fine_tuning_job_id": JOB + job.id,
        "fine_tuned_model_checkpoint": f"{fine_tuned_model(job, team_name)}:ckpt-step-{checkpoint.step}",
    }


def job_body(body: Any, max_micro_batch: int | None = None) -> dict:
    """An OpenAI create-job body as the body of POST /jobs, whose service validates the spec it holds.
    A part of the wrong shape (hyperparameters that are not an object, a file id that is not a
    string) is refused here, naming it, never passed on to fail somewhere it has another name.
    `max_micro_batch` is the operator's ceiling (QLORA_MAX_MICRO_BATCH): batch_size is split into
    micro-batches no larger."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object", details=field_errors([("(body)", "not an object")]))
    unknown = sorted(set(body) - OPENAI_FIELDS - EXTRA_FIELDS)
    if unknown:
        raise Invalid(f"unknown field {excerpt(unknown[0])}; LoRA and quantization settings go in 'lora' and "
                      f"'quantization' (the SDK's extra_body)",
                      details=field_errors([(excerpt(unknown[0], quote=False), "unknown field")]))
    if body.get("integrations"):
        raise Invalid("integrations are not supported", details=field_errors([("integrations", "not supported")]))
    method = _object(body, "method", "method") or {"type": "supervised"}
    kind = method.get("type")
    if not isinstance(kind, str) or kind not in METHODS:  # a list or an object is no key of METHODS (unhashable)
        raise Invalid(f"method.type {excerpt(kind)} is not supported; this service fine-tunes with "
                      f"{' or '.join(map(repr, METHODS))}",
                      details=field_errors([("method.type", f"must be one of {', '.join(map(repr, METHODS))}")]))
    if not isinstance(body.get("model"), str):
        raise Invalid("model: required, the name of a registered base model (GET /v1/models lists them)",
                      details=field_errors([("model", "required")]))
    if not isinstance(body.get("training_file"), str):
        raise Invalid("training_file: required, a file id from POST /v1/files",
                      details=field_errors([("training_file", "required")]))
    if body.get("validation_file") is not None and not (isinstance(body["validation_file"], str)
                                                        and body["validation_file"]):
        raise Invalid("validation_file: must be a file id from POST /v1/files, or null for none",
                      details=field_errors([("validation_file", "must be a file id or null")]))
    # The SDK sends the hyperparameters under method[type]; the top-level ones are the older way.
    _only(method, ("type", kind), "method")
    settings = _object(method, kind, f"method.{kind}")
    _only(settings, ("hyperparameters",), f"method.{kind}")
    # A supervised beta gets past here, to be refused by _method_from as "only for method dpo"; the list of what a
    # field takes names the method's own (a supervised job was told it took beta, then refused it).
    takes = HYPERPARAMETERS + DPO_OPTIONS if kind == "dpo" else HYPERPARAMETERS
    legacy = _object(body, "hyperparameters", "hyperparameters")
    _only(legacy, HYPERPARAMETERS + DPO_OPTIONS, "hyperparameters", takes)
    current = _object(settings, "hyperparameters", f"method.{kind}.hyperparameters")
    _only(current, HYPERPARAMETERS + DPO_OPTIONS, f"method.{kind}.hyperparameters", takes)
    hyperparameters = {**legacy, **current}
    native_method = _method_from(kind, hyperparameters)
    training = _object(body, "training", "training")
    training.update(_training_from(hyperparameters, training, max_micro_batch, LEARNING_RATES[native_method["type"]]))
    if body.get("seed") is not None:
        training["seed"] = body["seed"]
    native = {
        "base_model": body["model"],
        "dataset_id": native_id(body["training_file"], FILE, "file"),
        "training": training,
        **{k: body[k] for k in ("lora", "quantization", "output", "eval", "gpu_class", "metadata") if body.get(k) is not None},
    }
    if body.get("validation_file") is not None:
        native["validation_dataset_id"] = native_id(body["validation_file"], FILE, "file")
    if native_method["type"] != "sft":  # sft is the spec's default
        native["method"] = native_method
    if body.get("suffix"):
        native["name"] = body["suffix"]
    if body.get("initial_job_id") is not None:
        initial = body["initial_job_id"]
        if not isinstance(initial, str) or not initial:
            raise Invalid("initial_job_id: must be a fine-tuning job id (ftjob-...), or null for none",
                          details=field_errors([("initial_job_id", "must be a job id or null")]))
        native["initial_job_id"] = initial.removeprefix(JOB)  # the SDK's id, or the native one
    return native


def _method_from(kind: str, hyperparameters: dict) -> dict:
    """Our spec's method from OpenAI's: supervised is sft; dpo takes beta ("auto": the spec's default) and,
    as ours, loss and label_smoothing, from its hyperparameters (the rest are the training's)."""
    method: dict[str, Any] = {"type": METHODS[kind]}
    if kind == "dpo":
        for name in DPO_OPTIONS:
            value = hyperparameters.pop(name, "auto")
            if value != "auto":
                method[name] = value  # checked by the spec, and named back as method.dpo.hyperparameters.<name>
    else:
        stray = [name for name in DPO_OPTIONS if name in hyperparameters]
        if stray:
            raise Invalid(f"method.{kind}.hyperparameters.{stray[0]}: only for method dpo",
                          details=field_errors([(f"method.{kind}.hyperparameters.{stray[0]}", "only for method dpo")]))
    return method


def _only(value: dict, known: tuple[str, ...], field: str, takes: tuple[str, ...] | None = None) -> None:
    """Refuse a key of `value` that is not one of `known` (a null one is as absent): read no further,
    a misspelt or unsupported setting ("n_epoch", "warmup_ratio", "method.dpo" beside type supervised)
    would be dropped, and the job would train on defaults its owner never chose. The refusal says the field
    takes `takes` (default: `known`)."""
    unknown = sorted(key for key, setting in value.items() if key not in known and setting is not None)
    if unknown:
        name = f"{field}.{excerpt(unknown[0], quote=False)}"
        raise Invalid(f"{name}: unknown field; {field} takes {', '.join(takes or known)}",
                      details=field_errors([(name, "unknown field")]))


def _object(parent: dict, key: str, field: str) -> dict:
    """parent[key] as a (copied) dict: absent or null is empty, anything but an object is refused."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"{field}: must be an object, got {type(value).__name__}",
                      details=field_errors([(field, "must be an object")]))
    return dict(value)


def _training_from(hyperparameters: dict, training: dict, max_micro_batch: int | None, base_learning_rate: float) -> dict:
    out: dict = {}
    problems: list[tuple[str, str]] = []
    epochs = hyperparameters.get("n_epochs", "auto")
    if epochs != "auto":
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 50:
            problems.append(("hyperparameters.n_epochs", f"must be 'auto' or an integer in [1, 50], got {excerpt(epochs)}"))
        else:
            out["epochs"] = epochs
    elif "max_steps" not in training and "epochs" not in training:
        out["epochs"] = DEFAULT_EPOCHS
    batch = hyperparameters.get("batch_size", "auto")
    if batch != "auto":
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 256:
            problems.append(("hyperparameters.batch_size", f"must be 'auto' or an integer in [1, 256], got {excerpt(batch)}"))
        else:
            # The effective batch, split into the largest micro-batch that divides it and is no
            # larger than the usual one (memory) nor the operator's ceiling, times gradient accumulation.
            limit = training.get("per_device_batch_size", DEFAULT_MICRO_BATCH)
            limit = DEFAULT_MICRO_BATCH if limit == "auto" else limit
            if max_micro_batch is not None and isinstance(limit, int) and not isinstance(limit, bool):
                limit = min(limit, max_micro_batch)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                problems.append(("training.per_device_batch_size",
                                 f"with hyperparameters.batch_size, the largest micro-batch to split it into: "
                                 f"'auto' or a positive integer, got {excerpt(limit)}"))
            else:
                micro = max(d for d in range(1, min(batch, limit) + 1) if batch % d == 0)
                out["per_device_batch_size"], out["gradient_accumulation_steps"] = micro, batch // micro
    multiplier = hyperparameters.get("learning_rate_multiplier", "auto")
    if multiplier != "auto":
        # The range alone also refuses inf and NaN; math.isfinite() would raise on an integer too
        # large for a float (JSON allows 10**400).
        if not isinstance(multiplier, int | float) or isinstance(multiplier, bool) or not 0 < multiplier <= 10:
            problems.append(("hyperparameters.learning_rate_multiplier",
                             f"must be 'auto' or a number in (0, 10], got {excerpt(multiplier)}"))
        else:
            out["learning_rate"] = base_learning_rate * multiplier
    if problems:
        raise Invalid("; ".join(f"{f}: {m}" for f, m in problems), details=field_errors(problems))
    return out


# What our messages say in our own words, as an OpenAI client knows the things: the ids it sent (with
# their prefixes) and the states it sees (a pausing job shows as running there).
_IN_OPENAI_WORDS = (
    (re.compile(r"\bno dataset '(?!file-)"), f"no file '{FILE}"),
    (re.compile(r"\bno job '(?!ftjob-)"), f"no fine-tuning job '{JOB}"),
    (re.compile(r"\bjob ([0-9a-f]{32})\b"), rf"job {JOB}\1"),
    (re.compile(r"\bdataset ([0-9a-f]{32})\b"), rf"file {FILE}\1"),
    (re.compile(r"\b([0-9a-f]{32}) (?=\((?:" + "|".join(states.ALL) + r")\))"), rf"{JOB}\1 "),  # a job listed with its state
    (re.compile(r"\bit is (pausing|cancelling)\b"), r"it is \1 (shown as running until it stops)"),
    (re.compile(r"\bsee GET /models\b"), "see GET /v1/models, the SDK's models.list()"),  # the registry, as /v1 lists it
)


def openai_param(field: str) -> str:
    """A field of ours as the client named it: OpenAI's name for it, and a query or path parameter
    bare ("limit", as the SDK sent it, not FastAPI's "query.limit")."""
    if field in PARAM_NAMES:
        return PARAM_NAMES[field]
    where, dot, name = field.partition(".")
    return name if dot and where in ("query", "path") else field


def in_openai_words(message: str) -> tuple[str, str | None]:
    """`message` with a leading field of ours (`dataset_id: ...`) named as the client sent it, and our
    ids and states as the client knows them; and that field's OpenAI name, if it led."""
    param = None
    field, colon, rest = message.partition(": ")
    if colon and openai_param(field) != field:
        param = openai_param(field)
        message = f"{param}: {rest}"
    for ours, theirs in _IN_OPENAI_WORDS:
        message = ours.sub(theirs, message)
    return message, param


def openai_error(status: int, message: str, code: str | None, details: Any) -> tuple[int, dict]:
    """Our error as OpenAI's: 400 for bad input and for a state that forbids the request (the SDK
    retries 409), the first field named as `param` under the name an OpenAI client uses, and the
    message in its words (in_openai_words). Details that are not a list of fields (a job too large for
    any GPU: what it needs and what there is) name no param, unless the message leads with one.
    Over a team's quota: 429 with type insufficient_quota, as OpenAI answers its own."""
    first = details[0] if isinstance(details, list) and details else None
    field = first.get("field") if isinstance(first, dict) else None
    message, leading = in_openai_words(message)
    param = openai_param(field) if field else leading
    if status in (409, 422):
        status = 400
    kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
            413: "invalid_request_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    if code == "quota_exceeded":
        kind = "insufficient_quota"  # what OpenAI's own 429 over a quota says
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
