"""Registration, configuration, the main session without Flask-SQLAlchemy,
actors, signals, the log session and ``flask sidelog init``."""

from __future__ import annotations

import gc
import os
import typing as t
import weakref
from datetime import date
from datetime import datetime
from datetime import timezone

import flask_login
import pytest
import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import abort
from flask import Flask
from flask.signals import appcontext_pushed
from flask.testing import FlaskClient
from flask.testing import FlaskCliRunner
from flask_sqlalchemy import SQLAlchemy

from _postgres import ThrowawayPostgres
from conftest import Account
from conftest import Base
from conftest import dispose
from conftest import failures
from conftest import make_app
from flask_sidelog import SideLog
from flask_sidelog.signals import entry_written

NOW = datetime.now(timezone.utc)


def test_init_app_twice(app: Flask, sidelog: SideLog) -> None:
    with pytest.raises(RuntimeError, match="already registered"):
        sidelog.init_app(app)


def test_state_lives_in_app_extensions(app: Flask, sidelog: SideLog) -> None:
    assert app.extensions["sidelog"].extension is sidelog
    assert not hasattr(sidelog, "app")


@pytest.mark.parametrize("timeout", [0, -1, "5", 1e12, float("inf")])
def test_bad_write_timeout(tmp_path: t.Any, timeout: object) -> None:
    with pytest.raises(ValueError, match="number of seconds above 0 and at most"):
        make_app("sqlite://", str(tmp_path), {"SIDELOG_WRITE_TIMEOUT": timeout})


def test_a_write_timeout_under_a_millisecond_still_bounds_postgresql_waits(
    postgres: ThrowawayPostgres, tmp_path: t.Any
) -> None:
    """PostgreSQL takes lock_timeout and statement_timeout in whole
    milliseconds and reads 0 as no limit: 0.5 ms cut down to 0 let a write
    wait forever behind a table lock. It becomes 1 ms."""
    uri = postgres.create_database(f"t_timeout_{os.urandom(4).hex()}")
    app, _, _ = make_app(
        f"sqlite:///{tmp_path / 'main.db'}",
        str(tmp_path / "instance"),
        {
            "SIDELOG_DATABASE_URI": uri,
            "SIDELOG_WRITE_TIMEOUT": 0.0005,
            # A statement may take over 1 ms on a busy machine: the app's own
            # statement_timeout (which wins) keeps this test's ones alive.
            "SIDELOG_ENGINE_OPTIONS": {
                "connect_args": {"options": "-c statement_timeout=60s"}
            },
        },
    )
    try:
        with app.app_context():
            engine = app.extensions["sidelog"].writer.engine
            given: list[str] = []
            sa.event.listen(
                engine,
                "do_connect",
                lambda dialect, record, cargs, cparams: given.append(
                    cparams["options"]
                ),
            )
            with engine.connect() as conn:
                lock_timeout = conn.exec_driver_sql("SHOW lock_timeout").scalar()
        assert lock_timeout == "1ms"
        assert given[0].startswith("-c lock_timeout=1 -c statement_timeout=1 ")
    finally:
        dispose(app)


