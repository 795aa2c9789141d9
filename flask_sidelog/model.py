"""The entries table.

The table has no foreign keys to application tables on purpose: a log row that
referenced a row the request's main transaction holds locked would wait on its
own request, and no database can see that deadlock.
"""

from __future__ import annotations

import sqlalchemy as sa

#: Lengths of the bounded text columns. Longer values are cut and end with
#: :data:`flask_sidelog.entry.TRUNCATION_MARK`; a too long event name is an error.
EVENT_MAX = 200
COLUMN_LIMITS: dict[str, int] = {
    "actor": 255,
    "method": 16,
    "path": 2048,
    "endpoint": 255,
    "remote_addr": 64,
    "user_agent": 512,
    "request_id": 128,
    "error": 2048,
}

# SQLite only autoincrements an INTEGER PRIMARY KEY, not a BIGINT one.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def make_entries_table(name: str, metadata: sa.MetaData | None = None) -> sa.Table:
    """Describe the entries table called ``name`` in its own metadata, with its
    checkpoints table (:func:`make_checkpoints_table`), created along with it."""
    metadata = metadata if metadata is not None else sa.MetaData()
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(EVENT_MAX), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(COLUMN_LIMITS["actor"])),
        sa.Column("outcome", sa.String(16)),
        sa.Column("status_code", sa.Integer),
        sa.Column("main_tx", sa.String(16)),
        sa.Column("method", sa.String(COLUMN_LIMITS["method"])),
        sa.Column("path", sa.String(COLUMN_LIMITS["path"])),
        sa.Column("endpoint", sa.String(COLUMN_LIMITS["endpoint"])),
        sa.Column("remote_addr", sa.String(COLUMN_LIMITS["remote_addr"])),
        sa.Column("user_agent", sa.String(COLUMN_LIMITS["user_agent"])),
        sa.Column("request_id", sa.String(COLUMN_LIMITS["request_id"])),
        sa.Column("duration_ms", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("data", sa.JSON),
        # The hash chain (flask_sidelog.chain); NULL when SIDELOG_CHAIN is off.
        sa.Column("seq", sa.BigInteger, unique=True),
        sa.Column("hash", sa.String(64)),
        # Newest-first reads filter on one column and a time range; these
        # indexes serve "WHERE x = ? AND created_at >= ? ORDER BY created_at DESC".
        sa.Index(f"ix_{name}_created_at", "created_at"),
        sa.Index(f"ix_{name}_event", "event", "created_at"),
        sa.Index(f"ix_{name}_request_id", "request_id"),
    )
    # Entries without an actor (anonymous requests) or an outcome (log() and
    # change entries) are never looked up by it: they stay out of its index,
    # which a write then need not update. A query for a value still uses it.
    # The same goes for the level index and the bulk of entries, at "info"
    # (a query for it reads the newest entries, nearly all at "info"); a
    # query for another level says so (see query.entry_filters).
    c = table.c
    for column, indexed in (
        (c.actor, c.actor.is_not(None)),
        (c.outcome, c.outcome.is_not(None)),
        (c.level, level_not_info(table)),
    ):
        sa.Index(
            f"ix_{name}_{column.name}",
            column,
            c.created_at,
            sqlite_where=indexed,
            postgresql_where=indexed,
        )
    checkpoints = make_checkpoints_table(name, metadata)

    # Creating the entries table alone (first write, init) creates the
    # checkpoints table too, so pruning never finds it missing; create_all
    # on the metadata creates both itself. On PostgreSQL the chain's append
    # function comes with the table.
    @sa.event.listens_for(table, "after_create")
    def _create_companions(
        target: sa.Table, connection: sa.Connection, **kw: object
    ) -> None:
        from .chain import create_append_function  # chain imports this module

        if not kw.get("_is_metadata_operation"):
            checkpoints.create(connection, checkfirst=True)
        create_append_function(connection, target)

    return table


def level_not_info(table: sa.Table) -> sa.ColumnElement[bool]:
    """The condition of the level index, as queries must state it for the
    database to use the index: with the text inline, not a parameter."""
    return table.c.level != sa.literal_column("'info'")


def make_checkpoints_table(entries_name: str, metadata: sa.MetaData) -> sa.Table:
    """Describe ``<entries_name>_checkpoints``: one row per prune, holding the
    chain position and hash of the last entry it deleted."""
    return sa.Table(
        f"{entries_name}_checkpoints",
        metadata,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("pruned", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seal", sa.String(64), nullable=False),
    )


#: The names of the stored fields, in table order.
FIELDS: tuple[str, ...] = tuple(c.name for c in make_entries_table("_").columns)
#: The longest table name (in bytes) whose index names PostgreSQL takes (63).
TABLE_NAME_MAX = 64 - max(len(str(ix.name)) for ix in make_entries_table("_").indexes)
