"""Datasets: format detection, bad lines named by number, and what ends up learned (EOS above all)."""

import gzip
import json

import pytest
from transformers import AutoTokenizer

from worker.training.data import DataError, read_jsonl, validate_lines
from worker.training.tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    encode_example,
    encode_examples,
    prepare_tokenizer,
)


def lines(*rows) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the cow say?"},
                     {"role": "assistant", "content": "The cow says moo."}]}
ROW = json.dumps(CHAT).encode()


@pytest.fixture()
def tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare_tokenizer(tok)
    return tok


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (CHAT, "chat"),
        ({"prompt": "What does the cow say?", "completion": "moo"}, "prompt_completion"),
        ({"instruction": "Name the sound.", "input": "cow", "output": "moo"}, "alpaca"),
        ({"text": "The cow says moo."}, "text"),
    ],
)
def test_formats_are_detected(row, fmt):
    ds = validate_lines(lines(row, row))
    assert ds.format == fmt and len(ds.examples) == 2


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "expected a JSON object"),
        ({"foo": 1}, "unknown format (keys: foo)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, '"content" is empty'),
        ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "role 'bot' is not one of"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}, "last message is from user"),
        ({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]}, "weight is only allowed on assistant"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}, "weight 0"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}, "weight must be 0 or 1"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, '"content" must be a string'),
        ({"text": "fine"}, "this row is in text format but the file is chat"),
        # json.loads raises RecursionError and ValueError here, not JSONDecodeError: still a bad line.
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "arrays or objects nested too deeply"),
        (b'{"messages": ' + b"9" * 5000 + b"}", "a number too long"),
        # Named as JSON names them: Python's NoneType, int and list meant nothing to whoever wrote the file.
        (b"5", "expected a JSON object, got a number (5)"),
        (b"null", "expected a JSON object, got null"),
        (b'"row"', "expected a JSON object, got a string"),
        ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
         'messages[0]: "content" must be a string, got null'),
        (ROW + b" " + ROW, "Extra data (column 170); the line goes on after its JSON value: one JSON object per line"),
        # Files joined after one saved with a byte order mark: the mark of the second starts a line.
        (b"\xef\xbb\xbf" + ROW, "the line starts with a byte order mark (U+FEFF)"),
    ],
)
def test_bad_line_is_reported_with_its_number(bad, message):
    with pytest.raises(DataError) as info:
        validate_lines(lines(CHAT, b"", bad))  # the blank line 2 is skipped, the bad row is line 3
    assert [(e.line, message in e.message) for e in info.value.errors] == [(3, True)], str(info.value)
    assert "line 3:" in str(info.value)


def test_a_bad_value_is_echoed_as_an_excerpt():
    """A 2 MB line must not become a 2 MB error: it is stored on the dataset and listed with it."""
    role, key = "r" * 2_000_000, "k" * 2_000_000
    with pytest.raises(DataError) as info:
        validate_lines(lines({"messages": [{"role": role, "content": "a"}, {"role": "assistant", "content": "b"}]},
                             {key: 1, "other": 2}))
    first, second = (e.message for e in info.value.errors)
    assert first.startswith("messages[0]: role 'rrrr") and "(2,000,000 characters) is not one of" in first
    assert second.startswith("unknown format (keys: kkkk") and "characters)" in second
    assert len(first) < 200 and len(second) < 400


