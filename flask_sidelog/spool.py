"""The spool: entries the log database did not take, kept in a local file
until :meth:`SideLog.replay` moves them there.

The file holds one JSON object a line. Appenders of every process and thread
take an exclusive ``flock`` on a lock file next to it, append with one
``os.write`` on an ``O_APPEND`` descriptor and ``fsync`` before returning, so
lines never interleave and an entry is on disk when the request goes on.
Replay renames the spool under the same lock before reading it, so appends that
happen meanwhile go to a new spool and are never lost or read twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import typing as t
import uuid
from datetime import datetime

from .engine import refused_for_content
from .model import FIELDS

#: Entries tried in one transaction by :meth:`Spool.replay`.
REPLAY_CHUNK = 500
#: Replay stops, keeping the rest, after this many entries in a row failed
#: one by one, other than for what they hold: the log database is then
#: taken to be unreachable.
REPLAY_GIVE_UP = 3

REPLAY_SUFFIX = ".replay-"

InsertMissing = t.Callable[[list[dict[str, t.Any]]], int]


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """What :meth:`SideLog.replay` did.

    .. versionadded:: 0.1
    """

    #: Entries inserted into the log database.
    moved: int = 0
    #: Entries whose uuid was already stored (a replay ran before, or the
    #: failed write had in fact committed); dropped from the spool.
    already_present: int = 0
    #: Entries that failed again and are still in the spool.
    kept: int = 0
    #: Lines that are not an entry (a write cut short by a crash or a full
    #: disk); they stay in the spool for a person to look at.
    unreadable: int = 0

    def __add__(self, other: ReplayResult) -> ReplayResult:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return ReplayResult(*(a + b for a, b in pairs))


def encode(entry: t.Mapping[str, t.Any]) -> bytes:
    """One spool line for ``entry``: ASCII JSON, so any text survives."""
    row = dict(entry)
    created = row.get("created_at")
    if isinstance(created, datetime):
        row["created_at"] = created.isoformat()
    text = json.dumps(row, ensure_ascii=True, separators=(",", ":"), default=repr)
    return text.encode("ascii") + b"\n"


def decode(line: bytes) -> dict[str, t.Any] | None:
    """The entry of a spool line, or None if the line is not one."""
    try:
        row = json.loads(line)
        entry = {k: v for k, v in row.items() if k in FIELDS and k != "id"}
        if not isinstance(entry.get("uuid"), str):
            return None
        entry["created_at"] = datetime.fromisoformat(entry["created_at"])
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
        return None  # RecursionError: JSON nested deeper than Python decodes
    return entry


class Spool:
    """The spool file at ``path`` (created with mode 0600)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + ".lock"

    @contextlib.contextmanager
    def _locked(self) -> t.Iterator[None]:
        """Hold the spool's exclusive lock, shared by every process and thread."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def append(self, entries: t.Iterable[t.Mapping[str, t.Any]]) -> None:
        """Append ``entries`` and fsync them; raise :class:`OSError` if that failed."""
        data = b"".join(encode(entry) for entry in entries)
        with self._locked():
            self._append(data)

    def _append(self, data: bytes) -> None:
        """Append ``data`` (whole lines); the caller holds the lock."""
        created = not os.path.exists(self.path)
        fd = os.open(
            self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            size = os.fstat(fd).st_size
            # A crash or a full disk may have cut the last line short: start on
            # a line of our own, so that it cannot swallow this entry.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                # Leave no part of them: the caller keeps them elsewhere.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path)

    def replay(self, insert_missing: InsertMissing) -> ReplayResult:
        """Move the spooled entries into the log database.

        :param insert_missing: inserts the entries whose uuid is not stored yet
            in one transaction, returns how many it inserted, raises on failure.
        """
        with self._locked():
            if os.path.exists(self.path):
                private = f"{self.path}{REPLAY_SUFFIX}{os.getpid()}-{uuid.uuid4().hex}"
                os.rename(self.path, private)
        result = ReplayResult()
        # Files left by a replay that crashed are replayed too; one that
        # another replay is working on is locked and skipped.
        for path in sorted(glob.glob(glob.escape(self.path) + REPLAY_SUFFIX + "*")):
            result += self._replay_file(path, insert_missing)
        return result

    def _replay_file(self, path: str, insert_missing: InsertMissing) -> ReplayResult:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # another replay finished it
            return ReplayResult()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return ReplayResult()
            if not os.path.exists(path):  # finished before we got the lock
                return ReplayResult()
            with os.fdopen(os.dup(fd), "rb") as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
            result, keep = _replay_lines(lines, insert_missing)
            if keep:
                try:
                    with self._locked():
                        self._append(b"".join(line + b"\n" for line in keep))
                except OSError:
                    # No room to move them back (a full disk): this file
                    # keeps them, and the next replay takes it up again,
                    # dropping the entries moved now as already stored.
                    return result
            # Only now: a crash before this line leaves the file to replay again,
            # which the unique uuid makes harmless.
            os.unlink(path)
            _fsync_dir(path)
            return result
        finally:
            os.close(fd)


def _replay_lines(
    lines: list[bytes], insert_missing: InsertMissing
) -> tuple[ReplayResult, list[bytes]]:
    """Replay ``lines``; return the counts and the lines to keep."""
    keep: list[bytes] = []
    readable: list[tuple[bytes, dict[str, t.Any]]] = []
    for line in lines:
        entry = decode(line)
        if entry is None:
            keep.append(line)
        else:
            readable.append((line, entry))
    moved = present = failed_in_a_row = 0
    for start in range(0, len(readable), REPLAY_CHUNK):
        chunk = readable[start : start + REPLAY_CHUNK]
        if failed_in_a_row >= REPLAY_GIVE_UP:
            keep.extend(line for line, _ in chunk)
            continue
        try:
            inserted = insert_missing([entry for _, entry in chunk])
        except Exception:
            # One bad entry must not hold back the others: try them one by one.
            for line, entry in chunk:
                if failed_in_a_row >= REPLAY_GIVE_UP:
                    keep.append(line)
                    continue
                try:
                    inserted = insert_missing([entry])
                except Exception as error:
                    # An entry the database refuses for its content (written
                    # by an older version) says nothing of the next one.
                    if not refused_for_content(error):
                        failed_in_a_row += 1
                    keep.append(line)
                    continue
                failed_in_a_row = 0
                moved += inserted
                present += 1 - inserted
        else:
            failed_in_a_row = 0
            moved += inserted
            present += len(chunk) - inserted
    unreadable = len(lines) - len(readable)
    result = ReplayResult(moved, present, len(keep) - unreadable, unreadable)
    return result, keep


def _fsync_dir(path: str) -> None:
    """Make a file's creation, rename or removal durable."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
