"""Idempotency-Key on job creation (POST /jobs, POST /v1/fine_tuning/jobs): a creation sent again makes
no second job.

A script that sends POST /jobs and loses the answer (a timeout, a dropped connection, a proxy's 502)
cannot tell whether the job was made; sent again, it would make another, and two jobs of hours each
would queue for the team's GPUs. With an `Idempotency-Key` header (any 1-255 visible ASCII characters;
a UUID does), the same key from the same team to the same endpoint, within KEPT, is answered with the
job the first request made, as it is now, marked `Idempotent-Replayed: true`. The same key with
another body is refused (422 `idempotency_key_reused`): it names another job. A request that failed
made nothing and binds nothing, so sending it again is a new try. The header follows the IETF draft
(draft-ietf-httpapi-idempotency-key-header) and Stripe's use of it.

The key is bound in the creation's own transaction, under the team's row lock (quotas.lock_team), so
two requests with one key at once, through two API processes, make one job.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Invalid, field_errors
from app.jobs import repository
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
    """A creation sent with a key: where to (`scope`), the key, and the body's digest."""

    scope: str
    key: str
    request_sha256: str


class MadeMeanwhile(Exception):  # noqa: N818 (not an error: the answer is the job another request made)
    def __init__(self, job_id: str):
        self.job_id = job_id


def requested(key: str | None, scope: str, body: Any) -> Keyed | None:
    """The request's key (its Idempotency-Key header), or None when it sent none; Invalid for a key that
    is not 1-255 visible ASCII."""
    if key is None:
        return None
    if not _KEY.fullmatch(key):
        raise Invalid(f"{HEADER}: 1 to 255 visible ASCII characters (a UUID does), got {excerpt(key)}",
                      details=field_errors([(HEADER, "1 to 255 visible ASCII characters, no spaces")]),
                      code="invalid_idempotency_key")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Keyed(scope, key, hashlib.sha256(canonical.encode()).hexdigest())


def earlier_job(session: Session, team_id: str, keyed: Keyed) -> str | None:
    """The id of the job this key made within KEPT, or None; KeyReused if it came with another body."""
    bound = repository.idempotency_key(session, team_id, keyed.scope, keyed.key)
    if bound is None or bound.created_at < utcnow() - KEPT:
        return None
    if bound.request_sha256 != keyed.request_sha256:
        raise KeyReused(f"{HEADER} {excerpt(keyed.key)} was sent at {bound.created_at:%Y-%m-%d %H:%M:%S} UTC with "
                        f"another body, and made job {bound.job_id}; a new job needs a new key",
                        details=field_errors([(HEADER, f"already used for job {bound.job_id}")]))
    return bound.job_id


def check_not_made_meanwhile(session: Session, team_id: str, keyed: Keyed) -> None:
    """Under the team's lock (taken here, held until the commit): MadeMeanwhile if a request with the
    same key made its job since this one first looked."""
    lock_team(session, team_id)
    made = earlier_job(session, team_id, keyed)
    if made is not None:
        raise MadeMeanwhile(made)


def bind(session: Session, team_id: str, keyed: Keyed, job_id: str) -> None:
    """The key now names the job (and the team's keys older than KEPT, this one's old binding too, go)."""
    repository.forget_idempotency_keys(session, team_id, made_before=utcnow() - KEPT)
    repository.add_idempotency_key(session, team_id, keyed.scope, keyed.key, keyed.request_sha256, job_id)
