"""The write path: every entry reaches the log database through :class:`Writer`.

An entry is committed in a transaction of the log engine, never of the main
session, so it is kept whatever happens to the request's own work.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import json
import operator
import threading
import time
import typing as t

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite

from . import batching
from . import context
from .chain import append_function_sql
from .chain import create_append_function
from .chain import has_append_function
from .engine import driver_error
from .engine import is_sqlite
from .engine import refused_for_content
from .engine import without_parameters
from .entry import canonical_json
from .model import FIELDS
from .signals import entry_failed
from .signals import entry_written
from .spool import Spool

if t.TYPE_CHECKING:
    from flask import Flask

    from .chain import Chain


#: Batches of up to this many rows go to PostgreSQL as one INSERT bound in
#: the client and sent with its COMMIT; larger ones by COPY, which converts
#: rows in C, then a COMMIT (two round trips more).
FEW_ROWS = 4
#: Batches of up to this many rows go to PostgreSQL's append function, when
#: the chain has one: one round trip. Larger ones take the round trips of
#: FEW_ROWS and COPY, which then cost less than the function's work per row.
SERVER_LINKED_ROWS = 32
#: SQLite takes a run of rows with the same columns by multi-row INSERTs of
#: MULTI_ROWS rows, then of halves of that down to MULTI_ROWS_MIN, and the
#: rest by executemany, which steps and resets its statement for each row.
#: Measured here, the 1,000 change entries of a flush took 5.3 ms, not 6.6.
#: With fewer rows a statement the gain shrinks (at 16 rows, slower than
#: executemany), and each size is one more statement to compile. Few sizes
#: keep them compiled in the sqlite3 module's cache: compiling a new
#: statement of 1,000 rows takes longer than running it.
MULTI_ROWS = 256
MULTI_ROWS_MIN = 64
#: Sent with the chain's lock: the chain relies on each statement reading
#: what was committed before it, whatever the server's default isolation.
_BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED; "


def _insert_run(conn: sa.Connection, insert: str, run: list[tuple[t.Any, ...]]) -> None:
    """Insert ``run``, rows of the same columns, by ``insert`` (up to its
    ``VALUES``): on SQLite as many rows as can be by multi-row INSERTs of
    :data:`MULTI_ROWS_MIN` to :data:`MULTI_ROWS` rows, the rest (or all,
    elsewhere) by executemany."""
    width = len(run[0])
    start = 0
    size = _multi_rows(conn, width)
    while size >= MULTI_ROWS_MIN and len(run) - start >= MULTI_ROWS_MIN:
        if len(run) - start < size:
            size //= 2
            continue
        try:
            conn.exec_driver_sql(
                insert + _values_list(width, size),
                tuple(itertools.chain.from_iterable(run[start : start + size])),
            )
        except sa.exc.StatementError as error:
            # Reported (logged, raised) with one row's placeholders, not 256.
            error.statement = f"{insert}{_values_list(width, 1)}, ... ({size} rows)"
            raise
        start += size
    if start < len(run):
        conn.exec_driver_sql(
            insert + _values_list(width, 1), run[start:] if start else run
        )


def _multi_rows(conn: sa.Connection, width: int) -> int:
    """How many rows of ``width`` values one multi-row INSERT on ``conn``
    takes: the largest power of two up to :data:`MULTI_ROWS` within SQLite's
    limit of parameters; 0 where rows go by executemany only."""
    if conn.dialect.name != "sqlite":
        return 0
    driver = conn.connection.driver_connection
    try:  # Python 3.11+: the connection's own limit
        most = driver.getlimit(_SQLITE_LIMIT_VARIABLE_NUMBER)  # type: ignore[union-attr]
    except Exception:
        # The default: 32,766 since SQLite 3.32, 999 before. (A connection
        # that cannot answer fails its INSERT next, as SQLAlchemy reports.)
        version = getattr(conn.dialect.loaded_dbapi, "sqlite_version_info", (0,))
        most = 32766 if version >= (3, 32) else 999
    size = MULTI_ROWS
    while size * width > most:
        size //= 2
    return size


#: sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER (named there since Python 3.11).
_SQLITE_LIMIT_VARIABLE_NUMBER = 9


@functools.lru_cache(maxsize=64)
def _values_list(width: int, rows: int) -> str:
    """``(?, ?), (?, ?)``: the VALUES of ``rows`` rows of ``width`` values."""
    return ", ".join([f"({', '.join('?' * width)})"] * rows)


def _not_null(row: t.Sequence[t.Any]) -> tuple[bool, ...]:
    """Which of a row's values are not None."""
    return tuple(map(operator.is_not, row, itertools.repeat(None)))


