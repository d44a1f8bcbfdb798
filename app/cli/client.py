"""The API over HTTP: `qlora datasets ...`, `qlora jobs ...` and `qlora usage`, with the live watcher of `qlora jobs watch`.

HTTP lives in api_client.py and the output in render.py; these commands only parse arguments and
say what to show. None of them imports torch.

Each prints its result for a person on a terminal and as JSON on a pipe (render.show; --json/--table
override): the API's answer, or for what has none (a local check, a delete, a download) an object that
says the same. `jobs watch` on a pipe prints one JSON object a line as things happen. Errors, hints and
progress always go to stderr as text, and a refused request exits 1.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Column, Table
from typer.core import TyperGroup

from app.cli.render import (
    Commands,
    JsonOption,
    LossTrail,
    err,
    event_line,
    id_column,
    json_line,
    name_column,
    number_column,
    out,
    plain,
    print_dataset,
    print_dataset_errors,
    print_job,
    print_job_list,
    print_line_errors,
    print_next_page,
    print_preflight,
    print_report,
    print_table,
    print_usage,
    printable,
    queue_position,
    read_pages,
    reward_line,
    show,
    sparkline,
    status_column,
    status_style,
    status_text,
    steps,
    transfer_progress,
    wants_json,
    when,
)
from app.text import counted

UrlOption = Annotated[Optional[str], typer.Option("--url", help="API URL; else QLORA_URL, else $QLORA_HOME/credentials.json.")]
KeyOption = Annotated[Optional[str], typer.Option("--api-key", help="API key; else QLORA_API_KEY, else $QLORA_HOME/credentials.json.")]

class _ClientCommands(Commands):
    """The verbs that talk to the API: each runs through `_guarded`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:  # type: ignore[override]
        register = super().command(*args, **kwargs)

        def decorator(command: Callable) -> Callable:
            register(_guarded(command))
            return command

        return decorator


class _ConnectionOptionsFirst(TyperGroup):
    """`qlora jobs list --url URL` said only "No such option: --url": the option is the group's, given before
    the verb. Said so, with the line that works."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context, which typer does not export
        try:
            return super().invoke(ctx)
        except typer.TyperException as exc:  # typer's own click: its NoSuchOption is not public, its option_name is
            option = getattr(exc, "option_name", None)
            if option in ("--url", "--api-key"):
                exc.message = (f"No such option: {option}: it goes before the command, "
                               f"`qlora {ctx.info_name} {option} VALUE {ctx.invoked_subcommand or 'COMMAND'} ...`"
                               f" (or set {'QLORA_URL' if option == '--url' else 'QLORA_API_KEY'})")
            raise


datasets_commands = _ClientCommands(help="Check, upload, list and delete datasets (JSONL).", no_args_is_help=True,
                                    cls=_ConnectionOptionsFirst)
jobs_commands = _ClientCommands(help="Create, watch, cancel and download fine-tuning jobs.", no_args_is_help=True,
                                cls=_ConnectionOptionsFirst)

API = "qlora.api"  # ctx.meta: the command's ApiClient, once `_api` made it
INTERRUPTED = "qlora.interrupted"  # ctx.meta: what Ctrl-C leaves behind, for a command that changes something
SHAPE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def _guarded(command: Callable) -> Callable:
    """Every client verb runs inside this, so that two things end the same way whichever verb meets them:

    - Ctrl-C prints one line on stderr, what `_on_interrupt` set (for a verb that changes something) or
      "nothing was changed", and exits 130, as the shell's own SIGINT status says.
    - JSON from the API of another shape than this CLI reads ({"items": 5}, an array where an object
      belongs, a field missing) says so, naming the request it answered, and exits 1: not a KeyError's
      traceback from deep in a table. Only once the API has answered: before that, such an error is ours.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from app.cli.api_client import UnexpectedAnswer

        ctx = kwargs.get("ctx")  # every verb that calls the API takes it so (`datasets check` calls none)
        meta = ctx.meta if ctx is not None else {}
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted(meta.get(INTERRUPTED, "interrupted; nothing was changed"))
        except SHAPE_ERRORS as exc:
            api = meta.get(API)
            if api is None or api.last_answered is None:
                raise
            what = f'a field "{exc.args[0]}" is missing' if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            _fail(UnexpectedAnswer(api.last_answered, what[:200]).message)

    return run


def _on_interrupt(ctx: typer.Context, line: str) -> None:
    """What `_guarded` says on Ctrl-C from here on: what became of a request that changes something."""
    ctx.meta[INTERRUPTED] = line


@datasets_commands.callback()
def _datasets_options(ctx: typer.Context, url: UrlOption = None, api_key: KeyOption = None) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


@jobs_commands.callback()
def _jobs_options(ctx: typer.Context, url: UrlOption = None, api_key: KeyOption = None) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


def _fail(message: str, details=None, code: int = 1):
    from rich.text import Text

    # Text, not markup: messages quote user data ("[...]" in a filename must print as-is).
    headline, lines = _error_lines(message, details)
    err.print(Text(f"error: {printable(headline)}", style="red"), soft_wrap=True)
    for line in lines:
        err.print(Text(f"  {printable(line)}", style="red"), soft_wrap=True)
    raise typer.Exit(code)


def _error_lines(message: str, details) -> tuple[str, list[str]]:
    """An API error as a headline and one line per detail, each said once. The API writes the details
    into its message too ("invalid job: lora.r: ...; training.max_steps: ..."), for a client that shows
    the message alone: several of them fold out of the headline into their own lines, one stays in it,
    and a detail the message does not hold gets a line of its own."""
    lines = _detail_lines(details)
    joined = "; ".join(lines)
    if len(lines) > 1 and message.endswith(joined) and message[:-len(joined)].strip():
        return message[:-len(joined)].rstrip(), lines
    return message, [line for line in lines if line not in message]


