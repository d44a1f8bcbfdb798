"""DPO jobs as the service takes them, on SQLite: the dataset format a method needs, the initial job a
job continues (the team's own, succeeded, with an adapter, on the same base model), and the OpenAI
SDK's `method` body translated into our spec and back."""

from __future__ import annotations

import pytest

from app.datasets.tables import Dataset
from app.errors import Conflict, Invalid, NotFound
from app.jobs import repository, runs, service, states
from app.jobs.schemas import MetricsOut
from app.jobs.tables import Artifact, Job, JobMetric
from app.models.tables import RegisteredModel
from app.openai import translate as t
from app.openai.translate import job_body, openai_error
from app.teams.service import Caller, create_key, create_team
from tests.fast.conftest import open_session
from tests.model_configs import LLAMA3_8B
from worker.training.protocol import EvalPoint, Event, TrainPoint
from worker.training.spec import LEARNING_RATES

BASE = {"model": "llama-3-8b", "training_file": "file-abc"}


@pytest.fixture
def deployment(settings, session, caller):
    """Served GPU classes, two registered models, and a chat and a preference dataset of the caller's team."""
    served = settings.model_copy(update={"gpu_classes": {"h100": 80}})
    for name in ("llama-3-8b", "other-8b"):
        session.add(RegisteredModel(name=name, hub_id=f"x/{name}", revision="main", config=LLAMA3_8B))
    ids = {}
    for fmt in ("chat", "preference"):
        dataset = Dataset(team_id=caller.team_id, filename=f"{fmt}.jsonl", storage_key=f"{caller.team_id}/datasets/{fmt}",
                          bytes=10, sha256="0" * 64, status="ready", format=fmt, rows=1)
        session.add(dataset)
        session.flush()
        ids[fmt] = dataset.id
    session.commit()
    return served, ids


def body(dataset_id: str, method: dict | None = None, **fields) -> dict:
    return {"dataset_id": dataset_id, "base_model": "llama-3-8b", "training": {"max_steps": 10, "max_seq_length": 512},
            **({"method": method} if method else {}), **fields}


def finished_job(session, team_id: str, status: str = states.SUCCEEDED, base_model: str = "llama-3-8b",
                 adapter: bool = True) -> str:
    job = Job(team_id=team_id, status=status, base_model=base_model, queue="gpu-h100", spec={}, name="sft")
    session.add(job)
    session.flush()
    if adapter:
        session.add(Artifact(job_id=job.id, kind="adapter", storage_key=f"{team_id}/artifacts/x", bytes=1, sha256="0" * 64))
    session.commit()
    return job.id


# ------------------------------------------------------------------ method and dataset format


def test_a_dpo_job_on_a_chat_dataset_is_refused_naming_preference(deployment, session, caller):
    settings, ids = deployment
    with pytest.raises(Invalid) as refused:
        service.create(session, settings, caller, body(ids["chat"], {"type": "dpo"}))
    assert refused.value.status == 422 and refused.value.details[0]["field"] == "dataset_id"
    assert "preference" in refused.value.message and "chat" in refused.value.message


def test_a_dpo_job_with_a_chat_validation_set_is_refused_naming_it(deployment, session, caller):
    settings, ids = deployment
    with pytest.raises(Invalid) as refused:
        service.create(session, settings, caller,
                       body(ids["preference"], {"type": "dpo"}, validation_dataset_id=ids["chat"]))
    assert refused.value.details[0]["field"] == "validation_dataset_id" and "preference" in refused.value.message


def test_an_sft_job_on_a_preference_dataset_is_refused_naming_dpo(deployment, session, caller):
    settings, ids = deployment
    with pytest.raises(Invalid) as refused:
        service.create(session, settings, caller, body(ids["preference"]))
    assert "a preference dataset trains with method dpo" in refused.value.message


def test_a_dpo_job_on_preference_data_is_queued_with_its_method(deployment, session, caller):
    settings, ids = deployment
    job = service.create(session, settings, caller, body(ids["preference"], {"type": "dpo", "beta": 0.2}))
    session.commit()
    assert job.spec["method"] == {"type": "dpo", "beta": 0.2, "loss": "sigmoid", "label_smoothing": 0.0}
    assert job.initial_job_id is None
    # No learning rate given: DPO's own default, recorded in the stored spec (SFT's would garble the answers).
    assert job.spec["training"]["learning_rate"] == LEARNING_RATES["dpo"] < LEARNING_RATES["sft"] / 10
    chosen = service.create(session, settings, caller,
                            body(ids["preference"], {"type": "dpo"}, training={"max_steps": 10, "learning_rate": 1e-4}))
    assert chosen.spec["training"]["learning_rate"] == 1e-4


