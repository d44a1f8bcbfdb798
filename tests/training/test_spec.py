"""Bad specs are rejected with the field named and its allowed range; the spec never imports torch."""

import json
import subprocess
import sys

import pytest

from worker.training.spec import JobSpec, SpecError

BASE = {"base_model": "tiny", "training": {"max_steps": 10}}


def errors_of(data) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        JobSpec.parse(data)
    return dict(info.value.errors)


def test_defaults_follow_qlora():
    spec = JobSpec.parse(BASE)
    assert spec.quantization.bits == 4 and spec.quantization.quant_type == "nf4"
    assert spec.quantization.double_quant is True
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.05)
    assert spec.lora.target_modules == "all-linear"
    assert spec.training.learning_rate == 2e-4
    assert spec.training.optimizer == "paged_adamw_32bit"
    assert spec.training.gradient_checkpointing is True
    assert spec.output.merge is True and spec.output.merge_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("patch", "field", "allowed"),
    [
        ({"lora": {"r": 0}}, "lora.r", ">= 1 and <= 1024"),
        ({"training": {"max_steps": 10, "learning_rate": 0}}, "training.learning_rate", "> 0 and <= 1"),
        ({"training": {"max_steps": 10, "learning_rate": -1e-4}}, "training.learning_rate", "> 0 and <= 1"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout", ">= 0 and < 1"),
        ({"quantization": {"bits": 3}}, "quantization.bits", "4 | 8 | 'none'"),
        ({"quantization": {"compute_dtype": "int4"}}, "quantization.compute_dtype", "'auto' | 'bfloat16'"),
        ({"training": {"max_steps": 10, "optimizer": "sgd"}}, "training.optimizer", "'paged_adamw_32bit'"),
        ({"training": {"max_steps": 0}}, "training.max_steps", ">= 1"),
        ({"method": {"type": "dpo", "beta": 0}}, "method.beta", ">= 0.001 and <= 10"),
        ({"method": {"type": "dpo", "beta": "high"}}, "method.beta", ">= 0.001 and <= 10"),
        # a beta that rounds to 0 in float32 trains a flat log-2 loss with no gradient, and "succeeds"
        ({"method": {"type": "dpo", "beta": 1e-300}}, "method.beta", ">= 0.001 and <= 10"),
        ({"method": {"type": "dpo", "beta": 1e-4, "loss": "ipo"}}, "method.beta", ">= 0.001 and <= 10"),
        ({"method": {"type": "dpo", "beta": "NaN"}}, "method.beta", "finite number (got 'NaN'; allowed: >= 0.001"),
        ({"method": {"type": "dpo", "label_smoothing": "-inf"}}, "method.label_smoothing", "finite number"),
        ({"method": "dpo"}, "method", 'must be an object, {"type": "sft"} or {"type": "dpo", "beta": 0.1'),
        ({"method": {"type": "dpo", "loss": "hinge"}}, "method.loss", "'sigmoid' | 'ipo'"),
        # sft settings a dpo run cannot follow are refused, not silently ignored
        ({"method": {"type": "dpo"}, "training": {"max_steps": 10, "train_on_inputs": True}},
         "training.train_on_inputs", "method dpo compares the two answers only"),
        ({"method": {"type": "dpo"}, "training": {"max_steps": 10, "packing": True}},
         "training.packing", "method dpo never packs"),
        ({"method": {"type": "dpo", "label_smoothing": 0.5}}, "method.label_smoothing", ">= 0 and < 0.5"),
        ({"method": {"type": "ppo"}}, "method.type", "'sft', 'dpo'"),
        ({"method": {"beta": 0.1}}, "method.type", "'sft', 'dpo'"),
        ({"method": {"type": "sft", "beta": 0.1}}, "method.beta", "unknown field; allowed here: type"),
        ({"method": {"type": "dpo", "loss": "ipo", "label_smoothing": 0.1}}, "method.label_smoothing", "sigmoid"),
        ({"lora": {"target_modules": []}}, "lora.target_modules", "non-empty list of module names"),
        ({"lora": {"target_modules": [f"m{i}" for i in range(65)]}}, "lora.target_modules", "at most 64 module names"),
        ({"lora": {"target_modules": ["q" * 129]}}, "lora.target_modules", "of at most 128 characters"),
    ],
)
def test_out_of_range_names_field_and_range(patch, field, allowed):
    errors = errors_of({**BASE, **patch})
    assert field in errors, errors
    assert allowed in errors[field]


