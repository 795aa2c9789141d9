"""Behaviours 3 and 4 of the core: the log never touches the main session's
work, and it has a connection pool of its own."""

from __future__ import annotations

import threading
import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy

from conftest import Account
from conftest import dispose
from conftest import make_app
from conftest import new_database_uri
from conftest import run_threads
from flask_sidelog import SideLog
from flask_sidelog.signals import entry_failed


@pytest.fixture
def failures_of() -> t.Iterator[t.Callable[[Flask], list[BaseException]]]:
    """``failures_of(app)``: the errors of the entries ``app`` failed to write."""
    found: list[BaseException] = []

    def record(sender: Flask, entry: dict[str, t.Any], error: BaseException) -> None:
        found.append(error)

    def connect(app: Flask) -> list[BaseException]:
        entry_failed.connect(record, app)
        return found

    yield connect
    entry_failed.disconnect(record)


@pytest.fixture
def failures(
    app: Flask, failures_of: t.Callable[[Flask], list[BaseException]]
) -> list[BaseException]:
    return failures_of(app)


def names(app: Flask, db: SQLAlchemy) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(sa.select(Account.name).order_by(Account.id)))


def test_log_commit_does_not_commit_main_work(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    failures: list[BaseException],
    backend: str,
) -> None:
    """On every backend, including sqlite:// whose main session shares one
    connection: the log commits, the main work still rolls back."""

    @app.post("/")
    @sidelog.audit
    def view() -> str:
        db.session.add(Account(name="pending"))
        db.session.flush()
        sidelog.log("first")
        if backend != "sqlite_file":  # refused there: see test_extension
            with sidelog.log_session() as s:
                s.execute(sa.select(1))
        sidelog.log("second")
        db.session.rollback()
        return "ok"

    client.post("/")
    assert names(app, db) == []
    with app.app_context():
        assert [e["event"] for e in sidelog.entries()] == ["first", "second", "view"]
    assert failures == []


def test_log_session_close_does_not_discard_main_work(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    failures: list[BaseException],
    backend: str,
) -> None:
    @app.post("/")
    @sidelog.audit
    def view() -> str:
        db.session.add(Account(name="kept"))
        db.session.flush()
        sidelog.log("during")
        if backend != "sqlite_file":  # refused there: see test_extension
            with sidelog.log_session() as s:
                s.execute(sa.select(1))
        db.session.commit()
        return "ok"

    client.post("/")
    assert names(app, db) == ["kept"]
    with app.app_context():
        entries = sidelog.entries()
    assert [e["event"] for e in entries] == ["during", "view"]
    assert entries[-1]["main_tx"] == "committed"
    assert failures == []


