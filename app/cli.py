"""The `qlora` command.

Engine verbs (`train`, `tiny-model`, `demo-data`) import torch only when they run, so the
service verbs stay light.
"""

from __future__ import annotations

import json
import os
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


@cli.command()
def estimate(
    spec: Annotated[Path, typer.Argument(help="Job spec JSON file.", exists=True, dir_okay=False)],
    config: Annotated[Optional[Path], typer.Option(help="The model's config.json (default: base_model's, if a local directory).")] = None,
    gpu_memory: Annotated[Optional[float], typer.Option(help="GPU memory in GiB: say whether it fits, and what would.")] = None,
) -> None:
    """Estimate a job's peak GPU memory, part by part, before it runs."""
    from worker.training.estimate import GIB, advice, estimate_peak_memory, gib, largest_micro_batch
    from worker.training.spec import JobSpec, SpecError

    try:
        job = JobSpec.from_file(spec)
    except SpecError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    config_path = config or Path(job.base_model).expanduser() / "config.json"
    if not config_path.is_file():
        err.print(f"[red]error:[/red] no config.json at {config_path}; pass --config", highlight=False)
        raise typer.Exit(2)
    model_config = json.loads(config_path.read_text())
    result = estimate_peak_memory(job, model_config)
    table = Table(title=f"peak memory: micro-batch {result.micro_batch} x {result.seq_len} tokens, "
                        f"gradient checkpointing {'on' if result.checkpointing else 'off'}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, size in result.parts.items():
        table.add_row(part, f"{size / GIB:.2f}")
    table.add_row("[bold]total[/bold]", f"[bold]{result.total / GIB:.2f}[/bold]")
    out.print(table)
    if gpu_memory is not None:
        budget = int(gpu_memory * GIB)
        verdict = "fits" if result.total <= budget else "does not fit"
        out.print(f"{verdict} in {gib(budget)}; the largest micro-batch that fits: "
                  f"{largest_micro_batch(job, model_config, budget) or 'none'}")
        for idea in advice(job, model_config, budget) if result.total > budget else []:
            out.print(f"  try {idea}")


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


# ---------------------------------------------------------------- service


@cli.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (QLORA_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (QLORA_PORT).")] = None,
    worker: Annotated[Optional[bool], typer.Option("--worker/--no-worker", help="Also run one local worker. "
                      "Default: on with the embedded queue, off when QLORA_BROKER_URL points at a server.")] = None,
) -> None:
    """Start the API. With no configuration: SQLite, local storage, a local queue and one worker."""
    import subprocess
    import sys

    import uvicorn

    from app.config import get_settings
    from app.main import create_app

    settings = get_settings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    if settings.embedded or settings.database_url.startswith("sqlite"):
        from app.bootstrap import bootstrap_embedded

        bootstrap_embedded(settings, announce=lambda msg: out.print(msg, highlight=False))
    run_worker = settings.embedded if worker is None else worker
    child = None
    if run_worker:
        env = {**os.environ, "QLORA_HOME": str(settings.home)}
        child = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env)
        out.print(f"started a local worker (pid {child.pid})")
    out.print(f"API on http://{settings.host}:{settings.port} (docs at /docs)")
    try:
        from app import logs

        logs.configure("api", settings.log_format)
        # log_config=None: uvicorn keeps the handlers configured above instead of installing its own.
        # timeout_graceful_shutdown: open dashboard streams must not hold a restart until their jobs end.
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", log_config=None,
                    timeout_graceful_shutdown=10)
    finally:
        if child is not None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


