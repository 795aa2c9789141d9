"""The ``SIDELOG_*`` configuration keys, their defaults and their checks.

Every key is read once, by ``init_app``; the documentation lists each one.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import os
import re
import typing as t

import sqlalchemy as sa
from flask import Flask

from .engine import create_log_engine
from .engine import resolve_url
from .entry import normalise_key
from .model import TABLE_NAME_MAX

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
#: The longest write timeout and flush interval taken, in seconds: a day.
#: Far longer ones overflow the clocks of locks and drivers, and every
#: write would fail.
LONGEST_WAIT = 86_400

# An HTTP header name is a "token" (RFC 9110, section 5.6.2).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


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
    def from_app(cls, app: Flask, has_db: bool = True) -> Settings:
        """Read and check the ``SIDELOG_*`` keys of ``app``, with their
        defaults set in its config; ``has_db``: a Flask-SQLAlchemy ``db``
        was passed to ``init_app``, whose binds ``SIDELOG_BIND_KEY`` names."""
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
        if not _positive_number(interval, LONGEST_WAIT * 1000):
            raise ValueError(
                "SIDELOG_FLUSH_INTERVAL must be a number of milliseconds above 0"
                f" and at most {LONGEST_WAIT * 1000:,} (a day); got {interval!r}."
            )
        timeout = c["SIDELOG_WRITE_TIMEOUT"]
        if not _positive_number(timeout, LONGEST_WAIT):
            raise ValueError(
                "SIDELOG_WRITE_TIMEOUT must be a number of seconds above 0 and"
                f" at most {LONGEST_WAIT:,} (a day), got {timeout!r}."
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
        spool_file = (
            os.fspath(spool_path)
            if isinstance(spool_path, (str, os.PathLike))
            else None
        )
        # A path that ends in a slash, "." or ".." names a folder, even one
        # not made yet; no system call takes a path with a NUL in it.
        if (
            not isinstance(spool_file, str)
            or "\x00" in spool_file
            or os.path.basename(spool_file) in ("", ".", "..")
            or os.path.isdir(os.path.join(app.instance_path, spool_file))
        ):
            raise ValueError(
                "SIDELOG_SPOOL_PATH must be a file path, not a folder nor one"
                " ending in a slash, with no NUL character (relative ones are"
                f" in the instance folder), got {spool_path!r}."
            )
        blocking = _file_on_the_way(os.path.join(app.instance_path, spool_file))
        if blocking is not None:
            raise ValueError(
                f"SIDELOG_SPOOL_PATH must be a path whose folders can exist, got"
                f" {spool_path!r}: {blocking} is not a folder."
            )
        if not isinstance(c["SIDELOG_CHAIN"], bool):
            raise ValueError(
                f"SIDELOG_CHAIN must be True or False, got {c['SIDELOG_CHAIN']!r}."
            )
        create = c["SIDELOG_CREATE_TABLE"]
        if create is not None and not isinstance(create, bool):
            raise ValueError(
                "SIDELOG_CREATE_TABLE must be True, False or None (yes on SQLite"
                f" only), got {create!r}."
            )
        database_uri = _database_uri(c, "SIDELOG_DATABASE_URI")
        bind_key = _bind_key(c, has_db)
        main_uri = _database_uri(c, "SIDELOG_MAIN_DATABASE_URI")
        if main_uri is None:
            main_uri = c.get("SQLALCHEMY_DATABASE_URI")
        log_uri: str | sa.URL | None
        if database_uri is not None:
            log_uri = database_uri
        elif bind_key is not None:
            log_uri = _bind_url(c["SQLALCHEMY_BINDS"][bind_key])
        else:
            log_uri = main_uri
        table = _table_name(c["SIDELOG_TABLE"], log_uri)
        options = _engine_options(c["SIDELOG_ENGINE_OPTIONS"])
        if options:
            _check_engine_options(log_uri, app.instance_path, float(timeout), options)
        return cls(
            database_uri=database_uri,
            bind_key=bind_key,
            table=table,
            create_table=create,
            redact_keys=_redact_keys(c["SIDELOG_REDACT_KEYS"]),
            engine_options=options,
            main_database_uri=main_uri,
            write_timeout=float(timeout),
            on_write_error=on_error,
            spool_path=os.path.join(app.instance_path, spool_file),
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
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name.strip()):
        raise ValueError(
            f"{key} must be None or an HTTP header name such as"
            f' "X-Request-ID" (ASCII letters, digits and !#$%&\'*+-.^_`|~),'
            f" got {name!r}."
        )
    return name.strip()


def _redact_keys(keys: object) -> frozenset[str]:
    # A str is iterable too: letter by letter, it would redact nearly every key.
    words = (
        None
        if isinstance(keys, (str, bytes))
        or not isinstance(keys, collections.abc.Iterable)
        else list(keys)  # read once: a generator has nothing left after a check
    )
    if words is None or not all(isinstance(k, str) and normalise_key(k) for k in words):
        raise ValueError(
            "SIDELOG_REDACT_KEYS must be a list or tuple of words, such as"
            f' ("password", "token"), got {keys!r}.'
        )
    return frozenset(map(normalise_key, words))


def _table_name(name: object, log_uri: str | sa.URL | None) -> str:
    """A table name; on PostgreSQL, short enough for its index names, which
    it takes up to 63 bytes."""
    postgres = False
    with contextlib.suppress(Exception):  # a URL that is checked elsewhere
        postgres = (
            sa.make_url(t.cast(t.Any, log_uri)).get_backend_name() == "postgresql"
        )
    if (
        not isinstance(name, str)
        or not name
        or (postgres and len(name.encode("utf-8")) > TABLE_NAME_MAX)
    ):
        limit = f" of at most {TABLE_NAME_MAX} bytes on PostgreSQL" if postgres else ""
        raise ValueError(
            f"SIDELOG_TABLE must be a non-empty table name{limit}, got {name!r}."
        )
    return name


def _database_uri(config: t.Mapping[str, t.Any], key: str) -> str | sa.URL | None:
    uri = config[key]
    if uri is None or isinstance(uri, sa.URL):
        return uri
    try:
        if not isinstance(uri, str):
            raise TypeError(type(uri).__name__)
        # make_url reads the port as a number; the driver loads when first used.
        sa.make_url(uri).get_dialect()
    except Exception:
        raise ValueError(
            f"{key} must be None or a SQLAlchemy database URL such as"
            f' "sqlite:///audit.db" or "postgresql+psycopg://...", got {uri!r}.'
        ) from None
    return uri


def _bind_key(config: t.Mapping[str, t.Any], has_db: bool) -> str | None:
    key = config["SIDELOG_BIND_KEY"]
    if key is None or config["SIDELOG_DATABASE_URI"] is not None:
        return None  # SIDELOG_DATABASE_URI wins over it
    if not has_db:
        raise ValueError(
            "SIDELOG_BIND_KEY names a Flask-SQLAlchemy bind: pass the db to"
            " init_app(app, db), or set SIDELOG_DATABASE_URI instead."
        )
    binds = config.get("SQLALCHEMY_BINDS") or {}
    try:
        known = key in binds
    except TypeError:  # unhashable, such as a list: no key of a dict
        known = False
    if not known:
        names = ", ".join(repr(k) for k in binds if k is not None) or "none"
        raise ValueError(
            "SIDELOG_BIND_KEY must be a key of SQLALCHEMY_BINDS"
            f" ({names}), got {key!r}."
        )
    return t.cast(str, key)


def _bind_url(bind: t.Any) -> str | sa.URL | None:
    """The URL of a ``SQLALCHEMY_BINDS`` value: a URL, or a dict of engine
    options with one under ``"url"``, as Flask-SQLAlchemy takes them."""
    url = bind.get("url") if isinstance(bind, t.Mapping) else bind
    return url if isinstance(url, (str, sa.URL)) else None


def _engine_options(options: object) -> dict[str, t.Any]:
    if (
        not isinstance(options, t.Mapping)
        or not all(isinstance(k, str) for k in options)
        or not isinstance(options.get("connect_args", {}), t.Mapping)
    ):
        raise ValueError(
            "SIDELOG_ENGINE_OPTIONS must be a dict of create_engine() keyword"
            ' arguments, such as {"pool_size": 5} (connect_args a dict too),'
            f" got {options!r}."
        )
    return dict(options)


def _check_engine_options(
    uri: str | sa.URL | None,
    instance_path: str,
    timeout: float,
    options: dict[str, t.Any],
) -> None:
    """Make, and drop, an engine with ``options``: it connects only when
    used, and an option that create_engine does not take would fail every
    write."""
    if uri is None:  # no main database yet: the first write says so
        return
    try:
        url = resolve_url(uri, instance_path)
    except ValueError:  # not a SIDELOG_* URL (those are checked): not ours
        return
    try:
        create_log_engine(url, timeout, options).dispose()
    except ImportError:  # a driver not installed: the first write says so
        return
    except Exception as e:  # create_engine() fails on a bad value in any way
        refused = [
            f"{name!r}: {value!r}"
            for name, value in options.items()
            if not _takes(url, timeout, {name: value})
        ]
        which = f"; it refused {refused[0]}" if len(refused) == 1 else ""
        raise ValueError(
            "SIDELOG_ENGINE_OPTIONS must be keyword arguments that"
            " sqlalchemy.create_engine() takes for this database, with values"
            f" it accepts{which} ({type(e).__name__}: {e})"
        ) from None


def _takes(url: sa.URL, timeout: float, options: dict[str, t.Any]) -> bool:
    """Whether create_engine() takes ``options``, for naming the option of
    several that it refuses."""
    try:
        create_log_engine(url, timeout, options).dispose()
    except Exception:
        return False
    return True


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


def _file_on_the_way(path: str) -> str | None:
    """The nearest existing folder of ``path``'s, if it is not a folder (a
    file there keeps the spool's folder from being made)."""
    folder = os.path.dirname(path)
    while folder and not os.path.lexists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return folder if folder and not os.path.isdir(folder) else None


def _positive_number(value: object, most: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 < value <= most
    )
