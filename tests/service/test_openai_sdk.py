"""The official `openai` SDK, pointed at /v1 with a team key, drives the whole fine-tuning flow."""

from __future__ import annotations

import time

import openai
import pytest
from openai import OpenAI

from tests.deployment import lane

FINISHED = ("succeeded", "failed", "cancelled")

EXTRA = {  # LoRA, quantization and the rest of our spec ride in the SDK's extra_body
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "quantization": {"bits": 4, "quant_type": "nf4"},
    # What is checked is the flow and its pages (three checkpoints, the events), not how well it learns:
    # 30 steps make them as 60 did, and no eval report (its answers and losses are not read here).
    "training": {"max_steps": 30, "max_seq_length": 64, "logging_steps": 5, "save_steps": 10, "eval_steps": 15,
                 "lr_scheduler": "cosine"},
    "eval": {"prompts": 0},
}
HYPERPARAMETERS = {"batch_size": 16, "learning_rate_multiplier": 10}


@pytest.fixture(scope="module")
def sdk(deployment):
    return OpenAI(base_url=deployment.url + "/v1", api_key=deployment.team_key("sdk-team"), max_retries=0)


@pytest.fixture(scope="module")
def files(sdk, demo_data):
    with open(demo_data["train"], "rb") as f:
        train = sdk.files.create(file=f, purpose="fine-tune")
    with open(demo_data["validation"], "rb") as f:
        validation = sdk.files.create(file=f, purpose="fine-tune")
    return sdk.files.wait_for_processing(train.id), sdk.files.wait_for_processing(validation.id)


@pytest.fixture(scope="module")
def finished(sdk, files, worker):
    train, validation = files
    job = sdk.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=validation.id, suffix="sounds", seed=7,
        metadata={"ticket": "ML-42"},
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        extra_body=EXTRA,
    )
    assert job.status == "queued" and job.id.startswith("ftjob-")
    deadline = time.monotonic() + 240
    while job.status not in FINISHED:
        assert time.monotonic() < deadline, job
        time.sleep(1)
        job = sdk.fine_tuning.jobs.retrieve(job.id)
    return job


def test_files_upload_process_and_read_back(sdk, files, demo_data):
    train, _ = files
    assert train.id.startswith("file-") and train.object == "file" and train.purpose == "fine-tune"
    assert train.status == "processed" and train.bytes == demo_data["train"].stat().st_size
    assert train.filename == "train.jsonl" and isinstance(train.created_at, int)
    assert sdk.files.retrieve(train.id).id == train.id
    assert sdk.files.content(train.id).read() == demo_data["train"].read_bytes()
    listed = [f.id for f in sdk.files.list(purpose="fine-tune")]
    assert train.id in listed


def test_job_runs_to_success_with_the_requested_settings(finished, files):
    job = finished
    assert job.status == "succeeded", job.error
    assert job.object == "fine_tuning.job" and job.model == "tiny"
    assert job.training_file == files[0].id and job.validation_file == files[1].id
    assert job.fine_tuned_model.startswith("ft:tiny:sdk-team:sounds:")
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.seed == 7 and job.metadata == {"ticket": "ML-42"}
    hp = job.method.supervised.hyperparameters
    assert (hp.batch_size, hp.learning_rate_multiplier) == (16, 10)
    spec = job.model_extra["spec"]
    assert spec["lora"]["r"] == 8 and spec["training"]["learning_rate"] == pytest.approx(2e-3)
    assert spec["training"]["per_device_batch_size"] * spec["training"]["gradient_accumulation_steps"] == 16


def test_events_and_checkpoints_page_through(sdk, finished):
    events = list(sdk.fine_tuning.jobs.list_events(finished.id, limit=3))  # the SDK follows `after` itself
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)) >= 6
    assert events[0].data["type"] == "succeeded" and events[-1].data["type"] == "created"  # newest first
    assert all(e.object == "fine_tuning.job.event" and e.level in ("info", "warn", "error") for e in events)
    first = sdk.fine_tuning.jobs.list_events(finished.id, limit=2)
    assert first.has_more and len(first.data) == 2

    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(finished.id, limit=1))
    assert [c.step_number for c in checkpoints] == [30, 20, 10][: len(checkpoints)] and len(checkpoints) >= 2
    newest = checkpoints[0]
    assert newest.fine_tuning_job_id == finished.id and newest.metrics.train_loss > 0
    assert newest.fine_tuned_model_checkpoint.endswith(":ckpt-step-30")


