"""Cases 1 to 5: outages, a killed connection, a killed process, a locked
table and load. Nothing is lost: each entry is in the table or the spool,
and after replay in the table exactly once.

The figures these tests print (run with ``-s``) are measurements for the
docs, not assertions; the one time bound is a generous guard against a hang.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import abort
from flask import Flask

import flask_sidelog
from _postgres import ThrowawayPostgres
from conftest import Account
from conftest import Base
from conftest import dispose
from conftest import make_app
from flask_sidelog import SideLog
from flask_sidelog.model import make_entries_table

TESTS = os.path.dirname(os.path.abspath(__file__))
AUDITED = ("test.ok", "test.fail", "test.boom")


def spooled(path: str) -> list[dict[str, t.Any]]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def stored(uri: str) -> list[dict[str, t.Any]]:
    """Every row of the entries table at ``uri``."""
    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:
            table = make_entries_table("sidelog_entries")
            return [dict(r) for r in conn.execute(sa.select(table)).mappings()]
    finally:
        engine.dispose()


def create_tables(main_uri: str, log_uri: str | None) -> None:
    for uri, metadata in (
        (main_uri, Base.metadata),
        (log_uri, make_entries_table("sidelog_entries").metadata),
    ):
        if uri is not None:
            engine = sa.create_engine(uri)
            metadata.create_all(engine)
            engine.dispose()


def closed_port() -> int:
    """A port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: t.Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def server_env(
    main_uri: str, log_uri: str, instance: str, **extra: str
) -> dict[str, str]:
    """The environment of a server process: the flask_sidelog this test
    imported (the checkout or the installed wheel), and the test app's settings."""
    package_parent = os.path.dirname(os.path.dirname(flask_sidelog.__file__))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_parent, TESTS]),
        "SIDELOG_TEST_MAIN_URI": main_uri,
        "SIDELOG_TEST_LOG_URI": log_uri,
        "SIDELOG_TEST_INSTANCE": instance,
        **extra,
    }


def request(conn: http.client.HTTPConnection, path: str) -> tuple[int, str]:
    """POST ``path``; the status and the request id the app answered with."""
    conn.request("POST", path)
    response = conn.getresponse()
    response.read()
    return response.status, response.headers["X-Request-ID"]


@pytest.mark.slow
def test_1_log_database_stopped_and_started_mid_run(tmp_path: t.Any) -> None:
    with ThrowawayPostgres() as pg:
        log_uri = pg.create_database("log")
        main_uri = f"sqlite:///{tmp_path / 'main.db'}"
        create_tables(main_uri, log_uri)
        app, db, sidelog = make_app(
            main_uri,
            str(tmp_path / "instance"),
            {
                "SIDELOG_DATABASE_URI": log_uri,
                "SIDELOG_CREATE_TABLE": False,
                "SIDELOG_WRITE_TIMEOUT": 2,
                "SIDELOG_REQUEST_ID_RESPONSE_HEADER": "X-Request-ID",
            },
        )
        assert db is not None

        @app.post("/pay")
        @sidelog.audit("pay")
        def pay() -> str:
            db.session.add(Account(name=os.urandom(8).hex()))
            db.session.commit()
            sidelog.log("pay.done")
            return "paid"

        answers: list[tuple[int, str, str, float]] = []
        stop = threading.Event()

        def run() -> None:
            client = app.test_client()
            while not stop.is_set():
                started = time.perf_counter()
                r = client.post("/pay")
                elapsed = time.perf_counter() - started
                answers.append(
                    (r.status_code, r.text, r.headers["X-Request-ID"], elapsed)
                )

        runner = threading.Thread(target=run)
        runner.start()
        try:
            wait_until(lambda: len(answers) >= 30)
            began = time.perf_counter()
            pg.stop()
            first_down = len(answers)
            wait_until(lambda: len(answers) >= first_down + 30)
            pg.start()
            outage = time.perf_counter() - began
            first_up = len(answers)
            wait_until(lambda: len(answers) >= first_up + 30)
        finally:
            stop.set()
            runner.join()

        assert {(status, text) for status, text, _, _ in answers} == {(200, "paid")}
        ids = [rid for _, _, rid, _ in answers]
        assert len(set(ids)) == len(ids)
        spool_path = app.extensions["sidelog"].settings.spool_path
        in_spool = spooled(spool_path)
        in_table = stored(log_uri)
        assert len({e["request_id"] for e in in_spool}) >= 30 - 1
        found = collections.Counter(e["request_id"] for e in in_table + in_spool)
        assert set(found) == set(ids)
        assert all(found[rid] >= 2 for rid in ids)

        result = app.test_cli_runner().invoke(args=["sidelog", "replay"])
        assert result.exit_code == 0, result.output
        again = app.test_cli_runner().invoke(args=["sidelog", "replay"])
        assert again.output.startswith("Moved 0 entries")
        rows = stored(log_uri)
        assert len(rows) == 2 * len(ids)
        assert len({r["uuid"] for r in rows}) == len(rows)
        per_request = collections.Counter(r["request_id"] for r in rows)
        assert set(per_request.values()) == {2}
        assert set(per_request) == set(ids)
        assert spooled(spool_path) == []
        spooled_at = {e["uuid"]: e["created_at"] for e in in_spool}
        assert all(
            r["created_at"].isoformat() == spooled_at[r["uuid"]]
            for r in rows
            if r["uuid"] in spooled_at
        )

        # pool_pre_ping: the pool's connections died with the restart; the
        # first entry after it still reaches the table.
        pg.stop()
        pg.start()
        assert app.test_client().post("/pay").status_code == 200
        assert len(stored(log_uri)) == len(rows) + 2
        assert spooled(spool_path) == []
        dispose(app)

    slowest = max(elapsed for *_, elapsed in answers[first_down:first_up])
    print(
        f"\ncase 1: {len(answers)} requests, {first_up - first_down} during an outage"
        f" of {outage:.2f} s; slowest request during it {slowest * 1000:.0f} ms;"
        f" {len(in_spool)} entries spooled, {result.output.strip()}"
    )