@pytest.mark.parametrize(
    ("config", "accepted"),
    [
        # A str is read letter by letter: nearly every key would be redacted.
        ({"SIDELOG_REDACT_KEYS": "password"}, "SIDELOG_REDACT_KEYS must be a list"),
        ({"SIDELOG_REDACT_KEYS": [""]}, "SIDELOG_REDACT_KEYS must be a list"),
        ({"SIDELOG_REDACT_KEYS": None}, "SIDELOG_REDACT_KEYS must be a list"),
        ({"SIDELOG_REDACT_KEYS": [1, 2]}, "SIDELOG_REDACT_KEYS must be a list"),
        ({"SIDELOG_DATABASE_URI": "nope"}, "SIDELOG_DATABASE_URI must be None or a"),
        ({"SIDELOG_DATABASE_URI": 5}, "SIDELOG_DATABASE_URI must be None or a"),
        ({"SIDELOG_DATABASE_URI": ""}, "SIDELOG_DATABASE_URI must be None or a"),
        (  # the port is not a number
            {"SIDELOG_DATABASE_URI": "postgresql+psycopg://u@127.0.0.1:abc/d"},
            "SIDELOG_DATABASE_URI must be None or a",
        ),
        # These passed init_app; without Flask-SQLAlchemy, the first write
        # failed.
        (
            {"SIDELOG_MAIN_DATABASE_URI": "garbage"},
            "SIDELOG_MAIN_DATABASE_URI must be None or a SQLAlchemy database URL",
        ),
        ({"SIDELOG_MAIN_DATABASE_URI": 5}, "SIDELOG_MAIN_DATABASE_URI must be None"),
        ({"SIDELOG_MAIN_DATABASE_URI": ""}, "SIDELOG_MAIN_DATABASE_URI must be None"),
        (
            {"SIDELOG_MAIN_DATABASE_URI": "nosuchdb://h/d"},
            "SIDELOG_MAIN_DATABASE_URI must be None",
        ),
        (
            {"SIDELOG_MAIN_DATABASE_URI": "postgresql+psycopg://u@127.0.0.1:abc/d"},
            "SIDELOG_MAIN_DATABASE_URI must be None",
        ),
        ({"SIDELOG_ENGINE_OPTIONS": {"bogus": 1}}, "Invalid argument.*'bogus'"),
        ({"SIDELOG_ENGINE_OPTIONS": None}, "SIDELOG_ENGINE_OPTIONS must be a dict"),
        # Values create_engine() fails on with errors of any kind, or that
        # name neither the key nor the option.
        (
            {"SIDELOG_ENGINE_OPTIONS": {"poolclass": 5, "pool_size": 3}},
            r"SIDELOG_ENGINE_OPTIONS must be .* refused 'poolclass': 5 \(Attr",
        ),
        (
            {"SIDELOG_ENGINE_OPTIONS": {"echo": "lots"}},
            r"SIDELOG_ENGINE_OPTIONS must be .* refused 'echo': 'lots' \(KeyError",
        ),
        (
            {"SIDELOG_ENGINE_OPTIONS": {"module": 5}},
            r"SIDELOG_ENGINE_OPTIONS must be .* refused 'module': 5 \(Attr",
        ),
        (
            {"SIDELOG_ENGINE_OPTIONS": {"connect_args": "x"}},
            "SIDELOG_ENGINE_OPTIONS must be a dict",
        ),
        (
            {"SIDELOG_BIND_KEY": "missing", "SQLALCHEMY_BINDS": {"audit": "sqlite://"}},
            r"SIDELOG_BIND_KEY must be a key of SQLALCHEMY_BINDS \('audit'\)",
        ),
        (  # a list cannot be a dict key: it raised TypeError: unhashable
            {"SIDELOG_BIND_KEY": ["audit"], "SQLALCHEMY_BINDS": {"audit": "sqlite://"}},
            r"SIDELOG_BIND_KEY must be a key of SQLALCHEMY_BINDS \('audit'\)",
        ),
        (
            {
                "SIDELOG_BIND_KEY": "audit",
                "SQLALCHEMY_BINDS": {"audit": {"url": "sqlite://"}},
                "SIDELOG_ENGINE_OPTIONS": {"pool_sizee": 3},
            },
            "'pool_sizee'",
        ),
        ({"SIDELOG_TABLE": None}, "SIDELOG_TABLE must be a non-empty table name"),
        ({"SIDELOG_TABLE": ""}, "SIDELOG_TABLE must be a non-empty table name"),
        (
            {"SIDELOG_TABLE": "t" * 50, "SIDELOG_DATABASE_URI": "postgresql://h/d"},
            "of at most 49 bytes on PostgreSQL",
        ),
        (  # 60 bytes: PostgreSQL's cut index names would collide
            {"SIDELOG_TABLE": "é" * 30, "SIDELOG_DATABASE_URI": "postgresql://h/d"},
            "of at most 49 bytes on PostgreSQL",
        ),
        ({"SIDELOG_REDACT_KEYS": iter([""])}, "SIDELOG_REDACT_KEYS must be a list"),
        ({"SIDELOG_CREATE_TABLE": "no"}, "SIDELOG_CREATE_TABLE must be True, False"),
        ({"SIDELOG_SPOOL_PATH": "."}, "SIDELOG_SPOOL_PATH must be a file path, not"),
        # Folders that do not exist yet, and a path no system call takes.
        ({"SIDELOG_SPOOL_PATH": "sub/"}, "SIDELOG_SPOOL_PATH must be a file path, not"),
        ({"SIDELOG_SPOOL_PATH": "new/.."}, "SIDELOG_SPOOL_PATH must be a file path"),
        ({"SIDELOG_SPOOL_PATH": "a\x00b"}, "SIDELOG_SPOOL_PATH must be .* no NUL"),
        ({"SIDELOG_FLUSH_INTERVAL": 1e308}, "SIDELOG_FLUSH_INTERVAL must be a number"),
        (
            {"SIDELOG_REQUEST_ID_RESPONSE_HEADER": "Идентификатор"},
            "SIDELOG_REQUEST_ID_RESPONSE_HEADER must be None or an HTTP header name",
        ),
        (
            {"SIDELOG_REQUEST_ID_HEADER": "X Req ID"},
            "SIDELOG_REQUEST_ID_HEADER must be None or an HTTP header name",
        ),
    ],
)
def test_bad_setting_is_refused_at_init_app(
    tmp_path: t.Any, config: dict[str, t.Any], accepted: str
) -> None:
    """Each of these used to pass init_app and then fail every write or
    response, or (a str of redacted keys) store the wrong data."""
    with pytest.raises(ValueError, match=accepted):
        make_app("sqlite:///main.db", str(tmp_path), config)


