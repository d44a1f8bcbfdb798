"""The base model registry: the only base models jobs may use. Admins add them."""

from __future__ import annotations

import codecs
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic_core import from_json
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import database_now
from app.errors import Conflict, Invalid, NotFound, field_errors
from app.jobs import repository as jobs
from app.jobs import states
from app.jobs.tables import Job
from app.models import repository
from app.models.tables import RegisteredModel
from app.routing import MAX_JSON_VALUES, more_values_than
from worker.training.estimate import ModelShape
from worker.training.spec import excerpt

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$")

# A hub repo as huggingface_hub's validate_repo_id takes it (its REPO_ID_REGEX, in ASCII): `name` or `org/name`, each
# part 1-96 letters, digits and - _ ., starting and ending with a letter, a digit or _, no -- or .. anywhere, not
# ending in .git. Stricter than the hub, it refused ids the hub serves (`gpt2`, `org/name_`, a name of 60 characters
# after its org), and the worker applies it to models registered before: their jobs failed. A revision as a branch,
# a tag or a commit names it, each part after a / starting with a letter or digit. The worker hands both to
# snapshot_download, which makes a cache folder of the id (models--org--name: hence no --) and joins the revision
# into paths of its cache (refs/<revision>, written after a download): "../../x" or "/x" there named a file outside
# the cache. Both were taken as given, and a job on such a model failed after its wait in the queue, on the worker.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
HUB_ID_RULE = ("name or org/name as the Hugging Face hub takes it: each part 1-96 ASCII letters, digits and - _ ., "
               "starting and ending with a letter, digit or _, no -- or .., not ending in .git")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
REVISION_RULE = ("a 40-hex commit, a tag or a branch: letters, digits and - _ . /, each part after a / starting "
                 "with a letter or digit, no ..")


def hub_source_problems(hub_id: str, revision: str | None) -> list[tuple[str, str]]:
    """(field, rule) for each of a hub model's hub_id and revision that is not of the allowed form; none where
    both are. The registry checks a model when it is added, the worker before it downloads one (a row from
    before the rule)."""
    problems = []
    if not (_HUB_ID.fullmatch(hub_id) and "--" not in hub_id and ".." not in hub_id and not hub_id.endswith(".git")):
        problems.append(("hub_id", HUB_ID_RULE))
    if revision is not None and not (_REVISION.match(revision) and ".." not in revision):
        problems.append(("revision", REVISION_RULE))
    return problems


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
    if hub_id is not None and (problems := hub_source_problems(hub_id, revision)):
        given = {"hub_id": hub_id, "revision": revision}
        raise Invalid("; ".join(f"{field}: {excerpt(given[field] or '')} is not {rule}" for field, rule in problems),
                      details=field_errors(problems))
    if repository.by_name(session, name):
        raise Conflict(f"a model named {name!r} is already registered")
    if config is None and path is not None and (Path(path) / "config.json").is_file():  # this host sees it
        config = _read_config(Path(path) / "config.json")
    if config is not None:
        try:
            _check_config_values(config)
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
    real_roots = [Path(os.path.realpath(root)) for root in roots]

    def inside(file: Path) -> bool:
        real = Path(os.path.realpath(file))
        return any(real != root and real.is_relative_to(root) for root in real_roots)

    if os.path.lexists(normal):
        if not inside(normal):
            raise refuse("leads out of the model roots through a symbolic link")
        real = Path(os.path.realpath(normal))
        if not real.is_dir():
            raise refuse("is not a directory")
        if not (real / "config.json").is_file():
            raise refuse("has no config.json (a Hugging Face model directory of safetensors weights has one)")
        # The files this host reads from it, each by where it leads: a config.json linked to a JSON file elsewhere
        # on the host was read and served by GET /models to every team, as a linked tokenizer file was kept.
        for name in ("config.json", *TOKENIZER_FILES):
            if os.path.lexists(real / name) and not inside(real / name):
                raise refuse(f"has a {name} that leads out of the model roots through a symbolic link")
    return str(normal)


# A config.json is a few KiB (Gemma 3's, with a type per layer, 3 KiB); it is kept in the registry and served to
# every team by GET /models.
MAX_CONFIG_BYTES = 1024 * 1024


