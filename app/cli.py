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
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
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

    import worker.tasks  # noqa: F401  (registers the task)
    from worker.celery_app import celery_app

    celery_app.conf.qlora_worker_name = worker_name
    celery_app.worker_main(["worker", "-Q", queue, "-c", "1", "-P", "prefork", "--prefetch-multiplier", "1",
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
