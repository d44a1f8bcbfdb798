"""The OpenAI-compatible surface as pure translation: hyperparameters into our spec and back, ids
with their prefixes, statuses, and errors in OpenAI's shape. A malformed body is a 4xx naming the
part that is wrong, never a crash."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from app.datasets.tables import Dataset
from app.errors import AppError, Conflict, DoesNotFit, Invalid, NotFound, PayloadTooLarge, Unauthorized
from app.jobs import repository, service, states
from app.jobs.tables import Job
from app.openai import translate as t
from app.openai.translate import job_body, openai_error
from worker.training.spec import LEARNING_RATES, JobSpec

BASE = {"model": "llama-3-8b", "training_file": "file-abc"}


def training_of(**body) -> dict:
    return job_body({**BASE, **body})["training"]


# ------------------------------------------------------------------ hyperparameters → our spec


def test_the_minimal_body_becomes_a_native_job_with_openais_default_epochs():
    assert job_body(BASE) == {"base_model": "llama-3-8b", "dataset_id": "abc", "training": {"epochs": 3}}


def test_every_openai_field_lands_on_ours():
    native = job_body({**BASE, "validation_file": "file-val", "suffix": "support-bot", "seed": 11,
                       "metadata": {"team": "support"}, "gpu_class": "l4", "lora": {"r": 8},
                       "quantization": {"bits": 4}, "output": {"merge": False},
                       "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2}})
    assert native == {
        "base_model": "llama-3-8b", "dataset_id": "abc", "validation_dataset_id": "val", "name": "support-bot",
        "metadata": {"team": "support"}, "gpu_class": "l4", "lora": {"r": 8}, "quantization": {"bits": 4},
        "output": {"merge": False},
        "training": {"epochs": 2, "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                     "learning_rate": 2 * LEARNING_RATES["sft"], "seed": 11},
    }
    meta, spec = service.parse_create(native)  # and the native service accepts it as it is
    assert spec.training.epochs == 2 and spec.lora.r == 8 and meta["gpu_class"] == "l4"


@pytest.mark.parametrize(("batch_size", "micro", "accumulation"), [
    (1, 1, 1), (4, 4, 1), (8, 4, 2), (12, 4, 3), (16, 4, 4), (6, 3, 2), (7, 1, 7), (256, 4, 64)])
def test_batch_size_is_split_into_micro_batch_and_accumulation(batch_size, micro, accumulation):
    """The effective batch OpenAI means, held at most 4 sequences at a time (the usual micro-batch)."""
    training = training_of(hyperparameters={"batch_size": batch_size})
    assert (training["per_device_batch_size"], training["gradient_accumulation_steps"]) == (micro, accumulation)


def test_a_micro_batch_given_beside_batch_size_bounds_the_split():
    training = training_of(hyperparameters={"batch_size": 16}, training={"per_device_batch_size": 8})
    assert (training["per_device_batch_size"], training["gradient_accumulation_steps"]) == (8, 2)
    training = training_of(hyperparameters={"batch_size": 16}, training={"per_device_batch_size": "auto"})
    assert (training["per_device_batch_size"], training["gradient_accumulation_steps"]) == (4, 4)


def test_auto_leaves_our_defaults_and_n_epochs_auto_respects_a_stopping_rule_of_ours():
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert training_of(hyperparameters=auto) == {"epochs": 3}
    assert training_of(hyperparameters=auto, training={"max_steps": 50}) == {"max_steps": 50}
    assert training_of(training={"epochs": 1.5}) == {"epochs": 1.5}


def test_method_supervised_hyperparameters_win_over_the_legacy_field():
    training = training_of(hyperparameters={"n_epochs": 5, "learning_rate_multiplier": 3},
                           method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert training == {"epochs": 2, "learning_rate": 3 * LEARNING_RATES["sft"]}


@pytest.mark.parametrize(("hyperparameters", "field"), [
    ({"n_epochs": 0}, "hyperparameters.n_epochs"), ({"n_epochs": 51}, "hyperparameters.n_epochs"),
    ({"n_epochs": 2.5}, "hyperparameters.n_epochs"), ({"n_epochs": True}, "hyperparameters.n_epochs"),
    ({"n_epochs": "3"}, "hyperparameters.n_epochs"), ({"batch_size": 0}, "hyperparameters.batch_size"),
    ({"batch_size": 257}, "hyperparameters.batch_size"), ({"batch_size": "big"}, "hyperparameters.batch_size"),
    ({"learning_rate_multiplier": 0}, "hyperparameters.learning_rate_multiplier"),
    ({"learning_rate_multiplier": -1}, "hyperparameters.learning_rate_multiplier"),
    ({"learning_rate_multiplier": 11}, "hyperparameters.learning_rate_multiplier"),
    ({"learning_rate_multiplier": float("nan")}, "hyperparameters.learning_rate_multiplier"),
    ({"learning_rate_multiplier": float("inf")}, "hyperparameters.learning_rate_multiplier"),
])
def test_an_out_of_range_hyperparameter_is_named_with_its_range(hyperparameters, field):
    with pytest.raises(Invalid) as refused:
        job_body({**BASE, "hyperparameters": hyperparameters})
    assert refused.value.details == [{"field": field, "message": refused.value.details[0]["message"]}]
    assert "must be 'auto' or" in refused.value.message
    status, shaped = openai_error(refused.value.status, refused.value.message, refused.value.code,
                                  refused.value.details)
    assert status == 400 and shaped["error"]["param"] == field and shaped["error"]["type"] == "invalid_request_error"


def test_every_bad_hyperparameter_is_reported_at_once():
    with pytest.raises(Invalid) as refused:
        job_body({**BASE, "hyperparameters": {"n_epochs": 0, "batch_size": 0, "learning_rate_multiplier": 0}})
    assert [d["field"] for d in refused.value.details] == [
        "hyperparameters.n_epochs", "hyperparameters.batch_size", "hyperparameters.learning_rate_multiplier"]


# Bodies a client can send that are wrong in shape: each must be a 4xx naming the part, not a 500.
BAD_BODIES = [
    ([], "(body)", 422),
    ({**BASE, "hyperparameters": [1, 2]}, "hyperparameters", 422),
    ({**BASE, "hyperparameters": "n_epochs=3"}, "hyperparameters", 422),
    ({**BASE, "method": "supervised"}, "method", 422),
    ({**BASE, "method": {"type": "reinforcement"}}, "method.type", 422),
    ({**BASE, "method": {"type": "supervised", "supervised": [1]}}, "method.supervised", 422),
    ({**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": 3}}},
     "method.supervised.hyperparameters", 422),
    ({**BASE, "training": "fast"}, "training", 422),
    ({**BASE, "training": [["epochs", 1]]}, "training", 422),
    ({**BASE, "training": {"per_device_batch_size": 0}, "hyperparameters": {"batch_size": 8}},
     "training.per_device_batch_size", 422),
    ({**BASE, "training": {"per_device_batch_size": "x"}, "hyperparameters": {"batch_size": 8}},
     "training.per_device_batch_size", 422),
    ({**BASE, "validation_file": 5}, "validation_file", 422),
    ({**BASE, "model": None}, "model", 422),
    ({"model": "m"}, "training_file", 422),
    ({**BASE, "training_file": 42}, "training_file", 422),
    ({**BASE, "learning_rate": 0.1}, "learning_rate", 422),
    ({**BASE, "integrations": [{"type": "wandb"}]}, "integrations", 422),
    # A setting this service does not know, at any depth, is refused rather than dropped: a misspelt
    # n_epochs would otherwise train 3 epochs, a dpo beta beside type supervised would be ignored.
    ({**BASE, "hyperparameters": {"n_epoch": 2}}, "hyperparameters.n_epoch", 422),
    ({**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": {"warmup_ratio": 0.1}}}},
     "method.supervised.hyperparameters.warmup_ratio", 422),
    ({**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"bta": 0.2}}}}, "method.dpo.hyperparameters.bta", 422),
    ({**BASE, "method": {"type": "supervised", "supervised": {"hyperparameter": {"n_epochs": 1}}}},
     "method.supervised.hyperparameter", 422),
    ({**BASE, "method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}}}, "method.dpo", 422),
    ({**BASE, "method": {"type": "supervised", "seed": 3}}, "method.seed", 422),
    ({**BASE, "training_file": "abc"}, None, 404),  # an id without its prefix is as missing as a wrong one
    ({**BASE, "training_file": "file-"}, None, 404),
    ({**BASE, "validation_file": "ftjob-abc"}, None, 404),
]


@pytest.mark.parametrize(("body", "field", "status"), BAD_BODIES)
def test_a_malformed_body_is_a_client_error_that_names_the_part(body, field, status):
    with pytest.raises(AppError) as refused:
        job_body(body)
    error = refused.value
    assert error.status == status
    if field is not None:
        assert error.details[0]["field"] == field and error.message
    shaped_status, shaped = openai_error(error.status, error.message, error.code, error.details)
    assert shaped_status == (400 if status == 422 else status)
    assert shaped["error"]["param"] == (t.PARAM_NAMES.get(field, field) if field else None)
    assert shaped["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("kind", "takes"), [
    ("supervised", "n_epochs, batch_size, learning_rate_multiplier"),
    ("dpo", "n_epochs, batch_size, learning_rate_multiplier, beta, loss, label_smoothing")])
def test_an_unknown_hyperparameter_is_told_what_its_method_takes(kind, takes):
    """Not what another method takes: a supervised job was told it took beta, and then refused beta."""
    with pytest.raises(Invalid) as refused:
        job_body({**BASE, "method": {"type": kind, kind: {"hyperparameters": {"warmup": 3}}}})
    assert refused.value.message.endswith(f"method.{kind}.hyperparameters takes {takes}"), refused.value.message


def test_a_null_setting_is_as_absent_as_an_unset_one():
    """What a client's model of the body sends for what it leaves unset (the SDK's own types do)."""
    native = job_body({**BASE, "hyperparameters": {"n_epochs": 2, "warmup": None},
                       "method": {"type": "dpo", "supervised": None, "dpo": {"hyperparameters": {"beta": 0.2}}}})
    assert native["method"] == {"type": "dpo", "beta": 0.2} and native["training"]["epochs"] == 2


@pytest.mark.parametrize("body", [
    {**BASE, "lora": {"r": 0}}, {**BASE, "lora": "big"}, {**BASE, "quantization": {"bits": 3}},
    {**BASE, "seed": -1}, {**BASE, "suffix": 7}, {**BASE, "metadata": ["x"]}, {**BASE, "gpu_class": "L4!"},
    {**BASE, "training": {"epochs": 1, "max_steps": 5}},
    # NUL in a pair: Postgres cannot read it out of the stored JSON as text, so once stored every
    # metadata filter of the team failed (500), and no filter could name it (a URL with %00 is refused).
    {**BASE, "metadata": {"run": "a\x00b"}}, {**BASE, "metadata": {"a\x00": "b"}},
])
def test_what_openai_does_not_define_is_refused_by_the_native_service(body):
    """Passed on as it is; the native service validates it like any other job, naming our field."""
    with pytest.raises(Invalid) as refused:
        service.parse_create(job_body(body))
    assert refused.value.status == 422 and refused.value.code == "invalid_job"
    field = refused.value.details[0]["field"]
    _, shaped = openai_error(422, refused.value.message, refused.value.code, refused.value.details)
    assert shaped["error"]["param"] == t.PARAM_NAMES.get(field, field)


# ------------------------------------------------------------------ errors in OpenAI's shape


@pytest.mark.parametrize(("error", "status", "kind"), [
    (Invalid("bad"), 400, "invalid_request_error"),
    (DoesNotFit("too big"), 400, "invalid_request_error"),
    # The SDK retries a 409: a request the job's state forbids is answered 400 so it is not repeated.
    (Conflict("cannot pause job x: it has succeeded", code="invalid_state"), 400, "invalid_request_error"),
    (NotFound("no job"), 404, "invalid_request_error"),
    (PayloadTooLarge("too large"), 413, "invalid_request_error"),
    (Unauthorized("missing key"), 401, "authentication_error"),
    (AppError("forbidden"), 400, "invalid_request_error"),
])
def test_our_errors_in_openais_shape(error, status, kind):
    shaped_status, shaped = openai_error(error.status, error.message, error.code, error.details)
    assert shaped_status == status
    assert shaped == {"error": {"message": error.message, "type": kind, "param": None, "code": error.code}}


def test_forbidden_and_server_errors_keep_their_status():
    assert openai_error(403, "admin only", "forbidden", None) == (
        403, {"error": {"message": "admin only", "type": "permission_error", "param": None, "code": "forbidden"}})
    assert openai_error(500, "boom", None, None)[1]["error"]["type"] == "server_error"
    assert openai_error(503, "down", None, None)[0] == 503


@pytest.mark.parametrize(("ours", "theirs"), [
    ("dataset_id", "training_file"), ("validation_dataset_id", "validation_file"), ("base_model", "model"),
    ("name", "suffix"), ("training.seed", "seed"), ("training.epochs", "hyperparameters.n_epochs"),
    ("training.learning_rate", "hyperparameters.learning_rate_multiplier"),
    ("training.per_device_batch_size", "hyperparameters.batch_size"),
    ("training.gradient_accumulation_steps", "hyperparameters.batch_size"),
    ("lora.r", "lora.r"),  # ours alone (the SDK's extra_body): named as sent
])
def test_the_first_bad_field_is_named_as_an_openai_client_sent_it(ours, theirs):
    details = [{"field": ours, "message": "wrong"}, {"field": "lora.alpha", "message": "also wrong"}]
    assert openai_error(422, "m", "invalid_job", details)[1]["error"]["param"] == theirs


def test_a_query_parameter_is_named_as_the_sdk_sent_it():
    details = [{"field": "query.limit", "message": "Input should be a valid integer"}]
    assert openai_error(422, "query.limit: Input should be a valid integer", "invalid", details)[1]["error"] == {
        "message": "limit: Input should be a valid integer", "type": "invalid_request_error", "param": "limit",
        "code": "invalid"}


def test_details_that_name_no_field_give_no_param():
    for details in (None, [], ["a string"], {"needed_bytes": 1}):
        assert openai_error(400, "m", "c", details)[1]["error"]["param"] is None


# ------------------------------------------------------------------ our objects → OpenAI's


OPENAI_STATUSES = {"validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"}


def test_every_state_has_an_openai_status():
    assert set(t.STATUS) == set(states.ALL)
    assert set(t.STATUS.values()) <= OPENAI_STATUSES
    # Still at work on a GPU until the worker says otherwise.
    assert t.STATUS[states.CANCELLING] == t.STATUS[states.PAUSING] == "running"
    assert all(t.STATUS[s] == s for s in states.ALL if s not in (states.CANCELLING, states.PAUSING))


@pytest.mark.parametrize(("openai_id", "prefix", "native"), [
    ("file-abc", t.FILE, "abc"), ("ftjob-0123", t.JOB, "0123"), ("ftevent-42", t.EVENT, "42"),
    ("ftckpt-x", t.CHECKPOINT, "x")])
def test_ids_carry_openais_prefixes(openai_id, prefix, native):
    assert t.native_id(openai_id, prefix, "thing") == native


@pytest.mark.parametrize(("model", "job_id"), [
    ("ft:llama-3-8b:team-a:bot:" + "0" * 32, "0" * 32), ("ft:org/m:v2:team:a:b:c1", "c1"),  # the id is the last part
    ("tiny-demo", None), ("org/model:v2", None), ("ft", None)])
def test_a_fine_tuned_models_name_ends_with_its_job(model, job_id):
    assert t.fine_tuned_job_id(model) == job_id


@pytest.mark.parametrize("openai_id", ["abc", "file-", "ftjob-abc", "", "FILE-abc"])
def test_a_malformed_id_is_not_found(openai_id):
    with pytest.raises(NotFound, match="no file"):
        t.native_id(openai_id, t.FILE, "file")


@pytest.mark.parametrize("status", states.ALL)
def test_a_job_as_openai_shows_it(session, caller, make_job, status):
    finished = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    job_id = make_job(status, name="bot", dataset_id=None, created_dataset_id="d" * 32,
                      error="CUDA out of memory at step 3" if status == "failed" else None, trained_tokens=1234,
                      finished_at=finished if status in states.FINISHED else None)
    job = session.get(Job, job_id)
    shown = t.job_object(job, "team-a")
    assert shown["id"] == "ftjob-" + job_id and shown["status"] == t.STATUS[status]
    assert shown["created_at"] == int(job.created_at.timestamp())
    assert shown["finished_at"] == (int(finished.timestamp()) if status in states.FINISHED else None)
    assert shown["training_file"] == "file-" + "d" * 32 and shown["organization_id"] == caller.team_id
    succeeded = status == states.SUCCEEDED
    assert shown["fine_tuned_model"] == (f"ft:llama-3-8b:team-a:bot:{job_id}" if succeeded else None)
    assert shown["trained_tokens"] == (1234 if succeeded else None)
    assert shown["error"] == ({"code": "job_failed", "message": "CUDA out of memory at step 3", "param": None}
                              if status == states.FAILED else None)
    # The spec trains for max_steps: no epochs were chosen ("auto" said one was); the batch is micro x accumulation.
    assert shown["hyperparameters"] == {"n_epochs": None, "batch_size": 16, "learning_rate_multiplier": 1.0}
    # As the openai SDK's own types take it, strictly; but "paused" (after its jobs.pause()), which its FineTuningJob's
    # list of statuses does not hold (the SDK keeps it as sent).
    FineTuningJob.model_validate({**shown, "status": "queued"} if status == states.PAUSED else shown, strict=True)


def test_hyperparameters_read_back_from_a_spec():
    def shown(**training):
        spec = JobSpec.parse({"base_model": "m", "training": training}).model_dump(mode="json")
        return t.hyperparameters_of(spec)

    assert shown(epochs=2, per_device_batch_size=2, gradient_accumulation_steps=3, learning_rate=4e-4) == {
        "n_epochs": 2, "batch_size": 6, "learning_rate_multiplier": 2.0}
    assert shown(epochs=1.5)["n_epochs"] is None  # OpenAI's n_epochs holds an integer; spec.training says 1.5
    assert shown(max_steps=5, per_device_batch_size="auto")["batch_size"] == "auto"


def test_events_and_checkpoints_as_openai_shows_them(session, make_job):
    job_id = make_job(states.RUNNING, attempt=2)
    job = session.get(Job, job_id)
    event = repository.add_event(session, job_id, "cancel_requested", "warning", "stop after this step",
                                 attempt=2, step=30, data={"why": "user"})
    checkpoint = repository.add_checkpoint(session, job_id, 2, 30, "k", 1, "0" * 64, train_loss=1.5, eval_loss=None)
    session.flush()
    shown = t.event_object(event)
    assert shown["id"] == f"ftevent-{event.id}" and shown["object"] == "fine_tuning.job.event"
    assert shown["level"] == "warn" and shown["message"] == "stop after this step"
    assert shown["data"] == {"type": "cancel_requested", "step": 30, "attempt": 2, "why": "user"}
    shown = t.checkpoint_object(checkpoint, job, "team-a")
    assert shown["id"] == "ftckpt-" + checkpoint.id and shown["fine_tuning_job_id"] == "ftjob-" + job_id
    assert shown["step_number"] == 30 and shown["metrics"] == {"step": 30, "train_loss": 1.5}
    assert shown["fine_tuned_model_checkpoint"] == f"ft:llama-3-8b:team-a:{job.name}:{job_id}:ckpt-step-30"
    FineTuningJobCheckpoint.model_validate(shown, strict=True)
    FineTuningJobEvent.model_validate(t.event_object(event), strict=True)


def test_a_file_as_openai_shows_it(session, caller):
    good = Dataset(team_id=caller.team_id, filename="train.jsonl", storage_key="k1", bytes=99, sha256="0" * 64,
                   status="ready", rows=3)
    bad = Dataset(team_id=caller.team_id, filename="bad.jsonl", storage_key="k2", bytes=5, sha256="1" * 64,
                  status="invalid", error_count=2,
                  errors=[{"line": 1, "message": "not JSON"}, {"line": 4, "message": "no messages"}])
    session.add_all([good, bad])
    session.flush()
    assert t.file_object(good) | {"created_at": None} == {
        "id": "file-" + good.id, "object": "file", "bytes": 99, "created_at": None, "filename": "train.jsonl",
        "purpose": "fine-tune", "expires_at": None, "status": "processed", "status_details": None}
    shown = t.file_object(bad)
    assert shown["status"] == "error"
    assert shown["status_details"] == "2 invalid lines; line 1: not JSON; line 4: no messages"
    FileObject.model_validate(shown, strict=True)
    bad.error_count, bad.errors = 1, [{"line": 2, "message": "not JSON"}]
    assert t.file_object(bad)["status_details"] == "1 invalid line; line 2: not JSON"


JOB_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("ours, theirs, param", [
    ("dataset_id: no dataset 'nope'", "training_file: no file 'file-nope'", "training_file"),
    ("validation_dataset_id: no dataset 'x'", "validation_file: no file 'file-x'", "validation_file"),
    (f"no job '{JOB_ID}'", f"no fine-tuning job 'ftjob-{JOB_ID}'", None),
    ("base_model: 'llama' is not a registered model", "model: 'llama' is not a registered model", "model"),
    # The registry as the client lists it: GET /models is the native route, not the SDK's.
    ("base_model: 'gpt-4o-mini' is not a registered model (registered: tiny; see GET /models)",
     "model: 'gpt-4o-mini' is not a registered model (registered: tiny; see GET /v1/models, the SDK's models.list())",
     "model"),
    (f"cannot resume job {JOB_ID}: it is pausing; it is saving its checkpoint: resume it once it is paused",
     f"cannot resume job ftjob-{JOB_ID}: it is pausing (shown as running until it stops); it is saving its checkpoint: "
     "resume it once it is paused", None),
    ("lora.r: Input should be greater than or equal to 1", "lora.r: Input should be greater than or equal to 1", None),
    (f"dataset {JOB_ID} is used by jobs that have not finished: {JOB_ID[::-1]} (queued), {JOB_ID} (running); cancel them",
     f"file file-{JOB_ID} is used by jobs that have not finished: ftjob-{JOB_ID[::-1]} (queued), ftjob-{JOB_ID} (running); "
     "cancel them", None),
    (f"dataset_id: method dpo trains on a preference dataset, but dataset {JOB_ID} is chat",
     f"training_file: method dpo trains on a preference dataset, but file file-{JOB_ID} is chat", "training_file"),
    # FastAPI's own check of a query parameter: the SDK sent `limit`.
    ("query.limit: Input should be a valid integer", "limit: Input should be a valid integer", "limit"),
])
def test_an_error_speaks_of_what_the_openai_client_sent_and_sees(ours, theirs, param):
    """A /v1 client sent training_file "file-nope", not dataset_id "nope"; it sees a pausing job as running."""
    status, body = openai_error(404, ours, "not_found", None)
    assert (body["error"]["message"], body["error"]["param"]) == (theirs, param)


# ------------------------------------------------------------------ jobs.list's metadata filter


@pytest.mark.parametrize(("query", "wanted"), [
    ([], {}), ([("limit", "2"), ("after", "ftjob-x")], {}),
    ([("metadata[team]", "nlp"), ("metadata[run]", "")], {"team": "nlp", "run": ""}),  # an empty value is a value
    ([("metadata[a]b]", "1"), ("metadata[é]", "ü")], {"a]b": "1", "é": "ü"}),
    ([("metadata[k]", "v"), ("metadata[k]", "v")], {"k": "v"}),
    ([("metadata", "null")], None),
])
def test_the_metadata_filter_is_read_as_the_sdk_sends_it(query, wanted):
    assert t.metadata_filter(query) == wanted


@pytest.mark.parametrize("query", [
    [("metadata", "null"), ("metadata[k]", "v")], [("metadata", "{}")], [("metadata[k]", "a"), ("metadata[k]", "b")],
    [(f"metadata[k{i}]", "v") for i in range(17)],
])
def test_a_metadata_filter_that_can_match_nothing_sensible_is_refused(query):
    with pytest.raises(Invalid) as refused:
        t.metadata_filter(query)
    assert refused.value.details[0]["field"] == "metadata"


def test_jobs_are_listed_by_their_metadata(session, caller, make_job):
    """Keys SQLite's JSON paths would miss (a quote, non-ASCII) are found as well as plain ones."""
    tagged = make_job(user_metadata={"team": "nlp", 'say "hi"': "é", "ключ": "значение"})
    other = make_job(user_metadata={"team": "vision"})
    bare = make_job()

    def listed(metadata):
        return [job.id for job in service.list_page(session, caller, None, None, 10, metadata).data]

    assert set(listed({})) == {tagged, other, bare}
    assert listed({"team": "nlp"}) == [tagged]
    assert listed({'say "hi"': "é", "ключ": "значение"}) == [tagged]
    assert listed({"team": "nlp", "ключ": "other"}) == [] and listed({"missing": ""}) == []
    assert listed(None) == [bare]


