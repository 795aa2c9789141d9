"""SIDELOG_ON_WRITE_ERROR: failed entries go to the spool (or raise), and
replay moves them into the log database exactly once."""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import typing as t
import warnings

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from conftest import Account
from conftest import Base
from conftest import dispose
from conftest import make_app
from conftest import new_database_uri
from flask_sidelog import ReplayResult
from flask_sidelog import SideLog
from flask_sidelog import SideLogWriteError
from flask_sidelog.entry import make_entry
from flask_sidelog.signals import entry_failed
from flask_sidelog.spool import Spool

AppParts = tuple[Flask, SQLAlchemy, SideLog]


def spooled(app: Flask) -> list[dict[str, t.Any]]:
    """The entries in the app's spool file, in order."""
    path = app.extensions["sidelog"].settings.spool_path
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def stored_uuids(app: Flask, sidelog: SideLog) -> list[str]:
    with app.app_context():
        return [e["uuid"] for e in sidelog.entries(limit=100_000)]


@pytest.fixture
def parts(
    backend: str, tmp_path: t.Any, request: pytest.FixtureRequest
) -> t.Iterator[AppParts]:
    """An app whose entries table is missing: every write fails until
    ``sidelog.create_table()``."""
    uri = new_database_uri(backend, tmp_path, request)
    app, db, sidelog = make_app(
        uri, str(tmp_path / "instance"), {"SIDELOG_CREATE_TABLE": False}
    )
    assert db is not None
    with app.app_context():
        Base.metadata.create_all(db.engine)
    yield app, db, sidelog
    dispose(app)