@pytest.mark.parametrize("then", ["commit", "answer"])
def test_2_main_connection_killed_mid_request(
    postgres: ThrowawayPostgres, tmp_path: t.Any, then: str
) -> None:
    """The main session's connection dies after a flush. ``commit``: the
    view's commit raises, a 500. ``answer``: the view answers without the
    database, and Flask-SQLAlchemy's teardown raises as it closes the
    session, which Flask lets skip the teardowns after it; the entry is still
    written, then the error goes on to the server (a 500) as before."""
    uri = postgres.create_database(f"t_kill_{os.urandom(4).hex()}")
    app, db, sidelog = make_app(uri, str(tmp_path / "instance"))
    assert db is not None
    app.testing = False  # the error becomes a 500, as in production
    with app.app_context():
        Base.metadata.create_all(db.engine)

    @app.post("/transfer")
    @sidelog.audit("transfer")
    def transfer() -> str:
        db.session.add(Account(name="half-done"))
        db.session.flush()
        pid = db.session.scalar(sa.select(sa.func.pg_backend_pid()))
        postgres.psql(
            "SELECT pg_terminate_backend(%s)", [pid], dbname=uri.rsplit("/")[-1]
        )
        if then == "answer":
            abort(409)
        db.session.commit()
        return "done"

    @app.get("/after")
    @sidelog.audit("after")
    def after() -> str:
        return str(db.session.scalar(sa.select(sa.func.count(Account.id))))

    client = app.test_client()
    if then == "commit":
        assert client.post("/transfer").status_code == 500
    else:
        with pytest.raises(sa.exc.OperationalError):
            client.post("/transfer")  # the server answers 500
    assert client.get("/after").text == "0"
    with app.app_context():
        killed, following = sidelog.entries()
    assert killed["event"] == "transfer"
    assert (killed["outcome"], killed["status_code"]) == ("error", 500)
    assert killed["main_tx"] == "rolled_back"
    assert killed["error"].startswith("sqlalchemy.exc.OperationalError: ")
    assert (following["event"], following["outcome"]) == ("after", "success")
    assert not os.path.exists(app.extensions["sidelog"].settings.spool_path)
    dispose(app)


