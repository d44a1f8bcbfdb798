"""Team quotas: what an admin sets per team (weight, max_running, max_queued, gpu_hours_per_month,
storage_gib), with the deployment's defaults (QLORA_DEFAULT_*) for what is not set.

The limits a request meets are checked here: max_queued when a job is created, storage_gib when an
upload arrives (before a byte is stored, again while it streams, and once more, under the team's lock,
before it is recorded). max_running and the monthly budget hold jobs in the queue (app/scheduling/)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import GIB, MIN_WEIGHT, Settings
from app.db import database_now
from app.errors import Invalid, NotFound, QuotaExceeded, field_errors
from app.jobs import states
from app.quotas import repository
from app.quotas.schemas import ALLOWED, QuotaChanges, QuotaOut, QuotaOwn, QuotaUse, QuotaValues
from app.teams import repository as teams
from app.teams.service import Caller, still_authenticated
from app.teams.tables import Team
from app.text import counted, format_bytes, format_number
from app.usage.repository import gpu_seconds_by_team, month_start, storage_bytes
from worker.training.spec import excerpt

QUOTA_FIELDS = ("weight", "max_running", "max_queued", "gpu_hours_per_month", "storage_gib")


@dataclass(frozen=True)
class Quota:
    """A team's quota in force: its own values, else the defaults. None: no limit."""

    weight: float
    max_running: int | None
    max_queued: int | None
    gpu_hours_per_month: float | None
    storage_gib: float | None


def effective(settings: Settings, team: Team) -> Quota:
    values = {}
    for field in QUOTA_FIELDS:
        own = getattr(team, field)
        values[field] = own if own is not None else getattr(settings, f"default_{field}")
    # A weight stored while any weight > 0 was taken (down to 5e-324) counts as the least now allowed: below it a
    # share overflows to inf (app/config.py, MIN_WEIGHT). `own` still shows what was stored.
    values["weight"] = max(values["weight"], MIN_WEIGHT)
    return Quota(**values)


def lock_team(session: Session, team_id: str) -> Team:
    """Take the team's row for the rest of the transaction, before counting what it holds: two
    requests of one team that each count then add (20 submissions at once against max_queued) are
    served one after the other. A no-op UPDATE, so SQLite takes its write lock here too, before the
    count, instead of failing the second writer at its insert."""
    session.execute(update(Team).where(Team.id == team_id).values(id=Team.id).execution_options(synchronize_session=False))
    team = session.get(Team, team_id, populate_existing=True)
    assert team is not None  # the caller's key was just read
    return team


# ---------------------------------------------------------------- admin: set and show


def team_named(session: Session, name: str) -> Team:
    team = teams.team_by_name(session, name)
    if team is None:
        raise NotFound(f"no team {excerpt(name)} (qlora admin create-team NAME makes one)")
    return team


def set_quota(session: Session, team_name: str, changes: Mapping[str, Any]) -> Team:
    """Set the fields in `changes` for the team: a value sets it, None resets it to the default;
    fields not in `changes` stay as they are. Invalid names each field out of its range."""
    team = team_named(session, team_name)
    try:
        valid = QuotaChanges.model_validate(dict(changes))
    except ValidationError as exc:
        pairs = [(_field_of(e["loc"]), f"{e['msg']}; allowed: {ALLOWED.get(_field_of(e['loc']), 'no such quota')}, "
                  "or null for the default") for e in exc.errors()]
        raise Invalid("; ".join(f"{field}: {message}" for field, message in pairs),
                      details=field_errors(pairs)) from None
    for field in valid.model_fields_set:
        setattr(team, field, getattr(valid, field))
    session.flush()
    return team


def _field_of(loc: tuple) -> str:
    return str(loc[0]) if loc else "(body)"


