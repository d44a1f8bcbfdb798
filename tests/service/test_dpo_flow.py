"""SFT, then DPO from it, through the official `openai` SDK against the real deployment and a worker:
a preference file, an SFT job, a DPO job that starts from its adapter (extra_body initial_job_id), and
the DPO job's "metrics" events carrying reward accuracy and margin. Then the DPO job's eval report, as
the API, `qlora jobs report` and the dashboard show it: held-out pairs with both answers, and the reward
accuracy and margin on the validation pairs, first evaluation and final."""

from __future__ import annotations

import json
import time

import pytest
from openai import OpenAI
from playwright.sync_api import expect

from tests.service.test_cli_client import clean_env, qlora
from tests.service.test_dashboard import page, sign_in  # noqa: F401 (page: a fixture)
from worker.training.tiny import demo_pairs, write_jsonl

FINISHED = ("succeeded", "failed", "cancelled")
# No merge: this module is about the flow between the two jobs and what the DPO job reports, not the merge.
LORA = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "eval": {"prompts": 0}, "output": {"merge": False}}
# The DPO job's report: a few held-out pairs, short answers (seconds on the tiny model).
DPO_EVAL = {"prompts": 3, "max_new_tokens": 12}
# Short runs (about two minutes each on two busy CPU cores): what is checked is the flow, not how well they learn.
SFT_TRAINING = {"max_steps": 20, "max_seq_length": 64, "logging_steps": 10, "save_steps": 10, "lr_scheduler": "cosine",
                "per_device_batch_size": 16, "learning_rate": 3e-3}
DPO_TRAINING = {"max_steps": 10, "max_seq_length": 64, "logging_steps": 5, "save_steps": 5, "eval_steps": 5,
                "per_device_batch_size": 8, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def sdk(deployment):
    return OpenAI(base_url=deployment.url + "/v1", api_key=deployment.team_key("dpo-team"), max_retries=0)


def wait(sdk, job_id: str, deployment, timeout: float = 400):
    deadline = time.monotonic() + timeout
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    while job.status not in FINISHED:
        assert time.monotonic() < deadline, f"{job.status} at step {job.model_extra['progress']}\n{deployment.log('worker-shared')}"
        time.sleep(1)
        job = sdk.fine_tuning.jobs.retrieve(job_id)
    return job


def upload(sdk, path):
    with open(path, "rb") as f:
        return sdk.files.wait_for_processing(sdk.files.create(file=f, purpose="fine-tune").id)


@pytest.fixture(scope="module")
def flow(sdk, worker, deployment, demo_data, tmp_path_factory):
    """The SFT job and the DPO job started from it, both finished; and the held-out pairs."""
    tmp_path = tmp_path_factory.mktemp("dpo-flow")
    held_out_pairs = demo_pairs(1, 24, split="heldout")
    chat = upload(sdk, demo_data["train"])
    pairs = upload(sdk, write_jsonl(demo_pairs(1, 128), tmp_path / "pairs.jsonl"))
    held_out = upload(sdk, write_jsonl(held_out_pairs, tmp_path / "pairs-heldout.jsonl"))
    assert pairs.status == "processed" and held_out.status == "processed"

    sft = sdk.fine_tuning.jobs.create(model="tiny", training_file=chat.id, suffix="sft",
                                      method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}},
                                      extra_body={**LORA, "training": SFT_TRAINING})
    sft = wait(sdk, sft.id, deployment)
    assert sft.status == "succeeded", sft.error

    dpo = sdk.fine_tuning.jobs.create(
        model="tiny", training_file=pairs.id, validation_file=held_out.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}},
        extra_body={**LORA, "eval": DPO_EVAL, "training": DPO_TRAINING, "initial_job_id": sft.id})
    assert dpo.method.type == "dpo" and dpo.model_extra["initial_job_id"] == sft.id
    dpo = wait(sdk, dpo.id, deployment)
    assert dpo.status == "succeeded", dpo.error
    return sft, dpo, held_out_pairs


def test_sft_then_dpo_from_it_through_the_sdk(sdk, flow, deployment):
    sft, dpo, _ = flow
    assert sft.method.type == "supervised"
    assert dpo.method.dpo.hyperparameters.beta == 0.1
    assert dpo.model_extra["spec"]["method"]["type"] == "dpo"

    events = list(sdk.fine_tuning.jobs.list_events(dpo.id, limit=20))  # the SDK pages through them
    metrics = [e for e in events if e.type == "metrics"]
    train = [e.data for e in metrics if "train_loss" in e.data]
    valid = [e.data for e in metrics if "valid_loss" in e.data]
    assert [d["step"] for d in train] == [10, 5]  # newest first
    assert all(0 <= d["train_reward_accuracy"] <= 1 and "train_reward_margin" in d for d in train)
    assert [d["step"] for d in valid] == [10, 5] and all("valid_reward_accuracy" in d for d in valid)
    assert "reward accuracy=" in next(e for e in metrics if "train_loss" in e.data).message
    # The lineage, as the native API shows it: the DPO job trained from the SFT job's adapter, its reference.
    native = deployment.client(deployment.team_key("dpo-team")).get(f"/jobs/{dpo.id.removeprefix('ftjob-')}").json()
    assert native["initial_job_id"] == sft.id.removeprefix("ftjob-")
    assert native["summary"]["initial_job_id"] == native["initial_job_id"]
    assert native["summary"]["initial_adapter"]["sha256"] and native["summary"]["reference_model"] == "initial_adapter"
    # Named by its job, as the base by the spec: no directory of the worker's disk reaches the team.
    assert native["summary"]["initial_adapter"]["job_id"] == native["initial_job_id"]
    assert "path" not in native["summary"]["initial_adapter"] and "base_model_path" not in native["summary"]


