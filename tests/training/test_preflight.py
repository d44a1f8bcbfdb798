"""Preflight against the trainer: the numbers it gives before a run are the ones the run reports."""

import json
import math

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


def test_with_packing_on_the_preflight_counts_the_steps_the_trainer_then_takes(tiny_model_dir, demo_data, tmp_path):
    """packing true packs rows on any device, into fewer sequences: fewer steps. The preflight counted the
    rows unpacked (37 demo rows, micro-batch 4, accumulation 2: "10 steps, 5 per epoch") and said packing was a
    GPU's "auto" matter, while the run took 6 steps."""
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=None, epochs=2, packing=True, per_device_batch_size=4,
                                    gradient_accumulation_steps=2, max_seq_length=64))
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(demo_data["validation"].read_text().splitlines(keepends=True)[:37]))
    report = preflight(spec, tiny_model_dir, train_path)
    result = run(spec, train_path, tmp_path / "run")
    assert result.summary["speedups"]["packing"] is True
    assert report["steps"] == result.summary["steps"]["planned"] == result.summary["steps"]["completed"]
    assert report["steps"] < 2 * math.ceil(37 / 8)  # packed: fewer than the unpacked rows make
    assert report["epochs"] == 2.0 and report["steps"] == 2 * report["steps_per_epoch"]
    assert report["steps_note"].startswith("packing on: the 37 rows are packed into")
    # What the job then counts as its trained_tokens (README): the preflight's tokens, each epoch, prompts too
    assert result.summary["tokens_seen"] == 2 * report["train"]["tokens"] > 2 * report["train"]["trained_tokens"]
    # "auto" (on a GPU with flash-attention only): the unpacked steps, and the note says what packing would make
    auto = preflight(spec.model_copy(update={"training": spec.training.model_copy(update={"packing": "auto"})}),
                     tiny_model_dir, train_path)
    assert auto["steps"] == 2 * math.ceil(37 / 8)
    assert f"({report['steps']} steps, 2.0 epochs)" in auto["steps_note"]


def test_a_set_longer_than_the_preflight_reads_has_its_steps_counted_for_all_its_rows(tiny_model_dir, demo_data,
                                                                                     tmp_path):
    """The preflight reads the first MAX_ROWS rows; the trainer trains on them all. The steps were counted for the
    rows read (60,000 demo rows: 3,125 steps said, 3,750 planned by the run): now for the whole file, as an
    estimate that says so. Here the preflight reads 30 of 45 rows."""
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_steps=None, epochs=1, per_device_batch_size=4, packing=False))
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(demo_data["validation"].read_text().splitlines(keepends=True)[:45]))
    report = preflight(spec, tiny_model_dir, train_path, max_rows=30)
    assert (report["train"]["rows"], report["train"]["rows_in_file"]) == (30, 45)
    result = run(spec, train_path, tmp_path / "run")
    assert report["steps"] == result.summary["steps"]["planned"] == math.ceil(45 / 4)
    assert report["steps_note"].startswith("an estimate: the preflight read the first 30 of 45 rows")


def test_packed_sequences_are_counted_as_trl_packs_them():
    """The preflight's count of packed sequences against trl's own packing (best-fit decreasing, in batches of
    1,000 rows), on lengths of every kind: longer than max_seq_length, exactly it, empty."""
    import random

    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from worker.training.preflight import packed_sequences

    rng = random.Random(7)
    lengths = [rng.choice([0, 1, 3, 17, 32, 40, 63, 64, 65, 100]) for _ in range(2_345)]
    rows = Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths]})
    assert packed_sequences(lengths, 64) == len(pack_dataset(rows, 64, "bfd"))


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


def test_a_stored_dataset_the_trainer_would_now_refuse_is_a_refusal_naming_its_line(tiny_model_dir, tmp_path):
    """A dataset stored `ready` under rules since tightened (tools on a prompt/completion row were dropped silently
    then): the trainer reads it with today's and would fail after the queue, so the preflight refuses the job,
    naming the line."""
    rows = [{"prompt": f"What does animal {n} say?", "completion": "moo"} for n in range(8)]
    data = tmp_path / "with_tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps(
        {"prompt": "hi", "completion": "yo", "tools": [{"type": "function", "function": {"name": "f"}}]}) + "\n")
    line = len(data.read_text().splitlines())
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec.parse(short_spec(tiny_model_dir))
    for report in (preflight(spec, tiny_model_dir, data), preflight(spec, tiny_model_dir, train, validation_path=data)):
        [refusal] = report["refusals"]
        assert f"line {line}: \"tools\": tool calling is trained" in refusal and "upload it again" in refusal, refusal


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


