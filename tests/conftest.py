import pytest

from worker.training.tiny import build_tiny_model, demo_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama model and tokenizer, built once per test session, offline and from a seed."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo task: train rows and held-out rows whose prompts never occur in training."""
    d = tmp_path_factory.mktemp("demo-data")
    return {
        "train": write_jsonl(demo_rows(0, 480), d / "train.jsonl"),
        "validation": write_jsonl(demo_rows(0, 48, split="heldout"), d / "validation.jsonl"),
    }
