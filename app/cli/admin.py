"""`qlora admin`: teams, API keys, the model registry, stray objects in storage, the pre-quantized base cache and the
queues' workers, straight against the database (QLORA_DATABASE_URL) and storage (QLORA_STORAGE_URL).

Each command prints its result as text or a table on a terminal and as JSON on a pipe (render.show;
--json/--table override): a model as GET /models answers it, a quota as GET /admin/teams/{team}/quota,
the teams as GET /admin/teams, a new team or a key as its fields. `create-key` alone keeps its stdout
to the key itself, on a terminal and a pipe alike: `KEY=$(qlora admin create-key team)` is how scripts
take it (--json for its id too).
A refused change, or a database that cannot be used, prints one line on stderr and exits 1.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.render import (
    Commands,
    JsonOption,
    err,
    name_column,
    number_column,
    out,
    plain,
    print_job_list,
    print_next_page,
    print_table,
    print_team_list,
    read_pages,
    show,
)
from app.text import agreeing, counted

commands = Commands(help="Administer teams, API keys, the model registry, stray objects in storage and the "
                            "pre-quantized base cache, and see the queues' workers (runs against the database).",
                       no_args_is_help=True)



def _admin_session():
    from app.config import get_settings
    from app.db import session_scope

    return session_scope(get_settings().database_url)


def _admin_call(fn):
    """fn(session) in one transaction; a refused change (AppError) prints its message and exits 1, as does a
    database URL SQLAlchemy cannot use (the settings refuse another scheme before this) and a database that
    cannot be reached or has no schema yet."""
    from sqlalchemy.exc import ArgumentError, OperationalError, ProgrammingError

    from app.config import DATABASE_URL_FORMS, get_settings
    from app.errors import AppError

    url = get_settings().database_url
    try:
        with _admin_session() as session:
            return fn(session)
    except AppError as exc:
        _database_error(exc.message)
    except (ArgumentError, ImportError) as exc:  # ArgumentError: an unparsable URL; ImportError: no driver
        _database_error(f"the database URL {_hide_password(url)} cannot be used: {exc}. "
                        f"QLORA_DATABASE_URL takes {DATABASE_URL_FORMS}")
    except (OperationalError, ProgrammingError) as exc:
        _database_error(f"the database {_hide_password(url)} cannot be used: {str(exc.orig).splitlines()[0]}. "
                        "Is it running, and has `qlora migrate` (or a first `qlora serve`) made its schema?")


def _database_error(message: str):
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)  # names are not markup
    raise typer.Exit(1) from None


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy parses: hide whatever comes before the host
        credentials, at, host = url.rpartition("@")
        scheme = re.match(r"[\w+.-]*://", credentials)
        return f"{scheme.group(0) if scheme else ''}***@{host}" if at else url


@commands.command("create-team")
def create_team(name: str, as_json: JsonOption = None) -> None:
    """Create a team. On a pipe: {"id", "name", "created_at"}."""
    from app.teams import service

    team = _admin_call(lambda s: service.create_team(s, name))
    show({"id": team.id, "name": team.name, "created_at": team.created_at},
         lambda: out.print(f"team {team.name!r} created (id {team.id})"), as_json)


@commands.command("list-teams")
def list_teams(as_json: JsonOption = None) -> None:
    """List the teams: keys live (admin among them), jobs queued, running and paused, GPU-hours this month,
    storage kept, and whether each is disabled. On a pipe: a JSON array, as GET /admin/teams answers."""
    from app.teams import admin

    teams = _admin_call(lambda s: [t.model_dump(mode="json") for t in admin.list_teams(s)])

    show(teams, lambda: print_team_list(teams), as_json)


@commands.command("list-jobs")
def list_jobs(
    team: str,
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this state (queued, running, paused, ...).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-200), newest first; with --all, how many "
                                            "each read takes.")] = 20,
    cursor: Annotated[Optional[str], typer.Option(help="Start after the page that named this cursor.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every job, older pages too.")] = False,
    as_json: JsonOption = None,
) -> None:
    """List TEAM's jobs, newest first, as the team's own `qlora jobs list` shows them: a disabled team's too,
    whose keys answer 401. On a pipe: a JSON array of them, as GET /admin/teams/{team}/jobs answers them.
    Where older jobs follow, stderr names the next page's --cursor; --all reads them all."""
    import json
    import shlex

    from app.jobs.schemas import job_page_json
    from app.teams import admin

    def read(session) -> tuple[list[dict], str | None]:
        def one(at: str | None) -> tuple[list[dict], str | None]:
            found = admin.jobs_of_team(session, team, status, at, limit)
            return json.loads(job_page_json(found.data, None))["data"], found.next_cursor

        return read_pages(one, cursor, every)

    jobs, next_cursor = _admin_call(read)
    show(jobs, lambda: print_job_list(jobs), as_json)
    if next_cursor:
        print_next_page(f"admin list-jobs {shlex.quote(team)}", next_cursor, status=status, limit=limit)


