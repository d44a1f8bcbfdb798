"""Creating a job through the service on SQLite: admission picks its queue, the created event says
what was estimated, and "job X is ready" reaches the broker only once the row is committed."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.datasets.tables import Dataset
from app.errors import DoesNotFit
from app.jobs import service, states
from app.jobs.tables import Job, JobEvent
from app.models.tables import RegisteredModel
from app.openai import translate
from app.teams.service import UnknownKey, revoke_key
from tests.fast.conftest import open_session, received
from tests.model_configs import LLAMA3_8B
from worker.training.estimate import GIB


@pytest.fixture
def deployment(settings, session, caller):
    """Served GPU classes, a registered Llama 3 8B and a ready dataset of the caller's team."""
    served = settings.model_copy(update={"gpu_classes": {"l4": 24, "h100": 80}})
    session.add(RegisteredModel(name="llama-3-8b", hub_id="meta-llama/Meta-Llama-3-8B", revision="main",
                                config=LLAMA3_8B))
    dataset = Dataset(team_id=caller.team_id, filename="train.jsonl", storage_key=f"{caller.team_id}/datasets/x",
                      bytes=10, sha256="0" * 64, status="ready", format="chat", rows=1)
    session.add(dataset)
    session.commit()
    return served, dataset.id


def body(dataset_id, **training):
    return {"dataset_id": dataset_id, "base_model": "llama-3-8b", "name": "demo",
            "training": {"max_steps": 10, "max_seq_length": 2048, **training}}


def test_a_created_job_is_queued_on_its_class_and_sent_after_commit(deployment, session, caller):
    settings, dataset_id = deployment
    job = service.create(session, settings, caller, body(dataset_id, per_device_batch_size="auto"))
    assert received(settings, "gpu-l4") == []  # not before the commit: a worker would find no row
    session.commit()
    assert received(settings, "gpu-l4") == [("qlora.run_job", [job.id])]
    with open_session(settings) as reader:
        stored = reader.get(Job, job.id)
        assert (stored.status, stored.queue, stored.attempt) == (states.QUEUED, "gpu-l4", 0)
        assert stored.spec["training"]["per_device_batch_size"] == 8  # "auto" resolved for an L4
        assert stored.dispatched_at is not None
        created, preflight = reader.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)).all()
    assert created.type == "created" and created.message.startswith("job created on queue gpu-l4; estimated peak")
    assert preflight.type == "preflight" and preflight.message == "preflight not run"  # no tokenizer process here
    assert 0 < created.data["estimated_peak_bytes"] <= 24 * GIB
    assert sum(created.data["estimate"].values()) == created.data["estimated_peak_bytes"]


def test_a_key_revoked_while_its_creation_waited_queues_nothing(deployment, session, caller):
    """The key was read as the request began; it may wait a minute for its team's turn and run its preflight
    before it queues. A key revoked meanwhile (a leaked one, say) queued its job all the same."""
    settings, dataset_id = deployment
    with open_session(settings) as admin:  # `qlora admin revoke-key`, while the creation waits
        revoke_key(admin, caller.key_id)
        admin.commit()
    with pytest.raises(UnknownKey):
        service.create(session, settings, caller, body(dataset_id))
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert received(settings, "gpu-l4") == []


def test_a_job_rolled_back_is_never_sent(deployment, session, caller):
    settings, dataset_id = deployment
    service.create(session, settings, caller, body(dataset_id))
    session.rollback()
    assert received(settings, "gpu-l4") == []
    with open_session(settings) as reader:
        assert reader.scalar(select(func.count()).select_from(Job)) == 0


def test_a_job_that_fits_no_class_leaves_nothing_behind(deployment, session, caller):
    settings, dataset_id = deployment
    with pytest.raises(DoesNotFit):
        service.create(session, settings, caller, body(dataset_id, per_device_batch_size=64) | {"gpu_class": "l4"})
    session.rollback()
    with open_session(settings) as reader:
        assert reader.scalar(select(func.count()).select_from(Job)) == 0
    assert received(settings, "gpu-l4") == []


def test_an_openai_job_that_fits_no_class_is_a_400_in_openais_shape(deployment, session, caller):
    """The refusal's details say what the job needs and what there is, not which field is wrong."""
    settings, dataset_id = deployment
    openai_body = {"model": "llama-3-8b", "training_file": translate.FILE + dataset_id, "gpu_class": "l4",
                   "training": {"per_device_batch_size": 64, "max_seq_length": 2048}}  # even offloaded and tiled
    with pytest.raises(DoesNotFit) as refused:
        service.create(session, settings, caller, translate.job_body(openai_body))
    session.rollback()
    error = refused.value
    status, shaped = translate.openai_error(error.status, error.message, error.code, error.details)
    assert status == 400
    assert shaped == {"error": {"message": error.message, "type": "invalid_request_error", "param": None,
                                "code": "does_not_fit"}}
    # 16, offloaded and tiled (32 before a tiled layer's norm phase was counted: 2 GiB more at 32 x 2,048 tokens).
    assert "It would fit with per_device_batch_size 16" in shaped["error"]["message"]


def test_an_openai_body_reads_back_with_the_hyperparameters_it_was_sent(deployment, session, caller):
    settings, dataset_id = deployment
    openai_body = {"model": "llama-3-8b", "training_file": translate.FILE + dataset_id, "suffix": "demo", "seed": 7,
                   "hyperparameters": {"n_epochs": 2, "batch_size": 12, "learning_rate_multiplier": 0.5}}
    job = service.create(session, settings, caller, translate.job_body(openai_body))
    session.commit()
    shown = translate.job_object(job, caller.team_name)
    assert shown["id"] == translate.JOB + job.id and shown["object"] == "fine_tuning.job"
    assert shown["status"] == "queued" and shown["model"] == "llama-3-8b" and shown["seed"] == 7
    assert shown["training_file"] == openai_body["training_file"] and shown["user_provided_suffix"] == "demo"
    assert shown["hyperparameters"] == openai_body["hyperparameters"]
    assert shown["method"]["supervised"]["hyperparameters"] == openai_body["hyperparameters"]
    assert shown["fine_tuned_model"] is None and shown["error"] is None
    # 12 sequences a step: 4 at a time (the usual micro-batch) over 3 accumulation steps.
    training = job.spec["training"]
    assert (training["per_device_batch_size"], training["gradient_accumulation_steps"]) == (4, 3)