@cli.command()
def worker(
    gpu: Annotated[Optional[str], typer.Option(help="GPU index to pin this worker to (sets CUDA_VISIBLE_DEVICES).")] = None,
    gpu_class: Annotated[Optional[str], typer.Option(help="Serve the queue of this GPU class (QLORA_DEFAULT_GPU_CLASS).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Worker name in job records; default host:gpu.")] = None,
) -> None:
    """Run one training worker: one job at a time, on one GPU (or the CPU)."""
    if gpu is not None:
        # Before anything can import torch: the training processes inherit it and see one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import socket

    from app.config import get_settings

    settings = get_settings()
    settings.check_timing()
    queue = settings.queue_for(gpu_class)
    worker_name = name or f"{socket.gethostname()}:{'gpu' + gpu if gpu is not None else 'cpu'}"

    from celery.signals import setup_logging

    from app import logs

    # Celery leaves logging alone when this signal has a receiver: one JSON stream for the worker,
    # its Celery internals and (relayed by the supervisor) its training processes.
    setup_logging.connect(lambda **_: logs.configure("worker", settings.log_format), weak=False)
    logs.configure("worker", settings.log_format)  # already for what Celery says before it sets up

    import worker.tasks  # noqa: F401  (registers the task)
    from worker.celery_app import celery_app

    celery_app.conf.qlora_worker_name = worker_name
    celery_app.worker_main(["--quiet", "worker", "-Q", queue, "-c", "1", "-P", "prefork", "--prefetch-multiplier", "1",
                            "-n", f"{worker_name}@%h", "-l", "INFO", "--without-gossip", "--without-mingle"])


@cli.command()
def reaper() -> None:
    """Requeue jobs whose worker was lost and clear dead uploads, in a loop (every API process also does this)."""
    from app.config import get_settings
    from app.jobs.reaper import ReaperThread
    from app.storage.base import storage_from_settings

    settings = get_settings()
    settings.check_timing()
    thread = ReaperThread(settings, storage_from_settings(settings))
    out.print(f"reaper running every {settings.reaper_interval_s}s (heartbeat deadline {settings.heartbeat_deadline_s}s)")
    thread.run()


@cli.command()
def migrate() -> None:
    """Bring the database (QLORA_DATABASE_URL) to the newest schema."""
    from app.config import get_settings
    from app.migrate import upgrade

    upgrade(get_settings().database_url)
    out.print("database is at the newest schema")


admin = typer.Typer(help="Administer teams, API keys and the model registry (runs against the database).",
                    no_args_is_help=True)
cli.add_typer(admin, name="admin")


def _admin_session():
    from app.config import get_settings
    from app.db import session_scope

    return session_scope(get_settings().database_url)


def _admin_call(fn):
    from app.errors import AppError

    try:
        with _admin_session() as session:
            return fn(session)
    except AppError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from None


@admin.command("create-team")
def create_team(name: str) -> None:
    """Create a team."""
    from app.teams import service

    team = _admin_call(lambda s: service.create_team(s, name))
    out.print(f"team {team.name!r} created (id {team.id})")


@admin.command("create-key")
def create_key(team: str, admin_key: Annotated[bool, typer.Option("--admin", help="May also manage the model registry.")] = False) -> None:
    """Make an API key for TEAM and print it once; only its hash is stored."""
    from app.teams import service

    key, secret = _admin_call(lambda s: service.create_key(s, team, admin=admin_key))
    err.print(f"key {key.id} (prefix {key.prefix}) for team {team!r}{' (admin)' if admin_key else ''}; "
              "it is shown only now:", highlight=False)
    print(secret)


@admin.command("revoke-key")
def revoke_key(key: Annotated[str, typer.Argument(help="Key id or prefix.")]) -> None:
    """Revoke a key: requests with it answer 401 from now on."""
    from app.teams import service

    revoked = _admin_call(lambda s: service.revoke_key(s, key))
    out.print(f"key {revoked.id} revoked")


@admin.command("list-keys")
def list_keys(team: str) -> None:
    """List a team's keys (prefixes only)."""
    from app.teams import repository

    def rows(session):
        found = repository.team_by_name(session, team)
        return [] if found is None else [(k.id, k.prefix, k.is_admin, k.revoked_at) for k in repository.keys_of(session, found.id)]

    table = Table("id", "prefix", "admin", "revoked")
    for key_id, prefix, is_admin, revoked in _admin_call(rows):
        table.add_row(key_id, prefix, "yes" if is_admin else "", str(revoked or ""))
    out.print(table)


