from __future__ import annotations

import contextlib
import os
import threading
import typing as t
import uuid

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import Flask
from flask.testing import FlaskClient
from flask.testing import FlaskCliRunner
from flask_sqlalchemy import SQLAlchemy

from _postgres import ThrowawayPostgres
from flask_sidelog import SideLog
from flask_sidelog.signals import entry_failed

BACKENDS = ("sqlite_file", "sqlite_memory", "postgres")


@pytest.fixture(scope="session")
def postgres() -> t.Iterator[ThrowawayPostgres]:
    """One throwaway PostgreSQL server for the whole run."""
    reason = ThrowawayPostgres.available()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests, but: {reason}")
        pytest.skip(f"no PostgreSQL here: {reason}")
    with ThrowawayPostgres() as server:
        yield server


def new_database_uri(
    backend: str, tmp_path: t.Any, request: pytest.FixtureRequest
) -> str:
    """A fresh, empty database of ``backend``."""
    if backend == "sqlite_file":
        return f"sqlite:///{tmp_path / f'app-{uuid.uuid4().hex[:8]}.db'}"
    if backend == "sqlite_memory":
        return "sqlite://"
    server: ThrowawayPostgres = request.getfixturevalue("postgres")
    return server.create_database(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


@pytest.fixture
def database_uri(backend: str, tmp_path: t.Any, request: pytest.FixtureRequest) -> str:
    return new_database_uri(backend, tmp_path, request)


class Base(sa_orm.DeclarativeBase):
    pass


def make_app(
    database_uri: str,
    instance_path: str,
    config: dict[str, t.Any] | None = None,
    with_db: bool = True,
) -> tuple[Flask, SQLAlchemy | None, SideLog]:
    """An app with Flask-SQLAlchemy (unless ``with_db`` is false) and SideLog."""
    app = Flask("sidelog_test", instance_path=instance_path)
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=database_uri,
        SIDELOG_CREATE_TABLE=True,
    )
    app.config.update(config or {})
    sidelog = SideLog()
    db: SQLAlchemy | None = None
    if with_db:
        db = SQLAlchemy()
        db.init_app(app)
    sidelog.init_app(app, db)
    return app, db, sidelog


def dispose(app: Flask) -> None:
    """Close every pool the app opened, so no connection outlives its test."""
    with app.app_context():
        state = app.extensions["sidelog"]
        state.dispose()
        db = app.extensions.get("sqlalchemy")
        if db is not None:
            for engine in db.engines.values():
                engine.dispose()


class Account(Base):
    __tablename__ = "account"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(80), unique=True)
    balance: sa_orm.Mapped[int] = sa_orm.mapped_column(default=0)


@pytest.fixture
def app_and_ext(
    database_uri: str, tmp_path: t.Any
) -> t.Iterator[tuple[Flask, SQLAlchemy, SideLog]]:
    app, db, sidelog = make_app(database_uri, str(tmp_path / "instance"))
    assert db is not None
    with app.app_context():
        Base.metadata.create_all(db.engine)
    yield app, db, sidelog
    dispose(app)


@pytest.fixture
def app(app_and_ext: tuple[Flask, SQLAlchemy, SideLog]) -> Flask:
    return app_and_ext[0]


@pytest.fixture
def db(app_and_ext: tuple[Flask, SQLAlchemy, SideLog]) -> SQLAlchemy:
    return app_and_ext[1]


@pytest.fixture
def sidelog(app_and_ext: tuple[Flask, SQLAlchemy, SideLog]) -> SideLog:
    return app_and_ext[2]


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


def run_threads(count: int, target: t.Callable[[int], None]) -> None:
    """Run ``target(i)`` in ``count`` threads named ``caller-<i>`` and wait
    for them all (at most 60 s each); none may be left running."""
    threads = [
        threading.Thread(target=target, args=(i,), name=f"caller-{i}")
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)


@contextlib.contextmanager
def failures(app: Flask) -> t.Iterator[list[BaseException]]:
    """Within the block, collect the errors of ``app``'s entries that could
    not be written (``entry_failed``)."""
    failed: list[BaseException] = []
    with entry_failed.connected_to(
        lambda sender, entry, error: failed.append(error), app
    ):
        yield failed