# ------------------------------------------------------------------ jobs.retrieve() of a queued job


def test_a_queued_job_retrieved_says_what_it_waits_for_as_get_jobs_does(client, session, settings):
    """jobs.retrieve() of a job queued where no worker of its class was up said "queued" and nothing more, for as
    long as it waited; GET /jobs/{id} said no worker was up, and who starts one. Now both say it, alike."""
    from app.jobs.tables import Job
    from app.teams.tables import Team

    team = session.query(Team).filter_by(name="team-a").one()
    job = Job(team_id=team.id, status="queued", attempt=0, base_model="llama-3-8b", queue="gpu-default",
              spec=JobSpec.parse({"base_model": "llama-3-8b", "training": {"max_steps": 10}}).model_dump(mode="json"))
    session.add(job)
    session.commit()
    native = client.get(f"/jobs/{job.id}").json()
    retrieved = client.get(f"/v1/fine_tuning/jobs/ftjob-{job.id}")
    assert retrieved.status_code == 200, retrieved.text
    shown = retrieved.json()
    assert shown["status"] == "queued" and native["waiting_for"] == "no_worker", native
    assert {k: shown[k] for k in ("queue_position", "waiting_for", "waiting_detail")} == \
        {k: native[k] for k in ("queue_position", "waiting_for", "waiting_detail")}
    assert "no worker of GPU class default is up" in shown["waiting_detail"]
    again = client.get(f"/v1/fine_tuning/jobs/ftjob-{job.id}", headers={"If-None-Match": retrieved.headers["etag"]})
    assert again.status_code == 304  # still the polled read: an unchanged job costs no body
    listed = client.get("/v1/fine_tuning/jobs").json()["data"][0]
    assert listed["id"] == f"ftjob-{job.id}" and listed["waiting_for"] is None  # a page leaves it out, as GET /jobs does


