"""Change capture: each attempted change to a tracked model, with its fate."""

from __future__ import annotations

import enum
import functools
import json
import sqlite3
import subprocess
import sys
import typing as t
import uuid
from datetime import datetime
from datetime import timezone

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import Flask
from flask.testing import FlaskClient
from flask.testing import FlaskCliRunner
from flask_sqlalchemy import SQLAlchemy
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from conftest import Account
from conftest import Base
from conftest import dispose
from conftest import make_app
from flask_sidelog import SideLog
from flask_sidelog import tracking
from flask_sidelog.config import DEFAULT_REDACT_KEYS
from flask_sidelog.entry import make_entry
from flask_sidelog.signals import entry_failed
from flask_sidelog.tracking import _named
from flask_sidelog.tracking import _names_size
from flask_sidelog.tracking import _Spec
from flask_sidelog.tracking import _stored_as_is
from flask_sidelog.tracking import Change
from flask_sidelog.tracking import make_change_entries
from flask_sidelog.tracking import OLD_VALUES_PER_SELECT
from flask_sidelog.tracking import parse_pk

SQLALCHEMY_VERSION = tuple(int(n) for n in sa.__version__.split(".")[:3])


class Credential(Base):
    __tablename__ = "tr_credential"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    login: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(80))
    password_hash: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(200))
    ssn: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))


class Membership(Base):
    __tablename__ = "tr_membership"
    org_id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    user_id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    role: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))


class Note(Base):
    __tablename__ = "tr_note"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    text: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(200))


class Badge(Base):
    __tablename__ = "tr_badge"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    code: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40))
    # An attribute whose column has another name.
    secret: sa_orm.Mapped[str] = sa_orm.mapped_column("social", sa.String(40))


class Person(Base):
    __tablename__ = "tr_person"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    kind: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(80))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "person"}


class Employee(Person):
    __tablename__ = "tr_employee"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(
        sa.ForeignKey("tr_person.id"), primary_key=True
    )
    salary: sa_orm.Mapped[int] = sa_orm.mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "employee"}


class Stage(enum.Enum):
    new = "new"
    done = "done"


class Task(Base):
    __tablename__ = "tr_task"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    title: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40))
    # Reads fail for a stored name no member has any more.
    stage: sa_orm.Mapped[Stage] = sa_orm.mapped_column(
        sa.Enum(Stage, native_enum=False, create_constraint=False, length=20)
    )


class Label(Base):
    __tablename__ = "tr_label"
    scope: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40), primary_key=True)
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40), primary_key=True)
    color: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))


class JSONText(sa.TypeDecorator[t.Any]):
    """JSON with a twist, as apps define their own."""

    impl = sa.JSON
    cache_ok = True


class Profile(Base):
    __tablename__ = "tr_profile"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    meta: sa_orm.Mapped[dict[str, t.Any]] = sa_orm.mapped_column(sa.JSON)
    extra: sa_orm.Mapped[dict[str, t.Any] | None] = sa_orm.mapped_column(JSONText)
    plan: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20), default="free")


class Shape(Base):
    __tablename__ = "tr_shape"
    org_id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    user_id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    kind: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    role: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "shape"}


class Circle(Shape):  # one table: its SELECTs add "kind IN (...)"
    __mapper_args__ = {"polymorphic_identity": "circle"}


class BigCircle(Circle):
    __mapper_args__ = {"polymorphic_identity": "big_circle"}


class Folder(Base):
    __tablename__ = "tr_folder"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    # No backref: a file moved here is changed only by the flush.
    files: sa_orm.Mapped[list[File]] = sa_orm.relationship()


class File(Base):
    __tablename__ = "tr_file"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    folder_id: sa_orm.Mapped[int | None] = sa_orm.mapped_column(
        sa.ForeignKey("tr_folder.id")
    )
    # Columns the ORM sets itself in an UPDATE.
    edited_by: sa_orm.Mapped[str] = sa_orm.mapped_column(
        sa.String(20), default="seed", onupdate="app"
    )
    version: sa_orm.Mapped[int] = sa_orm.mapped_column(nullable=False)
    __mapper_args__ = {"version_id_col": version}


class Tag(Base):
    __tablename__ = "tr_tag"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40))
    credential_id: sa_orm.Mapped[int | None] = sa_orm.mapped_column(
        sa.ForeignKey("tr_credential.id")
    )
    credential: sa_orm.Mapped[Credential | None] = sa_orm.relationship()


class Box(Base):
    __tablename__ = "tr_box"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    # No backref: a thing taken out is an orphan only the flush finds.
    things: sa_orm.Mapped[list[Thing]] = sa_orm.relationship(
        cascade="all, delete-orphan"
    )


class Thing(Base):
    __tablename__ = "tr_thing"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    box_id: sa_orm.Mapped[int | None] = sa_orm.mapped_column(sa.ForeignKey("tr_box.id"))
    label: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))


class Sheet(Base):
    """A version the app sets itself."""

    __tablename__ = "tr_sheet"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    title: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40))
    ver: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    __mapper_args__ = {"version_id_col": ver, "version_id_generator": False}


class Elementwise:
    """What an array's == gives: no truth value."""

    def __bool__(self) -> bool:
        raise ValueError("the truth value of an array is ambiguous")


class Vector:
    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __eq__(self, other: object) -> t.Any:
        return Elementwise()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Vector{tuple(self.values)}"


def same_vector(a: t.Any, b: t.Any) -> bool:
    return isinstance(a, Vector) and isinstance(b, Vector) and a.values == b.values


class Embedding(Base):
    """Values the ORM compares with the column type's comparator."""

    __tablename__ = "tr_embedding"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    vector: sa_orm.Mapped[t.Any] = sa_orm.mapped_column(
        sa.PickleType(comparator=same_vector)
    )
    raw: sa_orm.Mapped[t.Any] = sa_orm.mapped_column(sa.PickleType, nullable=True)


class Upload(Base):
    """A blob nobody reads by the way."""

    __tablename__ = "tr_upload"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    views: sa_orm.Mapped[int] = sa_orm.mapped_column(default=0)
    blob: sa_orm.Mapped[bytes] = sa_orm.mapped_column(sa.LargeBinary, deferred=True)
    taken: sa_orm.Mapped[datetime | None] = sa_orm.mapped_column(
        sa.DateTime(timezone=True)
    )


class Card(Base):
    __tablename__ = "tr_card"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    holder: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40))
    # Write-only for the app's role: it may set it, never read it.
    pin_hash: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(80), deferred=True)


class Stamped(Base):
    """Stamped by a listener of the app's as the flush writes it."""

    __tablename__ = "tr_stamped"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    title: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    edited_by: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    # A many-to-one with no FOREIGN KEY constraint, as legacy schemas have.
    owner_id: sa_orm.Mapped[int | None] = sa_orm.mapped_column()
    owner: sa_orm.Mapped[Thing | None] = sa_orm.relationship(
        primaryjoin="Thing.id == foreign(Stamped.owner_id)"
    )


@sa.event.listens_for(Stamped, "before_update")
def _stamp(mapper: t.Any, connection: t.Any, target: Stamped) -> None:
    target.edited_by = "editor"


class Moment(datetime):
    """A datetime subclass whose own code raises."""

    def isoformat(self, *args: t.Any, **kwargs: t.Any) -> str:
        raise RuntimeError("no isoformat")


class UserId(str):
    """An actor id type an app may have: a str without a hash."""

    __hash__ = None  # type: ignore[assignment]


OPS = ("insert", "update", "delete", "bulk_insert", "bulk_update", "bulk_delete")


def changes(app: Flask, sidelog: SideLog, table: str = "") -> list[dict[str, t.Any]]:
    """The change entries (of ``table``, or of every table), oldest first."""
    with app.app_context():
        found = sidelog.entries(limit=10_000)
    found.sort(key=lambda e: (e["created_at"], e["id"]))
    return [
        e
        for e in found
        if e["event"].rpartition(".")[2] in OPS
        and (not table or e["event"].startswith(f"{table}."))
    ]


def summary(entries: list[dict[str, t.Any]]) -> list[tuple[str, str, t.Any]]:
    return [(e["event"], e["main_tx"], e["data"].get("changes")) for e in entries]


def seed(app: Flask, db: SQLAlchemy, *accounts: tuple[str, int]) -> None:
    with app.app_context():
        db.session.add_all(Account(name=n, balance=b) for n, b in accounts)
        db.session.commit()


def balances(app: Flask, db: SQLAlchemy) -> dict[str, int]:
    with app.app_context():
        return dict(db.session.execute(sa.select(Account.name, Account.balance)).all())


