"""The fast path of tokenization gives what the plain one gives: the chat template rendered without
apply_chat_template's per-call work, and rows tokenized BATCH_ROWS at a time rather than one by one.
The trainer and the preflight both read these ids and labels, so a difference here would train other tokens
than the preflight reports."""

import json
import random

import jinja2
import pytest
from transformers import AutoTokenizer

from worker.training import tokenization
from worker.training.data import Example, Message, validate_lines
from worker.training.tokenization import (
    IGNORE_INDEX,
    ChatRenderer,
    encode_example,
    encode_preference,
    encoded_pairs,
    encoded_rows,
    prepare_tokenizer,
)

TEMPLATES = {
    "default": None,  # the tiny tokenizer's own: Zephyr-style markers that are special tokens, BOS and EOS
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    # globals and filters transformers gives templates, a system prompt of its own, a refusal by raise_exception
    "strict": "{{ bos_token }}{% set ns = namespace(system=false) %}"
              "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = true %}{% endif %}{% endfor %}"
              "{% if not ns.system %}{{ '<|system|>\nYou answer. ' + ('x' | tojson) + '\n' }}{% endif %}"
              "{% for m in messages %}{% if m['content'] == 'REFUSE' %}{{ raise_exception('no refusing') }}{% endif %}"
              "{{ '<|' + m['role'] + '|>\n' + m['content'] | trim }}"
              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
}
WORDS = ["the", "cow", "says", "moo", "héllo", "日本", "🙂", "</s>", "<|user|>", "\n", "  ", "?", "frog"]


@pytest.fixture(params=list(TEMPLATES))
def tokenizer(request, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if TEMPLATES[request.param] is not None:
        tok.chat_template = TEMPLATES[request.param]
    prepare_tokenizer(tok)
    return tok


def text(rng: random.Random, most: int = 20) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(1, most))).strip() or "moo"


def varied_rows(count: int, seed: int = 0) -> list[dict]:
    """Chat rows (a system prompt or not, one to three exchanges, turns of weight 0), prompt/completion,
    alpaca and text rows, mixed: words that are special tokens, blank lines, accents and emoji."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        kind = rng.choice(["chat", "chat", "chat", "prompt_completion", "alpaca", "text"])
        if kind == "chat":
            messages = [{"role": "system", "content": text(rng)}] if rng.random() < 0.4 else []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": text(rng)})
                messages.append({"role": "assistant", "content": text(rng, 40), "weight": int(rng.random() > 0.2)})
            messages[-1]["weight"] = 1
            rows.append({"messages": messages})
        elif kind == "prompt_completion":
            rows.append({"prompt": text(rng), "completion": text(rng)})
        elif kind == "alpaca":
            rows.append({"instruction": text(rng), "input": text(rng) if rng.random() < 0.5 else "", "output": text(rng)})
        else:
            rows.append({"text": text(rng, 60)})
    return rows


def examples(rows: list[dict]) -> list[Example]:
    """Each row read on its own (a dataset has one format; these are mixed to put them in one batch)."""
    return [validate_lines([json.dumps(row).encode()]).examples[0] for row in rows]


def test_renderer_renders_every_prefix_as_apply_chat_template(tokenizer):
    render = ChatRenderer(tokenizer)
    for row in varied_rows(60):
        messages = [{"role": m["role"], "content": m["content"]} for m in row.get("messages", [])]
        for end in range(1, len(messages) + 1):
            for generation_prompt in (False, True):
                expected = tokenizer.apply_chat_template(messages[:end], tokenize=False,
                                                         add_generation_prompt=generation_prompt)
                assert render(messages[:end], add_generation_prompt=generation_prompt) == expected


def test_a_template_that_refuses_a_conversation_says_why(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TEMPLATES["strict"]
    refused = [{"role": "user", "content": "REFUSE"}]
    with pytest.raises(jinja2.TemplateError, match="no refusing"):
        tok.apply_chat_template(refused, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="no refusing"):
        ChatRenderer(tok)(refused)


def plain_ids(example: Example, tokenizer, max_seq_length: int) -> list[int]:
    """A row's ids the plain way: apply_chat_template, the tokenizer called on that one text, EOS, the cut."""
    if example.text is not None:
        ids = tokenizer(example.text)["input_ids"]
    else:
        messages = [{"role": m.role, "content": m.content} for m in example.messages]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    return (ids if ids[-1:] == [tokenizer.eos_token_id] else [*ids, tokenizer.eos_token_id])[:max_seq_length]


