"""Preflight through the service: POST /jobs/preflight answers what a job would train on, with the
registered model's own tokenizer, creating nothing; POST /jobs refuses a job that cannot learn and
records the warnings of one that can; `qlora jobs preflight` prints it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.deployment import lane, upload, wait_until
from worker.training.tiny import demo_spec


@pytest.fixture(scope="module")
def datasets(team_a, demo_data, tmp_path_factory):
    """The demo's validation rows, and rows whose assistant turns all sit past 16 tokens."""
    long_prompts = tmp_path_factory.mktemp("preflight") / "long_prompts.jsonl"
    long_prompts.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "word " * 40 + str(i)}, {"role": "assistant", "content": "yes"}]}) + "\n"
        for i in range(6)))
    return {"demo": upload(team_a, demo_data["validation"]).json()["id"],
            "long_prompts": upload(team_a, long_prompts).json()["id"]}


def body(dataset_id: str, **training) -> dict:
    spec = demo_spec("tiny")
    spec["training"].update({"max_steps": 5, **training})
    return {**spec, "dataset_id": dataset_id}


def job_count(client) -> int:
    return len(client.get("/jobs", params={"limit": 200}).json()["data"])


def test_preflight_answers_what_the_job_would_train_on_and_creates_nothing(team_a, datasets):
    before = job_count(team_a)
    answer = team_a.post("/jobs/preflight", json={**body(datasets["demo"]), "examples": 2})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    report = answer["report"]
    assert answer["can_learn"] is True and answer["placement"]["gpu_class"]
    train = report["train"]
    assert train["rows"] == train["kept_rows"] == 48 and train["truncated_rows"] == 0
    assert 0 < train["trained_tokens"] < train["tokens"] and train["rows_without_eos"] == 0
    assert train["lengths"]["min"] <= train["lengths"]["median"] <= train["lengths"]["p95"] <= train["lengths"]["max"]
    assert report["steps"] == 5 and report["refusals"] == [] and report["warnings"] == []
    assert len(report["examples"]) == 2
    tokens = report["examples"][0]["tokens"]
    assert tokens[-1] == {"id": tokens[-1]["id"], "text": "</s>", "trained": True}
    assert not tokens[0]["trained"]  # BOS and the prompt are context
    assert job_count(team_a) == before


def test_a_job_that_cannot_learn_is_refused_at_creation_with_the_reason(team_a, datasets):
    before = job_count(team_a)
    refused = team_a.post("/jobs", json=body(datasets["long_prompts"], max_seq_length=16))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "preflight_refused"
    assert "every row is truncated at max_seq_length=16 before its first trained token" in error["message"]
    assert error["details"][0]["field"] == "dataset_id"
    assert job_count(team_a) == before
    # Preflight says the same, answering 200: it is a report.
    answer = team_a.post("/jobs/preflight", json=body(datasets["long_prompts"], max_seq_length=16)).json()
    assert answer["can_learn"] is False and answer["report"]["train"]["dropped_rows"] == 6


def test_a_refusal_of_the_validation_set_names_validation_dataset_id(team_a, datasets):
    """The train set learns at max_seq_length=22; every validation row is dropped there. The refusal names the
    field to change: it said dataset_id, and a script fixing that field sent the same job again."""
    refused = team_a.post("/jobs", json={**body(datasets["demo"], max_seq_length=22),
                                         "validation_dataset_id": datasets["long_prompts"]})
    assert refused.status_code == 422, refused.text
    (detail,) = refused.json()["error"]["details"]
    assert detail["field"] == "validation_dataset_id" and "no validation row is left to evaluate" in detail["message"]


def test_warnings_do_not_block_and_are_recorded_as_events(team_a, datasets):
    created = team_a.post("/jobs", json={**body(datasets["demo"], max_seq_length=22), "gpu_class": lane("nobody-listens")})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    events = team_a.get(f"/jobs/{job_id}/events").json()
    preflight = next(e for e in events if e["type"] == "preflight")
    assert "rows to train on" in preflight["message"] and preflight["data"]["train"]["truncated_rows"] > 0
    # packing "auto": the steps are the unpacked count, and the event says what a GPU that packs would take (it
    # said "N steps" alone, and such a job's total_steps came out lower with nothing saying why)
    note = preflight["data"]["steps_note"]
    assert note.startswith('packing "auto" packs rows on a GPU with flash-attention') and f"steps ({note})" in preflight["message"]
    warnings = [e for e in events if e["type"] == "preflight_warning"]
    assert warnings and all(e["level"] == "warning" for e in warnings)
    assert any("do not keep their EOS" in e["message"] for e in warnings)
    team_a.post(f"/jobs/{job_id}/cancel")


