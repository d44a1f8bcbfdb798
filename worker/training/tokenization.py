"""Turning validated examples into token ids and labels: the rules that decide what is learned.

- Conversations are rendered with the tokenizer's chat template; a tokenizer without one gets
  DEFAULT_CHAT_TEMPLATE (below), which is then saved with the adapter and the merged model so
  inference renders prompts exactly as training did.
- Loss is on assistant turns only (their content and end-of-turn), unless train_on_inputs.
- Every row ends with EOS and the EOS is in the labels: a model that never sees EOS as a target
  never learns to stop. Labels are built here, explicitly, so no collator can mask EOS out by
  mistaking it for padding; and the pad token is never EOS anyway (unk is reused, else a spare special token
  the vocabulary has for padding or in reserve, else one is added).
- Rows longer than max_seq_length are truncated from the end and counted; a row left with nothing
  to learn after truncation is dropped and counted.
- Preference rows (method dpo) become two sequences, the prompt followed by each answer, rendered as a
  conversation ending with that answer (so SFT and DPO see the same text) and cut where trl's
  DataCollatorForPreference cuts them (`encode_preference`); each answer, EOS included, is what is learned.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from worker.training.data import Example, Message
from worker.training.spec import excerpt

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

# Used only when the tokenizer has no template of its own. Zephyr-style role markers; BOS once at
# the start; each assistant turn ends with EOS right after its content, so EOS closes what is learned.
# Tools as Hermes' format has them (vLLM's `hermes` tool parser reads the calls back at inference): the
# definitions first, a call as <tool_call>{"name": ..., "arguments": {...}}</tool_call> after the turn's text.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|tools|>\n' }}{% for tool in tools %}{{ (tool | tojson) + '\n' }}{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
DEFAULT_PAD_TOKEN = "<|pad|>"


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used for training."""


@dataclass
class TokenizerSetup:
    chat_template_source: str  # "tokenizer" or "default"
    chat_template_sha256: str
    pad_token: str
    pad_token_added: bool  # the embedding matrix must grow by one row (model.fit_embeddings)


def prepare_tokenizer(tokenizer) -> TokenizerSetup:
    """Give the tokenizer a chat template and a pad token that is not EOS. Mutates it."""
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no EOS token; a fine-tuned model could never learn to stop")
    source = "tokenizer"
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        source = "default"
    added = False
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token  # unk never occurs in byte-level text; safe to reuse
        elif (spare := spare_pad_token(tokenizer)) is not None:
            tokenizer.pad_token = spare
        else:
            tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
            added = True
    tokenizer.padding_side = "right"  # training pads on the right; labels there are IGNORE_INDEX
    digest = hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()
    return TokenizerSetup(source, digest, tokenizer.pad_token, added)


def spare_pad_token(tokenizer) -> str | None:
    """A special token the vocabulary already has for padding, or holds in reserve, that the chat template never
    writes: Llama 3.1's `<|finetune_right_pad_id|>`, Llama 3's `<|reserved_special_token_0|>`. Llama 3 has no pad and
    no unk, and a pad added instead (DEFAULT_PAD_TOKEN) is a row past the base's embeddings: the adapter then
    carries the whole embedding matrix and output head (peft saves them once the vocabulary grew: gigabytes at
    128k tokens), `PeftModel.from_pretrained` onto the base as downloaded fails on their shapes, and the merged
    model's vocabulary is no longer the base's. A padded position is masked from attention and from the loss,
    so which id pads never shows in what is learned. None where there is none: the pad is added."""
    template = tokenizer.chat_template or ""
    written = template if isinstance(template, str) else "\n".join(template.values())  # a tokenizer's named templates
    never_written = [(token.content, i) for i, token in tokenizer.added_tokens_decoder.items()
                     if token.special and i not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
                     and token.content not in written]
    for kind in ("pad", "reserved"):
        named = sorted((i, text) for text, i in never_written if kind in text.lower())
        if named:
            return named[0][1]
    return None


def special_token_texts(tokenizer) -> list[str]:
    """The strings the tokenizer reads as one special token wherever they stand in the text it is given (its
    special added tokens: EOS, the template's role markers, ...), longest first. A message's content rendered
    into the template is tokenized with it, so such a string in the content becomes that control token, not
    text: "</s>" inside an answer is the EOS, learned mid-answer."""
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    texts.update(tokenizer.all_special_tokens)
    return sorted(texts, key=lambda text: (-len(text), text))


