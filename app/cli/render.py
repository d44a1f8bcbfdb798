"""How `qlora` shows things: the consoles, tables, a run's summary, jobs, datasets, events and progress bars.

Every verb prints through here, so a run summary reads the same after `qlora train` as in `qlora jobs show`.
Results go to stdout (`out`); errors, hints and progress bars go to stderr (`err`), so a pipe gets only the result.

People and machines each get their format: a command that prints a result passes it to `show` with the
function that prints it for a person. On a terminal that function runs (text, colour, tables); on a pipe
the result prints as JSON instead, for a script or a log collector. `--json` / `--table` (JsonOption)
overrides the choice.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Column, Table
from typer.core import TyperCommand

from app.text import counted

err = Console(stderr=True)
out = Console()


# ---------------------------------------------------------------- people or machines

JsonOption = Annotated[Optional[bool], typer.Option(
    "--json/--table", help="The result as JSON, or as text and tables; by default text on a terminal, JSON on a pipe. "
                           "Not both.")]


class OutputCommand(TyperCommand):
    """A command that refuses --json with --table. click lets the last of a flag pair win silently, which
    suits an on/off switch (`--check ... --no-check`), not two formats: `qlora jobs list --json --table`
    is a mistake to name (a usage error, exit 2), not a choice to guess."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = {arg for arg in itertools.takewhile(lambda arg: arg != "--", args) if arg in ("--json", "--table")}
        if len(given) > 1:
            raise typer.BadParameter("cannot be used together: --json for JSON, --table for text and tables, neither "
                                     "for text on a terminal and JSON on a pipe", ctx=ctx, param_hint="'--json' / '--table'")
        return super().parse_args(ctx, args)


class Commands(typer.Typer):
    """typer.Typer whose commands are OutputCommands: every `qlora` verb takes JsonOption the same way."""

    # typer.Typer.command spells out click's keywords; this passes them all on, cls defaulted.
    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:  # type: ignore[override]
        kwargs.setdefault("cls", OutputCommand)
        register = super().command(*args, **kwargs)

        def decorator(function: Callable) -> Callable:
            function.__doc__ = unwrapped(function.__doc__)
            return register(function)

        return decorator


def unwrapped(doc: str | None) -> str | None:
    """A docstring as --help shows it: its paragraphs (split by blank lines), each one line that the terminal wraps.
    typer (0.29) keeps a docstring's line breaks, so `qlora --help` and `qlora jobs watch --help` broke sentences
    where the source did, mid-line: "{"kind": "status", "job"} when the status" / "changes, ..."."""
    if doc is None:
        return None
    import inspect

    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines())
                        for paragraph in inspect.cleandoc(doc).split("\n\n"))


def wants_json(as_json: bool | None) -> bool:
    """--json or --table where given; else JSON exactly when stdout is not a terminal."""
    return not out.is_terminal if as_json is None else as_json


def show(answer: Any, human: Callable[[], None], as_json: bool | None) -> None:
    """The one place a command's result takes its format: `human()` prints it for a person, or the
    answer prints as indented JSON (the API's answer where there is one)."""
    if wants_json(as_json):
        # typer.echo, not rich, which would wrap long lines and read "[...]" as markup.
        typer.echo(json.dumps(answer, indent=2, default=_json_value))
    else:
        human()


def json_line(record: Any) -> None:
    """One JSON object on one line (NDJSON), flushed at once: `qlora jobs watch`'s stream on a pipe."""
    typer.echo(json.dumps(record, default=_json_value))


def _json_value(value: Any) -> Any:
    # What a row of the database holds beside JSON's types: timestamps as the API writes them, paths.
    if isinstance(value, datetime):  # as pydantic writes them in the API's answers
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


# ---------------------------------------------------------------- cells


def print_table(table: Table, optional: Sequence[str] = ()) -> None:
    """A table on stdout. On a terminal it fits the width: ids and statuses keep their natural width,
    names fold, and where even that is too wide the `optional` columns (headers, least important
    first) are left out, saying so in the caption."""
    if not out.is_terminal:
        # A pipe has no width; rich would assume 80 columns and squeeze the cells. Print a table
        # whole there (it stays as narrow as its content).
        Console(file=out.file, width=240).print(table)
        return
    columns, hidden = list(table.columns), []
    for header in optional:
        if _narrowest(table) <= out.width:
            break
        table.columns = [column for column in table.columns if column.header != header]
        hidden.append(header)
    if optional and _narrowest(table) > out.width:
        # Even without the optional columns the row is wider than the terminal (the 32-character id alone
        # takes 36 of 60 columns): rich would crop the table's right side, a column gone with no word, or
        # squeeze a status to "s…". A row per record then, as psql's expanded display: nothing cut.
        _print_records(table, columns)
        return
    if hidden:
        table.caption = f"not shown at this width: {', '.join(hidden)} (a wider terminal or --json shows them)"
        table.caption_justify = "left"
    out.print(table)


