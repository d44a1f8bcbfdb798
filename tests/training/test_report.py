"""The eval report at the end of a run, on the demo task with the tiny model: the tuned model answers
held-out prompts right where its base cannot, the report shows both answers beside the reference, and
its answers and scores are what an independent generation with the merged model gives.

One demo run (tests/training/conftest.py), whose training is checked here too (it learns through the
frozen 4-bit base, stops by itself, merges faithfully: the tests test_recipe.py had, on the same run); the
other cases call the report on its output directory or train for two steps.
"""

import json
import math
import shutil
from collections import Counter

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.training.data import Example, Message, validate_lines
from worker.training.merge import FIDELITY_MAX_TOKENS, fidelity_rows, forward_rows, measure_fidelity
from worker.training.model import dequantized_on_cpu, load_base_model, resolve_compute_dtype
from worker.training.protocol import PHASE_EVENT, PHASES, Event, TrainPoint
from worker.training.recipe import run
from worker.training.report import (
    LOSS_MAX_ROWS,
    _autocast,
    choose_prompts,
    describe_report,
    exact_match,
    generate,
    make_report,
    mean_loss,
    reward_movement,
    spread,
    token_f1,
)
from worker.training.spec import JobSpec
from worker.training.tiny import ANIMAL_SOUNDS, demo_rows, demo_spec, score_demo, write_jsonl
from worker.training.tokenization import encode_examples, prepare_tokenizer


def spec_for(model_dir, **sections) -> JobSpec:
    data = demo_spec(str(model_dir))
    for name, values in sections.items():
        data[name] = data.get(name, {}) | values
    return JobSpec.parse(data)


@pytest.fixture(scope="module")
def demo_run(demo_training_run):
    """demo_spec's run (tests/training/conftest.py): its result and the records it sent its sink."""
    result, records, _ = demo_training_run
    assert result.status == "succeeded"
    return result, records


# The demo run's training, as test_recipe checked it: it learns through the frozen 4-bit base, stops by
# itself, loads with peft, merges faithfully, records what a user needs, and is close to plain LoRA. Here,
# beside the report's tests of the same run, so one test process trains it (it is the training tier's longest).
DEMO_HELDOUT = demo_rows(0, 48, split="heldout")


@pytest.fixture(scope="module")
def qlora_run(demo_training_run):
    """demo_spec's run (tests/training/conftest.py): its result, and what FrozenBaseProbe saw of the base."""
    result, _, probe = demo_training_run
    return result, probe


def test_training_learns_through_frozen_4bit_weights(qlora_run, tiny_model_dir):
    result, probe = qlora_run
    assert result.status == "succeeded"
    s = result.summary
    # The spec as it ran: compute_dtype "auto" decided for this device, as run.json records it for a resume.
    ran = str(resolve_compute_dtype("auto", "cpu")).removeprefix("torch.")
    assert s["spec"]["quantization"] == {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": ran}

    # The loss falls.
    curve = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in curve if r["kind"] == "train"]
    assert len(train) == 16 and train[-1] < 0.5 * train[0]
    evals = [r for r in curve if r["kind"] == "eval"]
    assert evals and evals[-1]["eval_loss"] < 0.5 * train[0]
    # The last step is an eval step: the final evaluation is that one, not a second point at the same step.
    assert [r["step"] for r in evals] == [40, 80, 120, 160]
    assert result.summary["eval_loss_final"] == evals[-1]["eval_loss"]

    # The base stayed frozen: the 4-bit layers are there and no non-LoRA weight moved.
    assert probe.quantized == 28  # 7 linear layers x 4 blocks
    assert probe.changed == []

    # The merged model answers held-out prompts it never saw; the base model cannot.
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir / "merged")
    merged = AutoModelForCausalLM.from_pretrained(result.out_dir / "merged")
    assert merged.dtype == torch.bfloat16
    trained = score_demo(merged, tokenizer, DEMO_HELDOUT)
    base = score_demo(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, DEMO_HELDOUT)
    assert trained["accuracy"] >= 0.9, trained
    assert base["accuracy"] <= 0.05, base