@pytest.mark.parametrize(("max_seq_length", "train_on_inputs"), [(512, False), (512, True), (24, False)])
def test_rows_encoded_in_batches_are_the_rows_encoded_one_by_one(tokenizer, monkeypatch, max_seq_length,
                                                                  train_on_inputs):
    monkeypatch.setattr(tokenization, "BATCH_ROWS", 7)  # several batches, each mixing text rows and conversations
    monkeypatch.setattr(tokenization, "BATCH_CHARS", 400)  # ...and some cut short by their characters
    rows = examples(varied_rows(40, seed=1))
    batched = list(encoded_rows(rows, tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs,
                                pieces=True))
    one_by_one = [encode_example(row, tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs,
                                 pieces=True) for row in rows]
    assert batched == one_by_one
    assert [enc.input_ids for enc in batched] == [plain_ids(row, tokenizer, max_seq_length) for row in rows]
    assert any(enc.truncated for enc in batched) == (max_seq_length == 24)


def test_a_batch_holds_at_most_batch_chars_characters_and_a_longer_row_goes_alone(monkeypatch):
    """The tokenizer's record of a batch takes ~300 bytes a token while it is held: 1,000 rows of a
    megabyte each would have held ~100 GB at once."""
    monkeypatch.setattr(tokenization, "BATCH_CHARS", 100)
    rows = [Example(line=i + 1, text="x" * size) for i, size in enumerate([40, 40, 40, 250, 10, 60, 30])]
    sizes = [[len(row.text or "") for row in batch] for batch in tokenization._batches(rows)]
    assert sizes == [[40, 40], [40], [250], [10, 60, 30]]


def preference_rows(count: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = [Message("system", text(rng))] if rng.random() < 0.3 else []
        for _ in range(rng.randint(0, 2)):  # earlier exchanges: the prompt's, never learned
            prompt += [Message("user", text(rng)), Message("assistant", text(rng))]
        chosen = text(rng, 30)
        rows.append(Example(line=len(rows) + 1, messages=(*prompt, Message("user", text(rng))), chosen=chosen,
                            rejected=chosen + " no" if rng.random() < 0.3 else text(rng, 30)))
    return rows


@pytest.mark.parametrize("max_seq_length", [512, 40])
def test_pairs_encoded_in_batches_are_the_pairs_encoded_one_by_one(tokenizer, monkeypatch, max_seq_length):
    monkeypatch.setattr(tokenization, "BATCH_ROWS", 7)
    monkeypatch.setattr(tokenization, "BATCH_CHARS", 400)
    rows = preference_rows(30)
    batched = list(encoded_pairs(rows, tokenizer, max_seq_length=max_seq_length, pieces=True))
    assert batched == [encode_preference(row, tokenizer, max_seq_length=max_seq_length, pieces=True) for row in rows]


def test_a_preference_prompt_with_earlier_exchanges_learns_only_the_answer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepare_tokenizer(tok)
    prompt = (Message("user", "What does the cow say?"), Message("assistant", "The cow says moo."),
              Message("user", "And the frog?"))
    pair = encode_preference(Example(line=1, messages=prompt, chosen="The frog says croak.", rejected="Moo."), tok,
                             max_seq_length=512)
    rendered_prompt = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in prompt],
                                              tokenize=False, add_generation_prompt=True)
    assert tok.decode(pair.chosen.input_ids[:pair.prompt_length]) == rendered_prompt
    learned = [t for t in pair.chosen.labels if t != IGNORE_INDEX]
    assert tok.decode(learned) == "The frog says croak." + tok.eos_token
