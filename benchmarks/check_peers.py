"""Check that each peer variant records history, and loses it on rollback.

Usage: ``python benchmarks/check_peers.py postgresql+psycopg://postgres@127.0.0.1:PORT``

For each variant this creates a fresh database ``peercheck_<variant>`` on the
server (dropping an old one), builds the app in its own process, sends
``POST /items`` and counts the rows in ``items`` and in the peer's history
table; then, inside one transaction, inserts a row, counts the history, rolls
back and counts again. Prints one line per variant.
"""

from __future__ import annotations

import multiprocessing
import sys

import apps
import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy

HISTORY_TABLES = {
    "baseline": None,
    "trigger-peer": "activity",
    "continuum": "items_version",
}
FACTORIES = {
    "baseline": apps.create_baseline_app,
    "trigger-peer": apps.create_trigger_peer_app,
    "continuum": apps.create_continuum_app,
}


def _count(db: SQLAlchemy, table: str | None) -> int | None:
    if table is None:
        return None
    return int(
        db.session.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
    )


def check(variant: str, db_url: str) -> str:
    app = FACTORIES[variant](db_url)
    history = HISTORY_TABLES[variant]
    status = app.test_client().post("/items").status_code
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        item_cls = next(
            m.class_ for m in db.Model.registry.mappers if m.local_table.name == "items"
        )
        items = _count(db, "items")
        committed = _count(db, history)
        db.session.add(item_cls(name="rolled back"))
        db.session.flush()
        in_tx = _count(db, history)
        db.session.rollback()
        after = _count(db, history)
        db.session.remove()
        db.engine.dispose()
    if history is None:
        return f"{variant}: POST /items -> {status}; items={items}; no history table"
    return (
        f"{variant}: POST /items -> {status}; items={items}, {history}={committed};"
        f" rollback: {history} {in_tx} inside the transaction -> {after} after"
    )


def main(server_url: str) -> None:
    admin = sa.create_engine(
        sa.make_url(server_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for variant in FACTORIES:
            name = f"peercheck_{variant.replace('-', '_')}"
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
                conn.execute(sa.text(f"CREATE DATABASE {name}"))
            db_url = sa.make_url(server_url).set(database=name)
            print(
                pool.apply(
                    check, (variant, db_url.render_as_string(hide_password=False))
                )
            )
    admin.dispose()


if __name__ == "__main__":
    main(sys.argv[1])