def test_special_tokens_written_in_messages_are_counted_and_shown_to_be_what_the_model_learns(tiny_model_dir, tmp_path):
    """"</s>" inside an answer is tokenized as the EOS, and learned there: the model would learn to stop mid-answer.
    The preflight counts such rows (a text row's own formatting is not counted) and says where."""
    from transformers import AutoTokenizer

    from worker.training.data import read_jsonl
    from worker.training.tokenization import encode_example, prepare_tokenizer

    def chat(user, answer):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    rows = [chat("What does the cow say?", "The cow says moo."),
            chat("What ends a row?", "It is </s> here, then more."),  # line 2: EOS inside a learned answer
            chat("Hi <|assistant|>\nmoo", "The cow says moo."),  # line 3: a role marker in the prompt
            {"messages": [{"role": "user", "content": "Quote it"},
                          {"role": "assistant", "content": "</s>", "weight": 0},  # line 4: context, not learned
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "ok"}]},
            chat("What does the dog say?", "The dog says woof.")]
    data = tmp_path / "special.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=64))
    report = preflight(spec, tiny_model_dir, data)
    train = report["train"]
    assert train["rows_with_special_tokens"] == 3 and train["special_token_lines"] == [2, 3, 4]
    assert train["special_tokens_found"] == {"</s>": 2, "<|assistant|>": 1}
    assert train["rows_with_special_tokens_in_answers"] == 1
    [warning] = [w for w in report["warnings"] if "special tokens" in w]
    assert warning.startswith("3 rows have message text that the tokenizer reads as special tokens")
    assert "'</s>' in 2, '<|assistant|>' in 1; lines 2, 3, 4), 1 of them in learned answers" in warning

    # What the warning says, in the labels the trainer builds: an EOS learned in the middle of line 2's answer.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare_tokenizer(tokenizer)
    example = read_jsonl(data).examples[1]
    encoded = encode_example(example, tokenizer, max_seq_length=64, train_on_inputs=False)
    learned_eos = [i for i, label in enumerate(encoded.labels) if label == tokenizer.eos_token_id]
    assert len(learned_eos) == 2 and learned_eos[0] < len(encoded.labels) - 1  # mid-answer, and the row's own

    # A preference row's answers are learned answers too.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "What does the cow say?", "chosen": chosen, "rejected": "woof"}) + "\n"
                             for chosen in ("moo", "moo</s>")))
    dpo = short_spec(tiny_model_dir, max_seq_length=64) | {"method": {"type": "dpo", "beta": 0.1}}
    preferred = preflight(JobSpec.parse(dpo), tiny_model_dir, pairs)["train"]
    assert preferred["special_token_lines"] == [2] and preferred["rows_with_special_tokens_in_answers"] == 1

    # A text row writes its own format, special tokens included: not counted.
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "<s>[INST] hi [/INST] The cow says moo.</s>"}) + "\n")
    plain = preflight(JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=64)), tiny_model_dir, text)
    assert plain["train"]["rows_with_special_tokens"] == 0
    assert not any("special tokens" in w for w in plain["warnings"])


