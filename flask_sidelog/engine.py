"""The log engine: a database connection pool of its own.

Sharing the main engine's pool would let the log starve the requests it is
recording (every request holds a main connection and waits for a second one),
and on ``sqlite://`` it would share the one connection Flask-SQLAlchemy uses,
so the log's commit would commit, or its close discard, the request's work.
"""

from __future__ import annotations

import os
import time
import typing as t

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from .entry import canonical_json


def is_sqlite(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite"


def is_sqlite_memory(url: sa.URL) -> bool:
    return is_sqlite(url) and url.database in (None, "", ":memory:")


def sqlite_path(url: sa.URL) -> str | None:
    """The real path of a SQLite file database, or None for anything else."""
    if not is_sqlite(url) or is_sqlite_memory(url):
        return None
    database = t.cast(str, url.database)
    if database.startswith("file:"):
        database = database[5:].split("?", 1)[0]
    return os.path.realpath(database)


def resolve_url(uri: str | sa.URL, instance_path: str) -> sa.URL:
    """Parse ``uri``; relative SQLite paths are relative to the instance folder,
    as Flask-SQLAlchemy does it."""
    url = make_url(uri)
    if is_sqlite(url) and not is_sqlite_memory(url):
        database = t.cast(str, url.database)
        is_uri = database.startswith("file:")
        path = database[5:] if is_uri else database
        if not os.path.isabs(path):
            os.makedirs(instance_path, exist_ok=True)
            path = os.path.join(instance_path, path)
            url = url.set(database=f"file:{path}" if is_uri else path)
    return url


def create_log_engine(
    url: sa.URL, timeout: float, options: t.Mapping[str, t.Any] | None = None
) -> sa.Engine:
    """Create the log engine for ``url``.

    ``timeout`` (seconds) bounds waiting for a pooled connection, connecting,
    lock waits and statements, so a log write can fail but never hang.
    ``options`` (``SIDELOG_ENGINE_OPTIONS``) are passed to
    :func:`sqlalchemy.create_engine` and win over these defaults.
    """
    # Stored canonically, data can be hashed as stored: verify is faster.
    kwargs: dict[str, t.Any] = {"json_serializer": canonical_json}
    connect_args: dict[str, t.Any] = {}
    if is_sqlite_memory(url):
        # A memory database lives in one connection: the log gets its own,
        # separate from the one Flask-SQLAlchemy shares for the main database.
        kwargs["poolclass"] = sa.pool.StaticPool
        connect_args["check_same_thread"] = False
    elif is_sqlite(url):
        kwargs["pool_timeout"] = timeout
        connect_args["timeout"] = timeout
    else:
        kwargs["pool_timeout"] = timeout
        if url.get_backend_name() == "postgresql":
            # The chain reads its head in a statement after the one that takes
            # its lock, which sees the previous holder's commit only with a
            # snapshot per statement; a server or role default of REPEATABLE
            # READ or SERIALIZABLE would make concurrent writes collide.
            kwargs["isolation_level"] = "READ COMMITTED"
            # PostgreSQL counts these in whole milliseconds and reads 0 as
            # no limit: a timeout under 1 ms must not round down to 0.
            ms = max(1, round(timeout * 1000))
            connect_args["connect_timeout"] = max(1, round(timeout))
            # libpq takes one options string, and a given one hides those of
            # the URL and of PGOPTIONS: they follow the timeouts, so that an
            # app's own -c lock_timeout=... still wins.
            extra: t.Any = url.query.get("options")
            if isinstance(extra, tuple):  # ?options=...&options=...
                extra = " ".join(extra)
            if not extra:
                extra = os.environ.get("PGOPTIONS")
            connect_args["options"] = (
                f"-c lock_timeout={ms} -c statement_timeout={ms}"
                " -c idle_in_transaction_session_timeout=" + str(max(ms, 10000))
            ) + (f" {extra}" if extra else "")
    user = dict(options or {})
    given = dict(user.pop("connect_args", {}))
    if "options" in connect_args and given.get("options"):
        given["options"] = f"{connect_args['options']} {given['options']}"
    connect_args.update(given)
    kwargs.update(user)
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_idle_connections(engine)
    return engine


#: Seconds a pooled connection may sit unused before it is pinged on checkout.
PING_AFTER = 1.0


def _ping_idle_connections(engine: sa.Engine) -> None:
    """Ping a pooled connection before use only if it sat unused for more
    than :data:`PING_AFTER` seconds.

    A restart or an idle timeout of the server closes connections that wait
    in the pool; ``pool_pre_ping`` would find them, at the cost of a round
    trip on every checkout, that is one more per entry. Connections that were
    in use a moment ago are not pinged, unless one was found dropped since
    they were: a restart drops them all, and the write's one retry must not
    get another of them.
    """
    lost_at = 0.0

    @sa.event.listens_for(engine, "invalidate")
    def invalidate(dbapi_connection: t.Any, record: t.Any, exception: t.Any) -> None:
        nonlocal lost_at
        lost_at = time.monotonic()

    @sa.event.listens_for(engine, "checkin")
    def checkin(dbapi_connection: t.Any, record: t.Any) -> None:
        record.info["sidelog_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def checkout(dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
        idle_since = record.info.pop("sidelog_idle_since", None)
        if idle_since is None or (
            time.monotonic() - idle_since < PING_AFTER and idle_since > lost_at
        ):
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            if engine.dialect.is_disconnect(
                t.cast(t.Any, error), dbapi_connection, None
            ):
                # The pool replaces the connection and checks out again.
                raise sa.exc.DisconnectionError() from error
            raise


def refused_for_content(error: BaseException) -> bool:
    """Whether the database refused a write for what it held (a value too
    long, a NOT NULL or unique constraint broken), not for being down, slow
    or locked: the same entries fail again, while others may well succeed."""
    return isinstance(error, (sa.exc.DataError, sa.exc.IntegrityError))


def driver_error(
    conn: sa.Connection, error: Exception, statement: str
) -> sa.exc.StatementError:
    """The driver's ``error``, raised by a call made past SQLAlchemy (COPY,
    two statements in one string), as SQLAlchemy raises the errors of the
    statements it runs: a :class:`~sqlalchemy.exc.DBAPIError`, with the
    connection invalidated if the server dropped it, so that callers catch
    one kind of error and the writer retries on a new connection."""
    dbapi = conn.connection.dbapi_connection
    lost = conn.dialect.is_disconnect(t.cast(t.Any, error), dbapi, None)
    if lost:
        conn.invalidate(error)
    return sa.exc.DBAPIError.instance(
        statement,
        None,
        error,
        conn.dialect.loaded_dbapi.Error,
        connection_invalidated=lost,
        dialect=conn.dialect,
    )


def without_parameters(sql: str, dialect: sa.Dialect) -> str:
    """``sql`` compiled by SQLAlchemy, made ready to be sent with no
    parameters: for drivers whose placeholders use ``%``, SQLAlchemy doubles
    the ``%`` of identifiers (a table named ``audit%log``), which only a
    statement with parameters turns back into one."""
    if dialect.paramstyle in ("format", "pyformat"):
        return sql.replace("%%", "%")
    return sql


def safe_url(url: sa.URL) -> str:
    """The URL as text with its password hidden, for messages."""
    return url.render_as_string(hide_password=True)
