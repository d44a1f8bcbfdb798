"""The preference format (method dpo): OpenAI's and trl's shapes read to the same rows; bad lines named."""

import json

import pytest

from worker.training.data import DataError, validate_lines


def lines(*rows) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the cow say?"}]
OPENAI = {"input": {"messages": USER}, "preferred_output": [{"role": "assistant", "content": "Moo."}],
          "non_preferred_output": [{"role": "assistant", "content": "Woof."}]}
TRL_MESSAGES = {"prompt": USER, "chosen": [{"role": "assistant", "content": "Moo."}],
                "rejected": [{"role": "assistant", "content": "Woof."}]}
TRL_STRINGS = {"prompt": "What does the cow say?", "chosen": "Moo.", "rejected": "Woof."}


@pytest.mark.parametrize("row", [OPENAI, TRL_MESSAGES, TRL_STRINGS], ids=["openai", "trl-messages", "trl-strings"])
def test_both_shapes_read_as_one_format(row):
    ds = validate_lines(lines(row, row))
    assert ds.format == "preference" and len(ds.examples) == 2
    example = ds.examples[0]
    assert (example.chosen, example.rejected) == ("Moo.", "Woof.")
    assert example.messages[-1].role == "user" and example.messages[-1].content == "What does the cow say?"


def test_openai_and_trl_rows_mix_in_one_file():
    assert validate_lines(lines(OPENAI, TRL_STRINGS)).format == "preference"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({k: v for k, v in OPENAI.items() if k != "non_preferred_output"},
         '"non_preferred_output" is missing'),
        ({"prompt": "hi", "chosen": "a"}, '"rejected" is missing'),
        ({**OPENAI, "non_preferred_output": OPENAI["preferred_output"]}, "are the same"),
        ({**TRL_STRINGS, "rejected": "Moo."}, "are the same"),
        ({**OPENAI, "preferred_output": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
         "must be one assistant message"),
        ({**OPENAI, "preferred_output": [{"role": "user", "content": "a"}]}, "must be assistant"),
        ({**OPENAI, "preferred_output": []}, "must be one assistant message"),
        ({**OPENAI, "preferred_output": [{"role": "assistant", "content": " "}]}, '"content" is empty'),
        ({**OPENAI, "input": "What does the cow say?"}, '"input" must be an object with "messages"'),
        ({**OPENAI, "input": {"messages": [*USER, {"role": "assistant", "content": "x"}]}}, "must end with a user"),
        ({**TRL_STRINGS, "chosen": 3}, '"chosen" must be one assistant message'),
        ({**TRL_STRINGS, "prompt": ""}, '"prompt" is empty'),
        # trl's implicit prompt (each answer the whole conversation): the prompt is missing, not an answer
        ({"chosen": [*USER, {"role": "assistant", "content": "Moo."}],
          "rejected": [*USER, {"role": "assistant", "content": "Woof."}]},
         'needs the conversation its answers reply to: "prompt" is missing'),
        ({k: v for k, v in OPENAI.items() if k != "input"}, 'needs the conversation its answers reply to: "input"'),
        ({**TRL_STRINGS, "prompt": 7}, '"prompt" must be a string or a non-empty list of messages, got a number (7)'),
        ({**OPENAI, "input": {"messages": []}}, '"input.messages" must be a non-empty list of messages, got an empty'),
        # weight 0 would show a chat turn without learning it; a pair's answers are always compared
        ({**OPENAI, "preferred_output": [{"role": "assistant", "content": "Moo.", "weight": 0}]},
         "weight 0 does not apply to a preference answer"),
    ],
)
def test_a_bad_preference_line_is_named(bad, message):
    with pytest.raises(DataError) as info:
        validate_lines(lines(OPENAI, bad, OPENAI))
    assert [e.line for e in info.value.errors] == [2], str(info.value)
    assert message in str(info.value)


def test_a_preference_row_in_a_chat_file_says_which_format_the_file_is():
    chat = {"messages": [*USER, {"role": "assistant", "content": "Moo."}]}
    with pytest.raises(DataError) as info:
        validate_lines(lines(chat, OPENAI))
    assert "line 2: this row is in preference format but the file is chat" in str(info.value)
