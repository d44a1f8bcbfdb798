"""The eval report made when a job ends: is the tuned model better than its base, and how does it answer?

For each prompt, the base model's answer and the tuned model's, beside the reference where the row
has one, scored per row and on average by exact match and token F1; and the loss and perplexity of
both models on held-out rows. `make_report` is the one entry point: the recipe calls it after the
merge, and it writes the report to out/report/report.json (REPORT_PATH) and returns it.

- Prompts: the spec's list (each a user turn), or N rows sampled with the training seed from the
  validation set (the train set where there is none). A sampled chat row's reference is its last
  assistant turn; its prompt is the conversation before that turn, rendered with the chat template
  and the generation prompt, exactly as training rendered it. A preference row's (method dpo) prompt is
  its prompt conversation and its reference the preferred answer. A text row has no turns: its first half
  (in tokens) is the prompt and what follows (up to max_new_tokens) the reference.
- Tuned answers come from what the team downloads: the merged model reloaded from out/merged where the
  job merged it in memory, else (no merge, or one streamed as the host could not hold the merged model whole)
  the adapter on the quantized base. Base answers come from the base as
  it was trained against (4-bit where the job quantized it) with no adapter, so the two columns differ
  by the fine-tune, not by a change of precision.
- Exact match compares answer and reference with surrounding whitespace stripped. F1 is SQuAD's
  bag-of-words F1, on lowercased whitespace-separated tokens (without SQuAD's removal of punctuation
  and articles: "moo." and "moo" differ, as they do to a reader checking the answer).
- Loss is the mean negative log-likelihood per trained token (the tokens the loss mask keeps) over up
  to LOSS_MAX_ROWS rows of the validation set (the train set where there is none), spread evenly
  across it; perplexity is its exponential. For method dpo the rows are the prompts with their preferred
  answers: the loss is the NLL of the answers the tuned model should now prefer.
- Method dpo adds what says whether the preference was learned: each sampled pair's rejected answer beside
  its preferred one (the reference), and `rewards`, DPO's implicit rewards on the validation pairs as the
  trainer's evaluations measured them: at the first evaluation and at the one of the weights shipped (the
  last, or the best with output.use_best_checkpoint). A pair's reward is beta times how much likelier the
  tuned model finds an answer than the reference model does (the base, or the starting adapter); accuracy
  is the share of pairs whose preferred answer gains more than the rejected one, margin the mean gain of the
  one over the other. At step 0 the model is the reference: every reward, and so accuracy and margin, is 0.
  An sft report has neither key.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from worker.training.data import Example
from worker.training.merge import free_memory, stop_token_ids
from worker.training.model import dequantized_on_cpu, device_map, fit_embeddings, load_base_model
from worker.training.protocol import write_json_atomic
from worker.training.spec import JobSpec, counted
from worker.training.tokenization import ChatRenderer, render_conversation, trained_targets

# Under the run's output directory; the service stores report/ as the job's "report" artifact.
REPORT_PATH = Path("report") / "report.json"
# The loss of each model on held-out rows: 64 rows read a loss to two decimals on most sets, and cost
# two forward passes per row (base and tuned), seconds even at 8B.
LOSS_MAX_ROWS = 64
# What the report keeps of a prompt or a reference read from the data: enough to recognise the row
# (the answers, bounded by max_new_tokens, are kept whole). 256 rows stay a few MB at most.
SHOWN_CHARS = 2000
# A perplexity past e^50 is not a number anyone reads; the summary says null there too.
MAX_LOSS_FOR_PERPLEXITY = 50


def perplexity(loss: float | None) -> float | None:
    """exp(loss), or None where there is no loss or it is too large to mean anything."""
    return math.exp(loss) if loss is not None and loss < MAX_LOSS_FOR_PERPLEXITY else None


def exact_match(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's bag-of-words F1 on lowercased whitespace tokens (no punctuation or article removal)."""
    predicted, expected = answer.lower().split(), reference.lower().split()
    if not predicted or not expected:
        return float(predicted == expected)  # both empty: a match; one empty: nothing in common
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Prompt:
    shown: str  # the prompt as a reader sees it (the conversation before the reference, or the given text)
    input_ids: list[int]  # what the models get: the prompt rendered as training rendered its rows
    reference: str | None  # the answer the row holds, whole (scored whole, shown cut); None for a given prompt
    line: int | None  # the dataset line it was sampled from
    truncated: bool  # longer than max_seq_length: its start was cut, keeping the end the answer follows (training keeps a row's start)
    rejected: str | None = None  # a preference row's other answer, the one training taught the model to avoid


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended with EOS within max_new_tokens: a tuned model should, a base model rarely does


