"""Structured logs: one JSON object per line, with the job id on every line that concerns a job.

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


def configure(process: str, fmt: str = "json", level: int = logging.INFO) -> None:
    """Route every logger (and Python warnings) to one stderr handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFromPath())
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"))
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
