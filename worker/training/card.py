"""adapter/README.md: the model card of a finished run's adapter.

peft's save_pretrained writes a template there, every field "[More Information Needed]": the one file a person opens
in a downloaded adapter said nothing of what it is. This one says what a reader of a card on the Hub looks for: the
base and how to load the adapter on it (with the compute dtype it was trained in), the method and its settings, the
data, and how the run went (losses, the eval report, the merge's fidelity). Plain markdown under the YAML front matter
that peft and the Hub read (base_model, library_name, tags). Made from the run's summary alone, so `qlora train` and
the service write the same card.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.training.report import describe_report

CARD = "README.md"


def write_model_card(adapter_dir: Path, summary: Mapping[str, Any], *, base_model_id: str,
                     base_model_revision: str | None = None, report: Mapping[str, Any] | None = None,
                     provenance: Mapping[str, str | None] | None = None) -> Path:
    path = adapter_dir / CARD
    path.write_text(model_card(summary, base_model_id=base_model_id, base_model_revision=base_model_revision,
                               report=report, provenance=provenance), encoding="utf-8")
    return path


def model_card(summary: Mapping[str, Any], *, base_model_id: str, base_model_revision: str | None = None,
               report: Mapping[str, Any] | None = None, provenance: Mapping[str, str | None] | None = None) -> str:
    """The card of a succeeded run, from its summary (recipe.summarize); `report` the eval report where one was made,
    `provenance` the service's ids of what made it (job, datasets, initial job)."""
    spec, method = summary["spec"], summary["method"]["type"]
    lora, quant, training = spec["lora"], spec["quantization"], spec["training"]
    compute_dtype = summary["compute_dtype"]
    provenance = {key: value for key, value in (provenance or {}).items() if value}
    tags = ["peft", "lora", "qlora" if quant["bits"] != "none" else None, method, "transformers", "trl",
            f"base_model:adapter:{base_model_id}"]
    front = ["---", f"base_model: {_yaml(base_model_id)}", "library_name: peft", "pipeline_tag: text-generation",
             "tags:", *[f"- {_yaml(tag)}" for tag in tags if tag], "---", ""]
    what = "supervised fine-tuning (SFT)" if method == "sft" else "direct preference optimization (DPO)"
    quantized = (f"a {quant['bits']}-bit {quant['quant_type'].upper()} base (QLoRA)" if quant["bits"] == 4
                 else "an 8-bit base" if quant["bits"] == 8 else "an unquantized base")
    made_by = f", by qlora-service job `{provenance['job']}`" if "job" in provenance else ""
    lines = [f"# LoRA adapter for {base_model_id}", "",
             f"A LoRA adapter for `{base_model_id}`{f' (revision `{base_model_revision}`)' if base_model_revision else ''}, "
             f"trained with {what} on {quantized}{made_by}."]
    if summary.get("initial_adapter") or provenance.get("initial_job"):
        lines.append(f"Training started from the adapter of {_job(provenance.get('initial_job'))}.")
    lines += ["", "## How to load it", "", "```python", "import torch",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base_model_id)}, dtype=torch.{compute_dtype})",
              'model = PeftModel.from_pretrained(base, "path/to/adapter")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")  # as trained: its chat template and pad token',
              "```", "",
              f"It was trained in `{compute_dtype}` (the compute dtype). To load the base as it was trained, "
              + (f"pass `quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={quant['quant_type']!r}, "
                 f"bnb_4bit_use_double_quant={quant['double_quant']}, bnb_4bit_compute_dtype=torch.{compute_dtype})`."
                 if quant["bits"] == 4 else "load it in that dtype.")
              + (" A merged model (`merged/`, the adapter folded into the base) is downloaded apart."
                 if summary.get("merge_fidelity") else ""),
              "", "## Training", "", "| setting | value |", "|---|---|",
              f"| method | {method}{_dpo(summary['method'])} |",
              f"| LoRA | r {lora['r']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}"
              f"{', rsLoRA' if lora.get('use_rslora') else ''}, bias {lora['bias']} |",
              f"| target modules | {', '.join(summary.get('target_modules') or []) or lora['target_modules']} |",
              f"| quantization | {quant['bits'] if quant['bits'] == 'none' else str(quant['bits']) + '-bit ' + quant['quant_type']}"
              f"{', double quant' if quant['bits'] == 4 and quant['double_quant'] else ''} |",
              f"| compute dtype | {compute_dtype} |",
              f"| steps | {_steps(summary.get('steps'))} |",
              f"| learning rate | {training['learning_rate']:g}, {training['lr_scheduler']} schedule, warmup ratio "
              f"{training['warmup_ratio']:g} |",
              f"| batch | {training['per_device_batch_size']} a device x {training['gradient_accumulation_steps']} "
              f"accumulated |",
              f"| max_seq_length | {training['max_seq_length']:,} |",
              f"| optimizer | {training['optimizer']} |",
              f"| seed | {training['seed']} |",
              "", "## Data", "", "| split | dataset | rows | kept tokens | trained tokens | truncated | dropped |",
              "|---|---|---|---|---|---|---|"]
    data = summary.get("data") or {}
    for split, key in (("train", "dataset"), ("validation", "validation_dataset")):
        stats = data.get(split)
        if stats:
            lines.append(f"| {split} | {provenance.get(key) or '-'} | {stats['rows']:,} | {stats['tokens']:,} | "
                         f"{stats['trained_tokens']:,} | {stats['truncated_rows']:,} | {stats['dropped_rows']:,} |")
    lines += ["", "## Results", ""]
    lines.append(f"- train loss: {_loss(summary.get('train_loss_first'))} at the first logged step, "
                 f"{_loss(summary.get('train_loss_final'))} at the last")
    if summary.get("eval_loss_final") is not None:
        perplexity = summary.get("perplexity_final")
        lines.append(f"- validation loss: {_loss(summary['eval_loss_final'])}"
                     f"{f' (perplexity {perplexity:.3g})' if perplexity is not None else ''}")
    else:
        lines.append("- validation loss: none (no validation set)")
    lines.append(f"- {describe_report(dict(report))}" if report else
                 "- eval report: none (eval.prompts 0)")
    fidelity = summary.get("merge_fidelity")
    if fidelity:
        diff = fidelity.get("eval_loss_diff")
        lines.append(f"- merge fidelity: max |logit diff| {fidelity['max_abs_logit_diff']:.3g} between the adapter on "
                     f"the quantized base and the merged model{f', loss diff {diff:.3g}' if diff is not None else ''}")
    else:
        lines.append(f"- merged model: none ({summary.get('merge_skipped') or 'output.merge was off'})")
    versions = summary.get("versions") or {}
    if versions:
        lines += ["", "## Framework versions", "", *[f"- {name} {version}" for name, version in versions.items()]]
    return "\n".join(front + lines) + "\n"


def _yaml(value: str) -> str:
    """A YAML scalar: quoted where plain would be read as something else (a colon, a leading symbol)."""
    return value if value.replace("-", "").replace("_", "").replace(".", "").replace("/", "").isalnum() \
        else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _job(job_id: str | None) -> str:
    return f"job `{job_id}`" if job_id else "an earlier run"


def _dpo(method: Mapping[str, Any]) -> str:
    return f" (beta {method['beta']:g}, {method['loss']} loss)" if method["type"] == "dpo" else ""


def _steps(steps: Mapping[str, Any] | None) -> str:
    if not steps:
        return "-"
    return f"{steps['completed']:,} of {steps['planned']:,} planned"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