def make_report(spec: JobSpec, *, base_path: Path, out_dir: Path, tokenizer, compute_dtype: torch.dtype,
                device: str, examples: list[Example], examples_from: str, loss_rows: list[dict],
                quantized_cache: Path | None = None, rewards: dict | None = None, merged: bool | None = None) -> dict:
    """Generate, score and measure; write out_dir/REPORT_PATH (whole or not at all) and return the report.

    The tuned answers are the merged model's where the run made one (`merged`; None: where spec.output.merge
    asked for it), else the adapter's on the quantized base.

    `examples` and `loss_rows` are the validation set's (or the train set's, `examples_from` says which),
    as read and as encoded for training; `tokenizer` is the one training used (template, pad token).
    `rewards` (method dpo): reward_movement's account of the evaluations, None where nothing was evaluated."""
    merged = spec.output.merge if merged is None else merged
    prompts = choose_prompts(spec, examples, tokenizer)
    loss_rows = spread(loss_rows, LOSS_MAX_ROWS)
    # The adapter trained under autocast in the compute dtype (the 4-bit layers compute in it anyway);
    # the merged model is already in its own dtype and runs as a user would run it.
    autocast = compute_dtype if compute_dtype != torch.float32 else None

    base = load_base_model(base_path, spec.quantization, compute_dtype, device, quantized_cache=quantized_cache)
    fit_embeddings(base, tokenizer)  # as training did
    with dequantized_on_cpu(base):  # the same outputs; on the CPU, without dequantizing per token
        stops = stops_of(base, tokenizer)
        base_answers = [generate(base, p, spec, tokenizer, autocast, stops) for p in prompts]
        base_loss = mean_loss(base, loss_rows, autocast)
    if merged:
        del base
        free_memory()
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(out_dir / "merged", dtype=getattr(torch, spec.output.merge_dtype),
                                                     device_map=device_map(device), local_files_only=True)
        tuned_autocast = None
    else:
        from peft import PeftModel

        fit_embeddings(base, tokenizer, out_dir / "adapter")  # rows a started adapter carries, as training had them
        tuned = PeftModel.from_pretrained(base, out_dir / "adapter")
        tuned_autocast = autocast
    with dequantized_on_cpu(tuned):  # the adapter's base layers; nothing to do for the dense merged model
        stops = stops_of(tuned, tokenizer)
        tuned_answers = [generate(tuned, p, spec, tokenizer, tuned_autocast, stops) for p in prompts]
        tuned_loss = mean_loss(tuned, loss_rows, tuned_autocast)
    del tuned
    free_memory()

    preference = spec.method.type == "dpo"
    rows = [_row(p, base_answer, tuned_answer, preference)
            for p, base_answer, tuned_answer in zip(prompts, base_answers, tuned_answers, strict=True)]
    report = {
        "prompts_from": "spec" if isinstance(spec.eval.prompts, list) else examples_from,
        "generation": {
            "max_new_tokens": spec.eval.max_new_tokens, "temperature": spec.eval.temperature,
            "seed": spec.training.seed,
            "base": f"the base model as trained against ({_precision(spec)}), no adapter",
            "tuned": (f"the merged model ({spec.output.merge_dtype}), as downloaded" if merged
                      else f"the adapter on the base model ({_precision(spec)})"),
        },
        "metrics": {
            "scored_rows": sum(row["reference"] is not None for row in rows),
            "loss_rows": len(loss_rows), "loss_rows_from": examples_from,
            "loss_tokens": sum(trained_targets(row) for row in loss_rows),
            "base": _side_metrics(rows, "base", base_loss),
            "tuned": _side_metrics(rows, "tuned", tuned_loss),
        },
        "rows": rows,
    }
    if preference:
        report["rewards"] = rewards
    (out_dir / REPORT_PATH).parent.mkdir(exist_ok=True)
    write_json_atomic(out_dir / REPORT_PATH, report, indent=2)
    return report


def describe_report(report: dict) -> str:
    """The report in one line, for the event that announces it."""
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    parts = [f"eval report on {counted(len(report['rows']), 'prompt')}"]
    if tuned["exact_match"] is not None:
        parts.append(f"exact match {tuned['exact_match']:.0%} tuned vs {base['exact_match']:.0%} base, "
                     f"F1 {tuned['f1']:.2f} vs {base['f1']:.2f}")
    if tuned.get("stopped") is not None and base.get("stopped") is not None:  # whether the model learned to end its turn
        parts.append(f"stopped by itself {tuned['stopped']:.0%} tuned vs {base['stopped']:.0%} base")
    if tuned["loss"] is not None and base["loss"] is not None:
        parts.append(f"loss {tuned['loss']:.4f} tuned vs {base['loss']:.4f} base")
    if report.get("rewards"):
        first, final = report["rewards"]["first"], report["rewards"]["final"]
        parts.append(f"reward accuracy {final['accuracy']:.0%} and margin {final['margin']:.3f} on the validation pairs "
                     f"(first evaluation, step {first['step']}: {first['accuracy']:.0%}, {first['margin']:.3f})")
    return "; ".join(parts)