@commands.command("disable-team")
def disable_team(
    team: str,
    reason: Annotated[Optional[str], typer.Option(
        "--reason", help="Why, in one line (up to 500 characters): list-teams shows it, and so does the 401 every "
                         "key of the team gets.")] = None,
    as_json: JsonOption = None,
) -> None:
    """Offboard TEAM without deleting anything: its keys answer 401 (admin keys too), its queued jobs do not
    start, its running jobs pause at a checkpoint; datasets, artifacts, checkpoints and usage stay. Refused
    for the last team whose admin keys work. Who ran it (user and host) is recorded with the reason. On a pipe:
    the team as list-teams shows it, with "pausing": the ids of the jobs asked to pause."""
    from pydantic import ValidationError

    from app.teams import admin
    from app.teams.schemas import DisableTeam

    try:
        reason = DisableTeam(reason=reason).reason  # the API's rules for it
    except ValidationError as exc:
        raise typer.BadParameter(exc.errors()[0]["msg"].removeprefix("Value error, "), param_hint="'--reason'") from None
    disabled = _admin_call(lambda s: admin.disable_team(s, team, reason=reason)).model_dump(mode="json")

    def text() -> None:
        keys, queued = disabled["keys_live"], disabled["queued"]
        out.print(f"team {team!r} disabled: {counted(keys, 'key')} of it {agreeing(keys, 'answers', 'answer')} 401; "
                  f"{counted(queued, 'queued job')} {agreeing(queued, 'waits', 'wait')} until it is enabled; "
                  f"{counted(len(disabled['pausing']), 'running job')} asked to pause at a checkpoint. Nothing is "
                  f"deleted. `qlora admin enable-team {team}` reverses it (paused jobs stay paused until the team "
                  "resumes them).", highlight=False, soft_wrap=True)

    show(disabled, text, as_json)


@commands.command("enable-team")
def enable_team(team: str, as_json: JsonOption = None) -> None:
    """Enable a disabled TEAM again: its keys work and its queued jobs start in their turn; its paused jobs stay
    paused until the team resumes them. On a pipe: the team as list-teams shows it."""
    from app.teams import admin

    enabled = _admin_call(lambda s: admin.enable_team(s, team)).model_dump(mode="json")
    show(enabled, lambda: out.print(f"team {team!r} enabled: its keys work again; {counted(enabled['paused'], 'paused job')} "
                                    "stay paused until the team resumes them.", highlight=False, soft_wrap=True),
         as_json)