# ------------------------------------------------------------------ initial_job_id


def test_a_job_continues_a_succeeded_job_of_its_team(deployment, session, caller):
    settings, ids = deployment
    sft = finished_job(session, caller.team_id)
    job = service.create(session, settings, caller, body(ids["preference"], {"type": "dpo"}, initial_job_id=sft))
    session.commit()
    with open_session(settings) as reader:
        assert reader.get(Job, job.id).initial_job_id == sft
    row = service.view(session, caller, job.id)
    assert row.initial_job_id == sft


def test_admission_counts_the_reference_copy_of_a_dpo_jobs_starting_adapter(deployment, session, caller):
    """trl keeps a frozen copy of a started adapter as DPO's reference: admission counts it, and only there."""
    settings, ids = deployment
    sft = finished_job(session, caller.team_id)
    reference = "DPO reference adapter (frozen copy)"

    def estimate(dataset: str, method: dict | None = None, **fields) -> dict:
        job = service.create(session, settings, caller, body(ids[dataset], method, **fields))
        session.commit()
        created = [e for e in repository.events(session, caller.team_id, job.id, None, 10) if e.type == "created"]
        return created[0].data["estimate"]

    from_sft = estimate("preference", {"type": "dpo"}, initial_job_id=sft)
    assert from_sft[reference] == from_sft["LoRA adapter"]  # in lora.dtype, as the default adapter is
    assert reference not in estimate("preference", {"type": "dpo"})  # the reference is the base, adapter off
    assert reference not in estimate("chat", initial_job_id=sft)  # sft keeps no reference


def test_another_teams_job_answers_404_like_a_missing_one(deployment, session, caller):
    settings, ids = deployment
    other = Caller.of(create_team(session, "team-b"), create_key(session, "team-b")[0])
    theirs = finished_job(session, other.team_id)
    for job_id in (theirs, "no-such-job"):
        with pytest.raises(NotFound) as refused:
            service.create(session, settings, caller, body(ids["preference"], {"type": "dpo"}, initial_job_id=job_id))
        assert refused.value.message == f"initial_job_id: no job '{job_id}'"
        # /v1 names the field as `param`, as it does for a training_file that is not the team's
        status, shaped = openai_error(refused.value.status, refused.value.message, refused.value.code,
                                      refused.value.details)
        assert status == 404 and shaped["error"]["param"] == "initial_job_id"


@pytest.mark.parametrize("status", [states.QUEUED, states.RUNNING, states.FAILED, states.CANCELLED])
def test_a_job_that_has_not_succeeded_is_refused_saying_its_state(deployment, session, caller, status):
    settings, ids = deployment
    unfinished = finished_job(session, caller.team_id, status=status, adapter=False)
    with pytest.raises(Conflict) as refused:
        service.create(session, settings, caller, body(ids["preference"], {"type": "dpo"}, initial_job_id=unfinished))
    assert refused.value.code == "initial_job_not_ready" and f"job {unfinished} {states.described(status)}, and" in refused.value.message


def test_a_succeeded_job_without_an_adapter_is_refused(deployment, session, caller):
    settings, ids = deployment
    bare = finished_job(session, caller.team_id, adapter=False)
    with pytest.raises(Invalid) as refused:
        service.create(session, settings, caller, body(ids["preference"], {"type": "dpo"}, initial_job_id=bare))
    assert "no adapter artifact" in refused.value.message


def test_a_job_of_another_base_model_is_refused_naming_both(deployment, session, caller):
    settings, ids = deployment
    other = finished_job(session, caller.team_id, base_model="other-8b")
    with pytest.raises(Invalid) as refused:
        service.create(session, settings, caller, body(ids["preference"], {"type": "dpo"}, initial_job_id=other))
    assert refused.value.status == 422 and refused.value.details[0]["field"] == "initial_job_id"
    assert "'other-8b'" in refused.value.message and "'llama-3-8b'" in refused.value.message


# ------------------------------------------------------------------ OpenAI's method


def test_the_sdks_dpo_method_becomes_our_method_and_training():
    native = job_body({**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.25, "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}}},
        "initial_job_id": "ftjob-abc"})
    assert native == {"base_model": "llama-3-8b", "dataset_id": "abc", "method": {"type": "dpo", "beta": 0.25},
                      "initial_job_id": "abc",
                      "training": {"epochs": 2, "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                                   "learning_rate": 0.5 * LEARNING_RATES["dpo"]}}
    meta, spec = service.parse_create(native)
    assert spec.method.type == "dpo" and spec.method.beta == 0.25 and meta["initial_job_id"] == "abc"


def test_beta_auto_is_the_default_and_supervised_is_sft():
    assert job_body({**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}})["method"] \
        == {"type": "dpo"}
    native = job_body({**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}})
    assert "method" not in native and native["training"] == {"epochs": 1}
    assert service.parse_create(native)[1].method.type == "sft"


