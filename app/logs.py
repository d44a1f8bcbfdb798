"""Logs: one JSON object per line for a log collector or a pipe, text for a person at a terminal, with
the job id on every line that concerns a job (QLORA_LOG_FORMAT: auto, the default, chooses by whether
stderr is a terminal; json or text force one).

The API sets the job id from the request path, the worker while it supervises a job, the training
process for its whole life; whatever logs inside (our code, uvicorn, Celery, transformers, Python
warnings) inherits it through a context variable, so `grep <job id>` finds a job's whole story.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from contextlib import contextmanager

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("qlora_job_id", default=None)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self.process,
            "pid": record.process,  # several API processes (qlora serve --workers N) write to one stream
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        if job_id:
            entry["job_id"] = job_id
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED and k != "job_id"})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_JOB_IN_PATH = re.compile(r"/jobs/(?:ftjob-)?([0-9a-f]{32})\b")


def job_id_in(path: str) -> str | None:
    """The job a URL path (native or OpenAI-style) is about, if any."""
    match = _JOB_IN_PATH.search(path)
    return match.group(1) if match else None


class JobFromPath(logging.Filter):
    """Access-log lines are written outside the request's context: take the job id from the path."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_id", None) and not job_id_var.get():
            record.job_id = job_id_in(record.getMessage())
        return True


# A signed download link's signature (the keyless route app/jobs/routes.download_signed): whoever reads an
# access log line holding it could download the artifact until the link expires.
_SIGNATURE_IN_QUERY = re.compile(r"([?&]signature=)[^&\s\"]*")


class RedactSignatures(logging.Filter):
    """uvicorn's access log names each request's path with its query: a signed link's signature is kept out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            record.args = tuple(_SIGNATURE_IN_QUERY.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True


class TextFormatter(logging.Formatter):
    """A line a person reads: `time LEVEL process logger: message (job <id>)`, the level in colour on a
    terminal. Never cut or wrapped: a message may be a traceback."""

    COLOURS = {"WARNING": "33", "ERROR": "31", "CRITICAL": "1;31", "DEBUG": "2"}

    def __init__(self, process: str, colour: bool):
        super().__init__(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        if self.colour and level in self.COLOURS:
            record = logging.makeLogRecord({**vars(record), "levelname": f"\033[{self.COLOURS[level]}m{level}\033[0m"})
        line = super().format(record)
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        return f"{line} (job {job_id})" if job_id else line


def resolve_format(fmt: str) -> str:
    """"auto" → text where stderr is a terminal, JSON elsewhere (a pipe, a file, a container's log)."""
    if fmt != "auto":
        return fmt
    return "text" if sys.stderr.isatty() else "json"


def configure(process: str, fmt: str = "auto", level: int = logging.INFO) -> None:
    """Route every logger (and Python warnings) to one stderr handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if resolve_format(fmt) == "json"
                         else TextFormatter(process, colour=sys.stderr.isatty()))
    handler.addFilter(JobFromPath())
    handler.addFilter(RedactSignatures())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "transformers", "datasets"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.captureWarnings(True)


@contextmanager
def job_context(job_id: str):
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)