def _read_config(file: Path) -> dict:
    """The config.json of a model directory, read as the database reads JSON back (pydantic_core.from_json, as
    the API's bodies are): Python's json module took a lone surrogate escape and nesting past the database
    reader's limit, and the insert (Postgres) or every later read of the registry failed, a 500."""
    try:
        with file.open("rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES // 1024} KiB; a model's config.json is a few KiB")
        config = from_json(text.removeprefix(codecs.BOM_UTF8))
    except (OSError, ValueError) as exc:
        raise Invalid(f"path: {file} is not a readable JSON file ({excerpt(str(exc), quote=False)})",
                      details=[{"field": "path", "message": "config.json is not readable JSON"}]) from None
    if not isinstance(config, dict):
        raise Invalid(f"path: {file} holds a JSON {type(config).__name__}, not the object a config.json is",
                      details=[{"field": "path", "message": "config.json is not a JSON object"}])
    return config


def _check_config_values(config: dict) -> None:
    """ValueError for what a config.json read from disk may hold and a JSON column may not, or GET /models should
    not serve every team: NaN or Infinity (Python's reader takes them, Postgres refuses them: the insert was a 500)
    and more values than any request body of this API may hold."""
    if more_values_than(config, MAX_JSON_VALUES):
        raise ValueError(f"it holds more than {MAX_JSON_VALUES:,} values; a model's config.json holds a few dozen")
    pending: list = [config]
    while pending:
        value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"it holds {value}, which JSON has no number for; give a finite number")
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


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


def get_model(session: Session, name: str, *, lock: str | None = None) -> RegisteredModel:
    model = repository.by_name(session, name, lock=lock)
    if model is None:
        known = ", ".join(m.name for m in repository.list_all(session)) or "none registered"
        raise NotFound(f"no registered base model {excerpt(name)}; registered: {known}")
    return model


def remove_model(session: Session, name: str, *, force: bool = False) -> None:
    """Remove a model no unfinished job names; with `force`, remove it anyway and end every unfinished job on it
    (end_for_removal). A job names its model by name, and every attempt reads the registry again: removed under
    a queued or paused job, the job failed when a worker took it, after its wait ("base model ... is no longer
    registered"); removed and registered again with other weights, a paused job resumed its adapter on them. The
    row is locked first: a job being created on the model holds it shared until its transaction ends, and its job
    is then counted (or, with `force`, ended)."""
    model = get_model(session, name, lock="update")
    if force:
        for job in jobs.unfinished_on_model_locked(session, name):  # model, then jobs: as a job's creation
            end_for_removal(session, job, name)
    elif unfinished := jobs.unfinished_on_model_any_team(session, name):
        held = ", ".join(f"{count} {status}" for status, count in sorted(unfinished.items()))
        raise Conflict(f"base model {name!r} is in use by jobs that have not finished ({held}); remove it once they "
                       "have (their teams cancel them, or they succeed or fail), so none fails for it or trains on "
                       "another model registered under its name; or remove it now with ?force=true (qlora admin "
                       "remove-model --force), which cancels them: queued and paused ones at once, running ones "
                       "after their current step")
    session.delete(model)
    session.flush()


def end_for_removal(session: Session, job: Job, name: str) -> None:
    """End an unfinished job (its row locked) whose base model an admin removes by force: cancelled, the one end a
    queued or paused job may take, its checkpoints and adapters kept for download as any cancelled job's. A job on
    a GPU is asked to stop as a cancel asks it (cancelling: its worker records cancelled after the current step);
    one cancelling already goes on to its end. The error says why, and stays once the worker records cancelled."""
    error = f"base model {name} was removed by an admin"
    target = states.CANCELS_TO.get(job.status)  # where a team's cancel takes it
    values: dict[str, Any] = {"error": error}
    if target is None:  # cancelling already: it goes on to its end
        return
    if target == states.CANCELLED:
        message = f"cancelled: {error}"
        values["finished_at"] = database_now(session)
    else:
        message = f"cancel requested: {error}; the training process stops, and its worker records it cancelled"
    if jobs.transition(session, job.id, target, only_from=[job.status], **values):  # its row is held: it wins
        jobs.add_event(session, job.id, states.CANCEL_EVENTS[target], "warning", message, attempt=job.attempt)