def test_eos_is_learned_generation_stops_by_itself(qlora_run, tiny_model_dir):
    result, _ = qlora_run
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir / "merged")
    trained = score_demo(AutoModelForCausalLM.from_pretrained(result.out_dir / "merged"), tokenizer, DEMO_HELDOUT)
    base = score_demo(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, DEMO_HELDOUT)
    assert trained["stop_rate"] == 1.0, trained
    assert base["stop_rate"] <= 0.1, base


def test_adapter_loads_with_peft_on_the_quantized_base(qlora_run, tiny_model_dir):
    result, _ = qlora_run
    adapter = result.out_dir / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == result.summary["target_modules"]
    base = load_base_model(tiny_model_dir, JobSpec.parse(result.summary["spec"]).quantization, torch.float32, "cpu")
    model = PeftModel.from_pretrained(base, adapter)
    scored = score_demo(model, AutoTokenizer.from_pretrained(adapter), DEMO_HELDOUT[:16])
    assert scored["accuracy"] >= 0.9 and scored["stop_rate"] == 1.0, scored


def test_merge_fidelity_is_measured_and_tight(qlora_run):
    f = qlora_run[0].summary["merge_fidelity"]
    assert f["rows_from"] == "validation" and f["rows"] == 8
    # bf16 merged weights vs NF4 + fp32 LoRA: differences are bf16 rounding, not a different function.
    assert f["eval_loss_diff"] < 0.01, f
    assert f["mean_abs_logit_diff"] < 0.01, f
    assert f["max_abs_logit_diff"] < 0.25, f