SHAREGPT = ('ShareGPT rows ("conversations" of {"from", "value"}) are chat rows here: {"messages": [{"role", "content"}]}, '
            'from "human" as role "user" and "gpt" as "assistant"')


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # What axolotl users bring: ShareGPT rows, whole or with their role names. They were an unknown format, or
        # "role 'human' is not one of ...", saying nothing of how to write them.
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "moo"}]},
         f"unknown format (keys: conversations); {SHAREGPT}"),
        ({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "moo"}]},
         f"messages[0]: role 'human' is not one of system, user, assistant, tool; {SHAREGPT}"),
        ({"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "moo"}]},
         f'messages[0]: "role" is missing: one of system, user, assistant, tool; {SHAREGPT}'),
        # A row printed by Python, and rows cut out of a JSON array by hand.
        (str(CHAT).encode(), "its keys are in single quotes, as Python prints a dict (str(row), print(row)): JSON needs "
                             "double quotes; write each row with json.dumps(row)"),
        (ROW + b",", "the line ends with a comma: JSONL has none between rows, one JSON object per line"),
    ],
)
def test_a_row_in_a_format_from_elsewhere_is_told_how_to_write_it(bad, message):
    with pytest.raises(DataError) as info:
        validate_lines(lines(CHAT, bad))
    assert [(e.line, message in e.message) for e in info.value.errors] == [(2, True)], str(info.value)


def test_prompt_completion_fields_are_checked():
    with pytest.raises(DataError, match='line 2: "completion" must be a string'):
        validate_lines(lines({"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": 5}))


PROMPT_COMPLETION = {"prompt": "What does the cow say?", "completion": "moo"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        # A row with a field left out is named by that field: "unknown format (keys: prompt)" and six shapes to
        # compare it with left the writer to find which one, and "got null" said the row held a null it did not.
        ((PROMPT_COMPLETION, {"prompt": "q"}),
         '"completion" is missing: such a row is {"prompt": ..., "completion": ...} (this one has prompt)'),
        (({"completion": "moo"},), '"prompt" is missing: such a row is {"prompt": ..., "completion": ...} (this one has completion)'),
        (({"instruction": "Name the sound.", "input": "cow"},), '"output" is missing: such a row is {"instruction": ...'),
        ((CHAT, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}), 'messages[0]: "content" is missing'),
        ((CHAT, {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}),
         'messages[0]: "role" is missing: one of system, user, assistant'),
        # Once the first row set the format, a row of no format is told the file's shape, not all six, and a misspelt key the one meant.
        ((CHAT, {"prompt": "q"}),
         'unknown format (keys: prompt); the file is chat (set by its first row): every row must be {"messages": [{"role"'),
        ((CHAT, {"message": CHAT["messages"]}),
         'unknown format (keys: message); "message" looks like a misspelt "messages"; the file is chat'),
    ],
)
def test_a_missing_field_is_named(rows, message):
    with pytest.raises(DataError) as info:
        validate_lines(lines(*rows))
    assert [(e.line, e.message.startswith(message)) for e in info.value.errors] == [(len(rows), True)], str(info.value)


def test_many_bad_lines_report_the_first_ones_and_the_count(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([b"{oops"] * 50))
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert info.value.total == 50 and len(info.value.errors) == 20
    assert "and 30 more" in str(info.value)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(tmp_path / "e.jsonl")


def learned(tokenizer, enc) -> str:
    return tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])


def test_eos_is_appended_and_learned_and_pad_is_not_eos(tokenizer):
    """The most common silent QLoRA bug: pad == EOS, EOS masked out of the loss, the model never stops."""
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for row in (CHAT, {"prompt": "p", "completion": "c"}, {"text": "The cow says moo."},
                {"instruction": "i", "output": "o"}):
        example = validate_lines(lines(row)).examples[0]
        enc = encode_example(example, tokenizer, max_seq_length=512, train_on_inputs=False)
        assert enc.input_ids[-1] == tokenizer.eos_token_id
        assert enc.labels[-1] == tokenizer.eos_token_id, f"EOS not learned for {row}"


def test_loss_only_on_assistant_turns_unless_train_on_inputs(tokenizer):
    example = validate_lines(lines(CHAT)).examples[0]
    enc = encode_example(example, tokenizer, max_seq_length=512, train_on_inputs=False)
    assert learned(tokenizer, enc) == "The cow says moo." + tokenizer.eos_token
    everything = encode_example(example, tokenizer, max_seq_length=512, train_on_inputs=True)
    assert everything.labels == everything.input_ids


