"""The benchmark's variants: one Flask app per audit mechanism.

Every app has the same model (``items``: ``id``, ``name``) and the same view,
``POST /items``, which inserts one row through Flask-SQLAlchemy, commits and
answers ``201 {"status": "created"}``. Only the audit mechanism differs:

- :func:`create_baseline_app`: none (variant a).
- :func:`create_trigger_peer_app`: postgresql-audit, a PostgreSQL statement
  trigger writing ``activity`` plus a ``transaction`` row from ``before_flush``
  (variant e).
- :func:`create_sidelog_app`: flask-sidelog in one write mode (variants b, c, d).
- :func:`create_continuum_app`: SQLAlchemy-Continuum with its ``FlaskPlugin``,
  writing ``items_version`` and ``transaction`` from the unit of work (variant f).

Both peers write their history inside the request's own transaction, so a
rollback takes the history with it.

Rules for the harness:

- One variant per process. Both peers register listeners on the global
  ``Mapper``, ``Session`` and ``Engine`` classes, which would slow down (and
  version) every other app in the process, so each factory refuses to run in
  a process where another one already ran.
- One fresh PostgreSQL database per variant. Each factory creates its tables
  (and the peer's functions and triggers) when called, so call it once per
  database: serve with ``gunicorn --preload``, e.g.
  ``gunicorn --preload --chdir benchmarks "apps:create_baseline_app('postgresql+psycopg://...')"``.
  The engine is disposed after creating the tables, so forked workers open
  their own connections.

:func:`base_app`, :func:`item_model`, :func:`add_items_view` and
:func:`create_tables` are the shared pieces, for the sidelog variants to be
built the same way.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

_built_variant: str | None = None
#: The main database's pool size: run.py's gunicorn threads per worker.
MAIN_POOL_SIZE = 8


class _ItemColumns:
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(100))


def _claim_process(variant: str) -> None:
    global _built_variant
    if _built_variant is not None:
        raise RuntimeError(
            f"this process already built the {_built_variant!r} variant; audit peers"
            " install process-wide SQLAlchemy listeners, so run each variant in its"
            " own process (one gunicorn per variant)"
        )
    _built_variant = variant


def _require_postgresql(db_url: str, peer: str) -> None:
    if sa.make_url(db_url).get_backend_name() != "postgresql":
        raise ValueError(
            f"{peer} audits through PostgreSQL triggers; pass a"
            f" postgresql+psycopg:// URL, not {db_url!r}"
        )


def base_app(db_url: str) -> tuple[Flask, SQLAlchemy]:
    """Return a Flask app bound to ``db_url`` and its Flask-SQLAlchemy object."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = db_url
    # As many pooled connections as a gunicorn worker has threads, as is
    # advised for gthread workers. With Flask-SQLAlchemy's default of 5, the
    # 8 threads open and close overflow connections whenever more than 5
    # requests reach the database at once, which taxes every variant that
    # lets requests bunch up (measured: group commit 0.75x with 5, 0.82x
    # with 8, the baseline alike).
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": MAIN_POOL_SIZE}
    return app, SQLAlchemy(app)


def item_model(db: SQLAlchemy, **class_attrs: t.Any) -> type[t.Any]:
    """Declare the ``items`` model on ``db``; ``class_attrs`` carry a peer's
    markers, e.g. ``__versioned__ = {}``.
    """
    return type(
        "Item", (_ItemColumns, db.Model), {"__tablename__": "items", **class_attrs}
    )


def add_items_view(app: Flask, db: SQLAlchemy, item_cls: type[t.Any]) -> None:
    """Add ``POST /items``: insert one row, commit, answer 201."""

    @app.post("/items")
    def create_item() -> tuple[dict[str, str], int]:
        db.session.add(item_cls(name="item"))
        db.session.commit()
        return {"status": "created"}, 201


def create_tables(app: Flask, db: SQLAlchemy, first: t.Sequence[sa.Table] = ()) -> None:
    """Create all tables, ``first`` before the rest, then drop the pooled
    connections so that forked workers do not share them.
    """
    with app.app_context():
        if first:
            db.metadata.create_all(db.engine, tables=list(first))
        db.create_all()
        db.engine.dispose()


def create_baseline_app(db_url: str) -> Flask:
    """Variant a: no auditing."""
    _claim_process("baseline")
    app, db = base_app(db_url)
    item = item_model(db)
    add_items_view(app, db, item)
    create_tables(app, db)
    return app


def create_trigger_peer_app(db_url: str) -> Flask:
    """Variant e: postgresql-audit's Flask ``VersioningManager``.

    flask-audit-logger also works here, but needs a ``User`` model and installs
    its triggers only through Alembic autogenerate; postgresql-audit installs
    them on ``create_all``.
    """
    _require_postgresql(db_url, "postgresql-audit")
    _claim_process("trigger-peer")
    from postgresql_audit.flask import VersioningManager

    class AnonymousVersioningManager(VersioningManager):
        # The stock manager relates transactions to a ``User`` model and reads
        # flask_login.current_user; the benchmark has neither, so it records
        # client_addr only, as an app without logged-in users would.
        _actor_cls = None

        @property
        def default_actor_id(self) -> None:
            return None

    app, db = base_app(db_url)
    manager = AnonymousVersioningManager()
    manager.init(db.Model)
    item = item_model(db, __versioned__={})
    sa_orm.configure_mappers()
    add_items_view(app, db, item)
    # The trigger functions come with the activity table's DDL; the items
    # table's after_create hook calls them, so create these two first.
    create_tables(
        app,
        db,
        first=(manager.transaction_cls.__table__, manager.activity_cls.__table__),
    )
    return app


def create_continuum_app(db_url: str) -> Flask:
    """Variant f: SQLAlchemy-Continuum with its ``FlaskPlugin``."""
    _claim_process("continuum")
    from sqlalchemy_continuum import make_versioned
    from sqlalchemy_continuum.plugins import FlaskPlugin

    # No User model and no Flask-Login: the plugin records remote_addr only.
    make_versioned(
        user_cls=None, plugins=[FlaskPlugin(current_user_id_factory=lambda: None)]
    )
    app, db = base_app(db_url)
    item = item_model(db, __versioned__={})
    sa_orm.configure_mappers()
    add_items_view(app, db, item)
    create_tables(app, db)
    return app


def create_sidelog_app(db_url: str, mode: str) -> Flask:
    """Variants b, c, d: the same view under ``@sidelog.audit``, written in
    ``mode`` (``SIDELOG_WRITE_MODE``). The log shares the main database (the
    same SQLite file, or the same PostgreSQL database) through its own pool.
    """
    _claim_process(f"sidelog-{mode}")
    from flask_sidelog import SideLog

    app, db = base_app(db_url)
    app.config["SIDELOG_WRITE_MODE"] = mode
    sidelog = SideLog(app, db)
    item = item_model(db)
    add_items_view(app, db, item)
    app.view_functions["create_item"] = sidelog.audit("items.create")(
        app.view_functions["create_item"]
    )
    create_tables(app, db)
    with app.app_context():
        sidelog.create_table()
        app.extensions["sidelog"].dispose()
    return app
