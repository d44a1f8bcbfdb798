"""Live job streams share one poll per job (app/jobs/stream.py): every stream still gets every point and
event of its job exactly once and in order, whether it opened first, joined mid-run, joined long after
the feed's buffer moved on, or read too slowly to keep up; revoking a key ends only that key's streams.

The job is trained "by hand": the test claims it and reports points and events through the functions a
worker uses (app/jobs/runs.py), so it controls exactly what each stream must see.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import event

from app.db import engine_for, session_scope
from app.jobs import runs, states
from app.jobs.stream import FEED_BUFFER_ROWS, STREAM_BATCH, STREAM_POLL_S, JobFeeds, StreamSlots, job_stream
from app.jobs.tables import JobMetric
from app.teams import admin
from app.teams import repository as teams_repository
from app.teams import service as teams_service
from tests.deployment import lane, upload
from tests.service.test_bounded_resources import sse_events
from tests.services import in_a_thread_of_its_own
from worker.training.protocol import EvalPoint, Event, Progress, TrainPoint
from worker.training.tiny import demo_spec

TEAM = "team-fanout"  # keys are made per test; streams per key are capped (QLORA_MAX_STREAMS_PER_KEY, 10 here)
STREAM_TIMEOUT_S = 120  # a stream that is still open after this has failed the test, whatever it was doing


# ------------------------------------------------------------------ the job, trained by hand


class HandTrainedJob:
    """A job claimed by the test, which then reports for it as a worker would."""

    def __init__(self, deployment, job_id: str, attempt: int):
        self.deployment, self.id, self.attempt = deployment, job_id, attempt
        self.step = 0  # the last step reported
        self.total = 100_000

    def report(self, points: int, events: int = 0, padding: int = 0) -> None:
        """`points` more train points (the next steps) and `events` events (with `padding` more characters
        of message each, as a long warning would have), in one transaction."""
        records: list = [TrainPoint(step=s, epoch=s / 1000, train_loss=2.0 / s, learning_rate=2e-4, tokens_seen=s * 64)
                         for s in range(self.step + 1, self.step + points + 1)]
        self.step += points
        records += [Event(type="note", message=f"a note at step {self.step} ({i}) " + "." * padding, step=self.step)
                    for i in range(events)]
        with session_scope(self.deployment.settings.database_url) as session:
            runs.report(session, self.id, self.attempt, records, Progress(self.step, self.total, self.step * 64))

    def finish(self) -> None:
        with session_scope(self.deployment.settings.database_url) as session:
            assert runs.finish(session, self.id, self.attempt, states.SUCCEEDED, summary={"status": "succeeded"})


@pytest.fixture
def job(deployment, demo_data) -> HandTrainedJob:
    """A running job of TEAM: created through the API on a queue no worker serves, claimed by the test."""
    return hand_trained_job(deployment, demo_data, TEAM)


def hand_trained_job(deployment, demo_data, team: str) -> HandTrainedJob:
    with deployment.client(deployment.team_key(team)) as client:
        dataset_id = upload(client, demo_data["validation"]).json()["id"]
        created = client.post("/jobs", json={"dataset_id": dataset_id, **demo_spec("tiny"), "gpu_class": lane("nobody")})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
    with session_scope(deployment.settings.database_url) as session:
        claimed = runs.claim(session, job_id, "hand:gpu0")
        assert claimed is not None
        return HandTrainedJob(deployment, job_id, claimed.attempt)


# ------------------------------------------------------------------ reading streams


class Reader(threading.Thread):
    """One client reading a job's stream to its end in a thread: what it saw, parsed, as it arrives."""

    def __init__(self, deployment, key: str, job_id: str, transport: httpx.HTTPTransport | None = None,
                 hold: threading.Event | None = None, params: dict | None = None, headers: dict | None = None):
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=deployment.url, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                                   timeout=STREAM_TIMEOUT_S, transport=transport)
        self.job_id, self.hold, self.params = job_id, hold, params
        self.messages: list[tuple[str, dict | str]] = []
        self.last_step = 0  # of the last metric seen, for waiting on it
        self.status: int | None = None
        self.opened = threading.Event()  # the first `job` message came: the stream is served
        self.ended = False  # the server ended the stream (a closed connection is not an end)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.client, self.client.stream("GET", f"/jobs/{self.job_id}/stream", params=self.params) as response:
                self.status = response.status_code
                if self.hold is not None:  # a client that does not read (yet): the server's writes back up
                    self.opened.set()
                    self.hold.wait(STREAM_TIMEOUT_S)
                for name, data in sse_events(response):
                    self.messages.append((name, data if name == ":" else json.loads(data)))
                    if name == "job":
                        self.opened.set()
                    elif name == "metric":
                        self.last_step = self.messages[-1][1]["step"]
                self.ended = True
        except BaseException as exc:  # noqa: B036 (reported by the test, which asserts on it)
            self.error = exc
        finally:
            self.opened.set()

    def steps(self) -> list[int]:
        return [data["step"] for name, data in self.messages if name == "metric"]

    def event_ids(self) -> list[int]:
        return [data["id"] for name, data in self.messages if name == "event"]

    def jobs(self) -> list[dict]:
        return [data for name, data in self.messages if name == "job"]

    def wait_for_step(self, step: int, timeout: float = STREAM_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.last_step < step:
            assert time.monotonic() < deadline, f"the stream saw steps up to {self.last_step}, not {step}"
            assert self.is_alive(), f"the stream ended early: {self.error!r} {self.messages[-1:]}"
            time.sleep(0.05)


def start(reader: Reader) -> Reader:
    reader.start()
    assert reader.opened.wait(60), "the stream never sent the job"
    assert reader.status == 200, reader.status
    return reader


def finish_all(readers: list[Reader]) -> None:
    for reader in readers:
        reader.join(STREAM_TIMEOUT_S)
        assert not reader.is_alive(), "a stream did not end after the job's final state"
        assert reader.error is None, repr(reader.error)
        assert reader.ended


def assert_saw_the_whole_job(reader: Reader, client: httpx.Client, job: HandTrainedJob) -> None:
    """Every point once and in order, every event once and in order, then the final state, last."""
    assert reader.steps() == list(range(1, job.step + 1))
    event_ids: list[int] = []
    while page := client.get(f"/jobs/{job.id}/events", params={"limit": 1000, "after": event_ids[-1] if event_ids else 0}).json():
        event_ids += [e["id"] for e in page]
    assert reader.event_ids() == event_ids
    final = client.get(f"/jobs/{job.id}").json()
    assert final["status"] == states.SUCCEEDED
    assert reader.messages[-1] == ("job", final)
    jobs = reader.jobs()
    # The job is sent only when it changed (its heartbeat aside), never twice the same.
    without_heartbeat = [{k: v for k, v in j.items() if k != "heartbeat_at"} for j in jobs]
    assert all(a != b for a, b in zip(without_heartbeat, without_heartbeat[1:], strict=False))


FELL_BEHIND = "fell behind its job's feed"


def api_log(deployment) -> str:
    return (deployment.home / "api.log").read_text(errors="replace")


# ------------------------------------------------------------------ the tests


def test_concurrent_streams_and_a_late_joiner_see_every_point_once_in_order(deployment, job):
    keys = [deployment.team_key(TEAM) for _ in range(2)]
    readers = [start(Reader(deployment, keys[i % 2], job.id)) for i in range(4)]

    def work() -> None:  # 3 points every 50 ms and an event every 10 steps, while the streams follow
        for _ in range(40):
            job.report(3, events=1 if job.step % 10 == 0 else 0)
            time.sleep(0.05)

    writer = threading.Thread(target=work)
    writer.start()
    readers[0].wait_for_step(60)
    readers.append(start(Reader(deployment, keys[0], job.id)))  # mid-run: it still gets the whole history first
    writer.join()
    job.report(1, events=2)
    job.finish()
    finish_all(readers)
    with deployment.client(keys[1]) as client:
        for reader in readers:
            assert_saw_the_whole_job(reader, client, job)


def test_a_stream_joining_behind_the_feeds_buffer_reads_the_history_itself(deployment, job):
    key = deployment.team_key(TEAM)
    first = start(Reader(deployment, key, job.id))
    # More rows than the feed keeps: the feed reads them in batches, and its buffer moves past the start.
    history = FEED_BUFFER_ROWS + 3 * STREAM_BATCH
    for _ in range(history // STREAM_BATCH):
        job.report(STREAM_BATCH, events=3)
    first.wait_for_step(job.step)

    late = start(Reader(deployment, key, job.id))
    late.wait_for_step(job.step)
    for _ in range(5):
        job.report(4, events=1)
    job.finish()
    finish_all([first, late])
    with deployment.client(key) as client:
        for reader in (first, late):
            assert_saw_the_whole_job(reader, client, job)


def test_revoking_a_key_ends_only_its_streams(deployment, job):
    revoked_key, kept_key = deployment.team_key(TEAM), deployment.team_key(TEAM)
    revoked = [start(Reader(deployment, revoked_key, job.id)) for _ in range(2)]
    kept = start(Reader(deployment, kept_key, job.id))
    job.report(5, events=1)
    kept.wait_for_step(5)

    with session_scope(deployment.settings.database_url) as session:
        teams_service.revoke_key(session, revoked_key[:12])
    for reader in revoked:
        reader.join(30)
        assert not reader.is_alive(), "a stream went on after its key was revoked"
        name, data = reader.messages[-1]
        assert name == "error" and "revoked" in data["error"]["message"], reader.messages[-1]

    job.report(5, events=1)  # the other key's stream goes on, and sees all of it
    job.finish()
    finish_all([kept])
    with deployment.client(kept_key) as client:
        assert_saw_the_whole_job(kept, client, job)


def test_disabling_a_team_ends_its_streams_saying_why(deployment, demo_data):
    team = f"leaving-{uuid.uuid4().hex[:6]}"
    job = hand_trained_job(deployment, demo_data, team)
    reader = start(Reader(deployment, deployment.team_key(team), job.id))
    job.report(3)
    reader.wait_for_step(3)

    with session_scope(deployment.settings.database_url) as session:
        assert admin.disable_team(session, team).pausing == [job.id]  # `qlora admin disable-team`
    reader.join(30)
    assert not reader.is_alive(), "a stream went on after its team was disabled"
    name, data = reader.messages[-1]
    assert name == "error" and data["error"]["code"] == "team_disabled", reader.messages[-1]  # as any route answers
    assert f"qlora admin enable-team {team}" in data["error"]["message"]
    with session_scope(deployment.settings.database_url) as session:  # what its worker would record
        assert runs.finish(session, job.id, job.attempt, states.PAUSED)


def test_a_slow_or_closed_client_does_not_hold_up_the_others(deployment, job):
    key = deployment.team_key(TEAM)
    fell_behind_before = api_log(deployment).count(FELL_BEHIND)
    # A client that stops reading, with a receive window of its own size (else Linux lets it grow to
    # tens of megabytes), so the server's writes to it back up once the server's socket is full too.
    small_window = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)])
    hold = threading.Event()
    slow = start(Reader(deployment, key, job.id, transport=small_window, hold=hold))
    normal = start(Reader(deployment, key, job.id))
    with deployment.client(key) as client, client.stream("GET", f"/jobs/{job.id}/stream") as leaving:
        assert leaving.status_code == 200
        next(leaving.iter_lines())
    # The client above closed its connection mid-stream. Now about 8 MB of news: more than the sockets
    # between the server and the slow client take (a few MB on loopback), and more rows than the feed keeps.
    for _ in range(12):
        job.report(STREAM_BATCH, events=100, padding=5000)
    normal.wait_for_step(job.step)  # the others did not wait for the slow client
    assert slow.steps() == [] and slow.is_alive()

    hold.set()  # the slow client reads again: it fell behind the feed, and still gets every point once
    slow.wait_for_step(job.step)
    job.report(2)
    job.finish()
    finish_all([normal, slow])
    with deployment.client(key) as client:
        for reader in (normal, slow):
            assert_saw_the_whole_job(reader, client, job)
    # The slow client really took the way back (the log line of exactly that branch).
    assert api_log(deployment).count(FELL_BEHIND) > fell_behind_before


