"""The embedded default's queue: kombu's filesystem transport, with messages written whole and a message
that cannot be read skipped, not fatal.

kombu writes a message file in place (open, write) with nothing to make it whole: a send on a full disk
leaves an empty file (open succeeds, write fails), as a crash just after a send can, and the reader, which
takes files without the writer's lock, may take one mid-write. Reading such a file raised out of the
worker's consumer: Celery ended the worker ("Unrecoverable error: JSONDecodeError"), and every job waited.
Here a message is written under a name the reader does not list, synced, and renamed into the queue (a
rename is atomic: a reader sees all of it or none), and a file the reader cannot decode is logged and
skipped. Nothing is lost by skipping one: a queue message only says "a job of this class waits", and the
scheduler sends a queued job's message again when none was claimed in time (QLORA_REDISPATCH_AFTER_S).

A process killed between the write and the rename leaves its hidden file behind; nothing reads it, so a
channel's opening removes those older than PARTIAL_MAX_AGE_S (a write takes milliseconds: an older one
is no send in progress)."""

from __future__ import annotations

import logging
import os
import time
import uuid

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

PARTIAL_MAX_AGE_S = 600
PARTIAL_SUFFIX = ".partial"


class Channel(filesystem.Channel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        remove_abandoned_partials(self.data_folder_out)

    # kombu's filesystem Channel names the argument otherwise than its base class does: typed as the former.
    def _put(self, queue, payload, **kwargs):  # type: ignore[override]
        # kombu's name for the file (its reader orders by it), written first as a hidden one it does not list
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as f:
                f.write(dumps(payload).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue, timeout=None):
        while True:  # kombu's reader has taken the file from the queue before it decodes it: each pass takes one
            try:
                return super()._get(queue)
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: a file cut short or empty
                log.error("skipped a message of queue %s that could not be read (%s); a job it named is sent "
                          "again by the scheduler", queue, exc)


def remove_abandoned_partials(directory: str) -> None:
    """Remove the hidden files of sends that never finished (their process was killed mid-write)."""
    cutoff = time.time() - PARTIAL_MAX_AGE_S
    with os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX)):
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:  # another channel's opening removed it first
                pass


class Transport(filesystem.Transport):
    Channel = Channel
