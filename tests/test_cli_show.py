"""``flask sidelog show``: filters, formats, escaping and what goes wrong."""

from __future__ import annotations

import csv
import io
import json
import socket
import sqlite3
import typing as t
import unicodedata

import pytest
from flask import Flask
from flask.testing import FlaskCliRunner

from _entries import add_entries
from _entries import ago
from conftest import Account
from conftest import dispose
from conftest import make_app
from flask_sidelog import render
from flask_sidelog import SideLog
from flask_sidelog.model import FIELDS
from flask_sidelog.query import entry_filters
from flask_sidelog.query import newest_first

NASTY = {
    "text": 'a,"b"\n\r\x1b[31mred\x07\u2028\u202eé😀\\x00',
    "numbers": [1, 2.5, -(2**62), None, True],
    "nested": {"k": {"deeper": ["", " "]}},
}


@pytest.fixture
def filled(app: Flask) -> Flask:
    add_entries(
        app,
        dict(
            event="login.failed",
            actor="alice",
            level="warning",
            created_at=ago(hours=3),
        ),
        dict(event="login.ok", actor="alice", created_at=ago(hours=2)),
        dict(
            event="funds.transfer",
            actor="bob",
            outcome="failure",
            status_code=403,
            level="warning",
            request_id="req-1",
            created_at=ago(minutes=50),
        ),
        dict(
            event="funds.transfer",
            actor="bob",
            outcome="success",
            status_code=200,
            request_id="req-2",
            created_at=ago(minutes=40),
        ),
        dict(
            event="funds.transfer",
            actor="carol",
            outcome="error",
            status_code=500,
            level="error",
            request_id="req-3",
            created_at=ago(minutes=5),
        ),
        dict(event="loginXok", actor="dave", created_at=ago(days=3)),
        dict(event="a_b%c", actor="x' OR '1'='1", created_at=ago(days=2)),
    )
    return app