@pytest.mark.parametrize("spool", ["a-file/spool.jsonl", "a-file/deeper/spool.jsonl"])
def test_spool_path_under_a_file_is_refused(tmp_path: t.Any, spool: str) -> None:
    """No folder can be made there: every spooled entry would be lost."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        ValueError, match=r"SIDELOG_SPOOL_PATH .*/a-file is not a folder"
    ):
        make_app("sqlite://", str(tmp_path), {"SIDELOG_SPOOL_PATH": spool})


@pytest.mark.parametrize("order", ["db first", "sidelog first"])
def test_either_order_of_init_app(
    tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """Flask-SQLAlchemy's teardown is wrapped whichever extension is set up
    first, so an error it raises as it closes the session (its connection
    died) cannot skip ours: the request's entry is still written."""
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'main.db'}",
        SIDELOG_CREATE_TABLE=True,
    )
    db = SQLAlchemy()
    sidelog = SideLog()
    if order == "db first":
        db.init_app(app)
        sidelog.init_app(app, db)
    else:
        sidelog.init_app(app, db)
        db.init_app(app)

    @app.get("/")
    @sidelog.audit("home")
    def home() -> str:
        return "home"

    def closing_fails() -> None:
        raise RuntimeError("the connection died as the session closed")

    monkeypatch.setattr(db.session, "remove", closing_fails)
    with pytest.raises(RuntimeError, match="the connection died"):
        app.test_client().get("/")
    monkeypatch.undo()
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["event"], entry["outcome"], entry["status_code"]) == (
        "home",
        "error",
        500,
    )
    assert "the connection died" in entry["error"]
    dispose(app)


def test_db_of_another_app_is_refused(tmp_path: t.Any) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    SQLAlchemy(app)
    with pytest.raises(RuntimeError, match="another Flask-SQLAlchemy"):
        SideLog().init_app(app, SQLAlchemy())
    assert "sidelog" not in app.extensions