def test_failed_entries_are_spooled_then_replayed_once(
    parts: AppParts, caplog: pytest.LogCaptureFixture
) -> None:
    app, db, sidelog = parts
    failures: list[str] = []

    def record(sender: Flask, entry: dict[str, t.Any], error: Exception) -> None:
        failures.append(entry["event"])

    @app.post("/pay")
    @sidelog.audit("pay")
    def pay() -> str:
        sidelog.log("pay.attempt", data={"amount": 5})
        db.session.add(Account(name="paid"))
        db.session.commit()
        return "paid"

    with entry_failed.connected_to(record, app), caplog.at_level(logging.WARNING):
        response = app.test_client().post("/pay")
    assert (response.status_code, response.text) == (200, "paid")
    with app.app_context():
        assert db.session.scalar(sa.select(Account.name)) == "paid"

    spool_path = app.extensions["sidelog"].settings.spool_path
    assert spool_path == os.path.join(app.instance_path, "sidelog-spool.jsonl")
    assert stat.S_IMODE(os.stat(spool_path).st_mode) == 0o600
    lines = spooled(app)
    assert [e["event"] for e in lines] == ["pay.attempt", "pay"]
    assert lines[1]["outcome"] == "success"
    assert lines[1]["main_tx"] == "committed"
    assert failures == ["pay.attempt", "pay"]
    assert f"kept in {spool_path}" in caplog.text

    with app.app_context():
        sidelog.create_table()
        first = sidelog.replay()
        again = sidelog.replay()
    assert first == ReplayResult(moved=2)
    assert again == ReplayResult()
    assert spooled(app) == []
    with app.app_context():
        attempt, audit = sidelog.entries()
    assert [attempt["uuid"], audit["uuid"]] == [e["uuid"] for e in lines]
    assert attempt["created_at"].isoformat() == lines[0]["created_at"]
    assert attempt["data"] == {"amount": 5}
    assert audit["request_id"] == attempt["request_id"] == lines[0]["request_id"]


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_replay_skips_what_is_already_stored(parts: AppParts) -> None:
    """A write can commit and still be reported failed (the connection died
    before the answer): replay then finds the uuid stored and drops it."""
    app, _, sidelog = parts
    with app.app_context():
        entry = sidelog.log("twice")
        sidelog.create_table()
        writer = app.extensions["sidelog"].writer
        writer.insert([entry])
        assert sidelog.replay() == ReplayResult(already_present=1)
    assert stored_uuids(app, sidelog) == [entry["uuid"]]
    assert spooled(app) == []


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_entries_the_database_refuses_hold_back_no_others(parts: AppParts) -> None:
    """Spooled entries the database refuses for their content (here without
    an event, which an older version could spool) stay in the spool; the
    entries after them are moved, not taken for a database that is down."""
    app, _, sidelog = parts
    path = app.extensions["sidelog"].settings.spool_path
    refused = [dict(make_entry(f"refused.{n}"), event=None) for n in range(3)]
    Spool(path).append(refused)
    with app.app_context():
        for n in range(5):
            sidelog.log(f"ordinary.{n}")  # spooled: there is no table yet
        sidelog.create_table()
        assert sidelog.replay() == ReplayResult(moved=5, kept=3)
        assert sorted(e["event"] for e in sidelog.entries()) == [
            f"ordinary.{n}" for n in range(5)
        ]
    assert [e["uuid"] for e in spooled(app)] == [e["uuid"] for e in refused]


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_replay_cli(parts: AppParts) -> None:
    app, _, sidelog = parts
    runner = app.test_cli_runner()
    with app.app_context():
        sidelog.log("one")
        sidelog.log("two")
    # No table, and SIDELOG_CREATE_TABLE off: said as it is, not as a
    # failure to reach the database.
    failed = runner.invoke(args=["sidelog", "replay"])
    assert failed.exit_code == 1
    assert failed.output.startswith("Error: no sidelog entries table in DB: run")
    assert "Traceback" not in failed.output
    assert len(spooled(app)) == 2

    with app.app_context():
        sidelog.create_table()
    result = runner.invoke(args=["sidelog", "replay"])
    assert result.exit_code == 0, result.output
    assert "Moved 2 entries" in result.output
    assert "0 already there" in result.output
    assert runner.invoke(args=["sidelog", "replay"]).output.startswith("Moved 0 ")
    assert len(stored_uuids(app, sidelog)) == 2


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_raise_mode(
    backend: str, tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    """A view that logs before it acts does not act; its own @audit entry is
    written at teardown, which never raises, so it goes to the spool."""
    uri = new_database_uri(backend, tmp_path, request)
    app, db, sidelog = make_app(
        uri,
        str(tmp_path / "instance"),
        {"SIDELOG_CREATE_TABLE": False, "SIDELOG_ON_WRITE_ERROR": "raise"},
    )
    assert db is not None
    with app.app_context():
        Base.metadata.create_all(db.engine)

    @app.post("/delete")
    @sidelog.audit("account.delete")
    def delete() -> str:
        sidelog.log("account.delete.intent")
        db.session.add(Account(name="acted"))
        db.session.commit()
        return "done"

    try:
        with pytest.raises(SideLogWriteError) as info:
            app.test_client().post("/delete")
        assert [e["event"] for e in info.value.entries] == ["account.delete.intent"]
        assert isinstance(info.value.__cause__, sa.exc.DBAPIError)
        with app.app_context():
            assert db.session.scalar(sa.select(sa.func.count(Account.id))) == 0
            with pytest.raises(SideLogWriteError):
                sidelog.log("outside.a.request")
    finally:
        dispose(app)
    (audit,) = spooled(app)
    assert audit["event"] == "account.delete"
    assert (audit["outcome"], audit["status_code"]) == ("error", 500)
    assert audit["error"].startswith("flask_sidelog.writer.SideLogWriteError: ")


@pytest.fixture
def log_app(tmp_path: t.Any) -> t.Iterator[AppParts]:
    """SQLite main and log databases; spool in the instance folder."""
    app, db, sidelog = make_app(
        f"sqlite:///{tmp_path / 'main.db'}", str(tmp_path / "instance")
    )
    assert db is not None
    yield app, db, sidelog
    dispose(app)


def _append_many(path: str, prefix: str, threads: int, each: int) -> None:
    spool = Spool(path)

    def work(n: int) -> None:
        for i in range(each):
            spool.append([make_entry("spooled", data={"who": f"{prefix}-{n}-{i}"})])

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def test_spool_appends_from_processes_and_threads(tmp_path: t.Any) -> None:
    path = str(tmp_path / "spool" / "s.jsonl")
    # fork, not spawn: a spawned child imports the test suite (seconds). The
    # children only append to a file, so Python 3.12's warning about forking a
    # process with threads (if pytest has any) does not apply.
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_append_many, args=(path, f"p{p}", 4, 50))
        for p in range(4)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for p in processes:
            p.start()
    _append_many(path, "main", 4, 50)
    for p in processes:
        p.join()
        assert p.exitcode == 0
    with open(path, "rb") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 5 * 4 * 50
    assert len({r["uuid"] for r in rows}) == len(rows)
    assert len({r["data"]["who"] for r in rows}) == len(rows)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        ("mysql+mysqldb://u@localhost/x", "No module named 'MySQLdb'"),
        ("sqlite:///log.db?timeout=abc", "could not convert string to float"),
    ],
)
def test_log_engine_that_cannot_be_made(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture, uri: str, said: str
) -> None:
    """A driver that is not installed, a URL value the dialect refuses: the
    log engine cannot be made, found at the first write. The request goes
    on, and its entries go to the spool with a warning that says why."""
    app, _, sidelog = make_app(
        "sqlite://", str(tmp_path / "instance"), {"SIDELOG_DATABASE_URI": uri}
    )
    failed: list[str] = []

    @app.get("/")
    @sidelog.audit("home")
    def home() -> str:
        sidelog.log("inside")
        sidelog.flush()
        return "home"

    def on_failed(sender: Flask, entry: dict[str, t.Any], error: Exception) -> None:
        failed.append(f"{entry['event']}: {error}")

    with entry_failed.connected_to(on_failed, app):
        response = app.test_client().get("/")
    assert (response.status_code, response.text) == (200, "home")
    assert [e["event"] for e in spooled(app)] == ["inside", "home"]
    assert [f.split(":")[0] for f in failed] == ["inside", "home"]
    assert all(said in f for f in failed)
    assert said in caplog.text
    dispose(app)


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        ("postgresql+psycopg://u@127.0.0.1:1/x", "cannot reach the sidelog database"),
        ("mysql+mysqldb://u@localhost/x", "cannot load the sidelog database's driver"),
    ],
)
def test_replay_with_the_log_database_out_of_reach(
    tmp_path: t.Any, uri: str, said: str
) -> None:
    """One line and exit status 1, like every other command; the spool is
    left as it was."""
    app, _, sidelog = make_app(
        "sqlite://", str(tmp_path / "instance"), {"SIDELOG_DATABASE_URI": uri}
    )
    path = app.extensions["sidelog"].settings.spool_path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as spool:
        spool.write('{"event": "kept"}\n')
    result = app.test_cli_runner().invoke(args=["sidelog", "replay"])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith(f"Error: {said}")
    assert [e["event"] for e in spooled(app)] == ["kept"]
    dispose(app)


