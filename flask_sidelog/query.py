"""Reading entries back: the filters and queries that :class:`SideLog` and the
CLI share. Every filter value is a bound parameter."""

from __future__ import annotations

import re
import typing as t
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa

from .entry import clean_text
from .model import level_not_info

#: Rows fetched at a time when streaming; the client holds at most this many.
STREAM_BATCH = 1000
#: ``show`` reads the newest entries of each event name a glob matches, one
#: indexed query per name, up to this many names; above, it scans by time.
GLOB_NAMES_MAX = 50


def event_clause(
    column: sa.ColumnElement[str], event: str, sqlite: bool = False
) -> sa.ColumnElement[bool]:
    """``column = event``, or a match of the glob ``event`` when it has a
    ``*``, which matches any run of characters; every other character
    matches itself, case and all: ``LIKE``, or on SQLite (``sqlite``), whose
    ``LIKE`` ignores the case of ASCII letters, ``GLOB``.
    """
    if "*" not in event:
        return column == event
    if sqlite:  # GLOB's other wildcards, ? and [...], as themselves
        pattern = event.replace("[", "[[]").replace("?", "[?]")
        return column.op("GLOB", is_comparison=True)(pattern)
    pattern = (
        event.replace("\\", "\\\\")
        .replace("%", "\\%")
        .replace("_", "\\_")
        .replace("*", "%")
    )
    return column.like(pattern, escape="\\")


def glob_matcher(glob: str) -> t.Callable[[str], bool]:
    """Whether a name matches ``glob``, where ``*`` matches anything: exactly,
    case and all, on every database."""
    pattern = re.compile(".*".join(re.escape(part) for part in glob.split("*")), re.S)
    return lambda name: pattern.fullmatch(name) is not None


def event_names(conn: sa.Connection, table: sa.Table) -> list[str]:
    """Every distinct event name, in one statement of one index seek per name
    (a loose index scan on the ``(event, created_at)`` index)."""
    c = table.c
    first = sa.select(sa.select(sa.func.min(c.event)).scalar_subquery().label("name"))
    names = first.cte("sidelog_event_names", recursive=True)
    previous = names.alias("previous")
    after = c.event > previous.c.name
    following = sa.select(sa.func.min(c.event)).where(after).scalar_subquery()
    names = names.union_all(
        sa.select(following.label("name")).where(previous.c.name.is_not(None))
    )
    return list(conn.scalars(sa.select(names.c.name).where(names.c.name.is_not(None))))


#: The events of a row change: ``<table>.insert`` and so on.
ROW_CHANGES = ("insert", "update", "delete")


def changed_tables(conn: sa.Connection, table: sa.Table) -> list[str]:
    """The tables with row changes in the log, from its event names."""
    found = set()
    for name in event_names(conn, table):
        changed, _, op = name.rpartition(".")
        if changed and op in ROW_CHANGES:
            found.add(changed)
    return sorted(found)


def recorded_keys(
    conn: sa.Connection, table: sa.Table, changed: str
) -> dict[tuple[str, ...], bool] | None:
    """The key columns the row changes of table ``changed`` record (the keys
    of their ``data["pk"]``), each with whether a value of them was text, as
    its oldest and newest change of each kind have them: six index seeks at
    most, whatever the size of the log. None if it has no row changes."""
    c = table.c
    keys: dict[tuple[str, ...], bool] = {}
    found = False
    for op in ROW_CHANGES:
        for order in (c.created_at, c.created_at.desc()):
            event = clean_text(f"{changed}.{op}")
            query = sa.select(c.data).where(c.event == event)
            rows = conn.execute(query.order_by(order).limit(1)).all()
            found = found or bool(rows)
            data = rows[0][0] if rows else None
            pk = data.get("pk") if isinstance(data, dict) else None
            if isinstance(pk, dict) and pk:
                names = tuple(str(name) for name in pk)
                # A redacted value is text too: its key's type is unknown.
                text = any(isinstance(value, str) for value in pk.values())
                keys[names] = keys.get(names, False) or text
    return keys if found else None


