from __future__ import annotations

from fastapi import APIRouter

from app.deps import AdminDep, CallerDep, SessionDep, SettingsDep
from app.models import service
from app.models.schemas import ModelIn, ModelOut
from app.routing import CheckedJSONRoute

router = APIRouter(prefix="/models", tags=["models"], route_class=CheckedJSONRoute)


@router.get("", response_model=list[ModelOut])
def list_models(session: SessionDep, _: CallerDep):
    return service.list_models(session)


@router.post("", response_model=ModelOut, status_code=201)
def add_model(body: ModelIn, session: SessionDep, settings: SettingsDep, _: AdminDep):
    return service.add_model(session, roots=settings.allowed_model_roots, **body.model_dump())


@router.delete("/{name:path}", status_code=204)
def remove_model(name: str, session: SessionDep, _: AdminDep, force: bool = False):
    """Refused (409) while unfinished jobs name the model; `force=true` removes it anyway and cancels them."""
    service.remove_model(session, name, force=force)
