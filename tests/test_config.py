"""Settings refuse timings that could give one job two runners, or requeue healthy jobs."""

import pytest

from app.config import Settings


def test_defaults_keep_the_order(tmp_path):
    settings = Settings(home=tmp_path)
    settings.check_timing()
    assert settings.supervise_interval_s * 4 <= settings.heartbeat_deadline_s
    assert settings.job_time_limit_s < settings.task_time_limit_s < settings.visibility_timeout_s
    assert settings.database_url == f"sqlite:///{tmp_path}/qlora.db" and settings.embedded


def test_a_heartbeat_deadline_too_close_to_the_interval_is_refused(tmp_path):
    with pytest.raises(ValueError, match="HEARTBEAT_DEADLINE_S .* at least 4x"):
        Settings(home=tmp_path, supervise_interval_s=5, heartbeat_deadline_s=10).check_timing()


def test_a_worker_database_timeout_that_leaves_no_second_try_is_refused(tmp_path):
    with pytest.raises(ValueError, match="WORKER_DATABASE_TIMEOUT_S .* at most half"):
        Settings(home=tmp_path, worker_database_timeout_s=90).check_timing()
    Settings(home=tmp_path, worker_database_timeout_s=60).check_timing()
    assert Settings(home=tmp_path).database_timeout_s == 30  # derived: a quarter of the 120 s deadline
    assert Settings(home=tmp_path, heartbeat_deadline_s=5).database_timeout_s == 2  # libpq's least


def test_a_visibility_timeout_below_the_task_time_limit_is_refused(tmp_path):
    settings = Settings(home=tmp_path, job_time_limit_s=7200, broker_visibility_timeout_s=3600)
    with pytest.raises(ValueError, match="would hand a running job's message to a second worker"):
        settings.check_timing()


def test_a_redispatch_deadline_below_the_scheduler_interval_is_refused(tmp_path):
    settings = Settings(home=tmp_path, scheduler_interval_s=30, redispatch_after_s=10)
    with pytest.raises(ValueError, match="REDISPATCH_AFTER_S .* at least QLORA_SCHEDULER_INTERVAL_S"):
        settings.check_timing()


def test_an_empty_variable_is_as_if_unset(monkeypatch):
    """`QLORA_HOME=` must not make the current directory the service's home."""
    monkeypatch.setenv("QLORA_HOME", "")
    monkeypatch.setenv("QLORA_PORT", "")
    settings = Settings()
    assert settings.home == Settings.model_fields["home"].default.expanduser() and settings.port == 8000


def test_a_database_url_is_read_in_the_form_hosts_give_or_refused_naming_its_scheme(tmp_path):
    url = "postgresql+psycopg://u:secret@db.internal:5432/qlora"
    for given in ("postgres://u:secret@db.internal:5432/qlora", "postgresql://u:secret@db.internal:5432/qlora", url):
        assert Settings(home=tmp_path, database_url=given).database_url == url
    with pytest.raises(ValueError, match="QLORA_DATABASE_URL must be sqlite:///PATH or postgresql\\+psycopg://") as refused:
        Settings(home=tmp_path, database_url="mysql://u:secret@db/qlora")
    assert "got 'mysql'" in str(refused.value) and "secret" not in str(refused.value)