@admin.command("add-model")
def add_model(
    name: str,
    path: Annotated[Optional[Path], typer.Option(help="Directory of safetensors weights on the worker hosts.")] = None,
    hub_id: Annotated[Optional[str], typer.Option(help="Hub repository id, for hosts that reach a hub.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (commit or tag); required with --hub-id.")] = None,
    description: str = "",
) -> None:
    """Register a base model that jobs may fine-tune."""
    from app.models import service

    model = _admin_call(lambda s: service.add_model(s, name, path=str(path.resolve()) if path else None,
                                                    hub_id=hub_id, revision=revision, description=description))
    out.print(f"model {model.name!r} registered")


@admin.command("list-models")
def list_models() -> None:
    """List the registered base models."""
    from app.models import repository

    table = Table("name", "source", "description")
    for m in _admin_call(lambda s: [(m.name, m.path or f"{m.hub_id}@{m.revision}", m.description)
                                    for m in repository.list_all(s)]):
        table.add_row(*m)
    out.print(table)


# ---------------------------------------------------------------- client: the API over HTTP
# HTTP lives in app/client.py; these commands only parse arguments and format answers.

UrlOption = Annotated[Optional[str], typer.Option("--url", help="API URL; else QLORA_URL, else $QLORA_HOME/credentials.json.")]
KeyOption = Annotated[Optional[str], typer.Option("--api-key", help="API key; else QLORA_API_KEY, else $QLORA_HOME/credentials.json.")]

datasets_cli = typer.Typer(help="Check, upload, list and delete datasets (JSONL).", no_args_is_help=True)
jobs_cli = typer.Typer(help="Create, watch, cancel and download fine-tuning jobs.", no_args_is_help=True)
cli.add_typer(datasets_cli, name="datasets")
cli.add_typer(jobs_cli, name="jobs")


@datasets_cli.callback()
def _datasets_options(ctx: typer.Context, url: UrlOption = None, api_key: KeyOption = None) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


@jobs_cli.callback()
def _jobs_options(ctx: typer.Context, url: UrlOption = None, api_key: KeyOption = None) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


def _fail(message: str, details=None, code: int = 1):
    from rich.text import Text

    # Text, not markup: messages quote user data ("[...]" in a filename must print as-is).
    err.print(Text(f"error: {message}", style="red"), soft_wrap=True)
    for line in _detail_lines(details):
        err.print(Text(f"  {line}", style="red"), soft_wrap=True)
    raise typer.Exit(code)


def _detail_lines(details) -> list[str]:
    if not details:
        return []
    if isinstance(details, dict):
        return [f"{k}: {v}" for k, v in details.items()]
    if not isinstance(details, list):
        return [str(details)]
    lines = []
    for d in details:
        if isinstance(d, dict) and "field" in d:
            lines.append(f"{d['field']}: {d.get('message', '')}")
        elif isinstance(d, dict) and "line" in d:
            lines.append(f"line {d['line']}: {d.get('message', '')}")
        else:
            lines.append(json.dumps(d) if isinstance(d, (dict, list)) else str(d))
    return lines


def _api(ctx: typer.Context):
    """An ApiClient for the command; any ClientError inside the `with` prints in red and exits 1."""
    from contextlib import contextmanager

    from app.client import ApiClient, ClientError

    @contextmanager
    def session():
        try:
            with ApiClient.from_sources(**(ctx.obj or {})) as api:
                yield api
        except ClientError as exc:
            _fail(exc.message, exc.details)

    return session()


def _transfer_progress(description: str, total: int | None, transient: bool = False):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    # On stderr, so stdout carries only the result.
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=transient)
    return progress, progress.add_task(description, total=total)


def _print_table(table: Table) -> None:
    # A pipe has no width; rich would assume 80 columns and squeeze the cells. Print a table
    # whole there (it stays as narrow as its content), and fit the terminal otherwise.
    (out if out.is_terminal else Console(file=out.file, width=240)).print(table)


def _id_column():
    from rich.table import Column

    # Ids are what a user copies into the next command: never wrapped or cut, even in a narrow pipe.
    return Column("id", no_wrap=True, min_width=32)


def _plain(value: str):
    from rich.text import Text

    # User data in a table cell must print as typed: "[x]" in a name is not rich markup.
    return Text(value)