def test_replay_names_a_spool_it_cannot_open(tmp_path: t.Any) -> None:
    """An error of the spool's file is not taken for one of the output."""
    spool = tmp_path / "a-file" / "spool.jsonl"
    app, _, _ = make_app(
        "sqlite://", str(tmp_path / "instance"), {"SIDELOG_SPOOL_PATH": str(spool)}
    )
    # Made a file since init_app, which refuses a spool path under a file.
    (tmp_path / "a-file").write_text("")
    result = app.test_cli_runner().invoke(args=["sidelog", "replay"])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith(f"Error: {tmp_path / 'a-file'}")
    dispose(app)


def test_replay_while_the_app_keeps_spooling(log_app: AppParts) -> None:
    """Appends that land during a replay are neither lost nor replayed twice."""
    app, _, sidelog = log_app
    path = app.extensions["sidelog"].settings.spool_path
    appenders = threading.Thread(target=_append_many, args=(path, "app", 4, 100))
    appenders.start()
    total = ReplayResult()
    with app.app_context():
        while appenders.is_alive():
            total += sidelog.replay()
        appenders.join()
        total += sidelog.replay()
    assert total.moved == 400
    assert (total.already_present, total.kept, total.unreadable) == (0, 0, 0)
    uuids = stored_uuids(app, sidelog)
    assert len(uuids) == len(set(uuids)) == 400
    assert spooled(app) == []


def test_a_torn_line_stays_alone_and_is_reported(log_app: AppParts) -> None:
    """A crash or a full disk can leave half a line: the next entry starts a
    line of its own, and replay keeps the torn one for a person to see."""
    app, _, sidelog = log_app
    path = app.extensions["sidelog"].settings.spool_path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # And a line nested deeper than Python's JSON decoder recurses.
    deep = b"[" * 200_000
    with open(path, "wb") as f:
        f.write(deep + b'\n{"uuid": "half')
    Spool(path).append([make_entry("after.the.tear")])
    result = app.test_cli_runner().invoke(args=["sidelog", "replay"])
    assert result.exit_code == 1
    assert "Moved 1 entry" in result.output
    assert "2 lines are not entries" in result.output
    with app.app_context():
        assert [e["event"] for e in sidelog.entries()] == ["after.the.tear"]
    with open(path, "rb") as f:
        assert f.read() == deep + b'\n{"uuid": "half\n'


