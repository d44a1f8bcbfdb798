"""A job's live view as Server-Sent Events: what GET /jobs/{id}/stream sends, poll by poll.

Each open stream holds a socket and a poll of the database every second, so a key may hold only so
many at once, and a stream lasts only as long as its key: a revoked key's streams end at their next poll.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from app.db import session_scope
from app.errors import TooManyStreams, Unauthorized
from app.jobs import repository, states
from app.jobs.schemas import EvalPoint, EventOut, JobOut, TrainPoint
from app.teams import repository as teams_repository

STREAM_POLL_S = 1.0  # how often a stream looks for news: the worker relays progress about this often
STREAM_KEEPALIVE_S = 15.0  # a comment after this long without news, so proxies keep an idle stream open
STREAM_BATCH = 500  # rows per poll; a stream that is behind catches up over the next polls
KEY_REVOKED = "key revoked"  # what a poll answers once the stream's key no longer authenticates


class StreamSlot:
    """One open stream's place in its key's count; the stream gives it back when it ends."""

    def __init__(self, slots: StreamSlots, key_id: str):
        self._slots, self._key_id = slots, key_id

    def release(self) -> None:
        self._slots.release(self._key_id, self)


class StreamSlots:
    """The live streams each API key holds open in this process, up to a cap (QLORA_MAX_STREAMS_PER_KEY).

    The cap is per process because what a stream holds (a socket, a thread hop and a database poll
    every second) is the process's to give. A slot is counted while its stream lives: a weak set,
    so a stream whose generator never ran its `finally` (its client left before the first byte)
    still frees its slot once it is garbage-collected.
    """

    def __init__(self, per_key: int):
        self.per_key = per_key
        self._lock = threading.Lock()
        self._open: dict[str, weakref.WeakSet[StreamSlot]] = {}

    def take(self, key_id: str) -> StreamSlot:
        """A slot for one more stream of this key, or TooManyStreams (429) when it has the cap open."""
        with self._lock:
            live = self._open.setdefault(key_id, weakref.WeakSet())
            if len(live) >= self.per_key:
                raise TooManyStreams(
                    f"this API key already has {len(live)} live streams open, the limit per key "
                    f"(QLORA_MAX_STREAMS_PER_KEY={self.per_key}); close one, or poll GET /jobs/{{id}} instead")
            slot = StreamSlot(self, key_id)
            live.add(slot)
            return slot

    def release(self, key_id: str, slot: StreamSlot) -> None:
        with self._lock:
            live = self._open.get(key_id)
            if live is not None:
                live.discard(slot)
                if not live:
                    del self._open[key_id]


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


def _poll_job(database_url: str, team_id: str, key_id: str, job_id: str, metric_after: int, event_after: int):
    """One short read in a session of its own: the key, the job, then the points and events past the
    cursors. The job is read first, so once it shows a final state every point and event before it is
    visible too. None: the job is gone; KEY_REVOKED: the caller's key no longer authenticates."""
    with session_scope(database_url) as session:
        if not teams_repository.key_is_live(session, key_id):
            return KEY_REVOKED
        job = repository.get(session, team_id, job_id)
        if job is None:
            return None
        points = repository.metrics_after(session, team_id, job.id, metric_after, STREAM_BATCH)
        events = repository.events(session, team_id, job.id, event_after, STREAM_BATCH)
        metric_payloads = [
            (p.id, {"kind": p.kind, **(TrainPoint if p.kind == "train" else EvalPoint).model_validate(p).model_dump(mode="json")})
            for p in points]
        return JobOut.of(job), metric_payloads, [EventOut.model_validate(e) for e in events]


async def job_stream(database_url: str, team_id: str, key_id: str, job_id: str, slot: StreamSlot) -> AsyncIterator[str]:
    """The stream for one caller: it holds `slot` until it ends, and ends when the key is revoked."""
    try:
        async for chunk in _job_stream(database_url, team_id, key_id, job_id):
            yield chunk
    finally:
        slot.release()


async def _job_stream(database_url: str, team_id: str, key_id: str, job_id: str) -> AsyncIterator[str]:
    last_job = None
    metric_after = event_after = 0
    quiet_since = time.monotonic()
    while True:
        polled = await run_in_threadpool(_poll_job, database_url, team_id, key_id, job_id, metric_after, event_after)
        if polled is None:  # deleted under the stream
            return
        if isinstance(polled, str):  # KEY_REVOKED: the answer the key now gets from any route, then the end
            yield _sse("error", json.dumps(Unauthorized("the API key was revoked; this stream ends here").body()))
            return
        job, points, events = polled
        out: list[str] = []
        for point_id, payload in points:
            out.append(_sse("metric", json.dumps(payload)))
            metric_after = point_id
        for event in events:
            out.append(_sse("event", event.model_dump_json()))
            event_after = event.id
        # The heartbeat moves every second while a job runs; it is not news for a viewer.
        state = job.model_dump(mode="json", exclude={"heartbeat_at"})
        if state != last_job:
            out.append(_sse("job", job.model_dump_json()))
            last_job = state
        caught_up = len(points) < STREAM_BATCH and len(events) < STREAM_BATCH
        if out:
            quiet_since = time.monotonic()
            yield "".join(out)
        elif time.monotonic() - quiet_since >= STREAM_KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keepalive\n\n"
        if job.status in states.FINISHED and caught_up:
            return
        if caught_up:
            await asyncio.sleep(STREAM_POLL_S)