def test_db_of_another_app_set_up_later_is_reported(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    """In the other order, init_app cannot tell yet: the first app context
    does, in the app's log, once (raising there would leave it pushed)."""
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    SideLog().init_app(app, SQLAlchemy())
    SQLAlchemy(app)
    for _ in range(2):
        with app.app_context():
            pass
    said = [r.getMessage() for r in caplog.records if "another Flask-SQLA" in r.msg]
    assert said == [
        "flask-sidelog: this app has another Flask-SQLAlchemy extension than the"
        " db given to sidelog.init_app(app, db): pass the one its db.init_app(app)"
        " was called with."
    ]


def test_a_late_db_receiver_goes_with_its_app(tmp_path: t.Any) -> None:
    """Waiting for a db.init_app(app) that never came kept nothing alive."""
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    SideLog().init_app(app, SQLAlchemy())
    receiver = weakref.ref(app.extensions["sidelog"].late_db_receiver)
    assert appcontext_pushed.has_receivers_for(app)
    del app
    gc.collect()
    assert receiver() is None


def test_bind_key_needs_the_db(tmp_path: t.Any) -> None:
    with pytest.raises(ValueError, match=r"pass the db to init_app\(app, db\)"):
        make_app("sqlite://", str(tmp_path), {"SIDELOG_BIND_KEY": "a"}, with_db=False)


def test_good_settings_are_taken(tmp_path: t.Any) -> None:
    app, _, sidelog = make_app(
        "sqlite:///main.db",
        str(tmp_path),
        {
            # A generator is read once, not used up by its check.
            "SIDELOG_REDACT_KEYS": (key for key in ["pin"]),
            "SIDELOG_TABLE": "t" * 60,  # SQLite has no limit
            "SIDELOG_ENGINE_OPTIONS": {"pool_size": 3, "connect_args": {}},
            "SIDELOG_REQUEST_ID_HEADER": "X-Request-ID",
            "SIDELOG_CREATE_TABLE": True,
        },
    )
    try:
        with app.app_context():
            sidelog.log("ok", data={"pin": 1234, "password": "kept", "name": "ann"})
            (entry,) = sidelog.entries()
        assert entry["data"] == {"pin": "[redacted]", "password": "kept", "name": "ann"}
    finally:
        dispose(app)


def test_one_extension_several_apps(tmp_path: t.Any) -> None:
    sidelog = SideLog()
    apps = []
    for name in ("one", "two"):
        app = Flask(name, instance_path=str(tmp_path / name))
        app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///app.db"
        db = SQLAlchemy()
        db.init_app(app)
        sidelog.init_app(app, db)
        apps.append(app)
    for app in apps:
        with app.app_context():
            sidelog.log(f"hello.{app.name}")
    for app in apps:
        with app.app_context():
            assert [e["event"] for e in sidelog.entries()] == [f"hello.{app.name}"]
        dispose(app)


def test_separate_log_database(app_and_ext_separate: tuple[Flask, SideLog]) -> None:
    app, sidelog = app_and_ext_separate
    with app.app_context():
        sidelog.log("elsewhere")
        url = app.extensions["sidelog"].writer.engine.url
    assert url.database.endswith("audit.db")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        events = conn.execute(sa.text("select event from sidelog_entries")).all()
    engine.dispose()
    assert events == [("elsewhere",)]


@pytest.fixture
def app_and_ext_separate(tmp_path: t.Any) -> t.Iterator[tuple[Flask, SideLog]]:
    app, _, sidelog = make_app(
        "sqlite:///main.db",
        str(tmp_path),
        {"SIDELOG_DATABASE_URI": "sqlite:///audit.db"},
    )
    yield app, sidelog
    dispose(app)


def test_bind_key(tmp_path: t.Any) -> None:
    app, db, sidelog = make_app(
        "sqlite:///main.db",
        str(tmp_path),
        {
            "SQLALCHEMY_BINDS": {"audit": "sqlite:///bound.db"},
            "SIDELOG_BIND_KEY": "audit",
        },
    )
    assert db is not None
    with app.app_context():
        sidelog.log("bound")
        log_engine = app.extensions["sidelog"].writer.engine
        assert log_engine is not db.engines["audit"]
        assert log_engine.url == db.engines["audit"].url
        assert sa.inspect(db.engines["audit"]).has_table("sidelog_entries")
        assert not sa.inspect(db.engine).has_table("sidelog_entries")
    dispose(app)


def test_log_on_a_sqlite_bind_the_request_writes(tmp_path: t.Any) -> None:
    """The log's SQLite file is a bind the main session writes through: an
    entry logged while its write lock is held waits for the teardown, as
    with the main file, rather than for the lock until the timeout."""
    app, db, sidelog = make_app(
        "sqlite:///main.db",
        str(tmp_path),
        {
            "SQLALCHEMY_BINDS": {"audit": "sqlite:///bound.db"},
            "SIDELOG_BIND_KEY": "audit",
            "SIDELOG_WRITE_TIMEOUT": 1,
        },
    )
    assert db is not None

    class Note(db.Model):  # type: ignore[name-defined,misc]
        __bind_key__ = "audit"
        id = sa.Column(sa.Integer, primary_key=True)

    sidelog.track(Note)

    @app.post("/note")
    @sidelog.audit("note.add")
    def add() -> str:
        db.session.add(Note(id=1))
        db.session.flush()
        sidelog.log("note.flushed")
        db.session.commit()
        return "ok"

    with app.app_context():
        db.create_all()
        sidelog.create_table()
    with failures(app) as failed:
        assert app.test_client().post("/note").text == "ok"
    with app.app_context():
        stored = [(e["event"], e["main_tx"]) for e in sidelog.entries()]
    assert failed == []
    assert sorted(stored, key=str) == sorted(
        [
            ("note.flushed", None),
            ("note.add", "committed"),
            ("note.insert", "committed"),
        ],
        key=str,
    )
    dispose(app)


def test_log_in_a_file_both_the_default_and_a_bind_name(tmp_path: t.Any) -> None:
    """The log's file is the default database's and a bind's too: a Core
    write through the session's default connection holds its lock."""
    app, db, sidelog = make_app(
        "sqlite:///main.db",
        str(tmp_path),
        {
            "SQLALCHEMY_BINDS": {"same": "sqlite:///main.db"},
            "SIDELOG_WRITE_TIMEOUT": 1,
        },
    )
    assert db is not None

    @app.post("/add")
    @sidelog.audit("add")
    def add() -> str:
        db.session.connection().execute(sa.insert(Account).values(name="a", balance=0))
        sidelog.log("mid")
        db.session.commit()
        return "ok"

    with app.app_context():
        Account.metadata.create_all(db.engine)
        sidelog.create_table()
    with failures(app) as failed:
        assert app.test_client().post("/add").text == "ok"
    with app.app_context():
        events = sorted(e["event"] for e in sidelog.entries())
    assert failed == []
    assert events == ["add", "mid"]
    dispose(app)


@pytest.fixture
def plain_app(database_uri: str, tmp_path: t.Any) -> t.Iterator[tuple[Flask, SideLog]]:
    """An app with no Flask-SQLAlchemy: SideLog provides the main session."""
    app, _, sidelog = make_app(database_uri, str(tmp_path), with_db=False)
    with app.app_context():
        Account.metadata.create_all(sidelog.session.get_bind())
    yield app, sidelog
    dispose(app)


def test_main_session_without_flask_sqlalchemy(
    plain_app: tuple[Flask, SideLog],
) -> None:
    app, sidelog = plain_app

    @app.post("/ok")
    @sidelog.audit
    def ok() -> str:
        sidelog.session.add(Account(name="plain"))
        sidelog.session.commit()
        return "ok"

    @app.post("/fail")
    @sidelog.audit
    def fail() -> str:
        sidelog.session.add(Account(name="lost"))
        sidelog.session.flush()
        sidelog.log("flushed")
        abort(409)

    client = app.test_client()
    assert client.post("/ok").status_code == 200
    assert client.post("/fail").status_code == 409
    with app.app_context():
        names = sidelog.session.scalars(sa.select(Account.name)).all()
        entries = sidelog.entries()
    assert names == ["plain"]
    assert [(e["event"], e["main_tx"]) for e in entries] == [
        ("ok", "committed"),
        ("flushed", None),
        ("fail", "rolled_back"),
    ]
    assert entries[2]["outcome"] == "failure"


def test_main_session_removed_at_teardown(plain_app: tuple[Flask, SideLog]) -> None:
    app, sidelog = plain_app
    with app.app_context():
        session = sidelog.session()
        assert sidelog.session() is session
    with app.app_context():
        assert sidelog.session() is not session


def test_log_database_alone(tmp_path: t.Any) -> None:
    """Without Flask-SQLAlchemy or a main database, SIDELOG_DATABASE_URI is
    enough: the app keeps its data elsewhere, or has none."""
    app = Flask("logonly", instance_path=str(tmp_path))
    app.config.update(
        SIDELOG_DATABASE_URI=f"sqlite:///{tmp_path / 'log.db'}",
        SIDELOG_CREATE_TABLE=True,
    )
    sidelog = SideLog(app)

    @app.get("/")
    @sidelog.audit("home")
    def home() -> str:
        sidelog.log("inside")
        return "home"

    assert app.test_client().get("/").text == "home"
    with app.app_context():
        found = [(e["event"], e["main_tx"]) for e in sidelog.entries()]
    assert found == [("inside", None), ("home", "none")]
    dispose(app)


def test_no_database_at_all(tmp_path: t.Any) -> None:
    app = Flask("nodb", instance_path=str(tmp_path))
    with pytest.raises(ValueError, match="set SIDELOG_DATABASE_URI"):
        SideLog(app)
    assert "sidelog" not in app.extensions


def test_actor_loader_and_explicit_actor(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @sidelog.actor_loader
    def load() -> str:
        return "loaded"

    @app.get("/")
    @sidelog.audit
    def index() -> str:
        sidelog.log("implicit")
        sidelog.log("explicit", actor="given")
        return "ok"

    client.get("/")
    with app.app_context():
        assert [(e["event"], e["actor"]) for e in sidelog.entries()] == [
            ("implicit", "loaded"),
            ("explicit", "given"),
            ("index", "loaded"),
        ]


def test_failing_actor_loader_loses_nothing(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @sidelog.actor_loader
    def load() -> str:
        raise LookupError("no user store")

    @app.get("/")
    @sidelog.audit
    def index() -> str:
        return "ok"

    assert client.get("/").status_code == 200
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["actor"] is None


class User(flask_login.UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def test_flask_login_actor_by_default(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    app.secret_key = "test"
    login_manager = flask_login.LoginManager(app)
    login_manager.user_loader(User)

    @app.post("/login/<name>")
    @sidelog.audit("login")
    def login(name: str) -> str:
        flask_login.login_user(User(name))
        return "in"

    @app.get("/me")
    @sidelog.audit("me")
    def me() -> str:
        return "me"

    client.get("/me")
    client.post("/login/alice")
    client.get("/me")
    with app.app_context():
        assert [(e["event"], e["actor"]) for e in sidelog.entries()] == [
            ("me", None),
            ("login", "alice"),
            ("me", "alice"),
        ]


class Member(flask_login.UserMixin, Base):
    __tablename__ = "ext_member"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)


def member_7_can_sign_in(
    app: Flask,
    db: SQLAlchemy,
    loaded: list[str] | None = None,
    id_attribute: str = "get_id",
) -> None:
    """Flask-Login loading ``Member`` rows from the main session (noting
    each id it loads in ``loaded``) by what ``id_attribute`` names (for
    another than ``get_id``, ``tok-<id>``); member 7 stored, and
    ``POST /login`` signs it in."""
    app.secret_key = "test"
    login_manager = flask_login.LoginManager(app)
    login_manager.id_attribute = id_attribute

    @login_manager.user_loader
    def load(user_id: str) -> Member | None:
        if loaded is not None:
            loaded.append(user_id)
        return db.session.get(Member, int(user_id.removeprefix("tok-")))

    with app.app_context():
        db.session.add(Member(id=7))
        db.session.commit()

    @app.post("/login")
    def login() -> str:
        flask_login.login_user(db.session.get(Member, 7))
        return "in"


def member_7_opens_a_taken_account(
    app: Flask,
    db: SQLAlchemy,
    sidelog: SideLog,
    reads_user: bool,
    id_attribute: str = "get_id",
) -> None:
    """Member 7 signs in, then asks an audited view (which reads
    ``current_user`` first if ``reads_user``) to open an account whose
    unique name is taken: its commit fails."""
    member_7_can_sign_in(app, db, id_attribute=id_attribute)
    with app.app_context():
        db.session.add(Account(name="taken"))
        db.session.commit()

    @app.post("/accounts")
    @sidelog.audit("account.open")
    def open_account() -> str:
        if reads_user:
            assert flask_login.current_user.is_authenticated
        db.session.add(Account(name="taken"))
        db.session.commit()  # a unique name: IntegrityError
        return "opened"

    client = app.test_client()
    client.post("/login")
    with pytest.raises(sa.exc.IntegrityError):
        client.post("/accounts")


def test_flask_login_actor_of_a_request_whose_commit_failed(
    app: Flask, db: SQLAlchemy, sidelog: SideLog
) -> None:
    """The user is a model the failed session can no longer load when the
    view ends: the actor is still the signed-in user."""
    member_7_opens_a_taken_account(app, db, sidelog, reads_user=True)
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["actor"]) == ("error", "7")


def test_flask_login_actor_never_loaded_before_the_commit_failed(
    app: Flask, db: SQLAlchemy, sidelog: SideLog
) -> None:
    """The view never reads ``current_user``, so the user loader's query
    first runs when the failed session can no longer answer it: the user id
    Flask-Login keeps in the session stands in, on the request's entry and
    on its tracked change."""
    sidelog.track(Account)
    member_7_opens_a_taken_account(app, db, sidelog, reads_user=False)
    with app.app_context():
        found = sidelog.entries()
    attempt = [(e["event"], e["main_tx"], e["actor"]) for e in found if e["request_id"]]
    assert sorted(attempt) == [
        ("account.insert", "rolled_back", "7"),
        ("account.open", "rolled_back", "7"),
    ]


def test_a_user_loader_that_fails_on_its_own_names_no_one(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a main session refused after a failed commit makes the Flask
    session's user id stand in: the loader's own error is logged, whole,
    and the entry names no one (that user may be gone)."""
    member_7_can_sign_in(app, db)

    @app.post("/accounts")
    @sidelog.audit("account.open")
    def open_account() -> str:
        return "opened"

    client = app.test_client()
    client.post("/login")

    def gone(user_id: str) -> Member:
        raise LookupError(f"no member {user_id}")

    app.login_manager.user_loader(gone)  # type: ignore[attr-defined]
    assert client.post("/accounts").status_code == 200
    with app.app_context():
        (entry,) = sidelog.entries()
    assert entry["actor"] is None
    assert "The flask-sidelog actor loader raised." in caplog.text
    assert "LookupError: no member 7" in caplog.text


def test_a_session_token_in_place_of_the_id_is_never_the_actor(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``id_attribute`` set, Flask-Login keeps another value in the
    session (a session token): it is not the user's id, and no log's to keep."""
    monkeypatch.setattr(
        Member, "get_session_token", lambda self: f"tok-{self.id}", raising=False
    )
    member_7_opens_a_taken_account(
        app, db, sidelog, reads_user=False, id_attribute="get_session_token"
    )
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["actor"]) == ("error", None)


def test_a_view_that_begins_its_own_transaction(
    app: Flask, db: SQLAlchemy, sidelog: SideLog
) -> None:
    """Nothing of flask-sidelog's touches the main session before the view,
    so a view may begin the transaction itself, signed in or not."""
    member_7_can_sign_in(app, db)

    @app.post("/accounts")
    @sidelog.audit("account.open")
    def open_account() -> str:
        with db.session.begin():
            db.session.add(Account(name="new"))
        return "opened"

    client = app.test_client()
    client.post("/login")
    assert client.post("/accounts").status_code == 200
    with app.app_context():
        (entry,) = sidelog.entries()
    assert (entry["outcome"], entry["main_tx"], entry["actor"]) == (
        "success",
        "committed",
        "7",
    )


def test_entry_written_signal(app: Flask, sidelog: SideLog) -> None:
    seen: list[dict[str, t.Any]] = []

    def record(sender: Flask, entry: dict[str, t.Any]) -> None:
        seen.append(entry)

    with entry_written.connected_to(record, app), app.app_context():
        written = sidelog.log("signalled")
    assert seen == [written]


def test_raising_signal_receiver_breaks_nothing(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    def explode(sender: Flask, entry: dict[str, t.Any]) -> None:
        raise RuntimeError("receiver bug")

    @app.get("/")
    @sidelog.audit
    def index() -> str:
        return "ok"

    seen: list[str] = []

    def record(sender: Flask, entry: dict[str, t.Any]) -> None:
        seen.append(entry["event"])

    # The raising receiver first: the one after it still runs.
    with (
        entry_written.connected_to(explode, app),
        entry_written.connected_to(record, app),
    ):
        assert client.get("/").status_code == 200
    with app.app_context():
        assert [e["event"] for e in sidelog.entries()] == ["index"]
    assert seen == ["index"]


def test_muted_and_async_receivers(
    app: Flask, sidelog: SideLog, caplog: pytest.LogCaptureFixture
) -> None:
    """A muted signal reaches no receiver; an async one, which the write
    path cannot await, is reported rather than left unawaited."""
    seen: list[str] = []

    def record(sender: Flask, entry: dict[str, t.Any]) -> None:
        seen.append(entry["event"])

    async def record_later(sender: Flask, entry: dict[str, t.Any]) -> None:
        seen.append("never")  # pragma: no cover

    class Recorder:
        async def __call__(self, sender: Flask, entry: dict[str, t.Any]) -> None:
            seen.append("never")  # pragma: no cover

    recorder = Recorder()
    with entry_written.connected_to(record, app), app.app_context():
        with entry_written.muted():
            sidelog.log("muted")
        with (
            entry_written.connected_to(record_later, app),
            entry_written.connected_to(recorder, app),
        ):
            sidelog.log("heard")
    assert seen == ["heard"]
    reported = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert reported == ["an async receiver; connect a plain function"] * 2


class AuditBase(sa_orm.DeclarativeBase):
    pass


class Note(AuditBase):
    __tablename__ = "audit_note"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    text: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(50))


def test_log_session_commits_and_rolls_back(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient, backend: str
) -> None:
    @app.post("/")
    def view() -> str:
        db.session.add(Account(name="main"))
        if backend != "sqlite_file":  # see the test below
            db.session.flush()
        with sidelog.log_session() as s:
            AuditBase.metadata.create_all(s.connection())
            s.add(Note(text="kept"))
        with pytest.raises(ZeroDivisionError), sidelog.log_session() as s:
            s.add(Note(text="dropped"))
            s.flush()
            raise ZeroDivisionError
        db.session.flush()
        db.session.rollback()
        return "ok"

    client.post("/")
    with app.app_context():
        with sidelog.log_session() as s:
            assert s.scalars(sa.select(Note.text)).all() == ["kept"]
        assert db.session.scalars(sa.select(Account)).all() == []


@pytest.mark.parametrize("backend", ["sqlite_file"])
def test_log_session_refuses_a_locked_sqlite_file(
    app: Flask, db: SQLAlchemy, sidelog: SideLog, client: FlaskClient
) -> None:
    """Waiting would end in "database is locked" after the busy timeout: a
    clear error at once instead, and the main work is untouched."""

    @app.post("/")
    def view() -> str:
        db.session.add(Account(name="main"))
        db.session.flush()
        with pytest.raises(RuntimeError, match="SIDELOG_DATABASE_URI"):  # noqa: SIM117
            with sidelog.log_session():
                pass
        db.session.commit()
        return "ok"

    assert client.post("/").status_code == 200
    with app.app_context():
        assert db.session.scalars(sa.select(Account.name)).all() == ["main"]


def test_cli_init_is_idempotent(app: Flask, runner: FlaskCliRunner) -> None:
    first = runner.invoke(args=["sidelog", "init"])
    second = runner.invoke(args=["sidelog", "init"])
    assert first.exit_code == second.exit_code == 0
    assert first.output.startswith("Created sidelog_entries in ")
    assert second.output.startswith("sidelog_entries in ")
    assert second.output.rstrip().endswith("already exists.")
    with app.app_context():
        log_engine = app.extensions["sidelog"].writer.engine
        assert sa.inspect(log_engine).has_table("sidelog_entries")


@pytest.mark.parametrize(
    ("call", "error", "said"),
    [
        (
            lambda s: s.entries(since="2024-01-01"),
            TypeError,
            "since must be a datetime",
        ),
        (lambda s: s.entries(until=date(2024, 1, 1)), TypeError, "until must be"),
        (lambda s: s.entries(limit="5"), TypeError, "limit must be a whole number"),
        (lambda s: s.entries(limit=True), TypeError, "limit must be a whole number"),
        (lambda s: list(s.iter_entries(since=1)), TypeError, "since must be"),
        (lambda s: s.stats(until="now"), TypeError, "until must be"),
        (lambda s: s.prune("1d"), TypeError, "before must be a datetime"),
        (lambda s: s.prune(None), TypeError, "before must be a datetime"),
        (lambda s: s.prune(NOW, batch_size="9"), TypeError, "batch_size must be"),
        (lambda s: s.verify(from_seq="5"), TypeError, "from_seq must be a whole"),
        (lambda s: s.verify(from_seq=0), ValueError, "from_seq must be 1 or more"),
        (lambda s: s.verify(expect_head=5), TypeError, "expect_head must be"),
    ],
)
def test_api_arguments_of_the_wrong_kind(
    app: Flask,
    sidelog: SideLog,
    call: t.Callable[[SideLog], t.Any],
    error: type[Exception],
    said: str,
) -> None:
    """A clear error naming the argument and what it takes, before any query."""
    with app.app_context(), pytest.raises(error, match=said):
        call(sidelog)