def report(session: Session, settings: Settings, team: Team) -> QuotaOut:
    """The quota in force, which of it is the team's own, and what the team holds against it now."""
    now = database_now(session)  # claimed_at's clock: a running attempt counts up to now
    gpu_s = gpu_seconds_by_team(session, month_start(now), now, now, [team.id]).get(team.id, 0.0)
    in_force = effective(settings, team)
    return QuotaOut(
        team=team.name,
        quota=QuotaValues(**{field: getattr(in_force, field) for field in QUOTA_FIELDS}),
        own=QuotaOwn(**{field: getattr(team, field) for field in QUOTA_FIELDS}),
        use=QuotaUse(running=repository.count_jobs(session, team.id, states.WORKER_OWNED),
                     queued=repository.count_jobs(session, team.id, (states.QUEUED,)),
                     gpu_hours_this_month=round(gpu_s / 3600, 4),
                     storage_bytes=storage_bytes(session, team.id)))


def show(session: Session, settings: Settings, team_name: str) -> QuotaOut:
    return report(session, settings, team_named(session, team_name))


def show_own(session: Session, settings: Settings, team_id: str) -> QuotaOut:
    team = teams.team_by_id(session, team_id)
    if team is None:  # gone since its key was read (CallerCache)
        raise NotFound("the team of this key no longer exists")
    return report(session, settings, team)


# ---------------------------------------------------------------- max_queued


def check_can_queue(session: Session, settings: Settings, caller: Caller) -> None:
    """QuotaExceeded when the caller's team already has max_queued jobs waiting. Locks the team's row first.
    A key revoked, or a team disabled, since the key was read (the key cache's few seconds, or the minute a
    creation may wait for its team's turn) queues nothing either."""
    team_id = caller.team_id
    team = lock_team(session, team_id)
    still_authenticated(session, caller)
    limit = effective(settings, team).max_queued
    if limit is None:
        return
    queued = repository.count_jobs(session, team_id, (states.QUEUED,))
    if queued >= limit:
        raise QuotaExceeded(
            f"max_queued: team {team.name!r} already has {counted(queued, 'job')} queued, its limit is {limit}; a job "
            "leaves the queue when a worker starts it or when you cancel it (POST /jobs/{id}/cancel), or an "
            f"admin may raise the limit (qlora admin set-quota {team.name} --max-queued N)",
            details={"limit": "max_queued", "allowed": limit, "current": queued})


# ---------------------------------------------------------------- storage_gib