def test_the_dpo_report_shows_held_out_pairs_and_the_rewards(flow, deployment, tmp_path):
    _, dpo, held_out = flow
    key = deployment.team_key("dpo-team")
    native = deployment.client(key)
    job_id = dpo.id.removeprefix("ftjob-")
    answer = native.get(f"/jobs/{job_id}/report")
    assert answer.status_code == 200, answer.text
    report = answer.json()

    # Each row a held-out pair: its prompt, the preferred answer (the reference), the rejected one, and the
    # base's and the tuned model's answers now.
    assert len(report["rows"]) == DPO_EVAL["prompts"] and report["prompts_from"] == "validation"
    for row in report["rows"]:
        pair = held_out[row["line"] - 1]
        assert (row["prompt"], row["reference"], row["rejected"]) == (
            pair["input"]["messages"][0]["content"], pair["preferred_output"][0]["content"],
            pair["non_preferred_output"][0]["content"])
        assert isinstance(row["base"]["answer"], str) and isinstance(row["tuned"]["answer"], str)

    # The rewards on the 24 validation pairs: the first evaluation (step 5) and the final one (step 10), as
    # the job's eval points have them.
    evals = native.get(f"/jobs/{job_id}/metrics").json()["eval"]
    rewards = report["rewards"]
    assert (rewards["pairs"], rewards["reference"], rewards["evaluations"]) == (24, "initial_adapter", 2)
    for name, point in (("first", evals[0]), ("final", evals[-1])):
        assert rewards[name]["step"] == point["step"]
        for field in ("accuracy", "margin", "chosen", "rejected"):
            assert rewards[name][field] == pytest.approx(point[f"reward_{field}"]), (name, field)
    assert (rewards["first"]["step"], rewards["final"]["step"]) == (5, 10)
    assert 0 <= rewards["final"]["accuracy"] <= 1

    # The CLI: the API's JSON on a pipe; on a terminal both answers of each pair, and the rewards first vs final.
    env = clean_env(tmp_path) | {"QLORA_URL": deployment.url, "QLORA_API_KEY": key}
    piped = qlora(env, "jobs", "report", job_id)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == report
    table = qlora(env, "jobs", "report", job_id, "--table")
    assert table.returncode == 0, table.stderr
    for heading in ("chosen", "rejected", "rewards on 24 validation pairs", "reward accuracy", "reward margin"):
        assert heading in table.stdout, heading
    for row in report["rows"]:
        assert row["reference"] in table.stdout and row["rejected"] in table.stdout
    first, final = rewards["first"], rewards["final"]
    assert f"{first['accuracy']:.0%}" in table.stdout and f"{final['margin']:+.4f}" in table.stdout


def test_the_dashboard_shows_the_dpo_report(flow, page, deployment):  # noqa: F811
    _, dpo, _ = flow
    key = deployment.team_key("dpo-team")
    job_id = dpo.id.removeprefix("ftjob-")
    report = deployment.client(key).get(f"/jobs/{job_id}/report").json()
    sign_in(page, key)
    page.goto(f"/#/jobs/{job_id}")
    card = page.locator("#report")
    expect(card).to_be_visible()

    rewards = card.locator("#report-rewards")
    expect(rewards.locator("caption")).to_have_text("Rewards on 24 validation pairs")
    first, final = report["rewards"]["first"], report["rewards"]["final"]
    expect(rewards.locator("thead")).to_contain_text(f"First eval (step {first['step']})")
    expect(rewards.locator("thead")).to_contain_text(f"Final (step {final['step']})")
    for key_, read in (("accuracy", lambda x: f"{100 * x:.0f}%"), ("margin", lambda x: f"{x:.4f}")):
        cells = rewards.locator(f"tr[data-reward='{key_}'] td")
        expect(cells.nth(0)).to_have_text(read(first[key_]))
        expect(cells.nth(1)).to_have_text(read(final[key_]))

    headers = card.locator("#report-rows thead th")
    expect(headers).to_have_text(["Line", "Prompt", "Chosen", "Rejected", "Base", "Tuned"])
    rows = card.locator("#report-rows tbody tr")
    expect(rows).to_have_count(len(report["rows"]))
    for i, row in enumerate(report["rows"]):
        cells = rows.nth(i).locator("td")
        expect(cells.nth(1).locator(".gen-text")).to_have_text(row["prompt"])
        expect(cells.nth(2).locator(".gen-text")).to_have_text(row["reference"])
        expect(cells.nth(3).locator(".gen-text")).to_have_text(row["rejected"])
        if row["tuned"]["answer"]:
            expect(cells.nth(5).locator(".gen-text")).to_have_text(row["tuned"]["answer"])
