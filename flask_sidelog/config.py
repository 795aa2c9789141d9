"""The ``SIDELOG_*`` configuration keys, their defaults and their checks.

Every key is read once, by ``init_app``; the documentation lists each one.
"""

from __future__ import annotations

import dataclasses
import typing as t

import sqlalchemy as sa
from flask import Flask

DEFAULT_REDACT_KEYS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "authorization",
    "cookie",
)

WRITE_MODES = ("sync", "group", "buffered")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``SIDELOG_*`` configuration of one app, read once by ``init_app``."""

    database_uri: str | sa.URL | None
    bind_key: str | None
    table: str
    create_table: bool | None
    redact_keys: frozenset[str]
    engine_options: dict[str, t.Any]
    main_database_uri: str | sa.URL | None
    write_timeout: float
    write_mode: str
    batch_size: int
    #: ``SIDELOG_FLUSH_INTERVAL`` in seconds (the key is in milliseconds).
    flush_interval: float

    @classmethod
    def from_app(cls, app: Flask) -> Settings:
        c = app.config
        c.setdefault("SIDELOG_DATABASE_URI", None)
        c.setdefault("SIDELOG_BIND_KEY", None)
        c.setdefault("SIDELOG_TABLE", "sidelog_entries")
        c.setdefault("SIDELOG_CREATE_TABLE", None)
        c.setdefault("SIDELOG_REDACT_KEYS", DEFAULT_REDACT_KEYS)
        c.setdefault("SIDELOG_ENGINE_OPTIONS", {})
        c.setdefault("SIDELOG_MAIN_DATABASE_URI", None)
        c.setdefault("SIDELOG_WRITE_TIMEOUT", 5.0)
        c.setdefault("SIDELOG_WRITE_MODE", "group")
        c.setdefault("SIDELOG_BATCH_SIZE", 100)
        c.setdefault("SIDELOG_FLUSH_INTERVAL", 100)
        mode = c["SIDELOG_WRITE_MODE"]
        if mode not in WRITE_MODES:
            raise ValueError(
                "SIDELOG_WRITE_MODE must be one of"
                f" {', '.join(repr(m) for m in WRITE_MODES)}; got {mode!r}."
            )
        batch_size = c["SIDELOG_BATCH_SIZE"]
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(
                "SIDELOG_BATCH_SIZE must be a whole number of entries, 1 or more;"
                f" got {batch_size!r}."
            )
        interval = c["SIDELOG_FLUSH_INTERVAL"]
        if not _positive_number(interval):
            raise ValueError(
                "SIDELOG_FLUSH_INTERVAL must be a number of milliseconds above 0;"
                f" got {interval!r}."
            )
        timeout = c["SIDELOG_WRITE_TIMEOUT"]
        if not _positive_number(timeout):
            raise ValueError(
                "SIDELOG_WRITE_TIMEOUT must be a number of seconds above 0,"
                f" got {timeout!r}."
            )
        return cls(
            database_uri=c["SIDELOG_DATABASE_URI"],
            bind_key=c["SIDELOG_BIND_KEY"],
            table=c["SIDELOG_TABLE"],
            create_table=c["SIDELOG_CREATE_TABLE"],
            redact_keys=frozenset(k.lower() for k in c["SIDELOG_REDACT_KEYS"]),
            engine_options=dict(c["SIDELOG_ENGINE_OPTIONS"]),
            main_database_uri=c["SIDELOG_MAIN_DATABASE_URI"]
            or c.get("SQLALCHEMY_DATABASE_URI"),
            write_timeout=float(timeout),
            write_mode=mode,
            batch_size=batch_size,
            flush_interval=interval / 1000,
        )


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 < value < float("inf")
    )