def _interrupted(message: str):
    """Ctrl-C: what became of the command's work, in one line, and the shell's exit status for SIGINT."""
    err.print(message, highlight=False, soft_wrap=True)
    raise typer.Exit(130)


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

    from rich.text import Text

    from app.cli.api_client import ApiClient, ClientError

    @contextmanager
    def session():
        try:
            with ApiClient.from_sources(**(ctx.obj or {}), warn=lambda message: err.print(
                    Text(message, style="yellow"), soft_wrap=True)) as api:
                ctx.meta[API] = api
                yield api
        except ClientError as exc:
            _fail(exc.message, exc.details)

    return session()


# ---------------------------------------------------------------- datasets


def _check_file(path: Path):
    from rich.text import Text

    from app.cli.api_client import check_dataset

    progress, task = transfer_progress(f"checking {path.name}", path.stat().st_size, transient=True)
    with progress:
        verdict = check_dataset(path, on_progress=lambda n: progress.advance(task, n))
    if not verdict.ok:
        err.print(Text(f"{path}: {counted(verdict.error_count, 'invalid line')}",
                       style="red"), soft_wrap=True)
        print_line_errors(verdict.errors, verdict.error_count)
    return verdict


def _regular_file(path: Path) -> Path:
    """A file argument must be a regular file: a FIFO would wait for a writer forever, and /dev/zero (or
    any device) never ends, so reading it would fill the memory."""
    import stat

    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise typer.BadParameter(f"{path} is not a regular file")
    return path


JsonlFile = Annotated[Path, typer.Argument(help="A JSONL dataset.", exists=True, dir_okay=False, readable=True,
                                           callback=_regular_file)]
SpecFile = Annotated[Path, typer.Argument(help="Job spec JSON (as for `qlora train`).", exists=True, dir_okay=False,
                                          readable=True, callback=_regular_file)]


def _idempotency_key(value: str | None) -> str | None:
    from app.cli.api_client import API_KEY

    # As the API takes it: 1-255 visible ASCII characters (a non-ASCII one would not even make a header).
    if value is not None and not (len(value) <= 255 and API_KEY.fullmatch(value)):
        raise typer.BadParameter("1 to 255 visible ASCII characters, no spaces (a UUID does)")
    return value


IdempotencyKeyOption = Annotated[Optional[str], typer.Option(
    "--idempotency-key", metavar="KEY", callback=_idempotency_key,
    help="Send the creation with this Idempotency-Key (default: a new one): the same key with the same request "
         "(for an upload: the same file and name) within 24 hours is answered with what it made, never a second one.")]


@datasets_commands.command("check")
def datasets_check(file: JsonlFile, as_json: JsonOption = None) -> None:
    """Validate a JSONL file locally, with the server's rules; no server needed. Exits 1 on bad lines.

    On a pipe: {"file", "ok", "format", "rows", "token_estimate", "error_count", "errors": [{"line", "message"}]}."""
    verdict = _check_file(file)
    answer = {"file": str(file), "ok": verdict.ok, "format": verdict.format, "rows": verdict.rows,
              "token_estimate": verdict.token_estimate, "error_count": verdict.error_count,
              "errors": [{"line": e.line, "message": e.message} for e in verdict.errors]}

    def text() -> None:
        if verdict.ok:  # else the bad lines on stderr said it all
            out.print(f"{file}: ok, format {verdict.format}, {verdict.rows:,} rows, ~{verdict.token_estimate:,} tokens",
                      highlight=False, soft_wrap=True)

    show(answer, text, as_json)
    if not verdict.ok:
        raise typer.Exit(1)


@datasets_commands.command("upload")
def datasets_upload(ctx: typer.Context, file: JsonlFile,
                    check: Annotated[bool, typer.Option("--check/--no-check", help="Validate locally first and "
                                                        "refuse a file with bad lines.")] = True,
                    idempotency_key: IdempotencyKeyOption = None,
                    as_json: JsonOption = None) -> None:
    """Upload a JSONL dataset, streamed (a file of any size is never held in memory).

    On a pipe: the dataset as the API recorded it ("id", "status", ...). Exits 1 unless it is ready."""
    import uuid

    if check and not _check_file(file).ok:
        _fail("nothing uploaded: fix the lines above (or pass --no-check to have the server record it as invalid)")
    key = idempotency_key or str(uuid.uuid4())
    # The server records a dataset only once the whole file has arrived: a broken-off upload leaves none.
    _on_interrupt(ctx, f"upload stopped; nothing was recorded (`qlora datasets upload {file}` to upload it again)")
    # Once it has all gone, Ctrl-C may come while the server is storing it: then it may be there, and the same
    # command again would send a new key, and may record a second copy; this key makes the retry safe.
    sent_whole = functools.partial(_on_interrupt, ctx, "upload stopped after the whole file was sent; the server "
                                   "may have recorded it (`qlora datasets list` shows it): to send it again safely, "
                                   f"add --idempotency-key {key} (the server makes one dataset per key within 24 hours)")
    with _api(ctx) as api:
        progress, task = transfer_progress(f"uploading {file.name}", file.stat().st_size)
        with progress:
            # A try sent again starts the bar over: reset, not advanced backwards, which would leave the
            # first try's bytes in the speed (negative) or its finished speed on the bar.
            record = api.upload_dataset(file, on_progress=lambda n: progress.advance(task, n),
                                        on_restart=lambda: progress.reset(task), on_sent=sent_whole,
                                        idempotency_key=key)
    show(record, lambda: print_dataset(record), as_json)
    print_dataset_errors(record)
    if record["status"] != "ready":
        raise typer.Exit(1)