def test_a_special_token_in_a_pairs_prompt_turn_is_not_counted_as_learned(tiny_model_dir, tmp_path):
    # DPO learns the two answers only: an assistant turn of the prompt is context, whatever its weight (the trainer's
    # labels cover the completions alone). Such a turn's "</s>" was counted in learned answers, and the warning told
    # the user the model would learn to stop there.
    from transformers import AutoTokenizer

    from worker.training.data import read_jsonl
    from worker.training.tokenization import encode_preference, prepare_tokenizer

    prompt = [{"role": "user", "content": "Quote it"}, {"role": "assistant", "content": "It is </s> here."},
              {"role": "user", "content": "What does the cow say?"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": prompt, "chosen": "The cow says moo.", "rejected": "The cow says woof."}) + "\n")
    dpo = short_spec(tiny_model_dir, max_seq_length=64) | {"method": {"type": "dpo", "beta": 0.1}}
    report = preflight(JobSpec.parse(dpo), tiny_model_dir, pairs)
    train = report["train"]
    assert train["rows_with_special_tokens"] == 1 and train["special_tokens_found"] == {"</s>": 1}
    assert train["rows_with_special_tokens_in_answers"] == 0
    [warning] = [w for w in report["warnings"] if "special tokens" in w]
    assert "0 of them in learned answers" in warning

    # What the trainer learns: the EOS of each answer, none in the prompt.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare_tokenizer(tokenizer)
    pair = encode_preference(read_jsonl(pairs).examples[0], tokenizer, max_seq_length=64)
    for side in (pair.chosen, pair.rejected):
        assert [label for label in side.labels if label == tokenizer.eos_token_id] == [tokenizer.eos_token_id]


def test_with_train_on_inputs_a_special_token_in_a_user_turn_is_counted_as_learned(tiny_model_dir, tmp_path):
    # train_on_inputs learns the user turns too: a "</s>" written in one is an EOS in the labels, mid-row, and the model
    # learns to stop there. It was counted as prompt text (0 in learned text), as without train_on_inputs.
    from transformers import AutoTokenizer

    from worker.training.data import read_jsonl
    from worker.training.tokenization import encode_example, prepare_tokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "It ends </s> here, then more."},
                                             {"role": "assistant", "content": "The cow says moo."}]}) + "\n")
    counted = {}
    for on in (False, True):
        spec = JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=64, train_on_inputs=on))
        counted[on] = preflight(spec, tiny_model_dir, data)["train"]
    assert counted[False]["rows_with_special_tokens"] == counted[True]["rows_with_special_tokens"] == 1
    assert (counted[False]["rows_with_special_tokens_in_answers"], counted[True]["rows_with_special_tokens_in_answers"]) == (0, 1)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare_tokenizer(tokenizer)
    encoded = encode_example(read_jsonl(data).examples[0], tokenizer, max_seq_length=64, train_on_inputs=True)
    learned_eos = [i for i, label in enumerate(encoded.labels) if label == tokenizer.eos_token_id]
    assert len(learned_eos) == 2 and learned_eos[0] < len(encoded.labels) - 1  # the user turn's, and the row's own


def test_repeated_rows_and_validation_rows_also_in_train_are_counted_with_their_lines(tiny_model_dir, tmp_path):
    """A pipeline that duplicated rows trains on them twice an epoch; a validation row also in train makes the eval
    loss, early stopping and the report measure recall. Both are warned of, with the lines."""
    def chat(user, answer):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    rows = [chat(f"What does animal {i} say?", f"Sound {i}.") for i in range(10)]
    differs_in_weight = {"messages": [*rows[0]["messages"][:1], {**rows[0]["messages"][1], "weight": 0},
                                      *chat("And?", "Done.")["messages"]]}
    respaced = chat("what  does ANIMAL 6 say?\n", " Sound 6.")  # line 14: repeats line 7 up to case and spacing
    train = write("train.jsonl", [*rows, rows[1], rows[4], differs_in_weight, respaced])  # lines 11, 12 repeat 2, 5
    validation = write("validation.jsonl", [rows[3], chat("Something new?", "Yes."), rows[3],
                                            chat("What does animal 8 SAY?", "A new sound."),  # asks as train line 9
                                            chat("What does animal 8 say? Loudly.", "Sound 8.")])  # asks something else
    report = preflight(JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=64)), tiny_model_dir, train,
                       validation_path=validation)
    assert report["train"]["duplicate_rows"] == 3
    assert report["train"]["duplicate_lines"] == [[11, 2], [12, 5], [14, 7]]
    assert "rows_in_train" not in report["train"] and "prompts_in_train" not in report["train"]
    assert report["validation"]["rows_in_train"] == 2 and report["validation"]["rows_in_train_lines"] == [[1, 4], [3, 4]]
    # Rows also in train are not counted again as prompts in train.
    assert report["validation"]["prompts_in_train"] == 1 and report["validation"]["prompts_in_train_lines"] == [[4, 9]]
    assert report["validation"]["duplicate_rows"] == 1
    assert any(w.startswith("3 of 14 rows (21%) repeat an earlier row, up to case and spacing (line 11 repeats line 2, "
                            "line 12 repeats line 5, line 14 repeats line 7)") for w in report["warnings"])
    assert any(w.startswith("2 of 5 validation rows (40%) are also in the train set (line 1 is train line 4, "
                            "line 3 is train line 4)") for w in report["warnings"])
    assert any(w.startswith("1 of 5 validation rows (20%) asks what a train row asks, with another answer "
                            "(line 4 asks as train line 9)") for w in report["warnings"])

    # Distinct rows, and a validation set apart from them (the demo's): no warning.
    clean = preflight(JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=64)), tiny_model_dir,
                      write("clean.jsonl", rows), validation_path=write("apart.jsonl", [chat("Something new?", "Yes.")]))
    assert clean["train"]["duplicate_rows"] == 0 and clean["validation"]["rows_in_train"] == 0
    assert clean["validation"]["prompts_in_train"] == 0
    assert clean["warnings"] == []


