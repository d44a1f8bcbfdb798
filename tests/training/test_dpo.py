"""DPO on the tiny model, CPU, for real (trl's DPOTrainer on the 4-bit base): SFT first, then DPO from it.

The task is made offline so that the SFT starting point prefers the wrong answer: the SFT data answers
two times in three with a wrong animal sound (the next animal's), the preference pairs prefer the right
one. After a short DPO run continued from that adapter, held-out pairs are won and greedy answers switch.
One SFT start and one DPO run are shared by the module; the pause/resume run is the only other run.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

from tests.training.test_recipe import pause_after
from worker.training.data import Example, Message, read_jsonl
from worker.training.estimate import estimate_peak_memory
from worker.training.model import load_base_model
from worker.training.preflight import preflight
from worker.training.recipe import TrainingError, run
from worker.training.spec import JobSpec
from worker.training.tiny import ANIMAL_SOUNDS, demo_rows, demo_spec, score_demo, write_jsonl
from worker.training.tokenization import IGNORE_INDEX, encode_preference, encode_preferences, prepare_tokenizer

ANIMALS = list(ANIMAL_SOUNDS)[:8]  # fewer animals than the demo: the SFT start learns them in 60 steps
WRONG = {animal: ANIMAL_SOUNDS[ANIMALS[(i + 1) % len(ANIMALS)]] for i, animal in enumerate(ANIMALS)}
DPO_TRAINING = dict(max_steps=20, learning_rate=1e-4, logging_steps=5, eval_steps=10, save_steps=10,
                    per_device_batch_size=16)


def _rows(count: int, split: str) -> list[dict]:
    return [r for r in demo_rows(0, count, split=split) if r["messages"][1]["content"].split()[1] in WRONG]


def pairs(rows: list[dict]) -> list[dict]:
    """trl's preference rows: the right sound preferred over the next animal's."""
    out = []
    for r in rows:
        prompt, right = r["messages"][0]["content"], r["messages"][1]["content"]
        animal = right.split()[1]
        out.append({"prompt": prompt, "chosen": right, "rejected": f"The {animal} says {WRONG[animal]}."})
    return out


def mostly_wrong(rows: list[dict]) -> list[dict]:
    """Chat rows for the SFT start: per animal, two answers in three are the wrong sound."""
    seen: dict[str, int] = {}
    out = []
    for p in pairs(rows):
        animal = p["chosen"].split()[1]
        seen[animal] = seen.get(animal, 0) + 1
        answer = p["chosen"] if seen[animal] % 3 == 0 else p["rejected"]
        out.append({"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}]})
    return out


def as_chat(preference_rows: list[dict], side: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]}]}
            for p in preference_rows]


def dpo_spec(model_dir, **overrides) -> JobSpec:
    data = demo_spec(str(model_dir))
    data["method"] = {"type": "dpo", "beta": 0.1}
    data["training"].update(DPO_TRAINING | overrides)
    data["eval"] = {"prompts": 8, "max_new_tokens": 16}
    return JobSpec.parse(data)


@pytest.fixture(scope="module")
def task(tiny_model_dir, tmp_path_factory):
    """The data, and the SFT start: an adapter that prefers the wrong sound."""
    d = tmp_path_factory.mktemp("dpo-task")
    train, held = _rows(480, "train"), _rows(96, "heldout")
    paths = {"sft": write_jsonl(mostly_wrong(train), d / "sft.jsonl"),
             "train": write_jsonl(pairs(train), d / "pref.jsonl"),
             "validation": write_jsonl(pairs(held), d / "pref_val.jsonl")}
    spec = demo_spec(str(tiny_model_dir))
    spec["training"].update(max_steps=60, save_steps=1000, eval_steps=1000)
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}
    start = run(JobSpec.parse(spec), paths["sft"], d / "sft-run")
    return {**paths, "start": start.out_dir / "adapter", "held": pairs(held)}


class ReferenceProbe(TrainerCallback):
    """What trains and what stays: the trainable weights' names, the reference adapter's weights at the
    start and the end, and how many 4-bit layers the model holds (one base, not two)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import bitsandbytes as bnb

        self.trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        self.reference = {name: p.detach().clone() for name, p in model.named_parameters() if ".ref." in name}
        self.quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        self.reference_moved = [name for name, before in self.reference.items() if not torch.equal(before, params[name])]


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, task, tmp_path_factory):
    probe = ReferenceProbe()
    result = run(dpo_spec(tiny_model_dir), task["train"], tmp_path_factory.mktemp("dpo-run"),
                 validation_path=task["validation"], initial_adapter=task["start"], extra_callbacks=(probe,))
    result.probe = probe
    return result