def _print_records(table: Table, columns: list[Column]) -> None:
    """A list table's rows one after another, each a line per column: the id alone as the record's first
    line (it fits where the table did not, and is what a user copies), then each other column as
    "header  value", a long value folding onto more lines."""
    from rich.console import Group
    from rich.text import Text

    cells = [list(column.cells) for column in columns]
    records: list = [Text(str(table.title), style="italic")] if table.title else []
    for row in range(max(map(len, cells), default=0)):
        fields = Table.grid(Column(style="bold", no_wrap=True), Column(overflow="fold"), padding=(0, 0, 0, 2))
        if row:
            records.append(Text(""))  # a blank line between records
        for column, column_cells in zip(columns, cells, strict=True):
            cell = column_cells[row]
            if column is columns[0] and column.header == "id":
                records.append(Text(str(cell), style="bold"))
            else:
                fields.add_row(str(column.header).replace("\n", " "), Text.from_markup(cell) if isinstance(cell, str) else cell)
        records.append(fields)
    out.print(Group(*records))


FOLDED_MIN_WIDTH = 10  # a name or a filename folds onto more lines, never narrower than this


def _narrowest(table: Table) -> int:
    """The narrowest the table prints without cutting a cell: unwrapped columns at their widest cell,
    the others at their min_width; plus the padding and borders (3 per column, 1 more for the edge)."""
    from rich.measure import Measurement

    width = 3 * len(table.columns) + 1
    for column in table.columns:
        if column.no_wrap:
            cells = [column.header, *column.cells]
            width += max(Measurement.get(out, out.options, cell).maximum for cell in cells)
        else:  # folds down to FOLDED_MIN_WIDTH, or to its widest cell where that is narrower
            widest = max(Measurement.get(out, out.options, cell).maximum for cell in [column.header, *column.cells])
            width += min(column.min_width or FOLDED_MIN_WIDTH, widest)
    return width


def id_column() -> Column:
    # Ids are what a user copies into the next command: never wrapped or cut, even in a narrow pipe.
    return Column("id", no_wrap=True, min_width=32)


def status_column(header: str = "status") -> Column:
    # A status is read at a glance: whole ("invalid", "cancelling"), never "inv…".
    return Column(header, no_wrap=True)


def name_column(header: str) -> Column:
    # Names and filenames may run long: they fold onto more lines rather than shrink to "fil…".
    return Column(header, overflow="fold", min_width=FOLDED_MIN_WIDTH)


def number_column(header: str) -> Column:
    return Column(header, justify="right", no_wrap=True)


def plain(value: str):
    from rich.text import Text

    # User data in a table cell must print as typed: "[x]" in a name is not rich markup, and an escape
    # sequence in it is not the terminal's to run (see printable).
    return Text(printable(value))


def when(value: str | None) -> str:
    return value.replace("T", " ")[:19] if value else "-"


def number(value: float | None, spec: str) -> str:
    """A value in the given format, or "-" where there is none (a diverged loss is stored as null)."""
    return "-" if value is None else format(value, spec)


def steps(job: dict) -> str:
    """"0/160 (planned)" before the first step (the preflight's count, from the job's creation), then "42/160"."""
    planned = " (planned)" if (job.get("progress") or {}).get("planned") else ""
    return f"{job['step']}/{job['total_steps'] if job['total_steps'] is not None else '?'}{planned}"


def status_text(job: dict) -> str:
    """"running (merging)": the status, and while a worker holds the job the phase it is in (GET /jobs/{id}'s `phase`):
    past its last step a job still saves, merges, reports and uploads, and "running, step 160/160" did not say which."""
    return f"{job['status']} ({job['phase']})" if job.get("phase") else job["status"]


def status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow", "cancelling": "yellow",
            "running": "cyan"}.get(status, "white")


