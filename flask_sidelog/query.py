"""Reading entries back: the filters that :meth:`SideLog.entries` and the CLI share."""

from __future__ import annotations

import typing as t
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa

from .entry import clean_text


def entry_filters(
    table: sa.Table,
    *,
    event: str | None = None,
    actor: str | None = None,
    outcome: str | None = None,
    request_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[sa.ColumnElement[bool]]:
    """WHERE clauses for the given filters, all bound parameters."""
    c = table.c
    clauses: list[sa.ColumnElement[bool]] = []
    for column, value in (
        (c.event, event),
        (c.actor, actor),
        (c.outcome, outcome),
        (c.request_id, request_id),
    ):
        if value is not None:
            # Stored text went through clean_text: compare like with like,
            # and never send NUL or a lone surrogate to the database.
            clauses.append(column == clean_text(value))
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
