"""SIDELOG_WRITE_MODE: what each mode guarantees, on every backend."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import typing as t
import warnings
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import click
import pytest
import sqlalchemy as sa
from flask import Flask

from conftest import dispose
from conftest import failures
from conftest import make_app
from conftest import run_threads
from flask_sidelog import chain
from flask_sidelog import SideLog
from flask_sidelog.batching import _Waiter
from flask_sidelog.entry import make_entry
from flask_sidelog.entry import new_uuid
from flask_sidelog.signals import entry_failed
from flask_sidelog.signals import entry_written
from flask_sidelog.writer import _multi_rows
from flask_sidelog.writer import FEW_ROWS
from flask_sidelog.writer import MULTI_ROWS
from flask_sidelog.writer import MULTI_ROWS_MIN
from flask_sidelog.writer import SERVER_LINKED_ROWS
from flask_sidelog.writer import Writer

Built = tuple[Flask, SideLog]


@pytest.fixture
def build(database_uri: str, tmp_path: t.Any) -> t.Iterator[t.Callable[..., Built]]:
    """Build apps on this test's database with extra config; disposed after."""
    apps: list[Flask] = []

    def make(**config: t.Any) -> Built:
        app, _, sidelog = make_app(
            database_uri, str(tmp_path / "instance"), config, with_db=False
        )
        apps.append(app)
        return app, sidelog

    yield make
    for app in apps:
        dispose(app)


def log_engine(app: Flask) -> sa.Engine:
    with app.app_context():
        return t.cast(sa.Engine, app.extensions["sidelog"].writer.engine)


def stored_events(app: Flask, database_uri: str) -> list[str]:
    """Events in the table, read through a connection of a new engine (or,
    for ``sqlite://``, the log's only connection)."""
    query = sa.text("SELECT event FROM sidelog_entries ORDER BY id")
    if database_uri == "sqlite://":
        engine = log_engine(app)
        writer = app.extensions["sidelog"].writer
        with writer.lock, engine.connect() as conn:
            return list(conn.scalars(query))
    engine = sa.create_engine(database_uri, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(query))
    finally:
        engine.dispose()


def commit_threads(engine: sa.Engine) -> list[str]:
    """The name of the thread of every COMMIT on ``engine`` from now on."""
    found: list[str] = []
    sa.event.listen(
        engine, "commit", lambda conn: found.append(threading.current_thread().name)
    )
    return found


def hold_first_insert_until(engine: sa.Engine, ready: t.Callable[[], bool]) -> None:
    """Make the first INSERT on ``engine`` wait until ``ready()`` (at most
    30 s), so that other callers queue up behind its commit."""
    held = threading.Event()

    def before(conn: t.Any, clause: t.Any, *args: t.Any) -> None:
        if isinstance(clause, sa.Insert) and not held.is_set():
            held.set()
            deadline = time.monotonic() + 30
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.005)

    sa.event.listen(engine, "before_execute", before)


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("SIDELOG_WRITE_MODE", "async", "one of 'sync', 'group', 'buffered'"),
        ("SIDELOG_BATCH_SIZE", 0, "1 or more"),
        ("SIDELOG_BATCH_SIZE", True, "1 or more"),
        ("SIDELOG_FLUSH_INTERVAL", -5, "milliseconds above 0"),
        ("SIDELOG_FLUSH_INTERVAL", "100", "milliseconds above 0"),
    ],
)
def test_bad_settings_say_what_is_accepted(
    tmp_path: t.Any, key: str, value: object, accepted: str
) -> None:
    with pytest.raises(ValueError, match=f"{key} must be .*{accepted}"):
        make_app("sqlite://", str(tmp_path), {key: value}, with_db=False)


def test_default_mode_is_group(tmp_path: t.Any) -> None:
    app, _, _ = make_app("sqlite://", str(tmp_path), with_db=False)
    assert app.config["SIDELOG_WRITE_MODE"] == "group"
    assert app.extensions["sidelog"].settings.flush_interval == 0.1


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_entry_is_committed_when_the_call_returns(
    build: t.Callable[..., Built], database_uri: str, mode: str
) -> None:
    app, sidelog = build(SIDELOG_WRITE_MODE=mode)

    @app.post("/")
    @sidelog.audit("audited")
    def view() -> str:
        sidelog.log("inside")
        assert stored_events(app, database_uri) == ["first", "inside"]
        return "ok"

    with app.app_context():
        sidelog.log("first")
        assert stored_events(app, database_uri) == ["first"]
    assert app.test_client().post("/").status_code == 200
    assert stored_events(app, database_uri) == ["first", "inside", "audited"]