def print_job_list(jobs: list[dict]) -> None:
    """A page of jobs as GET /jobs answers it: `qlora jobs list`, and `qlora admin list-jobs TEAM`."""
    table = Table(id_column(), name_column("name"), status_column(), Column("steps", no_wrap=True),
                  name_column("base model"), Column("created", no_wrap=True), Column("finished", no_wrap=True))
    for j in jobs:
        table.add_row(j["id"], plain(j["name"]), f"[{status_style(j['status'])}]{status_text(j)}[/]", steps(j),
                      plain(j["base_model"]), when(j["created_at"]), when(j["finished_at"]))
    print_table(table, optional=("finished", "created", "base model"))


def print_team_list(teams: list[dict]) -> None:
    """`qlora admin list-teams`, as GET /admin/teams answers it. "disabled" is the column an admin looks for after
    offboarding a team: the counts give way to it on a narrow terminal. At 80 columns the table had no room for it,
    and rich cropped it away without a word: a disabled team's row read as a run of blank lines."""
    from app.text import format_bytes, format_number

    table = Table(name_column("team"), name_column("disabled"), number_column("keys"), number_column("queued"),
                  number_column("running"), number_column("paused"), number_column("GPU-h month"), number_column("storage"))
    for t in teams:
        keys = f"{t['keys_live']}" + (f" ({t['admin_keys_live']} admin)" if t["admin_keys_live"] else "")
        table.add_row(plain(t["name"]), _disabled_cell(t), keys, str(t["queued"]), str(t["running"]), str(t["paused"]),
                      format_number(t["gpu_hours_this_month"]), format_bytes(t["storage_bytes"]))
    print_table(table, optional=("paused", "queued", "storage", "keys"))


def _disabled_cell(team: dict):
    if not team["disabled"]:
        return "-"
    since = f"since {team['disabled_at'][:16].replace('T', ' ')}"
    return plain(f"{since}: {team['disabled_reason']}") if team["disabled_reason"] else since


SPARK_LEVELS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line chart of values; a long series is averaged into `width` buckets so the whole
    curve shows, not just its tail."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) > width:
        bounds = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in itertools.pairwise(bounds)]
    low, high = min(values), max(values)
    if high == low:
        return SPARK_LEVELS[len(SPARK_LEVELS) // 2] * len(values)
    top = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[round((v - low) / (high - low) * top)] for v in values)