def test_weight_zero_assistant_turn_is_context_not_target(tokenizer):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "weight": 0},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]}
    enc = encode_example(validate_lines(lines(row)).examples[0], tokenizer, max_seq_length=512, train_on_inputs=False)
    assert learned(tokenizer, enc) == "second" + tokenizer.eos_token
    assert "first" in tokenizer.decode(enc.input_ids)


def test_weight_zero_holds_with_train_on_inputs(tokenizer):
    """train_on_inputs learns the prompts too, not the answers a row marks as not to be learned."""
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "weight": 0},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]}
    enc = encode_example(validate_lines(lines(row)).examples[0], tokenizer, max_seq_length=512, train_on_inputs=True)
    text = learned(tokenizer, enc)
    assert "first" not in text and "a" in text and "b" in text and text.endswith("second" + tokenizer.eos_token), text
    assert enc.labels[0] == enc.input_ids[0]  # the prompt before it is learned


def test_truncated_rows_are_counted_and_empty_ones_dropped(tokenizer):
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "moo " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "cow " * 60}, {"role": "assistant", "content": "moo"}]}
    ds = validate_lines(lines(CHAT, long_answer, long_prompt))
    rows, stats = encode_examples(ds.examples, tokenizer, max_seq_length=32, train_on_inputs=False)
    assert stats.rows == 3 and stats.truncated_rows == 2
    assert stats.dropped_rows == 1 and stats.dropped_lines == [3]  # nothing left to learn in 32 tokens
    assert len(rows) == 2 and all(len(r["input_ids"]) <= 32 for r in rows)


def test_tokenizer_without_template_or_pad_gets_documented_defaults(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.pad_token = tok.eos_token  # the classic mistake a base model ships with
    tok.unk_token = tok.eos_token  # and nothing to reuse: a pad token must be added
    setup = prepare_tokenizer(tok)
    assert setup.chat_template_source == "default" and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert setup.pad_token_added and tok.pad_token_id != tok.eos_token_id


def test_tiny_model_is_deterministic_from_its_seed(tiny_model_dir, tmp_path):
    from worker.training.tiny import build_tiny_model

    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "cow"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_sound", "parameters": {"type": "object", "properties": {}}}}]
USER, ANSWER = {"role": "user", "content": "What does the cow say?"}, {"role": "assistant", "content": "The cow says moo."}


CALLED = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "moo"}


def test_a_tool_calling_row_is_read_with_its_tools_calls_and_results():
    """OpenAI's tool-calling rows, as its fine-tuning takes them: the tools on the row, an assistant message whose
    answer is a call (content null), the tool's result, the answer from it. The arguments, a JSON text in OpenAI's
    form, become the mapping chat templates render."""
    row = {"tools": TOOLS, "messages": [USER, CALLED, RESULT, ANSWER]}
    [example] = validate_lines(lines(row)).examples
    assert example.tools == tuple(TOOLS)
    called, result = example.messages[1], example.messages[2]
    assert (called.content, called.tool_calls[0].name, called.tool_calls[0].arguments, called.tool_calls[0].id) == (
        "", "get_sound", {"animal": "cow"}, "call_1")
    assert called.for_template()["tool_calls"] == [
        {"type": "function", "function": {"name": "get_sound", "arguments": {"animal": "cow"}}, "id": "call_1"}]
    assert (result.role, result.content, result.tool_call_id) == ("tool", "moo", "call_1")
    # A call may carry text too, arguments may come as a mapping, a call needs no id, a tool may answer nothing.
    row = {"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "function": {"name": "get_sound", "arguments": {"animal": "cow"}}}]},
        {"role": "tool", "content": ""}, ANSWER]}
    [example] = validate_lines(lines(row)).examples
    assert example.messages[1].said() == 'Let me look. get_sound({"animal": "cow"})' and example.messages[2].content == ""