@datasets_commands.command("list")
def datasets_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many (1-200), newest first; with --all, how many "
                                            "each request reads.")] = 50,
    cursor: Annotated[Optional[str], typer.Option(help="Start after the page that named this cursor (the previous "
                                                       "list prints it when there are older datasets).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every dataset, older pages too (read --limit at a time).")] = False,
    as_json: JsonOption = None,
) -> None:
    """List the team's datasets, newest first. On a pipe: a JSON array of them, each as the API answers it.

    Where there are older datasets than the page shows, stderr names the cursor of the next page
    (`--cursor CURSOR`); --all reads them all, page after page, into the one list (the JSON array on a pipe)."""
    with _api(ctx) as api:
        rows, next_cursor = read_pages(lambda at: api.list_datasets(limit, at), cursor, every)

    def table() -> None:
        table = Table(id_column(), name_column("filename"), status_column(), name_column("format"), number_column("rows"),
                      number_column("~tokens"), Column("created", no_wrap=True))
        for d in rows:
            # The upload's estimate (characters / 4), as `datasets show` and `check` say: the preflight's count, through
            # the chat template, differs (the demo's 200 rows: ~2,921 here, 4,417 tokenized).
            table.add_row(d["id"], plain(d["filename"]), d["status"], d["format"] or "-", f"{d['rows']:,}",
                          f"{d['token_estimate']:,}", when(d["created_at"]))
        print_table(table, optional=("format", "created", "~tokens"))

    show(rows, table, as_json)
    if next_cursor:
        print_next_page("datasets list", next_cursor, limit=limit)


@datasets_commands.command("show")
def datasets_show(ctx: typer.Context, dataset_id: Annotated[str, typer.Argument(metavar="ID")],
                  as_json: JsonOption = None) -> None:
    """One dataset; for an invalid one, its first bad lines with their numbers. On a pipe: the API's answer."""
    with _api(ctx) as api:
        record = api.get_dataset(dataset_id)
    show(record, lambda: print_dataset(record), as_json)
    print_dataset_errors(record)


@datasets_commands.command("delete")
def datasets_delete(ctx: typer.Context, dataset_id: Annotated[str, typer.Argument(metavar="ID")],
                    as_json: JsonOption = None) -> None:
    """Delete a dataset (refused while a queued or running job uses it). On a pipe: {"id", "deleted": true}."""
    _on_interrupt(ctx, f"interrupted; dataset {dataset_id} may or may not have been deleted "
                       f"(`qlora datasets show {dataset_id}` tells; the same command again is safe)")
    with _api(ctx) as api:
        api.delete_dataset(dataset_id)
    show({"id": dataset_id, "deleted": True}, lambda: out.print(f"dataset {dataset_id} deleted"), as_json)


# ---------------------------------------------------------------- jobs

JobId = Annotated[str, typer.Argument(metavar="ID", help="Job id.")]
InitialJobOption = Annotated[Optional[str], typer.Option(
    "--initial-job", metavar="ID", help="Start from this succeeded job's adapter (SFT, then DPO from it).")]