def test_every_object_of_the_flow_is_the_sdks_type_strictly(sdk, finished, files, deployment):
    """The SDK builds its objects without validating them, so a field of the wrong type reached a user's code
    unnoticed: each answer of the flow is checked against the SDK's pydantic type, strictly. And what a hosted
    API's user reads of a finished job: its result file (the curve as CSV, via the files API, its team's only)
    and n_epochs that says no epochs were chosen (this job trains by max_steps), not "auto"."""
    from openai.types import FileObject, Model
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    jobs = sdk.fine_tuning.jobs
    job = jobs.with_raw_response.retrieve(finished.id).http_response.json()
    FineTuningJob.model_validate(job, strict=True)
    assert job["hyperparameters"]["n_epochs"] is None and job["estimated_finish"] is None
    for file_id in (files[0].id, *job["result_files"]):
        FileObject.model_validate(sdk.files.with_raw_response.retrieve(file_id).http_response.json(), strict=True)
    page = jobs.with_raw_response.list_events(finished.id, limit=4).http_response.json()
    after = jobs.with_raw_response.list_events(finished.id, limit=4, after=page["last_id"]).http_response.json()
    assert not {e["id"] for e in page["data"]} & {e["id"] for e in after["data"]}
    for event in page["data"] + after["data"]:
        FineTuningJobEvent.model_validate(event, strict=True)
    for checkpoint in jobs.checkpoints.with_raw_response.list(finished.id).http_response.json()["data"]:
        FineTuningJobCheckpoint.model_validate(checkpoint, strict=True)

    (results,) = finished.result_files
    assert sdk.files.retrieve(results).purpose == "fine-tune-results"
    rows = sdk.files.content(results).text.splitlines()
    assert rows[0].startswith("step,epoch,train_loss,valid_loss") and [r.split(",")[0] for r in rows[1:4]] == ["5", "10", "15"]
    other = OpenAI(base_url=deployment.url + "/v1", api_key=deployment.team_key("sdk-other"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.content(results)

    queued = jobs.create(model="tiny", training_file=files[0].id, extra_body={**EXTRA, "gpu_class": lane("nobody-listens")})
    for answer in (jobs.with_raw_response.cancel(queued.id), jobs.with_raw_response.retrieve(queued.id)):
        FineTuningJob.model_validate(answer.http_response.json(), strict=True)
    for listed in jobs.with_raw_response.list(limit=5).http_response.json()["data"]:
        FineTuningJob.model_validate(listed, strict=True)
    for listed in sdk.files.with_raw_response.list().http_response.json()["data"]:
        FileObject.model_validate(listed, strict=True)
    for listed in sdk.models.with_raw_response.list().http_response.json()["data"]:
        Model.model_validate(listed, strict=True)
    Model.model_validate(sdk.models.with_raw_response.retrieve(finished.fine_tuned_model).http_response.json(), strict=True)


def test_jobs_list_pages_newest_first_and_cancel(sdk, files):
    made = [sdk.fine_tuning.jobs.create(model="tiny", training_file=files[0].id,
                                        extra_body={**EXTRA, "gpu_class": lane("nobody-listens")}).id for _ in range(3)]
    page = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == made[::-1][:2] and page.has_more
    everything = [j.id for j in sdk.fine_tuning.jobs.list(limit=2)]
    assert everything[:3] == made[::-1] and len(everything) == len(set(everything))
    for job_id in made:
        assert sdk.fine_tuning.jobs.cancel(job_id).status == "cancelled"


def test_a_job_names_the_files_it_was_created_with_after_they_are_deleted(sdk, demo_data):
    """OpenAI keeps a job's training_file and validation_file once the files are deleted; before, both turned
    null here with the dataset (its foreign key is ON DELETE SET NULL), and a client lost what the job ran on."""
    uploaded = []
    for name in ("train", "validation"):
        with open(demo_data[name], "rb") as f:
            uploaded.append(sdk.files.wait_for_processing(sdk.files.create(file=f, purpose="fine-tune").id).id)
    job = sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0], validation_file=uploaded[1],
                                      extra_body={**EXTRA, "gpu_class": lane("nobody-listens")})
    sdk.fine_tuning.jobs.cancel(job.id)  # a file an active job uses cannot be deleted
    for file_id in uploaded:
        assert sdk.files.delete(file_id).deleted
    for seen in (sdk.fine_tuning.jobs.retrieve(job.id),
                 next(j for j in sdk.fine_tuning.jobs.list(limit=50) if j.id == job.id)):
        assert (seen.training_file, seen.validation_file) == tuple(uploaded)