@commands.command("create-key")
def create_key(
    team: str,
    admin_key: Annotated[bool, typer.Option("--admin", help="May also manage the model registry.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help='{"id", "team", "prefix", "admin", "key"} instead of the key '
                                          "alone.")] = False,
) -> None:
    """Make an API key for TEAM and print it once; only its hash is stored.

    stdout holds the key alone, on a terminal and on a pipe (KEY=$(qlora admin create-key TEAM)); its id
    and prefix go to stderr. --json prints them all as one object instead."""
    from app.teams import service

    key, secret = _admin_call(lambda s: service.create_key(s, team, admin=admin_key))
    if as_json:
        show({"id": key.id, "team": team, "prefix": key.prefix, "admin": key.is_admin, "key": secret}, lambda: None,
             as_json=True)
        return
    err.print(f"key {key.id} (prefix {key.prefix}) for team {team!r}{' (admin)' if admin_key else ''}; "
              "it is shown only now:", highlight=False)
    print(secret)


def _key_fields(key) -> dict:
    return {"id": key.id, "prefix": key.prefix, "admin": key.is_admin, "created_at": key.created_at,
            "revoked_at": key.revoked_at}


@commands.command("revoke-key")
def revoke_key(key: Annotated[str, typer.Argument(help="Key id, or its prefix (or enough of the prefix to name one key).")],
               as_json: JsonOption = None) -> None:
    """Revoke a key: requests with it answer 401 from now on. On a pipe: {"id", "prefix", "admin", "created_at",
    "revoked_at"}. A prefix that several keys start with is refused, naming them."""
    from app.teams import service

    revoked = _admin_call(lambda s: service.revoke_key(s, key))
    show(_key_fields(revoked), lambda: out.print(f"key {revoked.id} revoked"), as_json)


@commands.command("list-keys")
def list_keys(team: str, as_json: JsonOption = None) -> None:
    """List a team's keys (prefixes only). On a pipe: a JSON array of {"id", "prefix", "admin", "created_at",
    "revoked_at"}."""
    from app.errors import NotFound
    from app.teams import repository

    def rows(session):
        found = repository.team_by_name(session, team)
        if found is None:
            raise NotFound(f"no team named {team!r}")
        return [_key_fields(k) for k in repository.keys_of(session, found.id)]

    keys = _admin_call(rows)

    def table() -> None:
        table = Table("id", "prefix", "admin", "revoked")
        for k in keys:
            table.add_row(k["id"], k["prefix"], "yes" if k["admin"] else "", str(k["revoked_at"] or ""))
        print_table(table)

    show(keys, table, as_json)


@commands.command("add-model")
def add_model(
    name: str,
    path: Annotated[Optional[Path], typer.Option(help="Directory of safetensors weights on the worker hosts.")] = None,
    hub_id: Annotated[Optional[str], typer.Option(help="Hub repository id, for hosts that reach a hub.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (commit or tag); required with --hub-id.")] = None,
    description: str = "",
    as_json: JsonOption = None,
) -> None:
    """Register a base model that jobs may fine-tune. On a pipe: the model, as GET /models answers it.

    A --path this host cannot read is registered all the same (workers resolve it on their own hosts),
    with a warning: without its config.json here, jobs on it get no memory check and no preflight."""
    from app.config import get_settings
    from app.models import service
    from app.models.schemas import ModelOut

    # Absolute, but not resolved: a link under a model root is checked for where it leads (service.model_path),
    # and the name under the root is what the workers' hosts have.
    resolved = Path(os.path.abspath(path.expanduser())) if path else None
    roots = get_settings().allowed_model_roots
    model = _admin_call(lambda s: ModelOut.model_validate(
        service.add_model(s, name, roots=roots, path=str(resolved) if resolved else None, hub_id=hub_id,
                          revision=revision, description=description)))
    if resolved is not None and model.config is None:
        err.print(f"[yellow]warning:[/yellow] {escape(str(resolved / 'config.json'))} is not readable on this host: "
                  "the model is registered, but jobs on it will not have their memory checked and `qlora jobs "
                  "preflight` cannot tokenize its data. Registered where the path is readable, it has both (POST /models "
                  "with its config gives it the memory check).", highlight=False, soft_wrap=True)
    show(model.model_dump(mode="json"), lambda: out.print(f"model {model.name!r} registered"), as_json)