def reward_movement(evaluations: list[dict], shipped_step: int, *, pairs: int, reference: str | None) -> dict | None:
    """The report's `rewards` (method dpo): the first evaluation and the one of the shipped weights, each as
    {step, accuracy, margin, chosen, rejected, loss}. `evaluations` are the run's, oldest first, each
    {step, eval_loss, reward_accuracy, reward_margin, reward_chosen, reward_rejected} (EvalPoint's fields);
    `shipped_step` the step whose weights went out; `pairs` the validation pairs each measured; `reference` what
    the rewards are measured against ("base" or "initial_adapter"). None where no evaluation has rewards."""
    measured = [e for e in evaluations if e.get("reward_accuracy") is not None]
    if not measured:
        return None
    # The shipped weights were evaluated (the final evaluation, or the best one); a repeat at a step keeps the last.
    final = next((e for e in reversed(measured) if e["step"] == shipped_step), measured[-1])

    def point(e: dict) -> dict:
        return {"step": e["step"], "accuracy": e["reward_accuracy"], "margin": e["reward_margin"],
                "chosen": e["reward_chosen"], "rejected": e["reward_rejected"], "loss": e["eval_loss"]}

    return {"pairs": pairs, "reference": reference, "evaluations": len(measured),
            "first": point(measured[0]), "final": point(final)}


# ---------------------------------------------------------------- prompts


def choose_prompts(spec: JobSpec, examples: list[Example], tokenizer) -> list[Prompt]:
    """The spec's prompts, or spec.eval.prompts rows of `examples` sampled with the training seed (in file order)."""
    limit = spec.training.max_seq_length
    if isinstance(spec.eval.prompts, list):
        # A given prompt is rendered as the training rows were: a user turn through the chat template,
        # or plain text where the job trained on plain text.
        as_text = bool(examples) and examples[0].text is not None
        return [_text_prompt(text, tokenizer, limit) if as_text else
                _chat_prompt([{"role": "user", "content": text}], None, None, tokenizer, limit, shown=[("user", text)])
                for text in spec.eval.prompts]
    count = min(spec.eval.prompts, len(examples))
    picked = sorted(random.Random(spec.training.seed).sample(range(len(examples)), count))
    return [_sampled_prompt(examples[i], spec.eval.max_new_tokens, tokenizer, limit) for i in picked]


def _sampled_prompt(example: Example, max_new_tokens: int, tokenizer, limit: int) -> Prompt:
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        half = max(len(ids) // 2, 1)
        prompt = _text_prompt(tokenizer.decode(ids[:half], skip_special_tokens=True), tokenizer, limit,
                              ids=ids[:half])
        reference = tokenizer.decode(ids[half:half + max_new_tokens], skip_special_tokens=True)
        return Prompt(prompt.shown, prompt.input_ids, reference, example.line, prompt.truncated)
    prompt = example.prompt()
    assert prompt is not None  # a text row returned above
    # A preference row's reference is its preferred answer; a chat row's, the last assistant turn after its prompt.
    reference = example.chosen if example.chosen is not None else _turn_reference(example, tokenizer)
    shown = _chat_prompt([m.for_template() for m in prompt], reference, example.line, tokenizer, limit,
                         shown=[(m.role, m.said()) for m in prompt], tools=example.template_tools())
    return replace(shown, rejected=example.rejected)


def _turn_reference(example: Example, tokenizer) -> str:
    """A chat row's last assistant turn as the model is to write it: its text, or where it calls tools, the
    turn as the chat template renders it (the call in the model's own format, what its answer is compared
    with), its special tokens (the end of the turn) left out as the answer's are."""
    turn = example.messages[-1]
    if not turn.tool_calls:
        return turn.content
    # Its span is the last one learned: counted as learned where the row shows it only (weight 0), whose last
    # span would be an earlier turn's.
    learned = replace(example, messages=(*example.messages[:-1], replace(turn, weight=1)))
    full, spans = render_conversation(learned, ChatRenderer(tokenizer), train_on_inputs=False)
    start, end = spans[-1]
    ids = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _chat_prompt(messages: list[dict], reference: str | None, line: int | None, tokenizer, limit: int, *,
                 shown: list[tuple[str, str]], tools: list[dict] | None = None) -> Prompt:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=tools)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template adds BOS, as in training
    # One user turn reads best as its text; a longer conversation shows who said what, newest last.
    said = shown[0][1] if len(shown) == 1 and shown[0][0] == "user" else "\n".join(f"{r}: {t}" for r, t in shown)
    return Prompt(_shown(said, keep="end"), ids[-limit:], reference, line, len(ids) > limit)