def test_a_setting_that_cannot_be_used_is_one_line_from_any_command_not_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    from tests.deployment import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    for setting, said in (("QLORA_PORT=abc", "QLORA_PORT: Input should be a valid integer"),
                          ("QLORA_DATABASE_URL=bogus://x", "QLORA_DATABASE_URL must be sqlite:///PATH"),
                          # Settings given as JSON: a value that is not JSON was pydantic-settings' 145-line traceback.
                          ("QLORA_MODEL_ROOTS=/models", "QLORA_MODEL_ROOTS: not JSON: give a JSON list of absolute "
                                                        "directories, e.g. '[\"/models\"]'; got '/models'"),
                          ("QLORA_GPU_CLASSES={l4: 22}", "QLORA_GPU_CLASSES: not JSON: give a JSON object of GiB by class"),
                          # A key inside one is named as a key, not as a variable QLORA_GPU_CLASSES_L4 that does not exist.
                          ('QLORA_GPU_CLASSES={"l4": "big"}', "QLORA_GPU_CLASSES ['l4']: Input should be a valid number"),
                          ("QLORA_PORT=99999", "QLORA_PORT: Input should be less than or equal to 65535")):
        name, value = setting.split("=", 1)
        done = subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, capture_output=True, text=True,
                              env={**env, "QLORA_HOME": str(tmp_path / "home"), name: value}, timeout=60)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_host_memory_is_refused_for_a_class_no_worker_serves_or_a_size_that_is_not_one(tmp_path):
    """QLORA_HOST_MEMORY for a mistyped class would be ignored, and the class's hosts left unchecked."""
    classes = {"gpu_classes": {"l4": 22.49}, "default_gpu_class": "l4"}
    assert Settings(home=tmp_path, host_memory={"l4": 40}, **classes).host_memory == {"l4": 40}
    for given in ({"L4": 40}, {"l4": 0}, {"l4": float("nan")}):
        with pytest.raises(ValueError, match=r"QLORA_HOST_MEMORY must give a positive GiB for classes workers serve \(l4\)"):
            Settings(home=tmp_path, host_memory=given, **classes)
    # A class served by name only, whose jobs are never estimated: accepted, it was never checked.
    with pytest.raises(ValueError, match=r"QLORA_HOST_MEMORY must give a positive GiB .* \(l4\)"):
        Settings(home=tmp_path, host_memory={"a100": 80}, extra_gpu_classes=["a100"], **classes)
    with pytest.raises(ValueError, match="none with its memory in QLORA_GPU_CLASSES"):
        Settings(home=tmp_path, host_memory={"default": 16})


@pytest.mark.parametrize("name", ["run?1", "a%41"])
def test_the_embedded_database_lives_in_its_home_whatever_the_home_is_named(tmp_path, name):
    """SQLAlchemy reads `?` as a URL's query and decodes `%XX`: a home so named had its database URL name another
    file (`run` beside it; `aA/qlora.db`), and the start failed, "unable to open database file"."""
    from sqlalchemy import inspect

    from app.db import engine_for
    from app.migrate import upgrade

    home = tmp_path / name
    home.mkdir()
    url = Settings(home=home).database_url
    upgrade(url)
    assert (home / "qlora.db").is_file() and [p.name for p in tmp_path.iterdir()] == [name]
    assert "jobs" in inspect(engine_for(url)).get_table_names()


def test_a_misspelled_setting_is_refused_naming_what_it_meant_not_ignored(tmp_path, monkeypatch):
    """A scale-out deployment whose QLORA_DATABASE_URL was mistyped: `qlora migrate` migrated a SQLite file in its
    home instead, and `serve --no-worker` made one too (a first start's team, admin key and demo model) and served
    from it."""
    import os
    import subprocess
    import sys

    from tests.deployment import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**env, "QLORA_HOME": str(home), "QLORA_BROKER_URL": "redis://127.0.0.1:1/0",
                               "QLORA_DATABSE_URL": "postgresql+psycopg://u:secret@db/qlora"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "QLORA_DATABSE_URL (did you mean QLORA_DATABASE_URL?): not a setting" in done.stderr
    assert "secret" not in done.stderr and not home.exists()  # no database, key or model made anywhere
    # Any case, as pydantic-settings reads them; the client's variables and the fault tests' are not settings.
    monkeypatch.setenv("qlora_brokr_url", "redis://x")
    with pytest.raises(ValueError, match=r"qlora_brokr_url \(did you mean QLORA_BROKER_URL\?\)"):
        Settings(home=tmp_path)
    monkeypatch.delenv("qlora_brokr_url")
    for name in ("QLORA_URL", "QLORA_API_KEY", "QLORA_MODELS_DIR", "QLORA_FAULT_HOLD_END"):
        monkeypatch.setenv(name, "1")
    Settings(home=tmp_path)
