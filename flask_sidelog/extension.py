"""The :class:`SideLog` extension."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
import typing as t
from datetime import datetime

import click
import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import current_app
from flask import Flask
from flask import has_request_context
from flask import request
from flask import Response
from flask import session as flask_session
from flask.globals import app_ctx
from flask.signals import appcontext_pushed
from werkzeug.exceptions import HTTPException

from . import chain
from . import context
from . import tracking
from .cli import sidelog_group
from .config import Settings
from .engine import create_log_engine
from .engine import is_sqlite
from .engine import is_sqlite_memory
from .engine import resolve_url
from .engine import sqlite_path
from .entry import as_text
from .entry import check_event
from .entry import clean_text
from .entry import make_entry
from .entry import to_storable
from .model import make_entries_table
from .query import as_utc
from .query import count_by_event_and_outcome
from .query import entry_filters
from .query import event_names
from .query import glob_matcher
from .query import GLOB_NAMES_MAX
from .query import newer_than
from .query import newest_first
from .query import oldest_first
from .query import pages
from .query import row_to_dict
from .query import stream
from .spool import ReplayResult
from .spool import Spool
from .writer import spool_on_error
from .writer import Unavailable
from .writer import Writer

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

F = t.TypeVar("F", bound=t.Callable[..., t.Any])
M = t.TypeVar("M", bound=type)

_LEVEL_OF_OUTCOME = {"success": "info", "failure": "warning", "error": "error"}


class MainSession(sa_orm.Session):
    """The main session :attr:`SideLog.session` provides when there is no
    Flask-SQLAlchemy: bound to the current app's main database."""

    def __init__(self, **kwargs: t.Any) -> None:
        # sessionmaker passes bind=None itself, so setdefault would keep it.
        if kwargs.get("bind") is None:
            kwargs["bind"] = _app_state().main_engine
        super().__init__(**kwargs)