@jobs_commands.command("create")
def jobs_create(
    ctx: typer.Context,
    spec: SpecFile,
    dataset: Annotated[str, typer.Option("--dataset", help="Training dataset id.")],
    validation: Annotated[Optional[str], typer.Option("--validation", help="Validation dataset id.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="A name for the job.")] = None,
    gpu_class: Annotated[Optional[str], typer.Option("--gpu-class", help="Run on workers of this GPU class.")] = None,
    priority: Annotated[Optional[str], typer.Option(
        "--priority", help="low, normal or high: the order among your team's own queued jobs.")] = None,
    initial_job: InitialJobOption = None,
    idempotency_key: IdempotencyKeyOption = None,
    as_json: JsonOption = None,
) -> None:
    """Queue a fine-tuning job: the spec file plus the dataset ids. A spec with "method": {"type": "dpo"}
    trains on a preference dataset, usually from an SFT job's adapter (--initial-job).

    On a pipe: the job as the API answers it ("id", "status", ...); the preflight's warnings go to stderr either way."""
    import uuid

    from rich.text import Text

    body = _job_body(spec, dataset=dataset, validation_dataset_id=validation, name=name, gpu_class=gpu_class,
                     priority=priority, initial_job_id=initial_job)
    key = idempotency_key or str(uuid.uuid4())
    # The same command again would send a new key, and may make a second job; this key makes the retry safe.
    _on_interrupt(ctx, f"interrupted; the job may or may not have been created (`qlora jobs list` shows it if it was): "
                       f"to send it again safely, add --idempotency-key {key} (the server makes one job per key within 24 hours)")
    with _api(ctx) as api:
        job = api.create_job(body, idempotency_key=key)
        warnings = _preflight_warnings(api, job["id"])
    show(job, lambda: out.print(f"job {job['id']} {job['status']}", highlight=False), as_json)
    for warning in warnings:
        err.print(Text(f"warning: {printable(warning)}", style="yellow"), soft_wrap=True)
    err.print(f"follow it with: qlora jobs watch {job['id']}", highlight=False)


def _preflight_warnings(api, job_id: str) -> list[str]:
    """What the job's preflight warned of as it was created (rows dropped or truncated, EOS not learned, validation
    rows also in train): the API records them as the job's first events, which only `jobs watch` showed, so a job
    queued with a tenth of its rows cut at max_seq_length said nothing but "queued". [] where they cannot be read:
    the job is made, and a hint is not worth failing the command for."""
    from app.cli.api_client import ClientError

    try:
        events = api.job_events(job_id, limit=PREFLIGHT_EVENTS_READ)
    except ClientError:
        return []
    return [e["message"] for e in events if e.get("type") == "preflight_warning" and isinstance(e.get("message"), str)]


# The creation's own events come first (created, preflight, its warnings: one per kind of finding, a dozen at most);
# a job the same Idempotency-Key made earlier may have run since, and its later events are not the preflight's.
PREFLIGHT_EVENTS_READ = 50


MAX_SPEC_BYTES = 16 << 20  # the API's own limit on a JSON body (QLORA_MAX_JSON_BYTES' default)


def _job_body(spec: Path, *, dataset: str, **fields) -> dict:
    """POST /jobs's body: the spec file's object, the dataset id and the fields given."""
    from worker.training.spec import load_spec_json, spec_file_error  # the engine's commands read and say it alike

    try:
        with open(spec, "rb") as f:
            text = f.read(MAX_SPEC_BYTES + 1)
        if len(text) > MAX_SPEC_BYTES:
            _fail(f"{spec} is larger than {MAX_SPEC_BYTES >> 20} MiB: a job spec is a small JSON object")
        body = load_spec_json(text)
    except OSError as exc:
        _fail(f"cannot read {spec}: {exc.strerror or exc}")
    except ValueError as exc:  # not UTF-8 either
        _fail(spec_file_error(spec, exc))
    if not isinstance(body, dict):
        _fail(f"{spec} must hold a JSON object (the job spec), not {type(body).__name__}")
    from app.cli.api_client import native_id

    body["dataset_id"] = dataset
    body.update({key: value for key, value in fields.items() if value is not None})
    for field, what in (("dataset_id", "dataset id"), ("validation_dataset_id", "dataset id"), ("initial_job_id", "job id")):
        if isinstance(body.get(field), str):  # an id as the openai SDK printed it, too (`file-…`, `ftjob-…`)
            body[field] = native_id(body[field], what)
    _refuse_numbers_json_cannot_send(spec, body)
    return body


def _refuse_numbers_json_cannot_send(spec: Path, body: dict) -> None:
    """Fail naming the field where the spec holds a number JSON cannot carry: a number past float's range (a
    5,000-digit max_steps, read as inf by load_spec_json, as the API reads it) or NaN/Infinity, which Python's
    parser takes. Sent, it crashed the command (the HTTP client refuses to write inf); checked here as the API
    would check it (JobCreate, the engine's spec and the job's own fields), it is the field's own error, with its
    range. Only then: a spec the API would take is never refused here by a CLI of another release than the API."""
    try:
        json.dumps(body, allow_nan=False)
        return
    except ValueError:
        pass
    from app.jobs.schemas import JobCreate
    from worker.training.spec import SpecError

    try:
        JobCreate.parse(body)
    except SpecError as exc:
        _fail(f"{spec}: {exc}")
    _fail(f"{spec} holds a number past float's range, NaN or Infinity, which JSON cannot carry: write the number")


@jobs_commands.command("preflight")
def jobs_preflight(
    ctx: typer.Context,
    spec: SpecFile,
    dataset: Annotated[str, typer.Option("--dataset", help="Training dataset id.")],
    validation: Annotated[Optional[str], typer.Option("--validation", help="Validation dataset id.")] = None,
    gpu_class: Annotated[Optional[str], typer.Option("--gpu-class", help="As `jobs create` would ask for.")] = None,
    initial_job: InitialJobOption = None,
    examples: Annotated[int, typer.Option(help="Rows shown token by token (0-5), trained tokens highlighted.")] = 1,
    as_json: JsonOption = None,
) -> None:
    """What a job would train on, before it runs: rows, tokens, truncation, EOS, steps, memory and GPU
    class, and rows token by token. Exits 1 where `jobs create` would refuse the job."""
    body = _job_body(spec, dataset=dataset, validation_dataset_id=validation, gpu_class=gpu_class,
                     initial_job_id=initial_job)
    body["examples"] = examples
    with _api(ctx) as api:
        answer = api.preflight_job(body)
    show(answer, lambda: print_preflight(answer), as_json)
    if answer["can_learn"] is False:
        raise typer.Exit(1)


@jobs_commands.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this state (queued, running, succeeded, ...).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-200), newest first; with --all, how many "
                                            "each request reads.")] = 20,
    cursor: Annotated[Optional[str], typer.Option(help="Start after the page that named this cursor (the previous "
                                                       "list prints it when there are older jobs).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every job, older pages too (read --limit at a time).")] = False,
    as_json: JsonOption = None,
) -> None:
    """List the team's jobs, newest first. On a pipe: a JSON array of them, each as the API answers it.

    Where there are older jobs than the page shows, stderr names the cursor of the next page
    (`--cursor CURSOR`); --all reads them all, page after page, into the one list (the JSON array on a pipe)."""
    with _api(ctx) as api:
        jobs, next_cursor = read_pages(lambda at: api.list_jobs(status, limit, at), cursor, every)
    show(jobs, lambda: print_job_list(jobs), as_json)
    if next_cursor:
        print_next_page("jobs list", next_cursor, status=status, limit=limit)



@jobs_commands.command("show")
def jobs_show(ctx: typer.Context, job_id: JobId, as_json: JsonOption = None) -> None:
    """A job's status, progress, timestamps, error and summary. On a pipe: the API's answer."""
    with _api(ctx) as api:
        job = api.get_job(job_id)
        outputs = _outputs(api, job)
    show(job, lambda: print_job(job), as_json)
    _print_outputs(job, outputs)


