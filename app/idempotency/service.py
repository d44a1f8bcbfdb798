"""Idempotency-Key on the creations (POST /jobs, POST /datasets, and /v1's jobs and files): a creation
sent again makes nothing twice.

A script that sends a creation and loses the answer (a timeout, a dropped connection, a proxy's 502)
cannot tell whether it was made; sent again, it would make another: a second job of hours queued for
the team's GPUs, a second copy of a dataset counted against its storage. With an `Idempotency-Key`
header (any 1-255 visible ASCII characters; a UUID does), the same key from the same team to the same
endpoint, within KEPT, is answered with what the first request made, as it is now, marked
`Idempotent-Replayed: true`. The same key with another request is refused (422
`idempotency_key_reused`): it names what it made. A JSON body is the same request when its JSON value is
(canonical_json: `4` and `4.0` are one number). A request that failed made nothing and binds
nothing, so sending it again is a new try. The header follows the IETF draft
(draft-ietf-httpapi-idempotency-key-header) and Stripe's use of it.

The key is bound in the creation's own transaction, under the team's row lock (quotas.lock_team), so
two requests with one key at once, through two API processes, make one thing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.db import database_now
from app.errors import Invalid, field_errors
from app.idempotency import repository
from app.idempotency.tables import IdempotencyKey
from app.quotas.service import lock_team
from worker.training.spec import excerpt

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEPT = timedelta(hours=24)
_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class KeyReused(Invalid):
    code = "idempotency_key_reused"


@dataclass(frozen=True)
class Keyed:
    """A creation sent with a key: where to (`scope`), the key, and the request's digest."""

    scope: str
    key: str
    request_sha256: str


@dataclass(frozen=True)
class Made:
    """What a key made: a job or a dataset."""

    job_id: str | None
    dataset_id: str | None


class MadeMeanwhile(Exception):  # noqa: N818 (not an error: the answer is what another request made)
    def __init__(self, made: Made):
        self.made = made


def checked_key(key: str | None) -> str | None:
    """The key as sent, or Invalid for one that is not 1-255 visible ASCII: an upload checks it before
    its body is read."""
    if key is not None and not _KEY.fullmatch(key):
        raise Invalid(f"{HEADER}: 1 to 255 visible ASCII characters (a UUID does), got {excerpt(key)}",
                      details=field_errors([(HEADER, "1 to 255 visible ASCII characters, no spaces")]),
                      code="invalid_idempotency_key")
    return key


def one_key(headers: list[str]) -> str | None:
    """The request's one Idempotency-Key (all its values, as received), or None without one; Invalid for
    several. Read as one value, the API took the first of `Idempotency-Key: a` and `Idempotency-Key: b`
    (a script appending its key to headers that already held one), while a proxy or gateway in front
    that deduplicates by key may read the last: the two would disagree on which request this replays."""
    if len(headers) > 1:
        raise Invalid(f"{len(headers)} {HEADER} headers: send one key per request",
                      details=field_errors([(HEADER, "sent more than once; send one")]),
                      code="invalid_idempotency_key")
    return headers[0] if headers else None


def requested(key: str | None, scope: str, request: Any) -> Keyed | None:
    """The request's key (its Idempotency-Key header), or None when it sent none; Invalid for a key that
    is not 1-255 visible ASCII. `request` is what identifies the request: a JSON body, or an upload's
    name and digest. Two requests are the same when their JSON values are (canonical_json)."""
    key = checked_key(key)
    if key is None:
        return None
    if isinstance(request, bytes):  # a body that is not JSON at all: refused once read, but told apart by its bytes
        canonical = request
    else:
        canonical = canonical_json(request)
    return Keyed(scope, key, hashlib.sha256(canonical).hexdigest())


def canonical_json(value: Any) -> bytes:
    """One text for each JSON value, so that a request sent again is known by what it says, not by how its client
    wrote it (as Stripe compares a retried request's parameters): keys in order, no spaces, and a whole number one
    way, whether written 4, 4.0 or 4e0. JSON has one kind of number, and RFC 8259 leaves 4 and 4.0 the same value;
    a client that sent 4.0 (Python's json for a float) retried with 4 (a JavaScript client writes no 4.0, and a
    script may rebuild its body) was 422 idempotency_key_reused for a job that would have been the same. Any other
    difference (a field added, even as null; "4" for 4) is another request. surrogatepass: a key's digest must
    never fail, whatever the request holds."""
    return json.dumps(_whole_numbers_as_int(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass")


def _whole_numbers_as_int(value: Any) -> Any:
    """`value` with each float that is a whole number (4.0, 1e20, -0.0) as that int; bools stay bools."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {name: _whole_numbers_as_int(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(item) for item in value]
    return value


def _bound(session: Session, team_id: str, scope: str, key: str) -> IdempotencyKey | None:
    """The key's binding, unless it is older than KEPT (then the key is free again). Aged on the database's clock,
    which bind dates it by: on each API host's own, a host a day ahead took a key bound a moment ago for an expired
    one, and a retried POST made its job or dataset a second time."""
    bound = repository.get(session, team_id, scope, key)
    return None if bound is None or bound.created_at < database_now(session) - KEPT else bound


def earlier(session: Session, team_id: str, keyed: Keyed) -> Made | None:
    """What this key made within KEPT, or None; KeyReused if it came with another request."""
    bound = _bound(session, team_id, keyed.scope, keyed.key)
    if bound is None:
        return None
    made = Made(bound.job_id, bound.dataset_id)
    if bound.request_sha256 != keyed.request_sha256:
        raise reused(keyed.key, made, f"was sent at {bound.created_at:%Y-%m-%d %H:%M:%S} UTC with another request")
    return made


def reused(key: str, made: Made, how: str) -> KeyReused:
    """The refusal of a key sent with another request than the one that made `made`; `how` says how it differs."""
    what = f"job {made.job_id}" if made.job_id else f"dataset {made.dataset_id}"
    return KeyReused(f"{HEADER} {excerpt(key)} {how}, and made {what}; a new one needs a new key",
                     details=field_errors([(HEADER, f"already used for {what}")]))


def made_with(session: Session, team_id: str, scope: str, key: str) -> Made | None:
    """What this key made within KEPT, whatever request made it: an upload looks before its body is read,
    when the request's digest is not known yet."""
    bound = _bound(session, team_id, scope, key)
    return None if bound is None else Made(bound.job_id, bound.dataset_id)


def check_not_made_meanwhile(session: Session, team_id: str, keyed: Keyed) -> None:
    """Under the team's lock (taken here, held until the commit): MadeMeanwhile if a request with the
    same key made its thing since this one first looked."""
    lock_team(session, team_id)
    made = earlier(session, team_id, keyed)
    if made is not None:
        raise MadeMeanwhile(made)


def bind(session: Session, team_id: str, keyed: Keyed, *, job_id: str | None = None,
         dataset_id: str | None = None) -> None:
    """The key now names what was made (and the team's keys older than KEPT, this one's old binding too, go)."""
    now = database_now(session)
    repository.forget_older(session, team_id, made_before=now - KEPT)
    repository.add(session, team_id, keyed.scope, keyed.key, keyed.request_sha256, now, job_id=job_id,
                   dataset_id=dataset_id)
