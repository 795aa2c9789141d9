"""``flask sidelog`` stats, export, prune, and the commands as real processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskCliRunner

import flask_sidelog
import flask_sidelog.query
from _entries import add_entries
from _entries import ago
from conftest import dispose
from conftest import make_app
from flask_sidelog import SideLog
from flask_sidelog.engine import sqlite_path
from flask_sidelog.model import make_entries_table


def count(app: Flask) -> int:
    with app.app_context():
        return len(app.extensions["sidelog"].extension.entries(limit=10_000))


def test_stats_failed_first(app: Flask, runner: FlaskCliRunner) -> None:
    add_entries(
        app,
        *[dict(event="funds.transfer", outcome="success", created_at=ago(hours=1))] * 5,
        *[dict(event="funds.transfer", outcome="failure", created_at=ago(hours=2))] * 2,
        dict(event="login.failed", created_at=ago(hours=3)),
        dict(event="admin.wipe", outcome="error", created_at=ago(hours=4)),
        dict(event="funds.transfer", outcome="error", created_at=ago(days=2)),
    )
    result = runner.invoke(args=["sidelog", "stats"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == ["count", "outcome", "last", "(UTC)", "event"]
    assert [(r.split()[0], r.split()[1], r.split()[-1]) for r in rows] == [
        ("2", "failure", "funds.transfer"),
        ("1", "error", "admin.wipe"),
        ("5", "success", "funds.transfer"),
        ("1", "-", "login.failed"),
    ]
    result = runner.invoke(args=["sidelog", "stats", "--since", "90m"])
    assert [r.split()[1] for r in result.output.splitlines()[1:]] == ["success"]
    result = runner.invoke(args=["sidelog", "stats", "--since", "1s"])
    assert result.output.startswith("No entries since ")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_to_a_file(
    app: Flask, runner: FlaskCliRunner, tmp_path: t.Any, fmt: str
) -> None:
    written = add_entries(
        app,
        *[
            dict(event=f"login.{i % 3}", actor=f"u{i}", data={"i": i, "s": "a\nb"})
            for i in range(30)
        ],
        dict(event="other", created_at=ago(days=1)),
    )
    out = tmp_path / f"out.{fmt}"
    result = runner.invoke(
        args=[
            "sidelog",
            "export",
            "--format",
            fmt,
            "-o",
            str(out),
            "--event",
            "login.*",
        ]
    )
    assert result.exit_code == 0, result.output
    assert f"Exported 30 entries to {out}." in result.output
    with open(out, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            read = [json.loads(line) for line in f]
        else:
            read = list(csv.DictReader(f))
            for row in read:
                row["data"] = json.loads(row["data"])
    assert [r["uuid"] for r in read] == [w["uuid"] for w in written[:30]]
    assert [r["data"] for r in read] == [w["data"] for w in written[:30]]


def test_export_to_a_file_that_cannot_be_written(
    app: Flask, runner: FlaskCliRunner, tmp_path: t.Any
) -> None:
    add_entries(app, dict(event="kept"))
    for target, reason in (
        (tmp_path / "no-such-dir" / "out.jsonl", "No such file or directory"),
        ("/dev/full", "No space left on device"),
    ):
        result = runner.invoke(args=["sidelog", "export", "-o", str(target)])
        assert result.exit_code == 1
        assert result.output.startswith(f"Error: cannot write {target}: {reason}")
        assert "Traceback" not in result.output


def test_export_refuses_the_apps_own_files(
    app: Flask, runner: FlaskCliRunner, sidelog: SideLog
) -> None:
    """Opening --output empties it: pointed at the log's database file or
    the spool, an export wiped the log it was exporting."""
    add_entries(app, dict(event="kept"))
    state = app.extensions["sidelog"]
    targets = [state.settings.spool_path]
    os.makedirs(os.path.dirname(state.settings.spool_path), exist_ok=True)
    with open(state.settings.spool_path, "w") as spool:
        spool.write('{"event": "spooled"}\n')
    database = sqlite_path(state.writer.engine.url)
    if database is not None:  # a file of its own
        targets.append(database)
    for target in targets:
        result = runner.invoke(args=["sidelog", "export", "-o", target])
        assert result.exit_code == 2, result.output
        assert "which exporting would empty; give another file" in result.output
    assert count(app) == 1
    with open(state.settings.spool_path) as spool:
        assert spool.read() == '{"event": "spooled"}\n'
    # A spool not there yet: created by the export, it would hold lines
    # replay cannot read.
    os.remove(state.settings.spool_path)
    relative = os.path.relpath(state.settings.spool_path)
    result = runner.invoke(args=["sidelog", "export", "-o", relative])
    assert result.exit_code == 2, result.output
    assert not os.path.exists(state.settings.spool_path)


def test_export_refuses_the_spools_companions_and_no_name(
    app: Flask, runner: FlaskCliRunner
) -> None:
    """The spool's lock file was filled with JSON, and an empty --output
    said 'cannot write : ...; it is incomplete' though nothing was written."""
    add_entries(app, dict(event="kept"))
    state = app.extensions["sidelog"]
    spool = state.settings.spool_path
    os.makedirs(os.path.dirname(spool), exist_ok=True)
    targets = [spool + ".lock", spool + ".replay-123-abc"]
    database = sqlite_path(state.writer.engine.url)
    if database is not None:
        targets += [database + "-journal", database + "-wal", database + "-shm"]
    for target in targets:
        result = runner.invoke(args=["sidelog", "export", "-o", target])
        assert result.exit_code == 2, result.output
        assert "which exporting would empty; give another file" in result.output
        assert not os.path.exists(target)
    with open(spool + ".lock", "w"):
        pass
    result = runner.invoke(args=["sidelog", "export", "-o", spool + ".lock"])
    assert result.exit_code == 2, result.output
    assert os.path.getsize(spool + ".lock") == 0
    result = runner.invoke(args=["sidelog", "export", "-o", ""])
    assert result.exit_code == 2, result.output
    assert "--output is empty: give a file name, or - for standard output" in (
        result.output
    )
    assert "Traceback" not in result.output
    # A file that only starts like them is fine.
    other = spool + ".lock.jsonl"
    assert runner.invoke(args=["sidelog", "export", "-o", other]).exit_code == 0
    assert os.path.getsize(other) > 0


@pytest.mark.parametrize("command", ["show", "export"])
def test_since_after_until(app: Flask, runner: FlaskCliRunner, command: str) -> None:
    """Nothing can match: a mistake (a time ago given as --until), which
    answered 'Exported 0 entries.' as if the log were empty."""
    add_entries(app, dict(event="kept"))
    args = ["sidelog", command, "--since", "1h", "--until", "2h"]
    result = runner.invoke(args=args)
    assert result.exit_code == 2, result.output
    assert ") must be before --until (" in result.output
    assert "Traceback" not in result.output
    assert runner.invoke(args=["sidelog", command, "--since", "2h"]).exit_code == 0


def test_verify_from_a_seq_beyond_any(app: Flask, runner: FlaskCliRunner) -> None:
    """Once an OverflowError from the driver, as a traceback."""
    add_entries(app, dict(event="kept"))
    result = runner.invoke(args=["sidelog", "verify", "--from", str(2**64)])
    assert result.exit_code == 2
    assert "is not in the range 1<=x<=9223372036854775807" in result.output


def test_show_data_that_is_not_an_object(app: Flask, runner: FlaskCliRunner) -> None:
    """Written past flask-sidelog (by hand, or by someone tampering)."""
    (entry,) = add_entries(app, dict(event="odd"))
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        with writer.engine.begin() as conn:
            conn.execute(
                writer.table.update().values(data=[1, "two"]),
            )
    result = runner.invoke(args=["sidelog", "show"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].rstrip().endswith('[1, "two"]')


def test_export_to_stdout_oldest_first(app: Flask, runner: FlaskCliRunner) -> None:
    add_entries(
        app,
        dict(event="new", created_at=ago(minutes=1)),
        dict(event="old", created_at=ago(days=1)),
    )
    result = runner.invoke(args=["sidelog", "export"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line)["event"] for line in lines] == ["old", "new"]


@pytest.mark.parametrize("backend", ["postgres"])
def test_export_streams_through_a_server_side_cursor(
    app: Flask, sidelog: SideLog
) -> None:
    add_entries(app, *[dict(event="e")] * 3)
    cursors: list[str | None] = []
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine

        @sa.event.listens_for(engine, "before_cursor_execute")
        def record(conn: t.Any, cursor: t.Any, *args: t.Any) -> None:
            cursors.append(getattr(cursor, "name", None))

        assert len(list(sidelog.iter_entries(event="e"))) == 3
        sa.event.remove(engine, "before_cursor_execute", record)
    assert cursors and cursors[-1]  # a named cursor is a server-side one


@pytest.mark.parametrize("backend", ["sqlite_file", "sqlite_memory"])
def test_export_reads_sqlite_page_by_page(
    app: Flask, sidelog: SideLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flask_sidelog.query, "STREAM_BATCH", 2)
    same = ago(minutes=5)
    written = add_entries(
        app,
        *[dict(event=f"tie{i}", created_at=same) for i in range(3)],
        dict(event="later", created_at=ago(minutes=1)),
        dict(event="first", created_at=ago(minutes=9)),
        dict(event="skip", created_at=ago(minutes=4)),
    )
    with app.app_context():
        found = [e["event"] for e in sidelog.iter_entries()]
    assert found == ["first", "tie0", "tie1", "tie2", "skip", "later"]
    assert len(written) == 6


@pytest.mark.parametrize("backend", ["sqlite_file"])
def test_export_does_not_lock_out_sqlite_writers(
    app: Flask, sidelog: SideLog, database_uri: str
) -> None:
    add_entries(app, *[dict(event="e")] * 5)
    path = sa.make_url(database_uri).database
    assert path is not None
    with app.app_context():
        entries = sidelog.iter_entries()
        assert next(entries)["event"] == "e"
        # Another process writing the file, and not willing to wait.
        other = sqlite3.connect(path, timeout=0)
        try:
            with other:
                other.execute("CREATE TABLE other (x)")
                other.execute("INSERT INTO other VALUES (1)")
        finally:
            other.close()
        assert len(list(entries)) == 4


def test_prune(app: Flask, runner: FlaskCliRunner) -> None:
    add_entries(
        app,
        *[dict(event="old", created_at=ago(days=40))] * 3,
        *[dict(event="new", created_at=ago(days=1))] * 2,
    )
    args = ["sidelog", "prune", "--before", "30d"]
    result = runner.invoke(args=[*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("3 entries created before ")
    assert result.output.endswith(" would be deleted.\n")
    assert count(app) == 5

    result = runner.invoke(args=args, input="n\n")
    assert result.exit_code == 1
    assert "Delete 3 entries created before " in result.output
    assert count(app) == 5

    before = "2020-01-02T03:04:05.678901Z"
    for dry_run in (["--dry-run"], []):
        result = runner.invoke(args=["sidelog", "prune", "--before", before, *dry_run])
        assert result.output == f"No entries created before {before} to delete.\n"

    result = runner.invoke(args=args, input="y\n")
    assert result.exit_code == 0, result.output
    assert "Deleted 3 entries created before " in result.output
    assert count(app) == 2

    # The chain loses its oldest entries only: an old entry chained after
    # newer ones (a replayed one) stays until they go.
    add_entries(app, dict(event="old", created_at=ago(days=31)))
    result = runner.invoke(args=[*args, "--yes"])
    assert result.output.startswith("No entries created before")
    assert count(app) == 3
    result = runner.invoke(args=["sidelog", "prune", "--before", "12h", "--yes"])
    assert result.output.startswith("Deleted 3 entries")
    assert count(app) == 0
    assert runner.invoke(args=["sidelog", "verify"]).exit_code == 0


def test_prune_without_the_chain_goes_by_age_alone(
    database_uri: str, tmp_path: t.Any
) -> None:
    app, _, _ = make_app(
        database_uri, str(tmp_path / "instance"), {"SIDELOG_CHAIN": False}
    )
    try:
        add_entries(
            app,
            dict(event="new", created_at=ago(days=1)),
            dict(event="old", created_at=ago(days=31)),
        )
        args = ["sidelog", "prune", "--before", "30d", "--yes"]
        result = app.test_cli_runner().invoke(args=args)
        assert result.output.startswith("Deleted 1 entries")
        assert count(app) == 1
    finally:
        dispose(app)


def test_prune_deletes_in_batches(app: Flask, sidelog: SideLog) -> None:
    add_entries(
        app,
        *[dict(event="old", created_at=ago(days=2))] * 12,
        dict(event="new", created_at=ago(hours=1)),
    )
    statements: list[str] = []
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine

        @sa.event.listens_for(engine, "before_cursor_execute")
        def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
            statements.append(statement)

        assert sidelog.prune(ago(days=1), dry_run=True) == 12
        assert not any(s.startswith("DELETE") for s in statements)
        assert sidelog.prune(ago(days=1), batch_size=5) == 12
        sa.event.remove(engine, "before_cursor_execute", record)
        assert [e["event"] for e in sidelog.entries()] == ["new"]
        with pytest.raises(ValueError, match="batch_size must be 1 or more"):
            sidelog.prune(ago(days=1), batch_size=0)
    assert sum(s.startswith("DELETE") for s in statements) == 3


APP_MODULE = """
import os