def test_a_bad_beta_is_named_as_the_sdk_sent_it():
    with pytest.raises(Invalid) as refused:
        service.parse_create(job_body({**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}))
    field = refused.value.details[0]["field"]
    _, shaped = openai_error(422, refused.value.message, refused.value.code, refused.value.details)
    assert field == "method.beta" and shaped["error"]["param"] == "method.dpo.hyperparameters.beta"


def test_beta_on_a_supervised_job_is_refused():
    with pytest.raises(Invalid) as refused:
        job_body({**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}})
    assert refused.value.details[0]["field"] == "method.supervised.hyperparameters.beta"


def test_the_job_object_shows_the_method_in_openais_shape(deployment, session, caller):
    settings, ids = deployment
    sft = finished_job(session, caller.team_id)
    job = service.create(session, settings, caller, body(ids["preference"], {"type": "dpo", "beta": 0.2},
                                                         initial_job_id=sft))
    shown = t.job_object(job, "team-a")
    assert shown["method"]["type"] == "dpo"
    assert shown["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    assert shown["method"]["dpo"]["hyperparameters"]["n_epochs"] == shown["hyperparameters"]["n_epochs"]
    assert shown["initial_job_id"] == t.JOB + sft
    assert shown["hyperparameters"]["learning_rate_multiplier"] == 1  # of DPO's default learning rate
    chat = service.create(session, settings, caller, body(ids["chat"]))
    assert t.job_object(chat, "team-a")["method"] == {
        "type": "supervised", "supervised": {"hyperparameters": t.hyperparameters_of(chat.spec)}}


# ------------------------------------------------------------------ the rewards on the curve


def test_rewards_reported_by_the_worker_come_back_in_the_curve_and_the_openai_events(settings, session, caller,
                                                                                       make_job):
    job_id = make_job(states.RUNNING, attempt=1, total_steps=20)
    for step in (10, 20):
        runs.report(session, job_id, 1, [
            TrainPoint(step=step, epoch=step / 20, train_loss=0.6, reward_accuracy=0.75, reward_chosen=0.1,
                       reward_rejected=-0.2, reward_margin=0.3),
            Event(type="note", level="info", message=f"after {step}"),
        ], None)
        session.commit()
    runs.report(session, job_id, 1, [EvalPoint(step=20, epoch=1.0, eval_loss=0.5, reward_accuracy=1.0,
                                               reward_margin=0.9)], None)
    session.commit()
    curve = MetricsOut.model_validate(service.metrics(session, caller, job_id), from_attributes=True)
    assert [(p.step, p.reward_accuracy, p.reward_margin, p.reward_chosen, p.reward_rejected) for p in curve.train] == [
        (10, 0.75, 0.3, 0.1, -0.2), (20, 0.75, 0.3, 0.1, -0.2)]
    assert (curve.eval[0].reward_accuracy, curve.eval[0].reward_margin, curve.eval[0].reward_chosen) == (1.0, 0.9, None)

    # OpenAI's events: every event and every point once, newest first, whatever the page size.
    shown, after = [], None
    while True:
        feed = service.feed_newest_first(session, caller, job_id, t.feed_cursor(after) if after else None, 2)
        shown += [t.metric_event_object(row, 20) if isinstance(row, JobMetric) else t.event_object(row)
                  for row in feed.data]
        if not feed.has_more:
            break
        after = shown[-1]["id"]
    metrics = [e for e in shown if e["type"] == "metrics"]
    assert len(shown) == len({e["id"] for e in shown}) == len(metrics) + 2
    assert [e["data"]["step"] for e in metrics] == [20, 20, 10]
    valid, train = (e for e in metrics[:2] if e["data"].get("valid_loss")), (e for e in metrics if "train_loss" in e["data"])
    assert next(valid)["data"] == {"step": 20, "total_steps": 20, "valid_loss": 0.5, "valid_reward_accuracy": 1.0,
                                   "valid_reward_margin": 0.9}
    newest = next(train)
    assert newest["data"]["train_reward_accuracy"] == 0.75 and newest["data"]["train_reward_margin"] == 0.3
    assert newest["message"] == "Step 20/20: training loss=0.6000, reward accuracy=0.7500, reward margin=0.3000"


def test_an_sft_point_has_no_rewards(session, caller, make_job):
    job_id = make_job(states.RUNNING, attempt=1)
    runs.report(session, job_id, 1, [TrainPoint(step=1, epoch=0.1, train_loss=2.0)], None)
    session.commit()
    point = MetricsOut.model_validate(service.metrics(session, caller, job_id), from_attributes=True).train[0]
    assert point.reward_accuracy is None and point.reward_margin is None
    row = service.feed_newest_first(session, caller, job_id, None, 10).data[0]
    assert t.metric_event_object(row, None)["data"] == {"step": 1, "total_steps": None, "train_loss": 2.0}


# ------------------------------------------------------------------ the CLI's views


def test_jobs_show_and_watch_say_the_method_and_the_rewards():
    from app.cli.render import method_text, reward_line

    assert method_text(None) == method_text({"type": "sft"}) == "sft"
    assert method_text({"type": "dpo", "beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0}) == "dpo (beta 0.1, sigmoid loss)"
    assert method_text({"type": "dpo", "beta": 0.5, "loss": "sigmoid", "label_smoothing": 0.1}) \
        == "dpo (beta 0.5, sigmoid loss, label smoothing 0.1)"
    line = reward_line({"reward_accuracy": 0.875, "reward_margin": 0.4321}, {"reward_accuracy": 1.0, "reward_margin": None})
    assert line.plain == "train reward accuracy 87.5%  margin 0.432   eval reward accuracy 100.0%  margin -"


def test_preflight_on_a_terminal_says_which_side_of_a_pair_it_shows_and_counts_ties_and_reversals(capsys):
    from app.cli.render import print_preflight

    def train_set(**pairs) -> dict:
        return {"rows": 3, "complete": True, "rows_in_file": 3, "lengths": {"min": 9, "median": 9, "p95": 9, "max": 9},
                "truncated_rows": 0, "dropped_rows": 1, "trained_tokens": 8, "tokens": 20, "trained_fraction": 0.4,
                "trained_tokens_lost": 0, "rows_without_eos": 0, "rows_with_special_tokens": 0, "duplicate_rows": 0,
                **pairs}

    def report(train: dict, examples: list) -> dict:
        return {"placement": {"note": "memory not checked"}, "report": {
            "train": train, "validation": None, "steps": 1, "epochs": 1.0, "steps_per_epoch": 1, "steps_note": None,
            "examples": examples, "refusals": [], "warnings": []}}

    token = {"id": 5, "text": "Moo", "trained": True}
    print_preflight(report(train_set(tied_rows=1, contradicting_rows=2),
                           [{"line": 1, "truncated": False, "length": 9, "tokens": [token], "side": "chosen"}]))
    shown = capsys.readouterr().out
    assert "line 1, the preferred answer (9 tokens; trained tokens highlighted; the other answer's are scored alike)" \
        in shown
    assert [line.split()[-2] for line in shown.splitlines() if "pairs tied" in line or "pairs reversing" in line] \
        == ["1", "2"]
    print_preflight(report(train_set(), [{"line": 1, "truncated": False, "length": 9, "tokens": [token]}]))
    shown = capsys.readouterr().out  # an sft job: no pairs, no side
    assert "pairs" not in shown and "line 1 (9 tokens; trained tokens highlighted):" in shown


# ------------------------------------------------------------------ the worker's claim


def test_every_attempt_gets_the_initial_jobs_adapter_and_a_gone_one_fails_the_job(deployment, session, caller):
    settings, ids = deployment
    sft = finished_job(session, caller.team_id)
    adapter = session.query(Artifact).filter_by(job_id=sft).one()
    job = service.create(session, settings, caller, body(ids["preference"], {"type": "dpo"}, initial_job_id=sft))
    session.commit()
    first = runs.claim(session, job.id, "w1")
    assert first is not None and first.initial_job_id == sft
    assert (first.initial_adapter.storage_key, first.initial_adapter.sha256) == (adapter.storage_key, adapter.sha256)
    repository.transition(session, job.id, states.QUEUED, attempt=1, only_from=[states.RUNNING])  # its worker was lost
    second = runs.claim(session, job.id, "w2")
    assert second is not None and second.attempt == 2 and second.initial_adapter == first.initial_adapter
    session.commit()

    again = service.create(session, settings, caller, body(ids["preference"], {"type": "dpo"}, initial_job_id=sft))
    session.delete(adapter)  # the initial job's adapter is gone before a worker takes the new job
    session.commit()
    assert runs.claim(session, again.id, "w1") is None
    session.commit()
    with open_session(settings) as reader:
        failed = reader.get(Job, again.id)
        assert failed.status == states.FAILED
        assert failed.error.startswith(f"cannot start: the adapter of its initial job {sft} is gone")
