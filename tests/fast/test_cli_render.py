"""What `qlora` prints of text that is not its own (a dataset's tokens, a job's name and error, an event's
message) reaches the terminal as text: an escape sequence in it is shown, never run, and "[red]" in it
is not rich markup. A dataset holds whatever its team uploaded, and a preflight shows its tokens."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from app.cli import render
from tests.deployment import ROOT

# Retitle the terminal (OSC 0), clear the screen (CSI 2J), and a right-to-left override (U+202E) that
# would make what follows display reversed: none of them may reach the terminal as themselves.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J[red]loud[/red]\u202egnp.exe"


def assert_shown_not_run(shown: str) -> None:
    assert "\x1b]0;pwned" not in shown and "\x1b[2J" not in shown and "\u202e" not in shown, repr(shown)
    assert "\ufffd]0;pwned" in shown and "\ufffd[2J[red]loud[/red]" in shown, repr(shown)  # shown, markup as typed


def test_a_datasets_tokens_in_a_preflight_print_as_text(capsys):
    train = {"rows": 1, "complete": True, "rows_in_file": 1, "lengths": {"min": 3, "median": 3, "p95": 3, "max": 3},
             "truncated_rows": 0, "dropped_rows": 0, "trained_tokens": 1, "tokens": 3, "trained_fraction": 0.33,
             "trained_tokens_lost": 0, "rows_without_eos": 0, "rows_with_special_tokens": 0, "duplicate_rows": 0}
    render.print_preflight({"placement": {"note": "memory not checked"}, "report": {
        "train": train, "validation": None, "steps": 1, "epochs": 1.0, "steps_per_epoch": 1, "steps_note": None,
        "examples": [{"line": 1, "truncated": False, "length": 3,
                      "tokens": [{"id": 5, "text": HOSTILE, "trained": True}, {"id": 6, "text": "\n", "trained": False}]}],
        "refusals": [], "warnings": []}})
    shown = capsys.readouterr().out
    assert_shown_not_run(shown)
    assert "gnp.exe\n" in shown  # a line break in the text is kept: it is how the row reads


def test_a_jobs_name_error_and_events_print_as_text(capsys):
    job = {"id": "a" * 32, "name": HOSTILE, "status": "failed", "base_model": "tiny", "spec": {}, "initial_job_id": None,
           "dataset_id": "d" * 32, "validation_dataset_id": None, "queue": "gpu-default", "attempt": 1,
           "priority": "normal", "preemptions": 0, "step": 3, "total_steps": 10, "trained_tokens": 100,
           "progress": {"step": 3, "total_steps": 10, "fraction": 0.3}, "created_at": "2026-01-01T00:00:00Z",
           "started_at": None, "finished_at": None, "queue_position": None, "error": f"tokenizer: {HOSTILE}",
           "summary": None}
    render.print_job(job)
    assert_shown_not_run(capsys.readouterr().out)
    console = Console(force_terminal=True, width=200)
    with console.capture() as captured:
        console.print(render.event_line({"level": "error", "step": 3, "created_at": "2026-01-01T00:00:00Z",
                                         "type": "failed", "message": HOSTILE}))
    assert_shown_not_run(captured.get())


def terminal_of(columns: int, code: str) -> str:
    """What `code` prints on a colour terminal `columns` wide (rich reads FORCE_COLOR and COLUMNS as it starts),
    its colours taken out: each line as the terminal shows it."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")} | {
        "FORCE_COLOR": "1", "COLUMNS": str(columns), "LINES": "50", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", "from app.cli import render\n" + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)


JOBS = [{"id": f"{n:x}" * 32, "name": name, "status": status, "base_model": "tiny-demo", "step": 160, "total_steps": 160,
         "created_at": "2026-12-06T18:41:11Z", "finished_at": "2026-12-06T18:44:12Z"}
        for n, name, status in ((7, "animal-sounds ✓ lång", "succeeded"), (13, "cancel-me", "cancelled"))]


@pytest.mark.parametrize("columns", [40, 60])
def test_a_list_too_wide_for_the_terminal_loses_no_column_and_cuts_no_cell(columns):
    """`qlora jobs list` at 60 columns cropped the table's right edge (the steps column gone, and the caption naming
    only the columns it had left out on purpose); at 40 the name column had no width left and the status read "s…".
    A list whose id and status alone overflow prints each job as a record: every field, each whole."""
    shown = terminal_of(columns, f"render.print_job_list({JOBS!r})")
    assert max(map(len, shown.splitlines())) <= columns, shown
    assert "…" not in shown, shown
    for job in JOBS:
        assert "160/160" in shown and f" {job['status']}" in shown and job["name"] in shown, shown
        for field in ("name", "status", "steps", "base model", "created", "finished"):
            assert field in shown, shown
        assert job["id"] in shown.splitlines(), shown  # a line of its own: whole, to copy
    assert "2026-12-06 18:44:12" in shown, shown
    wide = terminal_of(200, f"render.print_job_list({JOBS!r})")  # where the table fits, it is the table
    assert "┃ id " in wide and "finished" in wide, wide


def test_a_jobs_dataset_id_folds_in_a_narrow_terminal_rather_than_being_cut():
    """`qlora jobs show` at 40 columns printed the dataset's id as "c63fdac0289a4286…": the rest, which the next
    command needs, was gone. Now it folds onto the next line."""
    job = {**JOBS[0], "spec": {}, "initial_job_id": None, "dataset_id": "c63fdac0289a4286a0642830033f57af",
           "validation_dataset_id": None, "queue": "gpu-default", "attempt": 1, "priority": "normal",
           "preemptions": 0, "trained_tokens": 100, "progress": {"step": 160, "total_steps": 160, "fraction": 1.0},
           "started_at": None, "queue_position": None, "error": None, "summary": None}
    shown = terminal_of(40, f"render.print_job({job!r})")
    assert "…" not in shown and max(map(len, shown.splitlines())) <= 40, shown
    cells = "".join(line.split("│")[2].strip() for line in shown.splitlines() if line.count("│") == 3)
    assert job["dataset_id"] in cells, shown


def test_a_queued_job_whose_class_has_no_worker_says_so_and_since_when():
    """`qlora jobs show` printed "waiting for a free GPU of its class" at position 1 while no worker of the class was up."""
    detail = ("no worker of GPU class default has been seen for 12 minutes (the last, gpu-host-3, stopped without a "
              "word or was cut off from the database); the job starts once one is up")
    job = {**JOBS[0], "status": "queued", "spec": {}, "initial_job_id": None, "dataset_id": "d" * 32, "validation_dataset_id": None,
           "queue": "gpu-default", "attempt": 0, "priority": "normal", "preemptions": 0, "trained_tokens": 0,
           "progress": {"step": 0, "total_steps": None, "fraction": None}, "started_at": None, "finished_at": None,
           "queue_position": 1, "waiting_for": "no_worker", "waiting_detail": detail, "error": None, "summary": None}
    shown = terminal_of(300, f"render.print_job({job!r})")
    assert "1 (waiting for a worker of its class to be up)" in shown, shown
    assert "no worker of GPU class default has been seen for 12 minutes (the last, gpu-host-3," in shown, shown


def test_a_jobs_eval_report_line_says_whether_the_tuned_model_learned_to_stop():
    """`jobs show` gave exact match, F1 and loss of the report, not the share of answers that stopped at the EOS,
    the one measure of whether the model learned to end its turn (a model that never stops scores F1 near 0 too,
    for another reason). A report from before that measure shows what it has."""
    report = {"base": {"exact_match": 0.0, "f1": 0.0, "stopped": 0.0, "loss": 6.45},
              "tuned": {"exact_match": 1.0, "f1": 1.0, "stopped": 1.0, "loss": 0.0368}}
    rows = dict(render.summary_rows({"report": report}))
    assert rows["eval report (tuned / base)"] == ("exact match 100% / 0%, F1 1.00 / 0.00, stopped by itself 100% / 0%, "
                                                  "loss 0.0368 / 6.4500")
    older = {side: {k: v for k, v in values.items() if k != "stopped"} for side, values in report.items()}
    assert dict(render.summary_rows({"report": older}))["eval report (tuned / base)"] == (
        "exact match 100% / 0%, F1 1.00 / 0.00, loss 0.0368 / 6.4500")


def test_a_queued_job_shows_its_planned_steps():
    """`qlora jobs show` and `jobs list` of a queued job said "step 0/?" though its preflight had counted 160 steps:
    GET /jobs/{id} carries the plan (progress.planned), and the line says it is the plan, not a fraction done."""
    job = {**JOBS[0], "status": "queued", "spec": {}, "initial_job_id": None, "dataset_id": "d" * 32, "validation_dataset_id": None,
           "queue": "gpu-default", "attempt": 0, "priority": "normal", "preemptions": 0, "trained_tokens": 0, "step": 0,
           "total_steps": 160, "progress": {"step": 0, "total_steps": 160, "fraction": 0.0, "planned": True},
           "started_at": None, "finished_at": None, "queue_position": None, "error": None, "summary": None}
    assert render.steps(job) == "0/160 (planned)"
    shown = terminal_of(300, f"render.print_job({job!r})")
    assert "step 0/160 (planned)" in shown and "(0%)" not in shown, shown
    started = {**job, "status": "running", "step": 40, "progress": {"step": 40, "total_steps": 160, "fraction": 0.25, "planned": False}}
    assert render.steps(started) == "40/160"


def test_a_job_past_its_last_step_says_which_phase_it_is_in():
    """`qlora jobs show`, `jobs list` and `jobs watch` said "running, step 160/160 (100%)" through the final save,
    merge, eval report and uploads: the status now carries the worker's phase (GET /jobs/{id}'s `phase`)."""
    job = {**JOBS[0], "status": "running", "phase": "merging", "spec": {}, "initial_job_id": None, "dataset_id": "d" * 32,
           "validation_dataset_id": None, "queue": "gpu-default", "attempt": 1, "priority": "normal", "preemptions": 0,
           "trained_tokens": 10_000, "step": 160, "total_steps": 160,
           "progress": {"step": 160, "total_steps": 160, "fraction": 1.0, "planned": False},
           "started_at": None, "finished_at": None, "queue_position": None, "error": None, "summary": None}
    assert render.status_text(job) == "running (merging)"
    assert "running (merging)" in terminal_of(300, f"render.print_job({job!r})")
    assert "running (merging)" in terminal_of(300, f"render.print_job_list([{job!r}])")
    assert render.status_text({**job, "status": "succeeded", "phase": None}) == "succeeded"


def test_a_job_queued_for_a_worker_without_a_gpu_is_not_said_to_wait_for_a_gpu():
    """On a laptop with no GPU `qlora jobs show` said "waiting for a free GPU of its class": GET /jobs/{id} says "cpu"
    where its class's worker has no GPU, and the line says what it waits for."""
    detail = "the worker of GPU class default (laptop:cpu) has no GPU and trains on the CPU, one job at a time: ..."
    job = {**JOBS[0], "status": "queued", "spec": {}, "initial_job_id": None, "dataset_id": "d" * 32, "validation_dataset_id": None,
           "queue": "gpu-default", "attempt": 0, "priority": "normal", "preemptions": 0, "trained_tokens": 0,
           "progress": {"step": 0, "total_steps": None, "fraction": None}, "started_at": None, "finished_at": None,
           "queue_position": 2, "waiting_for": "cpu", "waiting_detail": detail, "error": None, "summary": None}
    assert render.queue_position(job) == "2 (waiting for the CPU worker of its class to be free)"
    shown = terminal_of(300, f"render.print_job({job!r})")
    assert "GPU of its class" not in shown and "has no GPU and trains on the CPU" in shown, shown


def test_qlora_train_prints_a_runs_warnings_and_leaves_its_routine_out(capsys):
    """`qlora train` printed none of the events a worker records for a job: its sink (app/cli/engine.py) prints
    warnings, errors and the noteworthy info events to stderr, as `qlora jobs watch` prints a job's events on a terminal and
    as the recipe's records elsewhere. Routine ones (a checkpoint every save_steps, started) and "failed" (the
    command's own error line says it) stay out."""
    from app.cli.engine import _event_printer
    from worker.training.protocol import Event

    events = [Event(type="started", step=0, message="training started"),
              Event(type="data_truncated", level="warning", step=0, message="3 of 10 training rows were truncated " + HOSTILE),
              Event(type="checkpoint_saved", step=10, message="checkpoint at step 10"),
              Event(type="optimizer_unpaged", step=0, message="runs unpaged"),
              Event(type="failed", level="error", step=12, message="out of memory")]
    for fmt in ("text", "json"):
        show = _event_printer(fmt)
        for event in events:
            show(event)
        shown = capsys.readouterr()
        assert shown.out == "", shown.out  # stdout holds the command's result alone
        if fmt == "json":
            lines = [json.loads(line) for line in shown.err.splitlines()]
            assert [(r["kind"], r["type"], r["level"]) for r in lines] == [
                ("event", "data_truncated", "warning"), ("event", "optimizer_unpaged", "info")], lines
            assert lines[0]["message"] == events[1].message
        else:
            lines = shown.err.splitlines()
            assert len(lines) == 2 and re.fullmatch(r"\d\d:\d\d:\d\d step 0 data_truncated: 3 of 10 training rows were .*",
                                                     lines[0]) and lines[1].endswith(" step 0 optimizer_unpaged: runs unpaged"), lines
            assert_shown_not_run(lines[0])