# ------------------------------------------------------------------ what jobs.retrieve() and the files API tell of a run


def _team_job(session, team_name: str = "team-a", **values) -> Job:
    from app.teams.tables import Team

    team = session.query(Team).filter_by(name=team_name).one()
    job = Job(team_id=team.id, attempt=1, base_model="llama-3-8b", queue="gpu-default",
              spec=JobSpec.parse({"base_model": "llama-3-8b", "training": {"max_steps": 50}}).model_dump(mode="json"),
              **values)
    session.add(job)
    session.commit()
    return job


def _point(session, job_id: str, kind: str, step: int, at: datetime, loss: float) -> None:
    repository.upsert_metric(session, job_id, {"kind": kind, "step": step, "epoch": step / 50,
                                               ("train_loss" if kind == "train" else "eval_loss"): loss}, at=at)
    session.commit()


def test_a_running_job_retrieved_says_when_it_should_finish_at_its_current_pace(client, session):
    """estimated_finish was always null. It is the newest point's time plus the steps left at the pace of this attempt
    (10 s a step here); a point from before the job was claimed again (its earlier attempt, then a wait) is no part of
    the pace; a job with one point of this attempt, or one pausing (it stops early), has none."""
    claimed = datetime(2025, 1, 2, 3, 0, 0, tzinfo=UTC)
    job = _team_job(session, status=states.RUNNING, total_steps=50, step=20, claimed_at=claimed)
    _point(session, job.id, "train", 5, claimed - timedelta(hours=2), 2.0)  # the earlier attempt's
    _point(session, job.id, "train", 10, claimed + timedelta(seconds=100), 1.5)
    _point(session, job.id, "eval", 10, claimed + timedelta(seconds=140), 1.6)  # an eval point paces nothing
    _point(session, job.id, "train", 20, claimed + timedelta(seconds=200), 1.0)

    def finish() -> int | None:
        return client.get(f"/v1/fine_tuning/jobs/ftjob-{job.id}").json()["estimated_finish"]

    assert finish() == int(claimed.timestamp()) + 200 + 30 * 10
    assert client.get("/v1/fine_tuning/jobs").json()["data"][0]["estimated_finish"] is None  # a list reads no pace
    session.query(Job).filter_by(id=job.id).update({"claimed_at": claimed + timedelta(seconds=150)})
    session.commit()
    assert finish() is None  # one point since this claim
    session.query(Job).filter_by(id=job.id).update({"claimed_at": claimed, "status": states.PAUSING})
    session.commit()
    assert finish() is None