@pytest.mark.slow
@pytest.mark.parametrize("log_database", ["up", "unreachable"])
def test_3_sigkill_right_after_a_response(
    postgres: ThrowawayPostgres, tmp_path: t.Any, log_database: str
) -> None:
    main_uri = f"sqlite:///{tmp_path / 'main.db'}"
    if log_database == "up":
        log_uri = postgres.create_database(f"t_sigkill_{os.urandom(4).hex()}")
    else:
        log_uri = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/nowhere"
    create_tables(main_uri, log_uri if log_database == "up" else None)
    instance = str(tmp_path / "instance")
    with (
        open(tmp_path / "server.log", "w") as errors,
        subprocess.Popen(
            [sys.executable, os.path.join(TESTS, "_reliability_app.py")],
            env=server_env(main_uri, log_uri, instance),
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        ) as server,
    ):
        try:
            port = int(t.cast(t.IO[str], server.stdout).readline())
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            expected = {}
            for path, events in (
                ("/ok", ["test.ok.done", "test.ok"]),
                ("/fail/403", ["test.fail"]),
                ("/boom", ["test.boom"]),
                ("/ok", ["test.ok.done", "test.ok"]),
            ):
                _, request_id = request(conn, path)
                expected[request_id] = sorted(events)
            # Right after the last response: no teardown or cleanup gets to run.
            os.kill(server.pid, signal.SIGKILL)
            conn.close()
        finally:
            server.kill()
    assert server.returncode == -signal.SIGKILL

    entries = spooled(os.path.join(instance, "sidelog-spool.jsonl"))
    if log_database == "up":
        entries += stored(log_uri)
    found: dict[str, list[str]] = collections.defaultdict(list)
    for entry in entries:
        found[entry["request_id"]].append(entry["event"])
    assert {rid: sorted(events) for rid, events in found.items()} == expected


def home_app(tmp_path: t.Any, log_uri: str | None = None) -> tuple[Flask, SideLog]:
    """An app with SIDELOG_WRITE_TIMEOUT=1 and an audited ``GET /``; the main
    database is SQLite, the log database ``log_uri`` (default: the main one)."""
    app, _, sidelog = make_app(
        f"sqlite:///{tmp_path / 'main.db'}",
        str(tmp_path / "instance"),
        {"SIDELOG_DATABASE_URI": log_uri, "SIDELOG_WRITE_TIMEOUT": 1},
    )

    @app.get("/")
    @sidelog.audit("home")
    def home() -> str:
        return "home"

    return app, sidelog


@pytest.fixture
def locked_parts(
    postgres: ThrowawayPostgres, tmp_path: t.Any
) -> t.Iterator[tuple[Flask, SideLog, str]]:
    uri = postgres.create_database(f"t_lock_{os.urandom(4).hex()}")
    app, sidelog = home_app(tmp_path, uri)
    with app.app_context():
        sidelog.create_table()
    yield app, sidelog, uri.rsplit("/")[-1]
    dispose(app)


def answered_and_spooled(app: Flask) -> float:
    """Send one request; check it is answered and its entry spooled; return
    how long it took."""
    started = time.perf_counter()
    response = app.test_client().get("/")
    elapsed = time.perf_counter() - started
    assert response.text == "home"
    (entry,) = spooled(app.extensions["sidelog"].settings.spool_path)
    assert entry["event"] == "home"
    assert elapsed < 1 + 10  # a hang guard, not a speed target
    return elapsed


@pytest.mark.parametrize("hold", ["lock_table", "slow_statement"])
def test_4_locked_table_or_slow_statement_is_bounded_by_the_timeout(
    postgres: ThrowawayPostgres,
    locked_parts: tuple[Flask, SideLog, str],
    hold: str,
) -> None:
    """SIDELOG_WRITE_TIMEOUT=1 becomes lock_timeout and statement_timeout."""
    import psycopg

    app, sidelog, dbname = locked_parts
    with psycopg.connect(postgres.conninfo(dbname)) as other:
        if hold == "lock_table":
            other.execute("LOCK TABLE sidelog_entries IN ACCESS EXCLUSIVE MODE")
        else:
            other.execute(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$;"
                " CREATE TRIGGER slow BEFORE INSERT ON sidelog_entries"
                " FOR EACH ROW EXECUTE FUNCTION slow()"
            )
            other.commit()
        elapsed = answered_and_spooled(app)
        other.rollback()
        other.execute("DROP TRIGGER IF EXISTS slow ON sidelog_entries")
        other.commit()
    with app.app_context():
        assert sidelog.replay().moved == 1
        assert [e["event"] for e in sidelog.entries()] == ["home"]
    print(f"\ncase 4 ({hold}, timeout 1 s): request answered in {elapsed:.2f} s")


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_4_a_request_waits_out_the_timeout_once(
    postgres: ThrowawayPostgres, tmp_path: t.Any, mode: str
) -> None:
    """A view that logs three times while the table is locked waits for its
    first entry only; the rest of the request's entries go to the spool
    without trying. The next request tries again, and so does this context
    once the timeout has passed since the failure."""
    import psycopg

    uri = postgres.create_database(f"t_once_{os.urandom(4).hex()}")
    app, _, sidelog = make_app(
        f"sqlite:///{tmp_path / 'main.db'}",
        str(tmp_path / "instance"),
        {
            "SIDELOG_DATABASE_URI": uri,
            "SIDELOG_WRITE_TIMEOUT": 1,
            "SIDELOG_WRITE_MODE": mode,
        },
    )

    @app.get("/")
    @sidelog.audit("home")
    def home() -> str:
        for n in range(3):
            sidelog.log("step", data={"n": n})
        return "home"

    errors: list[tuple[str, Exception]] = []

    def on_failed(sender: Flask, entry: dict[str, t.Any], error: Exception) -> None:
        errors.append((entry["event"], error))

    with app.app_context():
        sidelog.create_table()
    with (
        flask_sidelog.signals.entry_failed.connected_to(on_failed, app),
        psycopg.connect(postgres.conninfo(uri.rsplit("/")[-1])) as other,
    ):
        other.execute("LOCK TABLE sidelog_entries IN ACCESS EXCLUSIVE MODE")
        assert app.test_client().get("/").text == "home"
        with app.app_context():
            sidelog.log("job", data={"n": 1})
            time.sleep(1.1)
            sidelog.log("job", data={"n": 2})
        other.rollback()
    assert [event for event, _ in errors] == ["step", "step", "step", "home"] + [
        "job",
        "job",
    ]
    tried = [not isinstance(e, flask_sidelog.writer.NotSent) for _, e in errors]
    assert tried == [True, False, False, False, True, True]
    assert isinstance(errors[0][1], sa.exc.OperationalError)
    assert "it waits for the log database once" in str(errors[1][1])

    assert app.test_client().get("/").text == "home"
    with app.app_context():
        assert sidelog.replay().moved == 6
        events = [e["event"] for e in sidelog.entries(limit=20)]
    assert sorted(events) == ["home"] * 2 + ["job"] * 2 + ["step"] * 6
    dispose(app)


