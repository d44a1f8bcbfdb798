"""How `qlora` shows things: the consoles, tables, a run's summary, jobs, datasets, events and progress bars.

Every verb prints through here, so a run summary reads the same after `qlora train` as in `qlora jobs show`.
Results go to stdout (`out`); errors, hints and progress bars go to stderr (`err`), so a pipe gets only the result.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
out = Console()


# ---------------------------------------------------------------- cells


def print_table(table: Table) -> None:
    # A pipe has no width; rich would assume 80 columns and squeeze the cells. Print a table
    # whole there (it stays as narrow as its content), and fit the terminal otherwise.
    (out if out.is_terminal else Console(file=out.file, width=240)).print(table)


def id_column():
    from rich.table import Column

    # Ids are what a user copies into the next command: never wrapped or cut, even in a narrow pipe.
    return Column("id", no_wrap=True, min_width=32)


def plain(value: str):
    from rich.text import Text

    # User data in a table cell must print as typed: "[x]" in a name is not rich markup.
    return Text(value)


def when(value: str | None) -> str:
    return value.replace("T", " ")[:19] if value else "-"


def number(value: float | None, spec: str) -> str:
    """A value in the given format, or "-" where there is none (a diverged loss is stored as null)."""
    return "-" if value is None else format(value, spec)


def steps(job: dict) -> str:
    return f"{job['step']}/{job['total_steps'] if job['total_steps'] is not None else '?'}"


def status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow", "cancelling": "yellow",
            "running": "cyan"}.get(status, "white")


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


# ---------------------------------------------------------------- a run's summary


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """A run's summary (the recipe's summary.json, which is also a finished job's `summary`) as table rows.

    "-" where it has no value: no validation set, a loss that diverged (stored as null), a run that
    stopped before the end. The merge fidelity shows only for a run that merged.
    """
    if not s:
        return []
    run_steps = s.get("steps") or {}
    parameters = s.get("parameters") or {}
    train_data = (s.get("data") or {}).get("train") or {}
    peak = s.get("peak_memory_bytes")
    rows = [
        ("steps", _run_steps(run_steps) if run_steps else "-"),
        ("train loss", _train_loss(s.get("train_loss_first"), s.get("train_loss_final"))),
        ("eval loss", number(s.get("eval_loss_final"), ".4f")),
        ("trainable / total params", f"{parameters['trainable']:,} / {parameters['total']:,}" if parameters else "-"),
        ("target modules", ", ".join(s.get("target_modules") or ()) or "-"),
        ("truncated rows", number(train_data.get("truncated_rows"), "d")),
        ("tokens/s", number(s.get("tokens_per_second"), ",.0f")),
        ("peak memory", "-" if peak is None else f"{peak / 2**20:,.0f} MiB"),
    ]
    if s.get("merge_fidelity"):
        f = s["merge_fidelity"]
        rows.append(("merge fidelity", f"max |Δlogit| {number(f.get('max_abs_logit_diff'), '.3g')}, "
                                       f"mean {number(f.get('mean_abs_logit_diff'), '.3g')}, "
                                       f"Δeval loss {number(f.get('eval_loss_diff'), '.3g')}"))
    return rows


def _run_steps(run_steps: dict) -> str:
    resumed = run_steps.get("resumed_from")
    return f"{run_steps['completed']} / {run_steps['planned']}" + (f" (resumed from {resumed})" if resumed else "")


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


def print_job(job: dict) -> None:
    from rich.text import Text

    table = Table(show_header=False, title=f"job {job['id']}")
    fraction = job["progress"]["fraction"]
    rows = [
        ("name", plain(job["name"])),
        ("status", Text(job["status"], style=status_style(job["status"]))),
        ("base model", plain(job["base_model"])),
        ("dataset", job["dataset_id"] or "-"),
        ("validation", job["validation_dataset_id"] or "-"),
        ("queue / attempt", f"{job['queue']} / {job['attempt']}"),
        ("priority", job.get("priority", "normal") + (f", preempted {job['preemptions']}x" if job.get("preemptions") else "")),
        ("progress", f"step {steps(job)}" + (f" ({fraction:.0%})" if fraction is not None else "")),
        ("trained tokens", f"{job['trained_tokens']:,}"),
        ("created", when(job["created_at"])),
        ("started", when(job["started_at"])),
        ("finished", when(job["finished_at"])),
    ]
    if job.get("queue_position") is not None:
        waiting = {"gpu": "a free GPU of its class", "max_running": "the team's max_running",
                   "gpu_hours_per_month": "the team's monthly GPU-hours budget"}.get(job["waiting_for"], job["waiting_for"])
        rows.append(("queue position", f"{job['queue_position']} (waiting for {waiting})"))
    if job["error"]:
        rows.append(("error", Text(job["error"], style="red")))
    rows += summary_rows(job.get("summary") or {})
    for k, v in rows:
        table.add_row(k, v)
    print_table(table)


def print_dataset(d: dict) -> None:
    table = Table(show_header=False, title=f"dataset {d['id']}")
    status = f"[green]{d['status']}[/green]" if d["status"] == "ready" else f"[red]{d['status']}[/red]"
    for k, v in (("id", d["id"]), ("filename", plain(d["filename"])), ("status", status), ("format", d["format"] or "-"),
                 ("rows", f"{d['rows']:,}"), ("token estimate", f"{d['token_estimate']:,}"),
                 ("size", f"{d['bytes']:,} bytes"), ("sha256", d["sha256"]), ("created", when(d["created_at"]))):
        table.add_row(k, v)
    print_table(table)
    if d["error_count"]:
        err.print(f"[red]{d['error_count']} invalid line{'s' if d['error_count'] != 1 else ''}; "
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
                         f": {event['message']}" if event["message"] else "")


# ---------------------------------------------------------------- transfers


def transfer_progress(description: str, total: int | None, transient: bool = False):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    # On stderr, so stdout carries only the result.
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=transient)
    return progress, progress.add_task(description, total=total)


# ---------------------------------------------------------------- usage


def gpu_hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f}"


def print_usage(report: dict) -> None:
    """`qlora usage`: one team's usage by day and by job; several teams (--all-teams) one row each."""
    from rich.table import Column

    from app.text import format_bytes

    def number(header: str) -> Column:
        return Column(header, justify="right")

    window = f"{when(report['from'])} to {when(report['to'])} UTC"
    teams = report["teams"]
    table = Table("team", number("GPU-hours"), number("trained tokens"), number("jobs"), number("storage now"),
                  title=f"usage, {window}")
    for t in teams:
        table.add_row(plain(t["team"]), gpu_hours(t["gpu_seconds"]), f"{t['trained_tokens']:,}", f"{t['jobs']:,}",
                      format_bytes(t["storage_bytes"]))
    print_table(table)
    if len(teams) != 1:
        return
    team = teams[0]
    days = Table("day (UTC)", number("GPU-hours"), number("trained tokens"), title="by day")
    for d in team["by_day"]:
        days.add_row(d["date"], gpu_hours(d["gpu_seconds"]), f"{d['trained_tokens']:,}")
    jobs = Table(id_column(), "name", "status", number("GPU-hours"), number("trained tokens"), number("attempts"),
                 title="by job, most GPU time first")
    for j in team["by_job"]:
        jobs.add_row(j["job_id"], plain(j["name"]), f"[{status_style(j['status'])}]{j['status']}[/]",
                     gpu_hours(j["gpu_seconds"]), f"{j['trained_tokens']:,}", str(j["attempts"]))
    for part in (days, jobs):
        if part.row_count:
            print_table(part)
    if team["by_job_truncated"]:
        err.print(f"by job: the {len(team['by_job']):,} jobs with the most GPU time of {team['jobs']:,}; "
                  "ask for a shorter window (--from, --to) to see the rest", highlight=False, soft_wrap=True)
