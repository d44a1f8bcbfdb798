"""Stray objects: committed objects in storage that no row of the database refers to, found and
(on an operator's word) deleted. `qlora admin sweep-storage` is the way in.

Where strays come from: a worker killed after its training process uploaded a checkpoint and before the
checkpoint was recorded; an API process killed between an upload's commit and the database's; an
object whose delete failed (storage out of reach) after its row was deleted (a dataset, pruned
checkpoints, a replaced artifact). Nobody sees them and nobody is billed for them: a team's storage use
is counted from rows. (Writes never committed are the reaper's: Storage.abort_stale_writes.)

It lives with the operators' other whole-service tasks (metrics, leases) rather than in app/storage,
whose backends know nothing of the database: the sweep is where storage and every domain's rows meet.

The sweep is manual on purpose: pointed at an empty or wrong database, every object would look stray.
Its rails:
- Only keys of the service's own form (`{team id}/{datasets|artifacts|checkpoints}/{uuid hex}`, or
  `shared/quantized-bases/{uuid hex}`, as storage.make_key makes them) are considered. Anything else in
  a shared bucket or directory is counted as foreign and never listed or touched.
- An object younger than `older_than_s` is left alone: it may have been uploaded a moment ago, its row
  about to be committed. At least MIN_AGE_S unless forced (S3 dates a multipart upload's object from
  when the upload began, so a large merged model is already that old when it is recorded). The age is read
  on the store's own clock, which dated the object (Storage.now), not on this host's.
- Just before each delete the database is asked again: a row recorded since the listing keeps its object.
- Deleting is refused (DatabaseLooksWrong) when no stored object is referenced by any row while storage
  holds objects of the service's form: the database is empty, or is another deployment's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from app.db import release_connection
from app.errors import Conflict
from app.operations import repository
from app.storage.base import Storage

# The kinds a team's objects are stored as (storage.make_key's callers), and the one shared kind.
TEAM_KINDS = ("datasets", "artifacts", "checkpoints")
SHARED_TEAM, SHARED_KINDS = "shared", ("quantized-bases",)
_HEX32 = "[0-9a-f]{32}"  # a team id (app.db.new_id) and a key's last segment (uuid4().hex)
SERVICE_KEY = re.compile(rf"(?P<team>{_HEX32})/(?P<kind>{'|'.join(TEAM_KINDS)})/{_HEX32}"
                         rf"|(?P<shared>{SHARED_TEAM})/(?P<shared_kind>{'|'.join(SHARED_KINDS)})/{_HEX32}")

DEFAULT_AGE = "24h"
MIN_AGE_S = 3600  # below it only with force
_AGE = re.compile(r"(\d+)([mhd])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> int:
    """"30m", "24h", "7d" (or "0") in seconds; ValueError naming the forms otherwise."""
    if text.strip() == "0":
        return 0
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an age: write a whole number of minutes, hours or days, as 30m, 24h or 7d")
    return int(match[1]) * _UNIT_S[match[2]]


def check_age(older_than_s: float, force: bool) -> None:
    if older_than_s < MIN_AGE_S and not force:
        raise ValueError(f"an age under {MIN_AGE_S // 3600}h could take an object whose upload has just finished, "
                         "before its row is recorded; give at least 1h, or --force if nothing is writing to storage")


def key_parts(key: str) -> tuple[str, str] | None:
    """(team id, kind) of a key of the service's form; None for any other key."""
    match = SERVICE_KEY.fullmatch(key)
    if match is None:
        return None
    return (match["team"], match["kind"]) if match["team"] else (match["shared"], match["shared_kind"])


@dataclass(frozen=True)
class Stray:
    key: str
    team_id: str
    kind: str
    bytes: int
    modified_at: datetime
    age_s: float


@dataclass
class Sweep:
    """What one look at storage and the database found."""

    older_than_s: float
    as_of: datetime
    strays: list[Stray] = field(default_factory=list)
    stored: int = 0  # objects of the service's form
    referenced: int = 0  # of those, the ones a row refers to
    young: int = 0  # of those, unreferenced but younger than older_than_s: left alone
    foreign: int = 0  # keys not of the service's form: never listed or touched
    rows: int = 0  # storage keys the database holds


@dataclass
class Deletion:
    deleted: list[Stray] = field(default_factory=list)
    kept: list[Stray] = field(default_factory=list)  # a row came to refer to it after the listing
    failed: tuple[Stray, str] | None = None  # the delete storage refused; the sweep stopped there


class DatabaseLooksWrong(Conflict):
    pass