@pytest.mark.parametrize("given_in", ["connect_args", "url", "url twice", "PGOPTIONS"])
def test_4_options_of_the_app_keep_the_timeouts(
    postgres: ThrowawayPostgres,
    tmp_path: t.Any,
    monkeypatch: pytest.MonkeyPatch,
    given_in: str,
) -> None:
    """libpq takes one ``options`` string: the app's, wherever it gives it,
    is added to the timeouts, and neither hides the other."""
    uri = postgres.create_database(f"t_opts_{os.urandom(4).hex()}")
    options = "-c search_path=audit,public"
    engine_options: dict[str, t.Any] = {}
    if given_in == "connect_args":
        engine_options = {"connect_args": {"options": options}}
    elif given_in == "url":
        uri = str(sa.make_url(uri).update_query_dict({"options": options}))
    elif given_in == "url twice":
        pairs = [("options", "-c work_mem=8MB"), ("options", options)]
        uri = str(sa.make_url(uri).update_query_pairs(pairs))
    else:
        monkeypatch.setenv("PGOPTIONS", options)
    app, _, _ = make_app(
        f"sqlite:///{tmp_path / 'main.db'}",
        str(tmp_path / "instance"),
        {
            "SIDELOG_DATABASE_URI": uri,
            "SIDELOG_WRITE_TIMEOUT": 1,
            "SIDELOG_ENGINE_OPTIONS": engine_options,
        },
    )
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
        with engine.connect() as conn:
            settings = [
                conn.exec_driver_sql(f"SHOW {name}").scalar()
                for name in ("lock_timeout", "statement_timeout", "search_path")
            ]
    assert settings == ["1s", "1s", "audit,public"]
    dispose(app)


def test_4_pool_wait_is_bounded_by_the_timeout(
    locked_parts: tuple[Flask, SideLog, str],
) -> None:
    """Every log connection busy: the request waits pool_timeout, no more."""
    app, sidelog, _ = locked_parts
    writer = app.extensions["sidelog"].writer
    held = [writer.engine.connect() for _ in range(5 + 10)]  # pool + overflow
    try:
        elapsed = answered_and_spooled(app)
    finally:
        for conn in held:
            conn.close()
    print(f"\ncase 4 (pool exhausted, timeout 1 s): answered in {elapsed:.2f} s")


