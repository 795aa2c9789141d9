"""Argument types shared by the benchmark scripts: a wrong value is an
argparse error that says what is accepted, not a traceback halfway through
a run (an empty median, a division by zero, a results folder of nothing)."""

from __future__ import annotations

import argparse
import math
import typing as t


def positive(kind: type[int] | type[float]) -> t.Callable[[str], t.Any]:
    """An argparse ``type`` taking a number of ``kind`` above 0."""

    def parse(text: str) -> t.Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > 0 and math.isfinite(value)):
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"takes {what} above 0; got {text!r}")
        return value

    return parse


def postgres_url(text: str) -> str:
    """An argparse ``type`` taking a SQLAlchemy URL of a PostgreSQL server."""
    # Imported here: run.py parses its arguments before it has made sure
    # that the interpreter has SQLAlchemy.
    import sqlalchemy as sa

    try:
        backend = sa.make_url(text).get_backend_name()
    except sa.exc.ArgumentError:
        backend = None
    if backend != "postgresql":
        raise argparse.ArgumentTypeError(
            "takes a PostgreSQL URL such as"
            f" postgresql+psycopg://user:password@localhost/postgres; got {text!r}"
        )
    return text