def _when(value: str | None) -> str:
    return value.replace("T", " ")[:19] if value else "-"


def _print_line_errors(errors: list, error_count: int) -> None:
    from rich.text import Text

    for e in errors:
        line, message = (e["line"], e["message"]) if isinstance(e, dict) else (e.line, e.message)
        err.print(Text(f"  line {line}: {message}", style="red"), soft_wrap=True)
    if error_count > len(errors):
        err.print(Text(f"  ... and {error_count - len(errors)} more", style="red"))


def _print_dataset(d: dict) -> None:
    table = Table(show_header=False, title=f"dataset {d['id']}")
    status = f"[green]{d['status']}[/green]" if d["status"] == "ready" else f"[red]{d['status']}[/red]"
    for k, v in (("id", d["id"]), ("filename", _plain(d["filename"])), ("status", status), ("format", d["format"] or "-"),
                 ("rows", f"{d['rows']:,}"), ("token estimate", f"{d['token_estimate']:,}"),
                 ("size", f"{d['bytes']:,} bytes"), ("sha256", d["sha256"]), ("created", _when(d["created_at"]))):
        table.add_row(k, v)
    _print_table(table)
    if d["error_count"]:
        err.print(f"[red]{d['error_count']} invalid line{'s' if d['error_count'] != 1 else ''}; "
                  "this dataset cannot be trained on:[/red]")
        _print_line_errors(d["errors"], d["error_count"])


def _check_file(path: Path):
    from rich.text import Text

    from app.client import check_dataset

    progress, task = _transfer_progress(f"checking {path.name}", path.stat().st_size, transient=True)
    with progress:
        verdict = check_dataset(path, on_progress=lambda n: progress.advance(task, n))
    if not verdict.ok:
        err.print(Text(f"{path}: {verdict.error_count} invalid line{'s' if verdict.error_count != 1 else ''}",
                       style="red"), soft_wrap=True)
        _print_line_errors(verdict.errors, verdict.error_count)
    return verdict


JsonlFile = Annotated[Path, typer.Argument(help="A JSONL dataset.", exists=True, dir_okay=False, readable=True)]


@datasets_cli.command("check")
def datasets_check(file: JsonlFile) -> None:
    """Validate a JSONL file locally, with the server's rules; no server needed. Exits 1 on bad lines."""
    verdict = _check_file(file)
    if not verdict.ok:
        raise typer.Exit(1)
    out.print(f"{file}: ok, format {verdict.format}, {verdict.rows:,} rows, ~{verdict.token_estimate:,} tokens",
              highlight=False, soft_wrap=True)


@datasets_cli.command("upload")
def datasets_upload(ctx: typer.Context, file: JsonlFile,
                    check: Annotated[bool, typer.Option("--check/--no-check", help="Validate locally first and "
                                                        "refuse a file with bad lines.")] = True) -> None:
    """Upload a JSONL dataset, streamed (a file of any size is never held in memory)."""
    if check and not _check_file(file).ok:
        _fail("nothing uploaded: fix the lines above (or pass --no-check to have the server record it as invalid)")
    with _api(ctx) as api:
        progress, task = _transfer_progress(f"uploading {file.name}", file.stat().st_size)
        with progress:
            record = api.upload_dataset(file, on_progress=lambda n: progress.advance(task, n))
    _print_dataset(record)
    if record["status"] != "ready":
        raise typer.Exit(1)


@datasets_cli.command("list")
def datasets_list(ctx: typer.Context, limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50) -> None:
    """List the team's datasets, newest first."""
    with _api(ctx) as api:
        rows = api.list_datasets(limit)
    table = Table(_id_column(), "filename", "status", "format", "rows", "tokens", "created")
    for d in rows:
        table.add_row(d["id"], _plain(d["filename"]), d["status"], d["format"] or "-", f"{d['rows']:,}",
                      f"{d['token_estimate']:,}", _when(d["created_at"]))
    _print_table(table)