@commands.command("list-models")
def list_models(as_json: JsonOption = None) -> None:
    """List the registered base models. On a pipe: a JSON array of them, as GET /models answers."""
    from app.models import repository
    from app.models.schemas import ModelOut

    models = _admin_call(lambda s: [ModelOut.model_validate(m).model_dump(mode="json") for m in repository.list_all(s)])

    def table() -> None:
        table = Table(name_column("name"), name_column("source"), name_column("description"))
        for m in models:
            table.add_row(plain(m["name"]), plain(m["path"] or f"{m['hub_id']}@{m['revision']}"), plain(m["description"]))
        print_table(table)

    show(models, table, as_json)


@commands.command("remove-model")
def remove_model(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Remove it even while jobs queued, running or paused name "
                                        "it, and cancel those jobs (running ones after their current step).")] = False,
    as_json: JsonOption = None,
) -> None:
    """Remove a base model from the registry (as DELETE /models/NAME): new jobs can no longer ask for it;
    jobs made from it keep their results. Refused while jobs queued, running or paused name it, unless --force
    (?force=true). On a pipe: {"name", "removed": true}."""
    from app.models import service

    _admin_call(lambda s: service.remove_model(s, name, force=force))
    show({"name": name, "removed": True}, lambda: out.print(f"model {name!r} removed"), as_json)


QUOTA_FLAGS = {"weight": "--weight", "max_running": "--max-running", "max_queued": "--max-queued",
               "gpu_hours_per_month": "--gpu-hours-per-month", "storage_gib": "--storage-gib"}


