"""Admission control: a job is routed to a GPU class that holds its estimated peak, or refused with
what it needs, what there is and what to change."""

from __future__ import annotations

import json

import httpx
import pytest

from tests import services
from tests.deployment import upload
from tests.model_configs import LLAMA3_8B, MIXTRAL_8X7B, PHI3_MINI
from worker.training.estimate import DATASET_BYTES_PER_TOKEN, GIB

CLASSES = {"l4": 24, "h100": 80}


@pytest.fixture(scope="module")
def api(deployment):
    """A second API process on the same deployment, told which GPU classes the workers serve."""
    port = services.free_port()
    proc = deployment.spawn("serve", "--no-worker", log_name="api-admission",
                            extra_env={"QLORA_PORT": str(port), "QLORA_GPU_CLASSES": json.dumps(CLASSES),
                                       "QLORA_DEFAULT_GPU_CLASS": "h100", "QLORA_EXTRA_GPU_CLASSES": "[]",
                                       # an L4 host's memory per GPU; the H100s' is not given (not checked)
                                       "QLORA_HOST_MEMORY": json.dumps({"l4": 6})})
    url = f"http://127.0.0.1:{port}"
    # (It went on after 60 s without a word, and the first request then failed for a reason other than its own.)
    assert services.wait_until_up(url + "/health", proc, timeout_s=120, need_ok=True), deployment.log("api-admission")
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {deployment.team_key('adm', admin=True)}"})
    created = admin.post("/models", json={"name": "llama-3-8b", "hub_id": "meta-llama/Meta-Llama-3-8B",
                                          "revision": "main", "config": LLAMA3_8B})
    assert created.status_code == 201, created.text
    yield admin
    deployment.stop(proc)


@pytest.fixture(scope="module")
def dataset_id(api, demo_data):
    return upload(api, demo_data["validation"]).json()["id"]


# The standard recipe: "auto" would tile the MLPs of a job that does not fit an L4 otherwise (tested in
# tests/fast/test_admission.py); these tests are about the classes and the micro-batch.
STANDARD = {"activation_offload": False, "tiled_mlp": False}


def job(api, dataset_id, **training):
    body = {"dataset_id": dataset_id, "base_model": "llama-3-8b",
            "training": {"max_steps": 10, "max_seq_length": 2048, **STANDARD, **training}}
    return api.post("/jobs", json=body)


def test_a_job_goes_to_the_smallest_class_that_holds_it(api, dataset_id):
    small = job(api, dataset_id, per_device_batch_size=1)
    assert small.status_code == 201, small.text
    assert small.json()["queue"] == "gpu-l4"
    large = job(api, dataset_id, per_device_batch_size=16)
    assert large.json()["queue"] == "gpu-h100"
    created = api.get(f"/jobs/{large.json()['id']}/events").json()[0]
    assert "estimated peak" in created["message"] and created["data"]["estimated_peak_bytes"] > 24 * GIB
    for response in (small, large):
        api.post(f"/jobs/{response.json()['id']}/cancel")


