"""The write path: every entry reaches the log database through :class:`Writer`.

An entry is committed in a transaction of the log engine, never of the main
session, so it is kept whatever happens to the request's own work.
"""

from __future__ import annotations

import contextlib
import threading
import typing as t

import sqlalchemy as sa

from . import batching
from .engine import is_sqlite
from .signals import entry_failed
from .signals import entry_written

if t.TYPE_CHECKING:
    from flask import Flask


class SideLogWriteError(Exception):
    """An entry could not be committed to the log database."""


class Writer:
    """Commits entries to ``table`` through ``engine``, one transaction a batch.

    :param app: the app whose logger and signals report writes.
    :param create_table: create the table (if missing) before the first write.
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
        mode: str = "sync",
        batch_size: int = 100,
        flush_interval: float = 0.1,
    ) -> None:
        self.app = app
        self.engine = engine
        self.table = table
        self._create_table = create_table
        # Built once; inline: no RETURNING of the new ids, nothing reads them.
        self._insert = table.insert().inline()
        self.lock = self._new_lock()
        self._batcher = batching.make_batcher(self, mode, batch_size, flush_interval)

    def _new_lock(self) -> t.ContextManager[t.Any]:
        # SQLite has one writer per file and a memory database has one
        # connection: writers of this process take turns instead of waiting on
        # SQLite's busy timeout (or interleaving on the shared connection).
        if is_sqlite(self.engine.url):
            return threading.RLock()
        return contextlib.nullcontext()

    def after_fork(self) -> None:
        """In a forked child: drop the lock and pooled connections inherited
        from the parent (the parent keeps using them) and start the write
        mode afresh."""
        self.lock = self._new_lock()
        self.engine.dispose(close=False)
        if self._batcher is not None:
            self._batcher.after_fork()

    def insert(self, entries: list[dict[str, t.Any]]) -> None:
        """Insert ``entries`` in one transaction and commit it, or raise."""
        with self.lock:
            if self._create_table:
                self.table.create(self.engine, checkfirst=True)
                self._create_table = False
            with self.engine.begin() as conn:
                conn.execute(self._insert, entries)

    def write(self, entries: list[dict[str, t.Any]]) -> bool:
        """Commit ``entries`` as the write mode says; report the result.

        :return: whether the entries were committed; ``True`` for buffered
            entries, which are committed (or reported failed) later.
        """
        if self._batcher is None:
            return self.write_now(entries)
        return self._batcher.write(entries)

    def flush(self) -> None:
        """Return once every entry written before is committed or reported."""
        if self._batcher is not None:
            self._batcher.flush()

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

    def written(self, entries: list[dict[str, t.Any]]) -> None:
        """Report ``entries`` that were committed."""
        for entry in entries:
            self._send(entry_written, entry=entry)

    def failed(self, entries: list[dict[str, t.Any]], error: Exception) -> None:
        """Report ``entries`` that could not be committed."""
        self.app.logger.warning(
            "flask-sidelog could not write %d entr%s (%s): %s",
            len(entries),
            "y" if len(entries) == 1 else "ies",
            ", ".join(e["event"] for e in entries[:5]),
            error,
        )
        for entry in entries:
            self._send(entry_failed, entry=entry, error=error)

    def _send(self, signal: t.Any, **kwargs: t.Any) -> None:
        try:
            signal.send(self.app, **kwargs)
        except Exception:  # a receiver must not break the write path
            self.app.logger.exception("A flask-sidelog signal receiver raised.")
