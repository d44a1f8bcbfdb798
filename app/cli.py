"""The `qlora` command.

Engine verbs (`train`, `tiny-model`, `demo-data`) import torch only when they run, so the
service verbs stay light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

cli = typer.Typer(help="qlora-service: QLoRA fine-tuning as a service.", no_args_is_help=True, add_completion=False)
err = Console(stderr=True)
out = Console()


@cli.command()
def train(
    spec: Annotated[Path, typer.Argument(help="Job spec JSON file.", exists=True, dir_okay=False)],
    data: Annotated[Path, typer.Option("--data", help="Training JSONL.", exists=True, dir_okay=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    validation: Annotated[Optional[Path], typer.Option("--validation", help="Validation JSONL.", exists=True, dir_okay=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in --out.")] = False,
) -> None:
    """Fine-tune a base model with QLoRA; writes adapter/, merged/, metrics.jsonl, summary.json to --out."""
    from worker.training.data import DataError
    from worker.training.spec import JobSpec, SpecError
    from worker.training.tokenization import TemplateError

    try:
        job = JobSpec.from_file(spec)
        from worker.training.recipe import TrainingError, run

        result = run(job, data, out_dir, validation_path=validation, resume=resume, progress=True)
    except (SpecError, DataError, TemplateError) as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except TrainingError as exc:
        err.print(f"[red]training failed:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _print_summary(result.summary, result.out_dir)


def _print_summary(s: dict, out_dir: Path) -> None:
    table = Table(title=f"{s['status']}: {out_dir}", show_header=False)
    steps = s["steps"]
    rows = [
        ("steps", f"{steps['completed']} / {steps['planned']}" + (f" (resumed from {steps['resumed_from']})" if steps["resumed_from"] else "")),
        ("train loss", f"{s['train_loss_first']:.4f} → {s['train_loss_final']:.4f}" if s.get("train_loss_final") is not None else "-"),
        ("eval loss", f"{s['eval_loss_final']:.4f}" if s.get("eval_loss_final") is not None else "-"),
        ("trainable / total params", f"{s['parameters']['trainable']:,} / {s['parameters']['total']:,}"),
        ("target modules", ", ".join(s["target_modules"])),
        ("truncated rows", str(s["data"]["train"]["truncated_rows"])),
        ("tokens/s", f"{s['tokens_per_second']:.0f}"),
        ("peak memory", f"{s['peak_memory_bytes'] / 2**20:.0f} MiB"),
    ]
    if s.get("merge_fidelity"):
        f = s["merge_fidelity"]
        rows.append(("merge fidelity", f"max |Δlogit| {f['max_abs_logit_diff']:.3g}, mean {f['mean_abs_logit_diff']:.3g}, Δeval loss {f['eval_loss_diff']:.3g}"))
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


@cli.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer to.")],
    seed: int = 0,
) -> None:
    """Build the tiny Llama-architecture demo model (~4M parameters) and its tokenizer, offline."""
    from worker.training.tiny import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed)
    out.print(f"tiny model written to {path}")


@cli.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Directory for train.jsonl, validation.jsonl and spec.json.")],
    base_model: Annotated[str, typer.Option(help="base_model for the example spec.")] = "tiny-model",
    rows: int = 480,
    seed: int = 0,
) -> None:
    """Write the demo task (which sound an animal makes) and a spec that learns it in about a minute on a CPU."""
    from worker.training.tiny import demo_rows, demo_spec, write_jsonl

    write_jsonl(demo_rows(seed, rows), out_dir / "train.jsonl")
    write_jsonl(demo_rows(seed, 48, split="heldout"), out_dir / "validation.jsonl")
    (out_dir / "spec.json").write_text(json.dumps(demo_spec(base_model), indent=2) + "\n")
    out.print(f"wrote {out_dir}/train.jsonl, validation.jsonl, spec.json")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