def _text_prompt(text: str, tokenizer, limit: int, ids: list[int] | None = None) -> Prompt:
    ids = ids if ids is not None else tokenizer(text, add_special_tokens=True)["input_ids"]
    return Prompt(_shown(text, keep="end"), ids[-limit:], None, None, len(ids) > limit)


def _shown(text: str, keep: str = "start") -> str:
    """At most SHOWN_CHARS of a text from the data, saying how long it was: the start of a reference,
    the end of a prompt (the turn just before the answer is the one that matters)."""
    if len(text) <= SHOWN_CHARS:
        return text
    cut = text[:SHOWN_CHARS] if keep == "start" else text[-SHOWN_CHARS:]
    note = f" ({len(text):,} characters)"
    return f"{cut}…{note}" if keep == "start" else f"…{note} {cut}"


def spread(rows: list, limit: int) -> list:
    """At most `limit` rows, evenly spaced across the list: a set sorted by topic or length is not read
    from one end only. The same rows every time."""
    if len(rows) <= limit:
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


# ---------------------------------------------------------------- the models


@torch.no_grad()
def stops_of(model, tokenizer) -> list[int]:
    """Where the downloaded merged model stops (its generation_config): the tokenizer's EOS, the template's end of
    turn and the base's own stop tokens. Found once per model: the end of turn is a render of the template."""
    stops = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    return [stops] if isinstance(stops, int) else stops


def generate(model, prompt: Prompt, spec: JobSpec, tokenizer, autocast: torch.dtype | None,
             stops: list[int] | None = None) -> Answer:
    """One prompt, alone (no padding to get wrong): greedy at temperature 0, else sampled with the
    training seed, drawn afresh for each prompt so base and tuned get the same dice.

    With the KV cache, whatever the model's configs say: training turns it off on its model
    (model.config.use_cache, for packed rows), and a checkpoint's generation_config.json may too;
    without it every new token runs the whole sequence again (quadratic in the answer's length)."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.input_ids], device=device)
    sampling: dict = {"do_sample": False}
    if spec.eval.temperature > 0:
        torch.manual_seed(spec.training.seed)
        sampling = {"do_sample": True, "temperature": spec.eval.temperature}
    stops = stops_of(model, tokenizer) if stops is None else stops
    with _autocast(device, autocast):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=spec.eval.max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
    new = out[0, ids.shape[1]:].tolist()
    return Answer(tokenizer.decode(new, skip_special_tokens=True), any(stop in new for stop in stops))


@torch.no_grad()
def mean_loss(model, rows: list[dict], autocast: torch.dtype | None) -> float | None:
    """Mean negative log-likelihood per trained token over `rows` (encoded rows: input_ids, labels)."""
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for row in rows:
        count = trained_targets(row)
        if not count:
            continue
        with _autocast(device, autocast):
            loss = model(input_ids=torch.tensor([row["input_ids"]], device=device),
                         labels=torch.tensor([row["labels"]], device=device)).loss
        total += float(loss) * count  # the model averages over the row's targets; weigh rows by theirs
        tokens += count
    return total / tokens if tokens else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------- scores


def _row(prompt: Prompt, base: Answer, tuned: Answer, preference: bool = False) -> dict:
    reference = prompt.reference  # scored whole, shown cut
    row: dict = {"line": prompt.line, "prompt": prompt.shown, "prompt_truncated": prompt.truncated,
                 "reference": None if reference is None else _shown(reference)}
    if preference:  # the pair's other answer: a tuned answer that says it is what DPO was to unlearn
        row["rejected"] = None if prompt.rejected is None else _shown(prompt.rejected)
    for side, answer in (("base", base), ("tuned", tuned)):
        row[side] = {"answer": answer.text, "stopped": answer.stopped,
                     "exact_match": None if reference is None else exact_match(answer.text, reference),
                     "f1": None if reference is None else token_f1(answer.text, reference)}
    return row


def _side_metrics(rows: list[dict], side: str, loss: float | None) -> dict:
    scored = [row[side] for row in rows if row["reference"] is not None]
    return {
        "exact_match": sum(s["exact_match"] for s in scored) / len(scored) if scored else None,
        "f1": sum(s["f1"] for s in scored) / len(scored) if scored else None,
        "stopped": sum(row[side]["stopped"] for row in rows) / len(rows) if rows else None,
        "loss": loss,
        "perplexity": perplexity(loss),
    }


def _precision(spec: JobSpec) -> str:
    bits = spec.quantization.bits
    return "unquantized" if bits == "none" else (f"4-bit {spec.quantization.quant_type.upper()}" if bits == 4 else "8-bit")
