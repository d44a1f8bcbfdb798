"""One engine per database URL in a process (app/db.py): what engine_for(url) names is the engine the sessions of
sessionmaker_for(url) run on, however many other databases the process has opened since."""

from __future__ import annotations

from sqlalchemy import event, text

from app.db import engine_for, session_scope, sessionmaker_for


def test_a_url_in_use_keeps_the_engine_its_sessions_use_however_many_databases_come_after(tmp_path):
    """A test process opens a database per test while it uses its session's deployment all along. Its sessions kept
    that URL fresh in sessionmaker_for's cache, not in engine_for's: past 128 other databases engine_for(url) made a
    second engine, and a listener put on it (a test counting a job feed's statements) heard none of the statements
    the sessions sent: the shared-poll stream test failed so in CI and in two full runs."""
    url = f"sqlite:///{tmp_path / 'in-use.db'}"
    others = [f"sqlite:///{tmp_path / f'other-{i}.db'}" for i in range(300)]
    for other in others:
        for used in (other, url):
            with session_scope(used) as session:
                session.execute(text("SELECT 1"))

    heard: list[str] = []

    def hear(_conn, _cursor, statement: str, *_args) -> None:
        heard.append(statement)

    engine = engine_for(url)
    event.listen(engine, "before_cursor_execute", hear)
    try:
        with session_scope(url) as session:
            session.execute(text("SELECT 2"))
    finally:
        event.remove(engine, "before_cursor_execute", hear)
    assert sessionmaker_for(url).kw["bind"] is engine
    assert heard == ["SELECT 2"]
    for used in (*others, url):
        engine_for(used).dispose()