@jobs_commands.command("report")
def jobs_report(
    ctx: typer.Context,
    job_id: JobId,
    as_json: JsonOption = None,
) -> None:
    """The eval report of a job that succeeded: each prompt's reference, base answer and tuned answer side
    by side with exact match and F1, then the metrics, base against tuned."""
    with _api(ctx) as api:
        report = api.job_report(job_id)
    show(report, lambda: print_report(report), as_json)


@jobs_commands.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: JobId, as_json: JsonOption = None) -> None:
    """Cancel a job: a queued or paused one at once, a running one after its current step. On a pipe: the
    job, as the API answers it."""
    _request(ctx, job_id, "cancel", as_json)


@jobs_commands.command("pause")
def jobs_pause(ctx: typer.Context, job_id: JobId, as_json: JsonOption = None) -> None:
    """Pause a running job: it saves a checkpoint after its current step and stops, freeing its GPU
    (pausing, then paused). On a pipe: the job, as the API answers it."""
    _request(ctx, job_id, "pause", as_json)


@jobs_commands.command("resume")
def jobs_resume(ctx: typer.Context, job_id: JobId, as_json: JsonOption = None) -> None:
    """Queue a paused job again (one you paused, or one the service paused after its attempts kept ending on
    a full disk or an outage); it continues from its newest checkpoint. On a pipe: the job, as the API
    answers it."""
    _request(ctx, job_id, "resume", as_json)


def _request(ctx: typer.Context, job_id: str, verb: str, as_json: bool | None) -> None:
    """POST /jobs/{id}/{verb}: safe to send again (a request already in effect answers the job as it is)."""
    done = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}[verb]
    _on_interrupt(ctx, f"interrupted; job {job_id} may or may not have been {done} "
                       f"(`qlora jobs show {job_id}` tells; the same command again is safe)")
    with _api(ctx) as api:
        job = api.job_request(job_id, verb)
    show(job, lambda: out.print(f"job {job['id']} {job['status']}", highlight=False), as_json)


@jobs_commands.command("delete-checkpoints")
def jobs_delete_checkpoints(ctx: typer.Context, job_id: JobId, as_json: JsonOption = None) -> None:
    """Delete a finished job's checkpoints, freeing what they take of the team's storage_gib (the job, its
    curve and its artifacts stay). On a pipe: {"job_id", "deleted" (how many), "bytes" (freed)}."""
    from app.text import format_bytes

    _on_interrupt(ctx, f"interrupted; job {job_id}'s checkpoints may or may not have been deleted "
                       "(the same command again is safe)")
    with _api(ctx) as api:
        freed = api.delete_checkpoints(job_id)
    show(freed, lambda: out.print(f"job {job_id}: {freed['deleted']} checkpoints deleted, "
                                  f"{format_bytes(freed['bytes'])} freed", highlight=False), as_json)


@jobs_commands.command("delete-artifact")
def jobs_delete_artifact(
    ctx: typer.Context,
    job_id: JobId,
    kind: Annotated[str, typer.Option(help="adapter, merged or report.")],
    as_json: JsonOption = None,
) -> None:
    """Delete one artifact of a finished job (a merged model once downloaded, say), freeing what it takes of
    the team's storage_gib. On a pipe: {"job_id", "kind", "deleted": true, "bytes" (freed)}."""
    from app.text import format_bytes

    _on_interrupt(ctx, f"interrupted; job {job_id}'s {kind} may or may not have been deleted "
                       "(the same command again is safe)")
    with _api(ctx) as api:
        freed = api.delete_artifact(job_id, kind)
    show(freed, lambda: out.print(f"job {job_id}: {kind} deleted, {format_bytes(freed['bytes'])} freed",
                                  highlight=False), as_json)


@jobs_commands.command("watch")
def jobs_watch(
    ctx: typer.Context,
    job_id: JobId,
    interval: Annotated[float, typer.Option(help="Seconds between polls.", min=0.2, max=3600)] = 1.0,
    as_json: JsonOption = None,
) -> None:
    """Follow a job live (progress, losses, tokens/s, loss curve, events) until it ends.

    On a pipe, one JSON object a line (NDJSON) as things happen: {"kind": "status", "job"} when the status
    changes, or a queued job's queue_position or waiting_for, {"kind": "metric", "split": "train" or "eval",
    "point"} for each new point of the curve, {"kind": "event", "event"} for each new event, and last
    {"kind": "job", "job"}: the job as it ended.

    Exits 0 when it succeeded, 1 when it failed, was cancelled or paused. Ctrl-C stops watching, not the job: a
    queued one keeps its place in the queue, a running one runs on.
    """
    import time

    from rich.live import Live
    from rich.text import Text

    streamed = wants_json(as_json)
    watcher: _JobWatcher | None = None
    try:
        with _api(ctx) as api:
            watcher = _JobWatcher(api, job_id, every_point=streamed)
            watcher.poll()  # a wrong id fails here, before the live display starts
            if streamed:
                _stream_job(watcher, interval)
            else:
                with Live(watcher.view(), console=out, auto_refresh=False) as live:
                    while True:
                        _print_events(live.console, watcher.take_new_events(), job_id)
                        live.update(watcher.view(), refresh=True)
                        if watcher.ended:
                            break
                        time.sleep(interval)
                        watcher.poll()
                if not out.is_terminal:
                    out.line()  # rich ends a live display with a newline only on a terminal
            outputs = _outputs(api, watcher.job)
    except KeyboardInterrupt:
        _interrupted(_left_watching(job_id, watcher.job if watcher else {}))
    assert watcher is not None  # made before anything that returns here
    job = watcher.job
    line = f"job {job['id']} {job['status']} at step {steps(job)}"
    if job["status"] == "succeeded":
        loss = f", train loss {watcher.train_loss:.4f}" if watcher.train_loss is not None else ""
        if not streamed:  # else the last line said it
            out.print(Text(line + loss, style="green"), soft_wrap=True)
        _print_outputs(job, outputs)
        return
    # A paused job waits for a person (it was paused, or its attempts kept ending on a full disk or an outage):
    # "paused at step 11/2000" alone read as an end, with nothing of how it goes on.
    then = (f"; it waits to be resumed: `qlora jobs resume {job['id']}` continues it from its newest checkpoint"
            if job["status"] == "paused" else "")
    err.print(Text(line + (f": {printable(job['error'])}" if job["error"] else "") + then, style="red"), soft_wrap=True)
    raise typer.Exit(1)


