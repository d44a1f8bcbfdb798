"""A job's live view as Server-Sent Events: what GET /jobs/{id}/stream sends.

The database pays for a job's news once per process, however many streams watch the job: a job with
at least one open stream has one `JobFeed`, a task that polls it every STREAM_POLL_S (the job, the
metric points and events past the feed's cursors, and whether each watching key still authenticates,
in one short session) and keeps its recent news in a bounded buffer of `Tick`s. Each stream keeps
its own cursors (what it has sent) and takes from that buffer what lies past them.

Joining and falling behind are the same case: a stream whose cursors lie before what the buffer
holds (one that just opened on a job with a long history, or one whose client read so slowly that
the buffer moved past it) reads the missing points and events itself, in batches, as every stream
did before the feed, until the buffer covers its cursors; then it follows the feed again. So memory
stays bounded (one buffer per job, nothing queued per stream), a slow client never holds up the feed
or the other streams, and a stream never skips a point: the price of being behind is the reads that
every stream used to make. Points deleted since the feed read them (those a lost attempt logged past the
checkpoint its successor resumes from) are not sent: the feed empties its buffer when it sees a new
attempt, and a stream whose read found the job's newest rows goes on from what the feed has read, since
anything up to there that it did not find is gone.

A stream may start past a position instead of at the job's beginning (`StreamStart`: `?after_step=`, or a
reconnecting client's `Last-Event-ID`): every metric and event message carries an `id:` holding both of
the stream's cursors as they stand after it, so a client that reconnects with the last one it got goes
on with the next point and the next event, none twice and none missed.

A key may hold only so many streams at once, and a stream lasts only as long as its key: the feed
checks every watching key at each poll, and a revoked key's streams end there with an `error` event.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import operator
import re
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import session_scope
from app.errors import TooManyStreams, Unauthorized
from app.jobs import repository, states
from app.jobs.schemas import BEAT_FIELDS, EVAL_FIELDS, FIELDS_OF, TRAIN_FIELDS, EventOut, JobOut, points_json
from app.slots import KeySlot, KeySlots
from app.teams import repository as teams_repository
from app.teams.service import team_disabled

log = logging.getLogger(__name__)

STREAM_POLL_S = 1.0  # how often a job's feed looks for news: the worker relays progress about this often
STREAM_KEEPALIVE_S = 15.0  # a comment after this long without news, so proxies keep an idle stream open
STREAM_BATCH = 500  # rows per read; a feed or a stream that is behind catches up over the next reads
# What a job's feed keeps of its news, for streams that join late or fall behind: at least two full
# polls' worth of rows (points and events), and about two minutes of polls that changed something.
# A stream whose cursors lie before this reads the difference itself; a larger buffer spares those
# reads at the cost of memory per watched job (a row is a few hundred bytes of SSE text).
FEED_BUFFER_ROWS = 4 * STREAM_BATCH
FEED_BUFFER_TICKS = 120


StreamSlot = KeySlot  # one open stream's place in its key's count; the stream gives it back when it ends


class StreamSlots(KeySlots):
    """The live streams each API key holds open in this process, up to a cap (QLORA_MAX_STREAMS_PER_KEY).

    The cap is per process because what a stream holds (a socket, its place in its job's feed, and its
    own reads of the database whenever it is behind the feed) is the process's to give.
    """

    def __init__(self, per_key: int):
        super().__init__(per_key, lambda held: TooManyStreams(
            f"this API key already has {held} live streams open, the limit per key "
            f"(QLORA_MAX_STREAMS_PER_KEY={per_key}); close one, or poll GET /jobs/{{id}} instead"))


# ---------------------------------------------------------------- reads (in the threadpool)

# A metric point or an event as the streams take it: its id (what their cursors compare), its step (a
# point's, for streams that start past a step; None for an event) and its SSE message without the `id:`
# line (each stream adds its own cursors), made once in the feed's thread for every stream of the job.
Row = tuple[int, int | None, str]

# Last-Event-ID as the stream writes it: "<metric id>.<event id>", the ids of the last point and the last
# event the stream had sent (0: none yet).
_EVENT_ID = re.compile(r"([0-9]{1,10})\.([0-9]{1,10})")  # [0-9]: \d would take any script's digits


@dataclass(frozen=True)
class StreamStart:
    """Where a stream starts: past these point and event ids, and only with points past `after_step`
    (None: every step). The job's beginning is StreamStart()."""

    metric_after: int = 0
    event_after: int = 0
    after_step: int | None = None


