"""`qlora admin`: teams, keys (printed once, stored hashed, revocable) and the model registry."""

from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.teams.service import Caller, authenticate, hash_key
from app.teams.tables import ApiKey
from tests.deployment import ROOT


def qlora(home, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")} | {"QLORA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_admin_commands_manage_teams_keys_and_models(tmp_path, tiny_model_dir):
    assert qlora(tmp_path, "migrate").returncode == 0
    assert qlora(tmp_path, "admin", "create-team", "research").returncode == 0
    duplicate = qlora(tmp_path, "admin", "create-team", "research")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr

    made = qlora(tmp_path, "admin", "create-key", "research")
    key = made.stdout.strip()  # stdout holds the key alone, for scripts
    assert made.returncode == 0 and key.startswith("qlk_") and len(key) > 40

    url = Settings(home=tmp_path).database_url
    with session_scope(url) as session:
        stored = session.scalars(select(ApiKey)).one()
        assert key not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64  # only a hash
        assert isinstance(authenticate(session, hash_key(key)), Caller)
    listed = qlora(tmp_path, "admin", "list-keys", "research")
    assert stored.prefix in listed.stdout and key not in listed.stdout

    assert qlora(tmp_path, "admin", "revoke-key", stored.prefix).returncode == 0
    with session_scope(url) as session:
        from app.errors import Unauthorized

        try:
            authenticate(session, hash_key(key))
            raise AssertionError("a revoked key still authenticates")
        except Unauthorized:
            pass

    assert qlora(tmp_path, "admin", "add-model", "tiny", "--path", str(tiny_model_dir)).returncode == 0
    assert "tiny" in qlora(tmp_path, "admin", "list-models").stdout
    no_revision = qlora(tmp_path, "admin", "add-model", "hubbed", "--hub-id", "org/model")
    assert no_revision.returncode == 1 and "needs a revision" in no_revision.stderr


def test_a_database_not_made_yet_is_said_plainly_and_migrate_makes_the_home(tmp_path):
    """Before the first `qlora serve`, QLORA_HOME does not exist: an admin command says the database cannot
    be used and what makes it (it was a page of traceback), and `qlora migrate` makes the home and the schema."""
    home = tmp_path / "not-yet"
    refused = qlora(home, "admin", "create-team", "research")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"the database sqlite:///{home}/qlora.db cannot be used: unable to open database file" in refused.stderr
    assert "`qlora migrate`" in refused.stderr
    assert qlora(home, "migrate").returncode == 0 and (home / "qlora.db").is_file()
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    assert qlora(home, "admin", "create-team", "research").returncode == 0
