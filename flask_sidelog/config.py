"""The ``SIDELOG_*`` configuration keys, their defaults and their checks.

Every key is read once, by ``init_app``; the documentation lists each one.
"""

from __future__ import annotations

import dataclasses
import os
import typing as t

import sqlalchemy as sa
from flask import Flask

from .entry import normalise_key

DEFAULT_REDACT_KEYS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "authorization",
    "cookie",
)

ON_WRITE_ERROR = ("spool", "raise")
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
    on_write_error: str
    spool_path: str
    request_id_header: str | None
    request_id_response_header: str | None
    chain: bool
    chain_key: bytes | None
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
        c.setdefault("SIDELOG_ON_WRITE_ERROR", "spool")
        c.setdefault("SIDELOG_SPOOL_PATH", None)
        c.setdefault("SIDELOG_REQUEST_ID_HEADER", None)
        c.setdefault("SIDELOG_REQUEST_ID_RESPONSE_HEADER", None)
        c.setdefault("SIDELOG_CHAIN", True)
        c.setdefault("SIDELOG_CHAIN_KEY", None)
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
        on_error = c["SIDELOG_ON_WRITE_ERROR"]
        if on_error not in ON_WRITE_ERROR:
            raise ValueError(
                f'SIDELOG_ON_WRITE_ERROR must be "spool" or "raise", got {on_error!r}.'
            )
        if on_error == "raise" and mode == "buffered":
            raise ValueError(
                'SIDELOG_ON_WRITE_ERROR="raise" needs a write mode whose caller'
                ' waits for the commit, "sync" or "group": a "buffered" entry is'
                " written after the call returned, with nobody left to raise to."
            )
        spool_path = c["SIDELOG_SPOOL_PATH"] or "sidelog-spool.jsonl"
        if not isinstance(spool_path, (str, os.PathLike)):
            raise ValueError(
                "SIDELOG_SPOOL_PATH must be a file path (relative ones are in the"
                f" instance folder), got {spool_path!r}."
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
            redact_keys=frozenset(normalise_key(k) for k in c["SIDELOG_REDACT_KEYS"]),
            engine_options=dict(c["SIDELOG_ENGINE_OPTIONS"]),
            main_database_uri=c["SIDELOG_MAIN_DATABASE_URI"]
            or c.get("SQLALCHEMY_DATABASE_URI"),
            write_timeout=float(timeout),
            on_write_error=on_error,
            spool_path=os.path.join(app.instance_path, os.fspath(spool_path)),
            request_id_header=_header_name(c, "SIDELOG_REQUEST_ID_HEADER"),
            request_id_response_header=_header_name(
                c, "SIDELOG_REQUEST_ID_RESPONSE_HEADER"
            ),
            chain=c["SIDELOG_CHAIN"],
            chain_key=_chain_key(c["SIDELOG_CHAIN_KEY"]),
            write_mode=mode,
            batch_size=batch_size,
            flush_interval=interval / 1000,
        )


def _header_name(config: t.Mapping[str, t.Any], key: str) -> str | None:
    name = config[key]
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(
            f"{key} must be None or an HTTP header name such as"
            f' "X-Request-ID", got {name!r}.'
        )
    return name.strip()


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


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 < value < float("inf")
    )
