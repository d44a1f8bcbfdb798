from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import case, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.teams.tables import ApiKey, Team


def team_by_name(session: Session, name: str) -> Team | None:
    return session.scalars(select(Team).where(Team.name == name)).one_or_none()


def team_by_id(session: Session, team_id: str) -> Team | None:
    return session.get(Team, team_id)


def list_teams(session: Session) -> list[Team]:
    return list(session.scalars(select(Team).order_by(Team.name)))


def key_by_hash(session: Session, key_hash: str) -> ApiKey | None:
    try:
        return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one_or_none()
    except DBAPIError as exc:
        # The hash signs the key's download links (teams.service.sign): a read that failed (the database restarting,
        # a statement timeout) wrote it into the API's log as the query's parameter, and whoever read the log could
        # sign links to any artifact of the key's team. The statement stays in the message, the value does not.
        exc.hide_parameters = True
        raise


def key_by_id_or_prefix(session: Session, ref: str) -> list[ApiKey]:
    """The key with this id or this whole prefix (two keys may share one)."""
    return list(session.scalars(select(ApiKey).where((ApiKey.id == ref) | (ApiKey.prefix == ref))
                                .order_by(ApiKey.created_at)))


def keys_starting_with(session: Session, ref: str) -> list[ApiKey]:
    """The keys whose prefix starts with `ref`, to name them where `ref` is only part of one."""
    if not ref:
        return []
    found = session.scalars(select(ApiKey).where(ApiKey.prefix.startswith(ref, autoescape=True))
                            .order_by(ApiKey.created_at).limit(20))
    # SQLite's LIKE ignores case, Postgres's does not: the prefix is compared exactly here.
    return [key for key in found if key.prefix.startswith(ref)]


def keys_of(session: Session, team_id: str) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.team_id == team_id).order_by(ApiKey.created_at)))


def live_keys(session: Session, key_ids: Collection[str]) -> set[str]:
    """Which of these keys still authenticate: not revoked, not of a disabled team, and not gone with their
    team (the rows go with it). One query for every key watching a job: a live stream's feed asks between
    polls, so a revoked key's streams, and a disabled team's, end at the next one."""
    return set(session.scalars(select(ApiKey.id).join(Team, Team.id == ApiKey.team_id)
                               .where(ApiKey.id.in_(key_ids), ApiKey.revoked_at.is_(None), Team.disabled_at.is_(None))))


def key_is_live(session: Session, key_id: str) -> bool:
    """live_keys for one key: a stream reading history on its own asks before each batch."""
    return key_id in live_keys(session, [key_id])


def live_key_counts(session: Session) -> dict[str, tuple[int, int]]:
    """(live keys, live admin keys) of each team that has any; "live": not revoked."""
    rows = session.execute(select(ApiKey.team_id, func.count(), func.count(case((ApiKey.is_admin.is_(True), 1))))
                           .where(ApiKey.revoked_at.is_(None)).group_by(ApiKey.team_id))
    return {team_id: (keys, admin) for team_id, keys, admin in rows}


def teams_with_live_admin_keys(session: Session) -> set[str]:
    """The enabled teams holding a key that may administer (not revoked): those whose admin keys authenticate."""
    return set(session.scalars(select(ApiKey.team_id).join(Team, Team.id == ApiKey.team_id).where(
        ApiKey.is_admin.is_(True), ApiKey.revoked_at.is_(None), Team.disabled_at.is_(None)).distinct()))
