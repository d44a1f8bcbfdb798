"""A job stream that starts past a position (app/jobs/stream.py, StreamStart): `?after_step=` for a chart
that already holds the curve through a step, and the standard SSE `Last-Event-ID` for a client that
reconnects, so it goes on exactly where it was. Against the real API process and Postgres; the job is
trained by hand (tests/service/test_stream_fanout.py) so the test knows every point and event to expect.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from app.db import session_scope
from app.jobs import runs, states
from app.jobs.stream import STREAM_BATCH
from app.pagination import MAX_ID
from tests.deployment import wait_until
from tests.service.test_stream_fanout import (
    STREAM_TIMEOUT_S,
    TEAM,
    HandTrainedJob,
    Reader,
    assert_saw_the_whole_job,
    finish_all,
    hand_trained_job,
    start,
)


@pytest.fixture
def job(deployment, demo_data) -> HandTrainedJob:
    return hand_trained_job(deployment, demo_data, TEAM)


def messages(response: httpx.Response) -> Iterator[tuple[str, dict, str | None]]:
    """(event, data, id) of each message of an SSE body as it arrives; comments skipped. `id` is the message's
    own `id:` field, None where it has none (an EventSource then keeps the one it had)."""
    name, data, message_id = "message", [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line.startswith("id:"):
            message_id = line[3:].strip()
        elif not line and data:
            yield name, json.loads("\n".join(data)), message_id
            name, data, message_id = "message", [], None


def all_event_ids(client: httpx.Client, job: HandTrainedJob) -> list[int]:
    ids: list[int] = []
    while page := client.get(f"/jobs/{job.id}/events", params={"limit": 1000, "after": ids[-1] if ids else 0}).json():
        ids += [e["id"] for e in page]
    return ids


def test_a_stream_after_a_step_gets_exactly_the_points_past_it_and_a_later_full_stream_everything(deployment, job):
    key = deployment.team_key(TEAM)
    for _ in range(30):
        job.report(10, events=1)
    # The first stream of the job starts its feed where it starts (past step 200); one opened from the
    # job's beginning afterwards must still get the whole history, read by itself.
    past = start(Reader(deployment, key, job.id, params={"after_step": 200}))
    past.wait_for_step(300)
    whole = start(Reader(deployment, key, job.id))
    whole.wait_for_step(300)
    for _ in range(5):
        job.report(4, events=1)
    job.finish()
    finish_all([past, whole])
    assert past.steps() == list(range(201, job.step + 1))
    with deployment.client(key) as client:
        assert past.event_ids() == all_event_ids(client, job)  # events: all of them
        assert past.messages[-1] == ("job", client.get(f"/jobs/{job.id}").json())  # the final state last
        assert_saw_the_whole_job(whole, client, job)


def test_a_reconnect_with_last_event_id_goes_on_with_no_duplicate_and_no_gap(deployment, job):
    key = deployment.team_key(TEAM)
    for _ in range(100):
        job.report(3, events=1)
    steps: list[int] = []
    events: list[int] = []

    def read(headers: dict[str, str], params: dict, stop_after: tuple[str, int] | None) -> str | None:
        """Read the stream until `stop_after` (that many messages of that kind, then hang up) or its end;
        the last `id:` seen."""
        last_id, seen = None, 0
        with httpx.Client(base_url=deployment.url, headers={"Authorization": f"Bearer {key}", **headers},
                          timeout=STREAM_TIMEOUT_S) as client, \
                client.stream("GET", f"/jobs/{job.id}/stream", params=params) as response:
            assert response.status_code == 200, response.read()
            for name, data, message_id in messages(response):
                if name in ("metric", "event"):
                    assert message_id is not None, (name, data)
                    last_id = message_id
                    (steps if name == "metric" else events).append(data["step"] if name == "metric" else data["id"])
                if stop_after and name == stop_after[0]:
                    seen += 1
                    if seen == stop_after[1]:
                        return last_id  # hang up in the middle of the history, as a dropped connection would
        return last_id

    # Cut in the middle of the points, then in the middle of the events (the history sends a batch of
    # points, then one of events), then follow to the end across news written between the connections.
    cut = read({}, {}, ("metric", 150))
    job.report(3, events=1)
    cut = read({"Last-Event-ID": cut}, {}, ("event", 60))
    job.report(3, events=1)
    job.finish()
    read({"Last-Event-ID": cut}, {}, None)
    assert steps == list(range(1, job.step + 1))
    with deployment.client(key) as client:
        assert events == all_event_ids(client, job)

    # With after_step too (a reconnect keeps its URL): still only the points past it, none twice.
    steps.clear()
    events.clear()
    cut = read({}, {"after_step": 100}, ("metric", 50))
    read({"Last-Event-ID": cut}, {"after_step": 100}, None)
    assert steps == list(range(101, job.step + 1))


@pytest.mark.parametrize(("params", "headers", "field"), [
    ({"after_step": -1}, {}, "after_step"),
    ({"after_step": MAX_ID + 1}, {}, "after_step"),
    ({"after_step": 10**30}, {}, "after_step"),
    ({"after_step": "ten"}, {}, "after_step"),
    ({"after_event": -5}, {}, "after_event"),
    ({"after_event": 10**30}, {}, "after_event"),
    ({}, {"Last-Event-ID": "garbage"}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "12"}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "1.2.3"}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "-1.0"}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": f"{MAX_ID + 1}.0"}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "0." + "9" * 40}, "Last-Event-ID"),
])
def test_a_bad_position_answers_422_naming_the_field_and_holds_no_stream(deployment, job, params, headers, field):
    key = deployment.team_key(TEAM)
    with deployment.client(key) as client:
        for _ in range(12):  # more than the streams a key may hold (10): a refused stream holds none
            # Read as a stream: one wrongly served would never end (the job runs).
            with client.stream("GET", f"/jobs/{job.id}/stream", params=params, headers=headers) as answer:
                assert answer.status_code == 422, answer.status_code
                answer.read()
            assert field in [d["field"].split(".")[-1] for d in answer.json()["error"]["details"]], answer.json()
    reader = start(Reader(deployment, key, job.id))
    job.report(2)
    job.finish()
    finish_all([reader])


@pytest.mark.parametrize(("params", "headers", "first_step"), [
    ({}, {"Last-Event-ID": f"{MAX_ID}.{MAX_ID}"}, 11),  # forged, or another job's (ids are the whole table's)
    ({"after_event": MAX_ID}, {}, 1),
])
def test_a_position_past_the_jobs_newest_rows_does_not_stall_the_other_streams_of_the_job(deployment, job, params,
                                                                                             headers, first_step):
    """The first stream of a job starts the job's feed where it starts. One that started past every row the job
    has (a Last-Event-ID a script kept from another job, ids being the whole table's; an after_event too high)
    started the feed there, and no other stream of the job in that process ever caught up with it: each read
    the database by itself every second, never got the job's state, and never ended, even after the job did.
    Such a position now means the job's newest rows: the stream gets what comes after them."""
    key = deployment.team_key(TEAM)
    job.report(10, events=2)
    with deployment.client(key) as client:
        seen = all_event_ids(client, job)
    far = start(Reader(deployment, key, job.id, params=params, headers=headers))
    whole = Reader(deployment, key, job.id)
    whole.start()
    assert whole.opened.wait(STREAM_TIMEOUT_S), "a stream opened after the far one never got the job"
    whole.wait_for_step(10)
    job.report(5, events=1)
    job.finish()
    finish_all([far, whole])
    with deployment.client(key) as client:
        assert_saw_the_whole_job(whole, client, job)
        assert far.steps() == list(range(first_step, 16))
        assert far.event_ids() == [i for i in all_event_ids(client, job) if i > max(seen)]


@pytest.mark.parametrize("batches", [6, 1])  # more rows than the feed keeps (FEED_BUFFER_ROWS), and fewer
def test_a_stream_opened_after_a_resume_deleted_points_the_feed_had_read_follows_the_feed(deployment, job, batches):
    """A resumed attempt deletes the points its lost one logged past the checkpoint (app/jobs/runs.py,
    _plan_resume). A stream opened afterwards reads the job's history up to its newest point, which now lies
    before what the job's feed still holds (a watcher kept the feed going while its buffer moved on): it was never
    "covered" by the feed, so it read the database alone every second, never got the job's state, and did not end
    when the job did, until the resumed run logged a point past the deleted ones (never, if it ended first).
    Where the feed's buffer still held every point, the stream took the deleted ones from it."""
    from datetime import UTC, datetime

    from app.jobs import repository

    key = deployment.team_key(TEAM)
    watcher = start(Reader(deployment, key, job.id))
    for _ in range(batches):
        job.report(STREAM_BATCH)
    watcher.wait_for_step(job.step)
    with session_scope(deployment.settings.database_url) as session:  # the worker is lost; no checkpoint was saved
        row = repository.get_any_team(session, job.id)
        assert runs.attempt_lost(session, row, "the worker stopped sending heartbeats", 3, datetime.now(UTC), 3600.0,
                                 outside_the_job=True) == "requeued"
    with session_scope(deployment.settings.database_url) as session:  # the next attempt starts over: no point is left
        claimed = runs.claim(session, job.id, "hand:gpu1")
        assert claimed is not None and claimed.attempt == job.attempt + 1
    job.attempt, job.step = claimed.attempt, 0
    # The late stream opens once the feed has seen the new attempt (it polls every STREAM_POLL_S): the watcher,
    # which follows the feed, got the job with it.
    wait_until(lambda: any(j["attempt"] == claimed.attempt for j in watcher.jobs()), STREAM_TIMEOUT_S,
               "the watcher never got the job's new attempt")
    late = Reader(deployment, key, job.id)
    late.start()
    assert late.opened.wait(STREAM_TIMEOUT_S), "a stream opened after the resume never got the job"
    job.finish()  # the resumed attempt ends before it logs a point
    finish_all([watcher, late])
    with deployment.client(key) as client:
        final = client.get(f"/jobs/{job.id}").json()
        assert late.messages[-1] == ("job", final) and final["status"] == states.SUCCEEDED
        assert late.steps() == [] and late.event_ids() == all_event_ids(client, job)