def test_a_pace_that_would_finish_past_the_calendar_gives_no_estimate_not_a_500(client, session):
    """A worker's clock that jumped a day between the attempt's first two points (a VM resumed from suspend, NTP
    stepping it) makes a day a step; with ten million steps left that is past the year 9999, which a datetime cannot
    hold: jobs.retrieve() answered 500 at every poll until more points came. It has no estimate instead."""
    claimed = datetime(2025, 1, 2, 3, 0, 0, tzinfo=UTC)
    job = _team_job(session, status=states.RUNNING, total_steps=10_000_000, step=2, claimed_at=claimed)
    _point(session, job.id, "train", 1, claimed + timedelta(seconds=10), 2.0)
    _point(session, job.id, "train", 2, claimed + timedelta(days=1, seconds=10), 1.5)
    retrieved = client.get(f"/v1/fine_tuning/jobs/ftjob-{job.id}")
    assert retrieved.status_code == 200, retrieved.text
    assert retrieved.json()["estimated_finish"] is None


def test_a_succeeded_jobs_result_file_is_its_curve_as_csv_and_only_its_team_reads_it(client, session):
    """result_files was always []: a script written for a hosted API reads job.result_files[0] with files.content().
    It is the curve, one row per step; another team's, or a job's that has not succeeded, is as missing as a wrong id."""
    from app.teams.service import create_team

    at = datetime(2025, 1, 2, 3, 0, 0, tzinfo=UTC)
    job = _team_job(session, status=states.SUCCEEDED, total_steps=50, finished_at=at)
    for kind, step, loss in (("train", 10, 1.5), ("train", 20, 1.25), ("eval", 20, 1.75)):
        _point(session, job.id, kind, step, at, loss)
    shown = client.get(f"/v1/fine_tuning/jobs/ftjob-{job.id}").json()
    assert shown["result_files"] == [f"file-results-{job.id}"]
    results = client.get(f"/v1/files/file-results-{job.id}")
    assert results.status_code == 200, results.text
    content = client.get(f"/v1/files/file-results-{job.id}/content")
    assert content.text.splitlines() == ["step,epoch,train_loss,valid_loss,learning_rate,grad_norm,tokens_seen",
                                         "10,0.2,1.5,,,,", "20,0.4,1.25,1.75,,,"]
    assert results.json() == {"id": f"file-results-{job.id}", "object": "file", "bytes": len(content.content),
                              "created_at": int(at.timestamp()), "filename": "step_metrics.csv",
                              "purpose": "fine-tune-results", "expires_at": None, "status": "processed",
                              "status_details": None}
    assert client.delete(f"/v1/files/file-results-{job.id}").status_code == 400

    create_team(session, "team-b")
    session.commit()
    others = _team_job(session, "team-b", status=states.SUCCEEDED, total_steps=50, finished_at=at)
    running = _team_job(session, status=states.RUNNING, total_steps=50)
    for job_id in (others.id, running.id, "0" * 32):
        for path in (f"/v1/files/file-results-{job_id}", f"/v1/files/file-results-{job_id}/content"):
            missing = client.get(path)
            assert missing.status_code == 404
            assert missing.json()["error"]["message"] == f"no file 'file-results-{job_id}'"


