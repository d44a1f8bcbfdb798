"""The engine on this machine, no service needed: `train`, `estimate`, `tiny-model`, `demo-data`.

Each verb imports the engine (worker.training, and with it torch) only when it runs, so `qlora --help`
and the other verbs stay light. Each prints its result as text on a terminal and as JSON on a pipe
(render.show; --json/--table override); progress and errors go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.render import Commands, JsonOption, err, event_line, out, print_run_summary, show

if TYPE_CHECKING:
    from worker.training.protocol import Record

commands = Commands()
# Where "auto" is decided against a GPU's memory (estimate's --gpu-memory, train's own GPU), as admission and
# the service's workers decide it.
MaxPagedFractionOption = Annotated[float, typer.Option(
    min=0, max=1, envvar="QLORA_MAX_PAGED_FRACTION",
    help="How much of a paged optimizer's state may page to CPU memory, as admission allows it "
         "(the service's QLORA_MAX_PAGED_FRACTION, 1 by default).")]
LogFormatOption = Annotated[Literal["auto", "json", "text"], typer.Option(
    "--log-format", envvar="QLORA_LOG_FORMAT",
    help="The run's events on stderr: text lines, or a JSON object per line; auto (the default): text on a terminal, "
         "JSON elsewhere, as every qlora process logs.")]


@commands.command()
def train(
    spec: Annotated[Path, typer.Argument(help="Job spec JSON file.", exists=True, dir_okay=False)],
    data: Annotated[Path, typer.Option("--data", help="Training JSONL.", exists=True, dir_okay=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    validation: Annotated[Optional[Path], typer.Option("--validation", help="Validation JSONL.", exists=True, dir_okay=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in --out.")] = False,
    initial_adapter: Annotated[Optional[Path], typer.Option(
        "--initial-adapter", help="Start from this saved adapter (a run's adapter/ directory) instead of a fresh one: "
        "SFT, then DPO from it.", exists=True, file_okay=False)] = None,
    max_paged_fraction: MaxPagedFractionOption = 1.0,
    log_format: LogFormatOption = "auto",
    as_json: JsonOption = None,
) -> None:
    """Fine-tune a base model with QLoRA; writes adapter/, merged/, metrics.jsonl, summary.json to --out.

    Its warnings (rows truncated, the loss spiking, a paged optimizer run unpaged on the CPU) print to stderr as
    they happen, the events a job records. On a pipe: {"out_dir", "summary"} (summary.json's content)."""
    from worker.training.data import DataError
    from worker.training.spec import JobSpec, SpecError
    from worker.training.tokenization import TemplateError

    try:
        job = JobSpec.from_file(spec)
        from worker.training import stack

        with stack.loading():  # this process trains: its imports for less (worker/training/stack.py)
            from worker.training.recipe import TrainingError, run

        result = run(job, data, out_dir, validation_path=validation, resume=resume, progress=True,
                     initial_adapter=initial_adapter, max_paged_fraction=max_paged_fraction,
                     sink=_event_printer(log_format))
    except (SpecError, DataError, TemplateError) as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except TrainingError as exc:
        err.print(f"[red]training failed:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    show({"out_dir": str(result.out_dir), "summary": result.summary},
         lambda: print_run_summary(result.summary, result.out_dir), as_json)


# The info events a person running `qlora train` reads as they happen, beside every warning and error: what the run
# decided otherwise than its spec reads. The rest of info (started, base loaded, a checkpoint every save_steps,
# saved, merged) is routine that the summary tells at the end; a new kind of info event stays out until named here.
NOTEWORTHY_INFO_EVENTS = frozenset({"optimizer_unpaged", "decisions_kept", "early_stopped", "best_checkpoint_used",
                                    "merging_on_cpu", "merging_streamed"})


def _event_printer(log_format: str) -> Callable[[Record], None]:
    """The sink `qlora train` gives the recipe: the events a worker would record for a job (QLoRARecipe.emit), those
    worth reading as they happen, on stderr, as `qlora jobs watch` prints a job's events on a terminal and as the recipe's
    records (records.jsonl's lines) elsewhere, by the rule every qlora process logs by (app/logs.py). Without it
    the engine alone said none of them: a run that truncated half its rows said nothing of it."""
    from app.logs import resolve_format
    from worker.training.protocol import Event, record_to_json

    as_json = resolve_format(log_format) == "json"

    def show_event(record: Record) -> None:
        # "failed": the command's own `training failed:` line says it, with exit status 1.
        if not isinstance(record, Event) or record.type == "failed":
            return
        if record.level == "info" and record.type not in NOTEWORTHY_INFO_EVENTS:
            return
        if as_json:
            print(json.dumps(record_to_json(record), default=str), file=sys.stderr, flush=True)
        else:  # through the console the progress bar shares the terminal with (rich prints it above the bar)
            shown: dict[str, Any] = {"created_at": datetime.fromtimestamp(record.time).isoformat(timespec="seconds"),
                                     "step": record.step, "type": record.type, "level": record.level,
                                     "message": record.message}
            err.print(event_line(shown), highlight=False, soft_wrap=True)

    return show_event


@commands.command()
def estimate(
    spec: Annotated[Path, typer.Argument(help="Job spec JSON file.", exists=True, dir_okay=False)],
    config: Annotated[Optional[Path], typer.Option(
        help="The model's config.json (default: base_model's, if a local directory; else the registry's, "
             "asked of the server the client commands use).")] = None,
    gpu_memory: Annotated[Optional[float], typer.Option(help="GPU memory in GiB: say whether it fits, and what would.")] = None,
    from_adapter: Annotated[bool, typer.Option(
        "--from-adapter", help="The job continues a saved adapter (initial_job_id): a DPO job then keeps a frozen "
                               "copy of it as the reference, and it is counted.")] = False,
    max_paged_fraction: MaxPagedFractionOption = 1.0,
    host_memory: Annotated[Optional[float], typer.Option(
        min=0, help="Host (CPU) memory in GiB a job on that GPU may hold, as the service's QLORA_HOST_MEMORY gives "
                    "its class: the offloaded activations, the paged optimizer's overflow and the datasets (--data) "
                    "must fit it too.")] = None,
    data: Annotated[Optional[list[Path]], typer.Option(
        "--data", exists=True, dir_okay=False,
        help="The job's dataset, a local JSONL file (repeat it for the validation set): the host memory a run holds "
             "for it from start to end is counted, by its token estimate as an upload has it.")] = None,
    as_json: JsonOption = None,
) -> None:
    """Estimate a job's peak GPU memory, part by part, before it runs. Exits 1 when --gpu-memory is given
    and the job does not fit it.

    On a pipe: {"micro_batch", "seq_len", "parts": {part: bytes}, "pageable": [parts], "total", "resident",
    "pageable_bytes", "host_bytes", "host": {part: bytes}, "host_total", ...}, in bytes ("host": the CPU memory the
    run holds: offloaded activations, with --gpu-memory the paged optimizer's overflow, and with --data its
    datasets); with --gpu-memory also "gpu_memory", "fits", "paged_bytes", "largest_micro_batch" and "suggestions",
    with --host-memory "host_memory", and with --data "dataset_tokens"."""
    from worker.training.estimate import (
        GIB,
        ModelShape,
        advice,
        dataset_host_parts,
        estimate_peak_memory,
        fit_memory_savers,
        gib,
        keeps_reference_adapter,
        largest_micro_batch,
        memory_savers_note,
        steps_host_budget,
    )
    from worker.training.spec import JobSpec, SpecError

    if host_memory is not None and gpu_memory is None:  # a verdict for a class needs its GPU memory too
        err.print("[red]error:[/red] --host-memory gives admission's verdict for a GPU class: give its --gpu-memory too",
                  highlight=False)
        raise typer.Exit(2)
    try:
        job = JobSpec.from_file(spec)
    except SpecError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    config_path = config or Path(job.base_model).expanduser() / "config.json"
    where = f"{config_path}: "  # what an error is about
    try:
        if config_path.is_file():
            model_config = json.loads(config_path.read_text(encoding="utf-8"))
        else:
            where = ""  # the lookup's errors say what was tried
            model_config = _registered_config(job.base_model, config_path)
            where = f"the registry's config.json of {job.base_model!r}: "
        if not isinstance(model_config, dict):
            raise ValueError(f"it holds a JSON {type(model_config).__name__}, not an object")
        shape = ModelShape.from_config(model_config)
    except (UnicodeDecodeError, ValueError) as exc:
        err.print(f"[red]error:[/red] {escape(where + str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        shape.check_targets(job.lora.target_modules)
    except ValueError as exc:
        err.print(f"[red]error:[/red] lora.target_modules: {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    tokens = _dataset_tokens(data or [])
    budget = int(gpu_memory * GIB) if gpu_memory is not None else None
    host = int(host_memory * GIB) if host_memory is not None else None
    steps_host = steps_host_budget(host, tokens)  # what the datasets leave of it for the steps, as admission counts it
    reference = keeps_reference_adapter(job, from_adapter)
    # "auto" offload and tiling: on where it would not fit without (and, with --host-memory, where the host holds it)
    job = fit_memory_savers(job, model_config, budget, max_paged_fraction, reference_adapter=reference,
                            host_budget_bytes=steps_host)
    result = estimate_peak_memory(job, model_config, reference_adapter=reference)
    answer: dict = {"micro_batch": result.micro_batch, "seq_len": result.seq_len,
                    "gradient_checkpointing": result.checkpointing, "activation_offload": result.offload,
                    "tiled_mlp": result.tiled, "parts": result.parts, "pageable": sorted(result.pageable),
                    "total": result.total, "resident": result.resident, "pageable_bytes": result.pageable_bytes,
                    "host_bytes": result.host_bytes, "host": result.host_parts(budget) | dataset_host_parts(tokens)}
    answer["host_total"] = sum(answer["host"].values())
    if data:
        answer["dataset_tokens"] = tokens
    fits = True
    if budget is not None:
        # The same rule as admission's (app/jobs/admission.py), paging share included: a job this says fits is admitted.
        fits = result.fits(budget, max_paged_fraction, steps_host)
        answer |= {"gpu_memory": budget, "fits": fits, "paged_bytes": result.paged_bytes(budget),
                   "largest_micro_batch": largest_micro_batch(job, model_config, budget, max_paged_fraction=max_paged_fraction,
                                                              reference_adapter=reference, host_budget_bytes=steps_host),
                   "suggestions": advice(job, model_config, budget, max_paged_fraction, reference, steps_host)
                   if not fits else []}
        if host is not None:
            answer["host_memory"] = host

    def tables() -> None:
        table = Table(title=f"peak memory: micro-batch {result.micro_batch} x {result.seq_len} tokens, "
                            f"gradient checkpointing {'on' if result.checkpointing else 'off'}"
                            f"{memory_savers_note(result)}")
        table.add_column("part")
        table.add_column("GiB", justify="right")
        for part, size in result.parts.items():
            table.add_row(part + (" [dim](pageable)[/dim]" if part in result.pageable else ""), f"{size / GIB:.2f}")
        table.add_row("[bold]total[/bold]", f"[bold]{result.total / GIB:.2f}[/bold]")
        if result.pageable:
            table.add_row("[bold]resident[/bold] (pageable state paged out)", f"[bold]{result.resident / GIB:.2f}[/bold]")
        for part, size in answer["host"].items():
            table.add_row(f"host memory: {part} [dim](CPU, not GPU)[/dim]", f"{size / GIB:.2f}")
        if len(answer["host"]) > 1:
            table.add_row("[bold]host total[/bold]", f"[bold]{answer['host_total'] / GIB:.2f}[/bold]")
        out.print(table)
        if budget is None:
            return
        paged = answer["paged_bytes"]
        if fits and paged:
            verdict = (f"fits, with {gib(paged)} of the {gib(result.pageable_bytes)} of paged optimizer state paged "
                       "to CPU memory at each optimizer step,")
        else:
            verdict = "fits" if fits else "does not fit"
        held = (f" of GPU memory and {gib(host)} of host memory (it holds {gib(answer['host_total'])} there)"
                if host is not None else "")
        out.print(f"{verdict} in {gib(budget)}{held}; the largest micro-batch that fits: {answer['largest_micro_batch'] or 'none'}")
        for idea in answer["suggestions"]:
            out.print(f"  try {idea}")

    show(answer, tables, as_json)
    if not fits:  # as `qlora jobs preflight` exits 1 where the service would refuse the job
        raise typer.Exit(1)


def _dataset_tokens(paths: list[Path]) -> int:
    """The token estimates of the local JSONL files `paths`, summed, each as an upload of it gets (the server's
    own ingest): what admission counts a job's datasets' host memory by. Exit 2 on a file with bad lines."""
    from app.cli.api_client import check_dataset

    tokens = 0
    for path in paths:
        verdict = check_dataset(path)
        if not verdict.ok:
            first = verdict.errors[0] if verdict.errors else None
            err.print(f"[red]error:[/red] --data {escape(str(path))}: {verdict.error_count:,} bad line(s)"
                      + (f", the first: line {first.line}: {escape(first.message)}" if first else "")
                      + f" (`qlora datasets check {escape(str(path))}` lists them)", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        tokens += verdict.token_estimate
    return tokens


def _registered_config(name: str, tried: Path) -> dict:
    """The config.json the service's registry keeps for model `name` (base_model as a job names it), asked
    of the server the client commands use; ValueError saying what was tried where there is none."""
    from app.cli.api_client import ApiClient, ClientError

    try:
        with ApiClient.from_sources() as api:
            models = {m["name"]: m for m in api.list_models()}
    except ClientError as exc:
        raise ValueError(f"no config.json at {tried}, and the registry could not be asked ({exc}); pass --config") from None
    if name not in models:
        raise ValueError(f"no config.json at {tried}, and the registry has no model {name!r} "
                         f"(it has: {', '.join(models) or 'none'}); pass --config")
    if models[name].get("config") is None:
        raise ValueError(f"the registry keeps no config.json for {name!r} (registered with neither a readable path "
                         "nor a config); pass --config")
    return models[name]["config"]


@commands.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer to.")],
    seed: int = 0,
    as_json: JsonOption = None,
) -> None:
    """Build the tiny Llama-architecture demo model (~4M parameters) and its tokenizer, offline. On a pipe: {"path"}."""
    from worker.training.tiny import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed)
    show({"path": str(path)}, lambda: out.print(f"tiny model written to {path}"), as_json)


@commands.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Directory for train.jsonl, validation.jsonl, pairs.jsonl and spec.json.")],
    base_model: Annotated[str, typer.Option(help="base_model for the example spec.")] = "tiny-model",
    rows: int = 480,
    seed: int = 0,
    as_json: JsonOption = None,
) -> None:
    """Write the demo task (which sound an animal makes) and a spec that learns it in about a minute on a
    CPU; and the same task as preference pairs (the right sound over a wrong one) for a DPO job after it."""
    from worker.training.tiny import demo_pairs, demo_rows, demo_spec, write_jsonl

    write_jsonl(demo_rows(seed, rows, distinct=True), out_dir / "train.jsonl")
    write_jsonl(demo_rows(seed, 48, split="heldout", distinct=True), out_dir / "validation.jsonl")
    write_jsonl(demo_pairs(seed + 1, rows // 4, distinct=True), out_dir / "pairs.jsonl")
    (out_dir / "spec.json").write_text(json.dumps(demo_spec(base_model), indent=2) + "\n")
    names = ("train.jsonl", "validation.jsonl", "pairs.jsonl", "spec.json")
    show({"files": [str(out_dir / name) for name in names]},
         lambda: out.print(f"wrote {out_dir}/{', '.join(names)}"), as_json)
