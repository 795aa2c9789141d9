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
    chain: bool
    chain_key: bytes | None

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
        # Off until its cost in the group and buffered modes is measured at
        # most 10% (docs/tamper-evidence.rst, "Cost").
        c.setdefault("SIDELOG_CHAIN", False)
        c.setdefault("SIDELOG_CHAIN_KEY", None)
        timeout = c["SIDELOG_WRITE_TIMEOUT"]
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(
                "SIDELOG_WRITE_TIMEOUT must be a number of seconds above 0,"
                f" got {timeout!r}."
            )
        if not isinstance(c["SIDELOG_CHAIN"], bool):
            raise ValueError(
                f"SIDELOG_CHAIN must be True or False, got {c['SIDELOG_CHAIN']!r}."
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
            chain=c["SIDELOG_CHAIN"],
            chain_key=_chain_key(c["SIDELOG_CHAIN_KEY"]),
        )


def _chain_key(key: object) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes):
        raise ValueError(
            "SIDELOG_CHAIN_KEY must be None or a secret str or bytes (e.g."
            f" secrets.token_hex(32)), got {type(key).__name__}."
        )
    if len(key) < 16:
        raise ValueError(
            "SIDELOG_CHAIN_KEY must be at least 16 bytes long (e.g."
            f" secrets.token_hex(32)); this one has {len(key)}."
        )
    return key