def test_openai_legacy_function_calling_is_read_as_todays_tool_calling():
    """Files made for OpenAI's fine-tuning in 2023 write "functions", an assistant's "function_call" and role
    "function": the same row as tools, tool_calls and role "tool", read and rendered as those."""
    legacy = {"functions": [TOOLS[0]["function"]], "messages": [
        USER, {"role": "assistant", "content": None, "function_call": TOOL_CALL["function"]},
        {"role": "function", "name": "get_sound", "content": "moo"}, ANSWER]}
    [read] = validate_lines(lines(legacy)).examples
    today = {"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": TOOL_CALL["function"]}]}, {"role": "tool", "content": "moo"}, ANSWER]}
    [expected] = validate_lines(lines(today)).examples
    assert read == expected and read.messages[1].tool_calls[0].arguments == {"animal": "cow"}


def call(**function) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {**TOOL_CALL["function"], **function}}]}


@pytest.mark.parametrize(
    ("row", "says"),
    [  # what would teach another answer than the row's, or cannot be rendered, named with the fix
        ({"messages": [USER, CALLED, RESULT, ANSWER]}, "tool_calls[0]: calls 'get_sound', which the row's \"tools\" do not define"),
        ({"tools": TOOLS, "messages": [USER, call(name="bark")]}, "calls 'bark', which the row's \"tools\" do not define"),
        ({"tools": TOOLS, "messages": [USER, call(arguments='{"animal": ')]}, '"arguments": not valid JSON'),
        ({"tools": TOOLS, "messages": [USER, call(arguments="[1, 2]")]}, '"arguments" must be a JSON object'),
        ({"tools": TOOLS, "messages": [USER, call(name="get sound")]}, "must be 1 to 64 letters, digits, _ or -"),
        # The arguments' JSON text is read as the row is: what would break a later reader is refused, not a 500.
        ({"tools": TOOLS, "messages": [USER, call(arguments='{"a": ' * 5000 + "1" + "}" * 5000)]},
         '"arguments": arrays or objects nested too deeply to read'),
        ({"tools": TOOLS, "messages": [USER, call(arguments='{"a": ' * 65 + "1" + "}" * 65)]},
         '"arguments": nested more than 64 levels deep'),
        ({"tools": TOOLS, "messages": [USER, call(arguments='{"animal": "cow", "animal": "dog"}')]},
         "\"arguments\": the key 'animal' appears twice in one object"),
        ({"tools": TOOLS, "messages": [USER, call(arguments='{"animal": "\\ud800"}')]},
         '"arguments": a \\uXXXX escape of half a surrogate pair'),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": json.loads('{"a": ' * 70 + "{}" + "}" * 70)}}],
          "messages": [USER, ANSWER]}, '"tools"[0]: nested more than 64 levels deep'),
        # Numbers JSON cannot write, which Python's reader takes: the template would render NaN or Infinity.
        ({"tools": TOOLS, "messages": [USER, call(arguments='{"weight": NaN}')]}, '"arguments": NaN or an infinite number'),
        ({"tools": TOOLS, "messages": [USER, call(arguments='{"weight": 1e999}')]}, '"arguments": NaN or an infinite number'),
        ({"tools": TOOLS, "messages": [USER, call(arguments={"weight": float("-inf")})]}, "NaN or an infinite number"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"minimum": float("nan")}}}],
          "messages": [USER, ANSWER]}, '"tools"[0]: NaN or an infinite number'),
        ({"tools": TOOLS, "messages": [USER, RESULT, ANSWER]}, "messages[1]: a tool message answers a call"),
        ({"tools": TOOLS, "messages": [USER, CALLED, {**RESULT, "tool_call_id": "call_9"}, ANSWER]},
         "messages[2]: \"tool_call_id\" 'call_9' is not the id of a call of the assistant message before it ('call_1')"),
        ({"tools": TOOLS, "messages": [USER, CALLED, RESULT]}, "the last message is from tool"),
        ({"tools": TOOLS, "messages": [USER, CALLED, {**RESULT, "weight": 0}, ANSWER]},
         "messages[2]: weight is only allowed on assistant messages"),
        ({"tools": TOOLS, "messages": [{**USER, "tool_calls": [TOOL_CALL]}, ANSWER]},
         "messages[0]: \"tool_calls\" are made by assistant messages only"),
        ({"tools": [TOOLS[0], TOOLS[0]], "messages": [USER, ANSWER]}, "\"tools\"[1]: the name 'get_sound' is defined twice"),
        ({"tools": [{"type": "function", "function": {"name": f"f{n}"}} for n in range(129)], "messages": [USER, ANSWER]},
         "\"tools\" holds 129 tools; at most 128"),
        ({"tools": [{"type": "retrieval"}], "messages": [USER, ANSWER]}, "\"tools\"[0]: must be {\"type\": \"function\""),
        ({"tools": {"get_sound": {}}, "messages": [USER, ANSWER]}, "\"tools\" must be a list"),
        # OpenAI's legacy function calling is read as today's form, but not beside it
        ({"functions": [TOOLS[0]["function"]], "tools": TOOLS, "messages": [USER, ANSWER]},
         '"functions" and "tools" both given'),
        ({"tools": TOOLS, "messages": [USER, {**CALLED, "function_call": TOOL_CALL["function"]}, RESULT, ANSWER]},
         'a message gives both "function_call" and "tool_calls"'),
        ({"messages": [USER, {"role": "assistant", "content": None, "function_call": TOOL_CALL["function"]}]},
         "tool_calls[0]: calls 'get_sound', which the row's \"tools\" do not define"),
        # preference rows: tool calling is trained from chat rows
        ({"input": {"messages": [USER], "tools": TOOLS}, "preferred_output": [ANSWER],
          "non_preferred_output": [{"role": "assistant", "content": "woof"}]}, '"tools": tool calling is trained from chat rows'),
        ({"input": {"messages": [USER]}, "preferred_output": [{**ANSWER, "tool_calls": [TOOL_CALL]}],
          "non_preferred_output": [{"role": "assistant", "content": "woof"}]}, '"tool_calls": tool calling is trained from chat rows'),
        ({"prompt": [USER], "chosen": "moo", "rejected": "woof", "tools": TOOLS}, '"tools": tool calling is trained from chat rows'),
        ({"input": {"messages": [USER]}, "preferred_output": [ANSWER], "tools": TOOLS,
          "non_preferred_output": [{"role": "assistant", "content": "woof"}]}, '"tools": tool calling is trained from chat rows'),
        # the other formats: the tools would be dropped, and the completion learned without them
        ({"prompt": "What does the cow say?", "completion": "moo", "tools": TOOLS}, '"tools": tool calling is trained'),
        ({"instruction": "What does the cow say?", "output": "moo", "tools": TOOLS}, '"tools": tool calling is trained'),
        ({"text": "The cow says moo.", "functions": [TOOLS[0]["function"]]}, '"functions": tool calling is trained'),
        ({"input": {"messages": [USER, {"role": "function", "name": "get_sound", "content": "moo"}]},
          "preferred_output": [ANSWER], "non_preferred_output": [{"role": "assistant", "content": "woof"}]},
         "input.messages[1]: role 'function': tool calling is trained from chat rows"),
    ],
)
def test_a_tool_calling_row_that_cannot_be_trained_as_it_says_is_refused_naming_what(row, says):
    with pytest.raises(DataError) as info:
        validate_lines(lines(b"", row))  # the blank line 1 is skipped
    [error] = info.value.errors
    assert error.line == 2 and says in error.message, error