class LossTrail:
    """A loss series as a sparkline needs it, in bounded memory whatever the length of the run: the mean loss
    of each bucket of `width` steps, at most `limit` buckets; past that the buckets double in width (each two
    merged into one), so the whole run stays spread evenly by step. `jobs watch` kept every point it was sent
    (a dict each, and a string each to tell new ones): hundreds of MB for a run of 500,000 steps."""

    def __init__(self, width: int = 1, limit: int = 1000):
        self.width, self.limit = max(width, 1), limit
        self._buckets: dict[int, list[float]] = {}  # bucket -> [sum of losses, count]

    def add(self, step: int, loss: float) -> None:
        bucket = self._buckets.setdefault(step // self.width, [0.0, 0])
        bucket[0] += loss
        bucket[1] += 1
        if len(self._buckets) > self.limit:
            self.width *= 2
            merged: dict[int, list[float]] = {}
            for index, (total, count) in self._buckets.items():
                into = merged.setdefault(index // 2, [0.0, 0])
                into[0] += total
                into[1] += count
            self._buckets = merged

    def values(self) -> list[float]:
        """The mean loss of each bucket, by step."""
        return [total / count for _, (total, count) in sorted(self._buckets.items())]


# ---------------------------------------------------------------- a run's summary


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """A run's summary (the recipe's summary.json, which is also a finished job's `summary`) as table rows.

    "-" where it has no value: no validation set, a loss that diverged (stored as null), a run that
    stopped before the end. The merge fidelity shows only for a run that merged; why a run did not, where it
    was asked to.
    """
    if not s:
        return []
    run_steps = s.get("steps") or {}
    parameters = s.get("parameters") or {}
    train_data = (s.get("data") or {}).get("train") or {}
    peak = s.get("peak_memory_bytes")
    best = s.get("best_eval")
    rows = [
        ("steps", _run_steps(run_steps, best) if run_steps else "-"),
        ("train loss", _train_loss(s.get("train_loss_first"), s.get("train_loss_final"))),
        ("eval loss", number(s.get("eval_loss_final"), ".4f")
         + (" (the last step's)" if best and best["step"] != run_steps.get("completed") else "")),
        ("trainable / total params", f"{parameters['trainable']:,} / {parameters['total']:,}" if parameters else "-"),
        ("target modules", ", ".join(s.get("target_modules") or ()) or "-"),
        ("truncated rows", number(train_data.get("truncated_rows"), "d")),
        ("tokens/s", number(s.get("tokens_per_second"), ",.0f")),
        ("peak memory", "-" if peak is None else f"{peak / 2**20:,.0f} MiB"),
    ]
    if best and best["step"] is not None:
        # Which weights went out: with output.use_best_checkpoint the best evaluation's, not the last step's,
        # whose eval loss the row above shows (an early-stopped run read "20 / 40, eval loss 2.2100" while the
        # adapter shipped was step 12's, at 2.0057).
        shipped = ("the adapter shipped" if best.get("final_adapter_is_best")
                   else "not shipped: the adapter is the last step's (output.use_best_checkpoint ships the best)")
        rows.insert(3, ("best eval loss", f"{number(best['eval_loss'], '.4f')} at step {best['step']}; {shipped}"))
    if s.get("merge_fidelity"):
        f = s["merge_fidelity"]
        rows.append(("merge fidelity", f"max |Δlogit| {number(f.get('max_abs_logit_diff'), '.3g')}, "
                                       f"mean {number(f.get('mean_abs_logit_diff'), '.3g')}, "
                                       f"Δeval loss {number(f.get('eval_loss_diff'), '.3g')}"
                                       # too large to build in memory: written layer by layer (merging_streamed)
                                       + ("; merged layer by layer" if f.get("merge") == "streaming" else "")))
    if s.get("merge_skipped"):  # output.merge asked for it and the host could not hold it
        rows.append(("merged model", s["merge_skipped"]))
    if s.get("report"):  # the eval report's means; the rows: qlora jobs report, or report/report.json
        base, tuned = s["report"]["base"], s["report"]["tuned"]
        # "stopped": the share of answers that ended at the EOS before max_new_tokens, whether the model learned to stop.
        stopped = (f", stopped by itself {number(tuned.get('stopped'), '.0%')} / {number(base.get('stopped'), '.0%')}"
                   if "stopped" in tuned else "")  # a report older than the measure has none
        rows.append(("eval report (tuned / base)",
                     f"exact match {number(tuned['exact_match'], '.0%')} / {number(base['exact_match'], '.0%')}, "
                     f"F1 {number(tuned['f1'], '.2f')} / {number(base['f1'], '.2f')}{stopped}, "
                     f"loss {number(tuned['loss'], '.4f')} / {number(base['loss'], '.4f')}"))
    return rows


def _run_steps(run_steps: dict, best: dict | None = None) -> str:
    """Steps run of those planned; why fewer, where early stopping ended the run (a succeeded job at "20 / 40"
    reads as one cut short otherwise)."""
    resumed = run_steps.get("resumed_from")
    stopped = (best or {}).get("early_stopped_at")
    return (f"{run_steps['completed']} / {run_steps['planned']}" + (f" (resumed from {resumed})" if resumed else "")
            + (f", stopped early at step {stopped}: the eval loss stopped improving (training.early_stopping)"
               if stopped is not None else ""))


def _train_loss(first: float | None, final: float | None) -> str:
    if final is None:
        return "-"
    return (f"{first:.4f} → " if first is not None else "") + f"{final:.4f}"


def print_run_summary(s: dict, out_dir: Path) -> None:
    """What `qlora train` prints at the end."""
    table = Table(title=f"{s['status']}: {out_dir}", show_header=False)
    for k, v in summary_rows(s):
        table.add_row(k, v)
    out.print(table)


# ---------------------------------------------------------------- records of the API


def method_text(method: dict | None) -> str:
    """"sft", or "dpo (beta 0.1, sigmoid loss)" with label smoothing where set."""
    if not method or method.get("type", "sft") == "sft":
        return "sft"
    smoothing = f", label smoothing {method['label_smoothing']:g}" if method.get("label_smoothing") else ""
    return f"{method['type']} (beta {method.get('beta', 0.1):g}, {method.get('loss', 'sigmoid')} loss{smoothing})"


def reward_line(train: dict | None, evaluated: dict | None):
    """`jobs watch`'s line for a dpo job: reward accuracy and margin of the newest train and eval points."""
    from rich.text import Text

    parts: list = []
    for label, point in (("train", train), ("eval", evaluated)):
        if point is None:
            continue
        parts += [f"{'   ' if parts else ''}{label} reward accuracy ",
                  (number(point.get("reward_accuracy"), ".1%"), "bold"),
                  "  margin ", (number(point.get("reward_margin"), ".3f"), "bold")]
    return Text.assemble(*parts)


def _key_value_columns() -> tuple[Column, Column]:
    # A value too long for the width (an id, in a narrow terminal) folds onto the next line: "c63fdac0289a4286…"
    # lost the rest of the id a user copies into the next command.
    return Column("field"), Column("value", overflow="fold")


WAITING_FOR = {"gpu": "a free GPU of its class", "cpu": "the CPU worker of its class to be free",
               "no_worker": "a worker of its class to be up",
               "max_running": "the team's max_running", "gpu_hours_per_month": "the team's monthly GPU-hours budget",
               "team_disabled": "its team to be enabled (an admin disabled it)"}


def queue_position(job: dict) -> str:
    """A queued job's place and what it waits for: "2 (waiting for a free GPU of its class)". `jobs show` and
    `jobs watch` both say it: a watch of a queued job showed "queued, step 0/?" and nothing of why."""
    waiting = WAITING_FOR.get(job.get("waiting_for") or "", job.get("waiting_for") or "its turn")
    return f"{job['queue_position']} (waiting for {printable(waiting)})"


def print_job(job: dict) -> None:
    from rich.text import Text

    table = Table(*_key_value_columns(), show_header=False, title=f"job {job['id']}")
    fraction = job["progress"]["fraction"]
    rows = [
        ("name", plain(job["name"])),
        ("status", Text(status_text(job), style=status_style(job["status"]))),
        ("base model", plain(job["base_model"])),
        ("method", method_text((job.get("spec") or {}).get("method"))),
        ("initial job", job.get("initial_job_id") or "-"),
        ("dataset", job["dataset_id"] or "-"),
        ("validation", job["validation_dataset_id"] or "-"),
        ("queue / attempt", f"{job['queue']} / {job['attempt']}"),
        ("priority", job.get("priority", "normal") + (f", preempted {job['preemptions']}x" if job.get("preemptions") else "")),
        ("progress", f"step {steps(job)}" + (f" ({fraction:.0%})" if fraction is not None and not job["progress"].get("planned")
                                             else "")),
        ("trained tokens", f"{job['trained_tokens']:,}"),
        ("created", when(job["created_at"])),
        ("started", when(job["started_at"])),
        ("finished", when(job["finished_at"])),
    ]
    if job.get("queue_position") is not None:
        rows.append(("queue position", queue_position(job)))
        if job.get("waiting_detail"):
            rows.append(("waiting", Text(printable(job["waiting_detail"]), style="yellow")))
    if job["error"]:
        rows.append(("error", Text(printable(job["error"]), style="red")))
    rows += summary_rows(job.get("summary") or {})
    for k, v in rows:
        table.add_row(k, v)
    print_table(table)


def print_dataset(d: dict) -> None:
    table = Table(*_key_value_columns(), show_header=False, title=f"dataset {d['id']}")
    status = f"[green]{d['status']}[/green]" if d["status"] == "ready" else f"[red]{d['status']}[/red]"
    for k, v in (("id", d["id"]), ("filename", plain(d["filename"])), ("status", status), ("format", d["format"] or "-"),
                 ("rows", f"{d['rows']:,}"), ("token estimate", f"{d['token_estimate']:,}"),
                 ("size", f"{d['bytes']:,} bytes"), ("sha256", d["sha256"]), ("created", when(d["created_at"]))):
        table.add_row(k, v)
    print_table(table)


def print_dataset_errors(d: dict) -> None:
    """An invalid dataset's first bad lines, on stderr: in either format, a person sees why."""
    if d["error_count"]:
        err.print(f"[red]{counted(d['error_count'], 'invalid line')}; "
                  "this dataset cannot be trained on:[/red]")
        print_line_errors(d["errors"], d["error_count"])


def print_line_errors(errors: list, error_count: int) -> None:
    """A dataset's bad lines, from the API (dicts) or from the local check (LineError)."""
    from rich.text import Text

    for e in errors:
        line, message = (e["line"], e["message"]) if isinstance(e, dict) else (e.line, e.message)
        err.print(Text(f"  line {line}: {message}", style="red"), soft_wrap=True)
    if error_count > len(errors):
        err.print(Text(f"  ... and {error_count - len(errors)} more", style="red"))


def event_line(event: dict):
    from rich.text import Text

    style = {"warning": "yellow", "error": "red"}.get(event["level"], "dim")
    step = f" step {event['step']}" if event["step"] is not None else ""
    return Text.assemble((when(event["created_at"])[11:], "dim"), f"{step} ", (event["type"], style),
                         f": {printable(event['message'])}" if event["message"] else "")


def read_pages(read: Callable[[str | None], tuple[list[dict], str | None]], cursor: str | None,
               every: bool) -> tuple[list[dict], str | None]:
    """The page of a list that starts after `cursor` (`read` reads one: its rows and the next page's cursor), and
    with `every` each page after it too, into the one list: (the rows, the cursor of the page after them, None when
    nothing follows). What every paged list command (`jobs list`, `datasets list`, `admin list-jobs`) does."""
    rows, next_cursor = read(cursor)
    while every and next_cursor:
        page, next_cursor = read(next_cursor)
        rows += page
    return rows, next_cursor


def print_next_page(command: str, next_cursor: str, **options: Any) -> None:
    """After a page of a list with more after it, on stderr (a pipe's stdout keeps its JSON array): the command that
    shows the next page. `jobs list` and `datasets list` stopped at --limit (200 at most) with nothing saying there
    was more, nor a way to reach it. `options`: the command's other options, to give again (None: not given)."""
    import shlex

    from rich.text import Text

    given = "".join(f" --{name} {shlex.quote(str(value))}" for name, value in options.items() if value is not None)
    err.print(Text(f"older ones follow: `qlora {command}{given} --cursor {next_cursor}` for the next page, "
                   "--all for all of them"), soft_wrap=True)


# ---------------------------------------------------------------- transfers


def transfer_progress(description: str, total: int | None, transient: bool = False):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    # On stderr, so stdout carries only the result; and only on a terminal: elsewhere rich prints the bar's final
    # state once as it stops, which left each upload's last bar in a pipe's stderr, and an empty line above a
    # download's error where the bar was still hidden (nothing had come).
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=transient, disable=not err.is_terminal)
    return progress, progress.add_task(description, total=total)


# ---------------------------------------------------------------- usage


def gpu_hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f}"