class _AppState:
    """What ``init_app`` keeps for one app in ``app.extensions["sidelog"]``."""

    def __init__(
        self,
        extension: SideLog,
        app: Flask,
        db: SQLAlchemy | None,
        main_session: sa_orm.scoped_session[t.Any],
    ) -> None:
        self.extension = extension
        self.app = app
        self.db = db
        self.settings = Settings.from_app(app, has_db=db is not None)
        if db is None and not (
            self.settings.database_uri or self.settings.main_database_uri
        ):
            raise ValueError(
                "flask-sidelog has no database: set SIDELOG_DATABASE_URI, or"
                " SQLALCHEMY_DATABASE_URI for a main database the log shares,"
                " or pass the app's Flask-SQLAlchemy db to init_app(app, db)."
            )
        self.main_session = main_session
        self.table = make_entries_table(self.settings.table)
        self._lock = threading.Lock()
        self._main_engine: sa.Engine | None = None
        self._writer: Writer | None = None
        #: The engine through which the main session writes the log's SQLite
        #: file (its own, or a Flask-SQLAlchemy bind's), if it does.
        self.shared_engine: sa.Engine | None = None
        #: Whether entries wait for the main session to release SQLite's
        #: write lock: true when it writes the log's SQLite file.
        self.defer_while_main_writes = False
        #: See SideLog.init_app: db.init_app(app) came after it.
        self.late_db_receiver: t.Callable[..., None] | None = None

    @property
    def main_engine(self) -> sa.Engine:
        """The main database's engine (Flask-SQLAlchemy's, or SideLog's own)."""
        if self.db is not None:
            return self.db.engine
        with self._lock:
            if self._main_engine is None:
                uri = self.settings.main_database_uri
                if uri is None:
                    raise RuntimeError(
                        "No main database: set SQLALCHEMY_DATABASE_URI or"
                        " SIDELOG_MAIN_DATABASE_URI, or pass a Flask-SQLAlchemy db."
                    )
                url = resolve_url(uri, self.app.instance_path)
                options: dict[str, t.Any] = {}
                if is_sqlite_memory(url):
                    options = {
                        "poolclass": sa.pool.StaticPool,
                        "connect_args": {"check_same_thread": False},
                    }
                self._main_engine = sa.create_engine(url, **options)
            return self._main_engine

    def _has_main_database(self) -> bool:
        """Whether there is a main database; without one, the log database
        (``SIDELOG_DATABASE_URI``) serves alone."""
        return self.db is not None or self.settings.main_database_uri is not None

    def _log_url(self) -> sa.URL:
        s = self.settings
        if s.database_uri is not None:
            return resolve_url(s.database_uri, self.app.instance_path)
        if s.bind_key is not None and self.db is not None:  # see Settings
            return self.db.engines[s.bind_key].url
        return self.main_engine.url

    @property
    def writer(self) -> Writer:
        """The writer, with the log engine created on first use (in an app
        context, after Flask-SQLAlchemy made its engines)."""
        if self._writer is None:
            url = self._log_url()
            log_path = sqlite_path(url)
            # Every engine the main session may write through (a model of a
            # bind writes that bind's file), the default one first: of two on
            # the log's file, it is the one a plain session.connection() uses.
            try:
                main_engines = [self.main_engine] if self._has_main_database() else []
            except Exception:
                # A main URL its dialect refuses: not the log's matter when
                # the log has a URL of its own (the app sees it itself).
                main_engines = []
            if self.db is not None:
                main_engines += [
                    e for e in self.db.engines.values() if e is not self.main_engine
                ]
            shared = [
                e
                for e in main_engines
                if log_path is not None and sqlite_path(e.url) == log_path
            ]
            engine = create_log_engine(
                url, self.settings.write_timeout, self.settings.engine_options
            )
            create = self.settings.create_table
            if create is None:
                create = url.get_backend_name() == "sqlite"
            with self._lock:
                if self._writer is None:
                    if shared:
                        self.shared_engine = shared[0]
                        self.defer_while_main_writes = True
                    key = self.settings.chain_key
                    self._writer = Writer(
                        self.app,
                        engine,
                        self.table,
                        create,
                        on_error=self.settings.on_write_error,
                        spool=Spool(self.settings.spool_path),
                        timeout=self.settings.write_timeout,
                        chain=chain.Chain(key) if self.settings.chain else None,
                        mode=self.settings.write_mode,
                        batch_size=self.settings.batch_size,
                        flush_interval=self.settings.flush_interval,
                    )
                else:
                    engine.dispose()
        return self._writer

    @property
    def sink(self) -> Writer | Unavailable:
        """Where entries go: the :attr:`writer`; or, while the log engine
        cannot be made, a stand-in that sends them the error path (spool or
        raise), so that a request never fails for it. Each write tries again."""
        if self._writer is not None:
            return self._writer
        try:
            return self.writer
        except Exception as error:
            s = self.settings
            return Unavailable(self.app, s.on_write_error, Spool(s.spool_path), error)

    def tracks_table(self, name: str) -> bool:
        """Whether rows of table ``name`` are tracked (by class, or by
        ``track_all``: see :meth:`tracking.Tracker.tracks_table`)."""
        model: t.Any = self.db.Model if self.db is not None else None
        mappers = model.registry.mappers if model is not None else ()
        return self.extension._tracker.tracks_table(name, mappers)

    @property
    def has_writer(self) -> bool:
        """Whether :attr:`writer` was made (so has anything to flush)."""
        return self._writer is not None

    def dispose(self) -> None:
        """Close the pools SideLog opened for this app."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.engine.dispose()
        if self._main_engine is not None:
            self._main_engine.dispose()


def _app_state() -> _AppState:
    ctx = context.app_context()
    if ctx is None:
        raise RuntimeError(
            "flask-sidelog needs an app context: call it in a request, a CLI"
            " command, or inside 'with app.app_context():'."
        )
    state = ctx.app.extensions.get("sidelog")
    if state is None:
        raise RuntimeError(
            "SideLog is not registered on this app: call 'sidelog.init_app(app, db)'."
        )
    return t.cast(_AppState, state)


def _ready_writer() -> Writer:
    """The writer, its table created first when ``SIDELOG_CREATE_TABLE`` says so."""
    writer = _app_state().writer
    writer.ensure_table()
    return writer


def _default_actor() -> str | None:
    """Flask-Login's current user id, when Flask-Login is in use."""
    # LoginManager.init_app sets app.login_manager; looking in the app's
    # attributes avoids raising an AttributeError on every request without it.
    ctx = context.app_context()
    if ctx is None or not has_request_context() or "login_manager" not in vars(ctx.app):
        return None
    try:
        from flask_login import current_user
        from flask_login import UserMixin
    except ImportError:
        return None
    try:
        authenticated = current_user.is_authenticated
    except sa.exc.InvalidRequestError:
        # Its user loader's query of a main session whose flush or commit
        # failed (a view that never read current_user); any other error is
        # the loader's own, and logged as such.
        user_id = _signed_in_id(ctx.app) if _main_session_failed() else None
        if user_id is None:
            raise
        current_app.logger.warning(
            "Flask-Login could not load the user from the failed main session;"
            " flask-sidelog names the user id in the Flask session instead."
        )
        return user_id
    if not authenticated:
        return None
    try:
        return t.cast("str | None", current_user.get_id())
    except Exception:
        user_id = _stored_user_id(current_user._get_current_object(), UserMixin)
        if user_id is None:
            raise
        return user_id


def _main_session_failed() -> bool:
    """Whether this context's main session is in a transaction that a failed
    flush or commit ended, which refuses every query until rolled back."""
    scoped = _app_state().main_session
    if not scoped.registry.has():
        return False
    transaction = scoped.registry().get_transaction()
    return transaction is not None and not transaction.is_active


def _signed_in_id(app: Flask) -> str | None:
    """The id that Flask-Login keeps in the Flask session for the signed-in
    user: what ``get_id()`` returned at sign-in, unless the login manager
    stores another attribute (a session token, not for a log). Unchecked:
    nothing is loaded, so nothing begins a transaction."""
    if getattr(app.login_manager, "id_attribute", "get_id") != "get_id":  # type: ignore[attr-defined]
        return None
    user_id = flask_session.get("_user_id")
    return None if user_id is None else str(user_id)


def _stored_user_id(user: object, user_mixin: t.Any) -> str | None:
    """What ``UserMixin.get_id()`` returns (``str(user.id)``) for a user
    model the failed main session can no longer load (its commit raised),
    taken from its identity key: ``id`` as stored. None unless ``user`` is
    a mapped object, with that ``get_id``, whose key is its ``id`` alone."""
    if getattr(type(user), "get_id", None) is not user_mixin.get_id:
        return None
    state: sa_orm.InstanceState[t.Any] | None = sa.inspect(user, raiseerr=False)
    identity = None if state is None else state.identity
    if state is None or identity is None or len(identity) != 1:
        return None
    mapper = state.mapper
    if mapper.get_property_by_column(mapper.primary_key[0]).key != "id":
        return None
    return str(identity[0])