@datasets_cli.command("show")
def datasets_show(ctx: typer.Context, dataset_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """One dataset; for an invalid one, its first bad lines with their numbers."""
    with _api(ctx) as api:
        _print_dataset(api.get_dataset(dataset_id))


@datasets_cli.command("delete")
def datasets_delete(ctx: typer.Context, dataset_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with _api(ctx) as api:
        api.delete_dataset(dataset_id)
    out.print(f"dataset {dataset_id} deleted")


JobId = Annotated[str, typer.Argument(metavar="ID", help="Job id.")]


def _steps(job: dict) -> str:
    return f"{job['step']}/{job['total_steps'] if job['total_steps'] is not None else '?'}"


def _status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow", "cancelling": "yellow",
            "running": "cyan"}.get(status, "white")


@jobs_cli.command("create")
def jobs_create(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(help="Job spec JSON (as for `qlora train`).", exists=True, dir_okay=False)],
    dataset: Annotated[str, typer.Option("--dataset", help="Training dataset id.")],
    validation: Annotated[Optional[str], typer.Option("--validation", help="Validation dataset id.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="A name for the job.")] = None,
    gpu_class: Annotated[Optional[str], typer.Option("--gpu-class", help="Run on workers of this GPU class.")] = None,
) -> None:
    """Queue a fine-tuning job: the spec file plus the dataset ids."""
    try:
        body = json.loads(spec.read_text())
    except ValueError as exc:
        _fail(f"{spec} is not valid JSON: {exc}")
    if not isinstance(body, dict):
        _fail(f"{spec} must hold a JSON object (the job spec), not {type(body).__name__}")
    body["dataset_id"] = dataset
    for key, value in (("validation_dataset_id", validation), ("name", name), ("gpu_class", gpu_class)):
        if value is not None:
            body[key] = value
    with _api(ctx) as api:
        job = api.create_job(body)
    out.print(f"job {job['id']} {job['status']}", highlight=False)
    err.print(f"follow it with: qlora jobs watch {job['id']}", highlight=False)


@jobs_cli.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this state (queued, running, succeeded, ...).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
) -> None:
    """List the team's jobs, newest first."""
    with _api(ctx) as api:
        jobs = api.list_jobs(status, limit)
    table = Table(_id_column(), "name", "status", "steps", "base model", "created", "finished")
    for j in jobs:
        table.add_row(j["id"], _plain(j["name"]), f"[{_status_style(j['status'])}]{j['status']}[/]", _steps(j),
                      _plain(j["base_model"]), _when(j["created_at"]), _when(j["finished_at"]))
    _print_table(table)


@jobs_cli.command("show")
def jobs_show(ctx: typer.Context, job_id: JobId) -> None:
    """A job's status, progress, timestamps, error and summary."""
    with _api(ctx) as api:
        job = api.get_job(job_id)
    _print_job(job)


def _print_job(job: dict) -> None:
    from rich.text import Text

    table = Table(show_header=False, title=f"job {job['id']}")
    fraction = job["progress"]["fraction"]
    rows = [
        ("name", _plain(job["name"])),
        ("status", Text(job["status"], style=_status_style(job["status"]))),
        ("base model", _plain(job["base_model"])),
        ("dataset", job["dataset_id"] or "-"),
        ("validation", job["validation_dataset_id"] or "-"),
        ("queue / attempt", f"{job['queue']} / {job['attempt']}"),
        ("progress", f"step {_steps(job)}" + (f" ({fraction:.0%})" if fraction is not None else "")),
        ("trained tokens", f"{job['trained_tokens']:,}"),
        ("created", _when(job["created_at"])),
        ("started", _when(job["started_at"])),
        ("finished", _when(job["finished_at"])),
    ]
    if job["error"]:
        rows.append(("error", Text(job["error"], style="red")))
    rows += _summary_rows(job.get("summary") or {})
    for k, v in rows:
        table.add_row(k, v)
    _print_table(table)


def _summary_rows(s: dict) -> list[tuple[str, str]]:
    """The highlights of a finished job's summary; keys a summary lacks are left out."""
    rows = []
    if s.get("train_loss_final") is not None:
        first = s.get("train_loss_first")
        rows.append(("train loss", (f"{first:.4f} → " if first is not None else "") + f"{s['train_loss_final']:.4f}"))
    if s.get("eval_loss_final") is not None:
        rows.append(("eval loss", f"{s['eval_loss_final']:.4f}"))
    if s.get("tokens_per_second"):
        rows.append(("tokens/s", f"{s['tokens_per_second']:,.0f}"))
    if s.get("peak_memory_bytes"):
        rows.append(("peak memory", f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB"))
    if s.get("parameters"):
        rows.append(("trainable / total params", f"{s['parameters']['trainable']:,} / {s['parameters']['total']:,}"))
    if s.get("merge_fidelity"):
        f = s["merge_fidelity"]
        rows.append(("merge fidelity", f"max |Δlogit| {f['max_abs_logit_diff']:.3g}, Δeval loss {f['eval_loss_diff']:.3g}"))
    return rows


@jobs_cli.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Cancel a job: a queued one at once, a running one after its current step."""
    with _api(ctx) as api:
        job = api.cancel_job(job_id)
    out.print(f"job {job['id']} {job['status']}", highlight=False)


SPARK_LEVELS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line chart of values; a long series is averaged into `width` buckets so the whole
    curve shows, not just its tail."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) > width:
        bounds = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
    low, high = min(values), max(values)
    if high == low:
        return SPARK_LEVELS[len(SPARK_LEVELS) // 2] * len(values)
    top = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[round((v - low) / (high - low) * top)] for v in values)


@jobs_cli.command("watch")
def jobs_watch(
    ctx: typer.Context,
    job_id: JobId,
    interval: Annotated[float, typer.Option(help="Seconds between polls.", min=0.2)] = 1.0,
) -> None:
    """Follow a job live (progress, losses, tokens/s, loss curve, events) until it ends.

    Exits 0 when it succeeded, 1 when it failed, was cancelled or paused. Ctrl-C stops watching; the job keeps running.
    """
    import time

    from rich.live import Live
    from rich.text import Text

    try:
        with _api(ctx) as api:
            watcher = _JobWatcher(api, job_id)
            watcher.poll()  # a wrong id fails here, before the live display starts
            with Live(watcher.view(), console=out, auto_refresh=False) as live:
                while not watcher.ended:
                    time.sleep(interval)
                    watcher.poll()
                    for event in watcher.take_new_events():
                        live.console.print(_event_line(event))
                    live.update(watcher.view(), refresh=True)
            if not out.is_terminal:
                out.line()  # rich ends a live display with a newline only on a terminal
    except KeyboardInterrupt:
        err.print(f"stopped watching; job {job_id} keeps running "
                  f"(`qlora jobs watch {job_id}` to follow it again, `qlora jobs cancel {job_id}` to stop it)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    job = watcher.job
    line = f"job {job['id']} {job['status']} at step {_steps(job)}"
    if job["status"] == "succeeded":
        loss = f", train loss {watcher.train_losses[-1]:.4f}" if watcher.train_losses else ""
        out.print(Text(line + loss, style="green"), soft_wrap=True)
        return
    err.print(Text(line + (f": {job['error']}" if job["error"] else ""), style="red"), soft_wrap=True)
    raise typer.Exit(1)


class _JobWatcher:
    """The state `jobs watch` shows: the job, its loss series and the events not yet printed."""

    UNREACHABLE_LIMIT_S = 300  # ride out an API restart; give up if it stays down this long
    STOP_STATES = ("succeeded", "failed", "cancelled", "paused")  # paused waits for a person: stop watching too

    def __init__(self, api, job_id: str):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.api, self.job_id = api, job_id
        self.job: dict = {}
        self.train_losses: list[float] = []
        self.eval_loss: float | None = None
        self.tokens_per_second: float | None = None
        self.unreachable_since: float | None = None
        self._events: list[dict] = []
        self._last_event_id: int | None = None
        self._metrics_at: tuple | None = None
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("step {task.fields[steps]}"), TextColumn("ETA"), TimeRemainingColumn())
        self._task = self.progress.add_task("", total=None, steps="0/?")

    @property
    def ended(self) -> bool:
        return self.job.get("status") in self.STOP_STATES

    def poll(self) -> None:
        import time

        from app.client import ClientError

        try:
            self.job = self.api.get_job(self.job_id)
            # The curve only changes with the step: skip refetching it between logging steps.
            if self._metrics_at != (self.job["step"], self.job["status"]):
                self._read_metrics(self.api.job_metrics(self.job_id))
                self._metrics_at = (self.job["step"], self.job["status"])
            self._events += self.api.job_events(self.job_id, after=self._last_event_id)
            if self._events:
                self._last_event_id = self._events[-1]["id"]
            self.unreachable_since = None
        except ClientError as exc:
            transient = exc.status is None or exc.status >= 500
            if not self.job or not transient:
                raise
            self.unreachable_since = self.unreachable_since or time.monotonic()
            if time.monotonic() - self.unreachable_since > self.UNREACHABLE_LIMIT_S:
                raise

    def _read_metrics(self, metrics: dict) -> None:
        train = metrics["train"]
        self.train_losses = [p["train_loss"] for p in train if p["train_loss"] is not None]
        speeds = [p["tokens_per_second"] for p in train if p["tokens_per_second"]]
        self.tokens_per_second = speeds[-1] if speeds else None
        evals = [p["eval_loss"] for p in metrics["eval"] if p["eval_loss"] is not None]
        self.eval_loss = evals[-1] if evals else None

    def take_new_events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def view(self):
        import time

        from rich.console import Group
        from rich.text import Text

        job = self.job
        self.progress.update(self._task, description=job["status"], total=job["total_steps"],
                             completed=job["step"], steps=_steps(job))
        header = Text.assemble((f"job {job['id']}", "bold"), f"  {job['name']}  ", (job["status"], _status_style(job["status"])))
        stats = Text.assemble(
            "train loss ", (f"{self.train_losses[-1]:.4f}" if self.train_losses else "-", "bold"),
            "   eval loss ", (f"{self.eval_loss:.4f}" if self.eval_loss is not None else "-", "bold"),
            "   tokens/s ", (f"{self.tokens_per_second:,.0f}" if self.tokens_per_second else "-", "bold"),
            "   loss ", (sparkline(self.train_losses), "cyan"))
        parts = [header, self.progress, stats]
        if self.unreachable_since is not None:
            parts.append(Text(f"the API is not answering; retrying (since {time.monotonic() - self.unreachable_since:.0f}s)",
                              style="yellow"))
        return Group(*parts)


def _event_line(event: dict):
    from rich.text import Text

    style = {"warning": "yellow", "error": "red"}.get(event["level"], "dim")
    step = f" step {event['step']}" if event["step"] is not None else ""
    return Text.assemble((_when(event["created_at"])[11:], "dim"), f"{step} ", (event["type"], style),
                         f": {event['message']}" if event["message"] else "")


@jobs_cli.command("download")
def jobs_download(
    ctx: typer.Context,
    job_id: JobId,
    kind: Annotated[str, typer.Option(help="adapter (LoRA weights) or merged (a standalone bf16 model).")] = "adapter",
    out_dir: Annotated[Path, typer.Option("--out", help="Where to put the archive (and its contents).",
                                          file_okay=False)] = Path("."),
    extract: Annotated[bool, typer.Option("--extract/--no-extract", help="Also unpack the tar into --out.")] = True,
) -> None:
    """Download a job's adapter or merged model, verified against its sha256."""
    import tarfile

    from app.client import extract_tar

    if kind not in ("adapter", "merged"):
        _fail(f"--kind must be adapter or merged, got {kind!r}")
    with _api(ctx) as api:
        progress, task = _transfer_progress(f"downloading {kind}", None)
        with progress:
            archive = api.download_artifact(job_id, kind, out_dir,
                                            on_start=lambda total: progress.update(task, total=total),
                                            on_progress=lambda n: progress.advance(task, n))
    out.print(f"{archive}: sha256 verified", highlight=False, soft_wrap=True)
    if extract:
        try:
            names = extract_tar(archive, out_dir)
        except (tarfile.TarError, OSError) as exc:
            _fail(f"cannot extract {archive}: {exc}")
        out.print(f"extracted {', '.join(n + '/' for n in names)} into {out_dir}", highlight=False, soft_wrap=True)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