def turn_end_token_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with, where it is not the EOS (Gemma's
    <end_of_turn> beside <eos>, Phi-3's <|end|> beside <|endoftext|>, ChatML's <|im_end|> on a Qwen base whose
    EOS is <|endoftext|>), else None. Training learns that token and then the EOS it appends (_ending_with_eos):
    a model told to stop at the EOS alone answers past the end of its turn (Qwen's "\n", then the EOS)."""
    answer = "The answer ends here."
    try:  # a turn that another follows: every template closes it (vLLM's ChatML closes a last turn with nothing)
        text = ChatRenderer(tokenizer)([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer},
                                        {"role": "user", "content": "Hi"}])
    except Exception:  # a template that refuses this conversation names no turn end: the EOS stops alone
        return None
    after = text[text.rfind(answer) + len(answer):].lstrip() if answer in text else ""
    closing = next((special for special in special_token_texts(tokenizer) if after.startswith(special)), None)
    token_id = None if closing is None else tokenizer.convert_tokens_to_ids(closing)
    return None if token_id == tokenizer.eos_token_id else token_id


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length: int = 0  # tokens before truncation
    trained_lost: int = 0  # trained tokens that truncation cut off
    pieces: list[str] = field(default_factory=list)  # each token's text, where asked for (preflight's example)
    trained: int = field(init=False)  # tokens the loss learns (labels not IGNORE_INDEX)

    def __post_init__(self):
        self.trained = len(self.labels) - self.labels.count(IGNORE_INDEX)

    @property
    def eos_learned(self) -> bool:
        """Whether the row's EOS is still in the labels: what teaches the model to stop."""
        return not self.truncated and bool(self.labels) and self.labels[-1] != IGNORE_INDEX  # the last token is EOS

    @property
    def dropped(self) -> bool:
        """Nothing left to learn after truncation: the trainer drops the row."""
        return self.trained == 0

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    """What encoding a dataset kept, cut and dropped, counted once (`count`) for the recipe and the preflight
    alike: a run's summary records the fields up to eos_cut (`as_dict`), the preflight reports them all."""

    rows: int = 0
    truncated_rows: int = 0
    dropped_rows: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    trained_tokens: int = 0
    dropped_lines: list[int] = field(default_factory=list)
    # preference rows only: kept rows whose EOS truncation cut off, per side ({"chosen": n, "rejected": n})
    eos_cut: dict[str, int] | None = None
    tied_rows: int = 0  # preference rows only: of the dropped rows, those whose two sides are the same tokens
    # the preflight's alone
    trained_tokens_lost: int = 0  # trained tokens truncation cut off
    rows_without_eos: int = 0  # kept rows whose EOS is not in the labels (cut off, or an unlearned last turn)
    lengths: list[int] = field(default_factory=list)  # tokens per row before truncation (a pair's: its longer side)
    kept_lengths: list[int] = field(default_factory=list)  # tokens per kept row after truncation: what packing packs

    @classmethod
    def for_pairs(cls) -> EncodeStats:
        return cls(eos_cut={"chosen": 0, "rejected": 0})

    def count(self, line: int, row: Encoded | EncodedPair) -> bool:
        """Count one encoded row (a preference row: its pair); whether it is kept (it has something to learn)."""
        self.rows += 1
        self.lengths.append(row.length)
        self.truncated_rows += row.truncated
        self.trained_tokens_lost += row.trained_lost
        if row.dropped:
            self.dropped_rows += 1
            self.dropped_lines.append(line)
            self.tied_rows += isinstance(row, EncodedPair) and row.tied
            return False
        self.tokens += row.tokens
        self.kept_lengths.append(row.tokens)
        self.trained_tokens += row.trained
        self.rows_without_eos += not row.eos_learned
        if isinstance(row, EncodedPair):
            assert self.eos_cut is not None, "pairs are counted into EncodeStats.for_pairs()"
            # A kept side ends with its learned EOS unless truncation cut it off.
            self.eos_cut["chosen"] += not row.chosen.eos_learned
            self.eos_cut["rejected"] += not row.rejected.eos_learned
        return True

    def as_dict(self) -> dict:
        """What a run's summary records."""
        d = {"rows": self.rows, "truncated_rows": self.truncated_rows, "dropped_rows": self.dropped_rows,
             "tokens": self.tokens, "trained_tokens": self.trained_tokens, "dropped_lines": self.dropped_lines[:20]}
        if self.eos_cut is not None:
            d["eos_cut"] = self.eos_cut
            d["tied_rows"] = self.tied_rows
        return d