@commands.command("set-quota")
def set_quota(
    team: str,
    weight: Annotated[Optional[float], typer.Option(help="Share of the GPU pool against other teams' (0.01 to 1000).")] = None,
    max_running: Annotated[Optional[int], typer.Option(help="Jobs training at once; 0 starts none.")] = None,
    max_queued: Annotated[Optional[int], typer.Option(help="Jobs waiting at once; 0 refuses every new job.")] = None,
    gpu_hours_per_month: Annotated[Optional[float], typer.Option(help="GPU-hours per calendar month (UTC).")] = None,
    storage_gib: Annotated[Optional[float], typer.Option(help="Datasets, artifacts and checkpoints kept, in GiB.")] = None,
    reset: Annotated[Optional[list[str]], typer.Option(
        "--reset", metavar="FIELD", help="Back to the deployment's default (QLORA_DEFAULT_*); repeatable: "
        "weight, max-running, max-queued, gpu-hours-per-month, storage-gib.")] = None,
    as_json: JsonOption = None,
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
    _print_quota(_admin_call(lambda s: service.report(s, settings, service.set_quota(s, team, changes))), as_json)


@commands.command("show-quota")
def show_quota(team: str, as_json: JsonOption = None) -> None:
    """Show TEAM's quota in force (its own values and the defaults) and its use now. JSON on a pipe."""
    from app.config import get_settings
    from app.quotas import service

    settings = get_settings()
    _print_quota(_admin_call(lambda s: service.show(s, settings, team)), as_json)


def _print_quota(report, as_json: bool | None) -> None:
    """A table on a terminal; the report's JSON (as GET /admin/teams/{team}/quota answers) on a pipe."""
    show(report.model_dump(mode="json"), lambda: _quota_table(report), as_json)


def _quota_table(report) -> None:
    from app.text import format_bytes, format_number

    use = report.use
    in_use = {"max_running": f"{use.running} running", "max_queued": f"{use.queued} queued",
              "gpu_hours_per_month": f"{format_number(use.gpu_hours_this_month)} GPU-hours this month",
              "storage_gib": f"{format_bytes(use.storage_bytes)} stored"}
    table = Table("quota", "in force", "set by", "use now", title=f"team {report.team}")
    for field, flag in QUOTA_FLAGS.items():
        value = getattr(report.quota, field)
        own = getattr(report.own, field) is not None
        table.add_row(flag.removeprefix("--"), "no limit" if value is None else format_number(value),
                      "team" if own else "default", in_use.get(field, ""))
    print_table(table)


@commands.command("status")
def status(as_json: JsonOption = None) -> None:
    """Each queue (GPU class): its workers alive, its jobs queued, how long the oldest has waited, and the
    worker of it heard from last. A queue whose jobs wait while no worker of it is alive is named on stderr.
    On a pipe: {"queues": [{"queue", "gpu_class", "workers_alive", "queued", "oldest_wait_s", "last_seen",
    "stranded"}], "alive_within_s"}."""
    from app.config import get_settings
    from app.operations.service import queue_health
    from app.operations.workers import WORKER_ALIVE_S

    settings = get_settings()
    queues = _admin_call(lambda s: queue_health(s, settings))
    answer = {"queues": [{
        "queue": q.queue, "gpu_class": q.queue.removeprefix("gpu-"), "workers_alive": q.workers_alive,
        "queued": q.queued, "oldest_wait_s": round(q.oldest_wait_s, 3),
        "last_seen": {"worker": q.last_seen.name, "at": q.last_seen.seen_at} if q.last_seen else None,
        "stranded": q.stranded} for q in queues], "alive_within_s": WORKER_ALIVE_S}

    def table() -> None:
        table = Table(name_column("queue"), number_column("workers alive"), number_column("queued"),
                      number_column("oldest waits"), name_column("last seen"),
                      title=f"queues (a worker is alive if heard from within {WORKER_ALIVE_S:g} s)")
        for q in queues:
            seen = f"{q.last_seen.name}, {_age(q.last_seen_s or 0)} ago" if q.last_seen else ""
            table.add_row(plain(q.queue), str(q.workers_alive), str(q.queued), _age(q.oldest_wait_s) if q.queued else "",
                          plain(seen))
        print_table(table)

    show(answer, table, as_json)
    for q in queues:
        if q.stranded:
            seen = (f"its last worker, {q.last_seen.name}, was heard from {_age(q.last_seen_s or 0)} "
                    "ago" if q.last_seen else "no worker of it has said it is up")
            err.print(f"[yellow]warning:[/yellow] no worker alive for queue {escape(q.queue)} while "
                      f"{counted(q.queued, 'job')} {agreeing(q.queued, 'waits', 'wait')} "
                      f"(the oldest for {_age(q.oldest_wait_s)}); {escape(seen)}. "
                      f"Start one: qlora worker --gpu-class {escape(q.queue.removeprefix('gpu-'))}",
                      highlight=False, soft_wrap=True)


@commands.command("sweep-storage")
def sweep_storage(
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="AGE", help="Only objects last changed at least this long ago: 30m, 24h, 7d (at "
        "least 1h without --force).")] = "24h",
    delete: Annotated[bool, typer.Option("--delete", help="Delete the stray objects listed (by default nothing is "
                                         "deleted).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow an age under 1h, and deleting where the database "
                                        "looks empty or wrong (no stored object referenced by any row).")] = False,
    as_json: JsonOption = None,
) -> None:
    """List the stray objects in storage: committed, of the service's key form, referenced by no row of
    the database, last changed longer ago than --older-than. With --delete, delete them (each checked again
    just before). Other files in the bucket or directory are never listed or touched. On a pipe: JSON."""
    from app.config import get_settings
    from app.operations import storage_sweep as sweeping
    from app.storage.base import storage_from_settings, storage_out_of_reach

    try:
        older_than_s = sweeping.parse_age(older_than)
        sweeping.check_age(older_than_s, force)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--older-than'") from None
    settings = get_settings()
    storage = storage_from_settings(settings)

    def run(session) -> dict:
        sweep = sweeping.find_strays(session, storage, older_than_s)
        deletion = sweeping.delete_strays(session, storage, sweep, force=force) if delete else None
        return sweeping.report(session, sweep, deletion)

    try:
        answer = _admin_call(run)
    except typer.Exit:
        raise
    except Exception as exc:
        # Storage out of reach, refused (no credentials, no such bucket) or a directory that cannot be read.
        if not (storage_out_of_reach(exc) or isinstance(exc, OSError) or type(exc).__module__.startswith("botocore")):
            raise
        _database_error(f"storage {settings.storage_url} cannot be used: {exc}")
    show(answer, lambda: _print_sweep(answer, older_than), as_json)
    if answer["deleted"] and answer["deleted"]["failed"]:
        raise typer.Exit(1)