def entry_filters(
    table: sa.Table,
    *,
    event: str | None = None,
    actor: str | None = None,
    outcome: str | None = None,
    level: str | None = None,
    request_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    sqlite: bool = False,
) -> list[sa.ColumnElement[bool]]:
    """WHERE clauses for the given filters, all bound parameters; ``sqlite``:
    for SQLite (see :func:`event_clause`)."""
    c = table.c
    clauses: list[sa.ColumnElement[bool]] = []
    if event is not None:
        clauses.append(event_clause(c.event, clean_text(event), sqlite))
    for column, value in (
        (c.actor, actor),
        (c.outcome, outcome),
        (c.level, level),
        (c.request_id, request_id),
    ):
        if value is not None:
            # Stored text went through clean_text: compare like with like,
            # and never send NUL or a lone surrogate to the database.
            clauses.append(column == clean_text(value))
    if level is not None and level != "info":
        # The level index leaves out "info": say so, or it is not used.
        clauses.append(level_not_info(table))
    if since is not None:
        clauses.append(c.created_at >= as_utc(since))
    if until is not None:
        clauses.append(c.created_at < as_utc(until))
    return clauses


def newest_first(table: sa.Table, *clauses: sa.ColumnElement[bool]) -> sa.Select[t.Any]:
    return (
        sa.select(table)
        .where(*clauses)
        .order_by(table.c.created_at.desc(), table.c.id.desc())
    )


def oldest_first(table: sa.Table, *clauses: sa.ColumnElement[bool]) -> sa.Select[t.Any]:
    return sa.select(table).where(*clauses).order_by(table.c.created_at, table.c.id)


def newer_than(
    table: sa.Table, last_id: int, *clauses: sa.ColumnElement[bool]
) -> sa.Select[t.Any]:
    """Entries inserted after the one with id ``last_id``, in id order."""
    return sa.select(table).where(table.c.id > last_id, *clauses).order_by(table.c.id)


def stream(
    conn: sa.Connection, query: sa.Select[t.Any]
) -> t.Iterator[dict[str, t.Any]]:
    """Rows of ``query`` as dicts, :data:`STREAM_BATCH` at a time: a server-side
    cursor on PostgreSQL, SQLite's own row-by-row stepping on SQLite."""
    result = conn.execution_options(yield_per=STREAM_BATCH).execute(query)
    for row in result.mappings():
        yield row_to_dict(row)


def pages(
    connect: t.Callable[[], t.ContextManager[sa.Connection]],
    table: sa.Table,
    clauses: list[sa.ColumnElement[bool]],
) -> t.Iterator[dict[str, t.Any]]:
    """Rows of :func:`oldest_first` as dicts, one short query per
    :data:`STREAM_BATCH` rows, each continuing after the last row seen."""
    c = table.c
    query = oldest_first(table, *clauses).limit(STREAM_BATCH)
    after: sa.ColumnElement[bool] | None = None
    while True:
        page = query if after is None else query.where(after)
        with connect() as conn:
            rows = [row_to_dict(row) for row in conn.execute(page).mappings()]
        yield from rows
        if len(rows) < STREAM_BATCH:
            return
        last = rows[-1]
        after = sa.tuple_(c.created_at, c.id) > sa.tuple_(
            sa.literal(last["created_at"], c.created_at.type),
            sa.literal(last["id"], c.id.type),
        )


def count_by_event_and_outcome(table: sa.Table) -> sa.Select[t.Any]:
    c = table.c
    return sa.select(
        c.event,
        c.outcome,
        sa.func.count().label("count"),
        sa.func.max(c.created_at).label("last_at"),
    ).group_by(c.event, c.outcome)


def as_utc(value: datetime) -> datetime:
    """Aware UTC; a naive value is taken as UTC (SQLite returns naive times)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # within a day of year 1 or 9999: clamp to UTC's range
        edge = datetime.min if value.year == 1 else datetime.max
        return edge.replace(tzinfo=timezone.utc)


def row_to_dict(row: sa.RowMapping) -> dict[str, t.Any]:
    entry = dict(row)
    entry["created_at"] = as_utc(entry["created_at"])
    return entry