@pytest.mark.parametrize("field", ["activation_offload", "tiled_mlp", "packing"])
def test_a_switch_that_may_be_auto_names_itself_once_with_all_it_takes(field):
    """training.activation_offload, tiled_mlp and packing take true, false or "auto". A value that is none of
    them was refused under two fields, one that does not exist ("training.tiled_mlp.bool", pydantic's tag for
    the union's boolean branch) and the real one saying it took 'auto' alone."""
    errors = errors_of({**BASE, "training": {"max_steps": 10, field: "maybe"}})
    assert list(errors) == [f"training.{field}"], errors
    assert "(got 'maybe'; allowed: true | false | 'auto')" in errors[f"training.{field}"]


def test_epochs_and_max_steps_both_missing_or_both_set():
    assert "set one of them" in errors_of({"base_model": "x", "training": {}})["training.epochs / max_steps"]
    both = errors_of({"base_model": "x", "training": {"epochs": 1, "max_steps": 5}})
    assert "not both" in both["training.epochs / max_steps"]


def test_unknown_fields_are_refused_not_ignored():
    errors = errors_of({**BASE, "trust_remote_code": True})
    assert "unknown field" in errors["trust_remote_code"]
    typo = errors_of({"base_model": "x", "training": {"max_steps": 5, "learnin_rate": 1e-4}})
    assert "learning_rate" in typo["training.learnin_rate"]  # the message lists the real names
    # and names the one a typo meant, first: among 24 names, "unknown field" read as a setting that does not exist
    assert typo["training.learnin_rate"].startswith("unknown field (did you mean learning_rate?); allowed here: ")
    misspelt = errors_of({"base_model": "x", "trainig": {"max_steps": 5}})
    assert misspelt["trainig"].startswith("unknown field (did you mean training?)"), misspelt
    assert "did you mean" not in errors_of({**BASE, "trust_remote_code": True})["trust_remote_code"]  # no near name


def test_every_error_is_reported_at_once():
    errors = errors_of({"base_model": "x", "lora": {"r": 0, "alpha": -1}, "training": {"max_steps": 1, "seed": -5}})
    assert {"lora.r", "lora.alpha", "training.seed"} <= set(errors)


def test_spec_file_errors(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        JobSpec.from_file(bad)
    bad.write_text(json.dumps(BASE))
    assert JobSpec.from_file(bad).training.max_steps == 10


def test_importing_spec_and_data_does_not_import_torch():
    code = "import sys, worker.training.spec, worker.training.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_method_defaults_to_sft_and_dpo_to_the_papers_beta():
    assert JobSpec.parse(BASE).method.type == "sft"
    dpo = JobSpec.parse({**BASE, "method": {"type": "dpo"}}).method
    assert (dpo.type, dpo.beta, dpo.loss, dpo.label_smoothing) == ("dpo", 0.1, "sigmoid", 0.0)
    # A spec stored before methods existed reads as sft, and the dump round-trips.
    spec = JobSpec.parse({**BASE, "method": {"type": "dpo", "beta": 0.5, "loss": "ipo"}})
    assert JobSpec.parse(spec.model_dump(mode="json")) == spec


def test_a_dpo_spec_stored_before_packing_and_train_on_inputs_were_refused_still_reads_as_stored():
    """POST /jobs took "packing": true and "train_on_inputs": true for a dpo job (the run silently did neither)
    until 5d96912 refused them. A job stored so, queued or paused across the upgrade, is parsed again by the
    worker that runs or resumes it: it failed there as an invalid spec, losing a paused run's checkpoints."""
    stored = {**BASE, "method": {"type": "dpo"}, "training": {"max_steps": 10, "packing": True, "train_on_inputs": True}}
    assert set(errors_of(stored)) == {"training.train_on_inputs"}  # a new request is still refused
    spec = JobSpec.parse(stored, stored=True)
    assert (spec.method.type, spec.training.packing, spec.training.train_on_inputs) == ("dpo", True, True)
    assert JobSpec.parse(spec.model_dump(mode="json"), stored=True) == spec