def curve(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def preference_accuracy(model, tokenizer, path) -> float:
    """The share of held-out pairs whose preferred answer the model finds likelier than the other."""
    model.eval()
    wins = 0
    examples = read_jsonl(path).examples
    for example in examples:
        pair = encode_preference(example, tokenizer, max_seq_length=64)
        logps = []
        for side in (pair.chosen, pair.rejected):
            logits = model(input_ids=torch.tensor([side.input_ids])).logits[0, :-1].float().log_softmax(-1)
            targets = torch.tensor(side.labels[1:])
            learned = targets != IGNORE_INDEX
            logps.append(float(logits[learned].gather(1, targets[learned][:, None]).sum()))
        wins += logps[0] > logps[1]
    return wins / len(examples)


def adapter_on_base(model_dir, adapter_dir):
    base = load_base_model(model_dir, JobSpec.parse(demo_spec(str(model_dir))).quantization, torch.float32, "cpu")
    return PeftModel.from_pretrained(base, adapter_dir)


def test_dpo_from_an_sft_start_learns_the_preferred_answers(dpo_run, task, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(task["start"])
    prepare_tokenizer(tokenizer)
    held = task["held"]

    # Before: the SFT start prefers the wrong sound on held-out prompts, and says it.
    start = adapter_on_base(tiny_model_dir, task["start"])
    assert preference_accuracy(start, tokenizer, task["validation"]) <= 0.5
    before = score_demo(start, tokenizer, as_chat(held, "chosen"))
    assert before["accuracy"] <= 0.2, before

    # The curve: DPO loss and the rewards on every point; eval points without a perplexity.
    points = curve(dpo_run.out_dir)
    train = [p for p in points if p["kind"] == "train"]
    evals = [p for p in points if p["kind"] == "eval"]
    assert all(p[k] is not None for p in train for k in ("reward_accuracy", "reward_chosen", "reward_rejected",
                                                          "reward_margin"))
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    assert evals and all(p["perplexity"] is None for p in evals)
    assert evals[-1]["reward_accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["reward_margin"] > 0

    # After: the merged model finds the preferred answers likelier, and answers with them.
    merged = AutoModelForCausalLM.from_pretrained(dpo_run.out_dir / "merged")
    # From at most half before; 20 steps on the CPU end at 0.875 to 0.9+ of the 96 held-out pairs, as the
    # compute dtype goes (float32 on a CPU without native bf16, bf16 on one with it).
    assert preference_accuracy(merged, tokenizer, task["validation"]) >= 0.85
    after = score_demo(merged, tokenizer, as_chat(held, "chosen"))
    assert after["accuracy"] >= 0.8, after


def test_the_merged_model_gives_the_adapters_answers(dpo_run, task, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(dpo_run.out_dir / "merged")
    held = as_chat(task["held"][:16], "chosen")
    adapter = score_demo(adapter_on_base(tiny_model_dir, dpo_run.out_dir / "adapter"), tokenizer, held)
    merged = score_demo(AutoModelForCausalLM.from_pretrained(dpo_run.out_dir / "merged"), tokenizer, held)
    assert merged["samples"] == adapter["samples"] and merged["accuracy"] == adapter["accuracy"]
    assert dpo_run.summary["merge_fidelity"]["eval_loss_diff"] < 0.01


def test_the_reference_is_a_frozen_copy_of_the_start_on_the_one_base(dpo_run, task):
    probe = dpo_run.probe
    assert probe.quantized == 28  # 7 linear layers x 4 blocks: one 4-bit base in memory
    assert probe.trainable and all(".default." in name for name in probe.trainable)
    assert len(probe.reference) == len(probe.trainable) and probe.reference_moved == []
    start = load_file(task["start"] / "adapter_model.safetensors")  # the copy is the starting adapter, exactly
    copies = {name.replace(".ref.weight", ".weight"): value for name, value in probe.reference.items()}
    assert sorted(start) == sorted(copies) and all(torch.equal(start[k], copies[k]) for k in start)


def test_summary_and_report_say_what_ran(dpo_run, task):
    s = dpo_run.summary
    assert s["method"] == {"type": "dpo", "beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0}
    assert s["initial_adapter"]["path"] == str(task["start"]) and len(s["initial_adapter"]["sha256"]) == 64
    assert s["reference_model"] == "initial_adapter"
    assert s["perplexity_final"] is None and s["eval_loss_final"] < 0.69  # below log 2: pairs are won
    assert s["data"]["format"] == "preference" and s["data"]["train"]["eos_cut"] == {"chosen": 0, "rejected": 0}
    # The shipped adapter is the trained one alone, not trl's frozen reference copy beside it.
    assert not (dpo_run.out_dir / "adapter" / "ref").exists()
    assert json.loads((dpo_run.out_dir / "adapter" / "adapter_config.json").read_text())["r"] == 16
    # The report: prompts are the pairs' prompts, references their preferred answers.
    report = json.loads((dpo_run.out_dir / "report" / "report.json").read_text())
    references = {p["chosen"] for p in task["held"]}
    assert report["rows"] and all(row["reference"] in references for row in report["rows"])
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert tuned["exact_match"] > base["exact_match"] and tuned["loss"] < base["loss"]  # NLL of the preferred answers
    # Each row is a held-out pair: its prompt, its preferred answer as the reference, the rejected one beside it.
    for row in report["rows"]:
        pair = task["held"][row["line"] - 1]
        assert (row["prompt"], row["reference"], row["rejected"]) == (pair["prompt"], pair["chosen"], pair["rejected"])
    # The rewards on the validation pairs, first evaluation and final, as the curve has them: the preference learned.
    evals = [p for p in curve(dpo_run.out_dir) if p["kind"] == "eval"]
    rewards = report["rewards"]
    assert {k: rewards[k] for k in ("pairs", "reference", "evaluations")} == {
        "pairs": len(task["held"]), "reference": "initial_adapter", "evaluations": len(evals)}
    for name, point in (("first", evals[0]), ("final", evals[-1])):
        assert rewards[name] == {"step": point["step"], "accuracy": point["reward_accuracy"],
                                 "margin": point["reward_margin"], "chosen": point["reward_chosen"],
                                 "rejected": point["reward_rejected"], "loss": point["eval_loss"]}
    assert (rewards["first"]["step"], rewards["final"]["step"]) == (10, 20)
    assert rewards["final"]["accuracy"] >= 0.9 and rewards["final"]["margin"] > rewards["first"]["margin"] > 0


def test_pause_and_resume_reproduce_the_uninterrupted_run(dpo_run, task, tiny_model_dir, tmp_path):
    spec = dpo_spec(tiny_model_dir)
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"merge": False}),
                                   "eval": spec.eval.model_copy(update={"prompts": 0})})  # training is the same
    out = tmp_path / "run"
    paused = run(spec, task["train"], out, validation_path=task["validation"], initial_adapter=task["start"],
                 pause=pause_after(5))
    # Paused on a logging step: a logged point averages the steps since the last log, and a resumed run's
    # first log can only average those after its checkpoint.
    assert paused.status == "paused" and (out / "checkpoints" / "step-5" / "COMPLETE").exists()

    # Another starting adapter is another run: refused before anything loads.
    other = tmp_path / "other-start"
    shutil.copytree(task["start"], other)
    with open(other / "adapter_model.safetensors", "ab") as f:
        f.write(b" ")
    with pytest.raises(TrainingError, match="cannot resume: initial_adapter_sha256 differ"):
        run(spec, task["train"], out, validation_path=task["validation"], initial_adapter=other, resume=True)

    resumed = run(spec, task["train"], out, validation_path=task["validation"], initial_adapter=task["start"],
                  resume=True)
    assert resumed.summary["steps"] == {"completed": 20, "planned": 20, "resumed_from": 5}

    def losses(points):
        return [(p["kind"], p["step"], p.get("train_loss") or p.get("eval_loss"), p["reward_accuracy"],
                 p["reward_margin"]) for p in points]
    assert losses(curve(out)) == losses(curve(dpo_run.out_dir))
    got, want = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(
        dpo_run.out_dir / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_pause_between_logged_points_resumes_to_the_same_rewards(dpo_run, task, tiny_model_dir, tmp_path):
    """Paused at step 7 with logging_steps 5 (a preemption or hand-back pauses at any step): step 10's point
    averages steps 6 to 10, its rewards too. The loss since the last log is carried in the checkpoint; trl's
    rewards since it were not, and the resumed run's step-10 rewards averaged steps 8 to 10 alone."""
    spec = dpo_spec(tiny_model_dir)
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"merge": False}),
                                   "eval": spec.eval.model_copy(update={"prompts": 0})})
    out = tmp_path / "run"
    assert run(spec, task["train"], out, validation_path=task["validation"], initial_adapter=task["start"],
               pause=pause_after(7)).status == "paused"
    run(spec, task["train"], out, validation_path=task["validation"], initial_adapter=task["start"], resume=True)

    def points(curve_points):
        return [(p["kind"], p["step"], p.get("train_loss") or p.get("eval_loss"), p["reward_accuracy"],
                 p["reward_margin"], p.get("reward_chosen"), p.get("reward_rejected")) for p in curve_points]
    assert points(curve(out)) == points(curve(dpo_run.out_dir))