def test_the_demo_datas_files_are_valid_and_preflight_clean_for_sft_and_dpo(tiny_model_dir, tmp_path):
    """`qlora demo-data` writes what the README's walk-throughs upload: chat rows for the SFT job and
    preference pairs for the DPO job after it, each its format's, valid on every line, and with
    nothing for preflight to refuse or warn of (no repeats, no validation rows leaked from train)."""
    from typer.testing import CliRunner

    from app.cli import cli
    from worker.training.data import DatasetValidator

    result = CliRunner().invoke(cli, ["demo-data", str(tmp_path), "--base-model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    formats = {}
    for name in ("train", "validation", "pairs"):
        validator = DatasetValidator(keep_examples=False)
        for line in (tmp_path / f"{name}.jsonl").read_bytes().splitlines():
            validator.feed(line)
        formats[name] = validator.finish().format  # raises DataError, naming the lines, on a bad row
    assert formats == {"train": "chat", "validation": "chat", "pairs": "preference"}

    sft = JobSpec.parse(json.loads((tmp_path / "spec.json").read_text()))
    report = preflight(sft, tiny_model_dir, tmp_path / "train.jsonl", validation_path=tmp_path / "validation.jsonl")
    assert (report["refusals"], report["warnings"]) == ([], [])
    dpo = JobSpec.parse({**json.loads((tmp_path / "spec.json").read_text()), "method": {"type": "dpo"}})
    report = preflight(dpo, tiny_model_dir, tmp_path / "pairs.jsonl")
    assert (report["refusals"], report["warnings"]) == ([], [])
    assert report["train"]["rows"] == 120 and report["train"]["duplicate_rows"] == 0


def test_a_long_examples_first_tokens_are_shown_and_the_whole_row_counted(tiny_model_dir, tmp_path):
    """A row of ~10,000 tokens: its first 4,096 in the answer (a million-token row would make one of 60 MB)."""
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "moo " * 5_000}]}
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(row) + "\n")
    report = preflight(JobSpec.parse(short_spec(tiny_model_dir, max_seq_length=20_000)), tiny_model_dir, data,
                       examples=1)
    shown = report["examples"][0]
    assert len(shown["tokens"]) == 4096 < shown["tokens_in_row"] == shown["length"] == report["train"]["tokens"]
    assert shown["trained_in_row"] == report["train"]["trained_tokens"] > 4096


def test_a_validation_set_with_nothing_to_evaluate_does_not_hide_a_train_set_that_never_learns_to_stop():
    """Each reason a job is refused is named at once (a PreflightRefused lists them): the validation refusal
    (baf7fa7) took the place of the one before it in a chain of alternatives, so a job with both problems was
    refused for its validation set alone, and refused again for its EOS once that was mended."""
    from worker.training.preflight import SetReport, problems

    spec = JobSpec.parse({"base_model": "tiny", "training": {"max_steps": 10, "max_seq_length": 32}})
    train = SetReport(rows=4, rows_in_file=4, truncated_rows=4, rows_without_eos=4, tokens=128, trained_tokens=40,
                      lengths={"min": 40, "median": 45, "p95": 50, "max": 50})
    validation = SetReport(rows=2, rows_in_file=2, truncated_rows=2, dropped_rows=2, dropped_lines=[1, 2],
                           lengths={"min": 60, "median": 60, "p95": 60, "max": 60})
    refusals, _ = problems(spec, train, validation)
    assert [(r.set, "no validation row is left to evaluate" in r.reason, "keeps its EOS in the labels" in r.reason)
            for r in refusals] == [("train", False, True), ("validation", True, False)]


def test_one_dropped_row_is_said_in_the_singular():
    """A file with one over-long row read "1 rows have nothing to learn within max_seq_length and are dropped
    (lines 22)", which `qlora jobs create` now prints as the job is made."""
    from worker.training.preflight import SetReport, problems

    spec = JobSpec.parse({"base_model": "tiny", "training": {"max_steps": 10, "max_seq_length": 64}})
    lengths = {"min": 20, "median": 20, "p95": 20, "max": 9407}
    one = SetReport(rows=21, rows_in_file=21, truncated_rows=1, dropped_rows=1, dropped_lines=[22], tokens=390,
                    trained_tokens=120, lengths=lengths)
    _, warnings = problems(spec, one, None)
    assert "1 row has nothing to learn within max_seq_length and is dropped (line 22)" in warnings, warnings
    two = SetReport(rows=21, rows_in_file=21, truncated_rows=2, dropped_rows=2, dropped_lines=[3, 22], tokens=390,
                    trained_tokens=120, lengths=lengths)
    _, warnings = problems(spec, two, None)
    assert "2 rows have nothing to learn within max_seq_length and are dropped (lines 3, 22)" in warnings, warnings
