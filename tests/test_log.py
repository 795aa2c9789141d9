"""Behaviours 5 and 6 of the core: sidelog.log() anywhere, and bad input."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import threading
import time
import types
import typing as t
import uuid

import click
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskCliRunner
from werkzeug.datastructures import Headers

from flask_sidelog import SideLog
from flask_sidelog.context import describe_error
from flask_sidelog.entry import MAX_DATA_BYTES
from flask_sidelog.entry import new_uuids
from flask_sidelog.entry import random_bytes
from flask_sidelog.entry import REDACTED


def test_log_in_cli_command(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    @app.cli.command("nightly")
    def nightly() -> None:
        entry = sidelog.log("job.nightly", actor="cron", data={"rows": 3})
        click.echo(entry["uuid"])

    result = runner.invoke(args=["nightly"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["uuid"] == result.output.strip()
    assert (entry["event"], entry["actor"], entry["data"]) == (
        "job.nightly",
        "cron",
        {"rows": 3},
    )
    assert entry["request_id"] is None
    assert entry["outcome"] is None and entry["main_tx"] is None


def test_log_in_background_thread_with_app_context(
    app: Flask, sidelog: SideLog
) -> None:
    def job() -> None:
        with app.app_context():
            sidelog.log("job.background", level="warning")

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["event"], entry["level"]) == ("job.background", "warning")


def test_log_without_app_context(sidelog: SideLog) -> None:
    with pytest.raises(RuntimeError, match="needs an app context"):
        sidelog.log("nowhere")


def test_log_on_unregistered_app(sidelog: SideLog) -> None:
    with Flask("other").app_context(), pytest.raises(RuntimeError, match="init_app"):
        sidelog.log("elsewhere")


@pytest.mark.parametrize("event", ["", "   ", None, 5])
def test_empty_or_wrong_event(app: Flask, sidelog: SideLog, event: object) -> None:
    with app.app_context():
        with pytest.raises(ValueError, match="non-empty string"):
            sidelog.log(event)  # type: ignore[arg-type]
        assert sidelog.entries() == []


def test_overlong_event_names_the_limit(app: Flask, sidelog: SideLog) -> None:
    with app.app_context():
        sidelog.log("e" * 200)
        with pytest.raises(
            ValueError, match="at most 200 characters; this one has 201"
        ):
            sidelog.log("e" * 201)
        assert [len(e["event"]) for e in sidelog.entries()] == [200]


def test_unknown_level(app: Flask, sidelog: SideLog) -> None:
    with app.app_context(), pytest.raises(ValueError, match="info, warning, error"):
        sidelog.log("x", level="debug")


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque 42>"


class Broken:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_unserialisable_data_stored_as_text(app: Flask, sidelog: SideLog) -> None:
    loop: list[object] = []
    loop.append(loop)
    data = {
        "object": Opaque(),
        "broken": Broken(),
        "bytes": b"\x00\xff",
        "set": {1},
        "tuple": (1, "a"),
        "nan": math.nan,
        "inf": -math.inf,
        "big": 2**80,
        "loop": loop,
        3: "int key",
        "nested": {"Api_Key": "k", "list": [{"TOKEN": "t", "ok": 1}]},
    }
    with app.app_context():
        sidelog.log("odd.data", data=data)
        (entry,) = sidelog.entries()
    assert entry["data"] == {
        "object": "<Opaque 42>",
        "broken": "<unrepresentable Broken>",
        "bytes": "b'\\x00\\xff'",
        "set": [1],
        "tuple": [1, "a"],
        "nan": "NaN",
        "inf": "-Infinity",
        "big": str(2**80),
        "loop": ["[recursive]"],
        "3": "int key",
        "nested": {"Api_Key": REDACTED, "list": [{"TOKEN": REDACTED, "ok": 1}]},
    }


def test_huge_data_truncated_with_marker(app: Flask, sidelog: SideLog) -> None:
    with app.app_context():
        sidelog.log("big.data", data={"blob": "x" * (MAX_DATA_BYTES + 1)})
        (entry,) = sidelog.entries()
    data = entry["data"]
    assert data["_truncated"] is True
    assert data["_size"] > MAX_DATA_BYTES
    assert data["preview"].startswith('{"blob":"xxx')
    assert len(data["preview"]) == 1000


def test_control_characters_and_unicode_stored_as_given(
    app: Flask, sidelog: SideLog
) -> None:
    text = "\x1b[31mred\x1b[0m\r\n\t\x07 \u202eevil\u202c 🦊 ñ 日本 \u0085"
    with app.app_context():
        sidelog.log(f"odd.{text}", actor=text, data={text: text})
        (entry,) = sidelog.entries()
    assert entry["event"] == f"odd.{text}"
    assert entry["actor"] == text
    assert entry["data"] == {text: text}


def test_text_no_database_can_hold_is_escaped_visibly(
    app: Flask, sidelog: SideLog
) -> None:
    """NUL (PostgreSQL refuses it in text) and lone surrogates (not UTF-8)."""
    with app.app_context():
        sidelog.log("nul\x00event", actor="a\udc80", data={"v": "x\x00\ud800"})
        (entry,) = sidelog.entries()
    assert entry["event"] == "nul\\x00event"
    assert entry["actor"] == "a\\udc80"
    assert entry["data"] == {"v": "x\\x00\\ud800"}


@dataclasses.dataclass
class Login:
    user: str
    password: str


class Pair(t.NamedTuple):
    name: str
    secret: str


def test_mapping_likes_are_redacted_not_stored_as_repr(
    app: Flask, sidelog: SideLog
) -> None:
    headers = Headers({"Authorization": "Bearer SECRET", "Accept": "text/html"})
    data = {
        "headers": headers,
        "login": Login("bob", "hunter2"),
        "pair": Pair("k", "s3"),
        "proxy": types.MappingProxyType({"passwd": "x", "n": 1}),
        "X-Api-Key": "k1",
        "apiKey": "k2",
        "refresh-token": "k3",
    }
    with app.app_context():
        sidelog.log("mapping.likes", data=data)
        (entry,) = sidelog.entries()
    assert entry["data"] == {
        "headers": {"Authorization": REDACTED, "Accept": "text/html"},
        "login": {"user": "bob", "password": REDACTED},
        "pair": {"name": "k", "secret": REDACTED},
        "proxy": {"passwd": REDACTED, "n": 1},
        "X-Api-Key": REDACTED,
        "apiKey": REDACTED,
        "refresh-token": REDACTED,
    }
    assert "hunter2" not in json.dumps(entry["data"])


def test_statement_errors_keep_the_driver_message_only() -> None:
    error = sa.exc.StatementError(
        "bad value", "INSERT ...", {"password": "hunter2"}, ValueError("bad value")
    )
    assert describe_error(error) == "sqlalchemy.exc.StatementError: bad value"

    class Diagnostic:
        message_primary = "duplicate key\nsecond line"
        message_detail = "Key (ssn)=(111-22-3333) exists."
        message_hint = "a hint"

    class ServerError(Exception):
        """As psycopg's errors are: the server's fields in ``diag``."""

        diag = Diagnostic()

    # PostgreSQL's DETAIL, which quotes the row's values, and CONTEXT are
    # left out; the primary message, however many lines, and hint are kept.
    orig = ServerError(
        "duplicate key\nsecond line\nDETAIL:  Key (ssn)=(111-22-3333) exists."
        "\nHINT:  a hint\nCONTEXT:  SQL statement \"INSERT ... ('111-22-3333')\""
    )
    error = sa.exc.StatementError("duplicate key", "INSERT ...", {}, orig)
    assert describe_error(error) == (
        "sqlalchemy.exc.StatementError: duplicate key\nsecond line\nHINT:  a hint"
    )
    # Raised by the driver itself (through raw_connection()).
    assert describe_error(orig).endswith(
        "ServerError: duplicate key\nsecond line\nHINT:  a hint"
    )
    # SQLAlchemy's own error, quoting the one that rolled the session back.
    error = sa.exc.PendingRollbackError(
        "Original exception was: (UniqueViolation) duplicate key"
        "\nDETAIL:  Key (ssn)=(111-22-3333) exists."
        "\n[SQL: INSERT INTO person (ssn) VALUES (%(ssn)s)]"
        "\n[parameters: {'ssn': '111-22-3333'}]"
    )
    assert describe_error(error) == (
        "sqlalchemy.exc.PendingRollbackError: Original exception was:"
        " (UniqueViolation) duplicate key"
    )


def test_entry_uuids_are_unique_version_7(app: Flask, sidelog: SideLog) -> None:
    """Version 7 (RFC 9562): the time in milliseconds first, so that new
    entries go at the end of the uuid index, then 74 random bits."""
    with app.app_context():
        before = time.time()
        made = [sidelog.log("x")["uuid"] for _ in range(200)]
        after = time.time()
    parsed = [uuid.UUID(u) for u in made]
    assert [str(u) for u in parsed] == made
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    assert len(set(made)) == len(made)
    stamps = [(u.int >> 80) / 1000 for u in parsed]
    assert stamps == sorted(stamps)
    assert int(before * 1000) / 1000 <= stamps[0] and stamps[-1] <= after


def test_a_batch_of_uuids_shares_its_time_not_its_random_bits() -> None:
    made = [uuid.UUID(u) for u in new_uuids(1000)]
    assert len({u.int >> 80 for u in made}) == 1
    assert len({u.int & (2**80 - 1) for u in made}) == 1000
    assert {(u.version, u.variant) for u in made} == {(7, uuid.RFC_4122)}


def _c_fork() -> int:
    # fork() without Python's fork hooks, as uWSGI's prefork calls it by
    # default. PyDLL keeps the GIL across the call.
    return t.cast(int, ctypes.PyDLL(None).fork())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("fork", [os.fork, _c_fork], ids=["os.fork", "C fork"])
def test_a_forked_worker_draws_random_bytes_of_its_own(
    fork: t.Callable[[], int],
) -> None:
    """Random bytes are read ahead; a worker forked from a process that
    read some (gunicorn --preload) must not hand out the same ones, even
    when its server forks without running Python's fork hooks."""
    random_bytes(16)  # the parent has bytes left over
    read, write = os.pipe()
    pid = fork()
    if pid == 0:  # the child: report its next bytes, then leave at once
        try:
            os.write(write, random_bytes(16) + new_uuids(1)[0].encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    assert len(child) == 16 + 36
    assert child[:16] != random_bytes(16)
    assert child[16:].decode() != new_uuids(1)[0]
    assert len({random_bytes(16) for _ in range(1000)}) == 1000


@pytest.mark.parametrize("count", [3, 7, 10, 12])
def test_entries_returns_the_newest_limit_of_them(
    app: Flask, sidelog: SideLog, count: int
) -> None:
    """Fewer entries than the limit: all of them; more: the newest ones,
    newest last."""
    with app.app_context():
        for i in range(count):
            sidelog.log(f"event.{i}")
        assert [e["event"] for e in sidelog.entries(limit=10)] == [
            f"event.{i}" for i in range(max(0, count - 10), count)
        ]
        assert [e["event"] for e in sidelog.entries(event="event.*", limit=10)] == [
            f"event.{i}" for i in range(max(0, count - 10), count)
        ]
