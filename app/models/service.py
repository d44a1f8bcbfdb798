"""The base model registry: the only base models jobs may use. Admins add them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, NotFound, field_errors
from app.models import repository
from app.models.tables import RegisteredModel
from worker.training.estimate import ModelShape
from worker.training.spec import excerpt

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$")


def add_model(session: Session, name: str, *, roots: Sequence[Path], path: str | None = None, hub_id: str | None = None,
              revision: str | None = None, description: str = "", config: dict | None = None) -> RegisteredModel:
    """Register a base model. A `path` must be a directory under one of `roots` (Settings.allowed_model_roots:
    model_path). Its config.json is read from `path` when this host can see it (or given as `config`): the API
    estimates jobs' memory from it."""
    if not _NAME.match(name):
        raise Invalid(f"model name {excerpt(name)}: 1-200 letters, digits and _ . : / -",
                      details=field_errors([("name", "1-200 letters, digits and _ . : / -")]))
    if (path is None) == (hub_id is None):
        raise Invalid("give exactly one of path (a directory of safetensors weights) or hub_id (with revision)")
    if path is not None:
        path = model_path(path, roots)
    if hub_id is not None and not revision:
        raise Invalid("a hub model needs a revision (a commit hash or tag), so every job trains the same weights")
    if repository.by_name(session, name):
        raise Conflict(f"a model named {name!r} is already registered")
    if config is None and path is not None and (Path(path) / "config.json").is_file():  # this host sees it
        config = _read_config(Path(path) / "config.json")
    if config is not None:
        try:
            ModelShape.from_config(config)
        except ValueError as exc:
            raise Invalid(f"config: {exc}", details=[{"field": "config", "message": str(exc)}]) from None
    model = RegisteredModel(name=name, path=path, hub_id=hub_id, revision=revision, description=description,
                            config=config, tokenizer=read_tokenizer_files(path))
    session.add(model)
    try:
        session.flush()
    except IntegrityError:  # registered meanwhile by a request that passed the check above at the same time
        raise Conflict(f"a model named {name!r} is already registered") from None
    return model


def model_path(path: str, roots: Sequence[Path]) -> str:
    """`path`, normalized, if it may be registered as a model: a directory under one of `roots`
    (QLORA_MODEL_ROOTS), else Invalid naming the field and the roots. Without the rule an admin key registered
    any directory of the API host (/etc, another service's home) and GET /models served its config.json to every
    team, and workers loaded weights from wherever it said. Where this host sees the path it must be what it
    claims, by what it is and not what it is called: no symbolic link out of the roots, a directory, a
    config.json in it. Where it does not (scale-out: models on the worker hosts only) the name alone is checked,
    and workers resolve it on their own hosts."""
    allowed = ", ".join(str(root) for root in roots)

    def refuse(why: str) -> Invalid:
        return Invalid(f"path: {excerpt(path)} {why}; a model's path must be a directory under a model root: {allowed} "
                       "(QLORA_MODEL_ROOTS)", details=field_errors([("path", f"{why}; allowed: a directory under {allowed}")]))

    given = Path(path).expanduser()
    if not given.is_absolute():
        raise refuse("is not absolute (workers resolve it on their own hosts)")
    normal = Path(os.path.normpath(given))  # /models/../etc is /etc
    if not any(normal != root and normal.is_relative_to(root) for root in roots):
        raise refuse("is not under a model root")
    if os.path.lexists(normal):
        real = Path(os.path.realpath(normal))
        if not any(real != Path(os.path.realpath(root)) and real.is_relative_to(Path(os.path.realpath(root))) for root in roots):
            raise refuse("leads out of the model roots through a symbolic link")
        if not real.is_dir():
            raise refuse("is not a directory")
        if not (real / "config.json").is_file():
            raise refuse("has no config.json (a Hugging Face model directory of safetensors weights has one)")
    return str(normal)


def _read_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise Invalid(f"path: {file} is not a readable JSON file ({excerpt(str(exc), quote=False)})",
                      details=[{"field": "path", "message": "config.json is not readable JSON"}]) from None
    if not isinstance(config, dict):
        raise Invalid(f"path: {file} holds a JSON {type(config).__name__}, not the object a config.json is",
                      details=[{"field": "path", "message": "config.json is not a JSON object"}])
    return config


# What a transformers tokenizer is made of, text files all (a sentencepiece-only model without a
# tokenizer.json has no fast tokenizer here, and no preflight).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # Llama 3's tokenizer.json is 9 MB; past this it is not a tokenizer


def read_tokenizer_files(path: str | None) -> dict[str, str] | None:
    """The tokenizer files of a model directory this host can read; None where it cannot, or where
    there is no tokenizer.json."""
    if path is None:
        return None
    directory = Path(path)
    try:
        if not (directory / "tokenizer.json").is_file():
            return None
        found = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
        if sum(f.stat().st_size for f in found) > MAX_TOKENIZER_BYTES:
            return None
        return {f.name: f.read_text(encoding="utf-8") for f in found}
    except (OSError, UnicodeDecodeError):
        return None


def tokenizer_files(session: Session, model: RegisteredModel) -> dict[str, str] | None:
    """The model's tokenizer files as the registry keeps them; a model registered before it kept them
    gets them now, where its path is readable here."""
    if model.tokenizer is None:
        files = read_tokenizer_files(model.path)
        if files is not None:
            model.tokenizer = files
            session.flush()
    return model.tokenizer


def list_models(session: Session) -> list[RegisteredModel]:
    """Every registered base model, by name: the registry is the same for all teams."""
    return repository.list_all(session)


def get_model(session: Session, name: str) -> RegisteredModel:
    model = repository.by_name(session, name)
    if model is None:
        known = ", ".join(m.name for m in repository.list_all(session)) or "none registered"
        raise NotFound(f"no registered base model {excerpt(name)}; registered: {known}")
    return model


def remove_model(session: Session, name: str) -> None:
    session.delete(get_model(session, name))
    session.flush()