# ------------------------------------------------------------------ in this process: the feed itself


class Statements:
    """What this process sends the deployment's database, in order, as it is sent (from any thread)."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []  # (time.monotonic(), statement)

    def __call__(self, _conn, _cursor, statement: str, *_args) -> None:
        self.sent.append((time.monotonic(), statement))

    def polls(self) -> list[tuple[float, int]]:
        """(when it began, statements) of each poll begun. A poll starts by asking which of its watchers'
        keys still authenticate: the only statement on api_keys that streams waiting on a feed cause."""
        polls: list[tuple[float, int]] = []
        for at, statement in self.sent:
            if "api_keys" in statement:
                polls.append((at, 0))
            if polls:
                polls[-1] = (polls[-1][0], polls[-1][1] + 1)
        return polls


POLLS_AWAITED = 3  # whole polls per phase
POLL_WAIT_S = 60  # a feed that polls at all gets there within this on any machine


def test_streams_of_a_job_share_one_poll_that_stops_with_the_last(deployment, job):
    """job_stream driven in this process against the deployment's database: what the database is asked
    while 1, then 20, streams of the job wait for news, and the feed once every stream has left.

    Counted per poll, not per second: a loaded machine may poll late, never early, so the test awaits
    a number of polls and asserts what holds however slowly they came."""
    database_url = deployment.settings.database_url
    key = deployment.team_key(TEAM)
    with session_scope(database_url) as session:
        api_key = teams_repository.key_by_id_or_prefix(session, key[:12])[0]
        key_id, team_id = api_key.id, api_key.team_id
    statements = Statements()

    async def scenario() -> tuple[list[tuple[float, int]], list[tuple[float, int]], list[tuple[float, str]]]:
        state, slots = SimpleNamespace(job_feeds=JobFeeds()), StreamSlots(per_key=100)

        async def next_message(stream) -> str:
            """The stream's next news: a keepalive is none (nor a read of the database), and on a machine
            slow enough to take STREAM_KEEPALIVE_S over the polls awaited, one comes."""
            while (message := await anext(stream)) == ": keepalive\n\n":
                pass
            return message

        def open_stream():
            return job_stream(state, database_url, team_id, key_id, job.id, slots.take(key_id))

        async def while_waiting(streams: int) -> list[tuple[float, int]]:
            """The whole polls (when, statements) while `streams` streams of the job wait for news."""
            opened = [open_stream() for _ in range(streams)]
            # Each stream's first message is the history and the job; after that they wait on the feed.
            await asyncio.gather(*(anext(s) for s in opened))
            statements.sent.clear()
            waiting = [asyncio.create_task(next_message(s)) for s in opened]  # nothing comes: no news
            deadline = time.monotonic() + POLL_WAIT_S
            # One poll more than awaited has begun: the ones before it are whole.
            while len(statements.polls()) <= POLLS_AWAITED and time.monotonic() < deadline \
                    and not any(w.done() for w in waiting):
                await asyncio.sleep(0.02)
            polls = statements.polls()[:-1]
            for w in waiting:
                w.cancel()
            outcomes = await asyncio.gather(*waiting, return_exceptions=True)
            for s in opened:
                await s.aclose()
            # No stream ended or failed while it waited (a failed feed ends them all, with its cause).
            assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
            assert len(polls) >= POLLS_AWAITED, f"{streams} stream(s): {len(polls)} whole polls in {POLL_WAIT_S} s"
            return polls

        one = await while_waiting(1)
        twenty = await while_waiting(20)
        assert len(state.job_feeds) == 0  # the last stream out stopped the feed
        await asyncio.sleep(1.5)  # past a poll interval: a poll under way when it stopped has ended
        statements.sent.clear()
        await asyncio.sleep(2.5)
        return one, twenty, list(statements.sent)

    engine = engine_for(database_url)
    event.listen(engine, "before_cursor_execute", statements)
    try:
        one, twenty, after_the_last = in_a_thread_of_its_own(lambda: asyncio.run(scenario()))
    finally:
        event.remove(engine, "before_cursor_execute", statements)
    # Twenty waiting streams cost the database what one does: one poll of the same statements at a time,
    # STREAM_POLL_S apart at the least (a stream polling on its own would begin polls in between).
    for polls in (one, twenty):
        assert {n for _, n in polls} == {one[0][1]}, (one, twenty)
        gaps = [b - a for (a, _), (b, _) in zip(polls, polls[1:], strict=False)]
        assert min(gaps) >= STREAM_POLL_S * 0.95, gaps
    assert after_the_last == []


def test_a_streams_points_are_made_from_plain_rows_as_the_schema_shows_them(deployment, demo_data):
    """A job page opened on a job nobody watches streams its whole history; each point's `metric` message is made
    from the row as read (no ORM object per point: they and a model per point were most of what that cost, see
    docs/performance.md) and holds what GET /jobs/{id}/metrics shows of the point: train and eval points, dpo
    rewards and empty fields alike. job_stream is driven in this process, so its ORM loads are seen."""
    job = hand_trained_job(deployment, demo_data, TEAM)
    records: list = []
    for step in range(1, 41):
        records.append(TrainPoint(step=step, epoch=step / 40, train_loss=2.0 / step, learning_rate=2e-4, grad_norm=0.5,
                                  tokens_seen=step * 64, tokens_per_second=1000.0, peak_memory_bytes=2**30,
                                  **({"reward_accuracy": 0.75, "reward_margin": 0.125} if step > 20 else {})))
        if step % 10 == 0:
            records.append(EvalPoint(step=step, epoch=step / 40, eval_loss=1.0 / step,
                                     **({"reward_accuracy": 0.5, "reward_chosen": -0.25} if step > 20 else {})))
    with session_scope(deployment.settings.database_url) as session:
        runs.report(session, job.id, job.attempt, records, Progress(40, 40, 40 * 64))
    job.step = 40
    job.finish()
    key = deployment.team_key(TEAM)
    with session_scope(deployment.settings.database_url) as session:
        api_key = teams_repository.key_by_id_or_prefix(session, key[:12])[0]
        key_id, team_id = api_key.id, api_key.team_id

    async def whole_stream() -> list[dict]:
        state, slots = SimpleNamespace(job_feeds=JobFeeds()), StreamSlots(per_key=10)
        text = "".join([message async for message in job_stream(state, deployment.settings.database_url, team_id,
                                                                  key_id, job.id, slots.take(key_id))])
        return [json.loads(data) for name, data in sse_events(SimpleNamespace(iter_lines=lambda: iter(text.splitlines())))
                if name == "metric"]

    loaded: list[JobMetric] = []

    def on_load(point: JobMetric, _context) -> None:
        loaded.append(point)

    event.listen(JobMetric, "load", on_load)
    try:
        streamed = in_a_thread_of_its_own(lambda: asyncio.run(whole_stream()))
    finally:
        event.remove(JobMetric, "load", on_load)
    assert loaded == []
    with deployment.client(key) as client:
        curve = client.get(f"/jobs/{job.id}/metrics").json()
    shown = sorted([{"kind": "train", **point} for point in curve["train"]] + [{"kind": "eval", **point} for point in curve["eval"]],
                   key=lambda point: (point["step"], point["kind"] == "eval"))  # as written: a step's eval after its train point
    assert streamed == shown
    assert len(streamed) == 44 and any(point["reward_chosen"] == -0.25 for point in streamed)