def test_a_job_that_fits_no_class_is_refused_with_what_to_change(api, dataset_id):
    response = api.post("/jobs", json={"dataset_id": dataset_id, "base_model": "llama-3-8b", "gpu_class": "l4",
                                       "training": {"max_steps": 10, "max_seq_length": 2048,
                                                    "per_device_batch_size": 16, **STANDARD}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "does_not_fit"
    # 16 rows of 2048 tokens may be padded: SDPA's boolean mask (64 MiB kept) and one layer's bf16 copy (128 MiB)
    assert "needs about 34.30 GiB resident (34.62 GiB with its paged optimizer state)" in error["message"]
    assert "l4, has 24.00 GiB" in error["message"]
    assert "per_device_batch_size 8 with gradient_accumulation_steps 8" in error["message"]
    assert error["details"]["needed_bytes"] > error["details"]["available_bytes"] == 24 * GIB
    huge = job(api, dataset_id, per_device_batch_size=64, max_seq_length=8192, gradient_checkpointing=False)
    assert huge.status_code == 400 and "h100, has 80.00 GiB" in huge.json()["error"]["message"]


def test_auto_micro_batch_becomes_the_largest_that_fits(api, dataset_id):
    response = job(api, dataset_id, per_device_batch_size="auto")
    assert response.status_code == 201, response.text
    stored = response.json()["spec"]["training"]["per_device_batch_size"]
    assert isinstance(stored, int) and stored >= 1
    assert response.json()["queue"] == "gpu-l4"  # the smallest class; auto fills it
    api.post(f"/jobs/{response.json()['id']}/cancel")


def test_offload_the_hosts_cannot_hold_is_refused_and_an_unchecked_one_says_so(api, dataset_id):
    """8 GiB of offloaded activations (Llama 3 8B at 32k tokens) pinned on an L4 whose hosts give a job 6: a
    422 naming training.activation_offload when the job is posted, not an out-of-memory when it first steps."""
    long = {"max_seq_length": 32768, "per_device_batch_size": 1, "activation_offload": True, "tiled_mlp": True}
    refused = api.post("/jobs", json={"dataset_id": dataset_id, "base_model": "llama-3-8b", "gpu_class": "l4",
                                      "training": {"max_steps": 10, **long}})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["details"][0]["field"] == "training.activation_offload"
    assert "needs 8.00 GiB of host memory" in error["message"] and "may hold 6.00 GiB" in error["message"]
    created = api.post("/jobs", json={"dataset_id": dataset_id, "base_model": "llama-3-8b", "gpu_class": "h100",
                                      "training": {"max_steps": 10, **long}})
    assert created.status_code == 201, created.text
    event = api.get(f"/jobs/{created.json()['id']}/events").json()[0]
    assert "host memory not checked, QLORA_HOST_MEMORY gives none for h100" in event["message"]
    estimate = event["data"]["host_estimate"]
    assert estimate["offloaded activations (pinned)"] == 32 * 32768 * 4096 * 2
    # ...beside its dataset's, held for the whole run (estimate.DATASET_BYTES_PER_TOKEN a token)
    dataset = api.get(f"/datasets/{dataset_id}").json()
    assert estimate["datasets (read and encoded)"] == DATASET_BYTES_PER_TOKEN * dataset["token_estimate"] > 0
    api.post(f"/jobs/{created.json()['id']}/cancel")


def test_unknown_class_and_a_model_without_a_config(api, dataset_id):
    unknown = api.post("/jobs", json={"dataset_id": dataset_id, "base_model": "llama-3-8b", "gpu_class": "tpu",
                                      "training": {"max_steps": 1}})
    assert unknown.status_code == 422 and "not a class the workers serve (l4, h100)" in unknown.json()["error"]["message"]
    api.post("/models", json={"name": "mystery", "hub_id": "org/mystery", "revision": "v1"})
    response = api.post("/jobs", json={"dataset_id": dataset_id, "base_model": "mystery", "gpu_class": "l4",
                                       "training": {"max_steps": 1}})
    assert response.status_code == 201  # admitted, and the job's events say memory was not checked
    created = api.get(f"/jobs/{response.json()['id']}/events").json()[0]
    assert "memory not checked: the registry has no config.json for mystery" in created["message"]
    api.post(f"/jobs/{response.json()['id']}/cancel")


def test_a_mixture_of_experts_is_refused_when_registered(api):
    """Its experts would load in 16 bits: refused before any job could be admitted on a 4-bit estimate."""
    response = api.post("/models", json={"name": "mixtral-8x7b", "hub_id": "mistralai/Mixtral-8x7B-v0.1",
                                         "revision": "main", "config": MIXTRAL_8X7B})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "mixture-of-experts model (8 experts per layer)" in error["message"]
    assert error["details"][0]["field"] == "config"
    assert "mixtral-8x7b" not in [m["name"] for m in api.get("/models").json()]


def test_target_modules_the_model_lacks_are_refused_when_the_job_is_created(api, dataset_id):
    """Llama's names on Phi-3, whose blocks fuse q/k/v: a 422 naming the field and the layers there are,
    not a job that waits in the queue to fail on a worker."""
    registered = api.post("/models", json={"name": "phi-3-mini", "hub_id": "microsoft/Phi-3-mini-4k-instruct",
                                           "revision": "main", "config": PHI3_MINI})
    assert registered.status_code == 201, registered.text
    before = len(api.get("/jobs").json()["data"])
    body = {"dataset_id": dataset_id, "base_model": "phi-3-mini", "lora": {"target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 1}}
    response = api.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"][0]["field"] == "lora.target_modules"
    assert "they have: qkv_proj, o_proj, gate_up_proj, down_proj" in error["message"]
    assert len(api.get("/jobs").json()["data"]) == before
    fused = api.post("/jobs", json={**body, "lora": {"target_modules": ["qkv_proj", "o_proj"]}})
    assert fused.status_code == 201, fused.text
    api.post(f"/jobs/{fused.json()['id']}/cancel")
