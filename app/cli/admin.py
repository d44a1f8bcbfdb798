"""`qlora admin`: teams, API keys and the model registry, straight against the database (QLORA_DATABASE_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.render import err, out, print_table

commands = typer.Typer(help="Administer teams, API keys and the model registry (runs against the database).",
                       no_args_is_help=True)


def _admin_session():
    from app.config import get_settings
    from app.db import session_scope

    return session_scope(get_settings().database_url)


def _admin_call(fn):
    """fn(session) in one transaction; a refused change (AppError) prints its message and exits 1, as does a
    database that cannot be reached or has no schema yet."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from app.config import get_settings
    from app.errors import AppError

    try:
        with _admin_session() as session:
            return fn(session)
    except AppError as exc:
        err.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True)  # names are not markup
        raise typer.Exit(1) from None
    except (OperationalError, ProgrammingError) as exc:
        url = make_url(get_settings().database_url).render_as_string(hide_password=True)
        err.print(f"[red]error:[/red] the database {escape(url)} cannot be used: {escape(str(exc.orig).splitlines()[0])}. "
                  "Is it running, and has `qlora migrate` (or a first `qlora serve`) made its schema?",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@commands.command("create-team")
def create_team(name: str) -> None:
    """Create a team."""
    from app.teams import service

    team = _admin_call(lambda s: service.create_team(s, name))
    out.print(f"team {team.name!r} created (id {team.id})")


@commands.command("create-key")
def create_key(team: str, admin_key: Annotated[bool, typer.Option("--admin", help="May also manage the model registry.")] = False) -> None:
    """Make an API key for TEAM and print it once; only its hash is stored."""
    from app.teams import service

    key, secret = _admin_call(lambda s: service.create_key(s, team, admin=admin_key))
    err.print(f"key {key.id} (prefix {key.prefix}) for team {team!r}{' (admin)' if admin_key else ''}; "
              "it is shown only now:", highlight=False)
    print(secret)


@commands.command("revoke-key")
def revoke_key(key: Annotated[str, typer.Argument(help="Key id or prefix.")]) -> None:
    """Revoke a key: requests with it answer 401 from now on."""
    from app.teams import service

    revoked = _admin_call(lambda s: service.revoke_key(s, key))
    out.print(f"key {revoked.id} revoked")


@commands.command("list-keys")
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


@commands.command("add-model")
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


@commands.command("list-models")
def list_models() -> None:
    """List the registered base models."""
    from app.models import repository

    table = Table("name", "source", "description")
    for row in _admin_call(lambda s: [(m.name, m.path or f"{m.hub_id}@{m.revision}", m.description)
                                      for m in repository.list_all(s)]):
        table.add_row(*row)
    out.print(table)


QUOTA_FLAGS = {"weight": "--weight", "max_running": "--max-running", "max_queued": "--max-queued",
               "gpu_hours_per_month": "--gpu-hours-per-month", "storage_gib": "--storage-gib"}


@commands.command("set-quota")
def set_quota(
    team: str,
    weight: Annotated[Optional[float], typer.Option(help="Share of the GPU pool against other teams' (> 0, <= 1000).")] = None,
    max_running: Annotated[Optional[int], typer.Option(help="Jobs training at once; 0 starts none.")] = None,
    max_queued: Annotated[Optional[int], typer.Option(help="Jobs waiting at once; 0 refuses every new job.")] = None,
    gpu_hours_per_month: Annotated[Optional[float], typer.Option(help="GPU-hours per calendar month (UTC).")] = None,
    storage_gib: Annotated[Optional[float], typer.Option(help="Datasets, artifacts and checkpoints kept, in GiB.")] = None,
    reset: Annotated[Optional[list[str]], typer.Option(
        "--reset", metavar="FIELD", help="Back to the deployment's default (QLORA_DEFAULT_*); repeatable: "
        "weight, max-running, max-queued, gpu-hours-per-month, storage-gib.")] = None,
) -> None:
    """Set TEAM's quota: the options given change; the others stay as they are. Prints the quota in force."""
    from app.config import get_settings
    from app.quotas import service

    given = {"weight": weight, "max_running": max_running, "max_queued": max_queued,
             "gpu_hours_per_month": gpu_hours_per_month, "storage_gib": storage_gib}
    changes: dict = {field: value for field, value in given.items() if value is not None}
    for name in reset or []:
        field = name.removeprefix("--").replace("-", "_")
        if field not in QUOTA_FLAGS:
            err.print(f"[red]error:[/red] --reset {escape(repr(name))}: no such quota; use one of "
                      f"{', '.join(flag.removeprefix('--') for flag in QUOTA_FLAGS.values())}", highlight=False)
            raise typer.Exit(2)
        if field in changes:
            err.print(f"[red]error:[/red] {QUOTA_FLAGS[field]} and --reset {escape(name)} contradict each other; "
                      "give one", highlight=False)
            raise typer.Exit(2)
        changes[field] = None
    if not changes:
        err.print("[red]error:[/red] nothing to change: give --weight, --max-running, --max-queued, "
                  "--gpu-hours-per-month, --storage-gib or --reset FIELD (qlora admin show-quota TEAM shows it)",
                  highlight=False)
        raise typer.Exit(2)
    settings = get_settings()
    _print_quota(_admin_call(lambda s: service.report(s, settings, service.set_quota(s, team, changes))))


@commands.command("show-quota")
def show_quota(team: str) -> None:
    """Show TEAM's quota in force (its own values and the defaults) and its use now. JSON on a pipe."""
    from app.config import get_settings
    from app.quotas import service

    settings = get_settings()
    _print_quota(_admin_call(lambda s: service.show(s, settings, team)))


def _print_quota(report) -> None:
    """A table on a terminal; the report's JSON (as GET /admin/teams/{team}/quota answers) on a pipe."""
    from app.text import format_bytes

    if not out.is_terminal:
        print(report.model_dump_json(indent=2))
        return
    use = report.use
    in_use = {"max_running": f"{use.running} running", "max_queued": f"{use.queued} queued",
              "gpu_hours_per_month": f"{use.gpu_hours_this_month:g} GPU-hours this month",
              "storage_gib": f"{format_bytes(use.storage_bytes)} stored"}
    table = Table("quota", "in force", "set by", "use now", title=f"team {report.team}")
    for field, flag in QUOTA_FLAGS.items():
        value = getattr(report.quota, field)
        own = getattr(report.own, field) is not None
        table.add_row(flag.removeprefix("--"), "no limit" if value is None else f"{value:g}",
                      "team" if own else "default", in_use.get(field, ""))
    print_table(table)
