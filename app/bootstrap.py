"""First start of the embedded default: schema, a team with a key the CLI can find, the demo model.

Safe to run on every start: each step only does what is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from app.config import Settings
from app.db import session_scope
from app.migrate import upgrade
from app.models import repository as models
from app.models import service as models_service
from app.teams import repository as teams
from app.teams import service as teams_service
from worker.training.protocol import write_json_atomic

DEMO_TEAM = "default"
DEMO_MODEL = "tiny-demo"


def bootstrap_embedded(settings: Settings, announce: Callable[[str], object],
                       build_demo_model: Callable[[Path], object]) -> None:
    """build_demo_model(path) writes the demo model to path; it is given by the caller (`qlora serve`
    passes the engine's tiny model), so the API side never imports the engine."""
    make_private_dir(settings.home)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        if teams.team_by_name(session, DEMO_TEAM) is None:
            teams_service.create_team(session, DEMO_TEAM)
            _, key = teams_service.create_key(session, DEMO_TEAM, admin=True)
            write_credentials(settings, key)
            announce(f"created team {DEMO_TEAM!r}; its admin API key (shown once, saved to "
                     f"{settings.credentials_path}):\n  {key}")
        else:
            _readdress_credentials(settings, announce)
        if models.by_name(session, DEMO_MODEL) is None:
            path = settings.home / "models" / DEMO_MODEL
            if not (path / "config.json").exists():
                announce(f"building the tiny demo model in {path} (a few seconds, nothing is downloaded)")
                build_demo_model(path)
            models_service.add_model(session, DEMO_MODEL, path=str(path), roots=[settings.home / "models"],
                                     description="a ~4M-parameter Llama-architecture model built offline, for trying things out")


def make_private_dir(path: Path) -> None:
    """QLORA_HOME holds the database, every stored file and the admin key: its owner's alone (0700).
    Created so, and narrowed when an earlier version (or a umask of 022) left it open to others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            path.chmod(0o700)


def write_credentials(settings: Settings, key: str) -> Path:
    path = settings.credentials_path
    make_private_dir(path.parent)
    # A bearer key: readable by its owner only, from the file's creation on.
    write_json_atomic(path, {"url": api_url(settings), "api_key": key}, indent=2, mode=0o600)
    return path


def api_url(settings: Settings) -> str:
    """Where this serve's API answers, as the CLI finds it in the credentials file."""
    return f"http://{settings.host}:{settings.port}"


def _readdress_credentials(settings: Settings, announce: Callable[[str], object]) -> None:
    """A later start on another port (the first one's taken, `--port`, QLORA_PORT) writes its address beside the
    first start's key. The file kept the first start's, so every `qlora` command after `qlora serve --port 8001`
    went to the old port: "cannot reach the API at http://127.0.0.1:8000". A file that is not this shape (edited,
    or its key gone) is left as it is: the key cannot be made again."""
    path = settings.credentials_path
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("api_key"), str) or saved.get("url") == api_url(settings):
        return
    write_credentials(settings, saved["api_key"])
    announce(f"the API's address is now {api_url(settings)} (it was {saved.get('url')}): saved to {path} for the CLI")
