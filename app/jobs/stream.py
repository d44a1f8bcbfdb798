"""A job's live view as Server-Sent Events: what GET /jobs/{id}/stream sends, poll by poll."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from app.db import session_scope
from app.jobs import repository, states
from app.jobs.schemas import EvalPoint, EventOut, JobOut, TrainPoint

STREAM_POLL_S = 1.0  # how often a stream looks for news: the worker relays progress about this often
STREAM_KEEPALIVE_S = 15.0  # a comment after this long without news, so proxies keep an idle stream open
STREAM_BATCH = 500  # rows per poll; a stream that is behind catches up over the next polls


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


def _poll_job(database_url: str, team_id: str, job_id: str, metric_after: int, event_after: int):
    """One short read in a session of its own: the job, then the points and events past the cursors.
    The job is read first, so once it shows a final state every point and event before it is visible too."""
    with session_scope(database_url) as session:
        job = repository.get(session, team_id, job_id)
        if job is None:
            return None
        points = repository.metrics_after(session, team_id, job.id, metric_after, STREAM_BATCH)
        events = repository.events(session, team_id, job.id, event_after, STREAM_BATCH)
        metric_payloads = [
            (p.id, {"kind": p.kind, **(TrainPoint if p.kind == "train" else EvalPoint).model_validate(p).model_dump(mode="json")})
            for p in points]
        return JobOut.of(job), metric_payloads, [EventOut.model_validate(e) for e in events]


async def job_stream(database_url: str, team_id: str, job_id: str) -> AsyncIterator[str]:
    last_job = None
    metric_after = event_after = 0
    quiet_since = time.monotonic()
    while True:
        polled = await run_in_threadpool(_poll_job, database_url, team_id, job_id, metric_after, event_after)
        if polled is None:  # deleted under the stream
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
