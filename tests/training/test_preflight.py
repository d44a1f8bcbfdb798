"""Preflight against the trainer: the numbers it gives before a run are the ones the run reports."""

import json

from tests.training.test_recipe import short_spec
from worker.training.preflight import preflight
from worker.training.recipe import run
from worker.training.spec import JobSpec


def test_preflight_numbers_are_what_the_trainer_then_reports(tiny_model_dir, demo_data, tmp_path):
    # The demo rows are 21 to 23 tokens: at 22 some are truncated (and lose their EOS), so every count is tested.
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=22, max_steps=None, epochs=1,
                                    per_device_batch_size=8, gradient_accumulation_steps=3))
    # The demo's validation rows (fewer) as the training set: one epoch in seconds.
    train_path = demo_data["validation"]
    report = preflight(spec, tiny_model_dir, train_path, validation_path=demo_data["validation"])
    train = report["train"]
    assert 0 < train["truncated_rows"] < train["rows"] and train["trained_tokens_lost"] == train["truncated_rows"]
    assert train["rows_without_eos"] == train["truncated_rows"]
    assert any("do not keep their EOS" in w for w in report["warnings"])
    result = run(spec, train_path, tmp_path / "run", validation_path=demo_data["validation"])
    trained = result.summary["data"]["train"]
    for key in ("rows", "truncated_rows", "dropped_rows", "tokens", "trained_tokens"):
        assert train[key] == trained[key], key
    assert report["validation"]["truncated_rows"] == result.summary["data"]["validation"]["truncated_rows"]
    assert report["steps"] == result.summary["steps"]["planned"] == result.summary["steps"]["completed"]
    assert report["epochs"] == 1.0 and report["steps_per_epoch"] == report["steps"]


def test_a_dataset_whose_answers_all_sit_past_max_seq_length_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "word " * 40 + str(i)}, {"role": "assistant", "content": "yes"}]}
            for i in range(6)]
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=16))
    report = preflight(spec, tiny_model_dir, data)
    assert report["train"]["dropped_rows"] == 6 and report["train"]["trained_tokens"] == 0
    assert len(report["refusals"]) == 1
    assert report["refusals"][0].startswith("every row is truncated at max_seq_length=16 before its first trained token")


def test_the_example_shows_train_on_inputs_mistaken(tiny_model_dir, demo_data):
    """Token by token, what the loss sees: with train_on_inputs the user's words are trained too."""
    def example(**training):
        report = preflight(JobSpec.parse(short_spec(tiny_model_dir, **training)), tiny_model_dir, demo_data["train"],
                           examples=1)
        return report, report["examples"][0]["tokens"]

    report, tokens = example()
    texts = [t["text"] for t in tokens]
    answer = texts.index("<|assistant|>") + 2  # the role marker and its line break are the prompt's
    assert not any(t["trained"] for t in tokens[:answer])  # the user's question is context, not learned
    assert all(t["trained"] for t in tokens[answer:])
    assert texts[-1] == "</s>"  # and EOS is learned
    assert report["warnings"] == []
    mistaken, tokens = example(train_on_inputs=True)
    assert all(t["trained"] for t in tokens)
    assert any("train_on_inputs is on" in w for w in mistaken["warnings"])