def test_a_start_of_another_shape_or_data_of_another_format_is_refused(task, tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match=r"lora.r: the initial adapter has 16, the spec asks for 8"):
        data = dpo_spec(tiny_model_dir).model_dump(mode="json")
        data["lora"]["r"] = 8
        run(JobSpec.parse(data), task["train"], tmp_path / "a", initial_adapter=task["start"])
    with pytest.raises(TrainingError, match="method dpo trains on preference rows, and the training data is in chat"):
        run(dpo_spec(tiny_model_dir), task["sft"], tmp_path / "b")
    sft = JobSpec.parse(demo_spec(str(tiny_model_dir)))
    with pytest.raises(TrainingError, match="method sft trains on .* and the training data is in preference"):
        run(sft, task["train"], tmp_path / "c")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_the_logged_loss_is_dpos_with_its_label_smoothing(tiny_model_dir, tmp_path, label_smoothing):
    # label_smoothing is conservative DPO: -(1-e)·logsigmoid(margin) - e·logsigmoid(-margin), margin = beta·Δ. trl 1.16's
    # sigmoid loss ignores label_smoothing, so a job asking for 0.25 logged and trained plain DPO. One pair, one
    # pair a step, float32: after one update (policy no longer its reference) the step's loss is the pair's loss.
    train = write_jsonl([{"prompt": "What does the cow say?", "chosen": "The cow says moo.",
                          "rejected": "The cow says woof."}], tmp_path / "pair.jsonl")
    data = dpo_spec(tiny_model_dir, max_steps=2, learning_rate=3e-2, logging_steps=1, save_steps=100,
                    per_device_batch_size=1, lr_scheduler="constant").model_dump(mode="json")
    data["method"].update(beta=0.5, label_smoothing=label_smoothing)
    data["quantization"]["compute_dtype"] = "float32"
    data["output"], data["eval"] = {"merge": False}, {"prompts": 0}
    run(JobSpec.parse(data), train, tmp_path / "run")
    first, second = [p for p in curve(tmp_path / "run") if p["kind"] == "train"]
    assert first["train_loss"] == pytest.approx(math.log(2))  # policy = reference: margin 0, whatever e
    margin = torch.tensor(second["reward_margin"], dtype=torch.float64)
    assert abs(float(margin)) > 0.5  # the update moved the pair: the smoothing term is not negligible
    want = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    assert second["train_loss"] == pytest.approx(float(want), rel=1e-4)