def print_usage(report: dict) -> None:
    """`qlora usage`: one team's usage by day and by job; several teams (--all-teams) one row each."""
    from app.text import format_bytes

    number = number_column
    window = f"{when(report['from'])} to {when(report['to'])} UTC"
    teams = report["teams"]
    table = Table(name_column("team"), number("GPU-hours"), number("trained tokens"), number("jobs"),
                  number("storage now"), title=f"usage, {window}")
    for t in teams:
        table.add_row(plain(t["team"]), gpu_hours(t["gpu_seconds"]), f"{t['trained_tokens']:,}", f"{t['jobs']:,}",
                      format_bytes(t["storage_bytes"]))
    print_table(table, optional=("storage now", "trained tokens"))
    if len(teams) != 1:
        return
    team = teams[0]
    days = Table(Column("day (UTC)", no_wrap=True), number("GPU-hours"), number("trained tokens"), title="by day")
    for d in team["by_day"]:
        days.add_row(d["date"], gpu_hours(d["gpu_seconds"]), f"{d['trained_tokens']:,}")
    jobs = Table(id_column(), name_column("name"), status_column(), number("GPU-hours"), number("trained tokens"),
                 number("attempts"), title="by job, most GPU time first")
    for j in team["by_job"]:
        jobs.add_row(j["job_id"], plain(j["name"]), f"[{status_style(j['status'])}]{j['status']}[/]",
                     gpu_hours(j["gpu_seconds"]), f"{j['trained_tokens']:,}", str(j["attempts"]))
    if days.row_count:
        print_table(days, optional=("trained tokens",))
    if jobs.row_count:
        print_table(jobs, optional=("attempts", "trained tokens"))
    if team["by_job_truncated"]:
        err.print(f"by job: the {len(team['by_job']):,} jobs with the most GPU time of {team['jobs']:,}; "
                  "ask for a shorter window (--from, --to) to see the rest", highlight=False, soft_wrap=True)


