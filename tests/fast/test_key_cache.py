"""What an API process keeps of the keys it read (app/teams/service.CallerCache): a key that works nowhere is
refused from memory for QLORA_KEY_CACHE_S, so a script repeating a wrong key costs one read, not one a request;
the refusals kept are bounded, so made-up keys cost no memory; a disabled team's key is not kept refused. The
reads here are the real ones (authenticate on the test's SQLite database), counted. The end-to-end check, with
the keys table locked under a real API: tests/service/test_bounded_resources.py."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from app.db import session_scope
from app.errors import Unauthorized
from app.teams import admin
from app.teams.service import CallerCache, UnknownKey, authenticate, create_key, create_team, hash_key, revoke_key


class CountedReads:
    """authenticate() on the test's database, each call counted by key hash: what get_caller's read does."""

    def __init__(self, database_url: str):
        self.database_url, self.counts = database_url, {}

    def of(self, key_hash: str):
        async def read():
            self.counts[key_hash] = self.counts.get(key_hash, 0) + 1
            with session_scope(self.database_url) as session:
                return authenticate(session, key_hash)
        return read


def ask(cache: CallerCache, reads: CountedReads, key_hash: str, times: int = 1) -> list[str]:
    """What `times` requests with this key hash get, one after another: the team's name or the 401's code."""
    async def each() -> list[str]:
        answers = []
        for _ in range(times):
            try:
                answers.append((await cache.caller(key_hash, reads.of(key_hash))).team_name)
            except Unauthorized as refused:
                answers.append(refused.code)
        return answers
    return asyncio.run(each())


def made_up() -> str:
    return hash_key("qlk_" + secrets.token_urlsafe(32))


@pytest.fixture
def reads(settings) -> CountedReads:
    return CountedReads(settings.database_url)


def test_a_wrong_key_sent_again_is_refused_without_a_read(settings, reads):
    cache = CallerCache(ttl_s=60)
    wrong = made_up()
    assert ask(cache, reads, wrong, times=50) == ["unauthorized"] * 50
    assert reads.counts[wrong] == 1


def test_a_revoked_key_is_refused_without_a_read_once_refused(settings, reads):
    with session_scope(settings.database_url) as session:
        create_team(session, "team-a")
        key, secret = create_key(session, "team-a")
        revoke_key(session, key.id)
    cache = CallerCache(ttl_s=60)
    assert ask(cache, reads, hash_key(secret), times=5) == ["unauthorized"] * 5
    assert reads.counts[hash_key(secret)] == 1


def test_a_key_made_after_a_wrong_one_was_refused_works_at_once(settings, reads):
    """Nothing a refusal keeps is ever true of a key made later: its secret did not exist before."""
    with session_scope(settings.database_url) as session:
        create_team(session, "team-a")
    cache = CallerCache(ttl_s=60)
    assert ask(cache, reads, made_up(), times=3) == ["unauthorized"] * 3
    with session_scope(settings.database_url) as session:
        _, secret = create_key(session, "team-a")
    assert ask(cache, reads, hash_key(secret)) == ["team-a"]


def test_the_refusals_kept_are_bounded_and_the_oldest_goes_first(settings, reads):
    cache = CallerCache(ttl_s=60, max_refused=8)
    first = made_up()
    ask(cache, reads, first)
    for _ in range(8):  # as many other made-up keys as are kept: the first is pushed out
        ask(cache, reads, made_up())
    assert len(cache.refused._entries) == 8
    assert ask(cache, reads, first) == ["unauthorized"] and reads.counts[first] == 2  # read again


def test_with_no_key_cache_a_wrong_key_is_read_every_time(settings, reads):
    cache = CallerCache(ttl_s=0)  # QLORA_KEY_CACHE_S=0: every request reads its key
    wrong = made_up()
    assert ask(cache, reads, wrong, times=3) == ["unauthorized"] * 3
    assert reads.counts[wrong] == 3


def test_a_disabled_teams_key_is_not_kept_refused_and_works_once_the_team_is_enabled(settings, reads):
    """A disabled team's key is valid: its refusal (team_disabled) is read each time, so enabling the team (in any
    process, by `qlora admin enable-team`) lets it in at the next request."""
    with session_scope(settings.database_url) as session:
        create_team(session, "team-a")
        create_team(session, "team-b")
        _, secret = create_key(session, "team-a")
        create_key(session, "team-b", admin=True)
        admin.disable_team(session, "team-a")
    cache = CallerCache(ttl_s=60)
    key_hash = hash_key(secret)
    assert ask(cache, reads, key_hash, times=2) == ["team_disabled"] * 2
    with session_scope(settings.database_url) as session:
        admin.enable_team(session, "team-a")
    assert ask(cache, reads, key_hash) == ["team-a"]
    assert reads.counts[key_hash] == 3


def test_unknown_key_is_the_401_every_wrong_key_got():
    refused = UnknownKey()
    assert (refused.status, refused.body()) == (401, {"error": {"code": "unauthorized",
                                                                "message": "invalid or revoked API key"}})
