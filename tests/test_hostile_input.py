"""Case 6: hostile input, property-based, on SQLite and PostgreSQL.

Whatever a caller passes to ``sidelog.log`` the request goes on, and what is
stored is either the value itself, a faithful text form of it (``repr`` of
bytes and objects, ``"NaN"``, decimal text of huge integers, backslash
escapes for NUL and lone surrogates) or a visible marker (``"[recursive]"``,
``"[max depth]"``, ``"[truncated]"``).

The ``flask sidelog show`` filters are tested here through the function the
command wraps, :meth:`SideLog.entries`: the command itself is built in
another issue and gets its own CLI test there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from hypothesis import example
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from conftest import Account
from conftest import dispose
from conftest import make_app
from conftest import new_database_uri
from flask_sidelog import SideLog
from flask_sidelog.entry import MAX_DEPTH
from flask_sidelog.entry import TRUNCATION_MARK
from flask_sidelog.model import COLUMN_LIMITS
from flask_sidelog.model import EVENT_MAX

pytestmark = pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])

# Every code point, lone surrogates and NUL included.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**63 + 2)
    | st.floats()
    | any_text
    | st.binary(max_size=20)
    | st.datetimes()
    | st.complex_numbers()
    | st.builds(object)
)


KEYS = any_text | st.integers() | st.booleans()


def _containers(children: st.SearchStrategy[t.Any]) -> st.SearchStrategy[t.Any]:
    return (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(
            any_text | st.integers() | st.booleans(), children, max_size=4
        )
    )


VALUES = st.recursive(LEAVES, _containers, max_leaves=25)
HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def is_plain_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def stored_key_text(key: t.Any) -> str:
    """A key's text as documented: ``repr()`` for non-strings; NUL and lone
    surrogates as visible backslash escapes."""
    if not isinstance(key, str):
        return repr(key)
    text = key.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_faithful(original: t.Any, stored: t.Any, depth: int = 0) -> None:
    """``stored`` is ``original``, a faithful text form of it, or a marker.

    An independent reading of the documented rules, not a copy of the code.
    """
    if isinstance(original, bool) or original is None:
        assert stored is original
    elif isinstance(original, int):
        if -(2**63) <= original < 2**63:
            assert stored == original and type(stored) is int
        else:
            assert stored == str(original)
    elif isinstance(original, float):
        if math.isfinite(original):
            assert stored == original
        else:
            assert stored in ("NaN", "Infinity", "-Infinity")
            assert (stored == "NaN") == math.isnan(original)
    elif isinstance(original, str):
        if is_plain_text(original):
            assert stored == original
        else:
            assert isinstance(stored, str) and is_plain_text(stored)
    elif depth >= MAX_DEPTH and isinstance(original, (list, tuple, dict)):
        assert stored == "[max depth]"
    elif isinstance(original, (list, tuple)):
        assert isinstance(stored, list) and len(stored) == len(original)
        for item, kept in zip(original, stored, strict=True):
            check_faithful(item, kept, depth + 1)
    elif isinstance(original, dict):
        # Every key is kept, even when two keys have the same text: the
        # documented rule appends "~" to the later one. Key order is not
        # kept (the log stores canonical, sorted JSON).
        assert isinstance(stored, dict) and len(stored) == len(original)
        used: set[str] = set()
        for key, item in original.items():
            name = stored_key_text(key)
            while name in used:
                name += "~"
            used.add(name)
            assert name in stored and is_plain_text(name)
            check_faithful(item, stored[name], depth + 1)
    elif isinstance(original, bytes):
        assert stored == repr(original)
    else:
        assert isinstance(stored, str) and is_plain_text(stored)


def stored_row(app: Flask, sidelog: SideLog, uuid: str) -> dict[str, t.Any]:
    table = app.extensions["sidelog"].table
    with app.app_context(), sidelog.log_session() as session:
        row = session.execute(sa.select(table).where(table.c.uuid == uuid)).one()
        return dict(row._mapping)


@pytest.fixture
def unredacted(
    backend: str, tmp_path: t.Any, request: pytest.FixtureRequest
) -> t.Iterator[tuple[Flask, SideLog]]:
    """An app that redacts nothing, so random keys are stored as given."""
    uri = new_database_uri(backend, tmp_path, request)
    app, _, sidelog = make_app(
        uri, str(tmp_path / "instance"), {"SIDELOG_REDACT_KEYS": ()}
    )
    yield app, sidelog
    dispose(app)


@pytest.fixture
def logging_view(unredacted: tuple[Flask, SideLog]) -> list[t.Any]:
    """``POST /log`` pops an (event, data) pair, logs it and pushes what
    log() returned."""
    app, sidelog = unredacted
    calls: list[t.Any] = []

    @app.post("/log")
    @sidelog.audit("hostile")
    def log() -> str:
        event, data = calls.pop()
        calls.append(sidelog.log(event, data=data))
        return "ok"

    return calls


@HYPOTHESIS
@given(event=any_text.filter(lambda e: e.strip()), value=VALUES)
@example(event="a\x00\ud800", value={"1": "text key", 1: "int key"})
@example(event="e", value={"a\x00": 1, "a\\x00": 2, "\ud800": 3, "\\ud800": 4})
@example(event="e", value=[math.nan, -math.inf, b"\xff\x00", 2**64, -(2**63) - 1])
def test_any_value_is_stored_faithfully(
    unredacted: tuple[Flask, SideLog],
    logging_view: list[t.Any],
    event: str,
    value: t.Any,
) -> None:
    app, sidelog = unredacted
    logging_view.append((event, {"v": value}))
    response = app.test_client().post("/log")
    assert (response.status_code, response.text) == (200, "ok")
    returned = logging_view.pop()
    stored = stored_row(app, sidelog, returned["uuid"])
    assert stored["data"] == returned["data"]
    assert stored["event"] == returned["event"]
    if is_plain_text(event):
        assert stored["event"] == event
    json.dumps(stored["data"], allow_nan=False)
    check_faithful({"v": value}, stored["data"])


@HYPOTHESIS
@given(value=st.integers(min_value=0, max_value=6000))
def test_self_reference_and_deep_nesting(
    unredacted: tuple[Flask, SideLog],
    logging_view: list[t.Any],
    value: int,
) -> None:
    loop: list[t.Any] = [1]
    loop.append(loop)
    deep: list[t.Any] = []
    for _ in range(value):
        deep = [deep]
    big_int = 10 ** (value + 4300)  # beyond Python's int-to-text limit
    app, sidelog = unredacted
    logging_view.append(("nested", {"loop": loop, "deep": deep, "big": big_int}))
    assert app.test_client().post("/log").status_code == 200
    data = stored_row(app, sidelog, logging_view.pop()["uuid"])["data"]
    assert data["loop"] == [1, "[recursive]"]
    assert data["big"] == f"<int of {big_int.bit_length()} bits>"
    # data is at depth 0, so the innermost list is at depth value + 1.
    level, depth = data["deep"], 1
    while isinstance(level, list) and level:
        level, depth = level[0], depth + 1
    if value + 1 < MAX_DEPTH:
        assert (level, depth) == ([], value + 1)
    else:
        assert (level, depth) == ("[max depth]", MAX_DEPTH)


class BrokenList(list[int]):
    def __iter__(self) -> t.Iterator[int]:
        raise RuntimeError("cannot iterate")


class BrokenMapping(t.Mapping[str, int]):
    def __getitem__(self, key: str) -> int:
        raise KeyError(key)

    def __iter__(self) -> t.Iterator[str]:
        return iter(["password"])

    def __len__(self) -> int:
        return 1


@dataclasses.dataclass
class Unfinished:
    password: str
    fee: int = dataclasses.field(init=False)  # never set


def test_values_whose_own_code_raises(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    """A value that raises when read is stored as a marker naming its type
    and error, never its repr (which could show what redaction would hide);
    the request and its other entries go on."""
    broken = {"list": BrokenList([1]), "map": BrokenMapping(), "dc": Unfinished("pw")}
    markers = {
        "list": "<unreadable BrokenList: RuntimeError>",
        "map": "<unreadable BrokenMapping: KeyError>",
        "dc": "<unreadable Unfinished: AttributeError>",
    }

    @app.post("/act")
    @sidelog.audit("act")
    def act() -> str:
        sidelog.log("act.detail", data=broken)
        sidelog.log("act.whole", data=BrokenMapping())
        sidelog.annotate(**broken)
        return "done"

    assert client.post("/act").text == "done"
    with app.app_context():
        entries = {e["event"]: e for e in sidelog.entries()}
    assert entries["act.detail"]["data"] == markers
    assert entries["act.whole"]["data"] == {
        "value": "<unreadable BrokenMapping: KeyError>"
    }
    assert entries["act"]["data"] == markers
    assert entries["act"]["outcome"] == "success"
    assert "pw" not in json.dumps([e["data"] for e in entries.values()])


class Unprintable:
    """An actor or error whose ``__str__`` raises, as a model's may when it
    reads an attribute its failed session cannot load."""

    def __str__(self) -> str:
        raise LookupError("detached")


class UnprintableError(Unprintable, Exception):
    pass


def test_text_whose_own_code_raises(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    """An actor or an error that cannot be made text is stored as a marker;
    the view runs and no entry is lost."""
    marker = "<unreadable Unprintable: LookupError>"
    sidelog.actor_loader(Unprintable)

    @app.post("/act")
    @sidelog.audit("act")
    def act() -> str:
        sidelog.log("act.given", actor=Unprintable())
        sidelog.log("act.loaded")
        return "done"

    @app.post("/fail")
    @sidelog.audit("fail")
    def fail() -> str:
        sidelog.log("fail.detail")
        raise UnprintableError

    assert client.post("/act").text == "done"
    with pytest.raises(UnprintableError):  # TESTING propagates it
        client.post("/fail")
    with app.app_context():
        entries = {e["event"]: e for e in sidelog.entries()}
    assert {e["actor"] for e in entries.values()} == {marker}
    assert set(entries) == {"act", "act.given", "act.loaded", "fail", "fail.detail"}
    assert entries["fail"]["outcome"] == "error"
    assert entries["fail"]["error"] == (
        "test_hostile_input.UnprintableError:"
        " <unreadable UnprintableError: LookupError>"
    )


class UnprintableConverter(BaseConverter):
    """A URL converter whose values cannot be made text."""

    def to_python(self, value: str) -> Unprintable:
        return Unprintable()


class NamelessConflict(HTTPException):
    code = 409

    @property
    def name(self) -> str:  # type: ignore[override]
        raise LookupError("no name")


def test_request_values_whose_own_code_raises(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A URL variable that cannot be made text (redacted or not), an HTTP
    error whose ``name`` raises: the request and its entries go on, with a
    marker where a value could not be read, and no secret in the path."""
    app.url_map.converters["unprintable"] = UnprintableConverter
    app.config["SIDELOG_REQUEST_ID_RESPONSE_HEADER"] = "X-Request-Id"
    sidelog.track(Account)

    @app.post("/items/<unprintable:item>")
    @sidelog.audit("item.save")
    def save(item: Unprintable) -> str:
        sidelog.log("item.detail")
        db.session.add(Account(name="a"))
        db.session.commit()
        return "saved"

    @app.get("/reset/<unprintable:token>")
    def reset(token: Unprintable) -> str:
        sidelog.log("reset.asked")
        return "ok"

    @app.post("/conflict")
    @sidelog.audit("conflict")
    def conflict() -> str:
        sidelog.annotate(k="v")
        raise NamelessConflict

    @app.errorhandler(NamelessConflict)
    def handled(error: NamelessConflict) -> tuple[str, int]:
        return "handled", 409

    assert client.post("/items/42").text == "saved"
    assert client.get("/reset/s3cret").text == "ok"
    assert client.post("/conflict").status_code == 409
    with app.app_context():
        entries = {e["event"]: e for e in sidelog.entries()}
        stored = db.session.scalar(sa.select(sa.func.count()).select_from(Account))
    assert stored == 1
    assert set(entries) == {
        "item.save",
        "item.detail",
        "account.insert",
        "reset.asked",
        "conflict",
    }
    assert entries["item.save"]["path"] == "/items/42"
    assert entries["reset.asked"]["path"] == "/reset/<unprintable:token>"
    assert entries["conflict"]["outcome"] == "failure"
    assert entries["conflict"]["status_code"] == 409
    assert entries["conflict"]["data"] == {"k": "v"}
    assert entries["conflict"]["error"] == (
        "test_hostile_input.NamelessConflict:"
        " <unreadable NamelessConflict: LookupError>"
    )