_FULL_DISK_REPLAY = """
import json, resource, signal, sys
from flask_sidelog.spool import Spool

# Files may not grow past 1 MiB: writing more fails as a full disk does.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
with open(sys.argv[2]) as f:
    stored = set(json.load(f))

def insert_missing(entries):
    new = {e["uuid"] for e in entries} - stored
    stored.update(new)
    return len(new)

print(Spool(sys.argv[1]).replay(insert_missing))
with open(sys.argv[2], "w") as f:
    json.dump(sorted(stored), f)
"""


def test_replay_on_a_full_disk_keeps_what_it_cannot_move_back(
    tmp_path: t.Any,
) -> None:
    """Lines replay keeps (here a 2 MiB one that is not an entry) go back
    into the spool; with no room for them, the replay's own file keeps them,
    whole, and the next replay takes it up again."""
    path = str(tmp_path / "spool.jsonl")
    junk = b"x" * (2 << 20)
    good = [make_entry("good"), make_entry("good")]
    with open(path, "wb") as f:
        f.write(junk + b"\n")
    Spool(path).append(good)
    stored = tmp_path / "stored.json"
    stored.write_text("[]")
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_REPLAY, path, str(stored)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"{ReplayResult(moved=2, unreadable=1)}\n"
    assert sorted(json.loads(stored.read_text())) == sorted(e["uuid"] for e in good)
    assert not os.path.exists(path) or os.path.getsize(path) == 0
    (left,) = glob.glob(path + ".replay-*")
    with open(left, "rb") as f:
        assert f.read().splitlines()[0] == junk

    done = subprocess.run(  # room again
        [sys.executable, "-c", _FULL_DISK_REPLAY.replace("1 << 20", "1 << 30")]
        + [path, str(stored)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == f"{ReplayResult(already_present=2, unreadable=1)}\n"
    assert glob.glob(path + ".replay-*") == []
    with open(path, "rb") as f:
        assert f.read() == junk + b"\n"


def test_an_unwritable_spool_leaves_the_entry_in_the_app_log(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Last resort: the request goes on and the whole entry is in the app's log."""
    app, _, sidelog = make_app(
        f"sqlite:///{tmp_path / 'main.db'}",
        str(tmp_path / "instance"),
        {
            "SIDELOG_CREATE_TABLE": False,
            "SIDELOG_SPOOL_PATH": str(tmp_path / "spool-is-a-dir"),
        },
    )
    # A folder where the file should be (init_app refuses one found there).
    (tmp_path / "spool-is-a-dir").mkdir()

    @app.get("/")
    @sidelog.audit("home")
    def home() -> str:
        sidelog.log("visible", data={"n": 42})
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert app.test_client().get("/").text == "ok"
    assert "NOT spooled" in caplog.text
    assert "'event': 'visible'" in caplog.text
    assert "'data': {'n': 42}" in caplog.text
    dispose(app)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("SIDELOG_ON_WRITE_ERROR", "drop", 'must be "spool" or "raise"'),
        ("SIDELOG_SPOOL_PATH", 3, "must be a file path"),
        ("SIDELOG_REQUEST_ID_HEADER", "", "must be None or an HTTP header name"),
        ("SIDELOG_REQUEST_ID_RESPONSE_HEADER", "X: y", "HTTP header name"),
    ],
)
def test_bad_settings_say_what_is_accepted(
    tmp_path: t.Any, key: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_app("sqlite://", str(tmp_path), {key: value})


def test_raise_mode_needs_a_caller_that_waits(tmp_path: t.Any) -> None:
    """A buffered entry fails after its call returned: nobody is left to
    raise to, and "raise" mode spools nothing."""
    config = {"SIDELOG_ON_WRITE_ERROR": "raise", "SIDELOG_WRITE_MODE": "buffered"}
    with pytest.raises(ValueError, match='waits for the commit, "sync" or "group"'):
        make_app("sqlite://", str(tmp_path), config)


def test_replay_without_on_conflict_support(
    log_app: AppParts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Databases without INSERT ... ON CONFLICT ... RETURNING: replay selects
    the stored uuids first and inserts the others."""
    app, _, sidelog = log_app
    path = app.extensions["sidelog"].settings.spool_path
    with app.app_context():
        stored = sidelog.log("stored")
        writer = app.extensions["sidelog"].writer
        monkeypatch.setattr(writer.engine.dialect, "insert_returning", False)
        Spool(path).append([stored, make_entry("missing")])
        assert sidelog.replay() == ReplayResult(moved=1, already_present=1)
        assert [e["event"] for e in sidelog.entries()] == ["stored", "missing"]