@dataclass
class StorageRoom:
    """What a team with a storage_gib limit may still store: its limit, less what it keeps (as read when
    the upload began), less what its other uploads in flight in this API process hold (UploadsInFlight).
    Without that last part, twenty uploads at once, each fitting the room read as it began, put twenty
    times the room on disk before all but one were refused at their end."""

    team_name: str
    limit_gib: float
    used_bytes: int
    in_flight: UploadsInFlight | None = None
    team_id: str = ""
    _mine: object = dataclasses.field(default_factory=object)  # this upload's entry in in_flight

    @property
    def limit_bytes(self) -> int:
        return int(self.limit_gib * GIB)

    def left_bytes(self, others: int = 0) -> int:
        return max(self.limit_bytes - self.used_bytes - others, 0)

    def exceeded(self, what: str, others: int = 0) -> QuotaExceeded:
        """The refusal of an upload; `what` says how it would pass the limit."""
        left = self.left_bytes(others)
        meanwhile = f", the team's other uploads in progress hold {format_bytes(others)}" if others else ""
        return QuotaExceeded(
            f"storage_gib: team {self.team_name!r} keeps {format_bytes(self.used_bytes)} of its limit of "
            f"{format_bytes(self.limit_bytes)} (storage_gib {format_number(self.limit_gib)}){meanwhile}, {format_bytes(left)} "
            f"left, and {what}; nothing of this upload was kept. Delete what the team no longer needs: datasets "
            "(DELETE /datasets/{id}, or qlora datasets delete ID), finished jobs' checkpoints (DELETE "
            "/jobs/{id}/checkpoints) or artifacts (DELETE /jobs/{id}/artifacts/{kind}); or an admin may raise the "
            f"limit (qlora admin set-quota {self.team_name} --storage-gib G)",
            details={"limit": "storage_gib", "allowed_bytes": self.limit_bytes, "current_bytes": self.used_bytes,
                     "in_flight_bytes": others, "left_bytes": left})

    def check_declared(self, declared_bytes: int | None) -> None:
        """Before a byte of the body is read: a team at its limit uploads nothing, and a body whose
        declared length is over what is left is refused at once (else it holds that much of the room
        while it streams). `declared_bytes` is the file's size as far as the request tells (its
        Content-Length less the form around the file); None: not told."""
        others = self._hold(declared_bytes or 0)
        if self.left_bytes(others) <= 0:
            raise self.exceeded("has no room for another upload", others)
        if declared_bytes is not None and declared_bytes > self.left_bytes(others):
            raise self.exceeded(f"this upload is {format_bytes(declared_bytes)}", others)

    def check_stream(self, stored_bytes: int) -> None:
        """While the body streams (a chunked body declares no length): refused once it passes what is left."""
        others = self._hold(stored_bytes)
        if stored_bytes > self.left_bytes(others):
            raise self.exceeded(f"this upload is already over {format_bytes(self.left_bytes(others))}", others)

    def _hold(self, size: int) -> int:
        """Notes that this upload holds `size` bytes (at least); what the team's other uploads hold."""
        return self.in_flight.hold(self.team_id, self._mine, size) if self.in_flight is not None else 0

    def release(self) -> None:
        if self.in_flight is not None:
            self.in_flight.release(self.team_id, self._mine)


class UploadsInFlight:
    """The bytes each team's uploads in this API process hold so far (declared, or stored), until each is
    recorded or refused. Per process: with several API processes a team may pass its room by as many
    times as there are processes while uploads stream, and the record (check_storage_fits, under the
    team's row) still keeps no more than the limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, dict[object, int]] = {}

    def hold(self, team_id: str, upload: object, size: int) -> int:
        with self._lock:
            mine = self._held.setdefault(team_id, {})
            mine[upload] = max(mine.get(upload, 0), size)
            return sum(held for other, held in mine.items() if other is not upload)

    def release(self, team_id: str, upload: object) -> None:
        with self._lock:
            mine = self._held.get(team_id, {})
            mine.pop(upload, None)
            if not mine:
                self._held.pop(team_id, None)


def storage_room(session: Session, settings: Settings, team_id: str,
                 in_flight: UploadsInFlight | None = None) -> StorageRoom | None:
    """The team's room for more stored bytes; None when it has no storage limit. With `in_flight`, the
    room of an upload that counts the team's others in flight (release() it once recorded or refused)."""
    team = teams.team_by_id(session, team_id)
    limit = effective(settings, team).storage_gib if team is not None else None
    if team is None or limit is None:
        return None
    return StorageRoom(team.name, limit, storage_bytes(session, team_id), in_flight, team_id)


def check_storage_fits(session: Session, settings: Settings, caller: Caller, incoming_bytes: int) -> None:
    """Before recording a stored upload: with the team's row locked, its use now plus these bytes must
    fit. Two uploads that each fitted when they began cannot both be kept past the limit. And the key must
    still authenticate: an upload may stream for minutes after its key was read, and one whose key was
    revoked, or whose team was disabled, meanwhile keeps nothing."""
    team_id = caller.team_id
    team = lock_team(session, team_id)  # also reads the quota afresh: an admin may have changed it meanwhile
    still_authenticated(session, caller)
    limit = effective(settings, team).storage_gib
    if limit is None:
        return
    room = StorageRoom(team.name, limit, storage_bytes(session, team_id))
    if incoming_bytes > room.left_bytes():
        raise room.exceeded(f"this upload is {format_bytes(incoming_bytes)}")