def test_insert_update_delete_committed(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    sidelog.track(Account)

    @app.post("/accounts")
    def create() -> str:
        db.session.add(Account(name="alice", balance=10))
        db.session.commit()
        return "ok"

    @app.patch("/accounts/<int:pk>")
    def update(pk: int) -> str:
        account = db.get_or_404(Account, pk)
        account.name = "alice"  # set, but not changed: not recorded
        account.balance = 25
        db.session.commit()
        return "ok"

    @app.delete("/accounts/<int:pk>")
    def delete(pk: int) -> str:
        db.session.delete(db.get_or_404(Account, pk))
        db.session.commit()
        return "ok"

    client.post("/accounts")
    client.patch("/accounts/1")
    client.delete("/accounts/1")

    assert balances(app, db) == {}
    found = changes(app, sidelog)
    assert summary(found) == [
        (
            "account.insert",
            "committed",
            {"id": [None, 1], "name": [None, "alice"], "balance": [None, 10]},
        ),
        ("account.update", "committed", {"balance": [10, 25]}),
        (
            "account.delete",
            "committed",
            {"id": [1, None], "name": ["alice", None], "balance": [25, None]},
        ),
    ]
    assert all(e["data"]["table"] == "account" for e in found)
    assert all(e["data"]["pk"] == {"id": 1} for e in found)
    assert all(e["request_id"] is not None for e in found)
    assert [e["method"] for e in found] == ["POST", "PATCH", "DELETE"]


def test_values_compared_as_the_orm_compares_them(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A column type's comparator decides what changed, as it decides what
    the ORM writes; a value that cannot be compared with == (an array) is a
    change. Neither breaks the flush or loses its other changes."""
    sidelog.track(Embedding)

    @app.post("/embeddings")
    def edit() -> str:
        row = Embedding(name="a", vector=Vector(1, 2))
        db.session.add(row)
        db.session.commit()
        row.name = "b"
        row.vector = Vector(1, 2)  # equal for its type: not written
        row.raw = Vector(5)
        db.session.commit()
        row.vector = Vector(3, 4)
        row.raw = Vector(5)  # no comparator: written again
        db.session.commit()
        return "ok"

    @app.patch("/embeddings/<int:pk>")
    def change(pk: int) -> str:
        row = db.get_or_404(Embedding, pk)  # loaded: nothing expired
        row.vector = Vector(7)
        db.session.commit()
        return "ok"

    assert client.post("/embeddings").text == "ok"
    assert client.patch("/embeddings/1").text == "ok"
    with app.app_context():
        assert db.session.get(Embedding, 1).vector.values == [7]
    assert summary(changes(app, sidelog)) == [
        (
            "tr_embedding.insert",
            "committed",
            {"id": [None, 1], "name": [None, "a"], "vector": [None, "Vector(1, 2)"]},
        ),
        (
            "tr_embedding.update",
            "committed",
            {"name": ["a", "b"], "raw": [None, "Vector(5,)"]},
        ),
        (
            "tr_embedding.update",
            "committed",
            {
                "vector": ["Vector(1, 2)", "Vector(3, 4)"],
                "raw": ["Vector(5,)", "Vector(5,)"],
            },
        ),
        (
            "tr_embedding.update",
            "committed",
            {"vector": ["Vector(3, 4)", "Vector(7,)"]},
        ),
    ]


@pytest.mark.parametrize(
    ("part", "recorded"),
    [
        ("_read_old_values", [("account.update", "committed", {"balance": [5, 6]})]),
        ("_row_changes", []),
    ],
)
def test_a_capture_that_fails_never_breaks_the_flush(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    part: str,
    recorded: list[tuple[str, str, t.Any]],
) -> None:
    """A fault of ours while a flush is captured (none is known) is logged;
    the app's flush and commit go on, and what could be captured is kept."""
    seed(app, db, ("alice", 5))
    sidelog.track(Account)

    def broken(*args: t.Any) -> t.NoReturn:
        raise RuntimeError("a bug")

    monkeypatch.setattr(tracking, part, broken)

    @app.post("/raise")
    def bump() -> str:
        account = db.session.scalars(sa.select(Account)).one()
        account.balance += 1
        db.session.commit()
        return "ok"

    assert client.post("/raise").text == "ok"
    assert balances(app, db) == {"alice": 6}
    assert summary(changes(app, sidelog)) == recorded
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)


def test_unloaded_columns_are_not_read_and_deletes_go_by_the_stored_key(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A deferred column is read for the old values only if it was set; a
    delete names the row it deletes, whatever its key was set to, and marks
    what was never loaded. An odd value, or an actor of an odd str type,
    stores a marker without losing the flush's other changes."""
    with app.app_context():
        db.session.add(Upload(id=1, blob=b"x" * 10_000))
        db.session.commit()
    sidelog.track(Upload)
    sidelog.actor_loader(lambda: UserId("u1"))
    statements: list[str] = []

    @app.post("/uploads")
    def work() -> str:
        upload = db.session.get(Upload, 1)
        db.session.commit()  # expires it
        sa.event.listen(db.engine, "before_cursor_execute", record)
        upload.views = 1  # set while expired: its old value is read
        db.session.commit()
        sa.event.remove(db.engine, "before_cursor_execute", record)
        db.session.add_all(
            [Upload(id=2, blob=b"", taken=Moment(2026, 1, 1)), Upload(id=3, blob=b"")]
        )
        db.session.commit()
        upload.id = 9  # in memory only: the DELETE goes by id 1
        db.session.delete(upload)
        db.session.commit()
        return "ok"

    def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        statements.append(statement)

    assert client.post("/uploads").text == "ok"
    assert not any("blob" in s for s in statements if s.startswith("SELECT"))
    found = changes(app, sidelog, "tr_upload")
    assert [(e["event"], e["data"]["pk"]) for e in found] == [
        ("tr_upload.update", {"id": 1}),
        ("tr_upload.insert", {"id": 2}),
        ("tr_upload.insert", {"id": 3}),
        ("tr_upload.delete", {"id": 1}),
    ]
    assert found[0]["data"]["changes"] == {"views": [0, 1]}
    assert found[1]["data"]["changes"]["taken"] == [
        None,
        "<unreadable Moment: RuntimeError>",
    ]
    assert found[3]["data"]["changes"] == {
        "id": [1, None],
        "views": [1, None],
        "blob": ["[not loaded]", None],
        "taken": [None, None],
    }
    assert {e["actor"] for e in found} == {"u1"}


@pytest.mark.postgres
def test_old_values_of_an_engine_in_autocommit_mode(
    postgres: t.Any, tmp_path: t.Any
) -> None:
    """No transaction to guard, so no savepoint around the read (which
    PostgreSQL would refuse)."""
    uri = postgres.create_database(f"t_{uuid.uuid4().hex[:16]}")
    config = {"SQLALCHEMY_ENGINE_OPTIONS": {"isolation_level": "AUTOCOMMIT"}}
    app, db, sidelog = make_app(uri, str(tmp_path), config)
    assert db is not None
    with app.app_context():
        Base.metadata.create_all(db.engine, tables=[Account.__table__])
    seed(app, db, ("alice", 10))
    sidelog.track(Account)

    @app.post("/raise")
    def bump() -> str:
        account = db.session.scalars(sa.select(Account)).one()
        db.session.commit()  # expires it
        account.balance = 11
        db.session.commit()
        return "ok"

    try:
        assert app.test_client().post("/raise").text == "ok"
        found = changes(app, sidelog)
    finally:
        dispose(app)
    assert summary(found) == [("account.update", "committed", {"balance": [10, 11]})]


@pytest.mark.postgres
def test_old_values_the_role_may_not_read_leave_the_transaction_alone(
    postgres: t.Any, tmp_path: t.Any
) -> None:
    """A column the app may write but not read: its old value is unknown,
    and the refused read does not abort the app's transaction."""
    uri = postgres.create_database(f"t_{uuid.uuid4().hex[:16]}")
    owner = sa.create_engine(uri, isolation_level="AUTOCOMMIT")
    role = f"writer_{uuid.uuid4().hex[:8]}"
    with owner.connect() as conn:
        Base.metadata.create_all(conn, tables=[Card.__table__])
        conn.execute(sa.insert(Card).values(id=1, holder="ann", pin_hash="old"))
        conn.exec_driver_sql(
            f"CREATE ROLE {role} LOGIN;"
            f" GRANT SELECT (id, holder), INSERT, UPDATE ON tr_card TO {role}"
        )
    owner.dispose()
    config = {"SIDELOG_DATABASE_URI": uri}  # the log is the owner's
    app, db, sidelog = make_app(
        uri.replace("postgres@", f"{role}@"), str(tmp_path), config
    )
    assert db is not None
    sidelog.track(Card)

    @app.post("/pin")
    def set_pin() -> str:
        card = db.session.get(Card, 1)
        db.session.commit()  # expires it
        card.pin_hash = "new"
        db.session.commit()
        return "ok"

    try:
        assert app.test_client().post("/pin").text == "ok"
        with app.app_context():
            (entry,) = sidelog.entries()
    finally:
        dispose(app)
    assert (entry["main_tx"], entry["data"]["changes"]) == (
        "committed",
        {"pin_hash": ["[not loaded]", "new"]},
    )
    check = sa.create_engine(uri)
    with check.connect() as conn:
        assert conn.scalar(sa.select(Card.pin_hash)) == "new"
    check.dispose()


def test_old_values_of_an_expired_row_that_the_flush_sets_itself(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A column a listener of the app's sets, a key a relationship without
    a constraint syncs: their old values are read too."""
    with app.app_context():
        db.session.add_all(
            [Thing(id=1, label="a"), Thing(id=2, label="b")]
            + [Stamped(id=1, title="a", edited_by="creator", owner_id=1)]
        )
        db.session.commit()
    sidelog.track(Stamped)

    @app.post("/edit")
    def edit() -> str:
        row = db.session.get(Stamped, 1)
        other = db.session.get(Thing, 2)
        db.session.commit()  # expires them
        row.title = "b"
        row.owner = other
        db.session.commit()
        return "ok"

    assert client.post("/edit").text == "ok"
    assert summary(changes(app, sidelog)) == [
        (
            "tr_stamped.update",
            "committed",
            {
                "title": ["a", "b"],
                "owner_id": [1, 2],
                "edited_by": ["creator", "editor"],
            },
        )
    ]


def test_a_column_set_to_sql_is_recorded(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """``balance = Account.balance + 5``: the database computes it and the
    session forgets it, but the change is there, loaded or expired."""
    seed(app, db, ("alice", 10))
    sidelog.track(Account)

    @app.post("/credit")
    def credit() -> str:
        account = db.session.scalars(sa.select(Account)).one()
        account.balance = Account.balance + 5
        db.session.commit()  # expires it
        account.balance = Account.balance + 1
        db.session.commit()
        return "ok"

    assert client.post("/credit").text == "ok"
    assert balances(app, db) == {"alice": 16}
    assert summary(changes(app, sidelog)) == [
        ("account.update", "committed", {"balance": [10, "[SQL expression]"]}),
        ("account.update", "committed", {"balance": [15, "[SQL expression]"]}),
    ]


def test_a_callable_parameter_is_called_by_the_statement_only(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    seed(app, db, ("a", 0), ("b", 0))
    sidelog.track(Account)
    names = iter(["a", "b"])

    @app.post("/bump")
    def bump() -> str:
        wanted = sa.bindparam("wanted", callable_=lambda: next(names))
        db.session.execute(
            sa.update(Account)
            .where(Account.name == wanted)
            .values(balance=Account.balance + 1),
            execution_options={"synchronize_session": False},
        )
        db.session.commit()
        return "ok"

    assert client.post("/bump").text == "ok"
    assert balances(app, db) == {"a": 1, "b": 0}
    (entry,) = changes(app, sidelog)
    assert entry["data"]["params"] == {"wanted": "[callable]"}


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_committed_although_a_listener_before_ours_raised(
    database_uri: str, tmp_path: t.Any
) -> None:
    """Flask-SQLAlchemy's ``models_committed`` receiver raises after the
    commit (a search index is down). Its listener came first, in a fresh
    process: the changes are still recorded as committed."""
    done = subprocess.run(
        [sys.executable, "-c", _RAISING_RECEIVER, database_uri, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "committed 1\n"), done.stderr


_RAISING_RECEIVER = """
import sys
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.track_modifications import models_committed
from flask_sidelog import SideLog

app = Flask("raising_receiver", instance_path=sys.argv[2])
app.config.update(
    SQLALCHEMY_DATABASE_URI=sys.argv[1],
    SQLALCHEMY_TRACK_MODIFICATIONS=True,
    SIDELOG_CREATE_TABLE=True,
)
db = SQLAlchemy(app)
sidelog = SideLog(app, db)

class Item(db.Model):
    id = sa.Column(sa.Integer, primary_key=True)

sidelog.track(Item)

def reindex(sender, changes):
    raise ConnectionError("search index is down")

models_committed.connect(reindex, app)
with app.app_context():
    db.create_all()
    db.session.add(Item(id=1))
    try:
        db.session.commit()
    except ConnectionError:
        pass
    db.session.close()
    (entry,) = sidelog.entries(event="item.insert")
    print(entry["main_tx"], db.session.scalar(sa.select(sa.func.count(Item.id))))
"""


def test_delete_of_an_expired_row_keeps_its_old_values(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """After a commit the row's attributes are expired; the delete loads
    them (for its primary key), so every old value is recorded."""
    seed(app, db, ("alice", 10))
    sidelog.track(Account)

    @app.post("/close")
    def close() -> str:
        account = db.get_or_404(Account, 1)
        account.balance = 0
        db.session.commit()
        db.session.delete(account)
        db.session.commit()
        return "ok"

    client.post("/close")
    assert summary(changes(app, sidelog)) == [
        ("account.update", "committed", {"balance": [10, 0]}),
        (
            "account.delete",
            "committed",
            {"id": [1, None], "name": ["alice", None], "balance": [0, None]},
        ),
    ]


def test_a_change_after_a_commit_keeps_the_old_value(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A commit expires the row; a column set before it is loaded again has
    no old value in the session's history. It is read from the database
    before the flush writes over it, not recorded as null."""
    seed(app, db, ("alice", 10))
    sidelog.track(Account)
    sidelog.track(Person)

    @app.post("/")
    def twice() -> str:
        account = db.session.get(Account, 1)
        assert account is not None
        account.name = "alice2"
        employee = Employee(name="erin", salary=1)
        db.session.add(employee)
        db.session.commit()  # expires both
        account.balance = 99
        employee.name = "erin2"
        employee.salary = 2
        db.session.commit()
        return "ok"

    client.post("/")

    updates = [
        (e["event"], e["data"]["changes"])
        for e in changes(app, sidelog)
        if e["event"].endswith(".update")
    ]
    # A flush's entries share their time; their order within it is the
    # session's.
    expected = [
        ("account.update", {"name": ["alice", "alice2"]}),
        ("account.update", {"balance": [10, 99]}),
        ("tr_employee.update", {"name": ["erin", "erin2"], "salary": [1, 2]}),
    ]
    assert sorted(updates, key=str) == sorted(expected, key=str)


def test_an_old_value_that_cannot_be_read_is_marked_and_the_flush_goes_on(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """An old value read before the flush that its type refuses (a stage
    removed from the enum), or one the flush itself sets on a row it did
    not load (a foreign key synced from a relationship): the app's commit
    goes on, and the entry says the old value was not loaded."""
    with app.app_context():
        db.session.execute(
            sa.text("INSERT INTO tr_task (id, title, stage) VALUES (1, 'a', 'legacy')")
        )
        db.session.add_all([Folder(id=1), Folder(id=2), File(id=1, folder_id=1)])
        db.session.commit()
    sidelog.track(Task)
    sidelog.track(File)

    @app.post("/")
    def change() -> str:
        task = db.session.get(Task, 1, options=[sa_orm.load_only(Task.title)])
        folder = db.session.get(Folder, 2)
        file = db.session.get(File, 1)
        assert task is not None and folder is not None and file is not None
        folder.files  # noqa: B018 - loaded, so that append changes only it
        db.session.commit()  # expires them
        task.stage = Stage.done
        folder.files.append(file)
        db.session.commit()
        return "ok"

    assert client.post("/").status_code == 200

    found = {e["event"]: e["data"]["changes"] for e in changes(app, sidelog)}
    assert found == {
        "tr_task.update": {"stage": ["[not loaded]", "<Stage.done: 'done'>"]},
        "tr_file.update": {"folder_id": ["[not loaded]", 2]},
    }


def test_old_values_of_many_expired_rows_take_one_select_per_500(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A job that sets columns of rows a commit expired reads their old
    values in batches, not a SELECT per row; composite keys too. A value its
    type refuses leaves only its own row's old values unknown."""
    rows = OLD_VALUES_PER_SELECT + 100
    with app.app_context():
        db.session.add_all(
            Membership(org_id=1, user_id=i, role="r") for i in range(rows)
        )
        db.session.execute(
            sa.text("INSERT INTO tr_task (id, title, stage) VALUES (1, 'a', 'legacy')")
        )
        db.session.add_all(Task(id=i, title="t", stage=Stage.new) for i in (2, 3))
        db.session.commit()
    sidelog.track(Membership)
    sidelog.track(Task)
    selects: list[str] = []

    def count(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        # flask-sidelog's own (SQLAlchemy's flush loads the expired keys).
        if "_sidelog_pk_" in statement:
            selects.append(statement)

    @app.post("/")
    def job() -> str:
        members = db.session.scalars(sa.select(Membership)).all()
        tasks = db.session.scalars(
            sa.select(Task).options(sa_orm.load_only(Task.title))
        ).all()
        db.session.commit()  # expires them all
        sa.event.listen(db.engine, "before_cursor_execute", count)
        try:
            for member in members:
                # Its key, not member.user_id: reading that would load the row.
                member.role = f"r{sa.inspect(member).identity[1]}"
            for task in tasks:
                task.stage = Stage.done
            db.session.commit()
        finally:
            sa.event.remove(db.engine, "before_cursor_execute", count)
        return "ok"

    assert client.post("/").status_code == 200

    found = changes(app, sidelog)
    roles = {
        e["data"]["pk"]["user_id"]: e["data"]["changes"]["role"]
        for e in found
        if e["event"] == "tr_membership.update"
    }
    assert roles == {i: ["r", f"r{i}"] for i in range(rows)}
    stages = {
        e["data"]["pk"]["id"]: e["data"]["changes"]["stage"][0]
        for e in found
        if e["event"] == "tr_task.update"
    }
    assert stages == {
        1: "[not loaded]",
        2: "<Stage.new: 'new'>",
        3: "<Stage.new: 'new'>",
    }
    # Memberships: 2 batches. Tasks: the batch of 3, refused, then in halves
    # (of 1 and 2 rows, in the session's order) until task 1 is alone.
    assert sum("FROM tr_membership" in q for q in selects) == 2
    assert sum("FROM tr_task" in q for q in selects) in (3, 5)


@pytest.mark.skipif(
    not hasattr(sqlite3.Connection, "setlimit"), reason="setlimit: Python 3.11"
)
@pytest.mark.parametrize("backend", ["sqlite_file"])
@pytest.mark.parametrize("model", [Membership, Circle], ids=["keys", "subclass"])
def test_old_values_of_a_composite_key_fit_an_old_sqlite_limit(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient, model: type
) -> None:
    """SQLite before 3.32 binds at most 999 values in a statement: 500 rows
    of a two-column key must not go in one SELECT, nor 499 rows of a
    single-table subclass, whose SELECT binds its kinds too."""
    with app.app_context():
        sa.event.listen(
            db.engine,
            "connect",
            lambda dbapi, record: dbapi.setlimit(
                sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999
            ),
        )
        db.engine.dispose()
        db.session.add_all(model(org_id=1, user_id=i, role="r") for i in range(500))
        db.session.commit()
    sidelog.track(model)

    @app.post("/")
    def job() -> str:
        rows = db.session.scalars(sa.select(model)).all()
        db.session.commit()
        for row in rows:
            row.role = "x"
        db.session.commit()
        return "ok"

    assert client.post("/").status_code == 200
    olds = [e["data"]["changes"]["role"][0] for e in changes(app, sidelog)]
    assert olds == ["r"] * 500


def test_a_row_deleted_and_added_again_in_one_flush_ends_as_the_new_row(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """SQLAlchemy sends it as one UPDATE; its history ends with the row
    that is in the table, not with its deletion."""
    seed(app, db, ("alice", 10))
    sidelog.track(Account)

    @app.post("/")
    def replace() -> str:
        db.session.delete(db.session.get(Account, 1))
        db.session.add(Account(id=1, name="bob", balance=5))
        db.session.commit()
        return "ok"

    client.post("/")

    assert balances(app, db) == {"bob": 5}
    with app.app_context():
        life = sidelog.history("account", 1)
    assert summary(life) == [
        (
            "account.delete",
            "committed",
            {"id": [1, None], "name": ["alice", None], "balance": [10, None]},
        ),
        (
            "account.insert",
            "committed",
            {"id": [None, 1], "name": [None, "bob"], "balance": [None, 5]},
        ),
    ]


def test_a_changed_primary_key_is_in_the_history_of_both_keys(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    seed(app, db, ("alice", 10))
    sidelog.track(Account)

    @app.post("/")
    def renumber() -> str:
        account = db.session.get(Account, 1)
        assert account is not None
        account.id = 7
        db.session.commit()
        return "ok"

    client.post("/")

    with app.app_context():
        before = summary(sidelog.history("account", 1))
        after = summary(sidelog.history("account", 7))
    assert before == after == [("account.update", "committed", {"id": [1, 7]})]


@pytest.mark.parametrize("end", ["rollback", "close"])
def test_a_flush_refused_before_it_began_records_nothing(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, end: str
) -> None:
    """A ``before_flush`` listener of the app's, after ours, refuses the
    flush: nothing was sent, so nothing is recorded, however the app ends
    the transaction (a later rollback must not take the unsent changes for
    a failed flush's). The next flush is recorded as usual."""
    sidelog.track(Account)
    seed(app, db, ("alice", 10))

    def refuse_negative(session: sa_orm.Session, *args: t.Any) -> None:
        if any(isinstance(o, Account) and o.balance < 0 for o in session.dirty):
            raise ValueError("a balance cannot be negative")

    factory = db.session.session_factory
    sa.event.listen(factory, "before_flush", refuse_negative)
    try:
        with app.test_request_context("/"):
            account = db.session.scalars(sa.select(Account)).one()
            account.balance = -5
            with pytest.raises(ValueError, match="negative"):
                db.session.commit()
            account.name = "never sent"
            getattr(db.session, end)()
            account = db.session.scalars(sa.select(Account)).one()
            account.balance = 20
            db.session.commit()
    finally:
        sa.event.remove(factory, "before_flush", refuse_negative)
    assert [(e["event"], e["main_tx"]) for e in changes(app, sidelog)] == [
        ("account.insert", "committed"),
        ("account.update", "committed"),
    ]
    assert changes(app, sidelog)[1]["data"]["changes"] == {"balance": [10, 20]}


def test_rolled_back_by_exception_after_flush(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    seed(app, db, ("alice", 10), ("bob", 5))
    sidelog.track(Account)

    @app.post("/transfer")
    def transfer() -> str:
        alice = db.session.execute(
            sa.select(Account).filter_by(name="alice")
        ).scalar_one()
        bob = db.session.execute(sa.select(Account).filter_by(name="bob")).scalar_one()
        alice.balance -= 10
        db.session.delete(bob)
        db.session.add(Account(name="carol", balance=10))
        db.session.flush()
        raise RuntimeError("insufficient funds")

    with pytest.raises(RuntimeError):
        client.post("/transfer")

    assert balances(app, db) == {"alice": 10, "bob": 5}
    found = changes(app, sidelog)
    assert {(e["event"], e["main_tx"]) for e in found} == {
        ("account.insert", "rolled_back"),
        ("account.update", "rolled_back"),
        ("account.delete", "rolled_back"),
    }
    update = next(e for e in found if e["event"] == "account.update")
    assert update["data"]["changes"] == {"balance": [10, 0]}
    delete = next(e for e in found if e["event"] == "account.delete")
    assert delete["data"]["changes"]["name"] == ["bob", None]


def test_orphans_the_flush_deletes_are_recorded(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    with app.app_context():
        db.session.add(
            Box(id=1, things=[Thing(id=1, label="a"), Thing(id=2, label="b")])
        )
        db.session.commit()
    sidelog.track(Thing)

    @app.post("/take/<int:pk>")
    def take(pk: int) -> str:
        box = db.get_or_404(Box, 1)
        box.things = [thing for thing in box.things if thing.id != pk]
        db.session.flush()
        if pk == 2:
            raise RuntimeError("put it back")
        db.session.commit()
        return "ok"

    client.post("/take/1")
    with pytest.raises(RuntimeError):
        client.post("/take/2")

    with app.app_context():
        assert db.session.scalars(sa.select(Thing.id)).all() == [2]
    found = changes(app, sidelog)
    assert summary(found) == [
        (
            "tr_thing.delete",
            "committed",
            {"id": [1, None], "box_id": [1, None], "label": ["a", None]},
        ),
        (
            "tr_thing.delete",
            "rolled_back",
            {"id": [2, None], "box_id": [1, None], "label": ["b", None]},
        ),
    ]
    assert [e["data"]["pk"] for e in found] == [{"id": 1}, {"id": 2}]


def test_columns_the_orm_sets_in_an_update_are_recorded(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """An onupdate default and the version counter are not in the session's
    history; their values before the flush are kept, or read when expired."""
    with app.app_context():
        db.session.add_all([Folder(id=1), Folder(id=2), File(id=1, folder_id=1)])
        db.session.commit()
    sidelog.track(File)

    @app.post("/edit")
    def edit() -> str:
        file = db.get_or_404(File, 1)
        file.folder_id = 2
        db.session.commit()  # expires every attribute
        file.folder_id = 1
        db.session.commit()
        return "ok"

    client.post("/edit")
    assert summary(changes(app, sidelog)) == [
        (
            "tr_file.update",
            "committed",
            {"folder_id": [1, 2], "edited_by": ["seed", "app"], "version": [1, 2]},
        ),
        ("tr_file.update", "committed", {"folder_id": [2, 1], "version": [2, 3]}),
    ]


def test_columns_the_orm_sets_are_left_out_where_their_old_value_is_unknown(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A file moved to another folder is updated by the flush alone (its
    foreign key), so its values before the flush were not kept; a flush
    that failed before reaching a row changed none of them; and one stopped
    before it began leaves nothing for the next."""
    with app.app_context():
        db.session.add_all([Folder(id=1, files=[File(id=1)]), Folder(id=2)])
        db.session.commit()
    sidelog.track(File)

    @app.post("/move")
    def move() -> str:
        folder = db.get_or_404(Folder, 2)
        folder.files.append(db.get_or_404(File, 1))
        db.session.commit()
        return "ok"

    @app.post("/fail")
    def fail() -> str:
        db.get_or_404(File, 1).folder_id = 1
        db.session.add(Folder(id=2))  # inserted first, and refused
        db.session.commit()
        return "ok"

    @app.post("/stopped")
    def stopped() -> str:
        # A flush stopped by a listener before it began, then the row moved
        # by its folder after others changed it: nothing from that flush is
        # taken for this one's.
        file = db.get_or_404(File, 1)
        file.folder_id = 2  # no change, but dirty

        def stop(*args: t.Any) -> None:
            sa.event.remove(db.session(), "before_flush", stop)
            raise RuntimeError("stop")

        sa.event.listen(db.session(), "before_flush", stop)
        with pytest.raises(RuntimeError):
            db.session.flush()
        db.session.expire(file)
        db.session.execute(
            sa.update(File).where(File.id == 1).values(version=7, edited_by="bulk")
        )
        folder = db.get_or_404(Folder, 1)
        folder.files.append(file)
        db.session.commit()
        return "ok"

    client.post("/move")
    with pytest.raises(sa.exc.IntegrityError):
        client.post("/fail")
    client.post("/stopped")
    updates = [e for e in changes(app, sidelog) if e["event"] == "tr_file.update"]
    assert summary(updates) == [
        ("tr_file.update", "committed", {"folder_id": [1, 2]}),
        ("tr_file.update", "rolled_back", {"folder_id": [2, 1]}),
        ("tr_file.update", "committed", {"folder_id": ["[not loaded]", 1]}),
    ]


def test_a_column_the_orm_sets_that_the_app_set_has_its_own_old_value(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with app.app_context():
        db.session.add_all([Sheet(id=1, title="a", ver="v1"), File(id=1)])
        db.session.commit()
    sidelog.track(Sheet)
    sidelog.track(File)

    @app.post("/version")
    def version() -> str:
        sheet = db.get_or_404(Sheet, 1)
        sheet.title, sheet.ver = "b", "v2"
        db.session.commit()
        return "ok"

    @app.post("/unreadable")
    def unreadable() -> str:
        # Set after its row expired, and its old value cannot be read.
        file = db.get_or_404(File, 1)
        db.session.expire(file)
        file.edited_by = "manual"
        db.session.commit()
        return "ok"

    client.post("/version")

    def unread(*args: t.Any) -> t.NoReturn:
        raise RuntimeError("cannot read")

    monkeypatch.setattr("flask_sidelog.tracking._select_old_values", unread)
    client.post("/unreadable")
    sheet, file = changes(app, sidelog)
    assert sheet["data"]["changes"] == {"title": ["a", "b"], "ver": ["v1", "v2"]}
    assert file["data"]["changes"]["edited_by"] == ["[not loaded]", "manual"]


def test_flushed_and_discarded_at_teardown(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    sidelog.track(Account)

    @app.post("/forgot")
    def forgot() -> str:
        db.session.add(Account(name="never", balance=1))
        db.session.flush()
        return "ok"

    assert client.post("/forgot").status_code == 200
    assert balances(app, db) == {}
    assert summary(changes(app, sidelog)) == [
        (
            "account.insert",
            "rolled_back",
            {"id": [None, 1], "name": [None, "never"], "balance": [None, 1]},
        )
    ]


def test_integrity_error_at_commit(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    seed(app, db, ("taken", 0))
    sidelog.track(Account)

    @app.post("/signup")
    def signup() -> str:
        db.session.add(Account(name="taken", balance=3))
        db.session.commit()
        return "created"

    with pytest.raises(sa.exc.IntegrityError):
        client.post("/signup")

    assert balances(app, db) == {"taken": 0}
    (entry,) = changes(app, sidelog)
    assert entry["event"] == "account.insert"
    assert entry["main_tx"] == "rolled_back"
    assert entry["data"]["changes"]["name"] == [None, "taken"]
    assert entry["data"]["changes"]["balance"] == [None, 3]


def test_savepoint_rolled_back_inside_committed_transaction(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    seed(app, db, ("alice", 10))
    sidelog.track(Account)

    @app.post("/")
    @sidelog.audit("batch")
    def batch() -> str:
        alice = db.session.execute(sa.select(Account)).scalar_one()
        alice.balance = 11
        db.session.flush()
        with db.session.begin_nested():  # released: kept
            db.session.add(Account(name="kept", balance=1))
        savepoint = db.session.begin_nested()
        db.session.add(Account(name="dropped", balance=2))
        alice.balance = 12
        inner = db.session.begin_nested()
        db.session.add(Account(name="inner", balance=3))
        inner.commit()  # released into a savepoint that is rolled back
        savepoint.rollback()
        db.session.commit()
        return "ok"

    assert client.post("/").status_code == 200
    assert balances(app, db) == {"alice": 11, "kept": 1}
    found = changes(app, sidelog)
    fates = {
        (e["event"], str(e["data"]["changes"].get("name")), e["main_tx"]) for e in found
    }
    assert fates == {
        ("account.update", "None", "committed"),
        ("account.insert", "[None, 'kept']", "committed"),
        ("account.insert", "[None, 'dropped']", "rolled_back"),
        ("account.update", "None", "rolled_back"),
        ("account.insert", "[None, 'inner']", "rolled_back"),
    }
    updates = [e for e in found if e["event"] == "account.update"]
    assert {
        (e["main_tx"], tuple(e["data"]["changes"]["balance"])) for e in updates
    } == {
        ("committed", (10, 11)),
        ("rolled_back", (11, 12)),
    }
    with app.app_context():
        (audit,) = sidelog.entries(event="batch")
    assert audit["main_tx"] == "committed"


def test_failed_flush_in_savepoint_inside_committed_transaction(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """The common "try to insert, skip duplicates" pattern: the attempt is
    recorded as rolled back, the rest of the transaction as committed."""
    seed(app, db, ("taken", 0))
    sidelog.track(Account)

    @app.post("/")
    def import_rows() -> str:
        db.session.add(Account(name="new", balance=1))
        db.session.flush()
        try:
            with db.session.begin_nested():
                db.session.add(Account(name="taken", balance=2))
        except sa.exc.IntegrityError:
            pass
        db.session.commit()
        return "ok"

    assert client.post("/").status_code == 200
    assert balances(app, db) == {"taken": 0, "new": 1}
    found = changes(app, sidelog)
    fates = {(e["data"]["changes"]["name"][1], e["main_tx"]) for e in found}
    assert fates == {("new", "committed"), ("taken", "rolled_back")}
    assert len(found) == 2


def test_savepoint_released_then_outer_rolled_back(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    sidelog.track(Account)

    @app.post("/")
    @sidelog.audit("batch")
    def batch() -> str:
        db.session.add(Account(name="outer", balance=1))
        db.session.flush()
        with db.session.begin_nested():
            db.session.add(Account(name="released", balance=2))
        db.session.rollback()
        return "ok"

    assert client.post("/").status_code == 200
    assert balances(app, db) == {}
    assert {e["main_tx"] for e in changes(app, sidelog)} == {"rolled_back"}
    assert len(changes(app, sidelog)) == 2
    with app.app_context():
        (audit,) = sidelog.entries(event="batch")
    assert audit["main_tx"] == "rolled_back"


def test_bulk_update_and_delete_with_where(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient, backend: str
) -> None:
    seed(app, db, ("alice", 10), ("bob", 50), ("carol", 500))
    sidelog.track(Account)

    @app.post("/reset")
    def reset() -> str:
        db.session.execute(
            sa.update(Account)
            .where(Account.balance < 100, Account.name.in_(["alice", "bob", "dave"]))
            .values(balance=0)
        )
        db.session.execute(sa.delete(Account).where(Account.name == "carol"))
        db.session.execute(
            sa.insert(Account).values([{"name": "erin"}, {"name": "frank"}])
        )
        db.session.commit()
        return "ok"

    @app.post("/undone")
    def undo() -> str:
        db.session.execute(sa.delete(Account).where(Account.balance == 0))
        db.session.rollback()
        return "ok"

    client.post("/reset")
    client.post("/undone")

    assert balances(app, db) == {"alice": 0, "bob": 0, "erin": 0, "frank": 0}
    update, delete, insert, undone = changes(app, sidelog)
    assert update["event"] == "account.bulk_update"
    assert update["main_tx"] == "committed"
    assert update["data"] == {
        "table": "account",
        "where": "account.balance < :balance_1"
        " AND account.name IN (:name_1_1, :name_1_2, :name_1_3)",
        "params": {
            "balance_1": 100,
            "name_1_1": "alice",
            "name_1_2": "bob",
            "name_1_3": "dave",
        },
        "rowcount": 2,
    }
    assert (delete["event"], delete["main_tx"]) == ("account.bulk_delete", "committed")
    assert delete["data"]["where"] == "account.name = :name_1"
    assert delete["data"]["params"] == {"name_1": "carol"}
    assert delete["data"]["rowcount"] == 1
    assert insert["event"] == "account.bulk_insert"
    # SQLAlchemy keeps an INSERT's rowcount since 2.0.28, when asked; psycopg
    # forgets it by the time an older one would read it.
    kept = backend != "postgres" or SQLALCHEMY_VERSION >= (2, 0, 28)
    assert insert["data"]["rowcount"] == (2 if kept else None)
    assert insert["data"]["where"] is None
    assert undone["event"] == "account.bulk_delete"
    assert undone["main_tx"] == "rolled_back"
    assert undone["data"]["rowcount"] == 4


class DataclassBase(sa_orm.MappedAsDataclass, sa_orm.DeclarativeBase):
    pass


@functools.cache
def dataclass_model(declared_on: str) -> tuple[SQLAlchemy, type[t.Any]]:
    """A Flask-SQLAlchemy extension and a dataclass model, declared on our
    own base or on its db.Model; once, for every backend's test."""
    on_db = declared_on == "db.Model"
    db = SQLAlchemy(model_class=DataclassBase) if on_db else SQLAlchemy()
    base = db.Model if on_db else DataclassBase

    # Named apart: with db.Model on our base, both share one registry.
    name = "DbWallet" if on_db else "OwnWallet"
    wallet = type(
        name,
        (base,),
        {
            "__module__": __name__,
            "__tablename__": f"dc_{name.lower()}",
            "__annotations__": {
                "id": sa_orm.Mapped[int],
                "owner": sa_orm.Mapped[str],
                "balance": sa_orm.Mapped[int],
            },
            "id": sa_orm.mapped_column(primary_key=True, init=False),
            "owner": sa_orm.mapped_column(sa.String(40)),
            "balance": sa_orm.mapped_column(default=0),
        },
    )
    return db, wallet


@pytest.mark.parametrize("declared_on", ["own base", "db.Model"])
def test_dataclass_models(database_uri: str, tmp_path: t.Any, declared_on: str) -> None:
    """MappedAsDataclass models are tracked like any other, on SQLAlchemy 2.0
    and 2.1; declared on Flask-SQLAlchemy's db.Model too, where that works."""
    try:
        db, Wallet = dataclass_model(declared_on)  # noqa: N806
    except sa.exc.InvalidRequestError as error:
        if "already a dataclass" not in str(error):
            raise
        # Flask-SQLAlchemy 3.1.1 with SQLAlchemy 2.1: its model class breaks.
        pytest.skip(f"Flask-SQLAlchemy cannot declare dataclass models here: {error}")
    app = Flask("dataclass_models", instance_path=str(tmp_path / "instance"))
    app.config.update(
        TESTING=True, SQLALCHEMY_DATABASE_URI=database_uri, SIDELOG_CREATE_TABLE=True
    )
    db.init_app(app)
    sidelog = SideLog(app, db)
    sidelog.track(Wallet)

    @app.post("/open")
    def open_wallet() -> str:
        db.session.add(Wallet(owner="alice", balance=5))
        db.session.commit()
        return "ok"

    @app.post("/drain")
    def drain() -> str:
        wallet = db.session.scalars(sa.select(Wallet)).one()
        wallet.balance = 0
        db.session.flush()
        raise RuntimeError("after the flush")

    with app.app_context():
        Wallet.metadata.create_all(db.engine, tables=[Wallet.__table__])
    client = app.test_client()
    assert client.post("/open").status_code == 200
    with pytest.raises(RuntimeError, match="after the flush"):
        client.post("/drain")
    found = [
        (e["event"].rpartition(".")[2], e["main_tx"], e["data"]["changes"])
        for e in changes(app, sidelog, Wallet.__tablename__)
    ]
    assert found == [
        (
            "insert",
            "committed",
            {"id": [None, 1], "owner": [None, "alice"], "balance": [None, 5]},
        ),
        ("update", "rolled_back", {"balance": [5, 0]}),
    ]
    dispose(app)


def test_untracked_model_produces_nothing(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.post("/")
    def write() -> str:
        db.session.add(Note(text="hello"))
        db.session.add(Account(name="alice"))
        db.session.commit()
        db.session.execute(sa.update(Note).values(text="bye"))
        db.session.commit()
        return "ok"

    client.post("/")
    with app.app_context():
        sidelog.create_table()
        assert sidelog.entries() == []

    sidelog.track(Account)
    with app.app_context():
        db.session.execute(sa.delete(Account))
        db.session.commit()
    client.post("/")
    assert [e["event"] for e in changes(app, sidelog)] == [
        "account.bulk_delete",
        "account.insert",
    ]


def test_excluded_and_redacted_columns_never_stored(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    sidelog.track(Credential, exclude={"ssn"})

    @app.post("/")
    def lifecycle() -> str:
        cred = Credential(login="alice", password_hash="HASH-ONE", ssn="SSN-111")
        db.session.add(cred)
        db.session.commit()
        cred.password_hash = "HASH-TWO"
        cred.ssn = "SSN-222"
        db.session.commit()
        db.session.execute(
            sa.update(Credential)
            .where(Credential.ssn == "SSN-333", Credential.password_hash == "HASH-3")
            .values(login="bob")
        )
        db.session.delete(cred)
        db.session.commit()
        return "ok"

    client.post("/")

    found = changes(app, sidelog)
    assert [e["event"] for e in found] == [
        "tr_credential.insert",
        "tr_credential.update",
        "tr_credential.bulk_update",
        "tr_credential.delete",
    ]
    insert, update, bulk, delete = found
    assert insert["data"]["changes"] == {
        "id": [None, 1],
        "login": [None, "alice"],
        "password_hash": "[redacted]",
    }
    assert update["data"]["changes"] == {"password_hash": "[redacted]"}
    assert bulk["data"]["params"] == {"password_hash_1": "[redacted]"}
    assert "ssn" not in delete["data"]["changes"]
    with app.app_context(), sidelog.log_session() as s:
        table = app.extensions["sidelog"].table
        rows = s.execute(sa.select(table)).mappings()
        stored = json.dumps([dict(row) for row in rows], default=str)
    for secret in ("HASH-ONE", "HASH-TWO", "HASH-3", "SSN-111", "SSN-222", "SSN-333"):
        assert secret not in stored


def test_bulk_parameters_compared_with_a_redacted_json_key_are_hidden(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient, backend: str
) -> None:
    """A value compared with a JSON document's key named like
    SIDELOG_REDACT_KEYS is hidden, as one compared with such a column is:
    by key, path, a JSON function's path, and in a JSON type of the app's.
    One compared with no column at all is still left out."""
    sidelog.track(Profile)
    if backend == "postgres":
        by_function = sa.func.json_extract_path_text(Profile.meta, "password")
    else:
        by_function = sa.func.json_extract(Profile.meta, "$.password")

    @app.post("/")
    def bulk() -> str:
        db.session.execute(
            sa.update(Profile)
            .where(
                Profile.meta["api_token"].as_string() == "J-ONE",
                Profile.meta[("card", "password")].as_string() == "J-TWO",
                by_function == "J-THREE",
                Profile.extra["secret"].as_string() == "J-FOUR",
                Profile.meta["color"].as_string() == "kept-5",
                sa.func.upper("J-SIX") == "J-SEVEN",
                # Its own text is not a name: kept, though it says "token".
                Profile.meta["status"].as_string() == "token_expired",
                # A text column read as JSON.
                sa.cast(Profile.plan, sa.JSON)["password"].as_string() == "J-EIGHT",
                # A document given as text; a key and a value in one list.
                sa.cast(Profile.meta, sa.Text) == '{"password": "J-NINE"}',
                Profile.meta["k"].as_string().in_(["password", "J-TEN"]),
                sa.tuple_(
                    Profile.meta["k"].as_string(), Profile.meta["v"].as_string()
                ).in_([("password", "J-ELEVEN")]),
            )
            .values(plan="x")
        )
        db.session.commit()
        return "ok"

    assert client.post("/").status_code == 200
    (entry,) = changes(app, sidelog)
    stored = json.dumps(entry["data"])
    for secret in ("J-ONE", "J-TWO", "J-THREE", "J-FOUR", "J-SIX", "J-SEVEN"):
        assert secret not in stored
    for secret in ("J-EIGHT", "J-NINE", "J-TEN", "J-ELEVEN"):
        assert secret not in stored
    assert "kept-5" in stored
    assert "token_expired" in entry["data"]["params"].values()
    assert list(entry["data"]["params"].values()).count("[redacted]") >= 4


def test_bulk_parameters_of_excluded_and_redacted_columns_never_stored(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """A parameter compared with an excluded or redacted column is left out
    or hidden whatever SQLAlchemy named it: after the column's name rather
    than the attribute excluded, or after a function around the column."""
    sidelog.track(Badge, exclude={"secret"})
    sidelog.track(Credential)
    sidelog.track(Tag)

    @app.post("/")
    def bulk() -> str:
        db.session.execute(
            sa.update(Badge)
            .where(Badge.secret == "S-TWO", Badge.code == "kept")
            .values(code="x")
        )
        db.session.execute(
            sa.delete(Badge).where(
                sa.or_(
                    sa.func.lower(Badge.secret) == "s-three",
                    Badge.secret.in_(["S-FOUR", "S-FIVE"]),
                )
            )
        )
        db.session.execute(
            sa.update(Credential)
            .where(sa.func.lower(Credential.password_hash) == "hash-six")
            .values(login="x")
        )
        # Another model's excluded column, in a subquery; SQL text.
        db.session.execute(
            sa.update(Credential)
            .where(
                Credential.login.in_(
                    sa.select(Badge.code).where(Badge.secret == "S-SEVEN")
                ),
                Credential.login != "secret_kept",
            )
            .values(ssn="x")
        )
        db.session.execute(
            sa.update(Credential)
            .where(sa.text("login = :who").bindparams(who="S-EIGHT"))
            .values(ssn="x")
        )
        db.session.execute(
            sa.update(Credential)
            .where(
                Credential.login.in_(
                    sa.select(Badge.code).where(
                        sa.text("social = :s").bindparams(s="S-NINE"),
                        Badge.code != "code-kept",
                    )
                )
            )
            .values(ssn="x")
        )
        # Parameters that compile as literals unless told otherwise, one in
        # a relationship's has() too.
        db.session.execute(
            sa.update(Credential)
            .where(
                Credential.password_hash
                == sa.bindparam("p", "S-TEN", literal_execute=True),
                Credential.login == sa.literal("login-kept", literal_execute=True),
            )
            .values(ssn="x")
        )
        db.session.execute(
            sa.update(Tag)
            .where(
                Tag.credential.has(
                    Credential.password_hash
                    == sa.literal("S-ELEVEN", literal_execute=True)
                )
            )
            .values(name="x")
        )
        # One parameter compared with an innocent column first, then with a
        # redacted or excluded one.
        twice = sa.bindparam("v", "S-TWELVE")
        db.session.execute(
            sa.update(Credential)
            .where(sa.or_(Credential.login == twice, Credential.password_hash == twice))
            .values(ssn="x")
        )
        twice = sa.bindparam("w", "S-THIRTEEN")
        db.session.execute(
            sa.update(Badge)
            .where(sa.or_(Badge.code == twice, Badge.secret == twice))
            .values(code="x")
        )
        db.session.commit()
        return "ok"

    client.post("/")

    found = changes(app, sidelog)
    update, delete, redacted, subquery, text, in_subquery, literal, has = found[:8]
    assert [e["data"]["params"] for e in found[8:]] == [{"v": "[redacted]"}, {}]
    assert update["data"]["params"] == {"code_1": "kept"}
    assert delete["data"]["params"] == {}
    assert redacted["data"]["params"] == {"lower_1": "[redacted]"}
    assert subquery["data"]["params"] == {"login_1": "secret_kept"}
    assert text["data"]["params"] == {}
    assert in_subquery["data"]["params"] == {"code_1": "code-kept"}
    assert literal["data"]["where"] == (
        "tr_credential.password_hash = :p AND tr_credential.login = :param_1"
    )
    assert literal["data"]["params"] == {"p": "[redacted]", "param_1": "login-kept"}
    assert "tr_credential.password_hash = :param_1" in has["data"]["where"]
    assert has["data"]["params"] == {"param_1": "[redacted]"}
    with app.app_context(), sidelog.log_session() as s:
        table = app.extensions["sidelog"].table
        rows = s.execute(sa.select(table)).mappings()
        stored = json.dumps([dict(row) for row in rows], default=str).lower()
    for secret in ("s-two", "s-three", "s-four", "s-five", "hash-six", "s-seven"):
        assert secret not in stored
    assert "s-eight" not in stored
    assert "s-nine" not in stored
    assert "s-ten" not in stored
    assert "s-eleven" not in stored
    assert "s-twelve" not in stored
    assert "s-thirteen" not in stored


@pytest.mark.parametrize(
    ("param", "names", "named"),
    [
        ("code_1", {"code_1"}, True),
        ("code_1_2", {"code_1"}, True),  # an expanded IN's
        ("code_1_2_1", {"code_1"}, True),  # a tuple IN's
        ("code_12", {"code_1"}, False),
        ("code_1", {"code_1_2"}, False),
        ("a__b", {"a_"}, True),
        ("_x", {""}, True),
        ("x", set(), False),
    ],
)
def test_a_parameter_is_named_by_itself_or_the_name_it_was_expanded_from(
    param: str, names: set[str], named: bool
) -> None:
    assert _named(param, names) is named


def test_a_subclass_keeps_what_its_tracked_base_excludes(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    sidelog.track(Person, exclude={"name"})
    sidelog.track(Employee, exclude={"salary"})

    @app.post("/")
    def hire() -> str:
        db.session.add(Employee(name="SECRET-NAME", salary=7))
        db.session.commit()
        return "ok"

    client.post("/")

    (insert,) = changes(app, sidelog)
    assert insert["data"]["changes"] == {"id": [None, 1], "kind": [None, "employee"]}


def test_a_failed_bulk_statement_is_recorded_rolled_back(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """The attempt is kept; its fate is rolled_back even when the caller
    catches the error and commits other work in the same session."""
    seed(app, db, ("taken", 0))
    sidelog.track(Account)

    @app.post("/")
    def clash() -> str:
        try:
            db.session.execute(sa.insert(Account).values([{"name": "taken"}]))
        except sa.exc.IntegrityError:
            db.session.rollback()
        db.session.add(Account(name="other"))
        db.session.commit()
        return "ok"

    @app.post("/unsent")
    def unsent() -> str:
        try:  # SQLite's DateTime refuses text before it is sent
            db.session.execute(
                sa.update(Account)
                .where(Account.name == sa.bindparam("n", "today", type_=sa.DateTime))
                .values(balance=99)
            )
        except sa.exc.StatementError:
            db.session.commit()
            return "caught"
        return "not raised"

    @app.post("/raise")
    def clash_and_raise() -> str:
        db.session.execute(sa.update(Account).values(name="taken"))
        return "never"

    client.post("/")
    assert client.post("/unsent").get_data(as_text=True) == "caught"
    with pytest.raises(sa.exc.IntegrityError):
        client.post("/raise")

    assert balances(app, db) == {"taken": 0, "other": 0}
    found = [(e["event"], e["main_tx"]) for e in changes(app, sidelog)]
    assert found == [
        ("account.bulk_insert", "rolled_back"),
        ("account.insert", "committed"),
        ("account.bulk_update", "rolled_back"),
        ("account.bulk_update", "rolled_back"),
    ]
    bulk = [e for e in changes(app, sidelog) if ".bulk_" in e["event"]]
    assert [e["data"]["rowcount"] for e in bulk] == [None, None, None]


def test_a_bulk_statement_that_ran_before_it_failed_shares_its_transaction_fate(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """An update by primary key that finds one key missing raises after its
    rows were written; a caller that catches it and commits keeps them."""
    seed(app, db, ("a", 1), ("b", 2))
    sidelog.track(Account)

    @app.post("/")
    def update_some() -> str:
        try:
            db.session.execute(
                sa.update(Account),
                [
                    {"id": 1, "balance": 100},
                    {"id": 2, "balance": 200},
                    {"id": 3, "balance": 3},
                ],
            )
        except sa.orm.exc.StaleDataError:
            db.session.commit()
            return "caught"
        return "not raised"

    assert client.post("/").get_data(as_text=True) == "caught"

    assert balances(app, db) == {"a": 100, "b": 200}
    ((event, main_tx, _),) = summary(changes(app, sidelog))
    assert (event, main_tx) == ("account.bulk_update", "committed")


def test_change_entries_share_request_id_and_actor(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    sidelog.track(Account)
    sidelog.actor_loader(lambda: "alice")

    @app.post("/")
    @sidelog.audit("account.open")
    def open_account() -> str:
        db.session.add(Account(name="a"))
        db.session.flush()
        db.session.execute(sa.update(Account).values(balance=5))
        db.session.commit()
        return "ok"

    client.post("/")
    with app.app_context():
        (audit,) = sidelog.entries(event="account.open")
    found = changes(app, sidelog, "account")
    assert [e["event"] for e in found] == ["account.insert", "account.bulk_update"]
    assert {e["request_id"] for e in found} == {audit["request_id"]}
    assert audit["request_id"] is not None
    assert {e["actor"] for e in found} == {"alice"}


def test_outside_a_request(app: Flask, db: SQLAlchemy, sidelog: SideLog) -> None:
    """A CLI command or job in an app context is recorded too, with no
    request id."""
    sidelog.track(Account)
    with app.app_context():
        db.session.add(Account(name="job"))
        db.session.commit()
    (entry,) = changes(app, sidelog)
    assert (entry["event"], entry["main_tx"]) == ("account.insert", "committed")
    assert entry["request_id"] is None


@pytest.mark.parametrize("mode", ["sync", "group", "buffered"])
def test_a_long_job_has_its_changes_written_as_each_transaction_ends(
    database_uri: str, tmp_path: t.Any, mode: str
) -> None:
    """Not held until the app context ends, which a worker's loop may never
    reach: even when the log shares the app's SQLite file, the main session
    lets go of its lock when its transaction ends."""
    app, db, sidelog = make_app(
        database_uri, str(tmp_path / "instance"), {"SIDELOG_WRITE_MODE": mode}
    )
    assert db is not None
    sidelog.track(Account)
    try:
        with app.app_context():
            Base.metadata.create_all(db.engine)
            db.session.add(Account(name="kept"))
            db.session.commit()
            sidelog.flush()
            assert [(e["event"], e["main_tx"]) for e in changes(app, sidelog)] == [
                ("account.insert", "committed")
            ]
            db.session.add(Account(name="undone"))
            db.session.flush()
            db.session.rollback()
            sidelog.flush()
            assert [(e["event"], e["main_tx"]) for e in changes(app, sidelog)] == [
                ("account.insert", "committed"),
                ("account.insert", "rolled_back"),
            ]
    finally:
        dispose(app)


@pytest.mark.parametrize("backend", ["sqlite_file"])
@pytest.mark.parametrize("model", ["account", "tr_gadget"])
@pytest.mark.parametrize("bound", ["session", "base"])
def test_a_session_in_an_outer_transaction_does_not_lock_out_its_log(
    database_uri: str, tmp_path: t.Any, model: str, bound: str
) -> None:
    """A session joined to a connection's transaction (a common test
    recipe) still holds SQLite's lock after its own commit: its changes wait
    for the app context's teardown instead of for the lock. So do changes
    that went to another bind, since the outer transaction wrote to the file."""
    app, _, sidelog = make_app(
        database_uri,
        str(tmp_path / "instance"),
        {"SIDELOG_WRITE_TIMEOUT": 2},
        with_db=False,
    )
    sidelog.track(Account if model == "account" else Gadget)
    failed: list[object] = []
    entry_failed.connect(lambda *a, **kw: failed.append(kw), app, weak=False)
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        with app.app_context():
            engine = app.extensions["sidelog"].main_engine
            Base.metadata.create_all(engine)
            OtherBase.metadata.create_all(other)
            with engine.connect() as conn, conn.begin():
                sidelog.session.remove()
                if bound == "session":
                    sidelog.session.configure(bind=conn, binds={Gadget: other})
                else:  # the connection given per declarative base
                    sidelog.session.configure(binds={Base: conn, OtherBase: other})
                sidelog.session.add(Account(name="joined"))
                sidelog.session.commit()
                sidelog.session.add(Gadget(id=1, name="elsewhere"))
                sidelog.session.commit()
                sidelog.session.remove()
        assert failed == []
        assert [(e["event"], e["main_tx"]) for e in changes(app, sidelog)] == [
            (f"{model}.insert", "committed")
        ]
    finally:
        other.dispose()
        dispose(app)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (r"k=a\,b,n=1", {"k": "a,b", "n": "1"}),
        (r"path=C:\\,n=1", {"path": "C:\\", "n": "1"}),
        (r"share=\\srv\docs,n=1", {"share": r"\\srv\docs", "n": "1"}),
        (r"p=a\\\,b,n=1", {"p": "a\\,b", "n": "1"}),
        ("k=a\\", {"k": "a\\"}),
    ],
)
def test_parse_pk_escapes(text: str, parsed: dict[str, str]) -> None:
    """\\, is a comma; before one, or at the end, \\\\ is a backslash; any
    other backslash is as given."""
    assert parse_pk(text) == parsed


def test_history_of_a_composite_key_with_a_comma_in_a_value(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """``\\,`` is a comma within a value of ``k1=v1,k2=v2``."""
    sidelog.track(Label)
    with app.app_context():
        db.session.add(Label(scope="a,b", name="x=y", color="red"))
        db.session.add(Label(scope="a", name="b", color="blue"))
        db.session.add(Label(scope="c:\\", name="d\\e", color="green"))
        db.session.commit()
        db.session.add(Label(scope="\\\\srv\\docs", name="n", color="grey"))
        db.session.commit()
        # \\ is a backslash before a comma; any other backslash is as given.
        (green,) = sidelog.history("tr_label", "scope=c:\\\\,name=d\\e")
        assert green["data"]["changes"]["color"] == [None, "green"]
        (grey,) = sidelog.history("tr_label", "name=n,scope=\\\\srv\\docs")
        assert grey["data"]["pk"] == {"scope": "\\\\srv\\docs", "name": "n"}
        assert len(sidelog.history("tr_label", "scope=a\\,b,name=x=y")) == 1
        assert sidelog.history("tr_label", "scope=a,name=b")[0]["data"]["pk"] == {
            "scope": "a",
            "name": "b",
        }

    found = runner.invoke(
        args=["sidelog", "history", "tr_label", "name=x=y,scope=a\\,b"]
    )
    assert found.exit_code == 0, found.output
    assert 'color: null -> "red"' in found.output
    assert len(found.output.splitlines()) == 1
    bad = runner.invoke(args=["sidelog", "history", "tr_label", "scope=a,b"])
    assert bad.exit_code == 2
    assert "write a comma within a value as \\," in bad.output


class OtherBase(sa_orm.DeclarativeBase):
    # Flask-SQLAlchemy sends the models of this metadata to the "other" bind.
    metadata = sa.MetaData(info={"bind_key": "other"})


class Gadget(OtherBase):
    __tablename__ = "tr_gadget"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(40))


@pytest.mark.parametrize("backend", ["sqlite_file"])
@pytest.mark.parametrize("bulk", [False, True])
def test_changes_on_another_bind_take_no_connection_of_the_log_file(
    database_uri: str, tmp_path: t.Any, bulk: bool
) -> None:
    """When the log shares the default bind's SQLite file, changes of a model
    on another bind hold no lock on it: tracking them checks out no
    connection of the default bind, and they are written at their commit."""
    app, db, sidelog = make_app(
        database_uri,
        str(tmp_path / "instance"),
        {"SQLALCHEMY_BINDS": {"other": f"sqlite:///{tmp_path / 'other.db'}"}},
    )
    assert db is not None
    sidelog.track(Gadget)
    checkouts: list[object] = []
    try:
        with app.app_context():
            OtherBase.metadata.create_all(db.engines["other"])
            sidelog.create_table()
            sa.event.listen(db.engine, "checkout", lambda *args: checkouts.append(args))
            db.session.add(Gadget(id=1, name="a"))
            db.session.commit()
            if bulk:
                db.session.execute(sa.update(Gadget).values(name="b"))
                db.session.commit()
            assert checkouts == []
            events = [(e["event"], e["main_tx"]) for e in changes(app, sidelog)]
        expected = [("tr_gadget.insert", "committed")]
        if bulk:
            expected.append(("tr_gadget.bulk_update", "committed"))
        assert events == expected
    finally:
        dispose(app)


def test_log_failure_does_not_break_the_main_transaction(
    database_uri: str, tmp_path: t.Any
) -> None:
    app, db, sidelog = make_app(
        database_uri,
        str(tmp_path / "instance"),
        {"SIDELOG_CREATE_TABLE": False, "SIDELOG_TABLE": "missing_table"},
    )
    assert db is not None
    sidelog.track(Account)
    failed: list[str] = []

    def record(sender: Flask, entry: dict[str, t.Any], error: BaseException) -> None:
        failed.append(entry["event"])

    try:
        with app.app_context():
            Base.metadata.create_all(db.engine)
        with entry_failed.connected_to(record, app), app.app_context():
            db.session.add(Account(name="kept"))
            db.session.commit()
            assert db.session.scalars(sa.select(Account.name)).all() == ["kept"]
        assert failed == ["account.insert"]
    finally:
        dispose(app)


def test_changes_that_cannot_be_written_are_spooled_in_raise_mode(
    database_uri: str, tmp_path: t.Any
) -> None:
    """Change entries are written from session events, where raising would
    break the app's commit and reach no caller that asked for them: in
    "raise" mode too they go to the spool, committed or rolled back, in a
    request or not."""
    app, db, sidelog = make_app(
        database_uri,
        str(tmp_path / "instance"),
        {
            "SIDELOG_CREATE_TABLE": False,
            "SIDELOG_TABLE": "missing_table",
            "SIDELOG_ON_WRITE_ERROR": "raise",
        },
    )
    assert db is not None
    sidelog.track(Account)

    @app.post("/open")
    def open_account() -> str:
        db.session.add(Account(name="kept"))
        db.session.commit()
        return "ok"

    @app.post("/try")
    def try_account() -> str:
        db.session.add(Account(name="discarded"))
        db.session.flush()
        return "not committed"

    try:
        with app.app_context():
            Base.metadata.create_all(db.engine)
        client = app.test_client()
        assert client.post("/open").status_code == 200
        assert client.post("/try").status_code == 200
        with app.app_context():
            db.session.add(Account(name="from a job"))
            db.session.commit()
            names = db.session.scalars(sa.select(Account.name).order_by(Account.id))
            assert names.all() == ["kept", "from a job"]
    finally:
        dispose(app)
    with open(app.extensions["sidelog"].settings.spool_path) as f:
        spooled = [json.loads(line) for line in f]
    assert [
        (e["event"], e["main_tx"], e["data"]["changes"]["name"][1]) for e in spooled
    ] == [
        ("account.insert", "committed", "kept"),
        ("account.insert", "rolled_back", "discarded"),
        ("account.insert", "committed", "from a job"),
    ]


def test_tracked_decorator_before_init_app_and_track_all(
    database_uri: str, tmp_path: t.Any
) -> None:
    sidelog = SideLog()
    assert sidelog.tracked(Membership) is Membership
    assert sidelog.tracked(exclude={"ssn"})(Credential) is Credential
    sidelog.track_all(exclude_tables={"tr_note"})
    app = Flask("tracked", instance_path=str(tmp_path / "instance"))
    app.config.update(SQLALCHEMY_DATABASE_URI=database_uri, SIDELOG_CREATE_TABLE=True)
    db = SQLAlchemy()
    db.init_app(app)
    sidelog.init_app(app, db)
    try:
        with app.app_context():
            Base.metadata.create_all(db.engine)
            db.session.add(Membership(org_id=1, user_id=2, role="owner"))
            db.session.add(Credential(login="a", password_hash="h", ssn="SSN-9"))
            db.session.add(Account(name="a"))
            db.session.add(Note(text="not tracked"))
            db.session.commit()
        found = changes(app, sidelog)
        assert sorted(e["event"] for e in found) == [
            "account.insert",
            "tr_credential.insert",
            "tr_membership.insert",
        ]
        membership = next(e for e in found if e["event"] == "tr_membership.insert")
        assert membership["data"]["pk"] == {"org_id": 1, "user_id": 2}
        credential = next(e for e in found if e["event"] == "tr_credential.insert")
        assert "ssn" not in credential["data"]["changes"]
    finally:
        dispose(app)


def test_track_all_warns_once_of_an_excluded_table_no_model_has(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A misspelt name in exclude_tables leaves its table tracked; the
    first flush, once the models are all known, says so in the log. A table
    of another declarative base (another bind) is a known one."""
    sidelog.track_all(exclude_tables={"tr_note", "tr_notes", "tr_gadget"})

    @app.post("/")
    def write() -> str:
        db.session.add(Note(text="left out"))
        db.session.commit()
        db.session.add(Account(name="a"))
        db.session.commit()
        return "ok"

    assert client.post("/").status_code == 200
    warnings = [
        r.getMessage() for r in caplog.records if "exclude_tables" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "names 'tr_notes', which no mapped table has" in warnings[0]
    named = warnings[0].split("Mapped tables")[0]
    assert "'tr_note'" not in named and "tr_gadget" not in named
    assert "tr_note," in warnings[0]  # among the tables it lists
    assert [e["event"] for e in changes(app, sidelog)] == ["account.insert"]


def test_track_rejects_bad_arguments(sidelog: SideLog) -> None:
    with pytest.raises(TypeError, match="mapped model class"):
        sidelog.track(dict)
    with pytest.raises(TypeError, match=r"exclude=\{'ssn'\}"):
        sidelog.track(Credential, exclude="ssn")
    with pytest.raises(ValueError, match="no column 'pasword_hash'; exclude one of"):
        sidelog.track(Credential, exclude={"pasword_hash"})
    with pytest.raises(
        ValueError, match="primary key of Credential cannot be excluded"
    ):
        sidelog.track(Credential, exclude={"id"})
    with pytest.raises(TypeError, match=r"exclude_tables=\{'tr_note'\}"):
        sidelog.track_all(exclude_tables="tr_note")
    with pytest.raises(TypeError, match="table names as strings, got Table"):
        sidelog.track_all(exclude_tables={Note.__table__, "tr_notes"})


def test_history(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    client: FlaskClient,
    runner: FlaskCliRunner,
) -> None:
    sidelog.track(Account)
    sidelog.track(Membership)
    sidelog.actor_loader(lambda: "alice")

    @app.post("/")
    def work() -> str:
        db.session.add(Account(name="a", balance=1))
        db.session.add(Account(name="other", balance=1))
        db.session.add(Membership(org_id=1, user_id=2, role="member"))
        db.session.commit()
        account = db.get_or_404(Account, 1)
        account.balance = 100
        db.session.flush()
        db.session.rollback()
        db.get_or_404(Account, 1).balance = 2
        db.get_or_404(Membership, (1, 2)).role = "owner"
        db.session.commit()
        return "ok"

    client.post("/")

    with app.app_context():
        life = sidelog.history("account", 1)
        assert [(e["event"], e["main_tx"]) for e in life] == [
            ("account.insert", "committed"),
            ("account.update", "rolled_back"),
            ("account.update", "committed"),
        ]
        assert sidelog.history("account", "id=1", only="rolled_back") == [life[1]]
        assert len(sidelog.history("tr_membership", {"org_id": 1, "user_id": 2})) == 2
        assert sidelog.history("tr_membership", 1) == []
        with pytest.raises(ValueError, match="only must be"):
            sidelog.history("account", 1, only="stuck")

    result = runner.invoke(args=["sidelog", "history", "account", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 3
    assert "committed" in lines[0] and "insert" in lines[0]
    assert 'name: null -> "a"' in lines[0]
    assert "ROLLED BACK" in lines[1] and "balance: 1 -> 100" in lines[1]
    assert "committed" in lines[2] and "balance: 1 -> 2" in lines[2]
    assert all("actor=alice" in line and "request=" in line for line in lines)
    assert life[0]["request_id"] in lines[0]

    only = runner.invoke(
        args=["sidelog", "history", "account", "1", "--only-committed"]
    )
    assert only.output.splitlines() == [lines[0], lines[2]]
    only = runner.invoke(
        args=["sidelog", "history", "account", "1", "--only-rolled-back"]
    )
    assert only.output.splitlines() == [lines[1]]

    composite = runner.invoke(
        args=["sidelog", "history", "tr_membership", "user_id=2,org_id=1"]
    )
    assert composite.exit_code == 0
    assert len(composite.output.splitlines()) == 2
    assert 'role: "member" -> "owner"' in composite.output

    nothing = runner.invoke(args=["sidelog", "history", "account", "99"])
    assert nothing.exit_code == 0
    assert nothing.output == "No recorded changes for account 99.\n"

    both = runner.invoke(
        args=[
            "sidelog",
            "history",
            "account",
            "1",
            "--only-committed",
            "--only-rolled-back",
        ]
    )
    assert both.exit_code == 2
    assert "exclude each other" in both.output
    bad = runner.invoke(args=["sidelog", "history", "tr_membership", "org_id=1,=2"])
    assert bad.exit_code == 2
    assert "k1=v1,k2=v2" in bad.output
    assert "Traceback" not in bad.output


plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["a\x00b", "x\ud800y", "é"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "api_key"]), st.integers(), max_size=2),
)
columns = st.sampled_from(["id", "name", "password_hash", "Token", "n\x00", "x\ud800"])


@settings(max_examples=100, deadline=None)
# Captured rows with a name to redact, text to clean, a value to redact.
@example(
    pk={"id": 1},
    row={"name": [{"api_key": 1}, None]},
    big=False,
    redact=DEFAULT_REDACT_KEYS,
    captured=True,
)
@example(
    pk={"id": 1},
    row={"password_hash": ["a", "b"]},
    big=False,
    redact=DEFAULT_REDACT_KEYS,
    captured=True,
)
@example(  # 72,000 bytes stored, escaped: over the limit
    pk={"id": 1},
    row={"name": ["\U0001f600" * 6000, None]},
    big=False,
    redact=(),
    captured=False,
)
@example(
    pk={"id": "a\x00b"},
    row={"name": ["\u00e9", None]},
    big=False,
    redact=(),
    captured=True,
)
@given(
    pk=st.dictionaries(columns, plain, max_size=2),
    row=st.dictionaries(columns, st.lists(plain, min_size=2, max_size=2), max_size=4),
    big=st.booleans(),
    redact=st.sampled_from([DEFAULT_REDACT_KEYS, ("pk",), ()]),
    captured=st.booleans(),
)
def test_change_entries_are_those_make_entry_makes(
    pk: dict[str, t.Any],
    row: dict[str, t.Any],
    big: bool,
    redact: tuple[str, ...],
    captured: bool,
) -> None:
    """The per-row short paths store exactly what make_entry would: for any
    data, and for data that capture found stored as it is."""
    if big:
        row["name"] = ["x" * 70_000, None]
    data = {"table": "account", "pk": pk, "changes": row}
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spec = None
    if captured:
        # As Tracker.spec describes a model with these columns.
        names = [*pk, *row]
        spec = _Spec(
            "account",
            tuple((name, name) for name in pk),
            {name: name for name in names},
            frozenset(),
            {},
            _names_size("account", list(pk), names),
        )
        if not _stored_as_is(spec, pk, row):
            spec = None
    change = Change("account.update", data, "alice", at, spec)
    keys = frozenset(redact)
    fields = {"main_tx": "committed", "request_id": "r", "path": "/p"}
    (entry,) = make_change_entries([change], keys, **fields)
    expected = make_entry(
        "account.update",
        data=data,
        redact_keys=keys,
        actor="alice",
        created_at=at,
        **fields,
    )
    if expected["data"].get("_truncated"):
        assert entry["data"]["table"] == "account"
        assert entry["data"]["_size"] == expected["data"]["_size"]
        expected["data"] = entry["data"]
    assert entry.pop("uuid") != expected.pop("uuid")
    assert entry == expected


def test_without_flask_sqlalchemy(database_uri: str, tmp_path: t.Any) -> None:
    """SideLog's own main session is tracked the same way."""
    app, _, sidelog = make_app(database_uri, str(tmp_path / "instance"), with_db=False)
    sidelog.track(Account)

    @app.post("/<name>")
    def create(name: str) -> str:
        sidelog.session.add(Account(name=name))
        sidelog.session.flush()
        if name == "undo":
            sidelog.session.rollback()
        else:
            sidelog.session.commit()
        return "ok"

    try:
        with app.app_context():
            Base.metadata.create_all(app.extensions["sidelog"].main_engine)
        client = app.test_client()
        client.post("/kept")
        client.post("/undo")
        found = changes(app, sidelog)
        assert [(e["data"]["changes"]["name"][1], e["main_tx"]) for e in found] == [
            ("kept", "committed"),
            ("undo", "rolled_back"),
        ]
    finally:
        dispose(app)


@pytest.mark.parametrize("track_first", [True, False], ids=["before", "after"])
def test_track_before_or_after_init_app(
    database_uri: str, tmp_path: t.Any, track_first: bool
) -> None:
    # A session class of its own: change listeners go on a class the first
    # time some SideLog tracks a model, so another test cannot have added them.
    from flask_sqlalchemy.session import Session

    class FreshSession(Session):
        pass

    app = Flask("sidelog_test", instance_path=str(tmp_path))
    app.config.update(
        TESTING=True, SQLALCHEMY_DATABASE_URI=database_uri, SIDELOG_CREATE_TABLE=True
    )
    db = SQLAlchemy(app, session_options={"class_": FreshSession})
    sidelog = SideLog()
    if track_first:
        sidelog.track(Account)
    sidelog.init_app(app, db)
    if not track_first:
        sidelog.track(Account)
    try:
        with app.app_context():
            Base.metadata.create_all(db.engine, tables=[Account.__table__])
            db.session.add(Account(name="alice", balance=1))
            db.session.commit()
        assert summary(changes(app, sidelog, "account")) == [
            (
                "account.insert",
                "committed",
                {"balance": [None, 1], "id": [None, 1], "name": [None, "alice"]},
            )
        ]
    finally:
        with app.app_context():
            Base.metadata.drop_all(db.engine, tables=[Account.__table__])
        dispose(app)


class StaffBase(sa_orm.DeclarativeBase):
    pass


class Staff(StaffBase):
    __tablename__ = "tr_staff"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    kind: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "staff"}


class Clerk(Staff):  # joined: its key column is tr_clerk.id
    __tablename__ = "tr_clerk"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(
        sa.ForeignKey("tr_staff.id"), primary_key=True
    )
    desk: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_identity": "clerk"}


class HeadClerk(Clerk):  # one table with Clerk; its primary key is tr_staff.id
    grade: sa_orm.Mapped[int | None] = sa_orm.mapped_column(nullable=True)
    __mapper_args__ = {"polymorphic_identity": "head_clerk"}


def test_a_single_table_subclass_of_a_joined_one_records_its_key(
    database_uri: str, tmp_path: t.Any
) -> None:
    """The mapper of a single-table subclass of a joined subclass lists the
    joined table's key column, while its primary key is the base table's:
    each change still names its row, and history finds it."""
    app, db, sidelog = make_app(database_uri, str(tmp_path / "instance"))
    assert db is not None
    sidelog.track(Clerk)
    try:
        with app.app_context():
            StaffBase.metadata.create_all(db.engine)
            head = HeadClerk(desk="a", grade=1)
            db.session.add_all([head, Clerk(desk="b")])
            db.session.commit()
            head.grade = 2
            db.session.commit()
            db.session.delete(head)
            db.session.commit()
            found = [
                (e["event"], e["data"]["pk"]) for e in changes(app, sidelog, "tr_clerk")
            ]
            history = [e["event"] for e in sidelog.history("tr_clerk", 1)]
        assert sorted(found, key=str) == [
            ("tr_clerk.delete", {"id": 1}),
            ("tr_clerk.insert", {"id": 1}),
            ("tr_clerk.insert", {"id": 2}),
            ("tr_clerk.update", {"id": 1}),
        ]
        assert history == ["tr_clerk.insert", "tr_clerk.update", "tr_clerk.delete"]
    finally:
        with app.app_context():
            StaffBase.metadata.drop_all(db.engine)
        dispose(app)
