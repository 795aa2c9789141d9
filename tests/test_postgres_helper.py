from __future__ import annotations

import os
import typing as t

import pytest
import sqlalchemy as sa

from _postgres import ThrowawayPostgres

pytestmark = pytest.mark.postgres


def require_postgres() -> None:
    reason = ThrowawayPostgres.available()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests, but: {reason}")
        pytest.skip(reason)


@pytest.fixture
def pg() -> t.Iterator[ThrowawayPostgres]:
    require_postgres()
    with ThrowawayPostgres() as server:
        yield server


def select_one(engine: sa.Engine) -> int | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("select 1")).scalar()


def test_stop_and_restart_keep_url_and_data(pg: ThrowawayPostgres) -> None:
    url = pg.url
    assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    engine = sa.create_engine(url)
    try:
        assert select_one(engine) == 1
        with engine.begin() as conn:
            conn.execute(sa.text("create table kept (n int)"))
            conn.execute(sa.text("insert into kept values (7)"))

        pg.stop()
        engine.dispose()
        with pytest.raises(sa.exc.OperationalError):
            select_one(engine)

        pg.start()
        assert pg.url == url
        engine.dispose()
        assert select_one(engine) == 1
        with engine.connect() as conn:
            assert conn.execute(sa.text("select n from kept")).scalar() == 7
    finally:
        engine.dispose()


def test_create_database_and_psql(pg: ThrowawayPostgres) -> None:
    url = pg.create_database("sidelog_other")
    assert url.endswith("/sidelog_other")
    engine = sa.create_engine(url)
    try:
        assert select_one(engine) == 1
    finally:
        engine.dispose()
    rows = pg.psql(
        "select datname from pg_database where datname = %s", ["sidelog_other"]
    )
    assert rows == [("sidelog_other",)]
    assert pg.psql("show max_connections") == [("200",)]
    assert pg.psql("show synchronous_commit") == [("on",)]


def test_cleanup_removes_directory_and_stops_server() -> None:
    require_postgres()
    with ThrowawayPostgres() as pg:
        base = pg.base
        assert base is not None and os.path.isdir(base)
        engine = sa.create_engine(pg.url)
        assert select_one(engine) == 1
    engine.dispose()
    assert not os.path.exists(base)
    with pytest.raises(sa.exc.OperationalError):
        select_one(engine)
    engine.dispose()
