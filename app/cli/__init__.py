"""The `qlora` command: one module per audience, one renderer.

    engine.py      train, estimate, tiny-model, demo-data: the recipe on this machine, no service needed
    processes.py   serve, worker, reaper, migrate: the service's processes
    admin.py       qlora admin ...: teams, API keys and the model registry, against the database
    client.py      qlora datasets ..., qlora jobs ..., qlora usage: the API over HTTP (api_client.py), and the live watcher
    render.py      the tables, summaries, events and progress bars they all print

`qlora --help` and the client verbs never import torch: an engine verb imports it inside the command.
"""

from __future__ import annotations

import errno

import typer
from rich.markup import escape

from app.cli import admin, client, engine, processes
from app.cli.render import err

cli = typer.Typer(help="qlora-service: QLoRA fine-tuning as a service.", no_args_is_help=True, add_completion=False)
cli.add_typer(engine.commands)  # no name: its verbs are top-level ones
cli.add_typer(processes.commands)
cli.add_typer(admin.commands, name="admin")
cli.add_typer(client.datasets_commands, name="datasets")
cli.add_typer(client.jobs_commands, name="jobs")
cli.add_typer(client.usage_commands)  # no name: `qlora usage`


def main() -> None:
    import sys

    from pydantic import ValidationError

    for stream in (sys.stdout, sys.stderr):
        # Under LC_ALL=C without UTF-8 mode, or PYTHONIOENCODING=ascii, a job named "lång" must print
        # as "l?ng", not end the command with a UnicodeEncodeError. (JSON escapes it anyway.)
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="replace")
    try:
        cli()
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # A setting from the environment that cannot be used: what a person fixes, not a traceback.
        for error in exc.errors():
            # The variable, then where inside its JSON value (QLORA_GPU_CLASSES's "a100" was QLORA_GPU_CLASSES_A100).
            setting, *inside = error["loc"] or ("",)
            where = (f"QLORA_{str(setting).upper()}{' [' + ']['.join(map(repr, inside)) + ']' if inside else ''}: "
                     if setting else "")
            err.print(f"[red]error:[/red] {where}{escape(error['msg'].removeprefix('Value error, '))}",
                      highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except OSError as exc:
        # stdout redirected to a full disk or quota (`> /dev/full`): a file the user chose, so no traceback.
        # (A broken pipe, `| head -1`, click ends quietly itself.) Other OSErrors are ours to see.
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        _output_failed(exc)


OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _output_failed(exc: OSError) -> None:
    import os
    import sys

    # What is still buffered would fail again when Python flushes stdout at exit ("Exception ignored ...").
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    try:
        err.print(f"[red]error:[/red] cannot write the output: {escape(exc.strerror or str(exc))}",
                  highlight=False, soft_wrap=True)
    except OSError:  # stderr is the full one
        pass
    raise SystemExit(1)
