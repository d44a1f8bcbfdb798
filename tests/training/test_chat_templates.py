"""What a row teaches under the chat templates real models ship (chat_templates.json: each verbatim, with
where it was copied from): every assistant turn learned in full with the token that closes it, nothing of
the prompt, one EOS at the end; and a row a template refuses, or would train on other than it says,
refused naming its line, by the engine and by the preflight alike.

The tokenizer is the tiny test tokenizer dressed as the family: its template, its special tokens, its EOS."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AddedToken, AutoTokenizer

from worker.training.data import Example, validate_lines
from worker.training.merge import stop_token_ids
from worker.training.preflight import preflight
from worker.training.spec import JobSpec
from worker.training.tiny import build_tokenizer
from worker.training.tokenization import (
    IGNORE_INDEX,
    TemplateError,
    encode_example,
    encode_preference,
    prepare_tokenizer,
    turn_end_token_id,
)

FAMILIES = json.loads((Path(__file__).parent / "chat_templates.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(0).save_pretrained(path)
    return path


def dressed(base: Path, family: str | dict, out: Path, eos: str | None = None):
    """The tiny tokenizer with `family`'s template, special tokens and EOS (or `eos`, one of them: a base model's
    tokenizer beside its instruct model's), saved and read back as a model's files."""
    f = FAMILIES[family] if isinstance(family, str) else family
    tok = AutoTokenizer.from_pretrained(base)
    specials = list(dict.fromkeys([*f["special"], f["eos"], *([f["bos"]] if f["bos"] else [])]))
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in f["plain"]])
    tok.eos_token, tok.bos_token, tok.chat_template = eos or f["eos"], f["bos"], f["template"]
    tok.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    prepare_tokenizer(tok)
    return tok


def row(*messages: tuple[str, str], line: int = 1) -> Example:
    """A conversation row as the dataset reader makes it, at `line`."""
    read = validate_lines([json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]}).encode()])
    return dataclasses.replace(read.examples[0], line=line)


THREE_TURNS = (("user", "Hi, who says moo?"), ("assistant", "The cow says moo."), ("user", "And the dog?"),
               ("assistant", "The dog says woof.\nLoudly — «wouf» 🐕."), ("user", "And the duck?"),
               ("assistant", "The duck says quack."))


def learned_runs(enc) -> list[str]:
    """The learned stretches of the row, as text."""
    runs, current = [], None
    for piece, label in zip(enc.pieces, enc.labels, strict=True):
        if label != IGNORE_INDEX:
            current = (current or "") + piece
        elif current is not None:
            runs.append(current)
            current = None
    return runs + ([current] if current is not None else [])


# Each family's learned turns under THREE_TURNS: the answer and its end-of-turn (with the spacing the
# template writes inside the turn), and one EOS closing the row, never the end-of-turn twice.
LEARNED = {
    "llama3.1": ["The cow says moo.<|eot_id|>", "The dog says woof.\nLoudly — «wouf» 🐕.<|eot_id|>",
                 "The duck says quack.<|eot_id|>"],
    "llama2": [" The cow says moo. </s>", " The dog says woof.\nLoudly — «wouf» 🐕. </s>", " The duck says quack. </s>"],
    "qwen2.5": ["The cow says moo.<|im_end|>\n", "The dog says woof.\nLoudly — «wouf» 🐕.<|im_end|>\n",
                "The duck says quack.<|im_end|>"],
    # Qwen 3 and Phi-3.5 render a conversation that ends with a turn differently from one that goes on
    # (an empty thinking block; an EOS): earlier turns are found by their content in the whole render.
    "qwen3": ["The cow says moo.<|im_end|>", "The dog says woof.\nLoudly — «wouf» 🐕.<|im_end|>",
              "<think>\n\n</think>\n\nThe duck says quack.<|im_end|>"],
    "phi3.5": ["The cow says moo.<|end|>", "The dog says woof.\nLoudly — «wouf» 🐕.<|end|>",
               "The duck says quack.<|end|>\n<|endoftext|>"],
    # vLLM's ChatML writes <|im_end|> after a turn only when another message follows: learned all the same.
    "chatml-vllm": ["The cow says moo.<|im_end|>", "The dog says woof.\nLoudly — «wouf» 🐕.<|im_end|>",
                    "The duck says quack.<|im_end|>"],
    "zephyr": ["The cow says moo.</s>\n", "The dog says woof.\nLoudly — «wouf» 🐕.</s>\n", "The duck says quack.</s>"],
}


@pytest.mark.parametrize("family", sorted(LEARNED))
def test_every_answer_is_learned_with_the_token_that_closes_it_and_nothing_of_the_prompt(
        family, base_tokenizer_dir, tmp_path):
    tok = dressed(base_tokenizer_dir, family, tmp_path)
    enc = encode_example(row(*THREE_TURNS), tok, max_seq_length=4096, train_on_inputs=False, pieces=True)
    assert learned_runs(enc) == LEARNED[family]
    assert enc.input_ids[-1] == tok.eos_token_id and enc.eos_learned
    # One EOS closes the row: ChatML's "<|im_end|>\n" where <|im_end|> is the EOS is not followed by another.
    assert enc.input_ids[-2] != tok.eos_token_id


@pytest.mark.parametrize("family", [*sorted(FAMILIES), "qwen2.5 base"])
def test_a_model_stops_at_the_end_of_turn_it_learns_where_that_is_not_its_eos(family, base_tokenizer_dir, tmp_path):
    """Training learns the template's end of turn, then the EOS. Where they are two tokens (a Qwen 2.5 base:
    EOS <|endoftext|>, turns closed by <|im_end|>; Gemma; Phi-3), the merged model's generation_config and the
    eval report stop at both: at the EOS alone, the tuned model answered "\n" past its turn, then stopped."""
    base = family == "qwen2.5 base"  # the base model's tokenizer: the instruct one's template, EOS <|endoftext|>
    f = FAMILIES[family.removesuffix(" base")]
    tok = dressed(base_tokenizer_dir, f, tmp_path, eos="<|endoftext|>" if base else None)
    turn_end = turn_end_token_id(tok)
    stops = stop_token_ids(None, tok)
    if f["end_of_turn"] == tok.eos_token:
        assert turn_end is None and stops == tok.eos_token_id
    else:
        assert turn_end == tok.convert_tokens_to_ids(f["end_of_turn"]) != tok.eos_token_id
        assert stops == [tok.eos_token_id, turn_end]
        enc = encode_example(row(*THREE_TURNS), tok, max_seq_length=4096, train_on_inputs=False, pieces=True)
        last = learned_runs(enc)[-1]  # what the stops cut: the end of turn, its newline (Qwen, Gemma), the EOS
        assert last.endswith(tok.eos_token) and last.removesuffix(tok.eos_token).rstrip("\n").endswith(f["end_of_turn"])


def test_a_character_split_over_byte_level_tokens_is_shown_once(base_tokenizer_dir, tmp_path):
    tok = dressed(base_tokenizer_dir, "qwen2.5", tmp_path)
    enc = encode_example(row(("user", "Hi"), ("assistant", "héllo « 日本 » 🙂")), tok, max_seq_length=512,
                         train_on_inputs=False, pieces=True)
    assert "".join(enc.pieces).count("héllo « 日本 » 🙂") == 1


@pytest.mark.parametrize(("family", "messages", "says"), [
    # The template's own raise_exception: no system role, roles that must alternate.
    ("gemma2", (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")),
     "the model's chat template refuses this conversation: System role not supported"),
    ("llama2", (("user", "Hi"), ("user", "Who says moo?"), ("assistant", "The cow.")),
     "the model's chat template refuses this conversation: Conversation roles must alternate"),
    # What a template leaves out would be trained on silently: DeepSeek-R1's distilled models drop the
    # reasoning of every answer, Mistral v0.3 a system message unless the conversation ends with a user turn,
    # Qwen 3 the reasoning of all but the last answer.
    ("r1-distill", (("user", "Who says moo?"), ("assistant", "<think>\nCows moo.\n</think>\n\nThe cow says moo.")),
     "leaves out or rewrites part of message 2 (assistant: '<think>\\nCows moo.\\n</think>\\n\\nThe cow says moo.'), "
     "so the model would learn another answer than the row's"),
    ("mistral-v3", (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")),
     "leaves out or rewrites part of message 1 (system: 'Be brief.'), so the model would train without it; this "
     "template shows a system message only where a conversation ends with a user turn, or never: put its text at "
     "the start of the first user message"),
    ("qwen3", (("user", "Who says moo?"), ("assistant", "<think>\nCows moo.\n</think>\n\nThe cow."), ("user", "Dogs?"),
               ("assistant", "<think>\nDogs bark.\n</think>\n\nWoof.")),
     "leaves out or rewrites part of message 2"),
])
def test_a_row_the_template_refuses_or_would_change_is_refused_naming_its_line(
        family, messages, says, base_tokenizer_dir, tmp_path):
    tok = dressed(base_tokenizer_dir, family, tmp_path)
    with pytest.raises(TemplateError) as refused:
        encode_example(row(*messages, line=7), tok, max_seq_length=512, train_on_inputs=False)
    assert str(refused.value).startswith("line 7: ") and says in str(refused.value)
    with pytest.raises(TemplateError):  # the prompt learned too does not make the row right
        encode_example(row(*messages, line=7), tok, max_seq_length=512, train_on_inputs=True)


def test_a_template_that_opens_answers_otherwise_in_its_prompt_says_what_trains(base_tokenizer_dir, tmp_path):
    """DeepSeek-R1's distilled models' template opens an answer with a newline in the prompt alone: a row with one
    answer at its end is refused too, so the advice for a turn in the middle ("one assistant turn at its end") was
    wrong. What it advises now trains."""
    tok = dressed(base_tokenizer_dir, "r1-distill", tmp_path)
    moo = row(("user", "Who says moo?"), ("assistant", "The cow says moo."), line=7)
    with pytest.raises(TemplateError) as refused:
        encode_example(moo, tok, max_seq_length=512, train_on_inputs=False)
    assert "so no answer can be told from its prompt: set training.train_on_inputs" in str(refused.value)
    assert "avoids this" not in str(refused.value)
    enc = encode_example(moo, tok, max_seq_length=512, train_on_inputs=True, pieces=True)
    assert "The cow says moo.<｜end▁of▁sentence｜>" in "".join(learned_runs(enc))


def test_qwen3_learns_the_reasoning_of_the_last_answer_in_full(base_tokenizer_dir, tmp_path):
    tok = dressed(base_tokenizer_dir, "qwen3", tmp_path)
    enc = encode_example(row(("user", "Who says moo?"), ("assistant", "<think>\nCows moo.\n</think>\n\nThe cow.")),
                         tok, max_seq_length=512, train_on_inputs=False, pieces=True)
    assert learned_runs(enc) == ["<think>\nCows moo.\n</think>\n\nThe cow.<|im_end|>"]


SOUND = {"type": "function", "function": {"name": "get_sound", "description": "The sound an animal makes",
                                          "parameters": {"type": "object", "properties": {"animal": {"type": "string"}}}}}
# Mistral's template takes call ids of nine letters and digits.
TOOL_ROW = {"tools": [SOUND], "messages": [
    {"role": "user", "content": "What does the cow say?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "cow"}'}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "moo"},
    {"role": "assistant", "content": "The cow says moo."}]}

# What TOOL_ROW teaches under the templates that know tools: the call in the family's own format with its end of
# turn (Llama 3.1 names the arguments "parameters"), and the answer; nothing of the tools, the question or the
# tool's result. Qwen 3 renders the call's turn differently when it is last (an empty thinking block): it is found
# by its render's tail.
CALLS_LEARNED = {
    "default": ['<tool_call>{"name": "get_sound", "arguments": {"animal": "cow"}}</tool_call></s>', "The cow says moo.</s>"],
    "llama3.1": ['{"name": "get_sound", "parameters": {"animal": "cow"}}<|eot_id|>', "The cow says moo.<|eot_id|>"],
    "mistral-v3": ['[TOOL_CALLS] [{"name": "get_sound", "arguments": {"animal": "cow"}, "id": "call12345"}]</s>',
                   " The cow says moo.</s>"],
    "qwen2.5": ['<tool_call>\n{"name": "get_sound", "arguments": {"animal": "cow"}}\n</tool_call><|im_end|>\n',
                "The cow says moo.<|im_end|>"],
    "qwen3": ['<tool_call>\n{"name": "get_sound", "arguments": {"animal": "cow"}}\n</tool_call><|im_end|>\n',
              "<think>\n\n</think>\n\nThe cow says moo.<|im_end|>"],
}


def tokenizer_of(family: str, base: Path, out: Path):
    """`family`'s tokenizer; "default": the tiny tokenizer as built, with the engine's default template."""
    if family != "default":
        return dressed(base, family, out)
    tok = AutoTokenizer.from_pretrained(base)
    prepare_tokenizer(tok)
    return tok


@pytest.mark.parametrize("family", sorted(CALLS_LEARNED))
def test_a_tool_call_is_learned_in_the_familys_own_format_and_the_tools_result_is_not(family, base_tokenizer_dir,
                                                                                        tmp_path):
    tok = tokenizer_of(family, base_tokenizer_dir, tmp_path)
    [example] = validate_lines([json.dumps(TOOL_ROW).encode()]).examples
    enc = encode_example(example, tok, max_seq_length=4096, train_on_inputs=False, pieces=True)
    assert learned_runs(enc) == CALLS_LEARNED[family]
    assert enc.input_ids[-1] == tok.eos_token_id and enc.eos_learned
    # The tools' definitions are in the rendered prompt (the model learns to call what it was shown), unlearned.
    assert '"get_sound"' in "".join(p for p, label in zip(enc.pieces, enc.labels, strict=True) if label == IGNORE_INDEX)
    # A row may end with the call: the model learns to call and stop.
    ending = {**TOOL_ROW, "messages": TOOL_ROW["messages"][:2]}
    enc = encode_example(validate_lines([json.dumps(ending).encode()]).examples[0], tok, max_seq_length=4096,
                         train_on_inputs=False, pieces=True)
    last = CALLS_LEARNED[family][0].rstrip("\n")
    if family == "qwen3":  # its empty thinking block opens the last turn, a call too
        last = "<think>\n\n</think>\n\n" + last
    assert learned_runs(enc) == [last] and enc.eos_learned


@pytest.mark.parametrize("family", sorted(CALLS_LEARNED))
def test_a_tools_result_in_json_on_lines_is_shown_as_the_template_writes_it(family, base_tokenizer_dir, tmp_path):
    # A tool's result is most often JSON, and may span lines: Llama 3.1 renders it as a JSON string (tojson, its
    # quotes and newlines escaped), as it does when it serves the model; the row is trained, not refused.
    tok = tokenizer_of(family, base_tokenizer_dir, tmp_path)
    result = '{"animal": "cow",\n "sound": "moo", "note": "«meuh»"}'
    messages = [*TOOL_ROW["messages"][:2], {**TOOL_ROW["messages"][2], "content": result}, TOOL_ROW["messages"][3]]
    [example] = validate_lines([json.dumps({**TOOL_ROW, "messages": messages}).encode()]).examples
    enc = encode_example(example, tok, max_seq_length=4096, train_on_inputs=False, pieces=True)
    assert learned_runs(enc) == CALLS_LEARNED[family]
    shown = "".join(p for p, label in zip(enc.pieces, enc.labels, strict=True) if label == IGNORE_INDEX)
    assert (json.dumps(result, ensure_ascii=False) if family == "llama3.1" else result) in shown


# An agent calls again after a tool's error: the same call twice, a tool's result between them.
RETRY_ROW = {"tools": [SOUND], "messages": [
    {"role": "user", "content": "What does the cow say?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "cow"}'}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "TIMEOUT"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call00002", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "cow"}'}}]},
    {"role": "tool", "tool_call_id": "call00002", "content": "moo"},
    {"role": "assistant", "content": "The cow says moo."}]}


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("family", sorted(CALLS_LEARNED))
def test_a_call_repeated_later_in_the_row_is_two_turns_and_the_result_between_them_is_not_learned(
        family, train_on_inputs, base_tokenizer_dir, tmp_path):
    # Qwen 3 finds a call turn by its render's tail: the same tail further on, the repeated call's, is no end of it.
    tok = tokenizer_of(family, base_tokenizer_dir, tmp_path)
    retry = json.loads(json.dumps(RETRY_ROW))
    if train_on_inputs:  # all is learned but a turn of weight 0: the first call's
        retry["messages"][1]["weight"] = 0
    [example] = validate_lines([json.dumps(retry).encode()]).examples
    enc = encode_example(example, tok, max_seq_length=4096, train_on_inputs=train_on_inputs, pieces=True)
    learned = "".join(p for p, label in zip(enc.pieces, enc.labels, strict=True) if label != IGNORE_INDEX)
    shown = "".join(p for p, label in zip(enc.pieces, enc.labels, strict=True) if label == IGNORE_INDEX)
    if train_on_inputs:  # the tool's result after the first call, and the second call, are learned
        assert "TIMEOUT" in learned and shown.count("get_sound") == 1 and "TIMEOUT" not in shown
    else:  # each call and the answer, nothing between them
        assert learned_runs(enc) == [CALLS_LEARNED[family][0], CALLS_LEARNED[family][0].replace("12345", "00002"),
                                     CALLS_LEARNED[family][1]]
        assert "TIMEOUT" in shown


@pytest.mark.parametrize(("family", "says"), [
    # Templates that know no tools render the conversation without them, or refuse the tool's turn.
    ("zephyr", "does not render the row's tools ('get_sound' is not in the conversation it renders): this model's "
               "template knows no tool calling"),
    ("phi3.5", "this model's template knows no tool calling"),
    ("gemma2", "refuses this conversation: Conversation roles must alternate"),
])
def test_a_tool_calling_row_on_a_template_without_tools_is_refused_by_the_engine_and_the_preflight(
        family, says, base_tokenizer_dir, tmp_path):
    tok_dir = tmp_path / "tokenizer"
    tok = dressed(base_tokenizer_dir, family, tok_dir)
    data = tmp_path / "train.jsonl"
    plain = {"messages": [{"role": "user", "content": "Who says moo?"}, {"role": "assistant", "content": "The cow."}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in (plain, TOOL_ROW, plain)))
    [_, example, _] = validate_lines(data.read_bytes().splitlines()).examples
    with pytest.raises(TemplateError) as refused:
        encode_example(example, tok, max_seq_length=512, train_on_inputs=False)
    assert str(refused.value).startswith("line 2: ") and says in str(refused.value)
    if "refuses" in says:  # the template's own words, then what a row with tools needs
        assert "a row that calls tools needs a model whose template knows tool calling" in str(refused.value)
    report = preflight(JobSpec.parse({"base_model": "m", "training": {"max_steps": 1}}), tok_dir, data)
    assert report["train"]["template_refused_lines"] == [2] and report["train"]["template_refusal"] == str(refused.value)


# The tool's name and its argument's in the user's words: a template that drops the tools and the call still
# holds them, and learned the call's turn as an empty one.
SAID_ROW = {"tools": [SOUND], "messages": [
    {"role": "user", "content": "Please get_sound of the animal: the cow"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "cow"}'}}]}]}


@pytest.mark.parametrize("family", ["zephyr", "phi3.5", "phi3-mini", "gemma2", "llama2", "chatml-vllm", "r1-distill"])
def test_a_template_without_tools_is_refused_where_the_row_itself_says_the_tools_name(family, base_tokenizer_dir, tmp_path):
    tok = dressed(base_tokenizer_dir, family, tmp_path)
    [example] = validate_lines([json.dumps(SAID_ROW).encode()]).examples
    with pytest.raises(TemplateError, match="does not render the row's tools"):
        encode_example(example, tok, max_seq_length=512, train_on_inputs=False)


def test_a_template_that_renders_the_tools_but_not_the_calls_is_refused(base_tokenizer_dir, tmp_path):
    from worker.training.tokenization import DEFAULT_CHAT_TEMPLATE

    tok = tokenizer_of("default", base_tokenizer_dir, tmp_path)
    start = DEFAULT_CHAT_TEMPLATE.index("{% for call in")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE[:start] + DEFAULT_CHAT_TEMPLATE[DEFAULT_CHAT_TEMPLATE.index("{% endfor %}", start) + 12:]
    [example] = validate_lines([json.dumps(SAID_ROW).encode()]).examples
    with pytest.raises(TemplateError, match="leaves out the row's calls"):
        encode_example(example, tok, max_seq_length=512, train_on_inputs=False)


def test_a_preference_row_learns_each_answer_with_its_end_of_turn(base_tokenizer_dir, tmp_path):
    tok = dressed(base_tokenizer_dir, "chatml-vllm", tmp_path)
    pair = json.dumps({"prompt": [{"role": "user", "content": "Who says moo?"}], "chosen": "The cow.",
                       "rejected": "The dog."}).encode()
    encoded = encode_preference(validate_lines([pair]).examples[0], tok, max_seq_length=512, pieces=True)
    assert learned_runs(encoded.chosen) == ["The cow.<|im_end|>"]
    assert learned_runs(encoded.rejected) == ["The dog.<|im_end|>"]


def test_the_preflight_refuses_every_row_the_template_refuses_and_counts_the_others(base_tokenizer_dir, tmp_path):
    """Before, a template's raise_exception escaped the preflight (no report: the job was created unchecked)
    and then failed on a worker with no line named."""
    tok_dir = tmp_path / "tokenizer"
    dressed(base_tokenizer_dir, "gemma2", tok_dir)
    rows = [{"messages": [{"role": "user", "content": "Who says moo?"}, {"role": "assistant", "content": "The cow."}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]}] * 3
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec.parse({"base_model": "m", "training": {"max_steps": 1}})
    report = preflight(spec, tok_dir, data)
    assert report["train"]["template_refused_rows"] == 3 and report["train"]["template_refused_lines"] == [2, 4, 6]
    assert report["train"]["rows"] == 3 and report["train"]["trained_tokens"] > 0 and report["train"]["complete"]
    assert report["refusals"] == [
        "3 train rows cannot be trained on with the model's chat template (lines 2, 4, 6), and training stops at "
        "the first; the first says: " + report["train"]["template_refusal"]]
    assert report["train"]["template_refusal"].startswith(
        "line 2: the model's chat template refuses this conversation: System role not supported")


def test_a_dpo_set_whose_every_pair_the_template_refuses_is_shown_by_qlora_jobs_preflight(base_tokenizer_dir, tmp_path):
    """Its report counted no pair at all, so "contradicting_rows" (069fc99) stayed null where the other dpo counts
    are 0, and the CLI's table formatted it as a number: a TypeError, which `qlora jobs preflight` told as an API
    answer of another shape (exit 1) instead of showing the refusal that names the template."""
    from app.cli.render import print_preflight

    tok_dir = tmp_path / "tokenizer"
    dressed(base_tokenizer_dir, "gemma2", tok_dir)
    pair = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who says moo?"}],
            "chosen": "The cow.", "rejected": "The dog."}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "chosen": "A cow."}) + "\n")
    spec = JobSpec.parse({"base_model": "m", "method": {"type": "dpo"}, "training": {"max_steps": 1}})
    report = preflight(spec, tok_dir, data)
    assert report["train"]["template_refused_rows"] == 2 and report["refusals"]
    assert report["train"]["contradicting_rows"] == 0 and report["train"]["tied_rows"] == 0
    print_preflight({"placement": {"note": "runs on the CPU"}, "report": report})