def event_id(metric_after: int, event_after: int) -> str:
    return f"{metric_after}.{event_after}"


def parse_event_id(value: str, max_id: int) -> tuple[int, int] | None:
    """Both cursors from a Last-Event-ID this stream wrote; None if it is not one."""
    match = _EVENT_ID.fullmatch(value.strip())
    if match is None:
        return None
    cursors = int(match[1]), int(match[2])
    return cursors if max(cursors) <= max_id else None


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


# What a stream reads of each point past its cursor: every column a train or an eval point shows (step first), read
# after the point's id and kind; _SHOWN picks each series' fields (TrainPoint's, EvalPoint's) out of them, in order.
_POINT_COLUMNS = tuple(dict.fromkeys(TRAIN_FIELDS + EVAL_FIELDS))
_SHOWN = {kind: operator.itemgetter(*(_POINT_COLUMNS.index(field) for field in fields)) for kind, fields in FIELDS_OF.items()}


def _metric_message(kind: str, values: Sequence) -> str:
    """A point's `metric` message from its row's values (_POINT_COLUMNS): its kind, then its series' fields in the
    schema's order, the JSON value a TrainPoint or EvalPoint dumps (tests/service/test_stream_fanout.py compares
    them), encoded as a model would (schemas.points_json, as the curve pages are). An ORM object and a model per
    point, then json.dumps, were ~27 µs a point: most of what a stream's history cost, paid by every job page
    opened on a job nobody in the process watches."""
    point = {"kind": kind, **dict(zip(FIELDS_OF[kind], _SHOWN[kind](values), strict=True))}
    return _sse("metric", points_json(point).decode())


def _rows_after(session: Session, team_id: str, job_id: str, metric_after: int, event_after: int) -> tuple[list[Row], list[Row]]:
    """Up to STREAM_BATCH points and STREAM_BATCH events past the cursors, oldest first, as SSE messages."""
    points = repository.metrics_after(session, team_id, job_id, metric_after, STREAM_BATCH, _POINT_COLUMNS)
    events = repository.events(session, team_id, job_id, event_after, STREAM_BATCH)
    # A point's row: (id, kind, *_POINT_COLUMNS), its step first of those.
    return ([(point[0], point[2], _metric_message(point[1], point[2:])) for point in points],
            [(e.id, None, _sse("event", EventOut.model_validate(e).model_dump_json())) for e in events])


@dataclass(frozen=True)
class _Poll:
    """What one poll of a feed read: the job, then the rows past the feed's cursors."""

    job_message: str  # the `job` SSE message
    job_state: str  # the job without its heartbeat, which moves every second while a job runs and is no news
    attempt: int
    finished: bool
    points: list[Row]
    events: list[Row]


def _poll_feed(database_url: str, team_id: str, job_id: str, key_ids: Collection[str], metric_after: int,
               event_after: int) -> tuple[set[str], _Poll | None]:
    """One short read in a session of its own: which watching keys are live, the job, then the points
    and events past the cursors. The job is read first, so once it shows a final state every point and
    event before it is visible too. None for the poll: the job is gone."""
    with session_scope(database_url) as session:
        live = teams_repository.live_keys(session, key_ids)
        job = repository.get(session, team_id, job_id)
        if job is None:
            return live, None
        out = JobOut.of(job)
        points, events = _rows_after(session, team_id, job.id, metric_after, event_after)
        return live, _Poll(_sse("job", out.model_dump_json()), out.model_dump_json(exclude=set(BEAT_FIELDS)),
                           job.attempt, job.status in states.FINISHED, points, events)


def _read_history(database_url: str, team_id: str, key_id: str, job_id: str, metric_after: int,
                  event_after: int) -> tuple[list[Row], list[Row]] | None:
    """A stream's own read of rows its feed no longer holds (or never read). The key is checked first,
    as at every read a stream makes: None, it no longer authenticates."""
    with session_scope(database_url) as session:
        if not teams_repository.key_is_live(session, key_id):
            return None
        return _rows_after(session, team_id, job_id, metric_after, event_after)