def test_an_evaluations_rewards_are_the_mean_over_its_pairs_however_they_are_batched(tiny_model_dir, tmp_path):
    # trl logs the mean of the batches' means: 5 validation pairs in batches of 4 weighed the last pair as the other four
    # (reward_accuracy 0.25 where 2 of the 5 pairs were won, by hand). The same run evaluated in one batch of 5 and in
    # batches of 4 and 1 must give the same point. One train pair: its one step is the same at either batch size.
    animals = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("pig", "oink")]
    rows = [{"prompt": f"What does the {a} say?", "chosen": f"The {a} says {s}.", "rejected": f"The {a} says {t}."}
            for (a, s), (_, t) in zip(animals, animals[1:] + animals[:1], strict=True)]
    train, validation = write_jsonl(rows[:1], tmp_path / "train.jsonl"), write_jsonl(rows, tmp_path / "val.jsonl")
    points = {}
    for batch in (5, 4):
        data = dpo_spec(tiny_model_dir, max_steps=1, learning_rate=3e-2, logging_steps=1, save_steps=100, eval_steps=1,
                        per_device_batch_size=batch, lr_scheduler="constant", warmup_ratio=0.0).model_dump(mode="json")
        data["method"]["beta"] = 0.5
        data["quantization"]["compute_dtype"] = "float32"
        data["output"], data["eval"] = {"merge": False}, {"prompts": 0}
        run(JobSpec.parse(data), train, tmp_path / f"b{batch}", validation_path=validation)
        points[batch] = [p for p in curve(tmp_path / f"b{batch}") if p["kind"] == "eval"][-1]
    one, split = points[5], points[4]
    assert one["reward_margin"] != 0  # the step moved the policy off its reference
    assert 0 < one["reward_accuracy"] < 1  # some pairs won, some lost: a misweighted batch shows
    for key in ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "eval_loss"):
        assert split[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_a_resume_between_logged_points_weighs_each_batch_by_its_pairs(tiny_model_dir, tmp_path):
    # 3 pairs in batches of 2 then 1, a point every 2 steps: step 2's rewards are the mean over the epoch's 3 pairs,
    # step 1's batch (2 pairs, still the reference: every reward 0) weighed twice step 2's. A run paused at step 1
    # carried trl's per-batch rewards in its checkpoint but not their pair counts, so the resumed run's step-2 point
    # fell back to trl's mean of the two batch means (step 2's pair weighed as the other two).
    rows = [{"prompt": f"What does the {a} say?", "chosen": f"The {a} says {s}.", "rejected": f"The {a} says {t}."}
            for a, s, t in (("cow", "moo", "woof"), ("dog", "woof", "meow"), ("cat", "meow", "moo"))]
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    data = dpo_spec(tiny_model_dir, max_steps=2, learning_rate=3e-2, logging_steps=2, save_steps=1,
                    per_device_batch_size=2, lr_scheduler="constant", warmup_ratio=0.0).model_dump(mode="json")
    data["method"]["beta"] = 0.5
    data["quantization"]["compute_dtype"] = "float32"
    data["output"], data["eval"] = {"merge": False}, {"prompts": 0}
    spec = JobSpec.parse(data)
    run(spec, train, tmp_path / "whole")
    assert run(spec, train, tmp_path / "resumed", pause=pause_after(1)).status == "paused"
    run(spec, train, tmp_path / "resumed", resume=True)
    whole, resumed = ([p for p in curve(tmp_path / name) if p["kind"] == "train"] for name in ("whole", "resumed"))
    assert [p["step"] for p in whole] == [p["step"] for p in resumed] == [2]
    assert whole[0]["reward_margin"] != 0  # step 2 moved the policy: a misweighted mean shows
    for key in ("train_loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"):
        assert resumed[0][key] == pytest.approx(whole[0][key], rel=1e-5, abs=1e-7), key


def test_a_bfloat16_adapter_continued_starts_equal_to_its_reference(tiny_model_dir, tmp_path):
    # lora.dtype bfloat16 from a started adapter: the policy is the start rounded to bfloat16; trl's frozen copy of it
    # (the reference) was the start in float32, so the policy was not its reference at step 1 (a margin, an accuracy
    # and a loss off log 2 before any update), and every reward after measured the rounding beside the preference.
    rows = [{"prompt": f"What does the {a} say?", "chosen": f"The {a} says {s}.", "rejected": f"The {a} says {t}."}
            for a, s, t in (("cow", "moo", "woof"), ("dog", "woof", "meow"), ("cat", "meow", "moo"))]
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    sft = demo_spec(str(tiny_model_dir))
    sft["training"].update(max_steps=4, learning_rate=3e-2, save_steps=100, eval_steps=100, per_device_batch_size=3)
    sft["output"], sft["eval"] = {"merge": False}, {"prompts": 0}
    start = run(JobSpec.parse(sft), write_jsonl(as_chat(rows, "rejected"), tmp_path / "sft.jsonl"), tmp_path / "sft")
    data = dpo_spec(tiny_model_dir, max_steps=2, logging_steps=1, save_steps=1, learning_rate=3e-2,
                    per_device_batch_size=3, lr_scheduler="constant", warmup_ratio=0.0).model_dump(mode="json")
    data["lora"]["dtype"] = "bfloat16"
    data["quantization"]["compute_dtype"] = "float32"  # the forward passes exact: only the adapters' weights differ
    data["output"], data["eval"] = {"merge": False}, {"prompts": 0}
    spec, adapter = JobSpec.parse(data), start.out_dir / "adapter"
    run(spec, train, tmp_path / "dpo", initial_adapter=adapter)
    first, second = [p for p in curve(tmp_path / "dpo") if p["kind"] == "train"]
    assert (first["reward_chosen"], first["reward_rejected"], first["reward_margin"], first["reward_accuracy"]) == (0, 0, 0, 0)
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # A resume loads the copy from the checkpoint's ref/, upcast to float32 by peft: it stays in lora.dtype, so the
    # resumed step measures the same rewards as the run that was not paused.
    assert run(spec, train, tmp_path / "resumed", initial_adapter=adapter, pause=pause_after(1)).status == "paused"
    run(spec, train, tmp_path / "resumed", initial_adapter=adapter, resume=True)
    [resumed] = [p for p in curve(tmp_path / "resumed") if p["kind"] == "train" and p["step"] == 2]
    assert second["reward_margin"] != 0
    for key in ("train_loss", "reward_margin", "reward_chosen", "reward_rejected"):
        assert resumed[key] == pytest.approx(second[key], rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------- tokenization, preflight, estimate


def _tokenizer(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tokenizer)
    return tokenizer


PAIR = Example(line=3, messages=(Message("system", "Answer briefly."), Message("user", "What does the cow say?")),
               chosen="The cow says moo.", rejected="The cow says woof, and that is all there is to it.")


def test_pairs_tokenize_as_trl_does_with_eos_in_both_completions(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir)
    pair = encode_preference(PAIR, tokenizer, max_seq_length=512)
    row = pair.row()
    eos = tokenizer.eos_token_id
    assert row["chosen_ids"][-1] == eos and row["rejected_ids"][-1] == eos
    assert pair.chosen.eos_learned and pair.rejected.eos_learned
    prompt = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in PAIR.messages],
                                           tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(row["prompt_ids"]) == prompt
    assert tokenizer.decode(row["chosen_ids"], skip_special_tokens=True) == PAIR.chosen

    # trl's own tokenization of the same row (conversational, as its docs write it) gives the same ids.
    from datasets import Dataset

    conversational = Dataset.from_list([{
        "prompt": [{"role": m.role, "content": m.content} for m in PAIR.messages],
        "chosen": [{"role": "assistant", "content": PAIR.chosen}],
        "rejected": [{"role": "assistant", "content": PAIR.rejected}]}])

    class Args:
        dataset_num_proc = None
        max_length = 512
        truncation_mode = "keep_start"

    trl_row = DPOTrainer._prepare_dataset(None, conversational, tokenizer, Args, "train")[0]  # type: ignore[arg-type]
    assert {k: trl_row[k] for k in row} == row


def test_truncation_is_counted_as_the_collator_cuts(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir)
    whole = encode_preference(PAIR, tokenizer, max_seq_length=512)
    prompt = whole.prompt_length
    limit = prompt + len(whole.chosen.input_ids) - prompt + 1  # the chosen side fits, the rejected does not
    cut = encode_preference(PAIR, tokenizer, max_seq_length=limit)
    assert not cut.chosen.truncated and cut.rejected.truncated and cut.truncated
    assert not cut.rejected.eos_learned and cut.chosen.eos_learned

    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=limit)
    from_whole, from_cut = collate([whole.row()]), collate([cut.row()])
    assert all(torch.equal(from_whole[k], from_cut[k]) for k in from_whole)  # the collator cuts what we cut
    completion = from_whole["completion_mask"].sum(dim=1).tolist()
    assert completion == [cut.chosen.trained, cut.rejected.trained]

    # A prompt that fills max_seq_length leaves no answer token: the row is dropped and its line named.
    rows, stats = encode_preferences([PAIR, PAIR], tokenizer, max_seq_length=prompt)
    assert rows == [] and stats.dropped_rows == 2 and stats.dropped_lines == [3, 3]
    rows, stats = encode_preferences([PAIR], tokenizer, max_seq_length=limit)
    assert stats.truncated_rows == 1 and stats.eos_cut == {"chosen": 0, "rejected": 1}
    assert stats.trained_tokens == sum(completion) and stats.tokens == int(from_whole["attention_mask"].sum())


