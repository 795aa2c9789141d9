"""Entries written straight through the writer, with chosen fields and times."""

from __future__ import annotations

import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone

from flask import Flask

from flask_sidelog.entry import make_entry

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


def add_entries(app: Flask, *entries: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    """Insert ``entries`` (``make_entry`` keyword arguments, ``event`` and
    ``created_at`` included), in one transaction; return them as built."""
    rows = [make_entry(**entry) for entry in entries]
    with app.app_context():
        app.extensions["sidelog"].writer.insert(rows)
    return rows
