"""Tamper evidence: a hash chain over the entries.

Each entry gets a chain position ``seq`` (1, 2, 3, ... with no gaps) and a
``hash`` over its stored fields and the previous entry's hash, so changing,
deleting, inserting or reordering entries breaks the chain where it happened.
The format is documented in ``docs/tamper-evidence.rst``; :func:`record`
is its definition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import itertools
import json
import operator
import queue
import re
import threading
import typing as t
import zlib
from datetime import datetime
from datetime import timezone

import sqlalchemy as sa

from .engine import driver_error
from .engine import without_parameters
from .entry import canonical_json
from .entry import encode_canonical as _encode
from .entry import utcnow
from .query import as_utc

#: The ``prev`` of the first entry.
GENESIS = "0" * 64
#: Part of the name of the PostgreSQL function that links entries in the
#: database (:func:`append_function_sql`): a new body gets a new number.
APPEND_FUNCTION_VERSION = 1
#: The stored fields a hash covers, besides ``seq`` and the previous hash.
#: ``id`` is not among them: the database assigns it, and the chain's order
#: is ``seq``.
HASHED_FIELDS = (
    "uuid",
    "created_at",
    "event",
    "level",
    "actor",
    "outcome",
    "status_code",
    "main_tx",
    "method",
    "path",
    "endpoint",
    "remote_addr",
    "user_agent",
    "request_id",
    "duration_ms",
    "error",
    "data",
)
# pg_advisory_xact_lock(int, int): this constant, and the table name's CRC-32,
# so that two log tables in one database have chains (and locks) of their own.
_LOCK_CLASS = 0x5349_4C47  # "SILG"
# How many deleted entries a diagnosis of renumbering looks for.
_RENUMBER_SEARCH = 1000

Hasher = t.Callable[[bytes], str]


def timestamp(value: datetime) -> str:
    """``value`` as UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; naive means UTC."""
    if value.tzinfo is timezone.utc:  # as entries are made: a quicker way
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    # isoformat pads the year to 4 digits everywhere; strftime("%Y") does not.
    return value.isoformat(timespec="microseconds") + "Z"


# The escaping _encode applies to a str, without building an encoder per call.
_encode_str = json.encoder.encode_basestring_ascii


def record(values: t.Sequence[t.Any], seq: int, prev: str) -> bytes:
    """The canonical serialisation of one entry: what its hash is computed over.

    :param values: the entry's :data:`HASHED_FIELDS`, in that order, as they
        read back from the database: text as ``str``, ``created_at`` as a
        datetime, ``status_code`` as ``int``, ``duration_ms`` as ``float``,
        ``data`` as decoded JSON, NULL as None.
    :param seq: its chain position.
    :param prev: the previous entry's hash (:data:`GENESIS` for the first).
    """
    return _encode([1, seq, prev, *_fields(values)]).encode("ascii")


def _fields(values: t.Sequence[t.Any]) -> list[t.Any]:
    fields = list(values)
    fields[1] = timestamp(fields[1])
    return fields


def make_hasher(key: bytes | None) -> Hasher:
    """SHA-256 of a record, or HMAC-SHA-256 with ``key``, as 64 hex digits."""
    if key is None:
        return lambda message: hashlib.sha256(message).hexdigest()
    return lambda message: hmac.new(key, message, hashlib.sha256).hexdigest()


def _stored_tail(
    entry: dict[str, t.Any],
    previous: list[t.Any] | None = None,
    data_texts: list[str] | None = None,
) -> str:
    """An entry's hashed fields as the database will return them, encoded as
    :func:`record` encodes them after ``[1, seq, prev``: the chain covers what
    is stored, so that any reader can recompute it. A field of another type
    (a str subclass, a status code as text or float) is set in ``entry`` to
    the value hashed, so that every write path stores exactly that.

    ``data`` is taken as the canonical JSON the log engine stores: for what
    :func:`~flask_sidelog.entry.make_entry` and a spool produce (JSON with
    string keys) that text is exactly what encoding the decoded column gives,
    and it costs one encoding instead of three.

    :param previous: for the entries of one batch, in order: an empty list
        for the first. The fields between ``uuid`` and ``data`` are encoded
        again only if one of them is not the same object as in the entry
        before (the row changes of a flush share them all).
    :param data_texts: gets the entry's :func:`data_text`.
    """
    try:
        uuid, given = entry["uuid"], _middle_fields(entry)
    except KeyError:  # not made by make_entry: a missing field is NULL
        uuid, given = entry.get("uuid"), tuple(map(entry.get, _MIDDLE_FIELDS))
    if previous and all(map(operator.is_, given, previous[0])):
        middle, stored = previous[1], previous[2]
    else:
        fields = list(given)
        stored = None
        types = tuple(map(type, fields))
        if types not in _AS_STORED:
            if all(tp in ok for tp, ok in zip(types, _STORED_TYPES, strict=True)):
                _AS_STORED.add(types)
            else:  # a str subclass, a status code as text...: read back as stored
                fields = stored = [
                    None if v is None else read(v)
                    for v, read in zip(fields, _READ_BACK, strict=True)
                ]
        # One call of the encoder for all of them.
        middle = _encode([timestamp(fields[0]), *fields[1:]])[1:-1]
        if previous is not None:
            previous[:] = (given, middle, stored)
    if stored is not None:  # only what changed: a missing field stays missing
        for name, value, was in zip(_MIDDLE_FIELDS, stored, given, strict=True):
            if value is not was:
                entry[name] = value
    data = data_text(entry)
    if data_texts is not None:
        data_texts.append(data)
    if type(uuid) is not str:
        uuid = None if uuid is None else _as_text(uuid)
    text = "null" if uuid is None else _encode_str(uuid)
    return f"[{text},{middle},{data}]"


def data_text(entry: t.Mapping[str, t.Any]) -> str:
    """The text the log engine stores for an entry's ``data``: its JSON
    column turns None into JSON's null too."""
    data = entry.get("data")
    return "null" if data is None else canonical_json(data)


def _as_text(value: t.Any) -> str:
    """A value of a text column as the database stores it: a str subclass
    as its text, whatever its ``__str__`` says (a StrEnum member)."""
    return str.__str__(value) if isinstance(value, str) else str(value)


#: The hashed fields between ``uuid`` and ``data``, the types in which each
#: reads back from the database, and how a value of another type is made one
#: of them.
_MIDDLE_FIELDS = HASHED_FIELDS[1:-1]
_middle_fields = operator.itemgetter(*_MIDDLE_FIELDS)
_NOT_TEXT: dict[str, tuple[type, t.Callable[[t.Any], t.Any]]] = {
    "created_at": (datetime, lambda value: value),  # timestamp() takes any
    "status_code": (int, int),
    "duration_ms": (float, lambda value: float(value) + 0.0),  # never -0.0
}
_STORED_TYPES = tuple(
    frozenset((type(None), _NOT_TEXT.get(name, (str,))[0])) for name in _MIDDLE_FIELDS
)
_READ_BACK = tuple(_NOT_TEXT.get(name, (str, _as_text))[1] for name in _MIDDLE_FIELDS)
#: The combinations of field types seen that need no reading back.
_AS_STORED: set[tuple[type, ...]] = set()


def _lock_key(table: sa.Table) -> int:
    crc = zlib.crc32(table.name.encode("utf-8"))
    return crc - 2**32 if crc >= 2**31 else crc


def lock_head(conn: sa.Connection, table: sa.Table) -> None:
    """Take the lock that serialises appending to ``table``'s chain, until the
    end of ``conn``'s transaction.

    SQLite: ``BEGIN IMMEDIATE``, its database-wide write lock, taken before
    the head is read (a deferred transaction would read first and collide with
    another process's write later). PostgreSQL: a transaction-level advisory
    lock. Elsewhere the unique ``seq`` is the guard: a concurrent append fails
    instead of forking the chain.
    """
    dialect = conn.dialect.name
    if dialect == "sqlite":
        dbapi = conn.connection.dbapi_connection
        # pysqlite begins lazily, before the first write; if an event recipe
        # already emitted BEGIN, SQLite's own locking refuses a second writer.
        if dbapi is not None and not dbapi.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        conn.execute(_lock_statement(table))


def lock_and_read_head(
    conn: sa.Connection, table: sa.Table, begin: str = ""
) -> tuple[int, str]:
    """:func:`lock_head`, then :func:`head`. With psycopg both statements go
    in one query string, one round trip: the lock is held until commit, and
    every round trip made while holding it is a wait for every other writer.
    (Each statement of the string takes its own snapshot, so the head is read
    after the lock is granted, as when they are sent one by one.)

    :param begin: with psycopg, statements to send first in the same string
        (the writer's ``BEGIN``), ending with ``;``.
    """
    if conn.dialect.driver != "psycopg":
        lock_head(conn, table)
        return head(conn, table)
    lock_sql, head_sql = _lock_and_head_sql(conn.dialect, table)
    both = f"{begin}{lock_sql}; {head_sql}"
    cursor = conn.connection.cursor()
    try:
        cursor.execute(both)
        while cursor.nextset():  # to the head's result, the last one
            pass
        row = cursor.fetchone()
    except conn.dialect.loaded_dbapi.Error as error:
        raise driver_error(conn, error, both) from error
    finally:
        cursor.close()
    if row is None:
        return head(conn, table)  # new or fully pruned: the checkpoint's
    return int(row[0]), str(row[1])


@functools.lru_cache(maxsize=64)
def _lock_and_head_sql(dialect: sa.Dialect, table: sa.Table) -> tuple[str, str]:
    """The lock and head statements as SQL text, compiled once per table."""
    lock, head = (_compiled(dialect, s) for s in _chain_statements(table))
    return without_parameters(lock, dialect), without_parameters(head, dialect)


def _compiled(dialect: sa.Dialect, statement: sa.Select[t.Any]) -> str:
    """``statement`` as SQL text with its values inline (and, for psycopg,
    the ``%`` of identifiers doubled, as for a statement with parameters)."""
    kwargs = {"literal_binds": True}
    return str(statement.compile(dialect=dialect, compile_kwargs=kwargs))


def _chain_statements(table: sa.Table) -> tuple[sa.Select[t.Any], sa.Select[t.Any]]:
    return _lock_statement(table), _head_statement(table)


def _lock_statement(table: sa.Table) -> sa.Select[t.Any]:
    return sa.select(sa.func.pg_advisory_xact_lock(_LOCK_CLASS, _lock_key(table)))


def _head_statement(table: sa.Table) -> sa.Select[t.Any]:
    return (
        sa.select(table.c.seq, table.c.hash)
        .where(table.c.seq.is_not(None))
        .order_by(table.c.seq.desc())
        .limit(1)
    )


@functools.lru_cache(maxsize=64)
def append_function_sql(dialect: sa.Dialect, table: sa.Table) -> tuple[str, str, str]:
    """PostgreSQL's side of :meth:`Chain.link`, as a function of the database
    that appends rows given as one JSON array: under the chain's lock it
    reads the head, hashes each row exactly as :meth:`Chain.link` does
    (SHA-256 only: a key stays in the app) and inserts them, returning their
    ``seq`` and ``hash``. The app then writes in one round trip, with no head
    to read first. On a new or fully pruned log it inserts nothing and
    returns no row: the app links those rows itself.

    Each row is ``[tail, value, ...]``: its record after
    ``[1,<seq>,"<prev>",`` (see :meth:`Chain.prepare`), then the value of
    each stored column but ``id``, ``seq`` and ``hash``, in table order,
    ``created_at`` as ISO text and ``data`` as its JSON text.

    Each statement of the function reads what was committed before it when
    the transaction is READ COMMITTED, so the head is read after the lock is
    granted; under a stricter isolation it returns no row, as for a new log.
    Its name carries :data:`APPEND_FUNCTION_VERSION`, so that a release that
    changes it creates its own.

    :return: the ``CREATE FUNCTION`` statement for ``exec_driver_sql``, the
        call (``%s`` for the rows' JSON text) and the function's signature
        for ``to_regprocedure``.
    """
    preparer = dialect.identifier_preparer
    name = preparer.quote(f"{table.name}_append_v{APPEND_FUNCTION_VERSION}")
    columns = [c for c in table.columns if c.name not in ("id", "seq", "hash")]
    names = ", ".join(preparer.quote(c.name) for c in columns)
    # Text goes to text columns as it is; the rest is cast from its text.
    values = ", ".join(
        f"r ->> {i}"
        if isinstance(c.type, sa.String)
        else f"CAST(r ->> {i} AS {c.type.compile(dialect)})"
        for i, c in enumerate(columns, start=1)
    )
    lock, head = (_compiled(dialect, s) for s in _chain_statements(table))
    # The concatenation gives the bytes of record(): the text is ASCII, and
    # bigint's text form is Python's.
    body = f"""
DECLARE
    head_seq BIGINT;
    head_hash TEXT;
    seqs BIGINT[];
    hashes TEXT[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN;
    END IF;
    PERFORM ({lock});
    SELECT h.seq, h.hash INTO head_seq, head_hash FROM ({head}) AS h;
    IF head_seq IS NULL THEN
        RETURN;
    END IF;
    FOR i IN 1 .. jsonb_array_length(given) LOOP
        head_seq := head_seq + 1;
        head_hash := encode(sha256(convert_to(
            '[1,' || head_seq || ',"' || head_hash || '",' || (given -> (i - 1) ->> 0),
            'UTF8'
        )), 'hex');
        seqs[i] := head_seq;
        hashes[i] := head_hash;
    END LOOP;
    INSERT INTO {preparer.format_table(table)} ({names}, seq, hash)
        SELECT {values}, seqs[o], hashes[o]
        FROM jsonb_array_elements(given) WITH ORDINALITY AS x (r, o);
    RETURN QUERY SELECT * FROM unnest(seqs, hashes);
END
"""
    tag = "$sidelog$"
    while tag in body:  # a table named so
        tag = f"{tag[:-1]}_$"
    create = (
        f"CREATE OR REPLACE FUNCTION {name}(given JSONB)\n"
        "RETURNS TABLE (linked_seq BIGINT, linked_hash TEXT)\n"
        f"LANGUAGE plpgsql VOLATILE AS {tag}{body}{tag}"
    )
    call = f"SELECT linked_seq, linked_hash FROM {name}(%s::JSONB)"
    # exec_driver_sql() sends the statement with (no) parameters, so its
    # identifiers keep their doubled %; the signature is a value.
    return create, call, without_parameters(f"{name}(JSONB)", dialect)


def _function_exists(signature: str) -> sa.ColumnElement[bool]:
    return sa.func.to_regprocedure(signature).is_not(None)


def has_append_function(conn: sa.Connection, table: sa.Table) -> bool:
    """Whether the database has :func:`append_function_sql`'s function for
    ``table``, this role may run it, and transactions run READ COMMITTED by
    default, as the function needs."""
    _, _, signature = append_function_sql(conn.dialect, table)
    exists = _function_exists(signature)
    usable = sa.and_(
        sa.func.has_function_privilege(signature, "EXECUTE"),
        sa.func.current_setting("default_transaction_isolation") == "read committed",
    )
    # Only asked of a function that exists: has_function_privilege fails
    # on one that does not.
    query = sa.select(sa.case((exists, usable), else_=False))
    return bool(conn.execute(query).scalar())


def create_append_function(conn: sa.Connection, table: sa.Table) -> bool:
    """Create :func:`append_function_sql`'s function for ``table`` on
    PostgreSQL, if it is missing. A role that may not (no right to create
    in the schema, or to use PL/pgSQL) leaves the linking to the app: the
    failure is undone and reported by the return value, never raised.

    :return: whether the function exists now; False elsewhere.
    """
    if conn.dialect.name != "postgresql":
        return False
    create, _, signature = append_function_sql(conn.dialect, table)
    if conn.execute(sa.select(_function_exists(signature))).scalar():
        return True
    try:
        with _undone_alone(conn):
            conn.exec_driver_sql(create)
    except sa.exc.DBAPIError:
        return False
    return True


def _undone_alone(conn: sa.Connection) -> t.ContextManager[t.Any]:
    """A savepoint, so that a statement that fails is undone without the
    transaction around it. An AUTOCOMMIT engine has no transaction, and
    there each statement is undone on its own anyway."""
    autocommit = getattr(conn.connection.driver_connection, "autocommit", False)
    return contextlib.nullcontext() if autocommit else conn.begin_nested()


def create_checkpoints_table(conn: sa.Connection, table: sa.Table) -> bool:
    """Create ``table``'s checkpoints table if it is missing (an entries
    table made before the chain). A role that may not create tables, or a
    read-only connection, leaves it missing: the failure is undone and
    reported by the return value, never raised.

    :return: whether the checkpoints table exists now.
    """
    checkpoints = checkpoints_table(table)
    try:
        with _undone_alone(conn):
            checkpoints.create(conn, checkfirst=True)
    except sa.exc.DBAPIError:
        # Refused, or made meanwhile by another process.
        return sa.inspect(conn).has_table(checkpoints.name)
    return True


def checkpoints_table(table: sa.Table) -> sa.Table:
    """The checkpoints table that goes with the entries ``table``."""
    return table.metadata.tables[f"{table.name}_checkpoints"]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a prune left of the chain's beginning."""

    #: Chain position of the last pruned entry.
    seq: int
    #: Its hash: the ``prev`` of the entry at ``seq + 1``.
    hash: str
    #: How many entries that prune deleted.
    pruned: int
    created_at: datetime
    #: The hash of the checkpoint's own record (:func:`checkpoint_record`).
    seal: str


def checkpoint_record(seq: int, hash: str, pruned: int, created_at: datetime) -> bytes:
    """The canonical serialisation of a checkpoint, which its seal covers."""
    obj = {
        "checkpoint": 1,
        "created_at": timestamp(created_at),
        "hash": hash,
        "pruned": int(pruned),
        "seq": int(seq),
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def record_checkpoint(
    conn: sa.Connection,
    table: sa.Table,
    last_pruned_seq: int,
    last_hash: str,
    count: int,
    key: bytes | None = None,
) -> Checkpoint:
    """Record that the entries up to ``last_pruned_seq`` are being deleted.

    Call it in the transaction that deletes them, so that either both happen
    or neither: :func:`verify` then starts after the checkpoint.

    :param last_pruned_seq: ``seq`` of the newest entry deleted.
    :param last_hash: that entry's ``hash``, read in the same transaction.
    :param count: how many entries the prune deletes.
    :param key: ``SIDELOG_CHAIN_KEY``, which seals the checkpoint.
    """
    created_at = utcnow()
    seal = make_hasher(key)(
        checkpoint_record(last_pruned_seq, last_hash, count, created_at)
    )
    conn.execute(
        checkpoints_table(table).insert(),
        {
            "seq": last_pruned_seq,
            "hash": last_hash,
            "pruned": count,
            "created_at": created_at,
            "seal": seal,
        },
    )
    return Checkpoint(last_pruned_seq, last_hash, count, created_at, seal)


def latest_checkpoint(conn: sa.Connection, table: sa.Table) -> Checkpoint | None:
    """The newest checkpoint, or None (also when its table does not exist:
    it is created with the entries table, but a log may predate it)."""
    cp = checkpoints_table(table)
    if not sa.inspect(conn).has_table(cp.name):
        return None
    row = conn.execute(
        sa.select(cp.c.seq, cp.c.hash, cp.c.pruned, cp.c.created_at, cp.c.seal)
        .order_by(cp.c.seq.desc())
        .limit(1)
    ).first()
    return None if row is None else Checkpoint(*row)


def head(conn: sa.Connection, table: sa.Table) -> tuple[int, str]:
    """The newest chain position and hash: ``(0, GENESIS)`` for a new chain."""
    row = conn.execute(_head_statement(table)).first()
    if row is not None:
        return int(row[0]), str(row[1])
    checkpoint = latest_checkpoint(conn, table)  # everything was pruned
    if checkpoint is not None:
        return checkpoint.seq, checkpoint.hash
    return 0, GENESIS


class Chain:
    """Appends entries to the chain of a table; used by the writer inside its
    transaction.

    :param key: ``SIDELOG_CHAIN_KEY``; with it, hashes are HMAC-SHA-256.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.hasher = make_hasher(key)

    def link(
        self,
        conn: sa.Connection,
        table: sa.Table,
        entries: list[dict[str, t.Any]],
        begin: str = "",
        data_texts: list[str] | None = None,
        runs: list[int] | None = None,
    ) -> list[dict[str, t.Any]]:
        """Lock the head and return ``entries`` as rows to insert: each with
        its ``seq`` and ``hash``, and ``created_at`` in UTC (SQLite stores the
        wall time without its offset). One lock for the whole batch.

        :param begin: see :func:`lock_and_read_head`.
        :param data_texts: gets each row's :func:`data_text`, which the hash
            covers, so that the writer stores it without encoding it again.
        :param runs: see :meth:`prepare`.
        """
        # Everything but seq and prev is serialised before the lock is taken:
        # the lock is held by one writer at a time, so it must be short.
        rows, tails = self.prepare(entries, data_texts, runs)
        seq, prev = lock_and_read_head(conn, table, begin)
        for row, tail in zip(rows, tails, strict=True):
            seq += 1
            # Equal to record(...): '[1,<seq>,"<prev>",' and the fields.
            prev = self.hasher(f'[1,{seq},"{prev}",{tail}'.encode("ascii"))
            row["seq"] = seq
            row["hash"] = prev
        return rows

    def prepare(
        self,
        entries: list[dict[str, t.Any]],
        data_texts: list[str] | None = None,
        runs: list[int] | None = None,
    ) -> tuple[list[dict[str, t.Any]], list[str]]:
        """What :meth:`link` does before it takes the lock: ``entries`` as
        rows whose ``seq`` and ``hash`` are still None, and each one's record
        after ``[1,<seq>,"<prev>",``, which the hash covers with those.

        :param runs: gets the index of each row that starts a run: the first,
            and each whose fields between ``uuid`` and ``data`` are not the
            same objects as the row's before. The rows of a run hold the same
            objects there (a flush's changes of one table and operation).
        """
        rows = []
        tails = []
        previous: list[t.Any] = []
        at = utc_at = None
        for entry in entries:
            row = dict(entry, seq=None, hash=None)
            if entry["created_at"] is not at:  # the rows of a flush share it
                at = entry["created_at"]
                utc_at = as_utc(at)
            row["created_at"] = utc_at
            if row.get("duration_ms") == 0:
                # Not -0.0, which PostgreSQL's JSON cannot hold.
                row["duration_ms"] = 0.0
            rows.append(row)
            shared = previous[0] if previous else None
            tails.append(_stored_tail(row, previous, data_texts)[1:])
            if runs is not None and previous[0] is not shared:  # encoded anew
                runs.append(len(rows) - 1)
        return rows, tails


#: What :func:`verify` found wrong at the first broken position.
Problem = t.Literal["modified", "missing", "inserted", "reordered"]


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`; ``str()`` gives the report to print."""

    #: Whether the whole walked chain (and the expected head) checked out.
    ok: bool
    #: How many entries were verified (before the break, if any).
    entries: int
    #: ``seq`` and ``hash`` of the last verified entry (or of the start).
    head_seq: int
    head: str
    #: The checkpoint the walk started from, if the log was pruned.
    checkpoint: Checkpoint | None = None
    #: At the first broken position: what is wrong, the ``seq``, and how.
    problem: Problem | None = None
    seq: int | None = None
    detail: str | None = None

    def __str__(self) -> str:
        lines = []
        if self.checkpoint is not None:
            cp = self.checkpoint
            lines.append(
                f"Checkpoint: entries up to seq {cp.seq} pruned"
                f" ({cp.pruned} at {timestamp(cp.created_at)}), hash {cp.hash}"
            )
        if self.ok:
            lines.append(f"OK: {self.entries} entries, head {self.head}")
            lines.append(
                f"To check this head later: --expect-head {self.head_seq}:{self.head}"
            )
        else:
            lines.append(
                f"FAILED at seq {self.seq}: {self.problem}: {self.detail}"
                f" ({self.entries} entries verified before it)"
            )
        return "\n".join(lines)


#: The highest ``seq`` a chain can reach (a BIGINT's).
SEQ_MAX = 2**63 - 1


def parse_head(text: str) -> tuple[int | None, str]:
    """``SEQ:HASH`` or ``HASH`` (64 hex digits) as ``(seq or None, hash)``."""
    seq_text, _, hash_text = text.strip().rpartition(":")
    hash_text = hash_text.lower()
    if len(hash_text) != 64 or any(c not in "0123456789abcdef" for c in hash_text):
        raise ValueError(
            f"expected a head as SEQ:HASH or HASH (64 hex digits), got {text!r}."
        )
    if not seq_text:
        return None, hash_text
    if not (seq_text.isascii() and seq_text.isdigit()) or not (
        1 <= int(seq_text) <= SEQ_MAX
    ):
        raise ValueError(
            f"the SEQ of SEQ:HASH must be a number from 1 to {SEQ_MAX}, got"
            f" {seq_text!r}."
        )
    return int(seq_text), hash_text


def _walk(
    conn: sa.Connection, table: sa.Table, where: sa.ColumnElement[bool]
) -> sa.CursorResult[t.Any]:
    """The rows ``where`` selects, in ``seq`` order, streamed, as
    ``(seq, hash, *HASHED_FIELDS)``. On SQLite and PostgreSQL ``data`` comes
    as stored text and ``created_at`` as text too (SQLite's as stored,
    PostgreSQL's formatted by the server as :func:`timestamp` does), for
    :func:`_quick_message`."""
    c = table.c
    columns: list[sa.ColumnElement[t.Any]] = [c[name] for name in HASHED_FIELDS]
    if conn.dialect.name == "sqlite":
        columns[1] = sa.type_coerce(c.created_at, sa.String)
        columns[-1] = sa.type_coerce(c.data, sa.String)
    elif conn.dialect.name == "postgresql":
        columns[1] = sa.func.to_char(
            sa.func.timezone("UTC", c.created_at), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
        )
        columns[-1] = sa.cast(c.data, sa.Text)
    query = sa.select(c.seq, c.hash, *columns).where(where).order_by(c.seq)
    return conn.execution_options(yield_per=20000).execute(query)


def _decoded(raw: t.Sequence[t.Any], dialect: str) -> t.Sequence[t.Any] | None:
    """A :func:`_walk` row as :func:`record` takes it; None if a stored value
    is not one the writer stores, though it may decode to the same value: a
    JSON object with a key twice (a database's JSON functions may read the
    other value), on SQLite a time spelt otherwise (compared as text by
    queries), a value of another type."""
    if dialect not in ("sqlite", "postgresql"):
        return raw
    row = list(raw)
    try:
        if dialect == "sqlite" and not _SQLITE_TIME.fullmatch(row[3]):
            return None
        if row[-1] is not None and not isinstance(row[-1], str):
            return None  # stored as a blob, which newer SQLite reads as JSONB
        # Python 3.10's fromisoformat does not read "Z".
        row[3] = datetime.fromisoformat(row[3].replace("Z", "+00:00"))
        if row[-1] is not None:
            row[-1] = json.loads(row[-1], object_pairs_hook=_once_each)
        record(row[2:], 0, GENESIS)  # every field of a type it encodes
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
    return row


#: How SQLAlchemy stores a time on SQLite, and so how the log does.
_SQLITE_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}")


def _once_each(pairs: list[tuple[str, t.Any]]) -> dict[str, t.Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key twice")
    return found


def _quick_message(raw: t.Sequence[t.Any], seq: int, prev: str, sqlite: bool) -> bytes:
    """:func:`record` built from a :func:`_walk` row without decoding it,
    which is what makes a million entries fast.

    It equals the record when ``data`` was stored as canonical JSON (the log
    engine's serialiser) and SQLite's ``created_at`` in SQLAlchemy's format.
    Otherwise it differs and the caller falls back to :func:`record`; it can
    never match a hash that :func:`record` would not: every other field is one
    JSON token, so equal bytes mean equal fields and equal data text.
    """
    created_at: str = raw[3]
    if sqlite:  # "YYYY-MM-DD HH:MM:SS.ffffff", and no other spelling
        if len(created_at) != 26 or created_at[10] != " ":
            return b""
        created_at = f"{created_at[:10]}T{created_at[11:]}Z"
    head = _encode([1, seq, prev, raw[2], created_at, *raw[4:-1]])
    data = raw[-1]
    return f"{head[:-1]},{'null' if data is None else data}]".encode()


def _prefetched(
    result: sa.CursorResult[t.Any], size: int = 20000
) -> t.Generator[t.Sequence[t.Any], None, None]:
    """The rows of ``result``, fetched by a thread one chunk ahead: the
    database reads the next rows while this thread hashes the last ones.
    Close it before using the connection again."""
    chunks: queue.Queue[t.Any] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def fetch() -> None:
        try:
            for part in result.partitions(size):
                if stop.is_set():
                    return
                chunks.put(part)
            chunks.put(None)
        except BaseException as error:  # handed to the reading thread
            chunks.put(error)

    fetcher = threading.Thread(target=fetch, name="sidelog-verify", daemon=True)
    fetcher.start()
    try:
        while (part := chunks.get()) is not None:
            if isinstance(part, BaseException):
                raise part
            yield from part
    finally:
        stop.set()
        while fetcher.is_alive():  # unblock a put, then let it see stop
            with contextlib.suppress(queue.Empty):
                chunks.get(timeout=0.05)
        fetcher.join()


def _matches(
    hasher: Hasher, row: t.Sequence[t.Any] | None, seq: int, prev: str
) -> bool:
    return row is not None and hasher(record(row[2:], seq, prev)) == row[1]


def _key_hint(key: bytes | None, few: bool = False) -> str:
    """What the report adds when none of the first three entries of a walk
    matches its hash, as with a chain key left out or changed; with
    ``few``, when the walk has fewer, which cannot tell."""
    if few:
        check = "is set here" if key is None else "is the one they were written with"
        return (
            "; if the entries were written with SIDELOG_CHAIN_KEY, check that it"
            f" {check} (with fewer than three entries, verify cannot tell)"
        )
    why = (
        "the entries were written with SIDELOG_CHAIN_KEY and it is not set here"
        if key is None
        else "SIDELOG_CHAIN_KEY differs from the one the entries were written with"
    )
    return (
        f"; none of the first three entries matches its hash, as when {why}"
        " (or all three were changed)"
    )


def _diagnose(
    conn: sa.Connection,
    table: sa.Table,
    hasher: Hasher,
    key: bytes | None,
    row: t.Sequence[t.Any],
    prev: str,
    at_start: bool = False,
) -> tuple[Problem, str]:
    """Why the entry ``row`` does not match its hash after ``prev``: look at
    the entries after it. Runs once, at the break, so it may read on.

    :param at_start: ``row`` is the first entry of the walk; if the next
        two do not match their hashes either, the key may be the matter.
    """
    seq = int(row[0])
    if key is not None and _matches(make_hasher(None), row, seq, prev):
        return "inserted", (
            "its hash was made without SIDELOG_CHAIN_KEY: a forged entry, or one"
            " written by a process that lacks the key"
        )
    dialect = conn.dialect.name
    with _walk(conn, table, table.c.seq > seq) as result:
        # (seq, decoded row or None when undecodable) of each later entry
        following: t.Iterator[tuple[int, t.Sequence[t.Any] | None]] = (
            (raw[0], _decoded(raw, dialect)) for raw in result if type(raw[0]) is int
        )
        nxt_seq, nxt = next(following, (0, None))
        if nxt_seq == 0:
            return "modified", (
                "the newest entry does not match its hash: changed, or forged and"
                f" appended{_key_hint(key, few=True) if at_start else ''}"
            )
        if _matches(hasher, nxt, nxt_seq, row[1]):
            return "modified", (
                "it does not match its hash, and the next entry follows from that"
                " hash: its fields were changed, or the entry before it was changed"
                " and its hash recomputed"
            )
        after = next(following, None)
        key_hint = ""
        if at_start and after is None:
            key_hint = _key_hint(key, few=True)
        elif (
            at_start
            and after is not None
            and nxt is not None
            and not _matches(hasher, after[1], after[0], nxt[1])
        ):
            key_hint = _key_hint(key)
        if after is not None:  # read ahead: the searches below need it too
            following = itertools.chain([after], following)
        for gap in range(1, _RENUMBER_SEARCH + 1):
            # The next entry follows from this one at a higher seq: entries
            # before this one were deleted and the rest renumbered down.
            if _matches(hasher, nxt, nxt_seq + gap, row[1]):
                return "missing", (
                    f"{gap} entr{'y was' if gap == 1 else 'ies were'} deleted"
                    " here and the later ones renumbered"
                )
        if nxt is not None and nxt_seq == seq + 1 and _matches(hasher, nxt, seq, prev):
            if _matches(hasher, row, nxt_seq, nxt[1]):
                return (
                    "reordered",
                    f"the entries at seq {seq} and {nxt_seq} were swapped",
                )
            return "inserted", (
                "this entry is not part of the chain: the entry now at seq"
                f" {nxt_seq} belongs at seq {seq} (the later ones were renumbered)"
            )
        for other_seq, other in itertools.chain([(nxt_seq, nxt)], following):
            if _matches(hasher, other, seq, prev):
                return (
                    "reordered",
                    f"the entry now at seq {other_seq} belongs at seq {seq}",
                )
    return "modified", (
        "it does not match its hash, and the next entry does not follow from it"
        f" (its hash or several entries were changed){key_hint}"
    )


def verify(
    conn: sa.Connection,
    table: sa.Table,
    key: bytes | None = None,
    from_seq: int | None = None,
    expect_head: str | None = None,
    through: int | None = None,
) -> VerifyResult:
    """Walk the chain of ``table`` in ``seq`` order, in constant memory, and
    report the first broken position.

    :param key: ``SIDELOG_CHAIN_KEY`` the entries were written with.
    :param from_seq: start at this ``seq``, trusting the entry before it
        (or the checkpoint); default: the latest checkpoint, or the beginning.
    :param expect_head: ``SEQ:HASH`` or ``HASH`` of a head saved earlier; the
        chain must still contain it.
    :param through: stop after this ``seq`` (what a prune is about to delete).
    :raise ValueError: for a ``from_seq`` or ``expect_head`` that cannot be used.
    """
    if conn.dialect.name == "postgresql" and not conn.in_transaction():
        # One snapshot for the checkpoint and the walk, which a prune that
        # commits in between would otherwise make begin at a gap.
        conn.exec_driver_sql(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        )
    while True:
        # Elsewhere (SQLite), such a gap makes it start again from the newer
        # checkpoint: each time a newer one, so this ends.
        result = _verify(conn, table, key, from_seq, expect_head, through)
        if result is not None:
            return result


def _before_range(seq: int, start: int) -> ValueError:
    return ValueError(
        f"the expected head's seq {seq} is before the verified range"
        f" (from seq {start}); give a later head, or a smaller --from."
    )


def _verify(
    conn: sa.Connection,
    table: sa.Table,
    key: bytes | None,
    from_seq: int | None,
    expect_head: str | None,
    through: int | None,
) -> VerifyResult | None:
    """:func:`verify`, once; None if its walk began at a gap that a
    checkpoint committed since it started explains."""
    hasher = make_hasher(key)
    expected = parse_head(expect_head) if expect_head is not None else None
    checkpoint = latest_checkpoint(conn, table)
    c = table.c
    start, prev = (checkpoint.seq + 1, checkpoint.hash) if checkpoint else (1, GENESIS)
    if from_seq is not None:
        if from_seq < 1:
            raise ValueError(f"--from must be a seq of 1 or more, got {from_seq}.")
        if from_seq < start:
            raise ValueError(
                f"entries up to seq {start - 1} were pruned; use --from {start} or"
                " more, or leave --from out to start at the checkpoint."
            )
        if from_seq > start:
            found = conn.scalar(sa.select(c.hash).where(c.seq == from_seq - 1))
            if found is None:
                raise ValueError(
                    f"there is no entry at seq {from_seq - 1} to start after;"
                    " leave --from out to verify the whole chain."
                )
            start, prev = from_seq, found
    if expected is not None and expected[0] is not None and expected[0] < start - 1:
        if checkpoint is not None and expected[0] < checkpoint.seq:
            raise ValueError(
                f"the expected head's seq {expected[0]} was pruned (the chain goes"
                f" on from the checkpoint at seq {checkpoint.seq}): a head saved"
                " before a prune cannot be checked; save the head after each prune."
            )
        raise _before_range(expected[0], start)

    used_checkpoint = checkpoint if checkpoint and start == checkpoint.seq + 1 else None
    count = 0
    last_seq = start - 1
    head_hash = prev
    seen_expected = expected is not None and (
        expected[1] == prev and expected[0] in (None, last_seq)
    )

    def broken(problem: Problem, seq: int, detail: str) -> VerifyResult:
        return VerifyResult(
            False, count, last_seq, head_hash, used_checkpoint, problem, seq, detail
        )

    if expected is not None and expected[0] == start - 1 and not seen_expected:
        return broken(
            "modified",
            start - 1,
            f"its hash {prev} is not the expected head {expected[1]}: the chain"
            " was rewritten up to here",
        )

    if used_checkpoint is not None:
        cp = used_checkpoint
        record_ = checkpoint_record(cp.seq, cp.hash, cp.pruned, cp.created_at)
        if hasher(record_) != cp.seal:
            return broken(
                "modified",
                cp.seq,
                (
                    "the checkpoint does not match its seal: forged or changed (or"
                    " SIDELOG_CHAIN_KEY differs from the one that recorded it)"
                ),
            )
        left = conn.scalar(sa.select(sa.func.count()).where(c.seq <= cp.seq))
        if left:
            return broken(
                "inserted",
                cp.seq,
                (
                    f"{left} entries at or before the checkpoint still exist: a prune"
                    " deletes them with the checkpoint, so it was not a prune"
                ),
            )

    if used_checkpoint is None and start == 1:
        below, lowest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(c.seq)).where(c.seq < 1)
        ).one()
        if below:
            return broken(
                "inserted",
                lowest,
                (
                    f"{below} entries have a seq before 1, where the chain starts:"
                    " the chain never wrote them"
                ),
            )

    dialect = conn.dialect.name
    quick = dialect in ("sqlite", "postgresql")
    sqlite = dialect == "sqlite"
    unmatched: t.Sequence[t.Any] | None = None
    gap: VerifyResult | None = None
    walked = c.seq >= start if through is None else c.seq.between(start, through)
    with _walk(conn, table, walked) as result:
        # SQLite reads in this thread faster than two threads share the GIL.
        rows = _prefetched(result) if dialect == "postgresql" else (r for r in result)
        with contextlib.closing(rows):
            for row in rows:
                seq = row[0]
                if type(seq) is not int:  # SQLite keeps any value in any column
                    return broken(
                        "modified",
                        last_seq + 1,
                        f"its seq {seq!r} is not a whole number",
                    )
                if seq != last_seq + 1:
                    if seq <= last_seq:
                        return broken("inserted", seq, "a second entry with this seq")
                    first, last = last_seq + 1, seq - 1
                    missing = (
                        f"the entry at seq {first} is missing"
                        if first == last
                        else f"the entries at seq {first} to {last} are missing"
                    )
                    gap = broken("missing", first, missing + " (deleted)")
                    if count:
                        return gap
                    break  # at the start: maybe pruned meanwhile
                try:
                    linked = quick and hasher(
                        _quick_message(row, seq, head_hash, sqlite)
                    )
                except (TypeError, ValueError, IndexError):  # not stored by the log
                    linked = False
                if linked != row[1]:
                    decoded = _decoded(row, dialect)
                    if decoded is None:
                        return broken(
                            "modified",
                            seq,
                            (
                                "its data is not JSON or its created_at not a time,"
                                " as the log stores them (a key twice, a time spelt"
                                " otherwise, a value of another type)"
                            ),
                        )
                    if not _matches(hasher, decoded, seq, head_hash):
                        unmatched = decoded
                        break
                if (
                    expected is not None
                    and expected[0] in (None, seq)
                    and not seen_expected
                ):
                    if expected[1] == row[1]:
                        seen_expected = True
                    elif expected[0] == seq:
                        return broken(
                            "modified",
                            seq,
                            f"its hash {row[1]} is not the expected head"
                            f" {expected[1]}: the chain was rewritten up to here",
                        )
                count += 1
                last_seq, head_hash = seq, row[1]
    if gap is not None:
        # Read after the walk's fetching thread has stopped, as below.
        newer = latest_checkpoint(conn, table)
        moved = newer is not None and (checkpoint is None or newer.seq > checkpoint.seq)
        return None if moved else gap
    if unmatched is not None:
        # Diagnosed after the walk's fetching thread has stopped: the
        # diagnosis reads through the same connection.
        problem, detail = _diagnose(
            conn, table, hasher, key, unmatched, head_hash, at_start=count == 0
        )
        return broken(problem, int(unmatched[0]), detail)

    if expected is not None and not seen_expected:
        earlier = ""
        if expected[0] is None and start > 2:
            # A hash alone, maybe of an entry before the range. Said, not
            # trusted: that entry is not verified here, and a hash column is
            # easily set, so the failure stands.
            before = sa.select(sa.func.max(c.seq)).where(
                c.hash == expected[1], c.seq < start - 1
            )
            found = conn.scalar(before)
            if found is not None:
                earlier = (
                    f"; an entry before the verified range (seq {found}), not"
                    " verified here, carries that hash: if the head was saved"
                    f" then, verify from it (--from {found} --expect-head"
                    f" {found}:{expected[1]})"
                )
        if expected[0] is not None:
            return broken(
                "missing",
                last_seq + 1,
                (
                    f"the chain ends at seq {last_seq} but the expected head is at seq"
                    f" {expected[0]}: the newest entries were deleted"
                ),
            )
        pruned = (
            f", or it was pruned (saved before the checkpoint at seq {checkpoint.seq})"
            if checkpoint is not None
            else ""
        )
        return broken(
            "missing",
            last_seq + 1,
            (
                f"the expected head {expected[1]} is not in the chain, which ends at"
                f" seq {last_seq}: the newest entries were deleted, or the chain was"
                f" rewritten{pruned}{earlier}"
            ),
        )
    unchained = through is None and conn.scalar(
        sa.select(sa.func.count()).where(c.seq.is_(None))
    )
    if unchained:
        return broken(
            "inserted",
            last_seq + 1,
            (
                f"{unchained} entries have no chain position (seq is NULL): written"
                " with SIDELOG_CHAIN off, or inserted around the chain"
            ),
        )
    return VerifyResult(True, count, last_seq, head_hash, used_checkpoint)
