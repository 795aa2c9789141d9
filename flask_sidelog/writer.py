"""The write path: every entry reaches the log database through :class:`Writer`.

An entry is committed in a transaction of the log engine, never of the main
session, so it is kept whatever happens to the request's own work.
"""

from __future__ import annotations

import contextlib
import threading
import typing as t

import sqlalchemy as sa

from .engine import is_sqlite
from .signals import entry_failed
from .signals import entry_written

if t.TYPE_CHECKING:
    from flask import Flask

    from .chain import Chain


class SideLogWriteError(Exception):
    """An entry could not be committed to the log database."""


class Writer:
    """Commits entries to ``table`` through ``engine``, one transaction a batch.

    :param app: the app whose logger and signals report writes.
    :param create_table: create the table (if missing) before the first write.
    :param chain: appends the entries to the hash chain; None when
        ``SIDELOG_CHAIN`` is off.
    """

    def __init__(
        self,
        app: Flask,
        engine: sa.Engine,
        table: sa.Table,
        create_table: bool,
        chain: Chain | None = None,
    ) -> None:
        self.app = app
        self.chain = chain
        self.engine = engine
        self.table = table
        self._create_table = create_table
        # SQLite has one writer per file and a memory database has one
        # connection: writers of this process take turns instead of waiting on
        # SQLite's busy timeout (or interleaving on the shared connection).
        self.lock: t.ContextManager[t.Any] = (
            threading.RLock() if is_sqlite(engine.url) else contextlib.nullcontext()
        )

    def insert(self, entries: list[dict[str, t.Any]]) -> None:
        """Insert ``entries`` in one transaction and commit it, or raise."""
        with self.lock:
            if self._create_table:
                self.table.create(self.engine, checkfirst=True)
                self._create_table = False
            with self.engine.begin() as conn:
                rows = entries
                if self.chain is not None:
                    rows = self.chain.link(conn, self.table, entries)
                conn.execute(self.table.insert(), rows)
            if rows is not entries:
                for entry, row in zip(entries, rows, strict=True):
                    entry.update(seq=row["seq"], hash=row["hash"])

    def write(self, entries: list[dict[str, t.Any]]) -> bool:
        """Commit ``entries``; report the result and never raise.

        :return: whether the entries were committed.
        """
        try:
            self.insert(entries)
        except Exception as error:
            self.failed(entries, error)
            return False
        for entry in entries:
            self._send(entry_written, entry=entry)
        return True

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
