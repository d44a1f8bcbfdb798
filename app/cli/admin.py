"""`qlora admin`: teams, API keys and the model registry, straight against the database (QLORA_DATABASE_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from app.cli.render import err, out

commands = typer.Typer(help="Administer teams, API keys and the model registry (runs against the database).",
                       no_args_is_help=True)


def _admin_session():
    from app.config import get_settings
    from app.db import session_scope

    return session_scope(get_settings().database_url)


def _admin_call(fn):
    """fn(session) in one transaction; a refused change (AppError) prints its message and exits 1."""
    from app.errors import AppError

    try:
        with _admin_session() as session:
            return fn(session)
    except AppError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False)
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