def test_annotations_are_read_when_given(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """An annotation is read when the view gives it, as log() reads its
    data: at teardown a model would be detached from the closed session."""

    @app.post("/open")
    @sidelog.audit("account.open")
    def open_account() -> str:
        account = Account(name="alice", balance=5)
        db.session.add(account)
        db.session.flush()
        sidelog.annotate(account={"id": account.id, "obj": Holder(account)})
        db.session.commit()
        return "ok"

    assert client.post("/open").text == "ok"
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["data"] == {"account": {"id": 1, "obj": {"name": "alice"}}}


@dataclasses.dataclass
class Holder:
    """Reads the account's name when flask-sidelog reads it."""

    account: dataclasses.InitVar[Account]
    name: str = ""

    def __post_init__(self, account: Account) -> None:
        self._account = account

    def __getattribute__(self, attr: str) -> t.Any:
        if attr == "name":
            return object.__getattribute__(self, "_account").name
        return object.__getattribute__(self, attr)


def test_bad_event_names_say_what_is_accepted(app: Flask, sidelog: SideLog) -> None:
    with app.app_context():
        sidelog.create_table()
        for event in ("", "   ", None, 3):
            with pytest.raises(ValueError, match="non-empty string"):
                sidelog.log(event)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=f"at most {EVENT_MAX} characters"):
            sidelog.log("x" * (EVENT_MAX + 1))
        # Stored with NUL as 4 characters and a lone surrogate as 6: too long
        # for the column, which would refuse the entry on every try.
        for event in ("\x00" * (EVENT_MAX // 4 + 1), "\ud800" * (EVENT_MAX // 6 + 1)):
            with pytest.raises(ValueError, match="once NUL and lone surrogates"):
                sidelog.log(event)
        assert sidelog.entries() == []
        longest = "\x00" * (EVENT_MAX // 4)
        sidelog.log(longest)
        assert [e["event"] for e in sidelog.entries()] == ["\\x00" * (EVENT_MAX // 4)]


def test_huge_data_is_stored_truncated(app: Flask, sidelog: SideLog) -> None:
    with app.app_context():
        sidelog.log("big", data={"blob": "x" * 200_000})
        (entry,) = sidelog.entries()
    data = entry["data"]
    assert data["_truncated"] is True
    assert data["_size"] > 200_000
    assert data["preview"].startswith('{"blob":"xxx')


def test_data_size_is_measured_as_stored(app: Flask, sidelog: SideLog) -> None:
    """Stored as ASCII JSON, an emoji takes 12 bytes (a surrogate pair of
    escapes): 6,000 of them are over the 64 KiB limit, though 24,000 bytes
    of UTF-8."""
    with app.app_context():
        sidelog.log("emoji", data={"v": "\U0001f600" * 6000})
        (entry,) = sidelog.entries()
    data = entry["data"]
    assert data["_truncated"] is True
    assert data["_size"] == len('{"v":""}') + 12 * 6000
    assert data["preview"].startswith('{"v":"\U0001f600')


def test_long_user_agent_and_path_are_cut(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.get("/<path:rest>")
    @sidelog.audit("anything")
    def anything(rest: str) -> str:
        return "ok"

    long_path = "/" + "p" * 10_000
    client.get(long_path, headers={"User-Agent": "u" * 10_240})
    with app.app_context():
        (entry,) = sidelog.entries()
    path_max, agent_max = COLUMN_LIMITS["path"], COLUMN_LIMITS["user_agent"]
    assert entry["path"] == long_path[: path_max - len(TRUNCATION_MARK)] + (
        TRUNCATION_MARK
    )
    assert len(entry["path"]) == path_max == 2048
    assert entry["user_agent"] == "u" * (agent_max - len(TRUNCATION_MARK)) + (
        TRUNCATION_MARK
    )
    assert len(entry["user_agent"]) == agent_max == 512


EAST = timezone(timedelta(hours=5))
WEST = timezone(-timedelta(hours=5))
utc_offsets = st.builds(
    timezone,
    st.timedeltas(min_value=-timedelta(hours=23), max_value=timedelta(hours=23)),
)


@HYPOTHESIS
@example(text="a\x00b", limit=2**63, since=datetime(1, 1, 1, tzinfo=EAST))
@example(text="\ud800", limit=1, since=datetime(9999, 12, 31, 23, tzinfo=WEST))
@example(text="*\x00", limit=1, since=None)  # a glob with what clean_text escapes
@given(
    text=any_text,
    limit=st.integers(min_value=0, max_value=2**70),
    since=st.none() | st.datetimes(timezones=st.none() | utc_offsets),
)
def test_any_filter_gives_results_never_a_traceback(
    app: Flask, sidelog: SideLog, text: str, limit: int, since: datetime | None
) -> None:
    """What a user types into ``flask sidelog show`` reaches these filters."""
    with app.app_context():
        sidelog.create_table()
        if text.strip():
            sidelog.log(text, actor=text)
        for name in ("event", "actor", "outcome", "request_id"):
            found = sidelog.entries(limit=limit, since=since, **{name: text})
            assert isinstance(found, list)
            if name in ("event", "actor") and text.strip() and limit and since is None:
                assert found and found[-1][name] == found[-1]["event"]


SHOW_OPTIONS = (
    "--event",
    "--actor",
    "--outcome",
    "--level",
    "--request-id",
    "--since",
    "--until",
    "--limit",
    "--format",
)


@HYPOTHESIS
@example(option="--event", text="x' OR '1'='1")
@example(option="--since", text="\x00")
@example(option="--limit", text="-1")
@example(option="--event", text="\ud800*")
@given(option=st.sampled_from(SHOW_OPTIONS), text=any_text)
def test_any_show_argument_gives_results_or_a_usage_error(
    app: Flask, sidelog: SideLog, option: str, text: str
) -> None:
    """Whatever is typed into ``flask sidelog show``: entries (exit 0) or a
    usage error that says what is accepted (exit 2), never a traceback."""
    with app.app_context():
        sidelog.create_table()
        sidelog.log("known.event", actor="alice")
    result = app.test_cli_runner().invoke(args=["sidelog", "show", option, text])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert "Invalid value" in result.output or "Error" in result.output
    elif (
        option in ("--event", "--actor", "--request-id")
        and text not in ("known.event", "alice")
        and "*" not in text  # a glob may match it
    ):
        assert "known.event" not in result.output
