"""The :class:`SideLog` extension."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import typing as t
from datetime import datetime

import click
import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import current_app
from flask import Flask
from flask import has_app_context
from flask import has_request_context
from flask import Response

from . import context
from .config import Settings
from .engine import create_log_engine
from .engine import is_sqlite_memory
from .engine import resolve_url
from .engine import sqlite_path
from .entry import make_entry
from .model import make_entries_table
from .query import entry_filters
from .query import newest_first
from .query import row_to_dict
from .writer import Writer

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

F = t.TypeVar("F", bound=t.Callable[..., t.Any])

_LEVEL_OF_OUTCOME = {"success": "info", "failure": "warning", "error": "error"}


class MainSession(sa_orm.Session):
    """The main session :attr:`SideLog.session` provides when there is no
    Flask-SQLAlchemy: bound to the current app's main database."""

    def __init__(self, **kwargs: t.Any) -> None:
        kwargs.setdefault("bind", _app_state().main_engine)
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
        self.settings = Settings.from_app(app)
        self.main_session = main_session
        self.table = make_entries_table(self.settings.table)
        self._lock = threading.Lock()
        self._main_engine: sa.Engine | None = None
        self._writer: Writer | None = None
        #: Whether entries wait for the main session to release SQLite's
        #: write lock: true when both use the same SQLite file.
        self.defer_while_main_writes = False

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

    def _log_url(self) -> sa.URL:
        s = self.settings
        if s.database_uri is not None:
            return resolve_url(s.database_uri, self.app.instance_path)
        if s.bind_key is not None:
            if self.db is None:
                raise RuntimeError("SIDELOG_BIND_KEY needs a Flask-SQLAlchemy db.")
            return self.db.engines[s.bind_key].url
        return self.main_engine.url

    @property
    def writer(self) -> Writer:
        """The writer, with the log engine created on first use (in an app
        context, after Flask-SQLAlchemy made its engines)."""
        if self._writer is None:
            url = self._log_url()
            log_path = sqlite_path(url)
            main_path = sqlite_path(self.main_engine.url)
            engine = create_log_engine(
                url, self.settings.write_timeout, self.settings.engine_options
            )
            create = self.settings.create_table
            if create is None:
                create = url.get_backend_name() == "sqlite"
            with self._lock:
                if self._writer is None:
                    self.defer_while_main_writes = (
                        log_path is not None and log_path == main_path
                    )
                    self._writer = Writer(
                        self.app,
                        engine,
                        self.table,
                        create,
                        self.settings.write_mode,
                        self.settings.batch_size,
                        self.settings.flush_interval,
                    )
                else:
                    engine.dispose()
        return self._writer

    def dispose(self) -> None:
        """Close the pools SideLog opened for this app."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.engine.dispose()
        if self._main_engine is not None:
            self._main_engine.dispose()


def _app_state() -> _AppState:
    if not has_app_context():
        raise RuntimeError(
            "flask-sidelog needs an app context: call it in a request, a CLI"
            " command, or inside 'with app.app_context():'."
        )
    state = current_app.extensions.get("sidelog")
    if state is None:
        raise RuntimeError(
            "SideLog is not registered on this app: call 'sidelog.init_app(app, db)'."
        )
    return t.cast(_AppState, state)


def _default_actor() -> str | None:
    """Flask-Login's current user id, when Flask-Login is in use."""
    try:
        from flask_login import current_user
    except ImportError:
        return None
    if not has_request_context() or not hasattr(current_app, "login_manager"):
        return None
    if not current_user.is_authenticated:
        return None
    return t.cast("str | None", current_user.get_id())


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
        #: The main session for apps without Flask-SQLAlchemy: scoped to the
        #: app context and removed at its teardown.
        self.session: sa_orm.scoped_session[MainSession] = sa_orm.scoped_session(
            sa_orm.sessionmaker(class_=MainSession), scopefunc=_app_context_id
        )
        if app is not None:
            self.init_app(app, db)

    def init_app(self, app: Flask, db: SQLAlchemy | None = None) -> None:
        """Register on ``app``; ``db`` is its Flask-SQLAlchemy extension, if any."""
        if "sidelog" in app.extensions:
            raise RuntimeError(
                "SideLog is already registered on this app; use that instance."
            )
        main_session = db.session if db is not None else self.session
        app.extensions["sidelog"] = _AppState(self, app, db, main_session)
        context.track_main_session(main_session.session_factory.class_)
        app.after_request(self._after_request)
        app.teardown_appcontext(self._teardown)
        # Run last, after Flask-SQLAlchemy closed the main session: its
        # transaction's fate is known then, and on SQLite its lock is released.
        app.teardown_appcontext_funcs.remove(self._teardown)
        app.teardown_appcontext_funcs.insert(0, self._teardown)

        from .cli import sidelog_group

        app.cli.add_command(sidelog_group)

    def actor_loader(self, loader: F) -> F:
        """Register ``loader()``, returning the current actor as a string or
        None. An explicit ``actor=`` wins. The default is Flask-Login's
        ``current_user.get_id()`` for an authenticated user."""
        self._actor_loader = loader
        return loader

    def _actor(self) -> str | None:
        try:
            actor = self._actor_loader()
        except Exception:
            current_app.logger.exception("The flask-sidelog actor loader raised.")
            return None
        return None if actor is None else str(actor)

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
        :return: the entry as stored.
        :raise ValueError: for an empty or too long event or an unknown level.
        :raise RuntimeError: outside an app context.
        """
        app_state = _app_state()
        state = context.current_state()
        assert state is not None
        entry = make_entry(
            event,
            level=level,
            data=data,
            redact_keys=app_state.settings.redact_keys,
            actor=actor if actor is not None else self._actor(),
            request_id=state.request_id,
            **state.request_fields,
        )
        self._deliver(app_state, state, [entry])
        return entry

    def _deliver(
        self,
        app_state: _AppState,
        state: context.ContextState,
        entries: list[dict[str, t.Any]],
    ) -> None:
        writer = app_state.writer
        if app_state.defer_while_main_writes and state.pending_write:
            # The main session holds SQLite's only write lock until the end of
            # its transaction; writing now would wait for ourselves until
            # "database is locked". The teardown writes these.
            state.deferred.extend(entries)
            return
        writer.write(entries)

    def audit(self, event: str | F | None = None) -> t.Any:
        """Decorate a view so that each request to it writes one entry with
        its outcome, status code and whether the main transaction committed.

        The entry is written after the request's teardown, whatever happened.
        Works on ``async def`` views too.

        :param event: the event name; default: the endpoint name.
        """
        if callable(event):
            return self.audit()(event)

        def decorator(view: F) -> F:
            @functools.wraps(view)
            def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
                state = context.current_state()
                assert state is not None
                if state.audit_event is not None:  # an outer view is audited
                    return current_app.ensure_sync(view)(*args, **kwargs)
                from flask import request

                state.audit_event = event or request.endpoint or view.__name__
                state.started = time.perf_counter()
                try:
                    return current_app.ensure_sync(view)(*args, **kwargs)
                except BaseException as e:
                    state.exception = e
                    raise
                finally:
                    state.actor = self._actor()

            return t.cast(F, wrapper)

        return decorator

    def annotate(self, **data: t.Any) -> None:
        """Add ``data`` keys to the current request's ``@audit`` entry.

        Outside an audited request nothing is recorded and a warning is logged.
        """
        _app_state()
        state = context.current_state()
        if state is None or state.audit_event is None:
            current_app.logger.warning(
                "sidelog.annotate() outside a view decorated with @sidelog.audit:"
                " ignored. Use sidelog.log(...) for an entry of its own."
            )
            return
        state.annotations.update(data)

    @contextlib.contextmanager
    def log_session(self) -> t.Iterator[sa_orm.Session]:
        """A new session on the log engine: committed on exit, rolled back on
        error, closed always. It never touches the main session."""
        writer = _app_state().writer
        with writer.lock, sa_orm.Session(writer.engine) as session, session.begin():
            yield session

    def flush(self) -> None:
        """Return once every entry written before the call is committed, or
        reported through ``entry_failed``. Needed in ``"buffered"`` mode only:
        in the others each write waits for its commit.

        .. versionadded:: 0.1
        """
        _app_state().writer.flush()

    def create_table(self) -> bool:
        """Create the entries table if it is missing.

        :return: whether it was created.
        """
        writer = _app_state().writer
        with writer.lock, writer.engine.begin() as conn:
            exists = sa.inspect(conn).has_table(writer.table.name)
            if not exists:
                writer.table.create(conn)
        return not exists

    def entries(
        self,
        limit: int = 50,
        event: str | None = None,
        actor: str | None = None,
        outcome: str | None = None,
        request_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict[str, t.Any]]:
        """The newest ``limit`` entries that match every given filter, newest
        last. ``since`` is inclusive, ``until`` exclusive; naive times are UTC.
        """
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}.")
        writer = _app_state().writer
        clauses = entry_filters(
            writer.table,
            event=event,
            actor=actor,
            outcome=outcome,
            request_id=request_id,
            since=since,
            until=until,
        )
        with writer.lock, writer.engine.connect() as conn:
            rows = conn.execute(newest_first(writer.table, *clauses).limit(limit))
            found = [row_to_dict(row) for row in rows.mappings()]
        found.reverse()
        return found

    def _after_request(self, response: Response) -> Response:
        state = context.current_state(create=False)
        if state is not None:
            state.status_code = response.status_code
        return response

    def _teardown(self, exc: BaseException | None) -> None:
        # Never raise: a raising teardown would skip the ones after it.
        try:
            self._finish_context(exc)
        except Exception:
            current_app.logger.exception("flask-sidelog failed at teardown.")

    def _finish_context(self, exc: BaseException | None) -> None:
        app_state = t.cast(_AppState, current_app.extensions["sidelog"])
        if app_state.db is None and self.session.registry.has():
            self.session.remove()
        state = context.pop_state()
        if state is None:
            return
        entries = state.deferred
        if state.audit_event is not None:
            if state.exception is None and exc is not None:
                state.exception = exc
            outcome, status, error = state.outcome()
            entries.append(
                make_entry(
                    state.audit_event,
                    level=_LEVEL_OF_OUTCOME[outcome],
                    data=state.annotations or None,
                    redact_keys=app_state.settings.redact_keys,
                    actor=state.actor,
                    outcome=outcome,
                    status_code=status,
                    main_tx=state.main_tx,
                    request_id=state.request_id,
                    duration_ms=round((time.perf_counter() - state.started) * 1000, 3),
                    error=error,
                    **state.request_fields,
                )
            )
        if entries:
            app_state.writer.write(entries)
        if state.request_id is None and click.get_current_context(silent=True):
            # A CLI command's entries are committed before it exits; requests
            # do not wait for buffered entries.
            app_state.writer.flush()


def _app_context_id() -> int:
    from flask.globals import _cv_app

    return id(_cv_app.get(None))