def test_merge_fidelity_compares_losses_on_rows_whose_prompt_fills_their_first_tokens(tiny_model_dir):
    """Rows cut to their first 256 tokens for the fidelity check: a long system prompt left none trained, their loss
    was NaN, and the run's summary said eval_loss_diff Infinity (null through the API) where the merge was exact."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare_tokenizer(tokenizer)
    rows = demo_rows(0, 3, distinct=True)
    rows[0]["messages"].insert(0, {"role": "system", "content": "You answer questions about animal sounds. " * 20})
    encoded, _ = encode_examples(validate_lines([json.dumps(r).encode() for r in rows]).examples, tokenizer,
                                 max_seq_length=1024, train_on_inputs=False)
    assert len(encoded[0]["input_ids"]) > FIDELITY_MAX_TOKENS
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    checked = fidelity_rows(encoded)
    f = measure_fidelity(forward_rows(model, checked), model, checked)
    assert f["eval_loss_diff"] == 0.0
    # per trained token over the rows, as the report's loss is
    assert f["eval_loss_adapter"] == pytest.approx(mean_loss(model, checked, None), rel=1e-6)


def test_summary_records_what_a_user_needs(qlora_run):
    s = qlora_run[0].summary
    assert s["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert 0 < s["parameters"]["trainable"] < s["parameters"]["total"]
    assert s["data"]["train"]["rows"] == 480 and s["data"]["train"]["truncated_rows"] == 0
    assert len(s["tokenizer"]["chat_template_sha256"]) == 64
    assert s["tokenizer"]["pad_token"] == "<unk>"
    assert set(s["versions"]) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    assert s["tokens_per_second"] > 0 and s["peak_memory_bytes"] > 0
    assert s["steps"] == {"completed": 160, "planned": 160, "resumed_from": 0}
    assert math.isfinite(s["eval_loss_final"])
    assert s["perplexity_final"] == pytest.approx(math.exp(s["eval_loss_final"]))
    record = json.loads((qlora_run[0].out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "epoch", "train_loss", "learning_rate", "grad_norm", "tokens_seen",
            "tokens_per_second", "peak_memory_bytes"} <= set(record)


NF4_PARITY_NATS = 0.02  # final eval loss, QLoRA vs plain LoRA; ~0.5% of the untrained loss (~4.4 nats)


def test_nf4_is_close_to_plain_lora(qlora_run, tiny_model_dir, demo_data, tmp_path):
    """Same data, same seed, bits none: the NF4 run ends within NF4_PARITY_NATS of plain LoRA.

    An absolute tolerance, because both runs end near zero loss where a ratio means nothing."""
    spec = spec_for(tiny_model_dir)
    # The same training and final evaluation without the merge and the eval report that follow them: the
    # eval loss compared is the evaluation's, made before either (measured: the same value to the bit).
    lean = spec.model_copy(update={"quantization": spec.quantization.model_copy(update={"bits": "none"}),
                                   "output": spec.output.model_copy(update={"merge": False}),
                                   "eval": spec.eval.model_copy(update={"prompts": 0})})
    lora = run(lean, demo_data["train"], tmp_path, validation_path=demo_data["validation"])
    q, plain = qlora_run[0].summary["eval_loss_final"], lora.summary["eval_loss_final"]
    first = qlora_run[0].summary["train_loss_first"]
    assert abs(q - plain) < NF4_PARITY_NATS, (q, plain)
    # Both actually learned: closeness of two untrained runs would prove nothing.
    assert max(q, plain) < 0.05 * first, (q, plain, first)


def validation_rows(demo_data) -> list[dict]:
    return [json.loads(line) for line in demo_data["validation"].read_text().splitlines()]


def test_the_demo_report_shows_the_tuned_model_answering_where_the_base_cannot(demo_run, demo_data):
    result, records = demo_run
    report = json.loads((result.out_dir / "report" / "report.json").read_text())
    assert report == result.report  # what the service stores is what was written
    assert result.summary["report"] == report["metrics"]  # the summary keeps the means
    assert report["prompts_from"] == "validation" and len(report["rows"]) == 8
    assert report["generation"]["tuned"] == "the merged model (bfloat16), as downloaded"
    # An sft report has none of a dpo report's keys.
    assert "rewards" not in report and not any("rejected" in row for row in report["rows"])

    # Each row is a validation line: its user turn as the prompt, its assistant turn as the reference.
    lines = validation_rows(demo_data)
    for row in report["rows"]:
        messages = lines[row["line"] - 1]["messages"]
        assert (row["prompt"], row["reference"]) == (messages[0]["content"], messages[1]["content"])
    assert len({row["line"] for row in report["rows"]}) == 8

    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert tuned["exact_match"] >= 0.9 and tuned["f1"] >= 0.9 and tuned["stopped"] == 1.0, tuned
    assert base["exact_match"] == 0.0 and base["f1"] < 0.2, base  # an untrained base says nothing of the kind
    assert all(row["base"]["answer"].strip() and row["base"]["answer"] != row["tuned"]["answer"] for row in report["rows"])

    # Loss on the 48 validation rows: the tuned model's agrees with the trainer's own evaluation (the merge
    # is faithful), the base's is that of a model that knows nothing of the task.
    metrics = report["metrics"]
    assert metrics["loss_rows"] == 48 and metrics["loss_rows_from"] == "validation" and metrics["scored_rows"] == 8
    assert tuned["loss"] == pytest.approx(result.summary["eval_loss_final"], abs=0.005)
    assert base["loss"] > 3 and tuned["loss"] < 0.1
    for side in (base, tuned):
        assert side["perplexity"] == pytest.approx(math.exp(side["loss"]))

    event = next(r for r in records if isinstance(r, Event) and r.type == "report")
    assert "exact match" in event.message and event.data["path"].endswith("report/report.json")
    assert result.summary["durations_s"]["report"] > 0


def squad_f1(answer: str, reference: str) -> float:
    """The test's own F1 (bag of lowercased whitespace tokens), to recompute the report's."""
    got, want = Counter(answer.lower().split()), Counter(reference.lower().split())
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def test_the_report_equals_an_independent_generation_with_the_merged_model(demo_run, demo_data):
    """What a user gets from transformers on the downloaded merged model, prompt by prompt, is the report's
    tuned column, and the scores recomputed from it are the report's."""
    result, _ = demo_run
    report = result.report
    merged = result.out_dir / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    lines = validation_rows(demo_data)
    matches, f1s = [], []
    for row in report["rows"]:
        messages = lines[row["line"] - 1]["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=report["generation"]["max_new_tokens"], do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer == row["tuned"]["answer"]
        reference = messages[-1]["content"]
        assert row["tuned"]["exact_match"] == (answer.strip() == reference.strip())
        assert row["tuned"]["f1"] == pytest.approx(squad_f1(answer, reference))
        matches.append(answer.strip() == reference.strip())
        f1s.append(squad_f1(answer, reference))
    assert report["metrics"]["tuned"]["exact_match"] == pytest.approx(sum(matches) / len(matches))
    assert report["metrics"]["tuned"]["f1"] == pytest.approx(sum(f1s) / len(f1s))


def adapter_alone(result, tmp_path):
    """A run directory holding the demo run's adapter alone, for a report without a merge: make_report writes its
    report.json there, not over the demo run's, which test_the_demo_report_shows_... reads (after such a test, in
    the same process, as pytest-xdist may order them)."""
    shutil.copytree(result.out_dir / "adapter", tmp_path / "run" / "adapter")
    return tmp_path / "run"


def test_without_a_merge_the_adapter_answers_the_spec_prompts(demo_run, tiny_model_dir, tmp_path):
    """output.merge false: the tuned answers come from the saved adapter on the 4-bit base. Prompts of the
    spec have no reference: nothing is scored, every answer is shown."""
    result, _ = demo_run
    out = adapter_alone(result, tmp_path)
    prompts = ["Ada asks: what sound does the cow make?", "Hey, Gus here. What does the duck say?"]
    spec = spec_for(tiny_model_dir, output={"merge": False}, eval={"prompts": prompts, "max_new_tokens": 16})
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    report = make_report(spec, base_path=tiny_model_dir, out_dir=out, tokenizer=tokenizer,
                         compute_dtype=getattr(torch, result.summary["compute_dtype"]), device="cpu",
                         examples=[], examples_from="train", loss_rows=[])
    assert report["prompts_from"] == "spec"
    assert report["generation"]["tuned"] == "the adapter on the base model (4-bit NF4)"
    assert [row["prompt"] for row in report["rows"]] == prompts
    assert [row["tuned"]["answer"] for row in report["rows"]] == ["The cow says moo.", "The duck says quack."]
    assert all(row["reference"] is None and row["tuned"]["exact_match"] is None and row["tuned"]["f1"] is None
               for row in report["rows"])
    tuned = report["metrics"]["tuned"]
    assert tuned["exact_match"] is None and tuned["loss"] is None and tuned["stopped"] == 1.0
    assert report["metrics"]["scored_rows"] == 0


def dequantizations(profile) -> int:
    """How many times bitsandbytes dequantized a 4-bit weight, as the torch profiler saw its ops."""
    return sum(event.count for event in profile.key_averages() if event.key == "bitsandbytes::dequantize_4bit")


def test_on_the_cpu_the_report_dequantizes_each_4bit_weight_once_per_model_not_per_token(demo_run, tiny_model_dir,
                                                                                         tmp_path):
    """The report's cost on the CPU was bitsandbytes dequantizing every 4-bit weight at every call, so for every
    generated token: here each layer is dequantized once for the base's column and once for the adapter's."""
    result, _ = demo_run
    out = adapter_alone(result, tmp_path)
    spec = spec_for(tiny_model_dir, output={"merge": False},
                    eval={"prompts": ["Ada asks: what sound does the cow make?"], "max_new_tokens": 8})
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        report = make_report(spec, base_path=tiny_model_dir, out_dir=out, tokenizer=tokenizer,
                             compute_dtype=getattr(torch, result.summary["compute_dtype"]), device="cpu",
                             examples=[], examples_from="train", loss_rows=[])
    assert report["rows"][0]["tuned"]["answer"] == "The cow says moo."
    layers = 4 * 7  # the tiny model's blocks, each with q, k, v, o, gate, up and down projections in 4 bits
    assert dequantizations(profile) == 2 * layers  # it was once a layer per forward: 392 here (8 + 6 tokens)


@pytest.mark.parametrize("autocast", [torch.bfloat16, None])
def test_dequantizing_once_gives_bitwise_the_outputs_of_bitsandbytes(tiny_model_dir, autocast):
    """dequantized_on_cpu changes what the 4-bit layers cost, never what they compute: the logits are
    bitwise bitsandbytes' own, and on leaving the layers are bitsandbytes' again."""
    base = load_base_model(tiny_model_dir, JobSpec.parse(demo_spec(str(tiny_model_dir))).quantization,
                           torch.bfloat16, "cpu").eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad(), _autocast(torch.device("cpu"), autocast):
        expected, expected_short = base(input_ids=ids).logits, base(input_ids=ids[:, :5]).logits
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            with dequantized_on_cpu(base) as layers:
                first, short = base(input_ids=ids).logits, base(input_ids=ids[:, :5]).logits
        after = base(input_ids=ids).logits
    assert layers == 4 * 7 and dequantizations(profile) == layers  # once each, for both calls
    assert torch.equal(first, expected) and torch.equal(short, expected_short) and torch.equal(after, expected)
    assert not any("forward" in vars(module) for module in base.modules())


def test_where_the_dense_weights_would_not_fit_the_layers_dequantize_per_call_as_before(tiny_model_dir, monkeypatch):
    import worker.training.model as model_module

    monkeypatch.setattr(model_module, "DENSE_CACHE_SHARE", 0.0)  # no memory to spare: nothing is cached
    base = load_base_model(tiny_model_dir, JobSpec.parse(demo_spec(str(tiny_model_dir))).quantization,
                           torch.bfloat16, "cpu").eval()
    with dequantized_on_cpu(base) as layers:
        assert layers == 0 and not any("forward" in vars(module) for module in base.modules())


def test_generation_keeps_its_kv_cache_whatever_the_configs_say(tiny_model_dir):
    """Training turns the cache off in model.config (packed rows), and a checkpoint's generation_config.json may
    too: the report's generation still runs each new token alone against the cache, not the whole sequence again."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    model.generation_config.use_cache = False
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    spec = spec_for(tiny_model_dir, eval={"max_new_tokens": 6})
    [prompt] = choose_prompts(spec_for(tiny_model_dir, eval={"prompts": ["what does the cow say?"]}), [], tokenizer)
    generate(model, prompt, spec, tokenizer, None)
    assert seen == [len(prompt.input_ids)] + [1] * 5  # the prompt once, then one token per step


def test_prompts_0_makes_no_report(tiny_model_dir, demo_data, tmp_path):
    spec = spec_for(tiny_model_dir, training={"max_steps": 2, "save_steps": 2, "per_device_batch_size": 4},
                    output={"merge": False}, eval={"prompts": 0})
    result = run(spec, demo_data["train"], tmp_path)
    assert result.status == "succeeded"
    assert result.report is None and result.summary["report"] is None
    assert not (tmp_path / "report").exists()


def test_text_rows_are_cut_in_half_prompt_then_reference(tiny_model_dir):
    """A text row has no turns: its first half (in tokens) prompts, the next max_new_tokens are the reference."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "the cow says moo and the dog says woof and the cat says meow"
    spec = spec_for(tiny_model_dir, eval={"prompts": 1, "max_new_tokens": 64})
    [prompt] = choose_prompts(spec, [Example(line=1, text=text)], tokenizer)
    ids = tokenizer(text)["input_ids"]
    assert prompt.input_ids == ids[:len(ids) // 2] and ids[0] == tokenizer.bos_token_id
    assert prompt.shown + prompt.reference == text and prompt.line == 1


def test_prompts_are_sampled_with_the_seed_and_a_long_prompt_keeps_its_end(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [Example(line=i + 1, messages=(Message("user", f"question {i}"), Message("assistant", f"answer {i}")))
                for i in range(100)]
    spec = spec_for(tiny_model_dir, eval={"prompts": 5})
    first, again = choose_prompts(spec, examples, tokenizer), choose_prompts(spec, examples, tokenizer)
    assert [p.line for p in first] == [p.line for p in again] == sorted(p.line for p in first)
    other_seed = spec_for(tiny_model_dir, training={"seed": 7}, eval={"prompts": 5})
    assert [p.line for p in choose_prompts(other_seed, examples, tokenizer)] != [p.line for p in first]
    assert all(p.reference == f"answer {p.line - 1}" for p in first)

    # Longer than max_seq_length (64 in the demo spec): the start is cut, as training would have cut the row,
    # and the generation prompt at its end stays.
    long_row = [Example(line=1, messages=(Message("user", "word " * 500), Message("assistant", "ok")))]
    [cut] = choose_prompts(spec_for(tiny_model_dir, eval={"prompts": 1}), long_row, tokenizer)
    assert cut.truncated and len(cut.input_ids) == 64
    assert tokenizer.decode(cut.input_ids).endswith("<|assistant|>\n")


def test_scores_follow_squad_on_whitespace_tokens():
    assert exact_match("  The cow says moo.\n", "The cow says moo.")
    assert not exact_match("the cow says moo.", "The cow says moo.")
    assert token_f1("The cow says moo.", "the COW says moo.") == 1.0
    assert token_f1("the cow says woof.", "The cow says moo.") == pytest.approx(0.75)  # 3 of 4 both ways
    assert token_f1("moo", "The cow says moo.") == 0.0  # "moo" is not "moo.": no punctuation is removed
    assert token_f1("says says", "says") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("", "moo") == 0.0


def test_the_loss_reads_rows_spread_across_the_set():
    rows = list(range(1000))
    picked = spread(rows, LOSS_MAX_ROWS)
    assert len(picked) == LOSS_MAX_ROWS == len(set(picked)) and picked[0] == 0 and picked[-1] > 980
    assert spread(rows, LOSS_MAX_ROWS) == picked  # the same rows every time
    assert spread(rows[:10], LOSS_MAX_ROWS) == rows[:10]


def test_a_preference_row_prompts_with_its_prompt_beside_both_answers(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = Example(line=3, messages=(Message("user", "What does the cow say?"),),
                   chosen="The cow says moo.", rejected="The cow says woof.")
    [prompt] = choose_prompts(spec_for(tiny_model_dir, eval={"prompts": 1}), [pair], tokenizer)
    assert (prompt.shown, prompt.reference, prompt.rejected, prompt.line) == (
        "What does the cow say?", "The cow says moo.", "The cow says woof.", 3)


def reward_point(step: int, accuracy: float, margin: float, loss: float) -> dict:
    """An evaluation as the recipe reads it from the trainer's log (EvalPoint's fields)."""
    return {"step": step, "eval_loss": loss, "reward_accuracy": accuracy, "reward_margin": margin,
            "reward_chosen": margin / 2, "reward_rejected": -margin / 2}


def test_dpo_rewards_are_the_first_evaluation_and_the_shipped_weights():
    evaluations = [reward_point(10, 0.5, 0.02, 0.68), reward_point(20, 0.95, 0.8, 0.31), reward_point(30, 0.9, 0.7, 0.35)]
    moved = reward_movement(evaluations, 30, pairs=96, reference="base")
    assert moved == {"pairs": 96, "reference": "base", "evaluations": 3,
                     "first": {"step": 10, "accuracy": 0.5, "margin": 0.02, "chosen": 0.01, "rejected": -0.01,
                               "loss": 0.68},
                     "final": {"step": 30, "accuracy": 0.9, "margin": 0.7, "chosen": 0.35, "rejected": -0.35,
                               "loss": 0.35}}
    # output.use_best_checkpoint shipped step 20's weights: theirs are the final rewards, not the last evaluation's.
    assert reward_movement(evaluations, 20, pairs=96, reference="base")["final"]["step"] == 20
    # One evaluation (the final one): it is both ends.
    single = reward_movement(evaluations[2:], 30, pairs=96, reference="initial_adapter")
    assert single["first"] == single["final"] and single["evaluations"] == 1
    # No evaluation with rewards (no validation set; an sft run's evaluations): nothing to say.
    assert reward_movement([], 30, pairs=0, reference="base") is None
    sft_like = {**reward_point(10, 0, 0, 1.0), "reward_accuracy": None}
    assert reward_movement([sft_like], 10, pairs=48, reference="base") is None


def test_the_report_event_gives_a_dpo_jobs_reward_accuracy_and_margin():
    side = {"exact_match": 0.5, "f1": 0.5, "stopped": 1.0, "loss": 1.0, "perplexity": math.e}
    report = {"rows": [{}] * 2, "metrics": {"base": side, "tuned": side}}
    assert "reward" not in describe_report(report)  # an sft report
    report["rewards"] = reward_movement([reward_point(5, 0.25, 0.01, 0.69), reward_point(10, 0.75, 0.2, 0.6)], 10,
                                        pairs=24, reference="base")
    assert describe_report(report).endswith("reward accuracy 75% and margin 0.200 on the validation pairs "
                                            "(first evaluation, step 5: 25%, 0.010)")
    assert "reward" not in describe_report({**report, "rewards": None})  # a dpo job without a validation set


def test_layers_whose_forward_was_already_wrapped_get_that_forward_back(tiny_model_dir):
    """A layer may carry a forward of its own (accelerate's hooks, when a device map dispatches the model):
    leaving dequantized_on_cpu gives it that one back, not the class's, which would drop the hook."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    base = load_base_model(tiny_model_dir, JobSpec.parse(demo_spec(str(tiny_model_dir))).quantization,
                           torch.bfloat16, "cpu").eval()
    layer = base.model.layers[0].self_attn.q_proj
    add_hook_to_module(layer, ModelHook())
    hooked = layer.forward
    with torch.no_grad(), dequantized_on_cpu(base) as layers:
        assert layers == 4 * 7 and layer.forward is not hooked
        base(input_ids=torch.tensor([[3, 4, 5]]))
    assert layer.forward is hooked


SOUND = {"type": "function", "function": {"name": "get_sound", "parameters": {
    "type": "object", "properties": {"animal": {"type": "string"}}, "required": ["animal"]}}}


def tool_rows(animals: list[str], *, answered: bool) -> list[dict]:
    """The demo task as tool calls: the assistant calls get_sound for the animal asked about, and (answered)
    says the sound from the tool's result."""
    rows = []
    for n, animal in enumerate(animals):
        calling = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{n}", "type": "function", "function": {"name": "get_sound",
                                                                 "arguments": json.dumps({"animal": animal})}}]}
        messages = [{"role": "user", "content": f"What does the {animal} say?"}, calling]
        if answered:
            messages += [{"role": "tool", "tool_call_id": f"call_{n}", "content": ANIMAL_SOUNDS[animal]},
                         {"role": "assistant", "content": f"The {animal} says {ANIMAL_SOUNDS[animal]}."}]
        rows.append({"tools": [SOUND], "messages": messages})
    return rows