def _left_watching(job_id: str, job: dict) -> str:
    """What Ctrl-C during `jobs watch` leaves the job doing, by its status when last seen. "job X keeps running"
    was said of a queued job too, which runs nothing yet."""
    again = f"`qlora jobs watch {job_id}` to follow it again"
    stop = f"`qlora jobs cancel {job_id}` to stop it"
    left = {
        "queued": f"job {job_id} keeps its place in the queue ({again}, `qlora jobs cancel {job_id}` to take it out)",
        "running": f"job {job_id} keeps running ({again}, {stop})",
        "pausing": f"job {job_id} goes on pausing: it saves a checkpoint and stops ({again})",
        "cancelling": f"job {job_id} goes on cancelling: it stops after its current step ({again})",
        "paused": f"job {job_id} stays paused (`qlora jobs resume {job_id}` continues it)",
    }
    status = job.get("status")
    if status is None:  # stopped before the first answer: nothing is known of the job, and nothing was asked of it
        return f"stopped watching; job {job_id} was not changed"
    return "stopped watching; " + left.get(status, f"job {job_id} has ended {status}")


EVENTS_SHOWN = 50  # a terminal gets at most this many events of one poll, the newest: a history of 100k is a pipe's


def _print_events(console, events: list[dict], job_id: str) -> None:
    """`jobs watch`'s new events on a terminal, above the live view. A job watched once it ended printed none of
    its events (its error alone said what happened); a job with thousands would scroll them all past."""
    from rich.text import Text

    if len(events) > EVENTS_SHOWN:
        console.print(Text(f"... {len(events) - EVENTS_SHOWN:,} earlier events not shown (`qlora jobs watch {job_id} "
                           "--json` streams them all)", style="dim"), soft_wrap=True)
    for event in events[-EVENTS_SHOWN:]:
        console.print(event_line(event))


def _outputs(api, job: dict) -> list[dict] | None:
    """A succeeded job's artifacts, for `_print_outputs`; None for any other job, or where the list cannot be
    read (the job's own answer has been shown: a hint is not worth failing the command for)."""
    from app.cli.api_client import ClientError

    if job.get("status") != "succeeded":
        return None
    try:
        return api.job_artifacts(job["id"])
    except ClientError:
        return None


def _print_outputs(job: dict, artifacts: list[dict] | None) -> None:
    """After a job that succeeded (`jobs show`, the end of `jobs watch`), on stderr: what it made and the commands
    that fetch it. The job's answer names no artifact, so "did it work, and where is the adapter?" was a
    curl to GET /jobs/{id}/artifacts."""
    from rich.text import Text

    from app.text import format_bytes

    if not artifacts:
        return
    made = ", ".join(f"{a['kind']} ({format_bytes(a['bytes'])})" for a in artifacts)
    err.print(Text(f"artifacts: {made}; fetch one with `qlora jobs download {job['id']} --kind {artifacts[0]['kind']}`"
                   + (f"; the eval report side by side: `qlora jobs report {job['id']}`"
                      if any(a["kind"] == "report" for a in artifacts) else "")), soft_wrap=True)


def _stream_job(watcher: _JobWatcher, interval: float) -> None:
    """`jobs watch` on a pipe: what changed since the last poll, one JSON object a line, then the job as it ended."""
    import time

    shown = None
    while True:
        # A queued job's wait changes without its status (its place in the queue, what it waits for): a script
        # saw none of that. Once per change, not per poll, so an unchanged job adds nothing to the stream.
        now = (watcher.job["status"], watcher.job.get("queue_position"), watcher.job.get("waiting_for"))
        if now != shown:
            shown = now
            json_line({"kind": "status", "job": watcher.job})
        for split, point in watcher.take_new_points():
            json_line({"kind": "metric", "split": split, "point": point})
        for event in watcher.take_new_events():
            json_line({"kind": "event", "event": event})
        if watcher.ended:
            break
        time.sleep(interval)
        was_reachable = watcher.unreachable_since is None
        watcher.poll()
        if was_reachable and watcher.unreachable_since is not None:
            err.print("the API is not answering; retrying", style="yellow")
    json_line({"kind": "job", "job": watcher.job})