def print_preflight(answer: dict) -> None:
    """`qlora jobs preflight`: where the job would run, what it would train on, and rows token by
    token (trained tokens highlighted), then what stops it and what to look at."""
    from rich.text import Text

    placement, report = answer["placement"], answer["report"]
    where = f"GPU class {placement['gpu_class']}: {placement['note']}" if placement.get("gpu_class") else placement["note"]
    out.print(Text(where), soft_wrap=True)
    if report is None:
        out.print(Text(answer["note"], style="yellow"), soft_wrap=True)
        return
    sets = [("train", report["train"]), ("validation", report["validation"])]
    table = Table("", *[Column(name, justify="right") for name, data in sets if data], title="the data as the trainer sees it")
    rows = [("rows", lambda d: f"{d['rows']:,}" + ("" if d["complete"] else f" of {d['rows_in_file']:,}")),
            ("tokens per row (min / median / p95 / max)",
             lambda d: " / ".join(f"{d['lengths'].get(k, 0):,}" for k in ("min", "median", "p95", "max"))),
            ("truncated rows", lambda d: f"{d['truncated_rows']:,}"),
            ("rows dropped (nothing to learn)", lambda d: f"{d['dropped_rows']:,}"),
            ("tokens trained", lambda d: f"{d['trained_tokens']:,} of {d['tokens']:,} ({d['trained_fraction']:.0%})"),
            ("trained tokens lost to truncation", lambda d: f"{d['trained_tokens_lost']:,}"),
            ("rows without EOS in their labels", lambda d: f"{d['rows_without_eos']:,}"),
            ("rows with special tokens in message text", lambda d: f"{d['rows_with_special_tokens']:,}"),
            ("rows repeating an earlier row", lambda d: f"{d['duplicate_rows']:,}"),
            # method dpo only: among the dropped, pairs whose answers are the same tokens; pairs reversing another
            ("pairs tied (answers the same within max_seq_length)",
             lambda d: f"{d['tied_rows']:,}" if "tied_rows" in d else ""),
            ("pairs reversing an earlier pair",
             lambda d: f"{d['contradicting_rows']:,}" if "contradicting_rows" in d else ""),
            ("rows also in the train set", lambda d: f"{d['rows_in_train']:,}" if "rows_in_train" in d else ""),
            ("rows asking a train row's prompt", lambda d: f"{d['prompts_in_train']:,}" if "prompts_in_train" in d else "")]
    for label, cell in rows:
        cells = [cell(data) for _, data in sets if data]
        if label.startswith("pairs ") and not any(cells):
            continue  # an sft job's sets have no pairs
        table.add_row(label, *cells)
    print_table(table)
    steps_text = (f"{report['steps']:,} optimizer steps, {report['epochs']} epochs ({report['steps_per_epoch']:,} per epoch)"
                  if report["steps_per_epoch"] else f"{report['steps'] or '?'} steps")
    out.print(Text(steps_text + (f"; {report['steps_note']}" if report["steps_note"] else "")), soft_wrap=True)
    for example in report["examples"]:
        # A dpo example is one side of its pair: say which, and that the other is scored alike.
        side = ", the preferred answer" if example.get("side") == "chosen" else ""
        alike = "; the other answer's are scored alike" if side else ""
        line = Text(f"line {example['line']}{side} ({example['length']:,} tokens"
                    f"{', truncated' if example['truncated'] else ''}; trained tokens highlighted{alike}):\n", style="bold")
        for token in example["tokens"]:
            # A token is the dataset's own text: whatever bytes a team uploaded, escape sequences included.
            line.append(printable(token["text"]), style="bold black on green" if token["trained"] else "dim")
        out.print(line, soft_wrap=True)
    for refusal in report["refusals"]:
        out.print(Text(f"refused: {refusal}", style="red"), soft_wrap=True)
    for warning in report["warnings"]:
        out.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)
    if not report["refusals"] and not report["warnings"]:
        out.print(Text("no problems found", style="green"))