BATCH_ROWS = 1_000  # rows rendered and tokenized together: one tokenizer call's overhead spread over many rows
# ...and at most this many characters: a token's ids, offsets and the tokenizer's own record of it take
# ~300 bytes while its batch is held, so 1,000 rows of a megabyte each would hold ~100 GB at once.
BATCH_CHARS = 2_000_000


def _batches(examples: Sequence[Example]) -> Iterator[list[Example]]:
    """The rows in order, in batches of at most BATCH_ROWS rows and BATCH_CHARS characters (a longer row alone)."""
    batch: list[Example] = []
    chars = 0
    for example in examples:
        size = example.chars()
        if batch and (len(batch) == BATCH_ROWS or chars + size > BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(example)
        chars += size
    if batch:
        yield batch


class ChatRenderer:
    """The tokenizer's chat template, compiled once, rendering a conversation as apply_chat_template renders it.

    Locating the assistant turns takes several renders per row. Most of an apply_chat_template call is work
    these rows never need (looking the template up, copying each message into plain JSON types, rebuilding the
    special-token map), and most of a jinja render is merging the template's globals into the variables. Our
    messages are plain strings already, so running the template on the variables apply_chat_template gives it
    (the special tokens; a row's tools, documents unset), merged with the globals once, gives the same text in a
    tenth of the time; tests/training/test_tokenization.py holds the two equal."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    @functools.cached_property
    def _template(self):
        # Compiled at the first render: text rows need no template. transformers' own compile (private, so
        # pyproject pins transformers), cached per template: the sandboxed environment and globals
        # (raise_exception, tojson, ...) that apply_chat_template renders with.
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(self._tokenizer.get_chat_template())

    @functools.cached_property
    def _variables(self) -> dict:
        return {**self._template.globals, **self._tokenizer.special_tokens_map, "tools": None, "documents": None}

    @functools.cached_property
    def special_texts(self) -> list[str]:
        return special_token_texts(self._tokenizer)

    def __call__(self, messages: list[dict], *, add_generation_prompt: bool = False,
                 tools: list[dict] | None = None) -> str:
        # What Template.render does, on variables that already hold the globals (shared=True: none merged in again)
        context = self._template.new_context(
            {**self._variables, "messages": messages, "add_generation_prompt": add_generation_prompt, "tools": tools},
            shared=True)
        return "".join(self._template.root_render_func(context))

    @functools.cached_property
    def _refusals(self) -> tuple[type[Exception], ...]:
        from jinja2 import TemplateError as JinjaError  # loaded with the template, as transformers loads it

        return JinjaError, TypeError, ValueError, LookupError, AttributeError

    def row(self, example: Example, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The render of a row's messages; TemplateError naming the row's line where the template refuses
        them: its own raise_exception (Gemma's "System role not supported", Llama 2's and Mistral's
        alternation), or an error of a template that did not expect such a row."""
        try:
            return self(messages, add_generation_prompt=add_generation_prompt, tools=example.template_tools())
        except self._refusals as exc:
            raise TemplateError(
                f"line {example.line}: the model's chat template refuses this conversation: {excerpt(str(exc), quote=False)}; "
                "its rules hold for every row (a template without a system role takes the system text at the start "
                "of the first user message; one that needs alternating turns takes one message per role in turn)"
                + ("; a row that calls tools needs a model whose template knows tool calling (its tool messages, "
                   "its calls)" if example.tools else "")
            ) from None


def encode_example(example: Example, tokenizer, *, max_seq_length: int, train_on_inputs: bool,
                   pieces: bool = False) -> Encoded:
    """The row as the trainer sees it: token ids, labels (IGNORE_INDEX where nothing is learned),
    truncated to max_seq_length. With `pieces`, also each token's text (preflight's example)."""
    return next(encoded_rows([example], tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs,
                             pieces=pieces))


def encoded_rows(examples: Sequence[Example], tokenizer, *, max_seq_length: int, train_on_inputs: bool,
                 pieces: bool = False) -> Iterator[Encoded]:
    """encode_example for each row, in order, a batch of rows to a tokenizer call (_batches; a call per row
    adds about a quarter to the tokenizing itself)."""
    render = ChatRenderer(tokenizer)
    for batch in _batches(examples):
        # A text row is learned whole and gets the tokenizer's BOS; a conversation gets its BOS from the template.
        rendered = [(example.text, None) if example.text is not None
                    else render_conversation(example, render, train_on_inputs=train_on_inputs)
                    for example in batch]
        tokenized = _tokenize(tokenizer, [text for text, _ in rendered], [spans is None for _, spans in rendered])
        for (text, spans), (ids, offsets) in zip(rendered, tokenized, strict=True):
            trained = [True] * len(ids) if spans is None else learned_tokens(offsets, spans)
            ids, shown = _ending_with_eos(ids, offsets, text, _pieces(tokenizer, text, ids, offsets) if pieces else None,
                                          tokenizer)
            # An appended EOS is learned when the turn it closes is.
            trained = trained[:len(ids)]
            trained += [bool(trained and trained[-1])] * (len(ids) - len(trained))
            yield _labelled(ids, trained, shown, max_seq_length=max_seq_length)


def _tokenize(tokenizer, texts: list[str], add_special_tokens: list[bool]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Each text's token ids and character offsets, as tokenizer(text, add_special_tokens=...) gives them,
    in one tokenizer call per add_special_tokens setting."""
    tokenized: list = [None] * len(texts)
    for setting in (False, True):
        at = [i for i, wanted in enumerate(add_special_tokens) if wanted == setting]
        if at:
            enc = tokenizer([texts[i] for i in at], add_special_tokens=setting, return_offsets_mapping=True,
                            return_attention_mask=False)  # all ones without padding: a list per row for nothing
            for i, ids, offsets in zip(at, enc["input_ids"], enc["offset_mapping"], strict=True):
                tokenized[i] = (ids, offsets)
    return tokenized


def _ending_with_eos(ids: list[int], offsets: list[tuple[int, int]], text: str, shown: list[str] | None,
                     tokenizer) -> tuple[list[int], list[str] | None]:
    """The row's ids (and pieces, where shown) ending with EOS: as they are where the text ends with it; cut
    after it where only spacing follows it (ChatML's "<|im_end|>\\n" where EOS is <|im_end|>: another EOS
    after the newline would teach the model to stop twice, the newline between); else with EOS appended."""
    eos = tokenizer.eos_token_id
    end = len(ids)
    while end and ids[end - 1] != eos and offsets[end - 1][1] > offsets[end - 1][0] \
            and not text[offsets[end - 1][0]:offsets[end - 1][1]].strip():
        end -= 1
    if end and ids[end - 1] == eos:
        return ids[:end], None if shown is None else shown[:end]
    return [*ids, eos], None if shown is None else [*shown, tokenizer.eos_token]


def _labelled(ids: list[int], trained: list[bool], shown: list[str] | None, *, max_seq_length: int) -> Encoded:
    """The row with its labels (IGNORE_INDEX where nothing is learned), cut at max_seq_length from the end,
    and what the cut cost."""
    labels = [t if learn else IGNORE_INDEX for t, learn in zip(ids, trained, strict=True)]
    length, before = len(ids), trained.count(True)
    shown = shown or []
    truncated = length > max_seq_length
    if truncated:
        ids, labels, shown = ids[:max_seq_length], labels[:max_seq_length], shown[:max_seq_length]
    encoded = Encoded(ids, labels, truncated, length=length, pieces=shown)
    encoded.trained_lost = before - encoded.trained
    return encoded


def learned_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens are learned: those that begin inside a learned character span (and span a
    character). Token starts only grow, so each span's tokens are one slice, found by bisection: a
    row costs a few lookups, not a Python step per token (preflight reads 10,000 rows in seconds)."""
    starts = [start for start, _ in offsets]
    trained = [False] * len(offsets)
    for span_start, span_end in spans:
        first, end = bisect.bisect_left(starts, span_start), bisect.bisect_left(starts, span_end)
        trained[first:end] = [tok_end > tok_start for tok_start, tok_end in offsets[first:end]]
    return trained


def _pieces(tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[str]:
    """Each token's text as the rendered row has it (special tokens, which span no characters, by name). A
    character split over several byte-level tokens is shown once, with the first of them: each has the
    whole character's offsets."""
    pieces, previous = [], (-1, -1)
    for token, (start, end) in zip(ids, offsets, strict=True):
        if end <= start:
            pieces.append(tokenizer.convert_ids_to_tokens(token))
        else:
            pieces.append("" if (start, end) == previous else text[start:end])
        previous = (start, end)
    return pieces


def render_conversation(example: Example, render: ChatRenderer, *,
                        train_on_inputs: bool) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; return the text and the (start, end) character spans to learn: each
    assistant turn of weight 1 or, with train_on_inputs, everything but the assistant turns of weight 0.

    An assistant turn's span runs from the end of the generation prompt that precedes it (e.g.
    "<|assistant|>\\n": what the model is given at inference) to the end of the turn as the template
    closes it: through the conversation rendered up to that turn where the template renders that as a
    prefix of the whole (most do), else through the turn's content as it stands in the whole (Qwen 3
    gives only the last turn an empty thinking block, Phi-3.5 closes a conversation with EOS). Either
    way the turn ends with the special token that closes it, where the template writes one only when
    another message follows (a `loop.last` case): that token is what teaches the model to stop.

    Refused with TemplateError naming the line: a conversation the template refuses, one whose render
    leaves out or rewrites a message's text (the model would learn something else than the row says),
    and one whose generation prompt is not where the turn starts in the whole render.
    """
    messages = [m.for_template() for m in example.messages]
    full = render.row(example, messages)
    check_every_message_rendered(example, full)
    if example.tools:
        _check_tools_change_the_render(example, render, messages, full)
    spans = []
    for i, m in enumerate(example.messages):
        # The turns to learn; with train_on_inputs, the turns not to learn (weight 0), cut out of the whole render.
        if m.role != "assistant" or m.weight == (1 if train_on_inputs else 0):
            continue
        prompt = render.row(example, messages[:i], add_generation_prompt=True)
        if not full.startswith(prompt):
            # Where the turn is the row's last, the template itself opens an answer otherwise at inference than
            # in a conversation (DeepSeek-R1's distilled models' writes a newline after <｜Assistant｜> in the
            # prompt alone): no answer is told from its prompt, and the advice for a turn in the middle would be wrong.
            remedy = ("this template opens an assistant turn otherwise in the prompt at inference than in a "
                      "conversation, so no answer can be told from its prompt: set training.train_on_inputs (the "
                      "prompts are learned too), or an admin registers the model with a tokenizer whose chat "
                      "template opens both alike" if i == len(messages) - 1
                      else "a row with one assistant turn at its end avoids this")
            raise TemplateError(
                f"line {example.line}: the model's chat template renders the conversation before assistant message "
                f"{i + 1} one way on its own, as the prompt at inference, and another way inside the whole "
                f"conversation ({_first_difference(prompt, full)}), so that turn cannot be told from its prompt "
                f"for the loss mask; {remedy}"
            )
        start = len(prompt)
        # The last turn's prefix is the whole conversation, rendered already.
        upto = full if i == len(messages) - 1 else render.row(example, messages[: i + 1])
        if full.startswith(upto) and len(upto) > start:
            end = len(upto)
        else:
            content = m.content.strip()
            found = full.find(content, start) if content else start
            # A call is formatted by the template, not found as the row's text: its turn as rendered last is.
            end = _call_turn_end(full, upto, prompt, m) if m.tool_calls else None if found < 0 else found + len(content)
            if end is None:
                raise TemplateError(f"line {example.line}: assistant message {i + 1} cannot be located in the "
                                    "conversation as the model's chat template renders it, for the loss mask")
        spans.append((start, _closed_turn(full, start, end, render.special_texts)))
    if train_on_inputs:
        return full, _outside(spans, len(full))
    return full, spans


def _call_turn_end(full: str, upto: str, prompt: str, m: Message) -> int | None:
    """Where an assistant turn that calls tools ends in the whole render, where the conversation rendered up to
    it is not a prefix of the whole (Qwen 3 opens a last assistant turn with an empty thinking block): the end
    of the longest tail of the turn, as rendered last, that the whole holds right at the turn's start. None where
    that tail is not the calls (all of them, and the turn's text, between the turn's start and that end).

    Anchored at the turn's start: the same tail found further on is another turn (a call repeated after a tool's
    error, as agents do), and a span to it would teach the tool's result between the two."""
    if not upto.startswith(prompt):
        return None
    turn, start = upto[len(prompt):], len(prompt)
    anchor = full[start:start + 8]  # the whole's turn opens the tail: only where the turn holds these is one to try
    at, tries = turn.find(anchor) if anchor else -1, 0
    while 0 <= at and tries < _TAIL_TRIES and not full.startswith(turn[at:], start):
        at, tries = turn.find(anchor, at + 1), tries + 1
    if at < 0 or tries == _TAIL_TRIES:
        return None
    tail = turn[at:]
    if m.tool_calls[-1].name not in tail:
        return None
    end = start + len(tail)
    held = full[start:end]
    return end if all(c.name in held for c in m.tool_calls) and m.content.strip() in held else None