def test_a_row_of_thousands_of_calls_and_results_is_read_whole():
    # Each tool message is checked against the calls it answers: once per message, not a scan of them all
    # (a 4 MB line of 30,000 parallel calls and their results took half a minute). That it is linear is measured
    # as a ratio in bench/tool_rows_bench.py: a time limit here failed on a loaded machine, or passed a slow one.
    calls = [{**TOOL_CALL, "id": f"call_{n}"} for n in range(30_000)]
    row = {"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": None, "tool_calls": calls},
                                        *({**RESULT, "tool_call_id": f"call_{n}"} for n in range(30_000)), ANSWER]}
    [example] = validate_lines(lines(row)).examples
    assert len(example.messages) == 30_003
    row["messages"][-2] = {**RESULT, "tool_call_id": "call_x"}  # an unknown id names a few of the calls, not all
    with pytest.raises(DataError) as info:
        validate_lines(lines(row))
    assert info.value.errors[0].message.endswith("('call_0', 'call_1', 'call_2', 'call_3', 'call_4' and 29995 more)")


def test_empty_tool_fields_change_nothing_and_are_accepted():
    row = {"tools": [], "messages": [USER, {**ANSWER, "tool_calls": [], "function_call": None}]}
    [example] = validate_lines(lines(row)).examples
    assert [m.content for m in example.messages] == [USER["content"], ANSWER["content"]]