class _JobWatcher:
    """The state `jobs watch` shows: the job, what it shows of its curve and the events not yet printed.

    Of the curve it holds only what it prints, whatever the length of the run: the newest values, the loss
    as a LossTrail for the sparkline, and the last step read of each series. A terminal's view starts from
    the thinned curve (GET /jobs/{id}/metrics?points=N: one request for a run of any length), then reads
    the points logged since, poll by poll. A pipe (`every_point`) gets every point once, read page by page
    and passed on as it comes. It kept every point it had read, twice (a dict, and a string to tell a new one
    from one seen): hundreds of MB, growing, for a run of 500,000 steps."""

    UNREACHABLE_LIMIT_S = 300  # ride out an API restart; give up if it stays down this long
    STOP_STATES = ("succeeded", "failed", "cancelled", "paused")  # paused waits for a person: stop watching too
    SHOWN_POINTS = 2000  # the thinned curve a terminal's view starts from: plenty for a 40-column sparkline

    def __init__(self, api, job_id: str, every_point: bool = False):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.api, self.job_id, self.every_point = api, job_id, every_point
        self.job: dict = {}
        self.trail = LossTrail()
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        self.rewards: dict | None = None  # a dpo job's newest train point: reward accuracy and margin
        self.eval_rewards: dict | None = None
        self.tokens_per_second: float | None = None
        self.unreachable_since: float | None = None
        self._events: list[dict] = []
        self._last_event_id: int | None = None
        self._resumed_at: dict[int, int] = {}  # attempt -> the step it resumed from (its `resumed` event)
        self._metrics_at: tuple | None = None
        self._curve_attempt: int | None = None
        self.last_step: dict[str, int | None] = {"train": None, "eval": None}  # the last point read of each series
        self._passed_through = {"train": 0, "eval": 0}  # a pipe was given every point up to these steps
        self._new_points: list[tuple[str, dict]] = []  # (split, point) not yet taken, for a pipe
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("step {task.fields[steps]}"), TextColumn("ETA"), TimeRemainingColumn())
        self._task = self.progress.add_task("", total=None, steps="0/?")

    @property
    def train_losses(self) -> list[float]:
        """The train loss for the sparkline: each bucket's mean, by step (every point while the run is short)."""
        return self.trail.values()

    @property
    def ended(self) -> bool:
        return self.job.get("status") in self.STOP_STATES

    def poll(self) -> None:
        import time

        from app.cli.api_client import ClientError, UnexpectedAnswer

        try:
            self.job = self.api.get_job(self.job_id)
            # The curve only changes with the step: skip it between logging steps, and fetch only the
            # points past the last one held of each series (an evaluation at step N lands after step N's
            # train point).
            if self._metrics_at != (self.job["step"], self.job["status"]):
                self._read_curve()
                self._metrics_at = (self.job["step"], self.job["status"])
            self._read_events()
            self.unreachable_since = None
        except ClientError as exc:
            # Not an answer of another shape: asking again for 5 minutes would get the same one.
            transient = not isinstance(exc, UnexpectedAnswer) and (exc.status is None or exc.status >= 500)
            if not self.job or not transient:
                raise
            self.unreachable_since = self.unreachable_since or time.monotonic()
            if time.monotonic() - self.unreachable_since > self.UNREACHABLE_LIMIT_S:
                raise

    def _read_curve(self) -> None:
        """A new attempt resumed from a checkpoint and logs the steps past it again: read the curve again from
        there (a pipe, which was given the steps up to it already) or whole (a terminal's view)."""
        if self._curve_attempt != self.job["attempt"]:
            first_read = self._curve_attempt is None
            self._curve_attempt = self.job["attempt"]
            if not self.every_point:
                view = self.api.job_curve_thinned(self.job_id, self.SHOWN_POINTS)
                self.trail = LossTrail(width=view.get("bucket_steps") or 1)
                self.last_step = {"train": None, "eval": None}
                self._read_points(view)
                # Past its last point, the terminal reads on from the last step of each series.
                if self.last_step["eval"] is None and self.last_step["train"] is not None:
                    self.last_step["eval"] = 0
            elif not first_read:
                self._read_events()  # the new attempt's `resumed` event: the step its curve is logged again past
                redone_from = self._resumed_at.get(self.job["attempt"], 0)  # none said: from the start
                for split in ("train", "eval"):
                    self._passed_through[split] = min(self._passed_through[split], redone_from)
                    held = self.last_step[split]
                    self.last_step[split] = None if held is None else min(held, redone_from)
                self.trail = LossTrail()
        last_train, last_eval = self.last_step["train"], self.last_step["eval"]
        if last_eval is None and last_train is not None:
            last_eval = 0
        for page in self.api.job_curve_pages(self.job_id, after_step=last_train, after_eval_step=last_eval):
            self._read_points(page)

    EVENT_PAGE = 1000  # GET /jobs/{id}/events answers at most this many at once (app.jobs.service.MAX_EVENTS)

    def _read_events(self) -> None:
        """Every event past the last one read, page after page. One page a poll left a job that ended with more
        events than a page (a checkpoint each step, a long run's requeues) cut short: `watch` stopped at the
        first page of a finished job's 238 events, its last line "checkpoint of step 195 saved", without the
        adapter_saved, finished and succeeded that followed."""
        while True:
            page = self.api.job_events(self.job_id, after=self._last_event_id, limit=self.EVENT_PAGE)
            self._events += page
            for event in page:
                if event.get("type") == "resumed" and event.get("step") is not None:
                    self._resumed_at[event["attempt"]] = event["step"]
            if page:
                self._last_event_id = page[-1]["id"]
            if len(page) < self.EVENT_PAGE:
                return

    def _read_points(self, new: dict) -> None:
        """A page of the curve (or the thinned view): what the view shows of it, and for a pipe each point past
        what it was given already (a new attempt's points up to its checkpoint are the ones it was given)."""
        for split in ("train", "eval"):
            for point in new[split]:
                self.last_step[split] = point["step"]
                if self.every_point and point["step"] > self._passed_through[split]:
                    self._passed_through[split] = point["step"]
                    self._new_points.append((split, point))
        for point in new["train"]:
            if point["train_loss"] is not None:
                self.train_loss = point["train_loss"]
                self.trail.add(point["step"], point["train_loss"])
            if point["tokens_per_second"]:
                self.tokens_per_second = point["tokens_per_second"]
            if point.get("reward_accuracy") is not None:
                self.rewards = point
        for point in new["eval"]:
            if point["eval_loss"] is not None:
                self.eval_loss = point["eval_loss"]
            if point.get("reward_accuracy") is not None:
                self.eval_rewards = point

    def take_new_events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def take_new_points(self) -> list[tuple[str, dict]]:
        """The curve's points read since the last call: ("train" or "eval", the API's point)."""
        points, self._new_points = self._new_points, []
        return points

    def view(self):
        import time

        from rich.console import Group, RenderableType
        from rich.text import Text

        job = self.job
        self.progress.update(self._task, description=status_text(job), total=job["total_steps"],
                             completed=job["step"], steps=steps(job))
        header = Text.assemble((f"job {job['id']}", "bold"), f"  {printable(job['name'])}  ",
                               (status_text(job), status_style(job["status"])))
        stats = Text.assemble(
            "train loss ", (f"{self.train_loss:.4f}" if self.train_loss is not None else "-", "bold"),
            "   eval loss ", (f"{self.eval_loss:.4f}" if self.eval_loss is not None else "-", "bold"),
            "   tokens/s ", (f"{self.tokens_per_second:,.0f}" if self.tokens_per_second else "-", "bold"),
            "   loss ", (sparkline(self.train_losses), "cyan"))
        parts: list[RenderableType] = [header, self.progress, stats]
        if job.get("queue_position") is not None:  # why a queued job has not started, as `jobs show` says it
            parts.append(Text(f"queue position {queue_position(job)}", style="yellow"))
            if job.get("waiting_detail"):
                parts.append(Text(printable(job["waiting_detail"]), style="yellow"))
        if self.rewards is not None or self.eval_rewards is not None:
            parts.append(reward_line(self.rewards, self.eval_rewards))
        if self.unreachable_since is not None:
            parts.append(Text(f"the API is not answering; retrying (since {time.monotonic() - self.unreachable_since:.0f}s)",
                              style="yellow"))
        return Group(*parts)