class SideLog:
    """Out-of-band audit log for a Flask app.

    Entries are committed through a session and connection pool of their own,
    so they are kept when the request's main transaction is rolled back.

    :param app: the app to register on now; or call :meth:`init_app` later.
    :param db: the app's Flask-SQLAlchemy extension. Without one, SideLog
        provides the main session itself as :attr:`session`.
    """

    def __init__(self, app: Flask | None = None, db: SQLAlchemy | None = None) -> None:
        self._actor_loader: t.Callable[[], str | None] = _default_actor
        self._tracker = tracking.Tracker()
        #: The main session classes of the apps this extension serves, whose
        #: changes track() starts capturing.
        self._session_classes: set[type[sa_orm.Session]] = set()
        #: The main session for apps without Flask-SQLAlchemy: scoped to the
        #: app context and removed at its teardown.
        self.session: sa_orm.scoped_session[MainSession] = sa_orm.scoped_session(
            sa_orm.sessionmaker(class_=MainSession), scopefunc=_app_context_id
        )
        if app is not None:
            self.init_app(app, db)

    def init_app(self, app: Flask, db: SQLAlchemy | None = None) -> None:
        """Register on ``app``; ``db`` is its Flask-SQLAlchemy extension, if any.

        :raise RuntimeError: if SideLog is on ``app`` already, or ``app`` has
            another Flask-SQLAlchemy extension than ``db``.
        """
        if "sidelog" in app.extensions:
            raise RuntimeError(
                "SideLog is already registered on this app; use that instance."
            )
        registered = app.extensions.get("sqlalchemy")
        if db is not None and registered is not None and registered is not db:
            raise RuntimeError(
                "This app has another Flask-SQLAlchemy extension than the db"
                " given: pass the one its db.init_app(app) was called with."
            )
        main_session = db.session if db is not None else self.session
        app.extensions["sidelog"] = _AppState(self, app, db, main_session)
        session_class = main_session.session_factory.class_
        context.track_main_session(session_class)
        self._session_classes.add(session_class)
        if self._tracker:
            # Only then: every flush and commit would pay for the listeners.
            tracking.listen(session_class)
        app.after_request(self._after_request)
        app.teardown_appcontext(self._teardown)
        # Run last, after Flask-SQLAlchemy closed the main session: its
        # transaction's fate is known then, and on SQLite its lock is released.
        app.teardown_appcontext_funcs.remove(self._teardown)
        app.teardown_appcontext_funcs.insert(0, self._teardown)
        if db is not None:
            if registered is None:
                # db.init_app(app) comes later: its teardown is wrapped in
                # the first app context after it. The receiver is kept by
                # the app's state and connected weakly, so it goes with the
                # app even if db.init_app(app) never comes.
                receiver = _wrap_when_set_up(db)
                app.extensions["sidelog"].late_db_receiver = receiver
                appcontext_pushed.connect(receiver, app)
            else:
                _hold_session_teardown_errors(app, db)
        app.cli.add_command(sidelog_group)

    def actor_loader(self, loader: F) -> F:
        """Register ``loader()``, returning the current actor as a string or
        None. An explicit ``actor=`` wins. The default is Flask-Login's
        ``current_user.get_id()`` for an authenticated user."""
        self._actor_loader = loader
        return loader

    def track(self, model: type, *, exclude: t.Iterable[str] = ()) -> None:
        """Record every attempted change to rows of ``model``, each with
        whether the main transaction that carried it committed.

        Each flush of the main session writes one entry per changed row,
        event ``<table>.insert|update|delete``; bulk ``update()``,
        ``delete()`` and ``insert()`` statements one entry each, event
        ``<table>.bulk_update|bulk_delete|bulk_insert``. See
        :doc:`/change-history`. Works before :meth:`init_app`.

        :param model: a mapped model class; its subclasses are tracked too.
        :param exclude: column (or attribute) names whose values are never
            stored; the primary key cannot be excluded.
        :raise TypeError: if ``model`` is not mapped.
        :raise ValueError: for an unknown or primary key column in ``exclude``.

        .. versionadded:: 0.1
        """
        self._tracker.track(model, exclude)
        self._listen_for_changes()

    @t.overload
    def tracked(self, model: M, *, exclude: t.Iterable[str] = ()) -> M: ...
    @t.overload
    def tracked(
        self, model: None = None, *, exclude: t.Iterable[str] = ()
    ) -> t.Callable[[M], M]: ...
    def tracked(
        self, model: M | None = None, *, exclude: t.Iterable[str] = ()
    ) -> M | t.Callable[[M], M]:
        """Class decorator form of :meth:`track`: ``@sidelog.tracked`` or
        ``@sidelog.tracked(exclude={"password_hash"})``.

        .. versionadded:: 0.1
        """

        def decorator(cls: M) -> M:
            self.track(cls, exclude=exclude)
            return cls

        return decorator if model is None else decorator(model)

    def track_all(self, *, exclude_tables: t.Iterable[str] = ()) -> None:
        """:meth:`track` every mapped model the main session writes, except
        those whose table is named in ``exclude_tables``. A model also given
        to :meth:`track` keeps its ``exclude``.

        .. versionadded:: 0.1
        """
        self._tracker.track_all(exclude_tables)
        self._listen_for_changes()

    def _listen_for_changes(self) -> None:
        for session_class in self._session_classes:
            tracking.listen(session_class)

    def history(
        self, table: str, pk: t.Any, only: str | None = None
    ) -> list[dict[str, t.Any]]:
        """Every recorded change of one row, oldest first.

        Bulk statements are not tied to a row and are not included; read them
        with ``entries(event="<table>.bulk_update")``.

        :param table: the table name, as in the events (``"account"``).
        :param pk: the primary key: one value (``7`` or ``"7"``), a mapping
            ``{"k1": v1, "k2": v2}``, or the text ``"k1=v1,k2=v2"`` (with
            ``\\,`` for a comma within a value, ``\\\\`` for a backslash that
            ends one).
        :param only: ``"committed"`` or ``"rolled_back"`` to keep one fate.
        :raise ValueError: for an unreadable ``pk`` or an unknown ``only``.

        .. versionadded:: 0.1
        """
        return tracking.row_history(_app_state(), table, pk, only)

    def _actor(self) -> str | None:
        try:
            actor = self._actor_loader()
        except Exception:
            current_app.logger.exception("The flask-sidelog actor loader raised.")
            return None
        # Its str() is the app's code too: a user model whose __str__ reads
        # an attribute the failed main session can no longer load.
        return None if actor is None else as_text(actor)

    def log(
        self,
        event: str,
        *,
        actor: str | None = None,
        level: str = "info",
        data: t.Mapping[str, t.Any] | None = None,
    ) -> dict[str, t.Any]:
        """Write an entry now, out of band of the main session.

        In a request the entry shares the request's id. Keys of ``data`` named
        like ``SIDELOG_REDACT_KEYS`` are redacted; values JSON cannot hold are
        stored as text.

        :param event: what happened, such as ``"login.failed"``; 1 to 200 characters.
        :param actor: who did it; default: the actor loader's answer.
        :param level: ``"info"``, ``"warning"`` or ``"error"``.
        :return: the entry; written, or deferred, spooled or buffered as the
            situation and ``SIDELOG_WRITE_MODE`` say.
        :raise ValueError: for an empty or too long event or an unknown level.
        :raise RuntimeError: outside an app context.
        """
        app_state = _app_state()
        state = context.current_state(with_request=True)
        entry = make_entry(
            event,
            level=level,
            data=data,
            redact_keys=app_state.settings.redact_keys,
            actor=actor if actor is not None else self._actor(),
            request_id=state.request_id,
            request_fields=state.request_fields,
        )
        self._deliver(app_state, state, [entry])
        return entry

    def _deliver(
        self,
        app_state: _AppState,
        state: context.ContextState,
        entries: list[dict[str, t.Any]],
    ) -> None:
        writer = app_state.sink
        if state.log_session_held is not None:
            # This thread holds the SQLite log in a log_session(): writing now
            # would join (memory database) or wait for (file) that session.
            # log_session() writes these as it ends.
            state.log_session_held.extend(entries)
            return
        if app_state.defer_while_main_writes and (
            state.pending_write or _main_holds_sqlite_lock(app_state, state)
        ):
            # The main session holds SQLite's only write lock until the end of
            # its transaction; writing now would wait for ourselves until
            # "database is locked". The teardown writes these.
            state.deferred.extend(entries)
            return
        writer.write(entries, state=state)

    def audit(self, event: str | F | None = None) -> t.Any:
        """Decorate a view so that each request to it writes one entry with
        its outcome, status code and whether the main transaction committed.

        The entry is written after the request's teardown, whatever happened.
        Works on ``async def`` views too.

        :param event: the event name; default: the endpoint name.
        :raise ValueError: at decoration, for an event :meth:`log` would refuse.
        """
        if callable(event):
            return self.audit()(event)
        if event is not None:
            check_event(event)

        def decorator(view: F) -> F:
            # Decided once, as Flask's ensure_sync would decide per call.
            is_async = inspect.iscoroutinefunction(view)

            @functools.wraps(view)
            def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
                call = current_app.ensure_sync(view) if is_async else view
                state = context.current_state(
                    create=has_request_context(), with_request=True
                )
                # Not a request (called as a plain function), or an outer view
                # is audited already: only run it.
                if state is None or state.audit_event is not None:
                    return call(*args, **kwargs)
                state.audit_event = (
                    event or state.request_fields.get("endpoint") or view.__name__
                )
                state.started = time.perf_counter()
                state.running = _app_state().sink.request_started()
                try:
                    return call(*args, **kwargs)
                except BaseException as e:
                    state.exception = e
                    raise
                finally:
                    state.actor = self._actor()

            # Copied by functools.wraps to the decorators above this one: a
            # request they (or a before_request) turn away is recorded too.
            wrapper._sidelog_audit = (event,)  # type: ignore[attr-defined]
            return t.cast(F, wrapper)

        return decorator

    def annotate(self, **data: t.Any) -> None:
        """Add ``data`` keys to the current request's ``@audit`` entry.

        Outside an audited request nothing is recorded and a warning is logged.
        """
        app_state = _app_state()
        state = context.current_state()
        if state is None or state.audit_event is None:
            current_app.logger.warning(
                "sidelog.annotate() outside a view decorated with @sidelog.audit:"
                " ignored. Use sidelog.log(...) for an entry of its own."
            )
            return
        # Read now, as log() reads its data: at teardown a model passed here
        # is detached from the closed session.
        redact_keys = app_state.settings.redact_keys
        state.annotations.update(
            (key, to_storable(value, redact_keys)) for key, value in data.items()
        )

    @contextlib.contextmanager
    def log_session(self) -> t.Iterator[sa_orm.Session]:
        """A new session on the log engine: committed on exit, rolled back on
        error, closed always. It never touches the main session.

        :raise RuntimeError: when the log shares a SQLite file with the main
            session and that session has uncommitted writes: SQLite's only
            write lock is the main session's until its transaction ends.
        """
        app_state = _app_state()
        writer = app_state.writer
        state = context.current_state()
        if app_state.defer_while_main_writes and (
            state.pending_write or _main_holds_sqlite_lock(app_state, state)
        ):
            raise RuntimeError(
                "log_session() cannot write to the SQLite file the main session"
                " holds locked until its transaction ends. Open it before the main"
                " session writes, or set SIDELOG_DATABASE_URI to another file."
            )
        writer.ensure_table()
        nested = state.log_session_held is not None
        if not nested and is_sqlite(writer.engine.url):
            state.log_session_held = []
        try:
            with (
                writer.lock,
                sa_orm.Session(writer.engine) as session,
                session.begin(),
            ):
                yield session
        finally:
            held, state.log_session_held = state.log_session_held, None
            if nested:
                state.log_session_held = held
            elif held:
                self._deliver(app_state, state, held)

    def flush(self) -> None:
        """Return once every entry written before the call is committed, or
        reported through ``entry_failed``. Needed in ``"buffered"`` mode only:
        in the others each write waits for its commit.

        .. versionadded:: 0.1
        """
        _app_state().sink.flush()

    def create_table(self) -> bool:
        """Create the entries table if it is missing, with its checkpoints
        table; on PostgreSQL, also the chain's append function
        (:ref:`chain-writers`) if the table lacks it. For an entries table
        that exists, a missing checkpoints table is created too (the table
        was made before the chain); a role that may not is warned about.

        :return: whether the table was created.
        """
        writer = _app_state().writer
        with writer.connect() as conn, conn.begin():
            exists = sa.inspect(conn).has_table(writer.table.name)
            if not exists:
                writer.table.create(conn)
            elif not chain.create_checkpoints_table(conn, writer.table):
                current_app.logger.warning(
                    "flask-sidelog could not create %s_checkpoints (this role may"
                    " not create tables): prune needs it; create it as"
                    " docs/tamper-evidence.rst shows.",
                    writer.table.name,
                )
            # For a table made before the chain's append function existed.
            linked = chain.create_append_function(conn, writer.table)
        chained = writer.chain is not None and writer.chain.key is None
        if conn.dialect.name == "postgresql" and chained and not linked:
            current_app.logger.warning(
                "flask-sidelog could not create %s's append function (this role"
                " may not create functions in its schema, or use PL/pgSQL):"
                " entries are linked into the hash chain by the app, in one"
                " more round trip per write.",
                writer.table.name,
            )
        return not exists

    def verify(
        self, from_seq: int | None = None, expect_head: str | None = None
    ) -> chain.VerifyResult:
        """Walk the log's hash chain and report the first broken position.

        :param from_seq: start at this ``seq``, trusting the entry before it;
            default: the latest prune checkpoint, or the first entry.
        :param expect_head: ``SEQ:HASH`` (or ``HASH``) of a head saved
            earlier, which the chain must still contain.
        :raise ValueError: for a ``from_seq`` or ``expect_head`` that cannot
            be used; the message says what can.

        .. versionadded:: 0.1
        """
        _check_whole("from_seq", from_seq, minimum=1, optional=True)
        if expect_head is not None and not isinstance(expect_head, str):
            raise TypeError(
                "expect_head must be a head as text, SEQ:HASH or HASH, or None;"
                f" got {expect_head!r}."
            )
        state = _app_state()
        writer = state.writer
        with writer.connect() as conn:
            return chain.verify(
                conn,
                writer.table,
                key=state.settings.chain_key,
                from_seq=from_seq,
                expect_head=expect_head,
            )

    def entries(
        self,
        limit: int = 50,
        event: str | None = None,
        actor: str | None = None,
        outcome: str | None = None,
        request_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        level: str | None = None,
    ) -> list[dict[str, t.Any]]:
        """The newest ``limit`` entries that match every given filter, newest
        last. ``since`` is inclusive, ``until`` exclusive; naive times are UTC.

        :param event: an event name, or a glob such as ``"login.*"`` where
            ``*`` matches anything.
        """
        _check_whole("limit", limit, minimum=0)
        _check_times(since=since, until=until)
        # Beyond what any table holds, and what a 32-bit LIMIT parameter takes.
        limit = min(limit, 2**31 - 1)
        writer = _ready_writer()
        table = writer.table
        clauses = entry_filters(
            table,
            actor=actor,
            outcome=outcome,
            level=level,
            request_id=request_id,
            since=since,
            until=until,
        )
        with writer.connect() as conn:
            by_event = entry_filters(
                table, event=event, sqlite=is_sqlite(writer.engine.url)
            )
            queries = [newest_first(table, *clauses, *by_event)]
            if event is not None and "*" in event:
                # A time-ordered scan for a glob reads every entry in range
                # when the names it matches are rare; each name's own index
                # finds its newest entries at once.
                matches = glob_matcher(clean_text(event))
                names = [n for n in event_names(conn, table) if matches(n)]
                if len(names) <= GLOB_NAMES_MAX:
                    queries = [
                        newest_first(table, *clauses, table.c.event == name)
                        for name in names
                    ]
            found = [
                row_to_dict(row)
                for query in queries
                for row in conn.execute(query.limit(limit)).mappings()
            ]
        found.sort(key=lambda e: (e["created_at"], e["id"]))
        return found[-limit:] if limit else []

    def iter_entries(
        self,
        *,
        event: str | None = None,
        actor: str | None = None,
        outcome: str | None = None,
        level: str | None = None,
        request_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
    ) -> t.Iterator[dict[str, t.Any]]:
        """Every entry that matches the filters (as in :meth:`entries`),
        oldest first, streamed in constant memory: through a server-side
        cursor in one statement on PostgreSQL, one short query per 1,000
        entries on SQLite (so writers are not locked out meanwhile).

        Iterate it to the end or close it: until then it may hold a connection.

        :param after_id: only entries inserted after the one with this id, in
            insertion order: what ``flask sidelog show --follow`` polls for.
        """
        _check_times(since=since, until=until)
        writer = _ready_writer()
        clauses = entry_filters(
            writer.table,
            event=event,
            actor=actor,
            outcome=outcome,
            level=level,
            request_id=request_id,
            since=since,
            until=until,
            sqlite=is_sqlite(writer.engine.url),
        )
        if after_id is not None:
            query = newer_than(writer.table, after_id, *clauses)
        elif is_sqlite(writer.engine.url):
            # A read that lasts the whole export would hold SQLite's shared
            # lock and make every writer of the file, the app's too, fail
            # with "database is locked": read page by page instead.
            yield from pages(writer.connect, writer.table, clauses)
            return
        else:
            query = oldest_first(writer.table, *clauses)
        with writer.connect() as conn:
            if conn.dialect.name == "postgresql":
                # The log engine's timeouts keep writes from hanging; a long
                # read goes at its reader's pace (export | less) instead.
                conn.exec_driver_sql(
                    "SET LOCAL statement_timeout = 0;"
                    " SET LOCAL idle_in_transaction_session_timeout = 0"
                )
            yield from stream(conn, query)

    def stats(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[dict[str, t.Any]]:
        """How many entries each event had with each outcome between ``since``
        and ``until``: failures and errors first, then by count.

        :return: dicts with ``event``, ``outcome`` (None for entries written
            with :meth:`log`), ``count`` and ``last_at``.
        """
        _check_times(since=since, until=until)
        writer = _ready_writer()
        clauses = entry_filters(writer.table, since=since, until=until)
        query = count_by_event_and_outcome(writer.table).where(*clauses)
        with writer.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        for row in rows:
            row["last_at"] = as_utc(row["last_at"])
        rows.sort(
            key=lambda r: (
                r["outcome"] not in ("failure", "error"),
                -r["count"],
                r["event"],
                r["outcome"] or "",
            )
        )
        return rows

    def prune(
        self, before: datetime, *, dry_run: bool = False, batch_size: int = 5000
    ) -> int:
        """Delete the entries created before ``before``, ``batch_size`` at a
        time, each batch in a transaction of its own so that no lock is held
        for long and writers go on meanwhile.

        With :data:`~flask_sidelog.config.SIDELOG_CHAIN` on, the chain loses
        its oldest entries, and stops at the first one created at ``before``
        or later: an older entry chained after it (a replayed one) stays
        until a later prune. Each batch records a checkpoint, so
        :meth:`verify` still proves the rest. Entries outside the chain
        (written while it was off) go by age alone.

        :param dry_run: only count them.
        :return: how many entries were (or, with ``dry_run``, would be) deleted.
        :raise RuntimeError: the chain entries to delete do not verify
            (nothing is deleted: the evidence would be lost).
        """
        _check_times(before=before, optional=False)
        _check_whole("batch_size", batch_size, minimum=1)
        writer = _ready_writer()
        table = writer.table
        (older,) = entry_filters(table, until=before)
        deleted = 0
        if writer.chain is not None:
            deleted = self._prune_chain(writer, before, dry_run, batch_size)
            # Entries written while the chain was off are no part of it.
            older = sa.and_(older, table.c.seq.is_(None))
        if dry_run:
            count = sa.select(sa.func.count()).select_from(table).where(older)
            with writer.connect() as conn:
                return deleted + int(conn.scalar(count) or 0)
        batch = sa.select(table.c.id).where(older).order_by(table.c.id)
        while True:
            with writer.connect() as conn, conn.begin():
                ids = list(conn.scalars(batch.limit(batch_size)))
                if ids:
                    conn.execute(table.delete().where(table.c.id.in_(ids)))
            deleted += len(ids)
            if len(ids) < batch_size:
                return deleted

    def _prune_chain(
        self, writer: Writer, before: datetime, dry_run: bool, batch_size: int
    ) -> int:
        """Prune a chained log from its oldest entry up to the last one before
        the first entry created at ``before`` or later, recording a checkpoint
        with each batch so that ``verify`` keeps proving what is left.

        Not "every entry created before": replayed entries keep their old
        times at new positions, and deleting them would cut the chain."""
        c = writer.table.c
        (newer,) = entry_filters(writer.table, since=before)
        with writer.connect() as conn:
            first_kept = conn.scalar(sa.select(sa.func.min(c.seq)).where(newer))
            if first_kept is None:
                last = conn.scalar(sa.select(sa.func.max(c.seq)))
            else:
                last = first_kept - 1
            low = conn.scalar(sa.select(sa.func.min(c.seq)))
            if last is None or low is None or last < low:
                return 0
            if dry_run:
                count = sa.select(sa.func.count()).where(c.seq <= last)
                return int(conn.scalar(count.select_from(writer.table)) or 0)
        key = _app_state().settings.chain_key
        with writer.connect() as conn:
            checked = chain.verify(conn, writer.table, key, through=last)
        if not checked.ok:
            # Deleted, a break would leave no trace: the checkpoint after it
            # makes the rest verify.
            raise RuntimeError(
                f"The chain is broken at seq {checked.seq} ({checked.problem}:"
                f" {checked.detail}), among the entries to prune, and pruning"
                " would delete the evidence: look into it with 'flask sidelog"
                " verify' first."
            )
        deleted = 0
        while low <= last:
            upto = min(last, low + batch_size - 1)
            with writer.connect() as conn, conn.begin():
                last_hash = conn.scalar(sa.select(c.hash).where(c.seq == upto))
                if last_hash is None:
                    raise RuntimeError(
                        f"The entry at seq {upto} is missing, so the chain is"
                        " broken: run 'flask sidelog verify' before pruning."
                    )
                gone = conn.execute(writer.table.delete().where(c.seq <= upto))
                chain.record_checkpoint(
                    conn, writer.table, upto, last_hash, gone.rowcount, key
                )
            deleted += gone.rowcount
            low = upto + 1
        return deleted

    def replay(self) -> ReplayResult:
        """Move the entries of the spool (``SIDELOG_SPOOL_PATH``) into the log
        database, keeping their ``created_at``.

        Idempotent: an entry whose uuid is already stored is not inserted
        again, so replaying twice, or while the app keeps writing and spooling,
        never duplicates or loses an entry. What still fails stays in the spool.

        .. versionadded:: 0.1
        """
        writer = _app_state().writer
        return writer.spool.replay(writer.insert_missing)

    def _after_request(self, response: Response) -> Response:
        header = _app_state().settings.request_id_response_header
        state = context.current_state(
            create=header is not None, with_request=header is not None
        )
        if state is None or state.audit_event is None:
            # Routed to an audited view that did not run: a before_request
            # function or a decorator above @audit turned the request away
            # (a denied request is what an audit log must keep).
            view = current_app.view_functions.get(request.endpoint or "")
            marker = getattr(view, "_sidelog_audit", None)
            if marker is not None:
                state = context.current_state(with_request=True)
                state.audit_event = marker[0] or request.endpoint
                state.actor = self._actor()
        if state is not None:
            state.status_code = response.status_code
            if header is not None and state.request_id is not None:
                response.headers[header] = state.request_id
        return response

    def _teardown(self, exc: BaseException | None) -> None:
        # Never raise: a raising teardown would skip the ones after it. So in
        # "raise" mode too, entries written here go to the spool on failure.
        held: Exception | None = None
        try:
            with spool_on_error():
                held = self._finish_context(exc)
        except Exception:
            current_app.logger.exception("flask-sidelog failed at teardown.")
        if held is not None:
            # Flask-SQLAlchemy's, held back until the entries were written;
            # this teardown runs last, so raising skips no other.
            raise held

    def _finish_context(self, exc: BaseException | None) -> Exception | None:
        """Write this context's last entries; return the error Flask-SQLAlchemy's
        teardown held back, if any."""
        app_state = _app_state()
        if app_state.db is None and self.session.registry.has():
            self.session.remove()
        state = context.pop_state()
        if state is not None:
            self._write_last_entries(app_state, state, exc or state.teardown_error)
        if (
            (state is None or state.request is None)
            and app_state.has_writer
            and click.get_current_context(silent=True)
        ):
            # A CLI command's entries are committed before it exits, those
            # its threads logged too; requests do not wait for buffered ones.
            app_state.writer.flush()
        return None if state is None else state.teardown_error

    def _write_last_entries(
        self,
        app_state: _AppState,
        state: context.ContextState,
        exc: BaseException | None,
    ) -> None:
        """Write the entries held until the context's end: the deferred
        ones, and the ``@audit`` entry of its request."""
        audited = state.audit_event is not None
        try:
            entries = state.deferred
            if audited:
                try:
                    entries.append(self._audit_entry(app_state, state, exc))
                except Exception as error:
                    # A fault of ours: the request is still recorded, and what
                    # it logged is written.
                    current_app.logger.exception(
                        "flask-sidelog could not make the entry of this request."
                    )
                    entries.append(
                        make_entry(
                            t.cast(str, state.audit_event),
                            level="error",
                            error="flask-sidelog could not make this entry:"
                            f" {type(error).__name__}",
                            request_id=state.request_id,
                            request_fields=state.request_fields,
                        )
                    )
            if entries:
                app_state.sink.write(entries, ends_request=audited, state=state)
        finally:
            if audited:
                # A no-op once its entry ended the request; here if it failed.
                app_state.sink.request_ended()

    def _audit_entry(
        self,
        app_state: _AppState,
        state: context.ContextState,
        exc: BaseException | None,
    ) -> dict[str, t.Any]:
        """The ``@audit`` entry of the request that ends."""
        if exc is not None and (state.exception is None or exc is state.teardown_error):
            state.exception = exc
            if not isinstance(exc, HTTPException):
                # Raised past our after_request (by a later one, with
                # TESTING; by Flask-SQLAlchemy's teardown): the client got
                # no response of that status.
                state.status_code = None
        outcome, status, error = state.outcome()
        entry = make_entry(
            t.cast(str, state.audit_event),
            level=_LEVEL_OF_OUTCOME[outcome],
            data=state.annotations or None,
            redact_keys=app_state.settings.redact_keys,
            actor=state.actor,
            error=error,
            request_fields=state.request_fields,
        )
        # Storable as they are: make_entry need only check the free text.
        entry["outcome"] = outcome
        entry["status_code"] = status
        entry["main_tx"] = state.main_tx
        entry["request_id"] = state.request_id
        entry["duration_ms"] = round((time.perf_counter() - state.started) * 1000, 3)
        return entry


def _check_times(optional: bool = True, **times: object) -> None:
    """Refuse a time argument that is not a datetime, saying what is taken."""
    for name, value in times.items():
        if isinstance(value, datetime) or (optional and value is None):
            continue
        raise TypeError(
            f"{name} must be a datetime (a naive one is UTC)"
            f"{' or None' if optional else ''}, got {value!r}; parse text"
            " first, e.g. datetime.fromisoformat('2024-01-31T12:00Z')."
        )


def _check_whole(
    name: str, value: object, minimum: int, optional: bool = False
) -> None:
    """Refuse a count or position that is not a whole number >= ``minimum``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be {minimum} or more, got {value}.")


def _hold_session_teardown_errors(app: Flask, db: SQLAlchemy) -> None:
    """Wrap Flask-SQLAlchemy's teardown, which closes the main session: if
    that raises (the connection died after a flush), Flask would skip the
    teardowns after it, ours included, and the request's entry would be
    lost. The error is kept on the context state instead, and raised by our
    teardown once the entry is written."""
    funcs = app.teardown_appcontext_funcs
    for i, func in enumerate(funcs):
        if func == getattr(db, "_teardown_session", None):
            funcs[i] = functools.partial(_close_main_session, func, db)


def _wrap_when_set_up(db: SQLAlchemy) -> t.Callable[[Flask], None]:
    """A receiver of ``appcontext_pushed`` that wraps ``db``'s teardown in
    the first app context after ``db.init_app(app)``, then disconnects."""

    def receiver(app: Flask, **extra: t.Any) -> None:
        registered = app.extensions.get("sqlalchemy")
        if registered is None:
            return
        appcontext_pushed.disconnect(receiver, app)
        if registered is not db:
            # Raising here would leave the context pushed; the entries are
            # spooled meanwhile, each with Flask-SQLAlchemy's warning.
            app.logger.error(
                "flask-sidelog: this app has another Flask-SQLAlchemy extension"
                " than the db given to sidelog.init_app(app, db): pass the one"
                " its db.init_app(app) was called with."
            )
            return
        # Two first contexts at once may both get here: wrapping twice
        # wraps once (the wrapped teardown is no longer db's).
        _hold_session_teardown_errors(app, db)

    return receiver


def _close_main_session(
    teardown: t.Callable[[BaseException | None], t.Any],
    db: SQLAlchemy,
    exc: BaseException | None,
) -> None:
    try:
        teardown(exc)
    except Exception as error:
        state = context.current_state(create=False)
        if state is None:
            raise
        state.teardown_error = error
        # The session failed to close, so remove() never forgot it: a later
        # app context with the same id would be handed this broken session.
        db.session.registry.clear()


def _main_holds_sqlite_lock(app_state: _AppState, state: context.ContextState) -> bool:
    """Whether this context's main session has a SQLite write transaction
    open, however it wrote (flush, ``connection().execute``, raw SQL)."""
    scoped = app_state.main_session
    if not scoped.registry.has():
        return False
    session = scoped.registry()
    if not session.in_transaction():
        return False
    try:
        connection = session.connection()
        if connection.engine is not app_state.shared_engine:
            # The log's file is a bind's: ask the connection to that bind.
            bind = {"bind": app_state.shared_engine}
            connection = session.connection(bind_arguments=bind)
        dbapi = connection.connection.dbapi_connection
    except Exception:
        # In the session's own commit events, or after a failure, it refuses
        # connection(): ask the one its tracked changes went through (still
        # in a transaction if the session joined an outer one).
        dbapi = state.main_connection
        if dbapi is None:
            return True
    return bool(getattr(dbapi, "in_transaction", False))


def _app_context_id() -> int:
    """The scope of :attr:`SideLog.session`: the app context, as
    Flask-SQLAlchemy scopes ``db.session``."""
    return id(app_ctx._get_current_object())  # type: ignore[attr-defined]
