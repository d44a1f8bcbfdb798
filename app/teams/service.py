"""Teams and API keys. A key is shown once, when made; only its sha256 is stored."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from app.recent import Recent
from app.teams import repository
from app.teams.tables import ApiKey, Team
from app.text import counted
from worker.training.spec import excerpt

KEY_PREFIX = "qlk_"
_TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the team every query is scoped to, and whether the key may administer.

    Plain values, not rows: a Caller outlives the session that read it (CallerCache keeps it for a few seconds).
    """

    team_id: str
    team_name: str
    key_id: str
    is_admin: bool

    @classmethod
    def of(cls, team: Team, key: ApiKey) -> Caller:
        return cls(team_id=team.id, team_name=team.name, key_id=key.id, is_admin=key.is_admin)


# Keys this process reads at once when they missed its cache (each read a route thread and a database connection).
# A key is read before its team is known, so no team's share (app/shares.py) bounds these reads: 200 requests at
# once with made-up keys, each a miss and a 401, held all 40 route threads and once the whole connection pool.
# A read takes a few ms, so 4 at once still read hundreds of keys a second (a restart's first polls).
KEY_READS = 4


# Key hashes refused lately that each API process keeps (see CallerCache.refused): ~250 bytes each, so a flood of
# made-up keys, each refused once, holds at most ~1 MB however many it sends; the oldest refusal goes first.
REFUSED_KEYS = 4096


class UnknownKey(Unauthorized):
    """No key with this hash works, and none ever will: none was made (keys are 32 random bytes the server makes,
    so no client sent one before it existed), it was revoked (for good), or its team row is gone. What
    CallerCache.refused keeps; a disabled team's keys are refused otherwise (team_disabled), and work again when
    it is enabled."""

    def __init__(self) -> None:
        super().__init__("invalid or revoked API key")


