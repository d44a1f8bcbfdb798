import os

import pytest

from tests import services
from tests.deployment import BUCKET
from tests.once import once_per_suite
from worker.training.tiny import build_tiny_model, demo_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, worker_id):
    """The tiny Llama model and tokenizer, built once for the suite (not once per test process), offline and
    from a seed. Read-only: a test that changes a model copies it first."""
    return once_per_suite("tiny-model", tmp_path_factory, worker_id,
                          lambda: build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo task: train rows and held-out rows whose prompts never occur in training."""
    d = tmp_path_factory.mktemp("demo-data")
    return {
        "train": write_jsonl(demo_rows(0, 480, distinct=True), d / "train.jsonl"),
        "validation": write_jsonl(demo_rows(0, 48, split="heldout", distinct=True), d / "validation.jsonl"),
    }


@pytest.fixture(scope="session")
def backing_services():
    services.ensure_postgres()
    services.ensure_redis()
    endpoint, stop = services.start_s3_server()
    services.create_bucket(endpoint, BUCKET)
    # The tests themselves look into the store (what an upload left behind) with the same credentials.
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({k: v for k, v in services.s3_env(endpoint).items() if k in saved})
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stop()