def test_4_unanswered_connect_is_bounded_by_the_timeout(tmp_path: t.Any) -> None:
    """A server that accepts TCP but never speaks: connect_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        app, _ = home_app(tmp_path, f"postgresql+psycopg://u@127.0.0.1:{port}/x")
        elapsed = answered_and_spooled(app)
    dispose(app)
    print(f"\ncase 4 (silent server, timeout 1 s): answered in {elapsed:.2f} s")


def test_4_sqlite_lock_is_bounded_by_the_busy_timeout(tmp_path: t.Any) -> None:
    log_path = tmp_path / "log.db"
    app, sidelog = home_app(tmp_path, f"sqlite:///{log_path}")
    with app.app_context():
        sidelog.create_table()

    other = sqlite3.connect(log_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        elapsed = answered_and_spooled(app)
        other.execute("ROLLBACK")
    finally:
        other.close()
    with app.app_context():
        assert sidelog.replay().moved == 1
        assert [e["event"] for e in sidelog.entries()] == ["home"]
    dispose(app)
    print(f"\ncase 4 (SQLite exclusive lock, timeout 1 s): answered in {elapsed:.2f} s")


def test_4_sqlite_lock_before_the_first_write_waits_the_timeout_once(
    tmp_path: t.Any,
) -> None:
    """A process whose first write finds the log's file locked: creating the
    table (SQLite's default) fails on the lock once. Asking the database
    again whether the table exists waited out the timeout a second time."""
    log_path = tmp_path / "log.db"
    first, sidelog = home_app(tmp_path, f"sqlite:///{log_path}")
    with first.app_context():
        sidelog.create_table()
    dispose(first)
    app, _ = home_app(tmp_path, f"sqlite:///{log_path}")
    asked: list[str] = []
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
    sa.event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *args: asked.append(statement),
    )
    other = sqlite3.connect(log_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        answered_and_spooled(app)
    finally:
        other.close()
    assert len([s for s in asked if "table_info" in s]) == 1
    dispose(app)


@pytest.mark.slow
def test_5_load_through_gunicorn(postgres: ThrowawayPostgres, tmp_path: t.Any) -> None:
    uri = postgres.create_database(f"t_load_{os.urandom(4).hex()}")
    create_tables(uri, uri)
    instance = str(tmp_path / "instance")
    port = closed_port()
    log = open(tmp_path / "gunicorn.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers=4",
            "--worker-class=gthread",
            "--threads=4",
            f"--bind=127.0.0.1:{port}",
            f"--chdir={TESTS}",
            f"--pythonpath={TESTS}",
            "--log-level=warning",
            "_reliability_app:create_app()",
        ],
        env=server_env(uri, uri, instance, SIDELOG_TEST_MAIN_POOL="2"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    mix = ["/ok"] * 7 + ["/fail/400", "/fail/404", "/boom"]
    work: queue.Queue[str] = queue.Queue()
    for i in range(2000):
        work.put(mix[i % len(mix)])
    total = work.qsize()
    answers: list[tuple[str, int, str]] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            try:
                path = work.get_nowait()
            except queue.Empty:
                break
            status, request_id = request(conn, path)
            answers.append((path, status, request_id))
        conn.close()

    try:
        wait_until(lambda: _listening(port))
        # Every worker has imported the app once the server answers quickly.
        started = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(32)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)
        log.close()

    assert total == len(answers) == 2000
    for path, status, _ in answers:
        expected = int(path.split("/")[-1]) if path.startswith("/fail/") else None
        assert status == {"/ok": 200, "/boom": 500}.get(path, expected), path
    ids = {request_id for _, _, request_id in answers}
    assert len(ids) == 2000
    rows = [r for r in stored(uri) if r["event"] in AUDITED]
    assert len(rows) == 2000
    assert {r["request_id"] for r in rows} == ids
    assert spooled(os.path.join(instance, "sidelog-spool.jsonl")) == []
    statuses = collections.Counter(status for _, status, _ in answers)
    print(
        f"\ncase 5: {total} requests by 32 clients through gunicorn 4x4 gthread"
        f" in {elapsed:.2f} s = {total / elapsed:.0f} requests/s;"
        f" statuses {dict(statuses)}"
    )


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_4_sqlite_writers_of_one_process_wait_no_longer_than_the_timeout(
    tmp_path: t.Any,
) -> None:
    """Writers of one process take turns on a lock of their own; its wait is
    bounded too, e.g. behind a long log_session() in another thread."""
    app, sidelog = home_app(tmp_path, f"sqlite:///{tmp_path / 'log.db'}")

    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with app.app_context(), sidelog.log_session():
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        holding.wait(30)
        elapsed = answered_and_spooled(app)
    finally:
        release.set()
        holder.join()
    with app.app_context():
        assert sidelog.replay().moved == 1
    dispose(app)
    print(f"\ncase 4 (SQLite, busy writer thread, timeout 1 s): {elapsed:.2f} s")
