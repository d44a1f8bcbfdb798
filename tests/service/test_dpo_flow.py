"""SFT, then DPO from it, through the official `openai` SDK against the real deployment and a worker:
a preference file, an SFT job, a DPO job that starts from its adapter (extra_body initial_job_id), and
the DPO job's "metrics" events carrying reward accuracy and margin."""

from __future__ import annotations

import time

import pytest
from openai import OpenAI

from worker.training.tiny import demo_pairs, write_jsonl

FINISHED = ("succeeded", "failed", "cancelled")
# No eval report and no merge: this test is about the flow between the two jobs, not their outputs.
LORA = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "eval": {"prompts": 0}, "output": {"merge": False}}
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


def test_sft_then_dpo_from_it_through_the_sdk(sdk, worker, deployment, demo_data, tmp_path):
    chat = upload(sdk, demo_data["train"])
    pairs = upload(sdk, write_jsonl(demo_pairs(1, 128), tmp_path / "pairs.jsonl"))
    held_out = upload(sdk, write_jsonl(demo_pairs(1, 24, split="heldout"), tmp_path / "pairs-heldout.jsonl"))
    assert pairs.status == "processed" and held_out.status == "processed"

    sft = sdk.fine_tuning.jobs.create(model="tiny", training_file=chat.id, suffix="sft",
                                      method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}},
                                      extra_body={**LORA, "training": SFT_TRAINING})
    sft = wait(sdk, sft.id, deployment)
    assert sft.status == "succeeded", sft.error
    assert sft.method.type == "supervised"

    dpo = sdk.fine_tuning.jobs.create(
        model="tiny", training_file=pairs.id, validation_file=held_out.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}},
        extra_body={**LORA, "training": DPO_TRAINING, "initial_job_id": sft.id})
    assert dpo.method.type == "dpo" and dpo.model_extra["initial_job_id"] == sft.id
    dpo = wait(sdk, dpo.id, deployment)
    assert dpo.status == "succeeded", dpo.error
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