def _refusal(database_url: str, team_id: str) -> dict:
    """The error a stream ends with once its key no longer authenticates: the one any route now answers,
    `team_disabled` (saying who can undo it) where an admin disabled the team, else the revoked key's."""
    with session_scope(database_url) as session:
        team = teams_repository.team_by_id(session, team_id)
        if team is not None and team.disabled_at is not None:
            return team_disabled(team).body()
    return Unauthorized("the API key was revoked; this stream ends here").body()


# ---------------------------------------------------------------- one feed per watched job


@dataclass(frozen=True)
class Tick:
    """A poll of the feed that brought news: new rows, a changed job, or the feed catching up."""

    seq: int
    metric_after: int  # the feed's cursors before this poll: with the ticks after, the buffer holds every row past them
    event_after: int
    points: list[Row]
    events: list[Row]
    attempt: int
    finished: bool
    caught_up: bool  # the poll found fewer than a batch of each: nothing more to read right now


class Subscriber:
    """One stream's membership in its job's feed: what the feed needs to know of it (its key), and
    what the feed tells it apart from the news (its key was revoked)."""

    def __init__(self, key_id: str):
        self.key_id = key_id
        self.revoked = False


class JobFeed:
    """One job's poll, shared by every stream of the job in this process; see the module's docstring.

    Only the event loop touches it (streams are async generators, the poll a task): no lock."""

    def __init__(self, feeds: JobFeeds, database_url: str, team_id: str, job_id: str):
        self._feeds = feeds
        self.database_url, self.team_id, self.job_id = database_url, team_id, job_id
        # Weak, like StreamSlots: a stream collected without running its `finally` leaves on its own.
        self._subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()
        self._ticks: deque[Tick] = deque()
        self._rows = 0  # points and events in _ticks
        self._seq = 0  # the last tick's number
        self.metric_after = self.event_after = 0  # what the feed has read: it starts from the job's beginning
        # The job as the newest tick found it: a stream sends only the newest state, however many ticks it takes at
        # once, so the feed keeps that one alone. Kept in each tick, a running job's state (it changes at every
        # step) was up to FEED_BUFFER_TICKS copies of the job, spec and all: with 256 long eval prompts in its
        # spec (30 MB as JSON), one watched job grew the API by more than a GB a minute.
        self.job_message = self.job_state = ""
        self.gone = False  # the job was deleted: every stream ends
        self.failure: BaseException | None = None  # a poll failed: every stream ends with it, as it did alone
        self._news = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- streams

    def subscribe(self, key_id: str, start: StreamStart = StreamStart()) -> Subscriber:
        subscriber = Subscriber(key_id)
        self._subscribers.add(subscriber)
        if self._task is None:
            # A new feed reads from where its first stream starts, not from the job's beginning: a page that
            # asked for the news past a long job's history does not make the process read that history.
            # A stream that joins later from further back reads the difference itself (see covers()).
            self.metric_after, self.event_after = start.metric_after, start.event_after
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"job feed {self.job_id}")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """The last stream to leave stops the poll at once; the next one to open starts a new feed."""
        self._subscribers.discard(subscriber)
        if not self._subscribers:
            self._close()

    def covers(self, metric_after: int, event_after: int) -> bool:
        """Whether the buffer holds every row past these cursors, so a stream there may follow the feed."""
        base = (self._ticks[0].metric_after, self._ticks[0].event_after) if self._ticks \
            else (self.metric_after, self.event_after)
        return metric_after >= base[0] and event_after >= base[1]

    def oldest_position(self) -> int:
        """Where a stream that the buffer covers starts: before the oldest tick, whose rows it filters by its cursors."""
        return self._ticks[0].seq - 1 if self._ticks else self._seq

    def ticks_after(self, position: int) -> list[Tick] | None:
        """The ticks after `position`, oldest first; None when the oldest of them has left the buffer."""
        if not self._ticks or position >= self._ticks[-1].seq:
            return []
        first = self._ticks[0].seq
        if position + 1 < first:
            return None
        return list(itertools.islice(self._ticks, position + 1 - first, None))

    async def wait(self, timeout: float) -> None:
        """Until the next tick, a revoked key, or the end of the feed; at most `timeout` seconds.
        Called right after a look at the buffer found nothing new: no await lies between, so no news is missed."""
        news = self._news
        try:
            async with asyncio.timeout(timeout):
                await news.wait()
        except TimeoutError:
            pass

    # --- the poll

    def _publish(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    async def _run(self) -> None:
        try:
            while subscribers := list(self._subscribers):
                keys = {s.key_id for s in subscribers}
                live, poll = await run_in_threadpool(_poll_feed, self.database_url, self.team_id, self.job_id, keys,
                                                     self.metric_after, self.event_after)
                revoked = False
                for subscriber in self._subscribers:  # streams that joined during the poll are checked at the next one
                    if subscriber.key_id in keys and subscriber.key_id not in live:
                        subscriber.revoked = revoked = True
                if poll is None:  # deleted under the streams
                    self.gone = True
                    self._publish()
                    return
                caught_up = len(poll.points) < STREAM_BATCH and len(poll.events) < STREAM_BATCH
                if self._append(poll, caught_up) or revoked:
                    self._publish()
                if caught_up:
                    await asyncio.sleep(STREAM_POLL_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is unreachable, say: the streams end, the next one to open tries again
            log.exception("the feed of job %s failed; its streams end", self.job_id)
            self.failure = exc
            self._publish()
        finally:
            self._feeds.forget(self)

    def _append(self, poll: _Poll, caught_up: bool) -> bool:
        """Keep the poll as a tick if it brought news; False if it did not (no stream need wake)."""
        last = self._ticks[-1] if self._ticks else None
        if last and not poll.points and not poll.events and poll.job_state == self.job_state \
                and caught_up == last.caught_up:
            return False
        if last and poll.attempt != last.attempt:
            # A new attempt: one that resumes deleted the points its lost predecessor logged past the checkpoint
            # (app/jobs/runs.py, _plan_resume), which the buffer may hold. None of it is kept, or a stream that
            # joins or lags would take them from here: such a stream reads from the database, where they are gone.
            self._ticks.clear()
            self._rows = 0
        self._seq += 1
        self._ticks.append(Tick(self._seq, self.metric_after, self.event_after, poll.points, poll.events,
                                poll.attempt, poll.finished, caught_up))
        self.job_message, self.job_state = poll.job_message, poll.job_state
        self._rows += len(poll.points) + len(poll.events)
        if poll.points:
            self.metric_after = poll.points[-1][0]
        if poll.events:
            self.event_after = poll.events[-1][0]
        while len(self._ticks) > 1 and (self._rows > FEED_BUFFER_ROWS or len(self._ticks) > FEED_BUFFER_TICKS):
            dropped = self._ticks.popleft()
            self._rows -= len(dropped.points) + len(dropped.events)
        return True

    def _close(self) -> None:
        self._feeds.forget(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()


class JobFeeds:
    """This process's feeds, one per (team, job) with at least one open stream. Like the feeds, only
    the event loop touches it."""

    def __init__(self) -> None:
        self._feeds: dict[tuple[str, str], JobFeed] = {}

    def feed(self, database_url: str, team_id: str, job_id: str) -> JobFeed:
        """The job's feed, started if it has none (from the event loop only)."""
        feed = self._feeds.get((team_id, job_id))
        if feed is None:
            feed = self._feeds[(team_id, job_id)] = JobFeed(self, database_url, team_id, job_id)
        return feed

    def forget(self, feed: JobFeed) -> None:
        """A feed that stopped or failed leaves; a new one is made for the next stream."""
        if self._feeds.get((feed.team_id, feed.job_id)) is feed:
            del self._feeds[(feed.team_id, feed.job_id)]

    def __len__(self) -> int:
        return len(self._feeds)


# ---------------------------------------------------------------- one stream


class FeedFailed(RuntimeError):
    """The job's feed could not read the database: the stream ends with an error, as a lone stream's poll would."""


async def job_stream(app_state, database_url: str, team_id: str, key_id: str, job_id: str,
                     slot: StreamSlot, start: StreamStart = StreamStart()) -> AsyncIterator[str]:
    """The stream for one caller: it holds `slot` and a place in its job's feed (from the app's
    JobFeeds) until it ends, and ends when the key is revoked. A client that leaves cancels the
    generator, which runs the `finally`."""
    try:
        feed = app_state.job_feeds.feed(database_url, team_id, job_id)
        subscriber = feed.subscribe(key_id, start)
        try:
            async for chunk in _follow(feed, subscriber, database_url, team_id, key_id, job_id, start):
                yield chunk
        finally:
            feed.unsubscribe(subscriber)
    finally:
        slot.release()


async def _follow(feed: JobFeed, subscriber: Subscriber, database_url: str, team_id: str, key_id: str,
                  job_id: str, start: StreamStart) -> AsyncIterator[str]:
    """Everything so far first (every point and event past `start`, then the job), then the news.

    The stream's own cursors say what it has sent; rows are filtered by them wherever they come from
    (its own reads, the feed's buffer), so none is sent twice. The job comes only from the feed: each
    tick's job was read before the tick's rows, so a final state is sent after every row before it."""
    metric_after, event_after = start.metric_after, start.event_after
    out: list[str] = []

    def take_point(point_id: int, step: int | None, message: str) -> None:
        nonlocal metric_after
        metric_after = point_id
        if start.after_step is None or (step is not None and step > start.after_step):
            out.append(f"id: {event_id(metric_after, event_after)}\n{message}")

    def take_event(row_id: int, message: str) -> None:
        nonlocal event_after
        event_after = row_id
        out.append(f"id: {event_id(metric_after, event_after)}\n{message}")

    position: int | None = None  # the last tick taken; None while the stream reads on its own
    last_job: str | None = None
    quiet_since = time.monotonic()

    while True:
        if subscriber.revoked:  # the answer the key now gets from any route, then the end
            yield _sse("error", json.dumps(await run_in_threadpool(_refusal, database_url, team_id)))
            return
        if feed.gone:  # deleted under the stream
            return
        if feed.failure is not None:
            raise FeedFailed(f"the live view of job {job_id} could not read the database") from feed.failure

        out.clear()
        done = False
        if position is None and feed.covers(metric_after, event_after):
            position = feed.oldest_position()
        if position is None:
            # Behind what the feed holds: read the next batch ourselves, as a lone stream did.
            # What the feed has read, before this read: each of those rows was written before this read began.
            feed_read = feed.metric_after, feed.event_after
            rows = await run_in_threadpool(_read_history, database_url, team_id, key_id, job_id, metric_after, event_after)
            if rows is None:
                subscriber.revoked = True
                continue
            for point_id, step, message in rows[0]:
                take_point(point_id, step, message)
            for row_id, _, message in rows[1]:
                take_event(row_id, message)
            # A read of less than a batch reached the job's newest rows: a row the feed had read that it did not
            # find was deleted since (a resumed attempt deletes the points its lost one logged past the checkpoint),
            # so the stream goes on from where the feed was, and the buffer's copies of those rows are not sent.
            # Else it stayed behind the buffer until the job logged a row past it, which a resumed run may never do:
            # it never got the job's state, nor ended with the job.
            if len(rows[0]) < STREAM_BATCH:
                metric_after = max(metric_after, feed_read[0])
            if len(rows[1]) < STREAM_BATCH:
                event_after = max(event_after, feed_read[1])
            if not rows[0] and not rows[1] and not feed.covers(metric_after, event_after):
                # Caught up with the database, yet behind the buffer: the job's rows were deleted under us
                # (the feed will see it gone), or it moved between our read and the feed's. The next
                # tick settles which, and spares the database a loop of reads.
                await feed.wait(STREAM_POLL_S)
        else:
            ticks = feed.ticks_after(position)
            if ticks is None:  # too slow: the buffer moved past us, read what we missed ourselves
                log.info("a stream of job %s fell behind its job's feed (a slow client); it reads what it missed itself",
                         job_id)
                position = None
                continue
            if not ticks:
                await feed.wait(max(0.0, STREAM_KEEPALIVE_S - (time.monotonic() - quiet_since)))
            for tick in ticks:
                for point_id, step, message in tick.points:
                    if point_id > metric_after:
                        take_point(point_id, step, message)
                for row_id, _, message in tick.events:
                    if row_id > event_after:
                        take_event(row_id, message)
            if ticks:
                newest = ticks[-1]
                position = newest.seq
                if feed.job_state != last_job:  # several ticks at once: only the newest (the feed's) state is news
                    out.append(feed.job_message)
                    last_job = feed.job_state
                done = newest.finished and newest.caught_up

        if out:
            quiet_since = time.monotonic()
            yield "".join(out)
        elif time.monotonic() - quiet_since >= STREAM_KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keepalive\n\n"
        if done:  # the final state, and every row before it, is sent
            return