def test_group_commits_concurrent_callers_together_exactly_once(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    app, sidelog = build(SIDELOG_WRITE_MODE="group")
    with app.app_context():
        sidelog.create_table()
        committer = app.extensions["sidelog"].writer._batcher
    engine = log_engine(app)
    commits = commit_threads(engine)
    # The first commit waits until the 15 other callers queued behind it.
    hold_first_insert_until(engine, lambda: len(committer._waiting) >= 15)
    written: list[str] = []
    sa_lock = threading.Lock()

    def call(i: int) -> None:
        with app.app_context():
            for n in range(10):
                entry = sidelog.log("event", data={"caller": i, "n": n})
                with sa_lock:
                    written.append(entry["uuid"])

    run_threads(16, call)
    with app.app_context():
        stored = sidelog.entries(limit=1000)
    assert sorted(e["uuid"] for e in stored) == sorted(written)
    assert len(written) == 160
    assert len(commits) < 160
    # No one waited for nothing: the committer is idle and empty.
    assert not committer._leading and not committer._waiting


def test_failed_group_batch_reaches_each_waiter_in_its_own_thread(
    build: t.Callable[..., Built],
) -> None:
    app, sidelog = build(SIDELOG_WRITE_MODE="group", SIDELOG_CREATE_TABLE=False)
    with app.app_context():
        committer = app.extensions["sidelog"].writer._batcher
    engine = log_engine(app)
    hold_first_insert_until(engine, lambda: len(committer._waiting) >= 7)
    failed: list[tuple[str, str]] = []
    written: list[str] = []

    def on_failed(sender: Flask, entry: dict[str, t.Any], error: Exception) -> None:
        failed.append((entry["data"]["thread"], threading.current_thread().name))

    def call(i: int) -> None:
        with app.app_context():
            sidelog.log("lost", data={"thread": threading.current_thread().name})

    with (
        entry_failed.connected_to(on_failed, app),
        entry_written.connected_to(
            lambda sender, entry: written.append(entry["uuid"]), app
        ),
    ):
        run_threads(8, call)
    assert written == []
    assert sorted(failed) == sorted((f"caller-{i}",) * 2 for i in range(8))


def test_callers_queued_behind_a_failed_batch_fail_with_it(
    build: t.Callable[..., Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails for the database (here: no table; also down,
    locked, slower than the timeout) fails the callers queued behind it:
    otherwise each next batch would wait out the timeout again, and a
    caller far back in the queue would wait many timeouts."""
    app, sidelog = build(
        SIDELOG_WRITE_MODE="group", SIDELOG_CREATE_TABLE=False, SIDELOG_BATCH_SIZE=1
    )
    with app.app_context():
        writer = app.extensions["sidelog"].writer
    committer = writer._batcher
    insert = writer.insert
    batches: list[int] = []

    def first_waits_for_the_queue(entries: list[dict[str, t.Any]]) -> None:
        batches.append(len(entries))
        deadline = time.monotonic() + 30
        while (
            len(batches) == 1
            and len(committer._waiting) < 7
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        insert(entries)

    monkeypatch.setattr(writer, "insert", first_waits_for_the_queue)

    def call(i: int) -> None:
        with app.app_context():
            sidelog.log("lost")

    with failures(app) as failed:
        run_threads(8, call)
    assert len(failed) == 8
    assert batches == [1]
    assert not committer._leading and not committer._waiting


def test_buffered_caller_does_not_wait_and_flush_commits(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    app, sidelog = build(SIDELOG_WRITE_MODE="buffered", SIDELOG_FLUSH_INTERVAL=1)
    with app.app_context():
        sidelog.create_table()
    release = threading.Event()

    def stall(conn: t.Any, clause: t.Any, *args: t.Any) -> None:
        if threading.current_thread().name == "flask-sidelog buffered writer":
            release.wait(30)

    sa.event.listen(log_engine(app), "before_execute", stall)
    with app.app_context():
        for n in range(5):
            sidelog.log("queued", data={"n": n})
        # The writer thread is stuck before its INSERT, the caller is not.
        if database_uri != "sqlite://":
            assert stored_events(app, database_uri) == []
        release.set()
        sidelog.flush()
        assert [e["data"]["n"] for e in sidelog.entries()] == [0, 1, 2, 3, 4]
    assert stored_events(app, database_uri) == ["queued"] * 5


@pytest.mark.parametrize("refused", ["for_being_down", "for_its_content"])
def test_buffered_batch_failed_for_the_database_fails_the_queue_with_it(
    build: t.Callable[..., Built],
    database_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    refused: str,
) -> None:
    """A batch that fails for the database (down, locked, slower than the
    timeout) takes what is queued behind it to the error path at once: each
    batch would wait out the timeout in turn, and at exit the process was
    killed before the spool got them. A batch refused for what it holds
    fails alone."""
    app, sidelog = build(SIDELOG_WRITE_MODE="buffered", SIDELOG_BATCH_SIZE=1)
    with app.app_context():
        sidelog.create_table()
        writer = app.extensions["sidelog"].writer
    insert = writer.insert
    tried: list[list[str]] = []

    def first_fails(entries: list[dict[str, t.Any]]) -> None:
        tried.append([e["event"] for e in entries])
        if len(tried) > 1:
            return insert(entries)
        _wait_for(lambda: len(writer._batcher._queue) == 4)
        if refused == "for_being_down":
            raise sa.exc.OperationalError("INSERT", {}, Exception("locked"))
        raise sa.exc.IntegrityError("INSERT", {}, Exception("duplicate"))

    monkeypatch.setattr(writer, "insert", first_fails)
    with failures(app) as failed, app.app_context():
        for n in range(5):
            sidelog.log(f"e{n}")
        sidelog.flush()
    if refused == "for_being_down":
        assert tried == [["e0"]] and len(failed) == 5
        assert stored_events(app, database_uri) == []
    else:
        assert tried == [["e0"], ["e1"], ["e2"], ["e3"], ["e4"]] and len(failed) == 1
        assert stored_events(app, database_uri) == ["e1", "e2", "e3", "e4"]


def test_buffered_flush_from_the_writer_threads_receiver(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """A receiver of a batch's signal runs in the writer thread; a flush
    there waited for that thread, itself, for ever, and so did every flush
    after it. It writes what is queued inline instead."""
    app, sidelog = build(SIDELOG_WRITE_MODE="buffered", SIDELOG_BATCH_SIZE=1)
    with app.app_context():
        sidelog.create_table()
    flushed: list[str] = []

    def flush_then_note(sender: Flask, entry: dict[str, t.Any]) -> None:
        if entry["event"] == "first":
            _wait_for(lambda: len(app.extensions["sidelog"].writer._batcher._queue))
            with sender.app_context():
                sidelog.flush()
            flushed.append(threading.current_thread().name)

    with entry_written.connected_to(flush_then_note, app):
        with app.app_context():
            sidelog.log("first")
            sidelog.log("second")
        done = threading.Thread(target=lambda: _flush(app), daemon=True)
        done.start()
        done.join(20)
        hung = done.is_alive()
        if hung:  # let the flushes go, so that the test ends
            batcher = app.extensions["sidelog"].writer._batcher
            with batcher._cond:
                batcher._done = batcher._queued
                batcher._cond.notify_all()
        assert not hung
    assert flushed == ["flask-sidelog buffered writer"]
    assert stored_events(app, database_uri) == ["first", "second"]


def test_flush_waits_for_what_a_receiver_flushes_inline(
    build: t.Callable[..., Built], database_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a flush in the writer thread writes inline counts as done once
    written: a flush of another thread returned before, without it."""
    app, sidelog = build(SIDELOG_WRITE_MODE="buffered", SIDELOG_BATCH_SIZE=1)
    with app.app_context():
        sidelog.create_table()
        writer = app.extensions["sidelog"].writer
    insert = writer.insert

    def slow_second(entries: list[dict[str, t.Any]]) -> None:
        if entries[0]["event"] == "second":
            time.sleep(0.5)
        insert(entries)

    monkeypatch.setattr(writer, "insert", slow_second)
    first, go = threading.Event(), threading.Event()

    def flush_on_first(sender: Flask, entry: dict[str, t.Any]) -> None:
        if entry["event"] == "first":
            first.set()
            go.wait(20)
            with sender.app_context():
                sidelog.flush()

    seen: list[list[str]] = []

    def other_flush() -> None:
        with app.app_context():
            sidelog.flush()
            seen.append([e["event"] for e in sidelog.entries()])

    with entry_written.connected_to(flush_on_first, app), app.app_context():
        sidelog.log("first")
        assert first.wait(20)
        sidelog.log("second")  # queued while the writer thread is in the receiver
        other = threading.Thread(target=other_flush, daemon=True)
        other.start()
        _wait_for(lambda: writer._batcher._urgent > 0)
        # The receiver's flush takes "second" and "third": counted as done
        # when taken, they made up the other flush's target of two while
        # "second" was still being written.
        sidelog.log("third")
        go.set()
        other.join(20)
    assert seen and seen[0][:2] == ["first", "second"]


def _flush(app: Flask) -> None:
    with app.app_context():
        app.extensions["sidelog"].extension.flush()


def stored_within(
    app: Flask, database_uri: str, expected: list[str], seconds: float
) -> bool:
    """Whether the table holds ``expected`` events within ``seconds``."""
    deadline = time.monotonic() + seconds
    while stored_events(app, database_uri) != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_buffered_entry_after_a_quiet_spell_waits_the_interval_only(
    build: t.Callable[..., Built], database_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread, idle, waits up to IDLE_SECONDS for an entry: a new
    one must wake it, to be written within the flush interval (1 ms here),
    not when the idle wait ends (made 10 minutes here)."""
    monkeypatch.setattr("flask_sidelog.batching.IDLE_SECONDS", 600.0)
    app, sidelog = build(SIDELOG_WRITE_MODE="buffered", SIDELOG_FLUSH_INTERVAL=1)
    with app.app_context():
        sidelog.create_table()
        sidelog.log("first")
    assert stored_within(app, database_uri, ["first"], 30)
    time.sleep(0.05)  # the thread is back in its idle wait
    with app.app_context():
        sidelog.log("second")
    assert stored_within(app, database_uri, ["first", "second"], 30)


def test_buffered_full_queue_writes_inline_and_drops_nothing(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """Batch size 1: the queue holds 10 entries. The writer thread is stuck
    after its first commit, so the caller finds the queue full and writes
    inline."""
    app, sidelog = build(
        SIDELOG_WRITE_MODE="buffered", SIDELOG_BATCH_SIZE=1, SIDELOG_FLUSH_INTERVAL=1
    )
    with app.app_context():
        sidelog.create_table()
    commits = commit_threads(log_engine(app))
    release = threading.Event()

    def stall(sender: Flask, entry: dict[str, t.Any]) -> None:
        if threading.current_thread().name == "flask-sidelog buffered writer":
            release.wait(30)

    with entry_written.connected_to(stall, app), app.app_context():
        written = [sidelog.log("many", data={"n": n})["uuid"] for n in range(40)]
        release.set()
        sidelog.flush()
        stored = sidelog.entries(limit=100)
    assert sorted(e["uuid"] for e in stored) == sorted(written)
    assert "MainThread" in commits
    assert "flask-sidelog buffered writer" in commits
    assert stored_events(app, database_uri) == ["many"] * 40


def test_buffered_cli_command_flushes_at_teardown(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """An interval of an hour: only the teardown's flush can have written it."""
    app, sidelog = build(SIDELOG_WRITE_MODE="buffered", SIDELOG_FLUSH_INTERVAL=3600_000)

    @app.cli.command("job")
    def job() -> None:
        sidelog.log("job.ran")
        click.echo("done")

    @app.cli.command("threaded-job")
    def threaded_job() -> None:
        """Logs only from threads of its own, each in an app context."""

        def work(i: int) -> None:
            with app.app_context():
                sidelog.log("job.thread")

        run_threads(3, work)
        click.echo("done")

    result = app.test_cli_runner().invoke(args=["job"])
    assert result.output == "done\n"
    assert stored_events(app, database_uri) == ["job.ran"]
    result = app.test_cli_runner().invoke(args=["threaded-job"])
    assert result.output == "done\n"
    assert stored_events(app, database_uri) == ["job.ran"] + ["job.thread"] * 3


_EXIT_SCRIPT = """
import sys
from flask import Flask
from flask_sidelog import SideLog
from flask_sidelog.entry import make_entry

app = Flask("exit_test", instance_path=sys.argv[2])
app.config.update(
    SQLALCHEMY_DATABASE_URI=sys.argv[1],
    SIDELOG_CREATE_TABLE=True,
    SIDELOG_WRITE_MODE="buffered",
    SIDELOG_FLUSH_INTERVAL=3600_000,
    SIDELOG_BATCH_SIZE=1000,
)
sidelog = SideLog(app)
with app.app_context():
    for n in range(25):
        sidelog.log("before.exit")
print("exiting")
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_buffered_entries_are_written_at_interpreter_exit(
    database_uri: str, tmp_path: t.Any
) -> None:
    """A real interpreter that exits without flushing, with an hour's interval."""
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, database_uri, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "exiting\n", "")
    engine = sa.create_engine(database_uri, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        count = conn.scalar(sa.text("SELECT count(*) FROM sidelog_entries"))
    engine.dispose()
    assert count == 25


def _log_in_a_child(app: Flask, sidelog: SideLog) -> None:  # pragma: no cover
    with app.app_context():
        for _ in range(3):
            sidelog.log("child")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_buffered_entries_of_a_multiprocessing_child(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """A child forked by multiprocessing ends with os._exit(), which runs no
    atexit function: its buffered entries are flushed by its finalizers."""
    app, sidelog = build(SIDELOG_WRITE_MODE="buffered", SIDELOG_FLUSH_INTERVAL=3600_000)
    with app.app_context():
        sidelog.create_table()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        child = multiprocessing.get_context("fork").Process(
            target=_log_in_a_child, args=(app, sidelog)
        )
        child.start()
    child.join(30)
    assert child.exitcode == 0
    assert stored_events(app, database_uri) == ["child"] * 3


def _fork(child: t.Callable[[], None]) -> int:
    """Run ``child`` in a forked process; return its exit status. The child
    is killed by SIGALRM if it hangs on a lock inherited from the parent."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads: that
        # process is exactly what this tests.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            signal.alarm(20)
            child()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["group", "buffered"])
# A memory database is not shared with a child process.
@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_fork_while_the_parent_is_writing(
    build: t.Callable[..., Built],
    database_uri: str,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent forks while a thread of its own is inside a write's
    transaction, holding the write mode's locks and the chain's (PostgreSQL's
    advisory lock; on SQLite, the file's write lock and the writer's lock).
    The child writes and flushes its own entries, the parent's are written
    once.

    The write ends half a second later, as writes do. The database locks it
    holds the child waits for as any other process would; on SQLite the fork
    itself waits, since the child would inherit the parent's hold on the
    file."""
    app, sidelog = build(SIDELOG_WRITE_MODE=mode, SIDELOG_FLUSH_INTERVAL=1)
    with app.app_context():
        sidelog.create_table()
    inside = threading.Event()
    release = threading.Event()
    lock_and_read_head = chain.lock_and_read_head

    def stall(*args: t.Any, **kwargs: t.Any) -> tuple[int, str]:
        head = lock_and_read_head(*args, **kwargs)
        if os.getpid() == parent:
            inside.set()
            release.wait(30)
        return head

    parent = os.getpid()
    monkeypatch.setattr(chain, "lock_and_read_head", stall)
    # PostgreSQL links entries in its append function, in one statement;
    # without it the lock is taken in a round trip of its own, where this
    # test can stall.
    monkeypatch.setattr("flask_sidelog.writer.has_append_function", lambda *a: False)

    def parent_writes() -> None:
        with app.app_context():
            sidelog.log("parent")

    writer_thread = threading.Thread(target=parent_writes)
    writer_thread.start()
    assert inside.wait(30)

    def child() -> None:
        with app.app_context():
            for _ in range(3):
                sidelog.log("child")
            sidelog.flush()

    threading.Timer(0.5, release.set).start()
    status = _fork(child)
    writer_thread.join(30)
    with app.app_context():
        sidelog.flush()
    assert status == 0
    assert sorted(stored_events(app, database_uri)) == ["child"] * 3 + ["parent"]


@pytest.mark.slow
@pytest.mark.postgres
def test_write_after_a_server_restart(
    postgres: t.Any, tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log engine pings a pooled connection only after it sat idle; a
    connection the restart closed is replaced, the entry is not lost."""
    uri = postgres.create_database("restart_idle_ping")
    app, _, sidelog = make_app(uri, str(tmp_path), with_db=False)
    try:
        with (
            failures(app) as failed,
            app.app_context(),
        ):
            sidelog.log("before")
            postgres.stop()
            postgres.start()
            monkeypatch.setattr("flask_sidelog.engine.PING_AFTER", 0.0)
            sidelog.log("after")
            events = [e["event"] for e in sidelog.entries()]
    finally:
        dispose(app)
    assert failed == []
    assert events == ["before", "after"]


@pytest.mark.slow
@pytest.mark.postgres
def test_writes_after_a_server_restart_with_many_pooled_connections(
    postgres: t.Any, tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart drops every pooled connection: once a write finds one
    dropped, the others are pinged before use, however briefly they were
    idle, so that the write's retry does not get another dropped one."""
    uri = postgres.create_database("restart_many_pooled")
    app, _, sidelog = make_app(uri, str(tmp_path), with_db=False)
    monkeypatch.setattr("flask_sidelog.engine.PING_AFTER", 3600.0)
    try:
        with failures(app) as failed, app.app_context():
            sidelog.log("before")
            engine = app.extensions["sidelog"].writer.engine
            pooled = [engine.connect() for _ in range(4)]
            for conn in pooled:
                conn.exec_driver_sql("SELECT 1")
            for conn in pooled:
                conn.close()
            postgres.stop()
            postgres.start()
            for n in range(4):
                sidelog.log(f"after.{n}")
            events = [e["event"] for e in sidelog.entries()]
    finally:
        dispose(app)
    assert failed == []
    assert sorted(events) == ["after.0", "after.1", "after.2", "after.3", "before"]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize(
    "size", [2, SERVER_LINKED_ROWS + 1], ids=["append-function", "copy"]
)
def test_batch_after_a_server_restart(
    postgres: t.Any, tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A batch goes to PostgreSQL's append function, or a larger one through
    COPY: a connection the restart closed fails either like an INSERT, and
    the batch is tried again on a new one."""
    uri = postgres.create_database(f"restart_batch_{size}")
    app, _, sidelog = make_app(uri, str(tmp_path), with_db=False)
    monkeypatch.setattr("flask_sidelog.engine.PING_AFTER", 3600.0)
    try:
        with (
            failures(app) as failed,
            app.app_context(),
        ):
            writer = app.extensions["sidelog"].writer
            before = [make_entry(f"before.{i}") for i in range(size)]
            writer.insert(before)
            postgres.stop()
            postgres.start()
            writer.insert([make_entry(f"after.{i}") for i in range(size)])
            events = [e["event"] for e in sidelog.entries(limit=100)]
            assert sidelog.verify().ok
    finally:
        dispose(app)
    assert failed == []
    assert events == [
        f"{when}.{i}" for when in ("before", "after") for i in range(size)
    ]


def test_a_batch_is_stored_as_single_entries_are(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """Batches skip SQLAlchemy's per-row handling (COPY on PostgreSQL,
    multi-row INSERTs and executemany on SQLite): what is stored, as the
    database holds it, must not depend on it."""
    app, sidelog = build(SIDELOG_WRITE_MODE="sync")
    fields = {
        "actor": "ann\u2028é",
        "status_code": 201,
        "duration_ms": 1.5,
        "data": {"b": [1, 2.5, None, "\x01"], "a": {"z": True}, "é": "x"},
    }
    at = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5)))

    def entry(event: str, **fields: t.Any) -> dict[str, t.Any]:
        made = make_entry(event, **fields)
        made["created_at"] = at
        return made

    # PostgreSQL takes a few rows in one INSERT bound in the client, more
    # by COPY. SQLite takes a few by executemany; a long run of rows with
    # the same NULL columns by multi-row INSERTs of each size it uses, and
    # what is left by executemany.
    sizes = (2, FEW_ROWS + 1, MULTI_ROWS + MULTI_ROWS // 2 + MULTI_ROWS_MIN + 3)
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        writer.insert([entry("single", **fields)])
        for size in sizes:
            bare = [entry("bare") for _ in range(size - 1)]
            writer.insert([entry("batch", **fields), *bare])
        assert sidelog.verify().ok
        # As stored: text, not what SQLAlchemy makes of it when reading.
        query = "SELECT * FROM sidelog_entries ORDER BY id"
        with writer.lock, writer.engine.connect() as conn:
            single, *rows = (row._asdict() for row in conn.exec_driver_sql(query))
    assert len(rows) == sum(sizes)
    volatile = ("id", "uuid", "event", "seq", "hash")
    for row in rows:
        if row["event"] == "batch":
            assert {k: v for k, v in single.items() if k not in volatile} == {
                k: v for k, v in row.items() if k not in volatile
            }
        else:
            assert single["created_at"] == row["created_at"]
            assert row["data"] in (None, "null")


def test_a_batch_keeps_its_order_whatever_its_null_columns(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """SQLite takes each run of rows with NULL in the same columns by an
    INSERT of its own: rows are still stored in the order given, with
    their NULLs."""
    app, sidelog = build(SIDELOG_WRITE_MODE="sync")
    kinds = ["bare", "full", "full", "bare", "full", "bare"]
    # Runs long enough for multi-row INSERTs, between short ones.
    kinds += ["full"] * (MULTI_ROWS + 1) + ["bare"] * MULTI_ROWS_MIN + ["full"]
    batch = [
        make_entry(kind, actor="ann", status_code=200)
        if kind == "full"
        else make_entry(kind)
        for kind in kinds
    ]
    with app.app_context():
        app.extensions["sidelog"].writer.insert(batch)
        assert sidelog.verify().ok
        found = sidelog.entries(limit=len(kinds))
    assert stored_events(app, database_uri) == kinds
    for entry in found:
        full = entry["event"] == "full"
        assert (entry["actor"], entry["status_code"]) == (
            ("ann", 200) if full else (None, None)
        )


@pytest.mark.skipif(
    not hasattr(sqlite3.Connection, "setlimit"), reason="Python 3.11+ sets the limit"
)
@pytest.mark.parametrize("backend", ["sqlite_file"])
def test_a_long_batch_keeps_within_the_connections_limit_of_parameters(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """A multi-row INSERT binds a parameter per value: no more than the
    connection takes, whose limit a build of SQLite may set lower than its
    default (999 before 3.32)."""
    app, sidelog = build(SIDELOG_WRITE_MODE="sync")
    limit = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER  # type: ignore[attr-defined]
    size = MULTI_ROWS + 1
    with app.app_context():
        writer = app.extensions["sidelog"].writer

        @sa.event.listens_for(writer.engine, "connect")
        def _lower_the_limit(dbapi_connection: t.Any, record: t.Any) -> None:
            dbapi_connection.setlimit(limit, 999)

        writer.engine.dispose()  # new connections, with the limit
        writer.insert([make_entry("bare") for _ in range(size)])
        assert sidelog.verify().ok
        with writer.engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            assert driver.getlimit(limit) == 999
    assert stored_events(app, database_uri) == ["bare"] * size


def test_runs_of_rows_that_share_their_fields_are_stored_as_single_entries_are(
    build: t.Callable[..., Built], database_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entries of a flush's changes share every field but uuid and data,
    which SQLite's writer converts once for each run of them. Runs of every
    NULL pattern, long and short, and single entries between them, are
    stored in order, each as it is when written alone."""
    app, sidelog = build(SIDELOG_WRITE_MODE="sync")
    groups: list[list[int]] = []  # the rows of each INSERT, by group
    linked_values = Writer._linked_values

    def spy(self: Writer, *args: t.Any) -> t.Any:
        found = linked_values(self, *args)
        groups.append([len(rows) for _, rows in found])
        return found

    monkeypatch.setattr(Writer, "_linked_values", spy)
    at = datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-3)))

    def run(event: str, length: int, **fields: t.Any) -> list[dict[str, t.Any]]:
        template = make_entry(event, **fields)
        template["created_at"] = at
        return [dict(template, uuid=new_uuid(), data={"i": i}) for i in range(length)]

    full = {"actor": "ann", "status_code": 200, "duration_ms": 0.0}
    batch = [
        *run("full", MULTI_ROWS_MIN + 6, **full),
        *run("bare", 3),
        make_entry("single", actor="cy"),
        *run("actor", MULTI_ROWS + 5, actor="bob"),
        *run("full", 2, **full),
    ]
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        writer.insert(batch)
        if database_uri.startswith("sqlite"):
            # The runs went by their shared values: "single" with "actor",
            # whose NULL columns it shares, in one INSERT.
            assert groups == [[MULTI_ROWS_MIN + 6, 3, 1 + MULTI_ROWS + 5, 2]]
        for entry in batch:
            writer.insert([dict(entry, uuid=new_uuid())])
        assert sidelog.verify().ok
        query = "SELECT * FROM sidelog_entries ORDER BY id"
        with writer.lock, writer.engine.connect() as conn:
            stored = [row._asdict() for row in conn.exec_driver_sql(query)]
    volatile = ("id", "uuid", "seq", "hash")
    as_stored = [{k: v for k, v in row.items() if k not in volatile} for row in stored]
    assert len(stored) == 2 * len(batch)
    assert as_stored[: len(batch)] == as_stored[len(batch) :]
    assert [row["uuid"] for row in stored[: len(batch)]] == [e["uuid"] for e in batch]
    assert as_stored[0]["actor"] == "ann" and as_stored[0]["duration_ms"] == 0.0


class _NoLimits(sqlite3.Connection):
    """A driver connection that cannot tell its limits (Python 3.10's has
    no getlimit at all)."""

    def getlimit(self, category: int) -> int:
        raise sqlite3.NotSupportedError("no limits here")


@pytest.mark.skipif(
    sqlite3.sqlite_version_info < (3, 32), reason="SQLite 3.32+ takes 32,766"
)
@pytest.mark.parametrize("backend", ["sqlite_file"])
def test_a_long_batch_assumes_the_default_limit_if_the_driver_cannot_tell(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """Without a limit from the driver, SQLite's default: 32,766 parameters."""
    app, sidelog = build(
        SIDELOG_WRITE_MODE="sync",
        SIDELOG_ENGINE_OPTIONS={"connect_args": {"factory": _NoLimits}},
    )
    size = MULTI_ROWS + 1
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        writer.insert([make_entry("bare") for _ in range(size)])
        assert sidelog.verify().ok
        with writer.engine.connect() as conn:
            assert isinstance(conn.connection.driver_connection, _NoLimits)
            assert _multi_rows(conn, 100) == MULTI_ROWS  # 25,600 parameters
            assert _multi_rows(conn, 200) == MULTI_ROWS // 2  # 25,600 too
    assert stored_events(app, database_uri) == ["bare"] * size


@pytest.mark.parametrize("backend", ["sqlite_file", "sqlite_memory"])
def test_a_failed_long_batch_is_reported_with_one_rows_placeholders(
    build: t.Callable[..., Built], database_uri: str
) -> None:
    """A multi-row INSERT that fails is reported (raised, logged with the
    spooled entries) with its statement cut to one row, not hundreds."""
    app, sidelog = build(SIDELOG_WRITE_MODE="sync")
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        first = make_entry("first")
        writer.insert([first])
        batch = [make_entry("again") for _ in range(MULTI_ROWS - 1)] + [first]
        with pytest.raises(sa.exc.IntegrityError) as caught:
            writer.insert(batch)
    statement = caught.value.statement
    assert statement is not None
    assert statement.endswith(f"... ({MULTI_ROWS} rows)")
    # One row's placeholders at most, in what is logged or raised.
    assert str(caught.value).count("?") <= len(chain.HASHED_FIELDS) + 2
    assert stored_events(app, database_uri) == ["first"]


@pytest.mark.parametrize("chained", [True, False], ids=["chain", "no-chain"])
@pytest.mark.parametrize("size", [1, FEW_ROWS + 1], ids=["few", "copy"])
def test_a_failed_write_leaves_its_connection_as_it_was(
    build: t.Callable[..., Built], database_uri: str, chained: bool, size: int
) -> None:
    """On PostgreSQL a write runs psycopg in autocommit mode, with its own
    BEGIN and COMMIT. A write that fails must give the pool back its one
    connection out of autocommit and out of any transaction: otherwise the
    next transaction of the log engine (a prune) would commit statement by
    statement."""
    one_connection = {"pool_size": 1, "max_overflow": 0}
    app, sidelog = build(
        SIDELOG_WRITE_MODE="sync",
        SIDELOG_CHAIN=chained,
        # sqlite:// has one connection already, in a pool that takes no size.
        SIDELOG_ENGINE_OPTIONS={} if database_uri == "sqlite://" else one_connection,
    )
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        written = [make_entry("first") for _ in range(size)]
        writer.insert(written)
        with pytest.raises(sa.exc.IntegrityError):  # the same uuids again
            writer.insert([make_entry("lost") for _ in range(size - 1)] + written[:1])
        with writer.engine.connect() as conn:
            driver = conn.connection.driver_connection
            if conn.dialect.name == "postgresql":
                assert driver is not None
                assert driver.autocommit is False
            conn.exec_driver_sql("DELETE FROM sidelog_entries")
            conn.rollback()  # not committed: a transaction, as it should be
        writer.insert([make_entry("after") for _ in range(size)])
        events = [e["event"] for e in sidelog.entries(limit=100)]
        assert events == ["first"] * size + ["after"] * size
        assert sidelog.verify().ok is chained


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_autocommit_log_engine_stays_autocommit(
    build: t.Callable[..., Built],
) -> None:
    """A write switches psycopg to autocommit and back to what it was: an
    engine configured with isolation_level="AUTOCOMMIT" keeps it."""
    app, sidelog = build(
        SIDELOG_ENGINE_OPTIONS={
            "isolation_level": "AUTOCOMMIT",
            "pool_size": 1,
            "max_overflow": 0,
        }
    )
    with app.app_context():
        sidelog.log("first")
        sidelog.log("second")
        writer = app.extensions["sidelog"].writer
        with writer.engine.connect() as conn:
            assert conn.connection.driver_connection.autocommit is True
            if conn.dialect.name == "postgresql":
                # The chain's append function is made without a savepoint.
                assert chain.has_append_function(conn, writer.table)
        assert [e["event"] for e in sidelog.entries()] == ["first", "second"]


def test_group_commit_waits_for_running_audited_requests(
    build: t.Callable[..., Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load, a commit waits a little for the audited requests still
    running in the process, so that their entries share it."""
    monkeypatch.setattr("flask_sidelog.batching.GATHER_SECONDS", 30.0)
    app, sidelog = build(SIDELOG_WRITE_MODE="group")
    with app.app_context():
        sidelog.create_table()
        writer = app.extensions["sidelog"].writer
    committer = writer._batcher
    batches: list[list[str]] = []
    insert = writer.insert
    monkeypatch.setattr(
        writer,
        "insert",
        lambda entries: (
            batches.append([e["event"] for e in entries]),
            insert(entries),
        ),
    )
    slow_may_end = threading.Event()

    @app.post("/slow")
    @sidelog.audit("slow")
    def slow() -> str:
        slow_may_end.wait(30)
        return "ok"

    @app.post("/quick")
    @sidelog.audit("quick")
    def quick() -> str:
        return "ok"

    def call(i: int) -> None:
        if i == 0:
            assert app.test_client().post("/slow").status_code == 200
            return
        wait_until(lambda: len(committer._running) == 1)
        assert app.test_client().post("/quick").status_code == 200

    def release_slow_once_quick_waits(i: int) -> None:
        wait_until(lambda: committer._leading)  # quick leads, gathering
        slow_may_end.set()

    threads = [
        threading.Thread(target=call, args=(0,)),
        threading.Thread(target=call, args=(1,)),
        threading.Thread(target=release_slow_once_quick_waits, args=(2,)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert batches == [["quick", "slow"]]
    assert not committer._running and not committer._waiting


def test_group_commit_alone_does_not_wait(
    build: t.Callable[..., Built],
    database_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request alone, logging from its view too, never waits for itself."""
    monkeypatch.setattr("flask_sidelog.batching.GATHER_SECONDS", 30.0)
    app, sidelog = build(SIDELOG_WRITE_MODE="group")

    @app.post("/")
    @sidelog.audit("audited")
    def view() -> str:
        sidelog.log("inside")
        return "ok"

    statuses: list[int] = []
    caller = threading.Thread(
        target=lambda: statuses.append(app.test_client().post("/").status_code)
    )
    caller.start()
    caller.join(timeout=15)  # far below the 30 s a wait for itself would take
    assert not caller.is_alive()
    assert statuses == [200]
    assert stored_events(app, database_uri) == ["inside", "audited"]


def wait_until(ready: t.Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.005)


def test_group_request_that_fails_to_make_its_entry_stops_counting(
    build: t.Callable[..., Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Otherwise every later commit of the process would wait for it."""
    app, sidelog = build(SIDELOG_WRITE_MODE="group")

    @app.post("/")
    @sidelog.audit("audited")
    def view() -> str:
        return "ok"

    def broken(*args: t.Any, **kwargs: t.Any) -> t.NoReturn:
        raise RuntimeError("no entry")

    monkeypatch.setattr("flask_sidelog.extension.make_entry", broken)
    assert app.test_client().post("/").status_code == 200
    committer = app.extensions["sidelog"].writer._batcher
    assert not committer._running


class Interrupt(BaseException):
    """Like KeyboardInterrupt, without stopping pytest."""


def test_group_leader_interrupted_while_gathering_hands_over(
    build: t.Callable[..., Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader interrupted before it commits still hands over: later
    writers are not left waiting for a leader that is gone."""
    app, sidelog = build(SIDELOG_WRITE_MODE="group")
    with app.app_context():
        sidelog.create_table()
        committer = app.extensions["sidelog"].writer._batcher
    gather = committer._gather
    calls: list[int] = []

    def interrupted_once(size: int) -> None:
        calls.append(size)
        if len(calls) == 1:
            raise Interrupt()
        gather(size)

    monkeypatch.setattr(committer, "_gather", interrupted_once)
    raised: list[BaseException] = []

    def first(i: int) -> None:
        with app.app_context():
            try:
                sidelog.log("interrupted")
            except Interrupt as e:
                raised.append(e)

    def later(i: int) -> None:
        with app.app_context():
            sidelog.log("later")

    run_threads(1, first)
    run_threads(1, later)  # would wait forever for the interrupted leader
    assert len(raised) == 1
    assert not committer._leading and not committer._waiting


def _start(app: Flask, sidelog: SideLog, event: str) -> threading.Thread:
    def call() -> None:
        with app.app_context(), contextlib.suppress(Interrupt):
            sidelog.log(event)

    thread = threading.Thread(target=call, name=event, daemon=True)
    thread.start()
    return thread


def _wait_for(condition: t.Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("when", ["queued", "handed_the_lead", "in_a_batch"])
def test_group_caller_interrupted_while_it_waits(
    build: t.Callable[..., Built],
    database_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """A caller whose wait is interrupted (Ctrl-C, a job timeout raised by a
    signal handler) leaves the queue: the lead passes on, later callers are
    not left waiting for it, and its entries are written or spooled, never
    dropped. Left in the queue, it was handed the lead it never took, and
    every later caller of the process waited forever."""
    app, sidelog = build(
        SIDELOG_WRITE_MODE="group", SIDELOG_BATCH_SIZE=1 if when != "in_a_batch" else 10
    )
    with app.app_context():
        sidelog.create_table()
        writer = app.extensions["sidelog"].writer
    committer = writer._batcher
    interrupted: list[t.Any] = []
    wait = _Waiter.wait

    def interrupted_wait(waiter: t.Any) -> None:
        if waiter.entries[0]["event"] != "interrupted":
            return wait(waiter)
        interrupted.append(waiter)
        if when == "handed_the_lead":
            wait(waiter)  # woken to lead, then interrupted
        elif when == "in_a_batch":  # once a leader took it into its batch
            _wait_for(lambda: waiter not in committer._waiting)
        raise Interrupt()

    monkeypatch.setattr(_Waiter, "wait", interrupted_wait)
    insert = writer.insert
    # In a batch: another caller first in line leads it; else the first in
    # line is the interrupted one.
    queue = ["interrupted", "later"]
    if when == "in_a_batch":
        queue.reverse()

    inserted: list[str] = []

    def held_insert(entries: list[dict[str, t.Any]]) -> None:
        events = [e["event"] for e in entries]
        inserted.extend(events)
        if events == ["first"]:  # until the others queue behind it
            _wait_for(lambda: len(committer._waiting) == 2 or interrupted)
        if "interrupted" in events:  # until its caller stopped waiting
            _wait_for(lambda: interrupted[0].gone)
        insert(entries)

    monkeypatch.setattr(writer, "insert", held_insert)
    with failures(app) as failed:
        threads = [_start(app, sidelog, "first")]
        _wait_for(lambda: committer._leading)
        for event in queue:  # one after the other, in this order
            threads.append(_start(app, sidelog, event))
            # Arrived: waiting, interrupted, or (taking its turn at once)
            # already inserted.
            _wait_for(
                lambda e=event: (
                    e
                    in [
                        *(w.entries[0]["event"] for w in interrupted),
                        *(w.entries[0]["event"] for w in committer._waiting),
                        *inserted,
                    ]
                )
            )
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads)
        (waiter,) = interrupted
        _start(app, sidelog, "after").join(20)  # would wait forever
    stored = set(stored_events(app, database_uri))
    assert {"first", "later", "after"} <= stored
    if when == "in_a_batch":
        # Committed with its batch, and reported by the leader.
        assert "interrupted" in stored and failed == [] and waiter.done
    else:
        assert "interrupted" not in stored
        assert [str(e) for e in failed] == [
            "the thread waiting for this entry was interrupted"
        ]
        with open(app.extensions["sidelog"].settings.spool_path) as spool:
            assert ['"interrupted"' in line for line in spool] == [True]
    assert not committer._leading and not committer._waiting


def test_group_request_whose_teardown_was_skipped_stops_counting(
    build: t.Callable[..., Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teardown that raises skips the ones after it, flask-sidelog's
    included; the request stops counting when its context is dropped, so
    later commits do not wait for it."""
    monkeypatch.setattr("flask_sidelog.batching.GATHER_SECONDS", 30.0)
    app, sidelog = build(SIDELOG_WRITE_MODE="group")

    @app.post("/")
    @sidelog.audit("audited")
    def view() -> str:
        return "ok"

    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        raise RuntimeError("a teardown that raises")

    with pytest.raises(RuntimeError, match="a teardown that raises"):
        app.test_client().post("/")
    app.teardown_appcontext_funcs.remove(broken)
    gc.collect()
    committer = app.extensions["sidelog"].writer._batcher
    assert not committer._running

    def later(i: int) -> None:
        with app.app_context():
            sidelog.log("later")

    run_threads(1, later)  # would wait 30 s for the dropped request