@jobs_commands.command("download")
def jobs_download(
    ctx: typer.Context,
    job_id: JobId,
    kind: Annotated[str, typer.Option(help="adapter (LoRA weights), merged (a standalone bf16 model) or report "
                                            "(the eval report's JSON).")] = "adapter",
    out_dir: Annotated[Path, typer.Option("--out", help="Where to put the archive (and its contents).",
                                          file_okay=False)] = Path("."),
    extract: Annotated[bool, typer.Option("--extract/--no-extract", help="Also unpack the tar into --out.")] = True,
    as_json: JsonOption = None,
) -> None:
    """Download a job's adapter, merged model or eval report, verified against its sha256. A download
    that broke off is continued by the same command, from the byte where it stopped.

    On a pipe: {"job_id", "kind", "archive" (its path), "sha256", "bytes", "resumed_from" (the byte it
    continued from, 0 for a whole download), "extracted": [the paths unpacked] or null with --no-extract}."""
    import tarfile

    from app.cli.api_client import extract_tar, native_id

    job_id = native_id(job_id, "job id")  # the archive and its part file named alike, whichever name was given
    if kind not in ("adapter", "merged", "report"):
        _fail(f"--kind must be adapter, merged or report, got {kind!r}")
    try:
        with _api(ctx) as api:
            progress, task = transfer_progress(f"downloading {kind}", None)
            # Shown once the archive starts to come: a job with no such artifact (or no job) left an empty
            # "downloading adapter 0/? bytes" bar above its error.
            progress.update(task, visible=False)

            def started(total: int, resumed_from: int) -> None:
                progress.update(task, total=total, completed=resumed_from, visible=True)
                if resumed_from:
                    progress.console.print(f"resuming an interrupted download at byte {resumed_from:,} of {total:,}",
                                           highlight=False)

            with progress:
                download = api.download_artifact(job_id, kind, out_dir, on_start=started,
                                                 on_progress=lambda n: progress.advance(task, n))
    except KeyboardInterrupt:
        # What arrived stays in the part file (api_client.PartFile): the same command continues from there.
        _interrupted("download stopped; run the same command again to resume it where it stopped")
    archive, artifact, resumed_from = download.path, download.artifact, download.resumed_from
    names: list[str] | None = None
    if extract:
        try:
            names = extract_tar(archive, out_dir)
        except (tarfile.TarError, OSError) as exc:
            _fail(f"cannot extract {archive}: {exc}")

    def text() -> None:
        resumed = f" (resumed from byte {resumed_from:,})" if resumed_from else ""
        out.print(f"{archive}: sha256 verified{resumed}", highlight=False, soft_wrap=True)
        if names is not None:
            out.print(f"extracted {', '.join(n + '/' for n in names)} into {out_dir}", highlight=False, soft_wrap=True)

    show({"job_id": job_id, "kind": kind, "archive": str(archive), "sha256": artifact["sha256"],
          "bytes": artifact["bytes"], "resumed_from": resumed_from,
          "extracted": None if names is None else [str(out_dir / n) for n in names]},
         text, as_json)


# ---------------------------------------------------------------- usage

usage_commands = _ClientCommands()


@usage_commands.command("usage")
def usage(
    ctx: typer.Context,
    url: UrlOption = None,
    api_key: KeyOption = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Start (UTC), an ISO date or datetime; default: "
                                                 "the start of this month.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="End (UTC), excluded; default: now.")] = None,
    all_teams: Annotated[bool, typer.Option("--all-teams", help="Every team, one row each (an admin key).")] = False,
    as_json: JsonOption = None,
) -> None:
    """GPU-hours and trained tokens of your team (by day and by job) and the storage it keeps.

    GPU time runs from each attempt's claim to its end: pauses do not count, a running job counts up to now.
    """
    ctx.obj = {"url": url, "api_key": api_key}
    with _api(ctx) as api:
        report = api.usage(from_, to, all_teams)
    show(report, lambda: print_usage(report), as_json)