def find_strays(session: Session, storage: Storage, older_than_s: float, now: datetime | None = None) -> Sweep:
    """Every committed object of the service's form that no row refers to and that was last changed at
    least older_than_s ago, oldest first. Deletes nothing. Ages are read on the store's own clock
    (storage.now()), which dated the objects: on this host's, a host whose clock ran a day ahead took an
    object uploaded a moment ago, its row about to be committed, for a day-old stray and deleted it, and one
    a day behind kept every stray a day longer. `now`: as the store's clock reads."""
    now = now or storage.now()
    referenced = repository.referenced_keys(session)
    release_connection(session)  # listing a large bucket takes a while: no transaction held open meanwhile
    sweep = Sweep(older_than_s, now, rows=len(referenced))
    for obj in storage.list_objects():
        parts = key_parts(obj.key)
        if parts is None:
            sweep.foreign += 1
            continue
        sweep.stored += 1
        if obj.key in referenced:
            sweep.referenced += 1
            continue
        age_s = (now - obj.modified_at).total_seconds()
        if age_s < older_than_s:
            sweep.young += 1
            continue
        sweep.strays.append(Stray(obj.key, parts[0], parts[1], obj.size, obj.modified_at, age_s))
    sweep.strays.sort(key=lambda s: (s.modified_at, s.key))
    return sweep


def database_looks_wrong(sweep: Sweep) -> bool:
    """Storage holds objects of the service's and no row refers to any of them: an empty database, or
    another deployment's (or storage another deployment's). Every object would look stray."""
    return sweep.stored > 0 and sweep.referenced == 0


def check_deletable(session: Session, sweep: Sweep) -> None:
    if not database_looks_wrong(sweep):
        return
    database = session.get_bind().engine.url.render_as_string(hide_password=True)
    found = ("holds no rows that refer to stored objects (datasets, checkpoints, artifacts, quantized bases)"
             if not sweep.rows else f"holds {sweep.rows} storage keys, none of them of an object in storage")
    raise DatabaseLooksWrong(
        f"refusing to delete: the database {database} {found}, while storage holds {sweep.stored} objects of the "
        "service's: the database looks empty or wrong, and every object would go. Check QLORA_DATABASE_URL (and "
        "QLORA_STORAGE_URL); --force deletes them all the same", code="database_looks_wrong")


def delete_strays(session: Session, storage: Storage, sweep: Sweep, *, force: bool = False) -> Deletion:
    """Delete the strays found, each only if still no row refers to it, asked just before its delete.
    Stops at the first delete storage refuses (out of reach, most likely: the rest would fail too)."""
    if not force:
        check_deletable(session, sweep)
    done = Deletion()
    for stray in sweep.strays:
        release_connection(session)  # a new transaction: it sees rows committed since (SQLite reads a snapshot)
        if repository.is_referenced(session, stray.key):
            done.kept.append(stray)
            continue
        try:
            storage.delete(stray.key)
        except Exception as exc:  # noqa: BLE001  (reported with what was done, not raised past it)
            done.failed = (stray, f"{type(exc).__name__}: {exc}")
            break
        done.deleted.append(stray)
    return done


def report(session: Session, sweep: Sweep, deletion: Deletion | None = None) -> dict:
    """The sweep as `qlora admin sweep-storage` prints it on a pipe: each stray, a summary per team and kind,
    and with a deletion what was deleted, kept and freed."""
    names = repository.team_names(session, {s.team_id for s in sweep.strays if s.team_id != SHARED_TEAM})

    def team(team_id: str) -> str | None:
        return team_id if team_id == SHARED_TEAM else names.get(team_id)

    def total(strays: list[Stray]) -> dict:
        return {"count": len(strays), "bytes": sum(s.bytes for s in strays)}

    summary: dict[tuple[str, str], list[Stray]] = {}
    for stray in sweep.strays:
        summary.setdefault((stray.team_id, stray.kind), []).append(stray)
    answer: dict = {
        "as_of": sweep.as_of, "older_than_s": sweep.older_than_s,
        "strays": [{"key": s.key, "team_id": s.team_id, "team": team(s.team_id), "kind": s.kind, "bytes": s.bytes,
                    "modified_at": s.modified_at, "age_s": round(s.age_s)} for s in sweep.strays],
        "summary": [{"team_id": team_id, "team": team(team_id), "kind": kind, **total(strays)}
                    for (team_id, kind), strays in sorted(summary.items())],
        "total": total(sweep.strays),
        "storage": {"objects": sweep.stored, "referenced": sweep.referenced, "young": sweep.young,
                    "foreign": sweep.foreign},
        "database_rows": sweep.rows, "database_looks_wrong": database_looks_wrong(sweep),
        "deleted": None,
    }
    if deletion is not None:
        answer["deleted"] = {**total(deletion.deleted), "keys": [s.key for s in deletion.deleted],
                             "kept_referenced_now": [s.key for s in deletion.kept],
                             "failed": {"key": deletion.failed[0].key, "error": deletion.failed[1]}
                             if deletion.failed else None}
    return answer