def test_content_as_a_list_of_text_parts_is_its_text():
    """OpenAI takes a message's content as parts ([{"type": "text", "text": ...}]): the text parts, joined with a
    newline as vLLM joins them when it serves the model."""
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What does"}, {"type": "text", "text": "the cow say?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "The cow says moo."}]}]}
    pref = {"input": {"messages": [row["messages"][0]]}, "preferred_output": [row["messages"][1]],
            "non_preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "Woof."}]}]}
    [example] = validate_lines(lines(row)).examples
    assert [m.content for m in example.messages] == ["What does\nthe cow say?", "The cow says moo."]
    [pair] = validate_lines(lines(pref)).examples
    assert (pair.messages[0].content, pair.chosen, pair.rejected) == ("What does\nthe cow say?", "The cow says moo.", "Woof.")


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ({"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "x"}}]},
         "messages[0]: content part 1 is of type 'image_url': only text parts are trained"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, 'messages[0]: content part 0: "text" must be a string'),
        ({"role": "user", "content": []}, 'messages[0]: "content" is empty'),
        ({"role": "user", "content": [{"type": "text", "text": " "}]}, 'messages[0]: "content" is empty'),
    ],
)
def test_content_parts_that_are_not_text_are_refused_naming_the_part(message, says):
    with pytest.raises(DataError) as info:
        validate_lines(lines({"messages": [message, ANSWER]}))
    assert says in info.value.errors[0].message, info.value