# ---------------------------------------------------------------- the eval report


def print_report(report: dict) -> None:
    """`qlora jobs report`: each prompt with its reference, the base and the tuned answer side by side and
    their scores, then the metrics, base against tuned."""
    from rich.text import Text

    generation, metrics = report["generation"], report["metrics"]
    preference = "rewards" in report  # method dpo: the reference is the preferred answer, beside the rejected one
    # fold: a model's run-on "word" (an untrained base repeats one) shows whole, not cut at the cell's edge.
    names = ("prompt", "chosen", "rejected", "base", "tuned") if preference else ("prompt", "reference", "base", "tuned")
    texts = [Column(name, overflow="fold") for name in names]
    rows = Table("line", *texts, Column("exact match\nbase / tuned", justify="center"),
                 Column("F1\nbase / tuned", justify="center"), show_lines=True,
                 title=f"eval report of job {report['job_id']}: {len(report['rows'])} prompts from {report['prompts_from']}, "
                       f"{_sampling(generation)}")
    for row in report["rows"]:
        base, tuned = row["base"], row["tuned"]
        given = [row["reference"], row.get("rejected")] if preference else [row["reference"]]
        rows.add_row("-" if row["line"] is None else str(row["line"]),
                     Text(printable(row["prompt"]) + (" (start cut)" if row["prompt_truncated"] else "")),
                     *(Text(printable(text)) if text is not None else Text("-", style="dim") for text in given),
                     _answer(base), _answer(tuned),
                     f"{_mark(base.get('exact_match'))} / {_mark(tuned.get('exact_match'))}",
                     f"{number(base.get('f1'), '.2f')} / {number(tuned.get('f1'), '.2f')}")
    print_table(rows)

    scores = Table("", Column("base", justify="right"), Column("tuned", justify="right"), title="metrics")
    base, tuned = metrics["base"], metrics["tuned"]
    for label, key, spec in (("exact match", "exact_match", ".0%"), ("F1", "f1", ".3f"), ("stopped by itself", "stopped", ".0%"),
                             ("loss", "loss", ".4f"), ("perplexity", "perplexity", ",.2f")):
        scores.add_row(label, number(base[key], spec), number(tuned[key], spec))
    print_table(scores)
    out.print(Text(f"exact match and F1 (on lowercased whitespace tokens): means over the {metrics['scored_rows']} rows "
                   f"with a reference; loss per trained token over {metrics['loss_rows']} {metrics['loss_rows_from']} "
                   f"rows ({metrics['loss_tokens']:,} tokens)\nbase: {generation['base']}\ntuned: {generation['tuned']}",
                   style="dim"), soft_wrap=True)
    if preference:
        _print_rewards(report["rewards"])