def test_models_are_the_registered_bases_and_each_succeeded_jobs(sdk, finished, deployment):
    """What scripts call around a fine-tune: models.list() and models.retrieve(job.fine_tuned_model) answer
    OpenAI's Model; models.delete() is refused saying where the weights are, not a bare 404."""
    assert "tiny" in [m.id for m in sdk.models.list()]
    base = sdk.models.retrieve("tiny")
    assert (base.id, base.object, base.owned_by) == ("tiny", "model", "system") and isinstance(base.created, int)
    mine = sdk.models.retrieve(finished.fine_tuned_model)
    assert (mine.id, mine.owned_by, mine.created) == (finished.fine_tuned_model, "sdk-team", finished.finished_at)
    other = OpenAI(base_url=deployment.url + "/v1", api_key=deployment.team_key("sdk-other"), max_retries=0)
    for client, name in ((other, finished.fine_tuned_model), (sdk, finished.fine_tuned_model.replace(":sounds:", ":x:")),
                         (sdk, finished.fine_tuned_model + ":ckpt-step-30"), (sdk, "gpt-4o-mini"), (sdk, "ft:é")):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        other.models.delete(finished.fine_tuned_model)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.models.delete(finished.fine_tuned_model)
    assert info.value.body["param"] == "model" and "/artifacts/adapter" in info.value.body["message"]
    assert sdk.models.retrieve(finished.fine_tuned_model).id == finished.fine_tuned_model  # still there


def test_jobs_list_filters_by_metadata(sdk, files):
    """The SDK sends metadata={"k": "v"} as metadata[k]=v: only the jobs tagged so are listed (on Postgres here,
    whose JSON reads differ from SQLite's, tests/fast/test_openai_translate.py)."""
    run = str(time.monotonic_ns())
    made = {tag: sdk.fine_tuning.jobs.create(model="tiny", training_file=files[0].id, metadata=tags,
                                             extra_body={**EXTRA, "gpu_class": lane("nobody-listens")}).id
            for tag, tags in (("a", {"run": run, "arm": "a"}), ("b", {"run": run, "arm": "b ü"}), ("bare", None))}
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"run": run})] == [made["b"], made["a"]]
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"run": run, "arm": "b ü"})] == [made["b"]]
    page = sdk.fine_tuning.jobs.list(metadata={"run": run}, limit=1)
    assert [j.id for j in page.data] == [made["b"]] and page.has_more
    without = [j.id for j in sdk.fine_tuning.jobs.list(extra_query={"metadata": "null"}, limit=200).data]
    assert made["bare"] in without and made["a"] not in without
    with pytest.raises(openai.BadRequestError) as info:
        sdk.fine_tuning.jobs.list(extra_query={"metadata": "tagged"})
    assert info.value.body["param"] == "metadata"
    for job_id in made.values():
        sdk.fine_tuning.jobs.cancel(job_id)


def test_openai_shaped_errors_for_a_bad_file_and_a_bad_job(sdk, files, deployment):
    bad = sdk.files.create(file=("bad.jsonl", b'{"messages": [\n{"prompt": "p"}\n'), purpose="fine-tune")
    bad = sdk.files.wait_for_processing(bad.id)
    assert bad.status == "error" and "line 1" in bad.status_details and "line 2" in bad.status_details

    with pytest.raises(openai.BadRequestError) as info:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=bad.id, extra_body=EXTRA)
    assert info.value.status_code == 400 and info.value.body["param"] == "training_file"
    assert "line 1" in info.value.body["message"]

    with pytest.raises(openai.BadRequestError) as info:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=files[0].id,
                                    extra_body={**EXTRA, "lora": {"r": 0}})
    assert info.value.body["param"] == "lora.r" and ">= 1 and <= 1024" in info.value.body["message"]
    assert info.value.body["type"] == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as info:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=files[0].id,
                                    hyperparameters={"learning_rate_multiplier": -1}, extra_body=EXTRA)
    assert info.value.body["param"] == "hyperparameters.learning_rate_multiplier"

    with pytest.raises(openai.BadRequestError) as info:
        sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=files[0].id, extra_body=EXTRA)
    assert info.value.body["param"] == "model" and "tiny" in info.value.body["message"]

    with pytest.raises(openai.BadRequestError) as info:
        sdk.files.create(file=("x.jsonl", b'{"text": "t"}\n'), purpose="assistants")
    assert info.value.body["param"] == "purpose"

    with pytest.raises(openai.NotFoundError) as info:
        sdk.fine_tuning.jobs.create(model="tiny", training_file="file-" + "0" * 32, extra_body=EXTRA)
    # In the client's words: the file id it sent, the field it set.
    assert info.value.body["message"] == f"training_file: no file 'file-{'0' * 32}'"
    assert info.value.body["param"] == "training_file"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.fine_tuning.jobs.retrieve("ftjob-" + "0" * 32)
    assert info.value.body["message"] == f"no fine-tuning job 'ftjob-{'0' * 32}'"
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve("not-a-file-id")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=deployment.url + "/v1", api_key="qlk_wrong", max_retries=0).files.list()


def test_another_teams_objects_are_not_found(sdk, files, deployment):
    other = OpenAI(base_url=deployment.url + "/v1", api_key=deployment.team_key("sdk-other"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(files[0].id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.create(model="tiny", training_file=files[0].id, extra_body=EXTRA)