def test_an_assistant_refusal_without_content_says_to_put_it_in_content():
    row = {"messages": [USER, {"role": "assistant", "content": None, "refusal": "I can't help with that."}]}
    with pytest.raises(DataError, match='line 1: messages\\[1\\]: "refusal" is not trained: put its text in "content"'):
        validate_lines(lines(row))


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    """Notepad and Excel's "UTF-8" save writes one; the file is UTF-8 all the same, read alike on upload and by the trainer."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ROW + b"\r\n" + ROW)
    assert len(read_jsonl(path).examples) == 2
    with pytest.raises(DataError, match="line 2: not valid JSON"):  # only at the start of the file
        validate_lines([ROW, b"\xef\xbb\xbf" + ROW])


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ((ROW + b"\n" + ROW + b"\n").decode().encode("utf-16"), "the file is UTF-16"),
        ((ROW + b"\n" + ROW + b"\n").decode().encode("utf-16-le"), "the file is UTF-16"),
        (gzip.compress(ROW + b"\n" + ROW + b"\n"), "the file is gzip-compressed"),
        (b"PK\x03\x04\x14\x00\x06\x00rest\nmore\n", "the file is a zip archive"),
        (json.dumps([CHAT, CHAT]).encode(), "the file is one JSON array"),
        (json.dumps([CHAT, CHAT], indent=2).encode(), "the file is one JSON array"),
        # Rows written with indent=, or another JSON file (a job spec) given as the dataset: one error, not one a line.
        ((json.dumps(CHAT, indent=2) + "\n" + json.dumps(CHAT, indent=2)).encode(), "the file is pretty-printed JSON"),
        (json.dumps({"base_model": "tiny-demo", "training": {"max_steps": 10}}, indent=2).encode(),
         "the file is pretty-printed JSON"),
    ],
)
def test_a_file_that_is_not_jsonl_at_all_is_one_error_saying_what_it_is(tmp_path, data, says):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert info.value.total == 1 and info.value.errors[0].line == 1, info.value
    assert says in info.value.errors[0].message and "JSONL" in info.value.errors[0].message, info.value


def test_bytes_that_are_not_utf8_say_to_save_as_utf8():
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8 \(byte 6 of the line\): save the file as UTF-8"):
        validate_lines([ROW, b'{"caf\xe9": 1}'])


@pytest.mark.parametrize(
    ("row", "key"),
    [
        # The last "messages" is what Python's json keeps: a row that says two conversations trained on one.
        (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
         b'"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}', "messages"),
        # Inside a message: which of the two answers is learned depends on the reader.
        (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "yes", "content": "no"}]}',
         "content"),
        (b'{"prompt": "q", "completion": "a", "meta": {"id": 1, "id": 2}}', "id"),
    ],
)
def test_a_key_given_twice_in_one_object_is_a_bad_line_naming_the_key(row, key):
    with pytest.raises(DataError) as info:
        validate_lines([ROW, row])
    assert [e.line for e in info.value.errors] == [2], info.value
    assert f"the key '{key}' appears twice in one object" in info.value.errors[0].message, info.value


def test_the_same_key_in_different_objects_of_a_row_is_no_repeat():
    assert len(validate_lines([ROW, ROW]).examples) == 2  # every message has its own "role" and "content"


def test_a_file_whose_lines_end_with_a_lone_cr_says_so(tmp_path):
    """Old Mac line ends: the whole file is one line, and "Extra data (column 147)" said nothing of why."""
    path = tmp_path / "cr.jsonl"
    path.write_bytes(ROW + b"\r" + ROW + b"\r")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert info.value.total == 1 and "lines end with \\r alone" in info.value.errors[0].message, info.value


def test_a_key_with_a_control_character_is_shown_escaped():
    with pytest.raises(DataError) as info:
        validate_lines([b'{"a\\u0000b": 1, "\\u001b[2Jc": 2}'])
    assert "keys: '\\x1b[2Jc', 'a\\x00b'" in info.value.errors[0].message, info.value


def test_rows_that_show_the_same_tools_share_one_copy_of_them():
    """A tool-calling set repeats its tools on every row: kept once, not a copy of the definitions per row."""
    other = [{"type": "function", "function": {"name": "get_sound"}}]
    rows = [{"tools": TOOLS, "messages": [USER, CALLED, RESULT, ANSWER]}] * 3 + [
        {"tools": other, "messages": [USER, ANSWER]}]
    examples = validate_lines(lines(*rows)).examples
    assert examples[0].tools == tuple(TOOLS) and examples[3].tools == tuple(other)
    assert examples[0].tools is examples[1].tools is examples[2].tools and examples[3].tools is not examples[0].tools


def test_a_spare_special_token_pads_where_there_is_no_pad_or_unk(tiny_model_dir):
    """Llama 3 has neither; a spare special token of its vocabulary pads (no row is added to the model), one made
    for padding before one held in reserve, never one the chat template writes."""
    from transformers import AddedToken

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.unk_token = None
    spares = ["<|reserved_special_token_0|>", "<|finetune_right_pad_id|>", "<|pad_written|>"]
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in spares], special_tokens=True)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE + "{{ '<|pad_written|>' }}"
    setup = prepare_tokenizer(tok)
    assert not setup.pad_token_added and tok.pad_token == "<|finetune_right_pad_id|>"
    tok.add_special_tokens({"pad_token": tok.eos_token})
    tok.add_tokens([AddedToken("<|finetune_right_pad_id|>", special=False)])  # already there: no change
    tok.chat_template += "{{ '<|finetune_right_pad_id|>' }}"
    assert prepare_tokenizer(tok).pad_token == "<|reserved_special_token_0|>"