def _print_rewards(rewards: dict | None) -> None:
    """A dpo report's rewards on the validation pairs, first evaluation against final: did it learn the preference?"""
    from rich.text import Text

    if rewards is None:
        out.print(Text("rewards: none (the job had no validation set to measure them on)", style="dim"))
        return
    first, final = rewards["first"], rewards["final"]
    table = Table("", Column(f"first eval\nstep {first['step']}", justify="right"),
                  Column(f"final\nstep {final['step']}", justify="right"), Column("change", justify="right"),
                  title=f"rewards on {rewards['pairs']} validation pairs")
    for label, key, spec in (("reward accuracy", "accuracy", ".0%"), ("reward margin", "margin", "+.4f"),
                             ("reward chosen", "chosen", "+.4f"), ("reward rejected", "rejected", "+.4f"),
                             ("DPO loss", "loss", ".4f")):
        a, b = first[key], final[key]
        change = ("-" if a is None or b is None else f"{100 * (b - a):+.0f} pts" if key == "accuracy"
                  else format(b - a, "+.4f"))
        table.add_row(label, number(a, spec), number(b, spec), change)
    print_table(table)
    against = "a frozen copy of the starting adapter" if rewards["reference"] == "initial_adapter" else "the base model"
    out.print(Text("a reward is beta x how much likelier the tuned model finds an answer than the reference "
                   f"({against}); accuracy: share of pairs whose chosen answer out-gains the rejected one (0 at "
                   "step 0), margin: its mean lead. Accuracy near 100% with a growing margin: the preference "
                   "was learned", style="dim"), soft_wrap=True)


def _sampling(generation: dict) -> str:
    sampled = "greedy" if not generation["temperature"] else f"temperature {generation['temperature']:g}, seed {generation['seed']}"
    return f"{sampled}, at most {generation['max_new_tokens']} new tokens"


def _answer(scored: dict):
    from rich.text import Text

    text = Text(printable(scored["answer"]))
    if not scored["stopped"]:
        text.append(" (did not stop)", style="dim")
    return text


def _mark(match: bool | None) -> str:
    return "-" if match is None else ("✓" if match else "✗")


def printable(text: str) -> str:
    """Text that is not ours (a model's answer, a dataset's tokens, a name or message read back from the
    API) as a terminal may show it: control characters as U+FFFD, line breaks and tabs kept. An untrained
    model emits any byte and a dataset holds what its team uploaded: "\\x1b]0;...\\x07" would retitle the
    terminal, "\\x1b[2J" clear it, and rich passes ESC through (it strips only BEL, BS, VT, FF and CR).
    Bidi overrides too: they make the text after them display as other text (app/text.BIDI_CONTROLS)."""
    import unicodedata

    from app.text import BIDI_CONTROLS

    return "".join("\ufffd" if (unicodedata.category(c) == "Cc" and c not in "\n\t") or c in BIDI_CONTROLS else c
                   for c in text)
