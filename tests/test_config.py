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