@commands.command("list-quantized-bases")
def list_quantized_bases(as_json: JsonOption = None) -> None:
    """List the pre-quantized base cache, least recently used first: each entry's model, quantization, GPU
    class, library versions, size, when it was stored and last loaded by a job, and when the reaper prunes
    it unless a job loads it first (QLORA_QUANTIZED_CACHE_KEEP_DAYS). On a pipe: a JSON array of {"key",
    "model", "path", "hub_id", "revision", "quantization", "gpu_class", "transformers", "bitsandbytes",
    "bytes", "storage_key", "created_at", "last_used_at", "prune_after"}."""
    from app.config import get_settings
    from app.jobs import quantized_cache

    settings = get_settings()
    cached = _admin_call(lambda s: quantized_cache.entries(s, settings))
    show(cached, lambda: _print_quantized_bases(cached, settings.quantized_cache_keep_days), as_json)


def _print_quantized_bases(cached: list[dict], keep_days: float) -> None:
    from app.text import format_bytes

    def when(moment) -> str:
        return moment.strftime("%Y-%m-%d %H:%M") if moment else "never"

    kept = f"pruned {keep_days:g} days after their last use" if keep_days else "kept for ever (QLORA_QUANTIZED_CACHE_KEEP_DAYS=0)"
    table = Table(name_column("model"), "quantization", "GPU class", "transformers", "bitsandbytes", number_column("size"),
                  "created", "last used", "pruned after", title=f"quantized bases ({kept})")
    for entry in cached:
        table.add_row(plain(entry["model"] or "?"), entry["quantization"] or "?", plain(entry["gpu_class"] or "?"),
                      entry["transformers"] or "?", entry["bitsandbytes"] or "?", format_bytes(entry["bytes"]),
                      when(entry["created_at"]), when(entry["last_used_at"]),
                      when(entry["prune_after"]) if entry["prune_after"] else "kept")
    print_table(table, optional=("created", "GPU class"))
    out.print(f"{counted(len(cached), 'quantized base')}, {format_bytes(sum(e['bytes'] for e in cached))} in storage.",
              highlight=False)


@commands.command("prune-quantized-bases")
def prune_quantized_bases(
    older_than: Annotated[Optional[str], typer.Option(
        "--older-than", metavar="DAYS", help="Prune the entries no job has loaded for this long: a number of days, "
        "or 12h, 30m. By default QLORA_QUANTIZED_CACHE_KEEP_DAYS.")] = None,
    as_json: JsonOption = None,
) -> None:
    """Prune the pre-quantized base cache now, as the reaper does on its own: delete the entries no job has
    loaded for --older-than (their rows, then their objects in storage). A job that needs one later quantizes
    its base afresh and stores it again; one loading it at that moment does the same. On a pipe: {"used_before",
    "count", "bytes", "pruned", "left_in_storage"}, each pruned entry as list-quantized-bases shows it."""
    from app.config import get_settings
    from app.jobs import quantized_cache
    from app.storage.base import storage_from_settings

    settings = get_settings()
    older_than_s = _days_or_age(older_than) if older_than is not None else quantized_cache.keep_s(settings)
    if older_than_s is None:
        raise typer.BadParameter("QLORA_QUANTIZED_CACHE_KEEP_DAYS is 0 (keep every entry for ever): say how long an "
                                 "entry must have been unused to go, as --older-than 30", param_hint="'--older-than'")
    storage = storage_from_settings(settings)
    pruned = _admin_call(lambda s: quantized_cache.prune(s, storage, older_than_s)).report()

    def text() -> None:
        from app.text import format_bytes

        out.print(f"Pruned {counted(pruned['count'], 'quantized base')} unused since "
                  f"{pruned['used_before'].strftime('%Y-%m-%d %H:%M')} UTC, freed {format_bytes(pruned['bytes'])}"
                  + "".join(f"\n  {entry['model']} ({entry['quantization']}, transformers {entry['transformers']}, "
                            f"bitsandbytes {entry['bitsandbytes']}), {format_bytes(entry['bytes'])}"
                            for entry in pruned["pruned"]), highlight=False, soft_wrap=True)

    show(pruned, text, as_json)
    if pruned["left_in_storage"]:
        err.print(f"[red]error:[/red] storage would not delete {counted(len(pruned['left_in_storage']), 'object')} of "
                  "them (their entries are gone all the same): `qlora admin sweep-storage --delete` removes them once "
                  "storage answers", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _days_or_age(text: str) -> float:
    """--older-than: a number of days (30, 0.5), or an age as sweep-storage takes it (12h, 30m, 7d); not 0."""
    from app.operations.storage_sweep import parse_age

    try:
        seconds = float(text) * 86400 if re.fullmatch(r"\d+(\.\d+)?", text.strip()) else parse_age(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).replace("as 30m", "as 30 (days), 30m"), param_hint="'--older-than'") from None
    if seconds <= 0:
        raise typer.BadParameter("0 would prune every entry, those jobs loaded a moment ago too; give an age, as 30 "
                                 "(days) or 12h", param_hint="'--older-than'")
    return seconds