class CallerCache(Recent[str, Caller]):
    """What this process read of each API key lately (by key hash), for `ttl_s` seconds.

    Every request authenticates, and most are polls: without this, two of a status poll's three
    queries would read the same key and team again. The price: a key revoked (`qlora admin revoke-key`)
    still works for up to `ttl_s` in each API process that read it just before. Here only keys that
    authenticated are kept, at most `max_entries` of them (refusals: `refused`, below). The same holds for
    a team disabled (`qlora admin disable-team`), except in the process that served POST
    /admin/teams/{team}/disable, which forgets the team's keys at once (forget_team); and whatever a
    key still does in that window, its jobs do not start and no new job of it is queued.

    `refused` keeps the keys that authenticated nothing (UnknownKey), as long and at most `max_refused` of them:
    a script sending a wrong or revoked key in a loop cost a database read per request, and KEY_READS of those
    at once held back every other key this process had not read yet. A refusal kept is always still true (no
    key comes to work after UnknownKey), so nothing is ever forgotten from it: a key made since, by `qlora admin
    create-key` or at the first start, was never sent before it existed and works at once everywhere. Only a
    key row that comes back (a database restored from a backup) waits out `ttl_s`.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000, reads: int = KEY_READS, max_refused: int = REFUSED_KEYS):
        super().__init__(ttl_s, max_entries)
        self.reads = asyncio.Semaphore(reads)  # the reads that missed, at once (KEY_READS); awaited on the event loop
        self.refused: Recent[str, bool] = Recent(ttl_s, max_refused)

    async def caller(self, key_hash: str, read: Callable[[], Awaitable[Caller]]) -> Caller:
        """The caller of `key_hash`, kept or read(); UnknownKey, kept or read, for a key that works nowhere."""
        if self.refused.get(key_hash):
            raise UnknownKey()
        try:
            return await self.get_or_read(key_hash, read)
        except UnknownKey:
            self.refused.put(key_hash, True)
            raise

    def forget_team(self, team_id: str) -> None:
        self.forget(lambda caller: caller.team_id == team_id)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(session: Session, name: str) -> Team:
    if not _TEAM_NAME.match(name):
        raise Invalid(f"team name {name!r} must be 1-100 letters, digits, '_', '.', '-', starting with a letter or digit")
    if repository.team_by_name(session, name):
        raise Conflict(f"a team named {name!r} already exists")
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team


def create_key(session: Session, team_name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
    """Returns the key row and the key itself, which is never stored or shown again."""
    team = repository.team_by_name(session, team_name)
    if team is None:
        raise NotFound(f"no team named {excerpt(team_name)}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(team_id=team.id, prefix=secret[:12], key_hash=hash_key(secret), is_admin=admin)
    session.add(key)
    session.flush()
    return key, secret


def revoke_key(session: Session, ref: str) -> ApiKey:
    keys = repository.key_by_id_or_prefix(session, ref)
    if not keys:
        # Revoking is for good: only a whole id or prefix, never the one key a part of one happens to match.
        near = repository.keys_starting_with(session, ref)
        raise NotFound(f"no API key with id or prefix {excerpt(ref)}"
                       + (f"; it is the start of {counted(len(near), 'key prefix', 'key prefixes')}: "
                          + ", ".join(f"{k.id} (prefix {k.prefix})" for k in near) + "; give one whole" if near else ""),
                       details=[{"id": k.id, "prefix": k.prefix} for k in near] or None)
    if len(keys) > 1:
        matching = ", ".join(f"{k.id} (prefix {k.prefix})" for k in keys)
        raise Conflict(f"{excerpt(ref)} is ambiguous: {len(keys)} keys have that prefix: {matching}; give one key's id",
                       details=[{"id": k.id, "prefix": k.prefix} for k in keys])
    key = keys[0]
    key.revoked_at = key.revoked_at or utcnow()
    session.flush()
    return key


def bearer_key_hash(headers: list[str]) -> str:
    """The sha256 of the key in the request's `Authorization: Bearer <key>` header (all its values, as
    received); 401 without one, or with several: a proxy or gateway in front that read another of them
    than this API reads would disagree with it on who is calling."""
    if len(headers) > 1:
        raise Unauthorized(f"{len(headers)} Authorization headers: send one, 'Authorization: Bearer <key>'")
    authorization = headers[0] if headers else None
    if not authorization:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    if not authorization.lower().startswith("bearer "):  # a key without its scheme, or Basic, Token ...
        raise Unauthorized("the Authorization header is not 'Bearer <key>': send the header 'Authorization: Bearer <key>'")
    return hash_key(authorization[7:].strip())


def authenticate(session: Session, key_hash: str) -> Caller:
    key = repository.key_by_hash(session, key_hash)
    if key is None or key.revoked_at is not None:
        raise UnknownKey()
    team = repository.team_by_id(session, key.team_id)
    if team is None:  # the key's team row is gone: treat the key as revoked
        raise UnknownKey()
    if team.disabled_at is not None:
        raise team_disabled(team)
    return Caller.of(team, key)


def still_authenticated(session: Session, caller: Caller) -> ApiKey:
    """The caller's key row, read again now: UnknownKey if it was revoked since the request read it, team_disabled
    if its team was disabled. For what a request makes long after it authenticated, where the key cache's
    QLORA_KEY_CACHE_S is not the bound: an upload that streamed for minutes, a job that waited its team's turn and
    ran its preflight. Without it a key revoked (leaked, say) mid-upload still stored its file in the team's
    datasets once the upload ended. Called with the team's row locked, so a disable, which takes that row first,
    commits before this reads it or after the write. The key's row is read shared, held until the write commits:
    a revoke (which updates it) meanwhile waits for the write, so once `revoke-key` has answered, nothing more is
    recorded under the key (read unlocked, a revoke between this read and the commit answered first)."""
    key = session.get(ApiKey, caller.key_id, populate_existing=True, with_for_update={"read": True})
    if key is None or key.revoked_at is not None:
        raise UnknownKey()
    team = session.get(Team, key.team_id, populate_existing=True)
    if team is None:  # the key's team row is gone: treat the key as revoked, as authenticate does
        raise UnknownKey()
    if team.disabled_at is not None:
        raise team_disabled(team)
    return key


def team_disabled(team: Team) -> Unauthorized:
    """The refusal of every key of a disabled team, admin keys included: the key is valid, its team is not,
    and only an admin can change that (a team that could enable itself would not be disabled)."""
    reason = f" ({team.disabled_reason})" if team.disabled_reason else ""
    return Unauthorized(f"team {team.name!r} is disabled (since {team.disabled_at:%Y-%m-%d %H:%M} UTC){reason}: its keys "
                        f"are refused and its jobs do not start; an admin can enable it again (qlora admin enable-team "
                        f"{team.name})", code="team_disabled")


# Signed links: what a key's holder hands a browser, which cannot send the key as it navigates (a download
# the browser saves to disk is a navigation, not a fetch). Signed with the key's own stored hash, a secret
# the database keeps and nobody is shown, so no secret of the service's own must be made, kept and shared
# between API processes; and a link dies with its key: revoking the key revokes every link it signed.

def sign(session: Session, caller: Caller, message: str) -> str:
    return _signature(still_authenticated(session, caller), message)


def signer(session: Session, key_id: str, message: str, signature: str) -> Caller:
    """Who signed `message`, if the key `key_id` did and still authenticates; 403 otherwise, naming no
    more than that (a wrong key id and a wrong signature read the same). A disabled team's links die with
    it, as a revoked key's do, and come back if it is enabled again before they expire."""
    key = session.get(ApiKey, key_id) if key_id else None
    team = repository.team_by_id(session, key.team_id) if key is not None and key.revoked_at is None else None
    if team is not None and team.disabled_at is not None:
        team = None
    # As bytes: compare_digest refuses a str with a non-ASCII character (TypeError, a 500), and a link's
    # signature is whatever its holder typed into the query.
    if key is None or team is None or not hmac.compare_digest(_signature(key, message).encode(),
                                                              signature.encode("utf-8", "replace")):
        raise Forbidden("this link is not valid: its signature does not match, or the key that made it was "
                        "revoked; ask for a new one")
    return Caller.of(team, key)


def _signature(key: ApiKey, message: str) -> str:
    return hmac.new(key.key_hash.encode(), message.encode(), hashlib.sha256).hexdigest()