def test_a_result_file_is_built_once_for_its_retrieve_and_its_reads(client, session):
    """A succeeded job's curve is final, so its CSV is built once: `files.retrieve` (its bytes) and each
    `files.content` built it again, about 8 s for a 500,000-point curve. A point written after the first read
    (none is, for a succeeded job) shows the later reads were not built anew."""
    at = datetime(2025, 1, 2, 3, 0, 0, tzinfo=UTC)
    job = _team_job(session, status=states.SUCCEEDED, total_steps=50, finished_at=at)
    _point(session, job.id, "train", 10, at, 1.5)
    first = client.get(f"/v1/files/file-results-{job.id}")
    _point(session, job.id, "train", 20, at, 1.25)
    assert client.get(f"/v1/files/file-results-{job.id}/content").text.splitlines()[1:] == ["10,0.2,1.5,,,,"]
    assert client.get(f"/v1/files/file-results-{job.id}").json()["bytes"] == first.json()["bytes"]


def test_result_files_build_each_csv_once_and_keep_what_fits():
    """Requests for one job that come during its build wait for it; the least lately read goes first past the
    bytes kept; a CSV larger than those is built at each read."""
    from app.openai.result_files import ResultFiles

    files, started, release, builds = ResultFiles(kept_bytes=10), threading.Event(), threading.Event(), []

    def slow_build():
        builds.append("a")
        started.set()
        release.wait(30)
        return b"aaaa"

    results: list[bytes] = []
    readers = [threading.Thread(target=lambda: results.append(files.get("a", slow_build))) for _ in range(4)]
    readers[0].start()
    assert started.wait(30)
    for reader in readers[1:]:
        reader.start()
    release.set()
    for reader in readers:
        reader.join(30)
    assert results == [b"aaaa"] * 4 and builds == ["a"]

    assert files.get("b", lambda: b"bbbb") == b"bbbb"
    assert files.get("a", lambda: b"new!") == b"aaaa"  # read lately: b is now the least lately read
    assert files.get("c", lambda: b"cccc") == b"cccc"  # 12 bytes kept: b goes
    assert files.get("b", lambda: b"BBBB") == b"BBBB"
    assert files.get("big", lambda: b"x" * 11) == b"x" * 11
    assert files.get("big", lambda: b"y" * 11) == b"y" * 11


