"""Dependencies every route shares, as short Annotated aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.errors import Forbidden
from app.storage.base import Storage
from app.teams.service import Caller, authenticate


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: committed when the route returns, rolled back if it raises.

    Used with scope="function": the commit happens before the response is sent, so a client
    that gets 201 for a job can read it back at once (with the default scope FastAPI sends the
    response first and commits after: a read right after a create can answer 404).
    """
    with session_scope(request.app.state.settings.database_url) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_caller(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    return authenticate(session, authorization)


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_admin(caller: CallerDep) -> Caller:
    if not caller.is_admin:
        raise Forbidden("this needs an admin key (qlora admin create-key TEAM --admin)")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]