def test_log_uses_other_connections(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    main_connections: list[t.Any] = []

    @app.post("/")
    @sidelog.audit
    def view() -> str:
        db.session.add(Account(name="a"))
        db.session.flush()
        main_connections.append(db.session.connection().connection.dbapi_connection)
        sidelog.log("during")
        db.session.commit()
        return "ok"

    with app.app_context():
        log_engine = app.extensions["sidelog"].writer.engine
        assert log_engine is not db.engine
        assert log_engine.pool is not db.engine.pool
    log_connections: list[t.Any] = []
    sa.event.listen(
        log_engine, "checkout", lambda dbapi, rec, proxy: log_connections.append(dbapi)
    )
    client.post("/")
    # at least the log() call and the audit entry (plus creating the table)
    assert len(log_connections) >= 2
    assert not any(c is main_connections[0] for c in log_connections)


def test_sqlite_same_file_never_waits_for_the_lock(
    tmp_path: t.Any, failures_of: t.Callable[[Flask], list[BaseException]]
) -> None:
    """The main session holds SQLite's write lock after its flush: entries
    logged meanwhile are written once it let go, none fails with
    'database is locked' (the busy timeout is cut to 0.5 s to make a wait fail)."""
    uri = f"sqlite:///{tmp_path / 'same.db'}"
    app, db, sidelog = make_app(uri, str(tmp_path), {"SIDELOG_WRITE_TIMEOUT": 0.5})
    assert db is not None
    errors = failures_of(app)
    with app.app_context():
        Account.metadata.create_all(db.engine)

    @app.post("/")
    @sidelog.audit
    def view() -> str:
        db.session.add(Account(name="locked"))
        db.session.flush()  # takes the write lock
        sidelog.log("while.locked", data={"n": 1})
        raise ValueError("after the flush")

    with pytest.raises(ValueError):
        app.test_client().post("/")
    with app.app_context():
        entries = sidelog.entries()
        assert db.session.scalars(sa.select(Account)).all() == []
    dispose(app)
    assert errors == []
    assert [e["event"] for e in entries] == ["while.locked", "view"]
    assert entries[-1]["main_tx"] == "rolled_back"


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_own_pool_under_concurrency(
    backend: str, tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    """Main pool: 2 connections, no overflow. 16 concurrent requests each hold
    a main connection while they log: all succeed, 16 + 16 entries land."""
    uri = new_database_uri(backend, tmp_path, request)
    app, db, sidelog = make_app(
        uri,
        str(tmp_path),
        {"SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 2, "max_overflow": 0}},
    )
    assert db is not None
    with app.app_context():
        Account.metadata.create_all(db.engine)
        sidelog.create_table()

    @app.post("/<name>")
    @sidelog.audit("account.create")
    def create(name: str) -> str:
        db.session.execute(sa.select(1))  # hold a main connection
        sidelog.log("account.creating", data={"name": name})
        time.sleep(0.02)
        db.session.add(Account(name=name))
        db.session.commit()
        return name

    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def call(i: int) -> None:
        start.wait()
        status = app.test_client().post(f"/user{i}").status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert statuses == [200] * 16
        with app.app_context():
            entries = sidelog.entries(limit=100)
            assert len(db.session.scalars(sa.select(Account)).all()) == 16
        assert len(entries) == 32
        audits = [e for e in entries if e["event"] == "account.create"]
        assert len(audits) == 16
        assert {e["main_tx"] for e in audits} == {"committed"}
        assert len({e["request_id"] for e in entries}) == 16
    finally:
        dispose(app)


def test_sqlite_connection_level_write_is_waited_for(
    tmp_path: t.Any, failures_of: t.Callable[[Flask], list[BaseException]]
) -> None:
    """A write the session's events do not see (straight on its connection)
    holds the lock all the same: the entry waits for it, none fails."""
    app, db, sidelog = make_app(
        f"sqlite:///{tmp_path / 'same.db'}",
        str(tmp_path),
        {"SIDELOG_WRITE_TIMEOUT": 0.5},
    )
    assert db is not None
    errors = failures_of(app)
    with app.app_context():
        Account.metadata.create_all(db.engine)

    @app.post("/")
    @sidelog.audit
    def view() -> str:
        db.session.connection().execute(sa.insert(Account).values(name="raw"))
        sidelog.log("after.raw.insert")
        db.session.commit()
        return "ok"

    assert app.test_client().post("/").status_code == 200
    with app.app_context():
        assert [e["event"] for e in sidelog.entries()] == ["after.raw.insert", "view"]
        assert db.session.scalars(sa.select(Account.name)).all() == ["raw"]
    dispose(app)
    assert errors == []


@pytest.mark.parametrize("backend", ["sqlite_file", "sqlite_memory"])
def test_log_inside_log_session_waits_for_it(
    app: Flask, sidelog: SideLog, failures: list[BaseException]
) -> None:
    """On SQLite the log_session holds the log database: an entry logged
    inside it is written when it ends, and its rollback does not take the
    entry with it."""
    with app.app_context():
        with sidelog.log_session() as s:
            s.execute(sa.text("CREATE TABLE note (text VARCHAR(20))"))
        with pytest.raises(KeyError), sidelog.log_session() as s:
            s.execute(sa.text("INSERT INTO note VALUES ('rolled back')"))
            sidelog.log("inside.log_session")
            raise KeyError("abandon")
        assert [e["event"] for e in sidelog.entries()] == ["inside.log_session"]
        with sidelog.log_session() as s:
            notes = s.execute(sa.text("SELECT text FROM note")).all()
    assert notes == []
    assert failures == []


@pytest.mark.parametrize("backend", ["postgres"])
def test_first_writes_racing_to_create_the_table(
    app: Flask, sidelog: SideLog, failures: list[BaseException]
) -> None:
    """SIDELOG_CREATE_TABLE on PostgreSQL, 8 threads writing first at once."""
    start = threading.Barrier(8)

    def write(i: int) -> None:
        with app.app_context():
            start.wait()
            sidelog.log("first", data={"i": i})

    run_threads(8, write)
    with app.app_context():
        assert sorted(e["data"]["i"] for e in sidelog.entries()) == list(range(8))
    assert failures == []


def test_log_tables_have_no_foreign_keys(
    app: Flask, db: SQLAlchemy, sidelog: SideLog
) -> None:
    """A log row referencing a row the main transaction holds locked would
    wait on its own request, a deadlock no database sees: the log's tables
    reference nothing, as created in the database."""
    with app.app_context():
        sidelog.create_table()
        state = app.extensions["sidelog"]
        with state.writer.engine.connect() as conn:
            inspector = sa.inspect(conn)
            tables = [state.table.name, f"{state.table.name}_checkpoints"]
            assert all(inspector.has_table(name) for name in tables)
            assert [inspector.get_foreign_keys(name) for name in tables] == [[], []]