def _client_cursor(driver: t.Any) -> t.Any:
    import psycopg  # only reached with psycopg, an optional dependency

    return psycopg.ClientCursor(driver)


def _leave_autocommit(conn: sa.Connection, driver: t.Any, autocommit: bool) -> None:
    """Roll back what an error left open, and set autocommit back to what it
    was, so that the connection goes back to the pool as it came; if that
    fails (a lost connection), the pool replaces it."""
    import psycopg

    try:
        if driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            driver.execute("ROLLBACK")
        driver.autocommit = autocommit
    except Exception:
        if not conn.invalidated:
            conn.invalidate()


_UNSET = object()
#: The columns whose values differ between the linked rows of a run.
_OWN = ("uuid", "data", "seq", "hash")
#: Rows to insert, in groups that hold values for the same columns: the
#: index of each column, then the rows' values for them.
_Groups = list[tuple[tuple[int, ...], list[tuple[t.Any, ...]]]]
#: Where a row given to the append function, its tail then the values of
#: the stored fields after id, holds created_at: where FIELDS, from id, does.
_AT = FIELDS.index("created_at")
_rows_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class SideLogWriteError(Exception):
    """An entry could not be committed to the log database.

    Raised when ``SIDELOG_ON_WRITE_ERROR`` is ``"raise"``; the entries that
    were not written are in :attr:`entries`, and the database's error is the
    ``__cause__``.
    """

    def __init__(
        self, message: str, entries: list[dict[str, t.Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.entries = entries or []


#: Set while failures must be spooled even in "raise" mode: in a teardown,
#: which must never raise.
_spool_only: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sidelog_spool_only", default=False
)


class spool_on_error:  # noqa: N801 - used like a function: with spool_on_error():
    """Within this block, entries that cannot be written are spooled, never
    raised, whatever ``SIDELOG_ON_WRITE_ERROR`` says."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _spool_only.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _spool_only.reset(self._token)


class TimedLock:
    """A re-entrant lock whose wait is bounded, like SQLite's busy timeout:
    a writer queued behind a long :meth:`SideLog.log_session` fails (and
    spools) instead of hanging its request."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.RLock()

    def acquire(self) -> bool:
        """Take the lock if it comes free within the timeout; say whether."""
        return self._lock.acquire(timeout=self.timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        if not self.acquire():
            raise TimeoutError(
                f"Waited {self.timeout} s for another flask-sidelog writer of this"
                " process, itself waiting for the database (a lock that another"
                " process or a long log_session() holds); raise"
                " SIDELOG_WRITE_TIMEOUT, or keep log_session() short."
            )

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class NotSent(Exception):
    """Why an entry was not sent: a write of its app context failed a moment
    ago without an answer from the log database (see :meth:`Writer.write`)."""


class Reporter:
    """Reports entries as written or failed: signals, the app's log, the spool.

    :param app: the app whose logger and signals report writes.
    :param on_error: ``"spool"`` or ``"raise"``, what :meth:`failed` does.
    :param spool: where failed entries are kept.
    """

    def __init__(self, app: Flask, on_error: str, spool: Spool) -> None:
        self.app = app
        self.on_error = on_error
        self.spool = spool

    def written(self, entries: list[dict[str, t.Any]]) -> None:
        """Report ``entries`` that were committed."""
        if not entry_written.receivers:  # most apps connect none: skip the loop
            return
        for entry in entries:
            self._send(entry_written, entry=entry)

    def failed(self, entries: list[dict[str, t.Any]], error: Exception) -> None:
        """The error path for ``entries`` that could not be committed.

        Logs a warning and sends ``entry_failed``. Then, in "spool" mode (and
        within :func:`spool_on_error`), appends the entries to the spool; in
        "raise" mode raises :class:`SideLogWriteError`, spooling nothing.
        """
        must_raise = self.on_error == "raise" and not _spool_only.get()
        kept = "not kept" if must_raise else f"kept in {self.spool.path}"
        if not must_raise:
            try:
                self.spool.append(entries)
            except Exception as spool_error:
                # The last place left is the app's log: put the whole entries there.
                kept = f"NOT spooled ({spool_error}); the entries were: {entries!r}"
        self.app.logger.warning(
            "flask-sidelog could not write %d entr%s (%s), %s: %s",
            len(entries),
            "y" if len(entries) == 1 else "ies",
            ", ".join(e["event"] for e in entries[:5]),
            kept,
            error,
        )
        for entry in entries:
            self._send(entry_failed, entry=entry, error=error)
        if must_raise:
            raise SideLogWriteError(
                f"flask-sidelog could not write {len(entries)} entries: {error}",
                entries,
            ) from error

    def _send(self, signal: t.Any, **kwargs: t.Any) -> None:
        # One by one: a receiver that raises must not break the write path,
        # nor keep the receivers after it (an alert) from running.
        if getattr(signal, "is_muted", False):
            return
        for receiver in signal.receivers_for(self.app):
            try:
                result = receiver(self.app, **kwargs)
                if inspect.isawaitable(result):  # what nothing here would await
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError("an async receiver; connect a plain function")
            except Exception:
                self.app.logger.exception("A flask-sidelog signal receiver raised.")


class Unavailable(Reporter):
    """Stands in for the :class:`Writer` of an app whose log engine cannot be
    made (a driver that is not installed, a URL the dialect refuses): every
    entry takes the error path, and the request goes on.

    :param error: why the engine could not be made.
    """

    def __init__(self, app: Flask, on_error: str, spool: Spool, error: Exception):
        super().__init__(app, on_error, spool)
        self.error = error

    def write(
        self,
        entries: list[dict[str, t.Any]],
        ends_request: bool = False,
        state: context.ContextState | None = None,
    ) -> bool:
        """Report ``entries`` failed; see :meth:`Writer.write`."""
        self.failed(entries, self.error)
        return False

    def request_started(self) -> object:
        return None

    def request_ended(self) -> None:
        pass

    def flush(self) -> None:
        pass


class Writer(Reporter):
    """Commits entries to ``table`` through ``engine``, one transaction a batch.

    :param app: the app whose logger and signals report writes.
    :param create_table: create the table (if missing) before the first write.
    :param on_error: ``"spool"`` or ``"raise"``, what :meth:`failed` does.
    :param spool: where failed entries are kept.
    :param timeout: longest wait for :attr:`lock` (``SIDELOG_WRITE_TIMEOUT``).
    :param chain: appends the entries to the hash chain; None when
        ``SIDELOG_CHAIN`` is off.
    :param mode: ``SIDELOG_WRITE_MODE``: ``"sync"``, ``"group"`` or ``"buffered"``.
    :param batch_size: most entries per transaction in group and buffered mode.
    :param flush_interval: seconds a buffered entry waits at most for a batch.
    """

    def __init__(
        self,
        app: Flask,
        engine: sa.Engine,
        table: sa.Table,
        create_table: bool,
        *,
        on_error: str,
        spool: Spool,
        timeout: float,
        chain: Chain | None = None,
        mode: str = "sync",
        batch_size: int = 100,
        flush_interval: float = 0.1,
    ) -> None:
        super().__init__(app, on_error, spool)
        self.engine = engine
        self.table = table
        self.chain = chain
        self._timeout = timeout
        self._create_table = create_table
        # Built once; inline: no RETURNING of the new ids, nothing reads them.
        self._insert = table.insert().inline()
        dialect = engine.dialect
        # Batches skip SQLAlchemy's per-row parameter handling: values are
        # converted by the columns' own bind processors (so what is stored is
        # the same) and handed to the driver at once. PostgreSQL (psycopg 3)
        # takes them through COPY, a third of the CPU of a multi-row INSERT,
        # for both client and server; SQLite through multi-row INSERTs and
        # executemany (_insert_run).
        columns = [c for c in table.columns if c.name != "id"]
        self._names = [c.name for c in columns]
        self._row_values = operator.itemgetter(*self._names)
        self._data_index = self._names.index("data")
        # The chain hashes data as canonical_json, the log engine's serialiser:
        # what it encoded is stored as it is, unless SIDELOG_ENGINE_OPTIONS
        # gave the engine a json_serializer of its own.
        self._store_chain_text = (
            getattr(dialect, "_json_serializer", None) is canonical_json
        )
        self._converters = [
            (i, convert)
            for i, c in enumerate(columns)
            if (convert := c.type.dialect_impl(dialect).bind_processor(dialect))
        ]
        preparer = dialect.identifier_preparer
        names = ", ".join(preparer.quote(name) for name in self._names)
        target = f"{preparer.format_table(table)} ({names})"
        self._copy_sql: str | None = None
        self._many_sql: str | None = None
        if dialect.name == "postgresql" and dialect.driver == "psycopg":
            self._copy_sql = without_parameters(f"COPY {target} FROM STDIN", dialect)
            self._insert_sql = f"INSERT INTO {target} VALUES "
            self._row_marks = f"({', '.join(['%s'] * len(self._names))})"
        elif dialect.paramstyle == "qmark":
            self._many_sql = f"INSERT INTO {preparer.format_table(table)}"
            self._quoted = [preparer.quote(name) for name in self._names]
            # What the rows of a run share (see _linked_values).
            self._shared_names = [n for n in self._names if n not in _OWN]
            converters = {self._names[i]: convert for i, convert in self._converters}
            self._shared_converters = [
                (k, converters[name])
                for k, name in enumerate(self._shared_names)
                if name in converters
            ]
            # None where uuid, seq or hash would need converting (no such
            # type on SQLite): rows then take the per-row path (_values).
            self._quoted_linked: list[str] | None = (
                None
                if {"uuid", "seq", "hash"} & converters.keys()
                else [preparer.quote(n) for n in [*self._shared_names, *_OWN]]
            )
        #: Whether PostgreSQL links this table's entries (see
        #: _append_in_server); None until the first write asks it. Not with
        #: a json_serializer of the app's: the data stored must be the text
        #: the chain hashes.
        self._server_links: bool | None = (
            None if self._copy_sql and self._store_chain_text else False
        )
        self._table_lock = threading.Lock()
        self.lock = self._new_lock()
        self._held_for_fork: TimedLock | None = None
        self._batcher = batching.make_batcher(self, mode, batch_size, flush_interval)

    def _new_lock(self) -> t.ContextManager[t.Any]:
        # SQLite has one writer per file and a memory database has one
        # connection: writers of this process take turns instead of waiting on
        # SQLite's busy timeout (or interleaving on the shared connection).
        if is_sqlite(self.engine.url):
            return TimedLock(self._timeout)
        return contextlib.nullcontext()

    def before_fork(self) -> None:
        """Before ``fork()``: wait, up to the write timeout, until no thread of
        this process uses the SQLite log. SQLite records the locks of a
        process's connections in the process's memory; a child forked while
        one was held would inherit it, held by a connection it never uses,
        and could never write the file."""
        if isinstance(self.lock, TimedLock) and self.lock.acquire():
            self._held_for_fork = self.lock

    def after_fork_in_parent(self) -> None:
        """After ``fork()``, in the parent: let its writers go on."""
        if self._held_for_fork is not None:
            self._held_for_fork.release()
            self._held_for_fork = None

    def after_fork(self) -> None:
        """In a forked child: drop the locks and pooled connections inherited
        from the parent (the parent keeps using them) and start the write
        mode afresh."""
        self._held_for_fork = None
        self.lock = self._new_lock()
        self._table_lock = threading.Lock()
        self.engine.dispose(close=False)
        if self._batcher is not None:
            self._batcher.after_fork()

    def insert(self, entries: list[dict[str, t.Any]]) -> None:
        """Insert ``entries`` in one transaction and commit it, or raise.

        A connection the server closed (a restart) is replaced and the
        transaction tried once more, so a restart costs no entry. Should the
        first try have committed after all, the unique uuid refuses the second.
        """
        with self.lock:
            self.ensure_table()
            try:
                rows = self._insert_once(entries)
            except sa.exc.DBAPIError as error:
                if not error.connection_invalidated:
                    raise
                rows = self._insert_once(entries)
            if rows is not entries:
                for entry, row in zip(entries, rows, strict=True):
                    entry["seq"] = row["seq"]
                    entry["hash"] = row["hash"]

    def _insert_once(self, entries: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
        if (
            self._server_links is None
            and self.chain is not None
            and self.chain.key is None
        ):
            # Asked on a connection of its own: the write's runs in autocommit.
            with self.engine.connect() as conn:
                self._server_links = has_append_function(conn, self.table)
        with self.engine.begin() as conn:
            if self._copy_sql is not None:
                return self._insert_psycopg(conn, entries)
            rows = entries
            texts = self._data_texts()
            runs: list[int] = []
            if self.chain is not None:
                rows = self.chain.link(
                    conn, self.table, entries, data_texts=texts, runs=runs
                )
            if len(rows) > 1 and self._many_sql is not None:
                # Runs of three rows or more on average (a flush's changes):
                # measured, at two a run's own work costs more than it saves.
                linked = self._quoted_linked
                if linked and texts and runs and 3 * len(runs) <= len(rows):
                    columns = linked
                    groups = self._linked_values(rows, texts, runs)
                else:
                    columns = self._quoted
                    groups = self._null_groups(self._values(rows, texts))
                self._insert_groups(conn, columns, groups)
            else:
                conn.execute(self._insert, rows)
        return rows

    def _insert_psycopg(
        self, conn: sa.Connection, entries: list[dict[str, t.Any]]
    ) -> list[dict[str, t.Any]]:
        """:meth:`_insert_once` for PostgreSQL through psycopg, in as few round
        trips as can be: here each one costs more client CPU than all the rest
        of a write. psycopg is put in autocommit mode so that it sends no
        ``BEGIN`` of its own: the chain's ``BEGIN`` goes in one string with its
        lock, and up to :data:`FEW_ROWS` rows are committed in one string with
        their ``INSERT``. Without the chain a single statement needs neither;
        with an unkeyed one, up to :data:`SERVER_LINKED_ROWS` rows go to the
        database's append function (:meth:`_append_in_server`) in one."""
        driver = conn.connection.driver_connection
        sql = self._insert_sql
        assert driver is not None and self._copy_sql is not None
        # An engine configured with isolation_level="AUTOCOMMIT" keeps it.
        autocommit = driver.autocommit
        driver.autocommit = True
        try:
            rows = entries
            texts = self._data_texts()
            chain = self.chain
            if (
                chain is not None
                and chain.key is None
                and self._server_links
                and len(entries) <= SERVER_LINKED_ROWS
            ):
                rows = self._append_in_server(conn, entries, texts)
                if rows:
                    return rows
                texts = self._data_texts()
            if chain is not None:
                rows = chain.link(
                    conn, self.table, entries, begin=_BEGIN, data_texts=texts
                )
            values = self._values(rows, texts)
            end = "; COMMIT" if self.chain is not None else ""
            if len(rows) <= FEW_ROWS:
                sql = self._insert_sql + ", ".join([self._row_marks] * len(rows)) + end
                # Bound here, not by the server: a string of two statements
                # cannot have server-side parameters.
                with _client_cursor(driver) as cursor:
                    cursor.execute(sql, [v for row in values for v in row])
            else:
                self._copy(conn, values)
                if end:
                    sql = "COMMIT"
                    driver.execute(sql)
        except conn.dialect.loaded_dbapi.Error as error:
            raise driver_error(conn, error, sql) from error
        finally:
            _leave_autocommit(conn, driver, autocommit)
        return rows

    def _append_in_server(
        self,
        conn: sa.Connection,
        entries: list[dict[str, t.Any]],
        texts: list[str] | None,
    ) -> list[dict[str, t.Any]]:
        """Commit ``entries`` in one statement, one round trip, linked into
        the chain by the database's append function
        (:func:`~flask_sidelog.chain.append_function_sql`); return them as
        rows with their ``seq`` and ``hash``. Return ``[]``, having written
        nothing, if the chain has no head yet, the function is gone, or a
        value is not JSON's."""
        import psycopg

        assert self.chain is not None
        rows, tails = self.chain.prepare(entries, texts)
        given = []
        at: t.Any = None
        at_text = ""
        # All but seq and hash, the last two; created_at as text (the rows
        # of a flush share it).
        for tail, value in zip(tails, self._values(rows, texts), strict=True):
            fields = [tail, *value[:-2]]
            if fields[_AT] is not at:
                at, at_text = fields[_AT], fields[_AT].isoformat()
            fields[_AT] = at_text
            given.append(fields)
        try:
            payload = _rows_json(given)
        except (TypeError, ValueError):  # not a JSON value (NaN): the app links
            return []
        _, call, _ = append_function_sql(self.engine.dialect, self.table)
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            # In autocommit mode the statement is its own transaction. Never
            # prepared: a pooler in transaction mode (PgBouncer before 1.21)
            # loses prepared statements, and the call is quick to plan.
            linked: list[tuple[int, str]] = driver.execute(
                call, [payload], prepare=False
            ).fetchall()
        except (psycopg.errors.UndefinedFunction, psycopg.errors.InsufficientPrivilege):
            self._server_links = False  # dropped or revoked since: the app links
            return []
        except psycopg.Error as error:
            raise driver_error(conn, error, call) from error
        if not linked:
            return []
        for row, (seq, digest) in zip(rows, linked, strict=True):
            row["seq"] = seq
            row["hash"] = digest
        return rows

    def _null_groups(self, values: list[tuple[t.Any, ...]]) -> _Groups:
        """Converted rows grouped for :meth:`_insert_groups`: each run of rows
        with NULL in the same columns, without those, and the index of each
        column kept. The sqlite3 module binds None only after two failed
        lookups of an adapter, each formatting an error message: for a change
        entry's five NULL columns, more than the rest of its row costs."""
        groups = []
        start = 0
        while start < len(values):
            mask = _not_null(values[start])
            kept = tuple(itertools.compress(itertools.count(), mask))
            left_out = [i for i, k in enumerate(mask) if not k]
            # Never a single column: uuid, created_at, event and level are
            # NOT NULL, so the getter returns a tuple.
            take = operator.itemgetter(*kept)
            run = [take(values[start])]
            end = start + 1
            # A row of the run is NULL where the first is, and only there.
            # (`in` compares by ==, so a value equal to None ends the run
            # early, harmlessly; what is left out is checked by identity.)
            while end < len(values):
                row = values[end]
                taken = take(row)
                if None in taken or any(row[i] is not None for i in left_out):
                    break
                run.append(taken)
                end += 1
            groups.append((kept, run))
            start = end
        return groups

    def _insert_groups(
        self,
        conn: sa.Connection,
        columns: list[str],
        groups: _Groups,
    ) -> None:
        """Insert each group of rows, the values of ``columns`` (quoted
        names) at the indexes it gives, by :func:`_insert_run`."""
        for kept, rows in groups:
            names = ", ".join([columns[k] for k in kept])
            _insert_run(conn, f"{self._many_sql} ({names}) VALUES ", rows)

    def _linked_values(
        self, rows: list[dict[str, t.Any]], data_texts: list[str], runs: list[int]
    ) -> _Groups:
        """Rows that the chain linked, with their ``data`` as the texts it
        hashed, converted and grouped as :meth:`_null_groups` does, with the
        columns of ``_quoted_linked``: the columns the rows of a run share,
        then uuid, data, seq and hash. The values the rows of each of
        ``runs`` share (see :meth:`Chain.prepare`) are converted and checked
        for NULL once a run, not once a row."""
        own = tuple(range(len(self._shared_names), len(self._names)))
        groups: _Groups = []
        for start, end in zip(runs, [*runs[1:], len(rows)], strict=True):
            shared = list(map(rows[start].get, self._shared_names))
            for k, convert in self._shared_converters:
                shared[k] = convert(shared[k])
            # Leaving a NULL column out is quicker for SQLite than binding it.
            kept = tuple(itertools.compress(itertools.count(), _not_null(shared)))
            values = tuple(shared[k] for k in kept)
            kept += own
            if not groups or groups[-1][0] != kept:
                groups.append((kept, []))
            groups[-1][1].extend(
                (*values, row.get("uuid"), text, row["seq"], row["hash"])
                for row, text in zip(
                    rows[start:end], data_texts[start:end], strict=True
                )
            )
        return groups

    def _data_texts(self) -> list[str] | None:
        """A list for the chain to fill with the ``data`` texts it hashed,
        if they can be stored as they are."""
        return [] if self.chain is not None and self._store_chain_text else None

    def _values(
        self, rows: list[dict[str, t.Any]], data_texts: list[str] | None = None
    ) -> list[tuple[t.Any, ...]]:
        """``rows`` as the driver takes them, converted as ``conn.execute``
        would convert them; ``data`` from ``data_texts`` if given."""
        converters = self._converters
        if data_texts:
            converters = [(i, c) for i, c in converters if i != self._data_index]
        # The rows of a batch share objects (a flush's created_at): each is
        # converted once.
        last: list[tuple[t.Any, t.Any]] = [(_UNSET, None)] * len(converters)
        values = []
        # Linked rows hold every column; entries lack seq and hash.
        whole = self.chain is not None
        for n, row in enumerate(rows):
            try:
                value = list(
                    self._row_values(row) if whole else map(row.get, self._names)
                )
            except KeyError:  # not made by make_entry: a missing field is NULL
                value = list(map(row.get, self._names))
            for k, (i, convert) in enumerate(converters):
                given, converted = last[k]
                if value[i] is not given:
                    last[k] = given, converted = value[i], convert(value[i])
                value[i] = converted
            if data_texts:
                value[self._data_index] = data_texts[n]
            values.append(tuple(value))
        return values

    def _copy(self, conn: sa.Connection, values: list[tuple[t.Any, ...]]) -> None:
        """Insert rows, converted by :meth:`_values`, with COPY, raising its
        errors as ``conn.execute`` would: a lost connection is invalidated, so
        :meth:`insert` tries again on a new one."""
        assert self._copy_sql is not None
        cursor = conn.connection.cursor()
        try:
            with cursor.copy(self._copy_sql) as copy:
                for value in values:
                    copy.write_row(value)
        except conn.dialect.loaded_dbapi.Error as error:
            raise driver_error(conn, error, self._copy_sql) from error
        finally:
            cursor.close()

    def insert_missing(self, entries: list[dict[str, t.Any]]) -> int:
        """Insert those of ``entries`` whose uuid is not stored yet, in one
        transaction, or raise. Used by replay, which must never duplicate.

        :return: how many were inserted.
        """
        dialect = self.engine.dialect
        # ON CONFLICT (uuid) DO NOTHING rather than SQLite's INSERT OR IGNORE,
        # which would also silently drop a row that breaks NOT NULL.
        upsert: t.Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(
            dialect.name
        )
        with self.lock:
            self.ensure_table()
            with self.connect() as conn, conn.begin():
                # With the chain on, only entries that really land may take a
                # chain position: choose them first, then link them.
                if (
                    self.chain is None
                    and upsert is not None
                    and dialect.insert_returning
                ):
                    stmt = (
                        upsert(self.table)
                        .on_conflict_do_nothing(index_elements=["uuid"])
                        .returning(self.table.c.uuid)
                    )
                    return len(conn.execute(stmt, entries).all())
                uuid = self.table.c.uuid
                stored = set(
                    conn.scalars(
                        sa.select(uuid).where(uuid.in_([e["uuid"] for e in entries]))
                    )
                )
                missing = [e for e in entries if e["uuid"] not in stored]
                if missing:
                    rows = missing
                    if self.chain is not None:
                        rows = self.chain.link(conn, self.table, missing)
                    conn.execute(self.table.insert(), rows)
                return len(missing)

    @contextlib.contextmanager
    def connect(self) -> t.Iterator[sa.Connection]:
        """A connection of the log engine, holding :attr:`lock`. Its statements
        run in transactions even when ``SIDELOG_ENGINE_OPTIONS`` puts the
        engine in autocommit mode: on PostgreSQL a streamed read needs one,
        and so do the chain's lock and a prune's checkpoint."""
        with self.lock, self.engine.connect() as conn:
            driver: t.Any = conn.connection.driver_connection
            autocommit = conn.dialect.driver == "psycopg" and driver.autocommit
            if not autocommit:
                yield conn
                return
            # Set on psycopg itself and back: SQLAlchemy before 2.0.17 resets
            # an isolation level set on a Connection to the server's default,
            # not to the engine's AUTOCOMMIT. READ COMMITTED as the engine's
            # default would be (engine.create_log_engine).
            import psycopg

            isolation = driver.isolation_level
            driver.autocommit = False
            driver.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            try:
                yield conn
            finally:
                conn.rollback()  # what the caller left open; commits stay
                driver.isolation_level = isolation
                _leave_autocommit(conn, driver, True)

    @property
    def creates_table(self) -> bool:
        """Whether the first write creates the table if it is missing."""
        return self._create_table

    def ensure_table(self) -> None:
        """Create the table on first use when ``SIDELOG_CREATE_TABLE`` is on."""
        if not self._create_table:
            return
        # Its own lock: on PostgreSQL self.lock does not serialise anything,
        # and threads racing to CREATE TABLE would lose their first entries.
        with self._table_lock:
            if not self._create_table:
                return
            try:
                self.table.create(self.engine, checkfirst=True)
            except sa.exc.DatabaseError as error:
                # Locked, down, timed out: asking again would wait as long again.
                if isinstance(
                    error, sa.exc.OperationalError
                ) and "already exists" not in str(error.orig):
                    raise
                # Another process created it between the check and the create.
                if not sa.inspect(self.engine).has_table(self.table.name):
                    raise
            if self._server_links is None:
                # A table made before the chain's append function was.
                with self.engine.begin() as conn:
                    create_append_function(conn, self.table)
            self._create_table = False

    def write(
        self,
        entries: list[dict[str, t.Any]],
        ends_request: bool = False,
        state: context.ContextState | None = None,
    ) -> bool:
        """Commit ``entries`` as the write mode says; report the result.

        :param ends_request: the last entries of the audited request that
            started in this context (see :meth:`request_started`).
        :param state: the state of the app context they come from, if it
            is no longer the current one's (popped at teardown).
        :return: whether the entries were committed; ``True`` for buffered
            entries, which are committed (or reported failed) later.
        :raise SideLogWriteError: in "raise" mode (see :meth:`failed`).
        """
        # A request waits out the timeout once, not once per entry: for the
        # timeout's length after a write of this context failed (the
        # database down, locked or slow), its entries go the error path.
        if state is None:
            state = context.current_state(create=False)
        if state is not None and state.write_failed is not None:
            failed_at, error = state.write_failed
            ago = time.monotonic() - failed_at
            if ago < self._timeout:
                self.failed(
                    entries,
                    NotSent(
                        f"not sent: a write of this app context failed {ago:.1f} s"
                        f" ago ({error}); it waits for the log database once"
                        " per SIDELOG_WRITE_TIMEOUT"
                    ),
                )
                return False
            state.write_failed = None
        if self._batcher is None:
            return self.write_now(entries)
        return self._batcher.write(entries, ends_request)

    def request_started(self) -> object:
        """An audited request started; its entries will come (group mode
        may wait a little for them, to share a commit).

        :return: a token the request holds while it runs (or None): it counts
            as running until it ends or the token is dropped.
        """
        if self._batcher is not None:
            return self._batcher.request_started()
        return None

    def request_ended(self) -> None:
        """The audited request that started in this context is done."""
        if self._batcher is not None:
            self._batcher.request_ended()

    def flush(self) -> None:
        """Return once every entry written before is committed or reported."""
        if self._batcher is not None:
            self._batcher.flush()

    def failed(self, entries: list[dict[str, t.Any]], error: Exception) -> None:
        """:meth:`Reporter.failed`; an error that did not come from what the
        entries hold also holds back this app context's next writes (see
        :meth:`write`)."""
        if not (refused_for_content(error) or isinstance(error, NotSent)):
            state = context.current_state(create=False)
            if state is not None:
                state.write_failed = (time.monotonic(), error)
        super().failed(entries, error)

    def write_now(self, entries: list[dict[str, t.Any]]) -> bool:
        """Commit ``entries`` in this thread, now; report the result.

        :return: whether the entries were committed.
        """
        try:
            self.insert(entries)
        except Exception as error:
            self.failed(entries, error)
            return False
        self.written(entries)
        return True