def test_a_pair_whose_answers_are_the_same_within_max_seq_length_is_dropped_and_named(tiny_model_dir, tmp_path):
    # Answers that differ only past the cut: within max_seq_length both sides are the same tokens, a pair with a
    # constant loss and no gradient that counts as lost in reward_accuracy. It is dropped and named, as a row
    # truncated before its answer is; a set of nothing else is refused, saying why.
    tokenizer = _tokenizer(tiny_model_dir)
    shared = "The answer needs a few words first. " * 8
    tie = Example(line=2, messages=(Message("user", "Is the sky blue?"),), chosen=shared + "Yes.", rejected=shared + "No.")
    rows, stats = encode_preferences([PAIR, tie], tokenizer, max_seq_length=48)
    assert len(rows) == 1 and stats.dropped_lines == [2] and stats.tied_rows == 1
    assert not encode_preference(tie, tokenizer, max_seq_length=512).tied

    trl = {"prompt": "Is the sky blue?", "chosen": shared + "Yes.", "rejected": shared + "No."}
    mixed = write_jsonl([{"prompt": "What does the cow say?", "chosen": "Moo.", "rejected": "Woof."}, trl],
                        tmp_path / "mixed.jsonl")
    report = preflight(dpo_spec(tiny_model_dir, max_seq_length=48), tiny_model_dir, mixed)
    assert report["train"]["dropped_lines"] == [2] and report["train"]["tied_rows"] == 1
    assert any("1 is a pair whose two answers are the same tokens" in w for w in report["warnings"]), report["warnings"]
    only_ties = write_jsonl([trl, trl], tmp_path / "ties.jsonl")
    refused = preflight(dpo_spec(tiny_model_dir, max_seq_length=48), tiny_model_dir, only_ties)
    assert len(refused["refusals"]) == 1 and "no pair is left to learn from" in refused["refusals"][0]
    with pytest.raises(TrainingError, match="2 of them are pairs whose two answers are the same tokens"):
        run(dpo_spec(tiny_model_dir, max_seq_length=48), only_ties, tmp_path / "run")  # the engine alone says it too


