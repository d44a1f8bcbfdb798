"""What a job's live feed (app/jobs/stream.py) holds while its job runs: its recent rows, and the job once."""

from __future__ import annotations

import tracemalloc

from app.jobs.stream import FEED_BUFFER_TICKS, JobFeed, JobFeeds, _Poll


def test_a_watched_running_jobs_feed_holds_the_job_once_not_once_per_step():
    """A running job changes at every step, and its state is the whole job, spec and all: 30 MB as JSON with 256
    long eval prompts. Kept in each of the feed's ticks, one watched job grew the API by more than a GB a minute."""
    feed = JobFeed(JobFeeds(), "sqlite://", "team", "job")
    job_bytes = 200_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for step in range(FEED_BUFFER_TICKS):
            state = f'{{"step": {step}, "spec": "{"x" * job_bytes}"}}'  # a new job each step, as a poll reads it
            feed._append(_Poll(f"event: job\ndata: {state}\n\n", state, 1, False, [], []), caught_up=True)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * job_bytes  # the newest job's message and state, and the ticks themselves
    assert feed.job_state.startswith(f'{{"step": {FEED_BUFFER_TICKS - 1},')  # what a stream sends next
