"""Preflight: what a job will train on, before any GPU time, with the base model's own tokenizer.

    report = preflight(spec, tokenizer_dir, "train.jsonl", validation_path=None, examples=1)

Every number comes from the functions the trainer uses (data.read_jsonl, tokenization.prepare_tokenizer,
encoded_rows and EncodeStats.count, which encode_examples runs), so the rows, truncated rows, trained
tokens and steps here are the ones the run reports (tests/training/test_preflight.py holds them equal).
Needs a tokenizer, never the weights: the service runs it in a child of the API process
(app/jobs/preflight.py) with the tokenizer files its registry keeps.

A DPO spec (method dpo) on a preference dataset gives the same report from encoded_pairs: a row is a
pair, its length the longer of its two sequences, its trained tokens both answers', and it keeps its EOS
when both sides do (`rows_without_eos_by_side` counts each); the example shows the preferred side.
"""

from __future__ import annotations

import bisect
import gc
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from worker.training.data import DataError, Example, read_jsonl
from worker.training.spec import METHOD_FORMATS, JobSpec, agreeing, counted
from worker.training.tokenization import (
    Encoded,
    EncodedPair,
    EncodeStats,
    TemplateError,
    encode_example,
    encode_preference,
    encoded_pairs,
    encoded_rows,
    prepare_tokenizer,
    special_token_texts,
    template_refusals,
)

MAX_ROWS = 50_000  # rows a preflight reads: past this it reports on the first 50,000 and says so
MAX_EXAMPLES = 5  # rows shown token by token
EXAMPLE_TOKENS = 4096  # of each row shown
TRUNCATED_WARNING = 0.10  # a tenth of the rows cut short is worth a word before spending GPU hours
# Rows repeating an earlier one: a few are usual in scraped data; a hundredth is a pipeline that duplicated
DUPLICATE_WARNING = 0.01
LINES_SHOWN = 20  # line numbers a report lists (dropped rows, rows with special tokens)


@dataclass
class SetReport:
    """One dataset (train or validation), as the trainer will see it."""

    rows: int = 0  # rows read (at most MAX_ROWS)
    rows_in_file: int = 0
    truncated_rows: int = 0
    dropped_rows: int = 0  # nothing left to learn after truncation: the trainer drops them
    dropped_lines: list[int] = field(default_factory=list)
    tokens: int = 0  # after truncation, of the rows kept: what the trainer reports
    trained_tokens: int = 0
    trained_tokens_lost: int = 0  # trained tokens truncation cut off
    rows_without_eos: int = 0  # kept rows whose EOS is not in the labels (cut off, or an unlearned last turn)
    lengths: dict = field(default_factory=dict)  # tokens per row before truncation: min, median, p95, max
    # method dpo: kept rows whose chosen / rejected side lost its EOS ({"chosen": n, "rejected": n}); None for sft
    rows_without_eos_by_side: dict | None = None
    # method dpo: of the dropped rows, those whose two answers are the same tokens within max_seq_length (None for sft)
    tied_rows: int | None = None
    # conversation rows with a special token's text in a message (tokenized as that token, not as text): how many,
    # their first lines, each token's text with the rows it is in, and the rows where it is in a learned answer
    rows_with_special_tokens: int = 0
    special_token_lines: list[int] = field(default_factory=list)
    special_tokens_found: dict[str, int] = field(default_factory=dict)
    rows_with_special_tokens_in_answers: int = 0
    # rows that say what an earlier row of the same set says, up to case and spacing (each [line, the earlier
    # line], the first few)
    duplicate_rows: int = 0
    duplicate_lines: list[list[int]] = field(default_factory=list)
    # method dpo: pairs that say the opposite of an earlier pair of the set, the same prompt with the two answers
    # swapped (each [line, the earlier line], the first few): the two pull against each other and teach nothing
    contradicting_rows: int | None = None
    contradicting_lines: list[list[int]] = field(default_factory=list)
    # validation only: rows a train row says too (each [line, the train line], the first few), and rows that ask
    # what a train row asks with another answer (the eval report prompts with what they ask)
    rows_in_train: int | None = None
    rows_in_train_lines: list[list[int]] = field(default_factory=list)
    prompts_in_train: int | None = None
    prompts_in_train_lines: list[list[int]] = field(default_factory=list)
    # rows the model's chat template refuses, or would train on other than they say (the first lines, and why
    # for the first): training stops at the first of them, so the preflight refuses the job
    template_refused_rows: int = 0
    template_refused_lines: list[int] = field(default_factory=list)
    template_refusal: str | None = None
    # a dataset stored `ready` that the trainer, reading it with today's rules, refuses: its first bad line, and how
    # many there are (an upload is checked as it arrives; the rules it was checked by may have been tightened since)
    invalid: str | None = None
    invalid_lines: int = 0
    format: str = ""  # the dataset's format, as read
    kept_lengths: list[int] = field(default_factory=list)  # tokens of each kept row, for the packed steps (not shown)

    @property
    def kept_rows(self) -> int:
        return self.rows - self.dropped_rows

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("format", "kept_lengths")}
        if self.rows_without_eos_by_side is None:  # an sft set
            del out["rows_without_eos_by_side"], out["tied_rows"], out["contradicting_rows"], out["contradicting_lines"]
        if self.rows_in_train is None:  # the train set itself
            del out["rows_in_train"], out["rows_in_train_lines"], out["prompts_in_train"], out["prompts_in_train_lines"]
        out["dropped_lines"] = self.dropped_lines[:LINES_SHOWN]
        out["kept_rows"] = self.kept_rows
        out["trained_fraction"] = round(self.trained_tokens / self.tokens, 4) if self.tokens else 0.0
        out["complete"] = self.rows + self.template_refused_rows == self.rows_in_file
        return out


