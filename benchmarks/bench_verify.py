"""How long ``SideLog.verify()`` takes over a long chain, on SQLite and PostgreSQL.

Usage: ``python benchmarks/bench_verify.py [--rows 1000000] [--backend both]``

Builds a valid chain of ``--rows`` request-like entries in Python (the hashes
computed by :mod:`flask_sidelog.chain`, as the writer does), bulk-loads it
(SQLite: executemany in one transaction; PostgreSQL: ``COPY`` into a fresh
database of a throwaway server), then times one ``SideLog.verify()`` (the
function behind ``flask sidelog verify``) and prints rows, seconds and rows/s.
The target is under 30 s for 1,000,000 entries. The CPU time of the process
is printed too: on a loaded machine it tells what the walk itself costs.
Run from the checkout with ``PYTHONPATH=.`` or flask-sidelog installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import typing as t
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import sqlalchemy as sa
from flask import Flask

from flask_sidelog import chain
from flask_sidelog import SideLog

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _args import positive  # noqa: E402

from _postgres import ThrowawayPostgres  # noqa: E402

TABLE = "sidelog_entries"
BATCH = 20000


def chained_rows(n: int) -> t.Iterator[dict[str, t.Any]]:
    """``n`` entries shaped like ``@audit`` request entries, with valid seq
    and hash."""
    hasher = chain.make_hasher(None)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    prev = chain.GENESIS
    for seq in range(1, n + 1):
        row: dict[str, t.Any] = {
            "uuid": str(uuid.UUID(int=seq, version=4)),
            "created_at": start + timedelta(microseconds=seq * 1013),
            "event": "items.create",
            "level": "info",
            "actor": f"user-{seq % 997}",
            "outcome": "success",
            "status_code": 201,
            "main_tx": "committed",
            "method": "POST",
            "path": f"/items/{seq}",
            "endpoint": "items.create",
            "remote_addr": "127.0.0.1",
            "user_agent": "bench/1.0",
            "request_id": uuid.UUID(int=seq).hex,
            "duration_ms": seq % 1000 / 7,
            "error": None,
            "data": {"item": seq, "price": seq / 100, "tags": ["a", "b"]},
        }
        values = [row[name] for name in chain.HASHED_FIELDS]
        prev = hasher(chain.record(values, seq, prev))
        row["seq"] = seq
        row["hash"] = prev
        yield row


def make(uri: str, instance: str) -> tuple[Flask, SideLog]:
    app = Flask("bench_verify", instance_path=instance)
    app.config.update(
        SIDELOG_DATABASE_URI=uri,
        SQLALCHEMY_DATABASE_URI=uri,
        SIDELOG_WRITE_TIMEOUT=600.0,  # the bulk load is one long statement
    )
    sidelog = SideLog(app)
    with app.app_context():
        sidelog.create_table()
    return app, sidelog


def load_sqlite(app: Flask, n: int) -> None:
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        with writer.engine.begin() as conn:
            batch: list[dict[str, t.Any]] = []
            for row in chained_rows(n):
                batch.append(row)
                if len(batch) == BATCH:
                    conn.execute(writer.table.insert(), batch)
                    batch = []
            if batch:
                conn.execute(writer.table.insert(), batch)


def load_postgres(app: Flask, n: int) -> None:
    columns = [*chain.HASHED_FIELDS, "seq", "hash"]
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            copy_sql = f"COPY {TABLE} ({', '.join(columns)}) FROM STDIN"
            with cursor.copy(copy_sql) as copy:  # type: ignore[attr-defined]
                for row in chained_rows(n):
                    row["data"] = chain.canonical_json(row["data"])  # as stored
                    copy.write_row([row[c] for c in columns])
            raw.commit()
        finally:
            raw.close()


def bench(name: str, uri: str, instance: str, n: int) -> None:
    app, sidelog = make(uri, instance)
    started = time.perf_counter()
    (load_postgres if name == "postgresql" else load_sqlite)(app, n)
    loaded = time.perf_counter() - started
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
        with engine.begin() as conn:
            if name == "postgresql":
                conn.exec_driver_sql(f"ANALYZE {TABLE}")
            count = conn.scalar(sa.select(sa.func.count()).select_from(sa.table(TABLE)))
        assert count == n, (count, n)
        started, cpu = time.perf_counter(), time.process_time()
        result = sidelog.verify()
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        engine.dispose()
    assert result.ok and result.entries == n, str(result)
    print(
        f"{name:10} rows={n} load={loaded:.1f}s verify={took:.2f}s wall"
        f" ({n / took:,.0f} entries/s), {cpu:.2f}s CPU of this process"
        f" -> {result.entries} entries OK"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=positive(int), default=1_000_000, help="chain length"
    )
    parser.add_argument(
        "--backend", choices=("sqlite", "postgresql", "both"), default="both"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.backend in ("sqlite", "both"):
            bench("sqlite", f"sqlite:///{tmp}/verify.db", tmp, args.rows)
        if args.backend in ("postgresql", "both"):
            with ThrowawayPostgres() as server:
                uri = server.create_database("bench_verify")
                bench("postgresql", uri, tmp, args.rows)


if __name__ == "__main__":
    main()
