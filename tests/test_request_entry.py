"""Behaviours 1, 2 and 7 of the core: the request's entry and its outcome."""

from __future__ import annotations

import functools
import typing as t

import pytest
import sqlalchemy as sa
from flask import abort
from flask import Blueprint
from flask import Flask
from flask import make_response
from flask import redirect
from flask import request
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy

from conftest import Account
from flask_sidelog import SideLog


def names(app: Flask, db: SQLAlchemy) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(sa.select(Account.name).order_by(Account.id)))


def test_exception_after_flush_keeps_log_and_audit(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.post("/transfer")
    @sidelog.audit("funds.transfer")
    def transfer() -> str:
        db.session.add(Account(name="debited", balance=-10))
        db.session.flush()
        sidelog.log("transfer.attempt", actor="alice", data={"amount": 10})
        raise RuntimeError("insufficient funds")

    with pytest.raises(RuntimeError):
        client.post("/transfer")

    assert names(app, db) == []
    with app.app_context():
        attempt, audit = sidelog.entries()
    assert attempt["event"] == "transfer.attempt"
    assert attempt["actor"] == "alice"
    assert attempt["data"] == {"amount": 10}
    assert audit["event"] == "funds.transfer"
    assert audit["outcome"] == "error"
    assert audit["status_code"] == 500
    assert audit["main_tx"] == "rolled_back"
    assert audit["level"] == "error"
    assert audit["error"] == "RuntimeError: insufficient funds"
    assert audit["request_id"] == attempt["request_id"] is not None
    assert audit["method"] == "POST"
    assert audit["path"] == "/transfer"
    assert audit["endpoint"] == "transfer"
    assert audit["duration_ms"] >= 0


def test_exception_handled_by_flask_outside_testing(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """Without TESTING, Flask turns the exception into a 500 response and
    passes it to after_request: the entry is the same."""
    app.testing = False

    @app.post("/boom")
    @sidelog.audit
    def boom() -> str:
        db.session.add(Account(name="gone"))
        db.session.flush()
        raise KeyError("missing")

    assert client.post("/boom").status_code == 500
    assert names(app, db) == []
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["event"] == "boom"
    assert (entry["outcome"], entry["status_code"]) == ("error", 500)
    assert entry["main_tx"] == "rolled_back"
    assert entry["error"] == "KeyError: 'missing'"


def test_integrity_error_at_commit(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    with app.app_context():
        db.session.add(Account(name="taken"))
        db.session.commit()

    @app.post("/signup")
    @sidelog.audit("account.create")
    def signup() -> str:
        db.session.add(Account(name="taken"))
        db.session.commit()
        return "created"

    with pytest.raises(sa.exc.IntegrityError):
        client.post("/signup")

    assert names(app, db) == ["taken"]
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["outcome"] == "error"
    assert entry["main_tx"] == "rolled_back"
    assert entry["error"].startswith("sqlalchemy.exc.IntegrityError: ")
    # PostgreSQL's DETAIL line quotes the row's values: left out.
    assert "unique" in entry["error"].lower()
    assert "taken" not in entry["error"]


def test_abort_is_a_failure(app: Flask, sidelog: SideLog, client: FlaskClient) -> None:
    @app.delete("/accounts/<int:pk>")
    @sidelog.audit("account.delete")
    def delete(pk: int) -> str:
        abort(403)

    assert client.delete("/accounts/7").status_code == 403
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["outcome"] == "failure"
    assert entry["status_code"] == 403
    assert entry["level"] == "warning"
    assert entry["main_tx"] == "none"
    assert entry["error"] == "werkzeug.exceptions.Forbidden: 403 Forbidden"


def test_abort_with_a_response(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    """abort(response), Flask's way to send a redirect or a made response
    from deep in a view, was stored as "None Unknown Error", on successes
    too."""

    @app.get("/go")
    @sidelog.audit("go")
    def go() -> str:
        abort(redirect("/login"))

    @app.get("/legal")
    @sidelog.audit("legal")
    def legal() -> str:
        abort(make_response("blocked", 451))

    assert client.get("/go").status_code == 302
    assert client.get("/legal").status_code == 451
    with app.app_context():
        go_entry, legal_entry = sidelog.entries()
    assert (go_entry["outcome"], go_entry["status_code"], go_entry["error"]) == (
        "success",
        302,
        None,
    )
    assert (legal_entry["outcome"], legal_entry["status_code"]) == ("failure", 451)
    assert legal_entry["error"] == (
        "werkzeug.exceptions.HTTPException: 451 UNAVAILABLE FOR LEGAL REASONS"
    )


def test_request_turned_away_before_the_audited_view(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    """A blueprint's before_request guard, or a decorator above @audit,
    turns a request away before the view runs: the denied attempt is what
    an audit log must keep, and it wrote no entry."""
    admin = Blueprint("admin", __name__, url_prefix="/admin")

    @admin.before_request
    def require_admin() -> t.Any:
        if request.args.get("as") == "guest":
            abort(403)
        if request.args.get("as") == "nobody":
            return redirect("/login")
        return None

    @admin.post("/wipe")
    @sidelog.audit("admin.wipe")
    def wipe() -> str:
        return "wiped"

    @admin.post("/other")  # not audited: nothing to record
    def other() -> str:
        return "other"

    def login_required(view: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        @functools.wraps(view)
        def check(*args: t.Any, **kwargs: t.Any) -> t.Any:
            if "user" not in request.args:
                abort(401)
            return view(*args, **kwargs)

        return check

    @app.post("/transfer")
    @login_required
    @sidelog.audit()
    def transfer() -> str:
        return "sent"

    app.register_blueprint(admin)
    for path, status in [
        ("/admin/wipe?as=guest", 403),
        ("/admin/wipe?as=nobody", 302),
        ("/admin/wipe", 200),
        ("/admin/other?as=guest", 403),
        ("/transfer", 401),
        ("/transfer?user=ann", 200),
        ("/nowhere", 404),
    ]:
        assert client.post(path).status_code == status, path
    with app.app_context():
        found = [
            (e["event"], e["outcome"], e["status_code"], e["main_tx"], e["path"])
            for e in sidelog.entries()
        ]
    assert found == [
        ("admin.wipe", "failure", 403, "none", "/admin/wipe"),
        ("admin.wipe", "success", 302, "none", "/admin/wipe"),
        ("admin.wipe", "success", 200, "none", "/admin/wipe"),
        ("transfer", "failure", 401, "none", "/transfer"),
        ("transfer", "success", 200, "none", "/transfer"),
    ]


def test_success_with_commit(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.post("/accounts")
    @sidelog.audit("account.create")
    def create() -> tuple[str, int]:
        sidelog.annotate(amount=10, password="hunter2")
        db.session.add(Account(name="bob"))
        db.session.commit()
        return "created", 201

    assert client.post("/accounts").status_code == 201
    assert names(app, db) == ["bob"]
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["outcome"] == "success"
    assert entry["status_code"] == 201
    assert entry["main_tx"] == "committed"
    assert entry["level"] == "info"
    assert entry["error"] is None
    assert entry["data"] == {"amount": 10, "password": "[redacted]"}


def test_view_that_writes_nothing(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.get("/accounts")
    @sidelog.audit
    def index() -> str:
        return ",".join(db.session.scalars(sa.select(Account.name)))

    assert client.get("/accounts").status_code == 200
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["event"] == "index"
    assert (entry["outcome"], entry["main_tx"]) == ("success", "none")


@pytest.mark.parametrize(
    "sql",
    [
        "WITH t AS (SELECT 1 AS x) SELECT x FROM t",
        "-- how many\nSELECT count(*) FROM account",
        "/* how many */ SELECT count(*) FROM account",
        "(SELECT count(*) FROM account)",
        # A session setting (row-level security's tenant, a timeout).
        "SET LOCAL statement_timeout = 1000",
        # Words that write, in a literal or after FOR.
        "SET application_name = 'nightly update'",
        "SET LOCAL lock_timeout = '1s'; SELECT name FROM account FOR UPDATE",
        "WITH t AS (SELECT 'to delete' AS x) SELECT x FROM t",
    ],
)
def test_text_reads_write_nothing(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    backend: str,
    sql: str,
) -> None:
    if sql.startswith(("(", "SET")) and backend != "postgres":
        pytest.skip("SQLite takes no statement in parentheses, nor SET")

    @app.get("/count")
    @sidelog.audit
    def count() -> str:
        result = db.session.execute(sa.text(sql))
        return str(result.scalar()) if result.returns_rows else "set"

    assert client.get("/count").status_code == 200
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["main_tx"] == "none"


# pysqlite runs one statement per execute.
@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("first", ["SET LOCAL statement_timeout = 5000", "SAVEPOINT s"])
@pytest.mark.parametrize("commit", [True, False])
def test_a_write_after_a_setting_in_one_text_is_a_write(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    first: str,
    commit: bool,
) -> None:
    @app.post("/add")
    @sidelog.audit
    def add() -> str:
        db.session.execute(
            sa.text(f"{first}; INSERT INTO account (name, balance) VALUES ('x', 0)")
        )
        if commit:
            db.session.commit()
        return "ok"

    assert client.post("/add").status_code == 200
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["main_tx"] == ("committed" if commit else "rolled_back")


@pytest.mark.parametrize("wrapped", ["columns", "from_statement", "both"])
def test_text_write_typed_with_columns_is_a_write(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    wrapped: str,
) -> None:
    """text(...).columns(...) is a TextualSelect, and so is text in an ORM
    from_statement(), whatever its SQL does."""

    @app.post("/add")
    @sidelog.audit
    def add() -> str:
        insert = sa.text(
            "INSERT INTO account (name, balance) VALUES ('typed', 0) RETURNING *"
        )
        if wrapped == "columns":
            db.session.execute(insert.columns(id=sa.Integer)).all()
        elif wrapped == "from_statement":
            db.session.scalars(sa.select(Account).from_statement(insert)).all()
        else:
            typed = insert.columns(Account.id, Account.name, Account.balance)
            db.session.scalars(sa.select(Account).from_statement(typed)).all()
        return "ok"  # never committed

    assert client.post("/add").status_code == 200
    assert names(app, db) == []
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["main_tx"] == "rolled_back"


def test_flushed_then_not_committed_is_rolled_back(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A view that flushes and returns without committing: the teardown
    discards the work, and the entry says so."""

    @app.post("/forgot")
    @sidelog.audit
    def forgot() -> str:
        db.session.add(Account(name="never"))
        db.session.flush()
        return "ok"

    assert client.post("/forgot").status_code == 200
    assert names(app, db) == []
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["main_tx"]) == ("success", "rolled_back")


def test_returned_error_status(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.get("/teapot")
    @sidelog.audit
    def teapot() -> tuple[str, int]:
        return "no", 418

    @app.get("/unavailable")
    @sidelog.audit
    def unavailable() -> tuple[str, int]:
        return "later", 503

    client.get("/teapot")
    client.get("/unavailable")
    with app.app_context():
        first, second = sidelog.entries()
    assert (first["outcome"], first["status_code"]) == ("failure", 418)
    assert (second["outcome"], second["status_code"]) == ("error", 503)


def test_async_view(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.post("/async")
    @sidelog.audit("async.create")
    async def create() -> str:
        """Create an account, asynchronously."""
        db.session.add(Account(name="async"))
        db.session.commit()
        return "done"

    @app.get("/async-fail")
    @sidelog.audit("async.fail")
    async def fail() -> str:
        abort(404)

    assert create.__name__ == "create"
    assert create.__doc__ == "Create an account, asynchronously."
    assert client.post("/async").get_data(as_text=True) == "done"
    assert client.get("/async-fail").status_code == 404
    with app.app_context():
        created, failed = sidelog.entries()
    assert (created["outcome"], created["main_tx"]) == ("success", "committed")
    assert (failed["outcome"], failed["status_code"]) == ("failure", 404)


def test_teardown_twice_writes_once(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    """With ``with client:`` the context is kept and torn down later; the
    entry is still written exactly once."""

    @app.get("/kept")
    @sidelog.audit
    def kept() -> str:
        return "ok"

    with client:
        client.get("/kept")
    client.get("/kept")
    with app.app_context():
        assert [e["event"] for e in sidelog.entries()] == ["kept", "kept"]


def test_entry_that_cannot_be_made_keeps_the_others(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should making the request's own entry fail (a fault of ours, which no
    known input causes any more), the request is still recorded, and what it
    logged is written, those entries too that waited for its end (SQLite's
    write lock)."""

    def broken(*args: t.Any) -> t.NoReturn:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SideLog, "_audit_entry", broken)

    @app.post("/transfer")
    @sidelog.audit("funds.transfer")
    def transfer() -> str:
        db.session.add(Account(name="debited", balance=-10))
        db.session.flush()
        sidelog.log("transfer.attempt")
        db.session.commit()
        return "ok"

    assert client.post("/transfer").text == "ok"
    with app.app_context():
        attempt, audit = sidelog.entries()
    assert attempt["event"] == "transfer.attempt"
    assert audit["event"] == "funds.transfer"
    assert audit["level"] == "error"
    assert audit["error"] == "flask-sidelog could not make this entry: RuntimeError"
    assert audit["request_id"] == attempt["request_id"] is not None
    assert audit["path"] == "/transfer"


def test_nested_audit_writes_the_outer_event(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @sidelog.audit("inner")
    def inner() -> str:
        return "inner"

    @app.get("/outer")
    @sidelog.audit("outer")
    def outer() -> str:
        return inner()

    assert client.get("/outer").get_data(as_text=True) == "inner"
    with app.app_context():
        assert [e["event"] for e in sidelog.entries()] == ["outer"]


# pysqlite without SQLAlchemy's documented savepoint recipe commits at RELEASE.
@pytest.mark.parametrize("backend", ["postgres"])
def test_savepoint_released_then_outer_rolled_back(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """Releasing a savepoint fires after_commit; the request still lost it all."""

    @app.post("/")
    @sidelog.audit
    def view() -> str:
        with db.session.begin_nested():
            db.session.add(Account(name="inner"))
        db.session.rollback()
        return "ok"

    client.post("/")
    assert names(app, db) == []
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["main_tx"] == "rolled_back"


# pysqlite begins a transaction only before a statement that starts with
# INSERT/UPDATE/DELETE: its "WITH ... INSERT" commits at once.
@pytest.mark.parametrize("backend", ["postgres"])
def test_text_cte_insert_counts_as_a_write(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.post("/")
    @sidelog.audit
    def view() -> str:
        db.session.execute(
            sa.text(
                "WITH n AS (SELECT 'cte' AS name)"
                " INSERT INTO account (name, balance) SELECT name, 0 FROM n"
            )
        )
        raise LookupError("after the insert")

    with pytest.raises(LookupError):
        client.post("/")
    assert names(app, db) == []
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["main_tx"]) == ("error", "rolled_back")


class NotThere(Exception):
    pass


def test_exception_turned_into_a_response_by_an_errorhandler(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.errorhandler(NotThere)
    def not_there(e: NotThere) -> tuple[str, int]:
        return "not there", 404

    @app.get("/")
    @sidelog.audit
    def view() -> str:
        raise NotThere("no such account")

    assert client.get("/").status_code == 404
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["status_code"]) == ("failure", 404)
    assert entry["error"] == "test_request_entry.NotThere: no such account"


def test_http_error_an_errorhandler_answers_with_a_success_keeps_its_text(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    """A 404 answered with a page (a single-page app's fallback) is judged
    by the 200 it got; what was raised stays in ``error``, as for any
    exception an errorhandler answers. Only abort(response) has none."""

    @app.errorhandler(404)
    def fallback(e: Exception) -> str:
        return "index page"

    @app.get("/deep/<name>")
    @sidelog.audit("deep")
    def deep(name: str) -> str:
        abort(404)

    assert client.get("/deep/x").status_code == 200
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["status_code"]) == ("success", 200)
    assert entry["error"] == "werkzeug.exceptions.NotFound: 404 Not Found"


def test_after_request_that_raises_in_testing(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.get("/")
    @sidelog.audit
    def view() -> str:
        return "ok"

    def explode(response: t.Any) -> t.Any:
        raise OSError("after_request failed")

    # after_request hooks run last-registered first: this one runs after ours.
    app.after_request_funcs.setdefault(None, []).insert(0, explode)
    with pytest.raises(OSError):
        client.get("/")
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["status_code"]) == ("error", 500)
    assert entry["error"] == "OSError: after_request failed"


def test_audit_checks_the_event_when_it_decorates(sidelog: SideLog) -> None:
    with pytest.raises(ValueError, match="at most 200 characters"):
        sidelog.audit("e" * 201)


def test_audited_function_called_outside_a_request(
    app: Flask, sidelog: SideLog
) -> None:
    @sidelog.audit
    def helper() -> int:
        return 7

    with app.app_context():
        assert helper() == 7
        assert sidelog.entries() == []