def _age(seconds: float) -> str:
    minutes = int(seconds // 60)
    days, hours = divmod(minutes // 60, 24)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes % 60}m" if hours else f"{minutes}m"


def _print_sweep(answer: dict, older_than: str) -> None:
    from app.text import format_bytes

    def team(row: dict) -> str:
        return row["team"] or f"{row['team_id']} (no such team)"

    if answer["strays"]:
        strays = Table(name_column("key"), name_column("team"), "kind", number_column("size"), number_column("age"),
                       title="stray objects (no row refers to them)")
        for s in answer["strays"]:
            strays.add_row(plain(s["key"]), plain(team(s)), s["kind"], format_bytes(s["bytes"]), _age(s["age_s"]))
        print_table(strays)
        summary = Table(name_column("team"), "kind", number_column("objects"), number_column("size"),
                        title="by team and kind")
        for row in answer["summary"]:
            summary.add_row(plain(team(row)), row["kind"], str(row["count"]), format_bytes(row["bytes"]))
        print_table(summary)
    seen = answer["storage"]
    out.print(f"{answer['total']['count']} stray objects, {format_bytes(answer['total']['bytes'])}, last changed "
              f"{older_than} ago or more. In storage: {seen['objects']} objects of the service's, {seen['referenced']} "
              f"referenced by a row, {seen['young']} unreferenced but younger (left alone); {seen['foreign']} other "
              "files, not the service's (never touched).", highlight=False, soft_wrap=True)
    if answer["database_looks_wrong"]:
        err.print("[yellow]warning:[/yellow] no stored object is referenced by any row of the database: it looks "
                  "empty or wrong (check QLORA_DATABASE_URL); --delete refuses without --force", highlight=False)
    deleted = answer["deleted"]
    if deleted is None:
        if answer["strays"]:
            out.print(f"Nothing deleted: `qlora admin sweep-storage --older-than {older_than} --delete` deletes them.",
                      highlight=False)
        return
    out.print(f"Deleted {deleted['count']} objects, freed {format_bytes(deleted['bytes'])}.", highlight=False)
    if deleted["kept_referenced_now"]:
        out.print(f"Kept {len(deleted['kept_referenced_now'])}: a row refers to them now.", highlight=False)
    if deleted["failed"]:
        err.print(f"[red]error:[/red] stopped at {escape(deleted['failed']['key'])}, which storage would not delete: "
                  f"{escape(deleted['failed']['error'])}; run the sweep again once storage answers", highlight=False,
                  soft_wrap=True)