def load_libraries() -> None:
    """Import what preflight() tokenizes with: transformers, and torch with it (seconds; more on a loaded host),
    and the fast tokenizer's and chat templates' modules, which transformers loads on first use. For a process
    that runs preflights to pay at its start rather than inside its first preflight's time limit."""
    import jinja2  # noqa: F401  (the chat template's engine)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401  (lazy names: importing loads them)


def preflight(spec: JobSpec, tokenizer_dir: str | Path, train_path: str | Path, *,
              validation_path: str | Path | None = None, examples: int = 0, max_rows: int = MAX_ROWS) -> dict:
    """The report: each set's numbers, the first `examples` rows token by token, the steps and epochs
    the spec resolves to, and the problems (`refusals`: the job cannot learn; `warnings`: it can, but
    look first). Each set is read to its first `max_rows` rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
    setup = prepare_tokenizer(tokenizer)
    t = spec.training
    with _collector_paused():
        train, shown, train_said = _measure(train_path, tokenizer, spec, min(examples, MAX_EXAMPLES), max_rows)
        validation = (_measure(validation_path, tokenizer, spec, 0, max_rows, train=train_said)[0]
                      if validation_path else None)
    report = {
        "train": train.as_dict(),
        "validation": validation.as_dict() if validation else None,
        "examples": shown,
        "chat_template": setup.chat_template_source,
        "max_seq_length": t.max_seq_length,
        "train_on_inputs": t.train_on_inputs,
        **planned_steps(spec, train.kept_rows, train.kept_lengths, read=(train.rows, train.rows_in_file - train.template_refused_rows)),
    }
    refusals, report["warnings"] = problems(spec, train, validation)
    mismatched = [(name, s.format) for name, s in (("train", train), ("validation", validation))
                  if s is not None and not s.invalid and s.format not in METHOD_FORMATS[spec.method.type]]
    if mismatched:
        allowed = " or ".join(METHOD_FORMATS[spec.method.type])
        refusals = [Refusal(name, f"method {spec.method.type} trains on {allowed} rows, and the {name} data is in {fmt} "
                                  f"format; use a dataset of the right format, or set method.type to "
                                  f"{'dpo' if fmt == 'preference' else 'sft'}") for name, fmt in mismatched]
        report["warnings"] = []
    report["refusals"] = [r.reason for r in refusals]
    report["refusal_sets"] = [r.set for r in refusals]  # which dataset each refusal is about: the API names its field
    return report


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a while. Reading and tokenizing 10,000 rows allocates millions
    of small lists and tuples (rows, token ids, offsets) that form no cycles, so each collection the allocations
    trigger walks them all again and frees next to nothing: a fifth of a preflight's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _measure(path, tokenizer, spec: JobSpec, examples: int, max_rows: int, *, train: Said | None = None,
             ) -> tuple[SetReport, list[dict], Said]:
    """A set's report, its first `examples` rows token by token, and what its rows say and ask. With `train`
    (what the train set says: a validation set's), also the rows and prompts found in the train set."""
    try:
        data = read_jsonl(path)
    except DataError as exc:
        return SetReport(invalid=str(exc.errors[0]), invalid_lines=exc.total), [], Said()
    if data.format not in METHOD_FORMATS[spec.method.type]:
        # preflight refuses it, naming the format the method needs
        return SetReport(rows_in_file=len(data.examples), format=data.format), [], Said()
    t = spec.training
    read = data.examples[:max_rows]
    try:
        stats = _encode_stats(read, tokenizer, spec)
        refused: list[tuple[int, str]] = []
    except TemplateError:
        # Every row the template refuses, and the numbers of the others, as if they were fixed.
        refused = template_refusals(read, tokenizer, preference=spec.method.type == "dpo",
                                    train_on_inputs=t.train_on_inputs)
        lines = {line for line, _ in refused}
        read = [example for example in read if example.line not in lines]
        stats = _encode_stats(read, tokenizer, spec)
    report = SetReport(rows=stats.rows, rows_in_file=len(data.examples), truncated_rows=stats.truncated_rows,
                       dropped_rows=stats.dropped_rows, dropped_lines=stats.dropped_lines, tokens=stats.tokens,
                       trained_tokens=stats.trained_tokens, trained_tokens_lost=stats.trained_tokens_lost,
                       rows_without_eos=stats.rows_without_eos, lengths=_spread(stats.lengths),
                       kept_lengths=stats.kept_lengths,
                       rows_without_eos_by_side=stats.eos_cut,
                       tied_rows=stats.tied_rows if stats.eos_cut is not None else None, format=data.format,
                       # a dpo set's count even where no pair is left to count (every one refused by the template)
                       contradicting_rows=0 if stats.eos_cut is not None else None,
                       template_refused_rows=len(refused), template_refused_lines=[line for line, _ in refused[:LINES_SHOWN]],
                       template_refusal=refused[0][1] if refused else None)
    _count_special_tokens(report, read, tokenizer, train_on_inputs=t.train_on_inputs)
    said = _count_repeats(report, read, train)
    # The rows shown are encoded again with each token's text: a few rows, not a piece of text per token of them all.
    return report, [_shown(example, tokenizer, spec) for example in read[:examples]], said


def _encode_stats(read: Sequence[Example], tokenizer, spec: JobSpec) -> EncodeStats:
    """Counted as the recipe's encode_examples / encode_preferences count, without keeping the rows they keep."""
    t = spec.training
    if spec.method.type == "dpo":
        stats = EncodeStats.for_pairs()
        encoded: Iterable[Encoded | EncodedPair] = encoded_pairs(read, tokenizer, max_seq_length=t.max_seq_length)
    else:
        stats = EncodeStats()
        encoded = encoded_rows(read, tokenizer, max_seq_length=t.max_seq_length, train_on_inputs=t.train_on_inputs)
    for example, row in zip(read, encoded, strict=True):
        stats.count(example.line, row)
    return stats


def _count_special_tokens(report: SetReport, examples: Sequence[Example], tokenizer, *, train_on_inputs: bool) -> None:
    """The conversation rows whose messages (or answers) hold a special token's text, which the tokenizer reads
    as that token, and of them the rows where it is in learned text (render_conversation's spans: the assistant
    turns of weight 1, everything else too with train_on_inputs; a pair's two answers). A text row is the user's
    own formatting, where writing special tokens is deliberate (a trailing "</s>", Llama-2's "[INST]" layouts):
    it is not counted."""
    texts = special_token_texts(tokenizer)
    if not texts:
        return
    pattern = re.compile("|".join(map(re.escape, texts)))
    found: Counter[str] = Counter()
    for example in examples:
        answers = [a for a in (example.chosen, example.rejected) if a is not None]
        prompts: list[str] = []
        # A pair's messages are its prompt: DPO learns its two answers alone, an assistant turn before them is context.
        # A conversation learns its assistant turns of weight 1 and, with train_on_inputs, all but those of weight 0:
        # a "</s>" in a user turn is then a learned EOS too.
        inputs_learned = train_on_inputs and example.chosen is None
        for m in example.messages:  # a call's arguments are rendered into the text too, tools' definitions as well
            learned = example.chosen is None and m.weight != 0 if m.role == "assistant" else inputs_learned
            (answers if learned else prompts).append(m.said())
        (answers if inputs_learned else prompts).extend(json.dumps(tool, ensure_ascii=False) for tool in example.tools)
        in_answers = {match.group() for content in answers for match in pattern.finditer(content)}
        in_row = in_answers | {match.group() for content in prompts for match in pattern.finditer(content)}
        if not in_row:
            continue
        report.rows_with_special_tokens += 1
        report.rows_with_special_tokens_in_answers += bool(in_answers)
        if len(report.special_token_lines) < LINES_SHOWN:
            report.special_token_lines.append(example.line)
        found.update(in_row)
    report.special_tokens_found = dict(found.most_common())


@dataclass
class Said:
    """What a set's rows say (up to case and spacing) and ask, each with the first line saying or asking it."""

    rows: dict[tuple, int] = field(default_factory=dict)
    prompts: dict[tuple, int] = field(default_factory=dict)


def _count_repeats(report: SetReport, examples: Sequence[Example], train: Said | None) -> Said:
    """Rows that say what an earlier row of the set says, and (a validation set's) rows the train set holds too
    or whose prompt a train row asks. Case and spacing do not count: "What  does a cow say?" repeats "what
    does a cow say?". Returns what the set says."""
    said = Said()
    if train is not None:
        report.rows_in_train = report.prompts_in_train = 0
    for example in examples:
        tools = json.dumps(example.tools, sort_keys=True) if example.tools else None  # shown with the prompt
        messages = tuple((m.role, _plain_text(m.said()), m.weight) for m in example.messages)
        row = (messages, *(None if text is None else _plain_text(text)
                           for text in (example.text, example.chosen, example.rejected)), tools)
        first = said.rows.setdefault(row, example.line)
        if first != example.line:
            report.duplicate_rows += 1
            _note(report.duplicate_lines, example.line, first)
        if example.chosen is not None:  # a pair: the same prompt with the answers the other way round says the opposite
            report.contradicting_rows = report.contradicting_rows or 0
            opposite = said.rows.get((*row[:2], row[3], row[2], *row[4:]))
            if opposite is not None and row[2] != row[3]:  # answers differing only in case or spacing reverse themselves
                report.contradicting_rows += 1
                _note(report.contradicting_lines, example.line, opposite)
        prompt = example.prompt()  # the first of the messages: each said once, above
        asked = None if prompt is None else (tools, *((role, text) for role, text, _ in messages[:len(prompt)]))
        if asked is not None:
            said.prompts.setdefault(asked, example.line)
        if train is None:
            continue
        if (in_train := train.rows.get(row)) is not None:
            report.rows_in_train = (report.rows_in_train or 0) + 1
            _note(report.rows_in_train_lines, example.line, in_train)
        elif asked is not None and (asked_in_train := train.prompts.get(asked)) is not None:
            report.prompts_in_train = (report.prompts_in_train or 0) + 1
            _note(report.prompts_in_train_lines, example.line, asked_in_train)
    return said


def _plain_text(text: str) -> str:
    """Text with case and spacing set aside: what a row says, all but its line, is its messages' and
    answers' plain texts."""
    return " ".join(text.casefold().split())


def _note(pairs: list[list[int]], line: int, other: int) -> None:
    if len(pairs) < LINES_SHOWN:
        pairs.append([line, other])


def _shown(example: Example, tokenizer, spec: JobSpec) -> dict:
    """One row token by token; a preference row's preferred side."""
    t = spec.training
    if spec.method.type == "dpo":
        pair = encode_preference(example, tokenizer, max_seq_length=t.max_seq_length, pieces=True)
        return {**explain(example.line, pair.chosen), "side": "chosen"}
    return explain(example.line, encode_example(example, tokenizer, max_seq_length=t.max_seq_length,
                                                train_on_inputs=t.train_on_inputs, pieces=True))


def explain(line: int, enc: Encoded) -> dict:
    """One row token by token, each marked trained or not: exactly what the loss sees. At most
    EXAMPLE_TOKENS of them: a row of a million tokens would be an answer of some 60 MB; `tokens_in_row`
    and `trained_in_row` count the whole row (as truncated to max_seq_length)."""
    shown = zip(enc.input_ids[:EXAMPLE_TOKENS], enc.pieces[:EXAMPLE_TOKENS], enc.labels[:EXAMPLE_TOKENS], strict=True)
    return {"line": line, "truncated": enc.truncated, "length": enc.length, "tokens_in_row": len(enc.input_ids),
            "trained_in_row": enc.trained,
            "tokens": [{"id": token, "text": piece, "trained": label == token} for token, piece, label in shown]}


def _spread(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {"min": ordered[0], "median": at(0.5), "p95": at(0.95), "max": ordered[-1]}


def planned_steps(spec: JobSpec, rows: int, kept_lengths: Sequence[int] = (), *,
                  read: tuple[int, int] | None = None) -> dict:
    """Optimizer steps and epochs as the trainer counts them (transformers' Trainer: a last partial
    micro-batch and a last partial accumulation count as one). With packing on (`training.packing` true),
    the trainer packs the kept rows (`kept_lengths`, their tokens) into fewer sequences of up to
    max_seq_length, and counts its micro-batches in those: the steps are counted the same way
    (packed_sequences). With packing "auto" the rows pack only on a GPU with flash-attention, which the
    preflight cannot see: the steps are the unpacked ones, and the note says how many packing would make.

    `read`: (rows read, rows in the file) where the preflight read only the first MAX_ROWS: the trainer trains on
    them all, so the rows (and sequences) counted are scaled to the whole file, as the first ones go, and the
    note says the steps are an estimate (60,000 rows counted as their first 50,000 said 3,125 steps where the
    run planned 3,750)."""
    t = spec.training
    batch = t.per_device_batch_size
    if not isinstance(batch, int):  # "auto": the GPU decides; say so rather than guess
        return {"steps": t.max_steps, "epochs": t.epochs, "steps_per_epoch": None,
                "micro_batch": "auto", "steps_note": "per_device_batch_size \"auto\" is decided for the GPU the job runs on"}

    def steps_for(sequences: int) -> tuple[int, int, float]:
        micro_batches = math.ceil(sequences / batch)
        per_epoch = max(math.ceil(micro_batches / t.gradient_accumulation_steps), 1)
        steps = t.max_steps if t.max_steps is not None else math.ceil((t.epochs or 1) * per_epoch)
        return steps, per_epoch, round(steps / per_epoch, 3)

    partly = read is not None and 0 < read[0] < read[1]

    def whole(count: int) -> int:  # a count of the rows read, for the whole file
        return math.ceil(count * read[1] / read[0]) if partly and read else count

    rows = whole(rows)
    steps, per_epoch, epochs = steps_for(rows)
    note = None
    if t.packing is not False and spec.method.type == "sft":  # DPO never packs
        packed = whole(packed_sequences(kept_lengths, t.max_seq_length))
        packed_steps, packed_per_epoch, packed_epochs = steps_for(packed)
        if t.packing is True:
            # What trl's trainer then steps through: e.g. 37 rows packed into 19 sequences made 6 steps where
            # the unpacked count said 10 (found by probing preflight against the run).
            steps, per_epoch, epochs = packed_steps, packed_per_epoch, packed_epochs
            note = (f"packing on: the {rows:,} rows are packed into {packed:,} sequences of up to "
                    f"max_seq_length={t.max_seq_length} tokens, counted here as the trainer counts them")
        else:
            note = (f"packing \"auto\" packs rows on a GPU with flash-attention: there the {rows:,} rows are "
                    f"{packed:,} sequences, {packed_per_epoch:,} {agreeing(packed_per_epoch, 'step', 'steps')} per epoch "
                    f"({counted(packed_steps, 'step')}, {packed_epochs} epochs); set training.packing true or false to have one count")
    if partly and read:
        estimate = (f"an estimate: the preflight read the first {read[0]:,} of {read[1]:,} rows, and counts the "
                    f"others as those went ({rows:,} rows to train on)")
        note = estimate if note is None else f"{estimate}; {note}"
    return {"steps": steps, "epochs": epochs, "steps_per_epoch": per_epoch, "micro_batch": batch,
            "steps_note": note}


PACK_BATCH_ROWS = 1_000  # datasets' Dataset.map batch size, which trl's pack_dataset packs each batch of apart


def packed_sequences(lengths: Sequence[int], max_seq_length: int) -> int:
    """How many sequences trl's best-fit-decreasing packing (pack_dataset(..., "bfd"), the recipe's
    packing_strategy) makes of rows of these lengths, in order: each batch of PACK_BATCH_ROWS rows apart (the
    trainer does not shuffle before packing), longest first, each row into the fullest sequence it still fits,
    else a new one. Only the lengths decide it, so the preflight counts it without the rows' tokens
    (tests/training/test_preflight.py holds it equal to trl's)."""
    sequences = 0
    for start in range(0, len(lengths), PACK_BATCH_ROWS):
        spaces: list[int] = []  # the room left in each open sequence of this batch, sorted
        for length in sorted((min(n, max_seq_length) for n in lengths[start:start + PACK_BATCH_ROWS] if n > 0),
                             reverse=True):
            at = bisect.bisect_left(spaces, length)  # the smallest room that holds it
            if at < len(spaces):
                left = spaces.pop(at) - length
            else:
                sequences += 1
                left = max_seq_length - length
            if left > 0:
                bisect.insort(spaces, left)
    return sequences


class Refusal(NamedTuple):
    set: str  # the dataset it is about: "train" or "validation"
    reason: str


def problems(spec: JobSpec, train: SetReport,
             validation: SetReport | None = None) -> tuple[list[Refusal], list[str]]:
    """What stops the job from learning anything (refusals, each naming its set), and what is worth a look
    (warnings), each saying what to change."""
    t = spec.training
    refusals: list[Refusal] = []
    warnings: list[str] = []
    scope = "" if train.rows == train.rows_in_file else f" (of the first {train.rows:,} rows read)"
    for name, s in (("train", train), ("validation", validation)):
        if s is not None and s.invalid:
            refusals.append(Refusal(name, f"the {name} dataset does not pass the checks the trainer reads it with, "
                                          f"which have changed since it was uploaded ({s.invalid_lines:,} bad "
                                          f"{agreeing(s.invalid_lines, 'line', 'lines')}; the first: {s.invalid}), and "
                                          "training would stop at it: fix the file and upload it again"))
        elif s is not None and s.template_refused_rows:
            lines = ", ".join(map(str, s.template_refused_lines[:5])) + ("..." if s.template_refused_rows > 5 else "")
            refusals.append(Refusal(name, f"{counted(s.template_refused_rows, f'{name} row')} cannot be trained on with the model's "
                                          f"chat template (lines {lines}), and training stops at the first; the first "
                                          f"says: {s.template_refusal}"))
    if refusals:
        return refusals, warnings
    if train.rows and train.kept_rows == 0:
        if train.tied_rows:
            refusals.append(Refusal("train", f"no pair{scope} is left to learn from within max_seq_length="
                                             f"{t.max_seq_length}: {_tied(train)}"
                                    + (f"; the other {train.rows - train.tied_rows:,} have no answer token within it"
                                       if train.rows > train.tied_rows else "")
                                    + ". Make the preferred and the other answer differ, or raise max_seq_length"))
        elif train.truncated_rows == train.rows:
            refusals.append(Refusal("train", f"every row{scope} is truncated at max_seq_length={t.max_seq_length} "
                                             f"before its first trained token (the shortest row is "
                                             f"{train.lengths['min']:,} tokens): raise max_seq_length or shorten the prompts"))
        else:
            refusals.append(Refusal("train", f"no row{scope} has a token to learn (zero trained tokens): check the "
                                             "assistant turns, their weight, and train_on_inputs"))
    elif train.kept_rows and train.rows_without_eos == train.kept_rows:
        refusals.append(Refusal("train", f"no row{scope} keeps its EOS in the labels, so the model would never learn "
                                         f"to stop: raise max_seq_length (now {t.max_seq_length}; the longest row is "
                                         f"{train.lengths['max']:,} tokens) or end each row with an assistant turn that "
                                         "is learned"))
    # The validation set's own: beside the train set's, not instead of it (each reason is named at once).
    if validation is not None and validation.rows and validation.kept_rows == 0:
        ties = f" ({_tied(validation)})" if validation.tied_rows else ""
        refusals.append(Refusal("validation", f"no validation row is left to evaluate within max_seq_length="
                                              f"{t.max_seq_length} (all {validation.rows:,} are dropped{ties}; the "
                                              f"shortest is {validation.lengths['min']:,} tokens), so the job would run "
                                              "without an evaluation and its report would prompt from the train set: "
                                              "raise max_seq_length, shorten the validation prompts, or leave out "
                                              "validation_dataset_id"))
    if refusals:
        return refusals, warnings
    if train.rows and train.truncated_rows / train.rows >= TRUNCATED_WARNING:
        are = agreeing(train.truncated_rows, "is", "are")
        warnings.append(f"{train.truncated_rows:,} of {counted(train.rows, 'row')}{scope} ({train.truncated_rows / train.rows:.0%}) "
                        f"{are} longer than max_seq_length={t.max_seq_length} and {are} truncated, losing "
                        f"{train.trained_tokens_lost:,} trained tokens; the p95 row is {train.lengths['p95']:,} tokens")
    if train.dropped_rows:
        ties = f"; {_tied(train)}" if train.tied_rows else ""
        dropped = train.dropped_rows  # "1 rows have ... (lines 22)" was what a file with one over-long row read
        warnings.append(f"{counted(dropped, 'row')}{scope} {agreeing(dropped, 'has', 'have')} nothing to "
                        f"learn within max_seq_length and {agreeing(dropped, 'is', 'are')} dropped "
                        f"({agreeing(dropped, 'line', 'lines')} {', '.join(map(str, train.dropped_lines[:5]))}"
                        f"{'...' if train.dropped_rows > 5 else ''}{ties})")
    if validation is not None and validation.dropped_rows:
        ties = f"; {_tied(validation)}" if validation.tied_rows else ""
        dropped = validation.dropped_rows
        warnings.append(f"{dropped:,} of {counted(validation.rows, 'validation row')} {agreeing(dropped, 'has', 'have')} "
                        f"nothing to evaluate within max_seq_length and {agreeing(dropped, 'is', 'are')} left out of the "
                        f"eval loss ({agreeing(dropped, 'line', 'lines')} "
                        f"{', '.join(map(str, validation.dropped_lines[:5]))}{'...' if validation.dropped_rows > 5 else ''}"
                        f"{ties})")
    if train.rows_without_eos:
        warnings.append(f"{counted(train.rows_without_eos, 'kept row')}{scope} "
                        f"{agreeing(train.rows_without_eos, 'does not keep its', 'do not keep their')} EOS in the labels (truncated, or "
                        "the last turn is not learned): the model learns to stop from the others only")
    if train.rows_with_special_tokens:
        tokens = ", ".join(f"{text!r} in {rows:,}" for text, rows in list(train.special_tokens_found.items())[:5])
        lines = ", ".join(map(str, train.special_token_lines[:5])) + ("..." if train.rows_with_special_tokens > 5 else "")
        warnings.append(f"{counted(train.rows_with_special_tokens, 'row')}{scope} "
                        f"{agreeing(train.rows_with_special_tokens, 'has', 'have')} message text that the tokenizer reads as "
                        f"special tokens, not as text ({tokens}; lines {lines}), {train.rows_with_special_tokens_in_answers:,} "
                        "of them in learned answers: an EOS inside an answer teaches the model to stop "
                        "there, and a role marker in a prompt opens a turn the conversation does not have. The chat "
                        "template adds the special tokens a row needs; remove these, or break them up (\"</ s>\") where "
                        "the text must show them")
    if train.rows and train.duplicate_rows / train.rows >= DUPLICATE_WARNING:
        warnings.append(f"{train.duplicate_rows:,} of {counted(train.rows, 'row')}{scope} ({train.duplicate_rows / train.rows:.0%}) "
                        f"{agreeing(train.duplicate_rows, 'repeats', 'repeat')} an earlier row, up to case and spacing "
                        f"({_pairs(train.duplicate_lines, 'repeats line')}): each "
                        "epoch trains on them as many times as they appear; drop the repeats unless the weight is meant")
    if train.contradicting_rows:
        warnings.append(f"{counted(train.contradicting_rows, 'pair')}{scope} "
                        f"{agreeing(train.contradicting_rows, 'says', 'say')} the opposite of an earlier pair, the same prompt "
                        f"with the two answers swapped ({_pairs(train.contradicting_lines, 'reverses line')}): each "
                        "such two pull against each other and teach nothing, and they weigh down the reward accuracy; "
                        "keep the pair whose label is right")
    if validation is not None and validation.rows_in_train:
        share = validation.rows_in_train / validation.rows
        warnings.append(f"{validation.rows_in_train:,} of {counted(validation.rows, 'validation row')} ({share:.0%}) "
                        f"{agreeing(validation.rows_in_train, 'is', 'are')} also in the "
                        f"train set ({_pairs(validation.rows_in_train_lines, 'is train line')}): the eval "
                        "loss, early stopping, the best checkpoint and the report's scores measure recall on them, not "
                        "what the model learned; take them out of one set")
    if validation is not None and validation.prompts_in_train:
        share = validation.prompts_in_train / validation.rows
        warnings.append(f"{validation.prompts_in_train:,} of {counted(validation.rows, 'validation row')} ({share:.0%}) "
                        f"{agreeing(validation.prompts_in_train, 'asks', 'ask')} what a "
                        f"train row asks, with another answer ({_pairs(validation.prompts_in_train_lines, 'asks as train line')}): "
                        "the model trains on those prompts, so its eval loss and the report's answers on them flatter "
                        "it; keep each prompt in one set")
    if t.train_on_inputs and train.tokens and train.trained_tokens / train.tokens > 0.99:
        warnings.append("train_on_inputs is on: the prompts are learned too, and the model learns to talk as the user")
    if train.rows + train.template_refused_rows < train.rows_in_file:
        warnings.append(f"the preflight read the first {train.rows:,} of {counted(train.rows_in_file, 'row')}")
    return refusals, warnings


def _tied(s: SetReport) -> str:
    """What a set's tied pairs are, for a refusal or a warning."""
    return (f"{s.tied_rows:,} {agreeing(s.tied_rows, 'is a pair', 'are pairs')} whose two answers are the same tokens "
            "within max_seq_length (they differ only past the cut, or only in spacing the chat template trims), "
            "and a tie teaches nothing")


def _pairs(lines: list[list[int]], relation: str) -> str:
    """The first few [line, other line] pairs: "line 7 repeats line 2, ..."."""
    shown = ", ".join(f"line {line} {relation} {other}" for line, other in lines[:3])
    return shown + (", ..." if len(lines) > 3 else "")
