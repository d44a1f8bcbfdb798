"""The polled reads' lean answers: a job and a page of jobs as the routes send them equal what JobOut
makes of the same rows; ETags; the key cache."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest

from app.conditional import etag_of, matches
from app.db import utcnow
from app.jobs import repository, service, states
from app.jobs.schemas import JobListItem, JobOut, JobPage, job_json, job_page_json
from app.jobs.tables import Job
from app.recent import Recent
from app.teams.service import Caller, CallerCache
from tests.services import in_a_thread_of_its_own
from worker.training.spec import JobSpec


def as_jobout(session, job_id: str) -> dict:
    return json.loads(JobOut.of(session.get(Job, job_id)).model_dump_json())


@pytest.mark.parametrize("values", [
    {},  # queued: no summary, no metadata, no times
    {"status": states.SUCCEEDED, "user_metadata": {"ticket": "ML-1 ✓", "quote": 'a "b" \\ c'}, "step": 10,
     "total_steps": 10, "summary": {"train_loss_final": 0.1 + 0.2, "tokens": 2**53 + 1, "nested": [None, {"x": []}]},
     "error": "line one\nline two ✗"},
    {"status": states.RUNNING, "step": 3, "total_steps": 7, "summary": None},
])
def test_a_job_read_lean_is_the_job_jobout_makes(session, settings, make_job, caller, values):
    now = utcnow()
    job_id = make_job(**{"started_at": now - timedelta(seconds=5), "heartbeat_at": now, **values}
                      if values.get("status") == states.RUNNING else values)
    row = service.view(session, caller, job_id)
    standing = in_a_thread_of_its_own(lambda: asyncio.run(service.standing(settings, Recent(0), row)))
    lean = json.loads(job_json(row, standing))
    if values.get("status", states.QUEUED) == states.QUEUED:  # only GET /jobs/{id} says where a queued job stands
        # No worker of its class is up here: it waits for one, saying since when (waiting_detail).
        assert (lean.pop("queue_position"), lean.pop("waiting_for")) == (1, "no_worker")
        assert lean.pop("waiting_detail").startswith(f"no worker of GPU class {row.queue.removeprefix('gpu-')} is up")
        lean.update(queue_position=None, waiting_for=None, waiting_detail=None)
    assert lean == as_jobout(session, job_id)


def test_a_page_read_lean_is_the_page_jobout_makes(session, make_job, caller):
    ids = [make_job(states.SUCCEEDED, summary={"i": i}) for i in range(5)]
    first = service.view_page(session, caller, None, None, 3)
    page = json.loads(job_page_json(first.data, first.next_cursor))
    assert page == json.loads(JobPage(data=[JobListItem.of(session.get(Job, row.id)) for row in first.data],
                                      next_cursor=first.next_cursor).model_dump_json())
    # A listed job is the job GET /jobs/{id} shows but for its heartbeat (JobListItem says why).
    assert all("heartbeat_at" not in listed for listed in page["data"])
    assert [{**listed, "heartbeat_at": None} for listed in page["data"]] == [
        as_jobout(session, row.id) for row in first.data]
    rest = service.view_page(session, caller, None, first.next_cursor, 3)
    assert [j["id"] for j in page["data"]] + [row.id for row in rest.data] == ids[::-1] and rest.next_cursor is None
    empty = json.loads(job_page_json([], None))
    assert empty == {"data": [], "next_cursor": None}


def test_pages_of_jobs_created_at_the_same_moment_hold_each_job_once(session, make_job, caller):
    """The cursor is the last job's (created_at, id), compared as a row (app/pagination.py): jobs created in
    the same microsecond, a page boundary among them, come each once, in (created_at, id) order newest first."""
    moment, later = utcnow() - timedelta(minutes=1), utcnow()
    ids = [make_job(states.SUCCEEDED, created_at=moment) for _ in range(5)] + [make_job(created_at=later)]
    seen, cursor = [], None
    while True:
        found = service.view_page(session, caller, None, cursor, 2)
        seen += [row.id for row in found.data]
        if (cursor := found.next_cursor) is None:
            break
    assert seen == [ids[-1], *sorted(ids[:5], reverse=True)]
    succeeded = service.view_page(session, caller, states.SUCCEEDED, service.view_page(session, caller, None, None, 3)
                                  .next_cursor, 50)
    assert [row.id for row in succeeded.data] == sorted(ids[:5], reverse=True)[2:]


def test_the_lean_reads_keep_to_the_callers_team(session, settings, make_job, caller):
    from app.errors import NotFound
    from app.teams.service import create_key, create_team

    job_id = make_job()
    other = Caller.of(create_team(session, "team-b"), create_key(session, "team-b")[0])
    with pytest.raises(NotFound):
        service.view(session, other, job_id)
    assert service.view_page(session, other, None, None, 50).data == []
    assert repository.view(session, caller.team_id, job_id) is not None


def test_if_none_match_compares_weakly_and_takes_lists_and_star():
    tag = etag_of(b'{"a":1}')
    assert tag.startswith('"') and tag != etag_of(b'{"a":2}')
    assert matches(tag, tag) and matches(f"W/{tag}", tag) and matches(f'"x", {tag}', tag) and matches("*", tag)
    assert not matches(None, tag) and not matches("", tag) and not matches('"x"', tag)


def test_the_key_cache_forgets_after_its_ttl_and_holds_a_bounded_number():
    caller = Caller(team_id="t", team_name="team", key_id="k", is_admin=False)
    # What is kept is kept within its TTL, however long this thread waits for a core: a TTL far from any delay.
    kept = CallerCache(ttl_s=600, max_entries=3)
    kept.put("h", caller)
    assert kept.get("h") == caller
    for i in range(5):
        kept.put(f"h{i}", caller)
    assert [kept.get(f"h{i}") for i in range(5)] == [None, None, caller, caller, caller]
    # ...and forgotten once its TTL has passed: a wait that is at least the TTL, whatever the load.
    short = CallerCache(ttl_s=0.2)
    short.put("h", caller)
    time.sleep(0.25)  # the TTL itself is what is under test
    assert short.get("h") is None
    off = CallerCache(ttl_s=0)
    off.put("h", caller)
    assert off.get("h") is None


def test_the_key_cache_reads_a_key_once_for_all_who_ask_at_the_same_time():
    from app.errors import Unauthorized

    caller = Caller(team_id="t", team_name="team", key_id="k", is_admin=False)
    reads = []

    async def read(answer):
        reads.append(1)
        await asyncio.sleep(0.05)  # a read in flight while the others ask
        if answer is None:
            raise Unauthorized("invalid or revoked API key")
        return answer

    async def main():
        cache = CallerCache(ttl_s=60)
        got = await asyncio.gather(*(cache.get_or_read("h", lambda: read(caller)) for _ in range(20)))
        assert got == [caller] * 20 and len(reads) == 1
        failed = await asyncio.gather(*(cache.get_or_read("bad", lambda: read(None)) for _ in range(5)),
                                      return_exceptions=True)
        assert all(isinstance(f, Unauthorized) for f in failed) and len(reads) == 2
        assert cache.get("bad") is None  # a refused key is not kept: the next request asks again

    in_a_thread_of_its_own(lambda: asyncio.run(main()))  # whatever loop this thread may hold


def test_a_queued_jobs_place_is_read_once_per_class_while_kept_and_a_job_queued_since_is_placed(
        settings, make_job, session, caller, monkeypatch):
    from app.scheduling import service as scheduling

    reads = []
    standings = scheduling.standings
    monkeypatch.setattr(scheduling, "standings", lambda *a, **k: reads.append(1) or standings(*a, **k))
    first, second = make_job(), make_job()
    kept = Recent(ttl_s=60)

    async def places(*job_ids):
        rows = [service.view(session, caller, job_id) for job_id in job_ids]
        return [(found.position, found.waiting_for) if (found := await service.standing(settings, kept, row)) else None
                for row in rows]

    waiting = "no_worker"  # no worker of the class is up here
    assert in_a_thread_of_its_own(lambda: asyncio.run(places(first, second, first))) == [(1, waiting), (2, waiting), (1, waiting)]
    assert len(reads) == 1  # one read of the class's order served the three polls
    third = make_job()  # queued after that read: its poll reads the order again rather than show no place
    assert in_a_thread_of_its_own(lambda: asyncio.run(places(third, second))) == [(3, waiting), (2, waiting)]
    assert len(reads) == 2
    assert in_a_thread_of_its_own(lambda: asyncio.run(places(make_job(states.RUNNING)))) == [None]
    assert len(reads) == 2  # a job that is not queued has no place to read


def test_a_page_of_jobs_with_long_specs_stops_short_and_the_next_page_goes_on(session, caller):
    """A spec could hold 256 eval prompts of 20,000 characters: GET /jobs?limit=200 of such jobs read, built and
    sent gigabytes in one answer (a page of 3 grew the API by 480 MB). A page stops at about
    PAGE_SPEC_CHARS of specs, and its next_cursor goes on to the rest; each list (GET /jobs, an admin's, /v1's)."""
    prompts = ["x" * 20_000] * (service.PAGE_SPEC_CHARS // 3 // 20_000 + 2)  # two such specs fit, three do not
    spec = JobSpec.parse({"base_model": "llama-3-8b", "training": {"max_steps": 10}}).model_dump(mode="json")
    spec["eval"]["prompts"] = prompts  # as a job accepted before eval.prompts had a total (MAX_EVAL_PROMPT_CHARS)
    ids = []
    for _ in range(5):
        job = Job(team_id=caller.team_id, status=states.QUEUED, base_model="llama-3-8b", spec=spec, queue="gpu-default")
        session.add(job)
        session.commit()
        ids.append(job.id)
    for pages in (lambda cursor: service.view_page(session, caller, None, cursor, 200),
                  lambda cursor: service.list_page(session, caller, None, cursor, 200)):
        seen, cursor, sizes = [], None, []
        while True:
            found = pages(cursor)
            sizes.append(len(found.data))
            seen += [row.id for row in found.data]
            if found.next_cursor is None:
                break
            cursor = found.next_cursor
        assert sizes == [2, 2, 1] and seen == ids[::-1]
    first = service.view_page(session, caller, None, None, 200)
    assert len(job_page_json(first.data, first.next_cursor)) < 2 * service.PAGE_SPEC_CHARS


def test_a_page_of_ordinary_specs_is_as_long_as_asked(session, make_job, caller):
    ids = [make_job() for _ in range(30)]
    found = service.view_page(session, caller, None, None, 200)
    assert [row.id for row in found.data] == ids[::-1] and found.next_cursor is None