def test_bad_preflight_input_is_a_clear_error(team_a, team_b, datasets):
    too_many = team_a.post("/jobs/preflight", json={**body(datasets["demo"]), "examples": 50})
    assert too_many.status_code == 422 and too_many.json()["error"]["details"][0]["field"] == "examples"
    assert team_a.post("/jobs/preflight", json={**body(datasets["demo"]), "examples": "2"}).status_code == 422
    # Another team's dataset is as missing as a wrong id.
    assert team_b.post("/jobs/preflight", json=body(datasets["demo"])).status_code == 404
    # Early stopping decides by eval loss: without a validation set it is refused, naming the field.
    no_eval = team_a.post("/jobs/preflight", json=body(datasets["demo"], early_stopping=2))
    assert no_eval.status_code == 422 and no_eval.json()["error"]["details"][0]["field"] == "training.early_stopping"
    assert team_a.post("/jobs", json=body(datasets["demo"], early_stopping=2)).status_code == 422


def test_the_cli_prints_the_report_with_the_example_and_exits_1_where_creation_would_refuse(deployment, datasets,
                                                                                           tmp_path):
    key = deployment.team_key("team-a")
    env = {**os.environ, "QLORA_URL": deployment.url, "QLORA_API_KEY": key, "COLUMNS": "200"}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({k: v for k, v in body(datasets["demo"]).items() if k != "dataset_id"}))
    cli = [sys.executable, "-m", "app.cli", "jobs", "preflight", str(spec)]
    piped = subprocess.run([*cli, "--dataset", datasets["demo"]], capture_output=True, text=True, env=env)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["report"]["train"]["rows"] == 48  # a pipe gets JSON
    table = subprocess.run([*cli, "--dataset", datasets["demo"], "--table"], capture_output=True, text=True, env=env)
    assert "tokens per row (min / median / p95 / max)" in table.stdout and "trained tokens highlighted" in table.stdout
    assert "no problems found" in table.stdout
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "training": {"max_steps": 5, "max_seq_length": 16}}))
    refused = subprocess.run([*cli, "--dataset", datasets["long_prompts"], "--table"], capture_output=True, text=True,
                             env=env)
    assert refused.returncode == 1 and "refused: every row is truncated" in refused.stdout


def preflight_children(deployment) -> list[int]:
    """The API's preflight child processes (spawned by its ProcessPoolExecutor, in the API's session)."""
    (api,) = [p for p in deployment.procs if "serve" in p.args and p.poll() is None]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue  # gone meanwhile
        if int(stat[3]) == api.pid and b"spawn_main" in cmdline:  # field 6, the session: the API's own
            found.append(int(pid))
    return found


def test_a_preflight_process_that_dies_fails_one_preflight_at_most_and_the_next_gets_a_new_one(deployment, team_a,
                                                                                                 datasets):
    """Killed (as the kernel kills one out of memory), the child took its whole pool with it, and every
    preflight and job creation after it answered 500 until the API restarted."""
    import signal

    assert team_a.post("/jobs/preflight", json=body(datasets["demo"])).status_code == 200
    (child,) = preflight_children(deployment)
    os.kill(child, signal.SIGKILL)
    def dead() -> bool:  # a zombie, or already reaped (the file may go between the look and the read)
        try:
            with open(f"/proc/{child}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(dead, 60, f"the killed preflight child {child} to die", interval=0.05)
    answers = [team_a.post("/jobs/preflight", json=body(datasets["demo"])) for _ in range(2)]
    # The first may still find the dead pool (then 429, saying so) or find it already known dead (a new one).
    assert answers[0].status_code in (200, 429), answers[0].text
    if answers[0].status_code == 429:
        assert answers[0].json()["error"]["code"] == "preflight_busy" and "died" in answers[0].json()["error"]["message"]
    assert answers[1].status_code == 200 and answers[1].json()["report"]["train"]["rows"] == 48, answers[1].text
    created = team_a.post("/jobs", json={**body(datasets["demo"]), "gpu_class": lane("nobody-listens")})
    assert created.status_code == 201, created.text
    (new_child,) = preflight_children(deployment)
    assert new_child != child
    team_a.post(f"/jobs/{created.json()['id']}/cancel")