def test_the_result_file_has_one_row_a_step_when_an_evaluation_comes_on_the_next_page():
    """Pages of (train, eval) tuples as curve_page reads them: step 20's eval point on the page after its train point."""
    def train(step, loss):
        return (step, step / 50, loss, 1e-4, 0.5, step * 100, None, None, None, None, None, None, None)

    def evaluation(step, loss):
        return (step, step / 50, loss, 0.75, None, None, 0.125)

    pages = [([train(10, 1.5), train(20, 1.25)], [evaluation(10, 1.0)]), ([train(30, 1.0)], [evaluation(20, 2.0)])]
    assert t.results_csv(pages, dpo=False).decode().splitlines() == [
        "step,epoch,train_loss,valid_loss,learning_rate,grad_norm,tokens_seen",
        "10,0.2,1.5,1.0,0.0001,0.5,1000", "20,0.4,1.25,2.0,0.0001,0.5,2000", "30,0.6,1.0,,0.0001,0.5,3000"]
    header, first = t.results_csv(pages[:1], dpo=True).decode().splitlines()[:2]
    assert header.endswith(",train_reward_accuracy,train_reward_margin,train_reward_chosen,train_reward_rejected,"
                           "valid_reward_accuracy,valid_reward_margin,valid_reward_chosen,valid_reward_rejected")
    assert first.endswith(",,,,,0.75,0.125,,")


def test_native_routes_take_the_ids_the_openai_sdk_printed(client, session):
    """GET /jobs/ftjob-… answered a bare 404 (the `qlora` CLI took both names, curl did not): now the same job or
    dataset, while another team's is as missing by either name as an id that names nothing."""
    from app.teams.service import create_team

    job = _team_job(session, status=states.QUEUED)
    dataset = Dataset(team_id=job.team_id, filename="d.jsonl", storage_key="team-a/d", bytes=10, sha256="0" * 64,
                      status="ready")
    session.add(dataset)
    create_team(session, "team-b")
    session.commit()
    assert client.get(f"/jobs/ftjob-{job.id}").json()["id"] == job.id
    assert client.get(f"/jobs/ftjob-{job.id}/events").status_code == 200
    assert client.get(f"/datasets/file-{dataset.id}").json()["id"] == dataset.id
    others = _team_job(session, "team-b", status=states.QUEUED)
    nothing = client.get(f"/jobs/ftjob-{'0' * 32}")
    assert nothing.status_code == 404
    for name in (others.id, f"ftjob-{others.id}"):
        missing = client.get(f"/jobs/{name}")
        assert (missing.status_code, missing.text) == (404, nothing.text.replace("0" * 32, others.id))
