"""Case 7: request ids. A client's id is used only when it is well formed;
anything else is replaced, never stored raw."""

from __future__ import annotations

import re
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask

from conftest import Account
from conftest import Base
from conftest import dispose
from conftest import make_app
from flask_sidelog import SideLog

GENERATED = re.compile(r"[0-9a-f]{32}")


def audited_app(tmp_path: t.Any, config: dict[str, t.Any]) -> tuple[Flask, SideLog]:
    app, _, sidelog = make_app(
        f"sqlite:///{tmp_path / 'app.db'}", str(tmp_path / "instance"), config
    )

    @app.get("/")
    @sidelog.audit("home")
    def home() -> str:
        sidelog.log("inside")
        return "ok"

    return app, sidelog


def test_default_always_generates(tmp_path: t.Any) -> None:
    app, sidelog = audited_app(tmp_path, {})
    response = app.test_client().get("/", headers={"X-Request-ID": "abc"})
    with app.app_context():
        stored = [e["request_id"] for e in sidelog.entries()]
    assert "X-Request-ID" not in response.headers
    assert stored[0] == stored[1]
    assert GENERATED.fullmatch(stored[0])
    dispose(app)


@pytest.mark.parametrize(
    ("incoming", "used"),
    [
        ("abc-123", True),
        ("A.b_c:d-9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ("new\nline", False),
        ("\x1b[31mred", False),
        ("quote'", False),
        ("abc\n", False),
        ("caf\u00e9", False),
    ],
)
def test_incoming_id_used_only_when_well_formed(
    tmp_path: t.Any, incoming: str, used: bool
) -> None:
    app, sidelog = audited_app(
        tmp_path,
        {
            "SIDELOG_REQUEST_ID_HEADER": "X-Request-ID",
            "SIDELOG_REQUEST_ID_RESPONSE_HEADER": "X-Request-ID",
        },
    )
    # Werkzeug's test client refuses newlines in headers; send them raw in
    # the WSGI environ, as a broken proxy could.
    response = app.test_client().get("/", environ_base={"HTTP_X_REQUEST_ID": incoming})
    with app.app_context():
        stored = {e["request_id"] for e in sidelog.entries()}
    assert len(stored) == 1
    (request_id,) = stored
    assert response.headers["X-Request-ID"] == request_id
    if used:
        assert request_id == incoming
    else:
        assert GENERATED.fullmatch(request_id)
    dispose(app)


def test_response_header_without_incoming_header(tmp_path: t.Any) -> None:
    """The id is echoed on any response, audited or not, and matches the entry."""
    app, sidelog = audited_app(
        tmp_path, {"SIDELOG_REQUEST_ID_RESPONSE_HEADER": "X-Trace"}
    )

    @app.get("/plain")
    def plain() -> str:
        return "plain"

    client = app.test_client()
    audited = client.get("/", headers={"X-Trace": "client-sent"})
    other = client.get("/plain")
    with app.app_context():
        stored = {e["request_id"] for e in sidelog.entries()}
    assert stored == {audited.headers["X-Trace"]}
    assert GENERATED.fullmatch(audited.headers["X-Trace"])
    assert GENERATED.fullmatch(other.headers["X-Trace"])
    assert other.headers["X-Trace"] != audited.headers["X-Trace"]
    dispose(app)


def test_entries_after_the_request_context_keep_its_fields(
    database_uri: str, tmp_path: t.Any
) -> None:
    """Flask pops the request before app context teardown: a log() or a
    tracked commit there still carries the request's id and fields."""
    app, db, sidelog = make_app(database_uri, str(tmp_path))
    assert db is not None
    sidelog.track(Account)
    with app.app_context():
        Base.metadata.create_all(db.engine, tables=[Account.__table__])

    @app.post("/accounts")
    def create() -> str:
        db.session.execute(sa.text("UPDATE account SET balance = 0 WHERE 1 = 0"))
        db.session.add(Account(name="late", balance=1))
        return "ok"

    @app.teardown_appcontext
    def commit_and_log(exc: BaseException | None) -> None:
        db.session.commit()
        sidelog.log("after.request")

    try:
        assert app.test_client().post("/accounts").status_code == 200
        with app.app_context():
            found = sidelog.entries()
    finally:
        app.teardown_appcontext_funcs.remove(commit_and_log)
        with app.app_context():
            Base.metadata.drop_all(db.engine, tables=[Account.__table__])
        dispose(app)
    assert [e["event"] for e in found] == ["account.insert", "after.request"]
    for entry in found:
        assert entry["request_id"] is not None
        assert (entry["method"], entry["path"]) == ("POST", "/accounts")
    assert found[0]["request_id"] == found[1]["request_id"]


def test_a_request_in_an_app_context_sidelog_used_before(
    database_uri: str, tmp_path: t.Any
) -> None:
    """Flask reuses an app context already pushed when a request comes (a
    test that commits, then calls the client, in one ``with
    app.app_context()``): the context's state began before the request, and
    its entries still carry the request's fields."""
    app, db, sidelog = make_app(
        database_uri,
        str(tmp_path),
        {"SIDELOG_REQUEST_ID_RESPONSE_HEADER": "X-Request-ID"},
    )
    assert db is not None

    @app.post("/transfer")
    @sidelog.audit()
    def funds_transfer() -> str:
        sidelog.log("inside")
        return "ok"

    try:
        with app.app_context():
            Base.metadata.create_all(db.engine, tables=[Account.__table__])
            sidelog.log("before")  # the context's state begins here
            db.session.add(Account(name="a", balance=1))
            db.session.commit()
            response = app.test_client().post("/transfer")
        # The audit entry is written as the app context ends, here.
        with app.app_context():
            found = sidelog.entries()
            Base.metadata.drop_all(db.engine, tables=[Account.__table__])
    finally:
        dispose(app)
    assert response.status_code == 200
    by_event = {e["event"]: e for e in found}
    assert set(by_event) == {"before", "inside", "funds_transfer"}
    assert by_event["before"]["path"] is None
    for event in ("inside", "funds_transfer"):
        entry = by_event[event]
        assert (entry["method"], entry["path"]) == ("POST", "/transfer")
        assert entry["endpoint"] == "funds_transfer"
        assert entry["request_id"] == response.headers["X-Request-ID"]