# How many places in a turn _call_turn_end tries before it gives up: the extra a template writes before a last
# turn (Qwen 3's empty thinking block) is a few characters, and each try compares the rest of the turn.
_TAIL_TRIES = 1000


def _outside(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The spans of [0, length) that the given spans (in order, apart) leave."""
    edges = [0, *(edge for span in spans for edge in span), length]
    return [(start, end) for start, end in zip(edges[::2], edges[1::2], strict=True) if end > start]


_SPACES = re.compile(r"\s+")


def check_every_message_rendered(example: Example, full: str) -> None:
    """TemplateError naming the first message whose text the rendered conversation does not hold, in order.
    Spacing aside (templates trim content, and Qwen 3 re-spaces a thinking block): what a template leaves out
    is lost silently otherwise. DeepSeek-R1's distilled models drop every `<think>` block from assistant
    turns, Qwen 3 those of all but the last turn, the first Phi-3-mini template every system message."""
    _check_tools_rendered(example, full)
    at = 0
    for m in example.messages:  # most templates keep each text as it is, at most trimmed: found as it stands
        found, content = _found_as_written(full, m, at, str.strip)
        if found < 0:
            break
        at = found + len(content)
    else:
        return
    rendered = _SPACES.sub("", full)
    at = 0
    for n, m in enumerate(example.messages, 1):
        found, content = _found_as_written(rendered, m, at, lambda text: _SPACES.sub("", text))
        if not content:
            continue
        if found < 0:
            raise TemplateError(
                f"line {example.line}: the model's chat template leaves out or rewrites part of message {n} "
                f"({m.role}: {excerpt(m.content)}), so the model would "
                + ("learn another answer than the row's; a reasoning model's template may keep `<think>` blocks in "
                   "the last assistant turn only: one row per assistant turn keeps them all"
                   if m.role == "assistant" else
                   "train without it; this template shows a system message only where a conversation ends with a "
                   "user turn, or never: put its text at the start of the first user message"
                   if m.role == "system" else "train without it")
            )
        at = found + len(content)


def _found_as_written(rendered: str, m: Message, at: int, spaced: Callable[[str], str]) -> tuple[int, str]:
    """Where `rendered` holds the message's text from `at` on (-1 where not), and the text found: as it stands, or
    a tool's result as a JSON string (Llama 3.1 renders a tool message's content with tojson, quotes and newlines
    escaped, as it does when it serves the model), each as `spaced` writes it."""
    content = spaced(m.content)
    found = rendered.find(content, at)
    if found < 0 and m.role == "tool":
        quoted = spaced(json.dumps(m.content, ensure_ascii=False))  # transformers' tojson
        if (written := rendered.find(quoted, at)) >= 0:
            return written, quoted
    return found, content


def _check_tools_rendered(example: Example, full: str) -> None:
    """TemplateError where the render leaves out a tool the row defines or a call it makes (a tool's name, a
    call's name or the names of its arguments): a template that knows no tools renders the conversation
    without them, and the model would learn to answer without the tools, or the call's turn as an empty one."""
    for tool in example.tools:
        name = tool["function"]["name"]
        if name not in full:
            raise TemplateError(f"line {example.line}: the model's chat template does not render the row's tools "
                                f"({excerpt(name)} is not in the conversation it renders): this model's template knows "
                                "no tool calling, and the model would learn to answer without the tools it was shown")
    for n, m in enumerate(example.messages, 1):
        for call in m.tool_calls:
            missing = next((word for word in (call.name, *call.arguments) if word not in full), None)
            if missing is not None:
                raise TemplateError(f"line {example.line}: the model's chat template leaves out the call to "
                                    f"{excerpt(call.name)} of message {n} ({excerpt(missing)} is not in the "
                                    "conversation it renders), so the model would learn another answer than the row's")


def _check_tools_change_the_render(example: Example, render: ChatRenderer, messages: list[dict], full: str) -> None:
    """TemplateError where the conversation renders the same without the row's tools, or without its calls: the
    template knows no tools (or no calls), though their names are in the render (_check_tools_rendered), written
    by the row's own text ("What is the weather in the city?" holds a call weather(city=...)), or the template's."""
    def renders(example: Example, messages: list[dict]) -> str | None:
        try:
            return render.row(example, messages)
        except TemplateError:  # refused without them: the template reads them
            return None

    if renders(replace(example, tools=()), messages) == full:
        raise TemplateError(f"line {example.line}: the model's chat template does not render the row's tools (the "
                            "conversation renders the same without them): this model's template knows no tool calling, "
                            "and the model would learn to answer without the tools it was shown")
    if any(m.tool_calls for m in example.messages) and \
            renders(example, [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]) == full:
        raise TemplateError(f"line {example.line}: the model's chat template leaves out the row's calls (the "
                            "conversation renders the same without them), so the model would learn another answer "
                            "than the row's: an empty one, or its text without the call")


def _first_difference(a: str, b: str) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at character {at}: {excerpt(a[at:at + 40])} against {excerpt(b[at:at + 40])}"


def _closed_turn(full: str, start: int, end: int, special_texts: Sequence[str]) -> int:
    """The end of a turn's span, past the special token right after it where the span does not end with
    one (spacing aside): vLLM's ChatML template, for one, writes `<|im_end|>` after an assistant turn
    only when another message follows, so the span up to that turn as the last stops short of it."""
    closed = full[start:end].rstrip()
    if any(closed.endswith(text) for text in special_texts):
        return end
    return end + next((len(text) for text in special_texts if full.startswith(text, end)), 0)


def template_refusals(examples: Sequence[Example], tokenizer, *, preference: bool,
                      train_on_inputs: bool = False) -> list[tuple[int, str]]:
    """Each row the chat template cannot train on, as (line, why): what encoding it raises TemplateError for
    (the encoders stop at the first; the preflight lists them all). Renders only, tokenizes nothing."""
    render = ChatRenderer(tokenizer)
    refused = []
    for example in examples:
        if example.text is not None:
            continue
        try:
            if preference:
                _render_pair(example, render)
            else:
                render_conversation(example, render, train_on_inputs=train_on_inputs)
        except TemplateError as exc:
            refused.append((example.line, str(exc)))
    return refused


def encode_examples(
    examples: Sequence[Example], tokenizer, *, max_seq_length: int, train_on_inputs: bool
) -> tuple[list[dict], EncodeStats]:
    stats = EncodeStats()
    return list(kept_rows(examples, tokenizer, stats, max_seq_length=max_seq_length,
                          train_on_inputs=train_on_inputs)), stats


def kept_rows(examples: Sequence[Example], tokenizer, stats: EncodeStats, *, max_seq_length: int,
              train_on_inputs: bool) -> Iterator[dict]:
    """encode_examples' rows one at a time, each counted into `stats` as it goes: the recipe stores them a batch
    at a time as Arrow columns (rows.rows_dataset) rather than holding them all as Python lists."""
    encoded = encoded_rows(examples, tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs)
    for example, enc in zip(examples, encoded, strict=True):
        if stats.count(example.line, enc):
            yield {"input_ids": enc.input_ids, "labels": enc.labels}


@dataclass
class EncodedPair:
    """A preference row as trl's DPO trainer sees it: the prompt, then each answer (its completion).

    `chosen` and `rejected` are the two whole sequences (prompt + answer, as truncated) with labels on the
    answer's tokens only: what the DPO loss sums log-probabilities over, and the SFT-style view of each side
    (preflight's example, the report's loss rows, the merge's fidelity rows)."""

    prompt_length: int  # the tokens both sequences share as the prompt (never cut: a cut prompt drops the row)
    chosen: Encoded
    rejected: Encoded

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def tied(self) -> bool:
        """Both sides are the same tokens within max_seq_length: answers that differ only past the cut, or only in
        spacing the chat template trims. The policy and the reference score such a pair alike on both sides, so its
        loss is constant (log 2) with no gradient, and it counts as a pair lost in reward_accuracy: a silent weight
        on every number the run reports."""
        return bool(self.chosen.trained and self.rejected.trained) and self.chosen.input_ids == self.rejected.input_ids

    @property
    def dropped(self) -> bool:
        """Nothing left to compare: a side has no answer token within max_seq_length (the prompt fills it), or the
        two sides are the same there (`tied`)."""
        return self.chosen.trained == 0 or self.rejected.trained == 0 or self.tied

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @property
    def trained(self) -> int:
        return self.chosen.trained + self.rejected.trained

    @property
    def length(self) -> int:
        """The longer sequence's tokens before truncation: what must fit in max_seq_length."""
        return max(self.chosen.length, self.rejected.length)

    @property
    def trained_lost(self) -> int:
        return self.chosen.trained_lost + self.rejected.trained_lost

    @property
    def eos_learned(self) -> bool:
        return self.chosen.eos_learned and self.rejected.eos_learned

    def row(self) -> dict:
        """The row DataCollatorForPreference takes."""
        p = self.prompt_length
        return {"prompt_ids": self.chosen.input_ids[:p], "chosen_ids": self.chosen.input_ids[p:],
                "rejected_ids": self.rejected.input_ids[p:]}


def encode_preference(example: Example, tokenizer, *, max_seq_length: int, pieces: bool = False) -> EncodedPair:
    """The two sequences of a preference row, exactly as trl's DPO trainer tokenizes and truncates them.

    The prompt is the conversation rendered with the chat template and the generation prompt, as
    `render_conversation` renders it for SFT; each answer is the whole conversation with that answer as
    its last assistant turn (ending with EOS, appended where the template does not), and its completion
    starts where the prompt's tokens and the conversation's diverge (trl's split: a token that merges
    across the boundary belongs to the completion). Then DataCollatorForPreference's truncation with
    truncation_mode "keep_start": each prompt+answer is cut at max_seq_length, from the end."""
    return next(encoded_pairs([example], tokenizer, max_seq_length=max_seq_length, pieces=pieces))


def encoded_pairs(examples: Sequence[Example], tokenizer, *, max_seq_length: int,
                  pieces: bool = False) -> Iterator[EncodedPair]:
    """encode_preference for each row, in order, a batch of rows to a tokenizer call (_batches)."""
    render = ChatRenderer(tokenizer)
    for batch in _batches(examples):
        rendered = [_render_pair(example, render) for example in batch]
        texts = [text for pair in rendered for text in pair]
        tokenized = _tokenize(tokenizer, texts, [False] * len(texts))
        for row, (_, *answer_texts) in enumerate(rendered):
            (prompt_ids, _), *answers = tokenized[3 * row:3 * row + 3]
            sides = [_ending_with_eos(ids, offsets, text, _pieces(tokenizer, text, ids, offsets) if pieces else None,
                                      tokenizer)
                     for text, (ids, offsets) in zip(answer_texts, answers, strict=True)]
            prompt_length = min(_common_prefix(prompt_ids, ids) for ids, _ in sides)
            chosen, rejected = (_completion(ids, shown, prompt_length, max_seq_length) for ids, shown in sides)
            yield EncodedPair(prompt_length, chosen, rejected)


def _render_pair(example: Example, render: ChatRenderer) -> tuple[str, str, str]:
    """The prompt (ending with the generation prompt), then the conversation ending with each answer, rendered."""
    if example.chosen is None or example.rejected is None:
        raise TemplateError(f"line {example.line}: not a preference row (method dpo needs a prompt and two answers)")
    (chosen, spans), (rejected, _) = (
        render_conversation(Example(line=example.line, messages=(*example.messages, Message("assistant", answer))),
                            render, train_on_inputs=False)
        for answer in (example.chosen, example.rejected))
    # The answer is the last assistant turn (any before it are the prompt's). render_conversation has checked that
    # each render starts with the prompt and the generation prompt, so the prompt is the same text before either answer.
    return chosen[:spans[-1][0]], chosen, rejected


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _completion(ids: list[int], shown: list[str] | None, prompt_length: int, max_seq_length: int) -> Encoded:
    """One side: labels on the completion, cut at max_seq_length as the collator cuts it (keep_start)."""
    return _labelled(ids, [False] * prompt_length + [True] * (len(ids) - prompt_length), shown,
                     max_seq_length=max_seq_length)


def encode_preferences(examples: Sequence[Example], tokenizer, *, max_seq_length: int) -> tuple[list[dict], EncodeStats]:
    """encode_examples for preference rows: the rows DataCollatorForPreference takes, and what was cut or dropped."""
    stats = EncodeStats.for_pairs()
    return list(kept_pairs(examples, tokenizer, stats, max_seq_length=max_seq_length)), stats


def kept_pairs(examples: Sequence[Example], tokenizer, stats: EncodeStats, *, max_seq_length: int) -> Iterator[dict]:
    """encode_preferences' rows one at a time, each counted into `stats` (EncodeStats.for_pairs) as it goes."""
    for example, pair in zip(examples, encoded_pairs(examples, tokenizer, max_seq_length=max_seq_length), strict=True):
        if stats.count(example.line, pair):
            yield pair.row()


def trained_targets(row: dict) -> int:
    """The tokens an encoded row's loss averages over: labels past the first (each is predicted from the ones before),
    what the eval report's loss and the merge's fidelity weigh each row by."""
    return sum(label != IGNORE_INDEX for label in row["labels"][1:])


def preferred_rows(rows: list[dict]) -> list[dict]:
    """Preference rows as SFT rows of the prompt and the preferred answer (input_ids, labels on the answer):
    what the merge's fidelity check and the report's loss read."""
    return [{"input_ids": r["prompt_ids"] + r["chosen_ids"],
             "labels": [IGNORE_INDEX] * len(r["prompt_ids"]) + r["chosen_ids"]} for r in rows]
