"""DPO jobs through the real deployment: preference uploads, the method/format rule, initial_job_id
(another team's job is 404, an unfinished one 409, another base model 422), the rewards on the curve
(written through the worker's own ingestion) in GET /jobs/{id}/metrics and the OpenAI events, and a
job whose initial adapter is gone failing with a clear error when a worker claims it."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from app.db import session_scope
from app.jobs import runs, states
from app.jobs.tables import Artifact, Job
from tests.deployment import lane, stored_spec, upload
from tests.service.test_cli_client import clean_env, qlora
from tests.service.test_dashboard import page, sign_in  # noqa: F401 (page: the browser page fixture)
from worker.training.protocol import EvalPoint, TrainPoint
from worker.training.spec import LEARNING_RATES


def jsonl(rows: list) -> bytes:
    return b"".join((row if isinstance(row, str) else json.dumps(row)).encode() + b"\n" for row in rows)


def openai_row(i: int) -> dict:
    return {"input": {"messages": [{"role": "user", "content": f"capital of country {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"city {i}"}],
            "non_preferred_output": [{"role": "assistant", "content": "I do not know"}]}


PREFERENCE_ROWS = [openai_row(i) for i in range(6)]
TRL_ROWS = [{"prompt": f"say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(4)]
BODY = {"base_model": "tiny", "training": {"max_steps": 4, "max_seq_length": 64}}


@pytest.fixture(scope="module")
def datasets(team_a):
    ids = {}
    for name, rows in (("preference", PREFERENCE_ROWS), ("trl", TRL_ROWS),
                       ("chat", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3)):
        answer = upload(team_a, content=jsonl(rows), name=f"{name}.jsonl")
        assert answer.status_code == 201, answer.text
        ids[name] = answer.json()
    return ids


def succeeded_job(deployment, team_key_owner: str, base_model: str = "tiny", adapter: bool = True,
                  status: str = states.SUCCEEDED, spec: dict | None = None) -> str:
    """A finished job as a worker leaves it (row and adapter artifact), without training one."""
    with session_scope(deployment.settings.database_url) as session:
        from app.teams import repository as teams

        team = teams.team_by_name(session, team_key_owner)
        job = Job(team_id=team.id, status=status, base_model=base_model, queue="gpu-nobody",
                  spec=stored_spec(base_model, spec),
                  name="sft")
        session.add(job)
        session.flush()
        if adapter:
            session.add(Artifact(job_id=job.id, kind="adapter", storage_key=f"{team.id}/artifacts/none", bytes=1,
                                 sha256="0" * 64))
        return job.id


def test_preference_uploads_in_both_shapes_are_recognised(datasets):
    assert datasets["preference"]["status"] == "ready" and datasets["preference"]["format"] == "preference"
    assert datasets["preference"]["rows"] == 6
    assert datasets["trl"]["status"] == "ready" and datasets["trl"]["format"] == "preference"


def test_bad_preference_lines_are_named_by_their_number(team_a):
    missing_side = {k: v for k, v in openai_row(9).items() if k != "non_preferred_output"}
    same = {**openai_row(8), "non_preferred_output": openai_row(8)["preferred_output"]}
    two_messages = {**openai_row(7), "preferred_output": [{"role": "assistant", "content": "a"}] * 2}
    answer = upload(team_a, content=jsonl([openai_row(1), missing_side, openai_row(2), same, two_messages]),
                    name="bad-preference.jsonl")
    assert answer.status_code == 201, answer.text
    dataset = answer.json()
    assert dataset["status"] == "invalid" and dataset["error_count"] == 3
    lines = {e["line"]: e["message"] for e in dataset["errors"]}
    assert sorted(lines) == [2, 4, 5]
    assert "non_preferred_output" in lines[2] and "same" in lines[4]


def test_a_dpo_job_on_a_chat_dataset_is_a_422_naming_preference(team_a, datasets):
    for path in ("/jobs", "/jobs/preflight"):
        answer = team_a.post(path, json={**BODY, "method": {"type": "dpo"}, "dataset_id": datasets["chat"]["id"]})
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["details"][0]["field"] == "dataset_id" and "preference" in error["message"]


def test_an_sft_job_on_a_preference_dataset_is_a_422_naming_dpo(team_a, datasets):
    answer = team_a.post("/jobs", json={**BODY, "dataset_id": datasets["preference"]["id"]})
    assert answer.status_code == 422, answer.text
    assert "a preference dataset trains with method dpo" in answer.json()["error"]["message"]


def test_initial_job_of_another_team_is_a_404_like_a_missing_one(deployment, team_a, team_b, datasets):
    theirs = succeeded_job(deployment, "team-b")
    answers = [team_a.post("/jobs", json={**BODY, "method": {"type": "dpo"}, "dataset_id": datasets["preference"]["id"],
                                          "initial_job_id": job_id}) for job_id in (theirs, "0" * 32)]
    assert [a.status_code for a in answers] == [404, 404]
    assert answers[0].json()["error"]["message"] == f"initial_job_id: no job '{theirs}'"


def test_initial_job_that_has_not_succeeded_is_refused_saying_so(deployment, team_a, datasets):
    queued = team_a.post("/jobs", json={**BODY, "gpu_class": lane("nobody-listens"), "dataset_id": datasets["chat"]["id"]})
    assert queued.status_code == 201, queued.text
    try:
        answer = team_a.post("/jobs", json={**BODY, "method": {"type": "dpo"}, "dataset_id": datasets["preference"]["id"],
                                            "initial_job_id": queued.json()["id"]})
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "initial_job_not_ready" and "is queued" in answer.json()["error"]["message"]
    finally:
        team_a.post(f"/jobs/{queued.json()['id']}/cancel")


def test_initial_job_on_another_base_model_is_a_422_naming_both(deployment, team_a, datasets):
    other = succeeded_job(deployment, "team-a", base_model="another-model")
    answer = team_a.post("/jobs/preflight", json={**BODY, "method": {"type": "dpo"}, "dataset_id": datasets["preference"]["id"],
                                                  "initial_job_id": other})
    assert answer.status_code == 422, answer.text
    message = answer.json()["error"]["message"]
    assert "'another-model'" in message and "'tiny'" in message


def test_initial_job_with_another_lora_shape_is_a_422_naming_the_field(deployment, team_a, datasets):
    started = succeeded_job(deployment, "team-a", spec={"base_model": "tiny", "training": {"max_steps": 4}})
    answer = team_a.post("/jobs/preflight", json={**BODY, "method": {"type": "dpo"}, "lora": {"r": 8, "dropout": 0.0},
                                                  "dataset_id": datasets["preference"]["id"], "initial_job_id": started})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert "lora.r" in error["message"] and "keeps its shape" in error["message"]
    assert "lora.dropout" not in error["message"]  # dropout does not shape the adapter


def test_a_dpo_job_shows_its_method_and_initial_job_and_fails_clearly_when_the_adapter_is_gone(
        deployment, team_a, datasets):
    sft = succeeded_job(deployment, "team-a")
    created = team_a.post("/jobs", json={**BODY, "gpu_class": lane("nobody-listens"), "method": {"type": "dpo", "beta": 0.2},
                                         "dataset_id": datasets["preference"]["id"], "initial_job_id": sft})
    assert created.status_code == 201, created.text
    job = team_a.get(f"/jobs/{created.json()['id']}").json()
    assert job["initial_job_id"] == sft and job["spec"]["method"]["type"] == "dpo" and job["spec"]["method"]["beta"] == 0.2
    shown = team_a.get(f"/v1/fine_tuning/jobs/ftjob-{job['id']}").json()
    assert shown["method"]["type"] == "dpo" and shown["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    assert shown["initial_job_id"] == f"ftjob-{sft}"

    with session_scope(deployment.settings.database_url) as session:  # the initial job's adapter is deleted
        session.query(Artifact).filter(Artifact.job_id == sft).delete()
    with session_scope(deployment.settings.database_url) as session:  # a worker claims the DPO job
        assert runs.claim(session, job["id"], "test-worker") is None
    failed = team_a.get(f"/jobs/{job['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error"].startswith(f"cannot start: the adapter of its initial job {sft} is gone")


@pytest.fixture(scope="module")
def rewarded_job(deployment, team_a, datasets):
    """A dpo job from an SFT job, claimed, with the curve a worker reports: the rewards on each point."""
    sft = succeeded_job(deployment, "team-a")
    created = team_a.post("/jobs", json={**BODY, "gpu_class": lane("nobody-listens"), "method": {"type": "dpo"},
                                         "dataset_id": datasets["preference"]["id"], "initial_job_id": sft,
                                         "name": "dpo-rewards"})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    with session_scope(deployment.settings.database_url) as session:  # as the worker does: claim, then report
        claimed = runs.claim(session, job_id, "test-worker")
        assert claimed is not None and claimed.initial_adapter is not None and claimed.initial_job_id == sft
    with session_scope(deployment.settings.database_url) as session:
        runs.report(session, job_id, claimed.attempt, [
            TrainPoint(step=2, epoch=0.5, train_loss=0.69, reward_accuracy=0.5, reward_chosen=0.01,
                       reward_rejected=0.0, reward_margin=0.01),
            TrainPoint(step=4, epoch=1.0, train_loss=0.41, reward_accuracy=1.0, reward_chosen=0.3,
                       reward_rejected=-0.4, reward_margin=0.7),
            EvalPoint(step=4, epoch=1.0, eval_loss=0.45, reward_accuracy=0.75, reward_chosen=0.2,
                      reward_rejected=-0.3, reward_margin=0.5)], None)
    yield {"id": job_id, "initial_job_id": sft}
    team_a.post(f"/jobs/{job_id}/cancel")


def test_rewards_the_worker_reports_come_back_in_the_curve_and_the_openai_events(team_a, rewarded_job):
    job_id = rewarded_job["id"]
    curve = team_a.get(f"/jobs/{job_id}/metrics").json()
    assert [(p["step"], p["reward_accuracy"], p["reward_margin"]) for p in curve["train"]] == [(2, 0.5, 0.01), (4, 1.0, 0.7)]
    assert curve["eval"][0]["reward_accuracy"] == 0.75 and curve["eval"][0]["reward_rejected"] == -0.3

    events = team_a.get(f"/v1/fine_tuning/jobs/ftjob-{job_id}/events", params={"limit": 50}).json()["data"]
    metrics = [e for e in events if e["type"] == "metrics"]
    assert len(metrics) == 3
    newest_train = next(e for e in metrics if "train_loss" in e["data"])
    assert newest_train["data"]["step"] == 4 and newest_train["data"]["train_reward_accuracy"] == 1.0
    assert newest_train["data"]["train_reward_margin"] == 0.7
    assert any(e["data"].get("valid_reward_accuracy") == 0.75 for e in metrics)
    assert events[-1]["data"]["type"] == "created"  # newest first: the creation is the oldest


def test_the_job_page_shows_the_method_the_initial_job_and_the_rewards(page, deployment, rewarded_job):  # noqa: F811
    sign_in(page, deployment.team_key("team-a"))
    page.goto(f"/#/jobs/{rewarded_job['id']}")
    expect(page.locator("#job-method")).to_have_text("dpo (beta 0.1, sigmoid)")
    link = page.locator("#initial-job")
    expect(link).to_have_text(rewarded_job["initial_job_id"])
    expect(link).to_have_attribute("href", f"#/jobs/{rewarded_job['initial_job_id']}")
    rows = page.locator("#rewards tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("eval")  # newest step first, its eval point before its train point
    expect(rows.nth(0)).to_contain_text("75.0%")
    expect(rows.nth(1)).to_contain_text("100.0%")


def test_the_new_job_form_offers_dpo_and_the_teams_finished_jobs(page, deployment, team_a, datasets):  # noqa: F811
    sft = succeeded_job(deployment, "team-a")
    sign_in(page, deployment.team_key("team-a"))
    page.goto("/#/jobs/new")
    form = page.locator("#new-job")
    expect(form.get_by_label("DPO beta")).to_be_hidden()  # sft: no dpo settings
    form.get_by_label("Method").select_option("dpo")
    expect(form.get_by_label("DPO beta")).to_have_value("0.1")
    form.get_by_label("Training dataset").select_option(datasets["preference"]["id"])
    form.get_by_label("Start from job (optional)").select_option(sft)
    # The base model follows the job picked: continuing an adapter on another base is refused.
    expect(form.get_by_label("Base model")).to_have_value(team_a.get(f"/jobs/{sft}").json()["base_model"])
    form.get_by_label("DPO beta").fill("0.25")
    form.get_by_label("Epochs").fill("")
    form.get_by_label("Max steps").fill("4")
    form.get_by_label("Max sequence length").fill("64")
    form.get_by_label("Name").fill("dpo-from-form")
    # Sent to a class no worker serves: this test is about what the form posts.
    with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as answer:
        form.get_by_role("button", name="Start training").click()
    created = answer.value.json()
    assert answer.value.status == 201, created
    try:
        assert created["spec"]["method"] == {"type": "dpo", "beta": 0.25, "loss": "sigmoid", "label_smoothing": 0.0}
        assert created["spec"]["training"]["learning_rate"] == LEARNING_RATES["dpo"]  # the form followed the method
        assert created["initial_job_id"] == sft
        expect(page.locator("#job-method")).to_have_text("dpo (beta 0.25, sigmoid)")
    finally:
        team_a.post(f"/jobs/{created['id']}/cancel")


def test_the_cli_creates_a_job_from_an_initial_job_and_shows_its_lineage(deployment, datasets, tmp_path):
    cli_env = clean_env(tmp_path / "cli-home") | {"QLORA_URL": deployment.url, "QLORA_API_KEY": deployment.team_key("team-a")}
    sft = succeeded_job(deployment, "team-a")
    (tmp_path / "spec.json").write_text(json.dumps({**BODY, "gpu_class": lane("nobody-listens")}))
    created = qlora(cli_env, "jobs", "create", str(tmp_path / "spec.json"), "--dataset", datasets["chat"]["id"],
                    "--initial-job", sft)
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]  # a pipe gets the API's answer
    try:
        shown = qlora(cli_env, "jobs", "show", job_id, "--table")
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"method\s+│?\s*sft", shown.stdout) and sft in shown.stdout
    finally:
        qlora(cli_env, "jobs", "cancel", job_id)
    refused = qlora(cli_env, "jobs", "create", str(tmp_path / "spec.json"), "--dataset", datasets["chat"]["id"],
                    "--initial-job", job_id)  # cancelled: it has no adapter to start from
    assert refused.returncode == 1 and "initial_job_id" in refused.stderr and "cancelled" in refused.stderr