def test_a_validation_set_with_nothing_left_within_max_seq_length_is_refused(tiny_model_dir, tmp_path):
    # Prompts that fill max_seq_length leave no validation pair: the job ran without a single evaluation and
    # its report silently prompted from the train set. The preflight refuses it; a set that loses some is warned of.
    train = write_jsonl([{"prompt": "What does the cow say?", "chosen": "Moo.", "rejected": "Woof."}],
                        tmp_path / "train.jsonl")
    long = {"prompt": "word " * 80, "chosen": "Moo.", "rejected": "Woof."}
    spec = dpo_spec(tiny_model_dir, max_seq_length=48)
    none_left = preflight(spec, tiny_model_dir, train, validation_path=write_jsonl([long, long], tmp_path / "v.jsonl"))
    assert none_left["validation"]["kept_rows"] == 0 and none_left["validation"]["tied_rows"] == 0  # no answer: no tie
    assert len(none_left["refusals"]) == 1 and "no validation row is left to evaluate" in none_left["refusals"][0]
    some_left = preflight(spec, tiny_model_dir, train, validation_path=write_jsonl(
        [{"prompt": "What does the dog say?", "chosen": "Woof.", "rejected": "Moo."}, long], tmp_path / "v2.jsonl"))
    assert some_left["refusals"] == []
    assert any("1 of 2 validation rows has nothing to evaluate" in w and "(line 2)" in w for w in some_left["warnings"])

    # The engine alone (qlora train) runs it, and says so.
    events: list = []
    quick = dpo_spec(tiny_model_dir, max_seq_length=48, max_steps=1, eval_steps=1).model_dump()
    quick["output"], quick["eval"] = {"merge": False}, {"prompts": 0}
    run(JobSpec.parse(quick), train, tmp_path / "run", validation_path=tmp_path / "v.jsonl", sink=events.append)
    assert [e.message for e in events if getattr(e, "type", None) == "validation_empty"] == [
        "no validation row has anything to evaluate within max_seq_length=48: the run has no evaluation, and the "
        "report prompts from the train set"]