def show(runner: FlaskCliRunner, *args: str) -> list[dict[str, t.Any]]:
    result = runner.invoke(args=["sidelog", "show", "--format", "jsonl", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def events(runner: FlaskCliRunner, *args: str) -> list[tuple[str, str | None]]:
    return [(e["event"], e["actor"]) for e in show(runner, *args)]


def test_newest_n_oldest_first(filled: Flask, runner: FlaskCliRunner) -> None:
    assert events(runner, "-n", "2") == [
        ("funds.transfer", "bob"),
        ("funds.transfer", "carol"),
    ]
    assert events(runner, "-n", "2", "--reverse") == [
        ("funds.transfer", "carol"),
        ("funds.transfer", "bob"),
    ]
    assert len(show(runner)) == 7
    assert show(runner, "--limit", "0") == []


def test_each_filter(filled: Flask, runner: FlaskCliRunner) -> None:
    assert events(runner, "--actor", "alice") == [
        ("login.failed", "alice"),
        ("login.ok", "alice"),
    ]
    assert events(runner, "--outcome", "error") == [("funds.transfer", "carol")]
    assert events(runner, "--level", "warning") == [
        ("login.failed", "alice"),
        ("funds.transfer", "bob"),
    ]
    assert events(runner, "--request-id", "req-2") == [("funds.transfer", "bob")]
    assert events(runner, "--event", "funds.transfer", "--since", "45m") == [
        ("funds.transfer", "bob"),
        ("funds.transfer", "carol"),
    ]
    until = ago(hours=1).isoformat()
    assert events(runner, "--since", "1d", "--until", until) == [
        ("login.failed", "alice"),
        ("login.ok", "alice"),
    ]
    day = ago(days=3).date().isoformat()
    assert ("loginXok", "dave") in events(runner, "--since", day)
    assert events(runner, "--until", ago(days=2, seconds=-1).isoformat()) == [
        ("loginXok", "dave"),
        ("a_b%c", "x' OR '1'='1"),
    ]


def test_event_glob(filled: Flask, runner: FlaskCliRunner) -> None:
    assert events(runner, "--event", "login.*") == [
        ("login.failed", "alice"),
        ("login.ok", "alice"),
    ]
    assert events(runner, "--event", "*.ok") == [("login.ok", "alice")]
    # % and _ match only themselves, in a glob and exactly.
    assert events(runner, "--event", "a_b%*") == [("a_b%c", "x' OR '1'='1")]
    assert events(runner, "--event", "a?b*") == []
    assert events(runner, "--event", "login_*") == []
    assert events(runner, "--event", "%") == []


@pytest.mark.parametrize(
    "option", ["--actor", "--event", "--request-id"], ids=lambda o: o[2:]
)
def test_injection_looking_values_match_nothing(
    filled: Flask, runner: FlaskCliRunner, option: str
) -> None:
    for value in ("' OR 1=1 --", "x'; DROP TABLE sidelog_entries; --", "*' OR '1'='1"):
        assert events(runner, option, value) == []
    # The one actor stored with that name matches only itself.
    assert events(runner, option, "x' OR '1'='1") == (
        [("a_b%c", "x' OR '1'='1")] if option == "--actor" else []
    )
    assert len(show(runner)) == 7


@pytest.mark.parametrize("backend", ["sqlite_file"])
@pytest.mark.parametrize(
    ("args", "accepted"),
    [
        (["--outcome", "maybe"], "'success', 'failure', 'error'"),
        (["--level", "debug"], "'info', 'warning', 'error'"),
        (["--since", "yesterday"], "ISO 8601 date or date-time"),
        (["--until", "2024-13-01"], "such as 30s, 15m, 2h, 7d"),
        (["--since", "5y"], "such as 30s, 15m, 2h, 7d"),
        # Out of range: once without the accepted forms, or clamped silently.
        (["--since", "999999999d"], "is out of range (years 1 to 9999 in UTC);"),
        (["--since", "999999999d"], "UTC); expected an ISO 8601 date or date-time"),
        (["--since", "0001-01-01T00:00+05:00"], "is out of range (years 1 to"),
        (["--until", "9999-12-31T23:59-05:00"], "expected an ISO 8601 date or"),
        (["-n", "-1"], "x>=0"),
        (["--limit", "ten"], "is not a valid integer"),
        (["--format", "xml"], "'table', 'json', 'jsonl', 'csv'"),
        (["--follow", "--format", "json"], "--format table, jsonl or csv"),
    ],
)
def test_bad_input_is_a_usage_error(
    filled: Flask, runner: FlaskCliRunner, args: list[str], accepted: str
) -> None:
    result = runner.invoke(args=["sidelog", "show", *args])
    assert result.exit_code == 2
    assert accepted in result.output
    assert "Traceback" not in result.output


def test_table_escapes_control_characters(app: Flask, runner: FlaskCliRunner) -> None:
    add_entries(
        app,
        dict(
            event="evil\x1b[2J",
            actor="\x1b]0;pwned\x07",
            path="/a\rb",
            method="GET",
            outcome="success",
            status_code=200,
            data=NASTY,
        ),
    )
    result = runner.invoke(args=["sidelog", "show"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()
    assert header.startswith("time (UTC)")
    for char in ("\x1b", "\x07", "\r", "\u2028", "\u202e"):
        assert char not in result.output
    assert "evil\\x1b[2J" in row
    assert "\\x1b]0;pwned\\x07" in row
    assert "/a\\rb" in row
    assert "\\n\\r\\x1b[31mred\\x07\\u2028\\u202eé😀" in row


def display_width(line: str) -> int:
    """Columns a terminal shows: wide characters and a character made an
    emoji by VS16 take two, combining marks none."""
    width = 0
    for c in line:
        if c == "\ufe0f":
            width += 1
        elif not unicodedata.combining(c):
            width += 2 if unicodedata.east_asian_width(c) in "WF" else 1
    return width


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("漢字", 4),  # wide
        ("e\u0301", 1),  # a combining accent
        ("\u2764\ufe0f", 2),  # a narrow heart made an emoji by VS16
        ("\u2b50\ufe0f", 2),  # a star wide already: VS16 adds nothing
        ("a\xad", 2),  # a soft hyphen is shown
    ],
)
def test_terminal_columns(text: str, shown: int) -> None:
    assert render.columns(text) == shown


@pytest.mark.parametrize("backend", ["sqlite_file"])
@pytest.mark.parametrize("columns", [60, 80, 132, 250])
def test_table_fits_the_terminal(
    filled: Flask, runner: FlaskCliRunner, columns: int
) -> None:
    add_entries(filled, dict(event="wide", data={"x": "y" * 500}, path="/" * 300))
    # Two columns a character, and none for a combining accent.
    add_entries(
        filled,
        dict(
            event="漢字" * 30,
            actor="e\u0301" * 40,
            # An emoji made wide by VS16, and a soft hyphen, shown as one.
            data={"字": "字" * 300, "x": "\u2764\ufe0f" * 60, "y": "a\xad" * 60},
        ),
    )
    result = runner.invoke(args=["sidelog", "show"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 10
    assert max(map(display_width, lines)) <= columns
    assert "…" in lines[-1] and "…" in lines[-2]
    assert "\x1b[" not in result.output  # no colour without a terminal


def test_event_is_readable_at_80_columns(app: Flask, runner: FlaskCliRunner) -> None:
    """At 80 columns (any pipe) the event was cut to 4 characters: login.ok
    and login.failed both read "logi…". The data keeps room too."""
    add_entries(app, dict(event="login.failed", actor="bob", data={"x": 1}))
    result = runner.invoke(args=["sidelog", "show"], env={"COLUMNS": "80"})
    row = result.output.splitlines()[1]
    assert len(row) <= 80
    assert row.split()[1] == "login.f…"
    assert row.rstrip().endswith(" x=1")


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_machine_formats_are_lossless(
    app: Flask, runner: FlaskCliRunner, fmt: str
) -> None:
    (written,) = add_entries(
        app,
        dict(
            event="nasty",
            actor="a\nb",
            path='/p,q"r',
            outcome="failure",
            status_code=403,
            data=NASTY,
        ),
    )
    result = runner.invoke(args=["sidelog", "show", "--format", fmt])
    assert result.exit_code == 0, result.output
    if fmt == "json":
        (read,) = json.loads(result.output)
    elif fmt == "jsonl":
        (read,) = [json.loads(line) for line in result.output.splitlines()]
    else:
        (read,) = list(csv.DictReader(io.StringIO(result.output, newline="")))
        read["data"] = json.loads(read["data"])
        assert read["status_code"] == "403"
        read["status_code"] = 403
        read = {k: (None if v == "" else v) for k, v in read.items()}
    assert read["data"] == NASTY
    for name in ("uuid", "event", "actor", "path", "outcome", "status_code"):
        assert read[name] == written[name]
    assert read["created_at"].startswith(written["created_at"].isoformat()[:19])
    # Every stored field: the chain's seq and hash too (null with it off).
    assert set(read) == set(FIELDS)


def test_missing_table(backend: str, database_uri: str, tmp_path: t.Any) -> None:
    app, _, _ = make_app(database_uri, str(tmp_path / "instance"))
    try:
        runner = app.test_cli_runner()
        commands = (["show"], ["stats"], ["export"], ["prune", "--before", "1d"])
        for command in (*commands, ["verify"]):
            result = runner.invoke(args=["sidelog", *command])
            assert result.exit_code == 1, result.output
            assert result.output.startswith(
                "Error: no sidelog entries table in DB: run `flask sidelog init`"
            )
            assert "Traceback" not in result.output
    finally:
        dispose(app)


def test_unreachable_database(tmp_path: t.Any) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, _, _ = make_app(
        "sqlite://",
        str(tmp_path / "instance"),
        {
            "SIDELOG_DATABASE_URI": f"postgresql+psycopg://me:s3cret@127.0.0.1:{port}/log"
        },
    )
    try:
        for command in (["show"], ["init"], ["export"], ["verify"]):
            result = app.test_cli_runner().invoke(args=["sidelog", *command])
            assert result.exit_code == 1
            (line,) = result.output.splitlines()
            assert line.startswith(
                f"Error: cannot reach the sidelog database"
                f" postgresql+psycopg://me:***@127.0.0.1:{port}/log: "
            )
            assert "s3cret" not in result.output
    finally:
        dispose(app)


@pytest.mark.parametrize(
    ("main_uri", "config", "said"),
    [
        (
            "main.db",
            {"SIDELOG_ENGINE_OPTIONS": {"connect_args": {"bogus": 1}}},
            "'bogus'",  # Python 3.13 words sqlite3's refusal otherwise
        ),
        ("postgresql+psycopg://me@127.0.0.1:abc/x", {}, "invalid literal for int()"),
    ],
)
def test_settings_only_a_connection_refuses(
    tmp_path: t.Any, main_uri: str, config: dict[str, t.Any], said: str
) -> None:
    """Engine options the driver refuses as it connects, a main URL (of an
    app without Flask-SQLAlchemy) with a port that is not a number: one line
    and exit status 1, no traceback."""
    if main_uri == "main.db":
        main_uri = f"sqlite:///{tmp_path / 'main.db'}"
    app, _, _ = make_app(main_uri, str(tmp_path / "instance"), config, with_db=False)
    for command in (["show"], ["stats"], ["verify"]):
        result = app.test_cli_runner().invoke(args=["sidelog", *command])
        # SystemExit from click: not an exception that escaped the command.
        assert isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 1
        assert result.output.startswith("Error: ") and said in result.output
        assert len(result.output.splitlines()) == 1, result.output
    dispose(app)


def test_a_bad_main_url_is_not_the_logs_matter(tmp_path: t.Any) -> None:
    """With a log database of its own, the log works whatever the main URL
    (of an app without Flask-SQLAlchemy) says: only that app's own use of
    it fails."""
    log_uri = f"sqlite:///{tmp_path / 'log.db'}"
    app, _, sidelog = make_app(
        "postgresql+psycopg://me@127.0.0.1:abc/x",
        str(tmp_path / "instance"),
        {"SIDELOG_DATABASE_URI": log_uri},
        with_db=False,
    )
    with app.app_context():
        sidelog.log("kept")
    result = app.test_cli_runner().invoke(args=["sidelog", "show"])
    assert result.exit_code == 0, result.output
    assert "kept" in result.output
    out = tmp_path / "out.jsonl"
    result = app.test_cli_runner().invoke(args=["sidelog", "export", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert '"event": "kept"' in out.read_text()
    dispose(app)


def test_export_never_writes_over_a_main_file_whose_engine_fails(
    tmp_path: t.Any,
) -> None:
    """A main SQLite URL with a query value its dialect refuses: no engine,
    but the file is still the app's, and export refuses to empty it."""
    main = tmp_path / "main.db"
    with sqlite3.connect(main) as conn:
        conn.execute("CREATE TABLE important (n)")
        conn.execute("INSERT INTO important VALUES (42)")
    conn.close()
    app, _, sidelog = make_app(
        f"sqlite:///{main}?timeout=abc",
        str(tmp_path / "instance"),
        {"SIDELOG_DATABASE_URI": f"sqlite:///{tmp_path / 'log.db'}"},
        with_db=False,
    )
    with app.app_context():
        sidelog.log("kept")
    result = app.test_cli_runner().invoke(args=["sidelog", "export", "-o", str(main)])
    assert result.exit_code == 2, result.output
    assert "its database or the spool" in result.output
    with sqlite3.connect(main) as conn:
        assert conn.execute("SELECT n FROM important").fetchall() == [(42,)]
    conn.close()
    dispose(app)


def test_a_driver_not_installed(tmp_path: t.Any) -> None:
    app, _, _ = make_app(
        "sqlite://",
        str(tmp_path / "instance"),
        {"SIDELOG_DATABASE_URI": "mysql+mysqldb://me:s3cret@host/log"},
    )
    try:
        result = app.test_cli_runner().invoke(args=["sidelog", "show"])
        assert result.exit_code == 1
        (line,) = result.output.splitlines()
        assert line.startswith("Error: ")
        assert "MySQLdb" in line and "s3cret" not in line
    finally:
        dispose(app)


def test_init_is_idempotent(app: Flask, runner: FlaskCliRunner) -> None:
    first = runner.invoke(args=["sidelog", "init"])
    second = runner.invoke(args=["sidelog", "init"])
    assert first.exit_code == second.exit_code == 0
    assert first.output.startswith("Created sidelog_entries in ")
    assert second.output.endswith("already exists.\n")
    assert runner.invoke(args=["sidelog", "show"]).output.splitlines()[1:] == []


def test_colour_only_on_a_terminal_without_no_color() -> None:
    from flask_sidelog.render import use_colour

    assert use_colour(True, {})
    assert not use_colour(False, {})
    assert not use_colour(True, {"NO_COLOR": "1"})
    assert use_colour(True, {"NO_COLOR": ""})


def test_table_colours_outcomes_and_still_escapes() -> None:
    from datetime import datetime
    from datetime import timezone

    from flask_sidelog.render import Table

    entry = {
        "created_at": datetime(2024, 5, 1, 12, 30, 5, tzinfo=timezone.utc),
        "event": "funds.transfer",
        "actor": "\x1b[32mroot",
        "outcome": "error",
        "status_code": 500,
        "main_tx": "rolled_back",
        "method": "POST",
        "path": "/t",
        "request_id": "0123456789abcdef",
        "data": {"note": "\x9b2J"},
    }
    plain = Table(160, colour=False).row(entry)
    coloured = Table(160, colour=True).row(entry)
    assert plain.startswith("2024-05-01T12:30:05Z funds.transfer")
    assert "01234567 " in plain and "89abcdef" not in plain
    assert "\x1b" not in plain
    assert "\x1b[31merror 500" in coloured
    assert "\\x1b[32mroot" in coloured and "\\x9b2J" in coloured
    assert "\x9b" not in coloured


@pytest.mark.parametrize("names_max", [50, 1])
def test_glob_reads_each_matching_name(
    app: Flask, runner: FlaskCliRunner, monkeypatch: pytest.MonkeyPatch, names_max: int
) -> None:
    """Up to GLOB_NAMES_MAX names, each matching name's newest entries come
    from its own index; above, a scan by time. The answer is the same."""
    import flask_sidelog.extension

    monkeypatch.setattr(flask_sidelog.extension, "GLOB_NAMES_MAX", names_max)
    names = ("login.a", "login.b", "other")
    add_entries(
        app,
        *[dict(event=names[i % 3], created_at=ago(minutes=i)) for i in range(12)],
        dict(event="a*b", created_at=ago(minutes=30)),
        dict(event="Login.C", created_at=ago(minutes=31)),
        dict(event="q?[x]", created_at=ago(minutes=32)),
        dict(event="qa[x]", created_at=ago(minutes=33)),
    )
    found = show(runner, "-n", "4", "--event", "login.*")
    assert [(e["event"], e["created_at"]) for e in found] == [
        ("login.b", ago(minutes=4).isoformat()),
        ("login.a", ago(minutes=3).isoformat()),
        ("login.b", ago(minutes=1).isoformat()),
        ("login.a", ago(minutes=0).isoformat()),
    ]
    assert events(runner, "--event", "a*") == [("a*b", None)]
    assert events(runner, "--event", "*.C") == [("Login.C", None)]
    assert show(runner, "--event", "nothing.*") == []
    # Exact case, where SQLite's LIKE would take Login.C; GLOB's wildcards
    # match themselves.
    assert len(show(runner, "--event", "login*")) == 8
    assert events(runner, "--event", "q?[*") == [("q?[x]", None)]
    exported = runner.invoke(args=["sidelog", "export", "--event", "login*"])
    assert exported.exit_code == 0
    assert len(exported.stdout.splitlines()) == 8


@pytest.mark.parametrize(
    ("name", "value", "index"),
    [
        ("actor", "alice", "actor"),
        ("outcome", "error", "outcome"),
        ("level", "warning", "level"),
        ("level", "error", "level"),
        ("request_id", "req-2", "request_id"),
        ("event", "login.ok", "event"),
    ],
)
def test_each_filter_is_served_by_its_index(
    app: Flask, name: str, value: str, index: str
) -> None:
    """The actor, outcome and level indexes leave out entries no filter asks
    for (NULLs, the "info" level); a query must still be able to use them."""
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        writer.ensure_table()
        query = newest_first(
            writer.table, *entry_filters(writer.table, **{name: value})
        ).limit(50)
        with writer.lock, writer.engine.begin() as conn:
            compiled = query.compile(dialect=conn.dialect)
            if conn.dialect.name == "sqlite":
                params: t.Any = tuple(compiled.params[k] for k in compiled.positiontup)
                explain = "EXPLAIN QUERY PLAN "
            else:
                # An empty table is read faster without an index.
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                params, explain = compiled.params, "EXPLAIN "
            plan = " ".join(
                str(row[-1])
                for row in conn.exec_driver_sql(explain + str(compiled), params)
            )
    assert f"ix_sidelog_entries_{index}" in plan


def change(table: str, pk: t.Any, **changes: t.Any) -> dict[str, t.Any]:
    """A row change entry as tracking records it."""
    data = {"table": table, "pk": pk, "changes": changes}
    return dict(event=f"{table}.insert", main_tx="committed", data=data)


@pytest.fixture
def changes(app: Flask) -> Flask:
    add_entries(
        app,
        change("account", {"id": 1}, name=[None, "a"]),
        change("membership", {"org_id": 1, "user_id": 2}, role=[None, "m"]),
        change("token", {"code": "dGVzdA=="}, n=[None, 1]),
        change("token", {"code": "a,b"}, n=[None, 2]),
        change("token", {"code": "code=x"}, n=[None, 3]),
        change("token", {"code": "a\\,b"}, n=[None, 4]),
        dict(event="login.ok"),
    )
    return app


def history(runner: FlaskCliRunner, *args: str) -> tuple[int, str]:
    result = runner.invoke(args=["sidelog", "history", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def assert_shows(runner: FlaskCliRunner, found: list[tuple[list[str], str]]) -> None:
    """Each ``history`` of ``found`` shows one change, which ends so."""
    for args, shown in found:
        code, output = history(runner, *args)
        assert code == 0, output
        (line,) = output.splitlines()
        assert line.endswith(shown), (args, output)


def test_history_finds_what_it_did(changes: Flask, runner: FlaskCliRunner) -> None:
    found = [
        (["account", "1"], 'name: null -> "a"'),
        (["account", "id=1"], 'name: null -> "a"'),
        (["membership", "org_id=1,user_id=2"], 'role: null -> "m"'),
        (["membership", "user_id=2, org_id=1"], 'role: null -> "m"'),
        (["token", "code=dGVzdA=="], "n: null -> 1"),
        (["token", "a,b"], "n: null -> 2"),
        (["token", "code=a\\,b"], "n: null -> 2"),
        (["token", "code=code=x"], "n: null -> 3"),
        # As given first: a single value that holds \, itself.
        (["token", "a\\,b"], "n: null -> 4"),
    ]
    assert_shows(runner, found)
    for args in (["account", "99"], ["membership", "org_id=1,user_id=9"]):
        assert history(runner, *args) == (
            0,
            f"No recorded changes for {args[0]} {args[1]}.\n",
        )


def test_history_of_a_single_value_with_an_equals_sign_or_escape(
    changes: Flask, runner: FlaskCliRunner
) -> None:
    """A value holding = was read as k=v and found nothing; \\, was honoured
    only in k=v pairs. For a one-column key, the whole PK is tried as the
    value too: as given, then with its escapes read."""
    add_entries(changes, change("note", {"slug": "x,y"}, n=[None, 5]))
    found = [
        (["token", "dGVzdA=="], "n: null -> 1"),
        (["token", "code=code=x"], "n: null -> 3"),
        (["note", "x\\,y"], "n: null -> 5"),
    ]
    assert_shows(runner, found)
    # Naming the key column, PK is read as name=value only.
    assert history(runner, "token", "code=x") == (
        0,
        "No recorded changes for token code=x.\n",
    )
    # Naming no key column and found as no value: a text key may hold "="
    # (a value without changes); a number key cannot (a mistaken column).
    for pk in ("nope=1", "abc==", "=x"):
        assert history(runner, "token", pk) == (
            0,
            f"No recorded changes for token {pk}.\n",
        )
    # A one-column text key beside a composite one: naming a column of
    # that is still read as its key, and an incomplete one is refused.
    add_entries(
        changes,
        change("both", {"code": "k"}, n=[None, 1]),
        change("both", {"org_id": 1, "user_id": 2}, n=[None, 2]),
    )
    code, output = history(runner, "both", "org_id=1")
    assert code == 2, output
    assert "record the key code or org_id, user_id" in output
    # A redacted key's type is unknown: as for text, "x=y" may be a value.
    add_entries(changes, change("sec", {"id": "[redacted]"}, n=[None, 1]))
    assert history(runner, "sec", "x=y") == (0, "No recorded changes for sec x=y.\n")
    code, output = history(runner, "account", "user_id=7")
    assert code == 2, output
    assert "record the key id: give PK as its value, or as id=VALUE" in output


def test_history_of_a_table_without_changes(
    changes: Flask, runner: FlaskCliRunner
) -> None:
    """Once 'No recorded changes for Account 1.', exit 0, as if the row had
    none: the table is account."""
    code, output = history(runner, "Account", "1")
    assert code == 2, output
    assert "the log holds no row changes of table 'Account'" in output
    assert "tables with row changes: account, membership, note" not in output
    assert "tables with row changes: account, membership, token." in output
    code, output = history(runner, "login", "1")
    assert code == 2, output
    assert "no row changes of table 'login'" in output


@pytest.mark.parametrize("tracked_by", ["class", "track_all"])
def test_history_of_a_tracked_table_without_changes_yet(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner, tracked_by: str
) -> None:
    """A tracked table none of whose rows changed yet (or whose changes
    were all pruned) is no mistake: its rows have no changes, exit 0. Also
    for track_all, whose models need not be the db's (Account is not)."""
    add_entries(app, change("membership", {"org_id": 1, "user_id": 2}, r=[None, 1]))
    assert history(runner, "account", "1")[0] == 2
    if tracked_by == "class":
        sidelog.track(Account)
    else:
        sidelog.track_all()
    found = history(runner, "account", "1")
    assert found == (0, "No recorded changes for account 1.\n")


@pytest.mark.parametrize(
    "pk", ["org_id=1", "1", "org_id=1,user_id=2,extra=3", "user=2,org=1", "=1"]
)
def test_history_with_keys_the_table_does_not_have(
    changes: Flask, runner: FlaskCliRunner, pk: str
) -> None:
    """Once 'No recorded changes', exit 0, as if the row had none."""
    code, output = history(runner, "membership", pk)
    assert code == 2, output
    assert "the row changes of 'membership' record the key org_id, user_id" in output
    assert "give PK as org_id=V1,user_id=V2" in output
    code, output = history(runner, "account", "id=1,extra=3")
    assert code == 2, output
    assert "record the key id: give PK as its value, or as id=VALUE" in output


def test_history_of_a_table_whose_keys_are_not_recorded(
    app: Flask, runner: FlaskCliRunner
) -> None:
    """A key redacted in every change: nothing to diagnose with."""
    add_entries(app, change("secret", "[redacted]", n=[None, 1]))
    assert history(runner, "secret", "1") == (
        0,
        "No recorded changes for secret 1.\n",
    )