def test_a_tool_call_row_prompts_with_its_tools_and_its_reference_is_the_call_as_the_model_writes_it(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = spec_for(tiny_model_dir, training={"max_seq_length": 512}, eval={"prompts": 1})
    [calling] = validate_lines([json.dumps(tool_rows(["cow"], answered=False)[0]).encode()]).examples
    [prompt] = choose_prompts(spec, [calling], tokenizer)
    assert prompt.reference == '<tool_call>{"name": "get_sound", "arguments": {"animal": "cow"}}</tool_call>'
    text = tokenizer.decode(prompt.input_ids)
    assert text.startswith('<s><|tools|>\n{"type": "function", "function": {"name": "get_sound"')  # shown the tool
    assert text.endswith("What does the cow say?\n<|assistant|>\n") and prompt.shown == "What does the cow say?"

    # After the tool's result: the conversation so far, the call read as one, and the answer as the reference.
    [answered] = validate_lines([json.dumps(tool_rows(["cow"], answered=True)[0]).encode()]).examples
    [prompt] = choose_prompts(spec, [answered], tokenizer)
    assert prompt.reference == "The cow says moo."
    assert prompt.shown == 'user: What does the cow say?\nassistant: get_sound({"animal": "cow"})\ntool: moo'
    assert tokenizer.decode(prompt.input_ids).endswith(
        '<tool_call>{"name": "get_sound", "arguments": {"animal": "cow"}}</tool_call></s><|tool|>\nmoo\n<|assistant|>\n')


def test_the_reference_of_a_row_ending_with_a_call_of_weight_0_is_that_call(tiny_model_dir):
    # The row's last turn is what its prompt asks, learned or not: not an earlier call the row learns.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = spec_for(tiny_model_dir, training={"max_seq_length": 512}, eval={"prompts": 1})
    row = tool_rows(["cow"], answered=False)[0]
    again = {"role": "assistant", "content": None, "weight": 0, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "dog"}'}}]}
    row["messages"] += [{"role": "tool", "tool_call_id": "call_0", "content": "moo"}, again]
    [example] = validate_lines([json.dumps(row).encode()]).examples
    [prompt] = choose_prompts(spec, [example], tokenizer)
    assert prompt.reference == '<tool_call>{"name": "get_sound", "arguments": {"animal": "dog"}}</tool_call>'
    assert prompt.shown.endswith("tool: moo")


def test_a_job_on_tool_calling_rows_trains_and_reports_the_calls(tiny_model_dir, tmp_path):
    """OpenAI-format tool-calling rows through the whole engine: read, rendered with the tools, trained (the loss
    falls), reported with the call as the reference, the adapter saved with the template that renders tools."""
    animals = list(ANIMAL_SOUNDS)
    train = write_jsonl(tool_rows(animals * 2, answered=False) + tool_rows(animals, answered=True), tmp_path / "t.jsonl")
    valid = write_jsonl(tool_rows(animals[:4], answered=False), tmp_path / "v.jsonl")
    spec = spec_for(tiny_model_dir, training={"max_steps": 12, "max_seq_length": 256, "per_device_batch_size": 8,
                                              "logging_steps": 1, "eval_steps": 12, "save_steps": 12},
                    output={"merge": False}, eval={"prompts": 2, "max_new_tokens": 32})
    records = []
    result = run(spec, train, tmp_path / "out", validation_path=valid, sink=records.append)
    assert result.status == "succeeded", result
    assert result.summary["data"]["train"]["truncated_rows"] == 0 and result.summary["data"]["train"]["dropped_rows"] == 0
    losses = [r.train_loss for r in records if isinstance(r, TrainPoint)]
    assert len(losses) == 12 and losses[-1] < losses[0] / 2, losses
    # Each reported row's reference is the call for the animal its prompt asks about, as the template writes it.
    rows = result.report["rows"]
    def call_of(animal: str) -> str:
        return '<tool_call>{"name": "get_sound", "arguments": {"animal": "' + animal + '"}}</tool_call>'

    assert len(rows) == 2 and all(row["reference"] == call_of(row["prompt"].split()[3]) for row in rows), rows
    # The adapter carries the template that renders tools: served by vLLM, the model is prompted as it trained.
    assert "tool_call" in AutoTokenizer.from_pretrained(result.out_dir / "adapter").chat_template


def test_the_report_event_says_whether_the_tuned_model_learned_to_stop():
    """The event gave exact match, F1 and loss, not the share of answers that ended at the EOS: whether the
    fine-tune learned to stop, the first thing to check of one, was in the report alone."""
    base = {"exact_match": 0.0, "f1": 0.0, "stopped": 0.0, "loss": 6.45, "perplexity": 632.7}
    tuned = {"exact_match": 1.0, "f1": 1.0, "stopped": 1.0, "loss": 0.0368, "perplexity": 1.04}
    report = {"rows": [{}] * 8, "metrics": {"base": base, "tuned": tuned}}
    assert describe_report(report) == ("eval report on 8 prompts; exact match 100% tuned vs 0% base, F1 1.00 vs 0.00; "
                                       "stopped by itself 100% tuned vs 0% base; loss 0.0368 tuned vs 6.4500 base")


def test_the_run_announces_each_phase_after_training_as_it_starts(demo_run):
    """Past its last step a run still evaluated, saved, merged and wrote its report, and said so only as each ended
    (adapter_saved, merged, report): a job sat at "step 160/160" with nothing to tell whether it was done. Each
    phase is announced as it starts, in order, before the event that ends it; the job shows the newest."""
    result, records = demo_run
    events = [r for r in records if isinstance(r, Event)]
    phases = [e.data["phase"] for e in events if e.type == PHASE_EVENT]
    # The demo evaluates every 80 steps, so at its last (160) the final loss is the trainer's: no second evaluation.
    assert phases == ["training", "saving", "merging", "reporting"], phases
    assert all(phase in PHASES for phase in phases)
    order = [e.type if e.type != PHASE_EVENT else e.data["phase"] for e in events]
    assert (order.index("training") < order.index("saving") < order.index("adapter_saved") < order.index("merging")
            < order.index("merged") < order.index("reporting") < order.index("report") < order.index("finished"))
    steps = result.summary["steps"]["completed"]
    assert [e.step for e in events if e.type == PHASE_EVENT] == [0, steps, steps, steps]


def test_the_adapters_model_card_has_the_runs_validation_loss_and_eval_report(demo_run):
    """The card (adapter/README.md, peft's empty template before) gives how the run went: its final validation loss
    and the eval report's line, as the job's events say it, and the merge's fidelity."""
    result, records = demo_run
    card = (result.out_dir / "adapter" / "README.md").read_text()
    said = next(r for r in records if isinstance(r, Event) and r.type == "report").message
    assert f"- {said}" in card, card
    assert f"- validation loss: {result.summary['eval_loss_final']:.4f} (perplexity" in card, card
    assert "| validation | - | " in card and "More Information Needed" not in card, card
