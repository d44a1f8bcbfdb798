"""What `qlora` prints of text that is not its own (a dataset's tokens, a job's name and error, an event's
message) reaches the terminal as text: an escape sequence in it is shown, never run, and "[red]" in it
is not rich markup. A dataset holds whatever its team uploaded, and a preflight shows its tokens."""

from __future__ import annotations

from rich.console import Console

from app.cli import render

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