def test_a_pair_reversing_an_earlier_pair_is_warned_of(tiny_model_dir, tmp_path):
    # Two annotators' files concatenated: the same prompt with the answers the other way round. The pairs cancel
    # each other out, silently; the preflight names them.
    cow = {"prompt": "What does the cow say?", "chosen": "Moo.", "rejected": "Woof."}
    dog = {"prompt": "What does the dog say?", "chosen": "Woof.", "rejected": "Moo."}
    cased = {"prompt": "What does the cat say?", "chosen": "Meow.", "rejected": "meow."}  # reverses no other pair
    path = write_jsonl([cow, dog, {**cow, "chosen": "woof. ", "rejected": "Moo."}, cased], tmp_path / "flipped.jsonl")
    report = preflight(dpo_spec(tiny_model_dir), tiny_model_dir, path)
    assert report["train"]["contradicting_rows"] == 1 and report["train"]["contradicting_lines"] == [[3, 1]]
    assert report["refusals"] == []
    assert any("line 3 reverses line 1" in w for w in report["warnings"]), report["warnings"]


def test_preflight_counts_pairs_as_the_run_does(dpo_run, task, tiny_model_dir):
    report = preflight(dpo_spec(tiny_model_dir), tiny_model_dir, task["train"], validation_path=task["validation"],
                       examples=1)
    trained = dpo_run.summary["data"]["train"]
    assert {k: report["train"][k] for k in ("rows", "truncated_rows", "dropped_rows", "tokens", "trained_tokens")} == {
        k: trained[k] for k in ("rows", "truncated_rows", "dropped_rows", "tokens", "trained_tokens")}
    assert report["train"]["rows_without_eos_by_side"] == {"chosen": 0, "rejected": 0}
    assert report["refusals"] == [] and report["examples"][0]["side"] == "chosen"
    assert report["examples"][0]["tokens"][-1]["trained"]  # EOS, learned
    wrong = preflight(dpo_spec(tiny_model_dir), tiny_model_dir, task["sft"])
    assert wrong["refusals"] and "method dpo trains on preference rows" in wrong["refusals"][0]


def test_the_estimate_counts_two_sequences_and_the_reference(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    spec = dpo_spec(tiny_model_dir)
    sft = spec.model_copy(update={"method": JobSpec.parse(demo_spec(str(tiny_model_dir))).method})
    dpo, plain = estimate_peak_memory(spec, config), estimate_peak_memory(sft, config)
    doubled = estimate_peak_memory(sft, config, micro_batch=2 * spec.training.per_device_batch_size)
    activations = "activations (kept for backward)"
    assert dpo.parts[activations] == doubled.parts[activations] > plain.parts[activations]
    with_copy = estimate_peak_memory(spec, config, reference_adapter=True)
    assert with_copy.parts["DPO reference adapter (frozen copy)"] == dpo.parts["LoRA adapter"]  # float32 both
    halved = spec.model_copy(update={"lora": spec.lora.model_copy(update={"dtype": "bfloat16"})})
    bf16 = estimate_peak_memory(halved, config, reference_adapter=True)  # the copy is cast as the adapter is
    assert bf16.parts["DPO reference adapter (frozen copy)"] == bf16.parts["LoRA adapter"] == dpo.parts["LoRA adapter"] // 2
    assert with_copy.total > dpo.total > plain.total