from flask import Flask

from flask_sidelog import SideLog


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["LOGAPP_URI"]
    SideLog(app)
    return app
"""


def flask_process(
    tmp_path: t.Any, uri: str, *args: str, **popen: t.Any
) -> subprocess.Popen[str]:
    """``flask --app logapp sidelog ARGS`` as a process of its own."""
    (tmp_path / "logapp.py").write_text(textwrap.dedent(APP_MODULE))
    package_root = os.path.dirname(os.path.dirname(flask_sidelog.__file__))
    env = dict(
        os.environ,
        LOGAPP_URI=uri,
        PYTHONPATH=os.pathsep.join([str(tmp_path), package_root]),
        COLUMNS="200",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "logapp", "sidelog", *args],
        cwd=tmp_path,
        env=env,
        text=True,
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen},
    )


@pytest.fixture
def file_app(tmp_path: t.Any) -> t.Iterator[tuple[Flask, str]]:
    uri = f"sqlite:///{tmp_path / 'log.db'}"
    app, _, _ = make_app(uri, str(tmp_path / "instance"), with_db=False)
    yield app, uri
    dispose(app)


@pytest.mark.parametrize("command", ["show", "export", "stats"])
def test_output_to_a_full_disk(
    file_app: tuple[Flask, str], tmp_path: t.Any, command: str
) -> None:
    app, uri = file_app
    add_entries(app, *[dict(event="login.failed")] * 50)
    with open("/dev/full", "w") as full:
        proc = flask_process(tmp_path, uri, command, stdout=full)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == "Error: cannot write the output: No space left on device\n"


def test_show_as_a_real_process(file_app: tuple[Flask, str], tmp_path: t.Any) -> None:
    app, uri = file_app
    add_entries(app, dict(event="login.failed", actor="mallory\x1b[2J"))
    proc = flask_process(tmp_path, uri, "show")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    header, row = out.splitlines()
    assert header.startswith("time (UTC)")
    assert "login.failed" in row
    assert "mallory\\x1b[2J" in row

    proc = flask_process(tmp_path, uri, "show", "--since", "someday")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "Invalid value for '--since': expected an ISO 8601 date" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_follow_until_ctrl_c(file_app: tuple[Flask, str], tmp_path: t.Any) -> None:
    app, uri = file_app
    add_entries(app, dict(event="first"), dict(event="skipped", actor="bob"))
    lines: list[str] = []
    got_line = threading.Event()
    with flask_process(
        tmp_path, uri, "show", "-f", "--format", "jsonl", "--event", "first*"
    ) as proc:

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                got_line.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert got_line.wait(60), "show -f printed nothing"
            got_line.clear()
            add_entries(app, dict(event="later"), dict(event="first.again"))
            assert got_line.wait(60), "show -f did not print the new entry"
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(10)
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert err == ""
    assert [json.loads(line)["event"] for line in lines] == ["first", "first.again"]


# Not sqlite://, where the log has a database of its own.
@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_init_refuses_a_table_of_the_apps(database_uri: str, tmp_path: t.Any) -> None:
    """SIDELOG_TABLE naming an app table: init said it already existed, then
    every write was spooled and show failed on a missing column."""
    from conftest import Account

    config = {"SIDELOG_TABLE": "account", "SIDELOG_CREATE_TABLE": False}
    app, db, _ = make_app(database_uri, str(tmp_path / "instance"), config)
    try:
        assert db is not None
        with app.app_context():
            Account.metadata.create_all(db.engine, tables=[Account.__table__])
            columns = [c["name"] for c in sa.inspect(db.engine).get_columns("account")]
        result = app.test_cli_runner().invoke(args=["sidelog", "init"])
        assert result.exit_code == 1, result.output
        (line,) = result.output.splitlines()
        assert line.startswith("Error: account in ")
        assert (
            " is not a flask-sidelog table (it has no uuid, created_at, event,"
        ) in line
        assert line.endswith(
            "): set SIDELOG_TABLE to a name no other table has, and run"
            " `flask sidelog init` again."
        )
        with app.app_context():
            after = [c["name"] for c in sa.inspect(db.engine).get_columns("account")]
        assert after == columns
    finally:
        dispose(app)


def entries_table_ddl(engine: sa.Engine) -> list[str]:
    """The entries table's CREATE TABLE for ``engine``, line by line."""
    table = make_entries_table("sidelog_entries")
    return str(sa.schema.CreateTable(table).compile(engine)).strip().splitlines()


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_init_on_an_entries_table_made_before_the_chain(
    database_uri: str, tmp_path: t.Any
) -> None:
    """It is the log's table: the advice is to add the chain's columns, not
    to pick another table (and lose sight of the history it holds)."""
    app, _, sidelog = make_app(database_uri, str(tmp_path / "instance"))
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
    ddl = entries_table_ddl(engine)
    ddl = [line for line in ddl if not line.strip().startswith(("seq ", "hash "))]
    ddl = [line for line in ddl if "UNIQUE (seq)" not in line]
    ddl[-2] = ddl[-2].rstrip().rstrip(",")  # the last column or constraint
    with engine.begin() as conn:
        conn.exec_driver_sql("\n".join(ddl))
    try:
        result = app.test_cli_runner().invoke(args=["sidelog", "init"])
        assert result.exit_code == 1, result.output
        (line,) = result.output.splitlines()
        assert line.endswith(
            " was made before the hash chain (it has no seq, hash): add the"
            " chain's columns as docs/tamper-evidence.rst shows ('Adding the chain"
            " to an existing table'), and run `flask sidelog init` again."
        ), line
        # Half the recipe applied (SQLite refuses its ADD COLUMN ... UNIQUE).
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE sidelog_entries ADD COLUMN hash TEXT")
        result = app.test_cli_runner().invoke(args=["sidelog", "init"])
        assert result.exit_code == 1, result.output
        assert "was made before the hash chain (it has no seq): add" in result.output
        # The columns alone: init makes the checkpoints table that prune needs.
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE sidelog_entries ADD COLUMN seq BIGINT")
        result = app.test_cli_runner().invoke(args=["sidelog", "init"])
        assert result.exit_code == 0, result.output
        with app.app_context():
            sidelog.log("chained")
        prune = ["sidelog", "prune", "--before", "0s", "--yes"]
        result = app.test_cli_runner().invoke(args=prune)
        assert result.exit_code == 0, result.output
    finally:
        dispose(app)


def test_init_that_may_not_make_the_checkpoints_table(tmp_path: t.Any) -> None:
    """A read-only connection (or a role without CREATE) and a table made
    before the chain, its columns added: init warns, and still succeeds."""
    path = tmp_path / "log.db"
    app, _, _ = make_app(f"sqlite:///{path}", str(tmp_path / "instance"))
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("\n".join(entries_table_ddl(engine)))
    dispose(app)
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    app, _, _ = make_app(
        "sqlite://", str(tmp_path / "instance"), {"SIDELOG_DATABASE_URI": read_only}
    )
    try:
        result = app.test_cli_runner().invoke(args=["sidelog", "init"])
        assert result.exit_code == 0, result.output
        assert result.output.endswith("already exists.\n")
    finally:
        dispose(app)


def test_init_on_sqlite_column_names_in_another_case(tmp_path: t.Any) -> None:
    """SQLite compares names regardless of case: such a table works."""
    uri = f"sqlite:///{tmp_path / 'main.db'}"
    app, _, sidelog = make_app(uri, str(tmp_path / "instance"))
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
    names = [c.name for c in make_entries_table("sidelog_entries").c]
    ddl = entries_table_ddl(engine)
    for name in names:
        ddl = [line.replace(f"\t{name} ", f"\t{name.upper()} ") for line in ddl]
    with engine.begin() as conn:
        conn.exec_driver_sql("\n".join(ddl))
    try:
        result = app.test_cli_runner().invoke(args=["sidelog", "init"])
        assert result.exit_code == 0, result.output
        assert result.output.endswith("already exists.\n")
        with app.app_context():
            sidelog.log("works")
            assert [e["event"] for e in sidelog.entries()] == ["works"]
    finally:
        dispose(app)
