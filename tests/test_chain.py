"""Tamper evidence: the hash chain, ``flask sidelog verify`` and checkpoints.

Every tampering is done by raw SQL, as an attacker with database access would.
"""

from __future__ import annotations

import enum
import hashlib
import json
import multiprocessing
import re
import threading
import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskCliRunner
from flask_sqlalchemy import SQLAlchemy
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from _entries import add_entries
from _entries import ago
from conftest import dispose
from conftest import failures
from conftest import make_app
from conftest import new_database_uri
from conftest import run_threads
from flask_sidelog import chain
from flask_sidelog import SideLog
from flask_sidelog.entry import make_entry
from flask_sidelog.model import make_entries_table
from flask_sidelog.signals import entry_failed
from flask_sidelog.writer import SERVER_LINKED_ROWS

KEY = "k" * 32
TABLE = "sidelog_entries"
#: Every app here chains, whatever the default of SIDELOG_CHAIN.
CHAINED = {"SIDELOG_CHAIN": True}


@pytest.fixture
def app_and_ext(
    database_uri: str, tmp_path: t.Any
) -> t.Iterator[tuple[Flask, SQLAlchemy | None, SideLog]]:
    """conftest's app, chained."""
    app, db, sidelog = make_app(database_uri, str(tmp_path / "instance"), CHAINED)
    yield app, db, sidelog
    dispose(app)


@pytest.fixture
def keyed(
    database_uri: str, tmp_path: t.Any
) -> t.Iterator[tuple[Flask, SideLog, FlaskCliRunner]]:
    """An app whose chain is keyed with :data:`KEY`."""
    app, _, sidelog = make_app(
        database_uri, str(tmp_path / "instance"), {**CHAINED, "SIDELOG_CHAIN_KEY": KEY}
    )
    yield app, sidelog, app.test_cli_runner()
    dispose(app)


def fill(app: Flask, sidelog: SideLog, n: int) -> list[dict[str, t.Any]]:
    with app.app_context():
        return [sidelog.log(f"event.{i}", data={"i": i}) for i in range(1, n + 1)]


def sql(app: Flask, sidelog: SideLog, *statements: str, **params: t.Any) -> None:
    with app.app_context(), sidelog.log_session() as session:
        for statement in statements:
            session.execute(sa.text(statement), params)


def log_from_threads(app: Flask, sidelog: SideLog, threads: int) -> None:
    """Log 10 entries from each of ``threads`` threads at once."""

    def write(i: int) -> None:
        with app.app_context():
            for n in range(10):
                sidelog.log("concurrent", data={"thread": i, "n": n})

    run_threads(threads, write)


def verify(runner: FlaskCliRunner, *args: str) -> tuple[int, str]:
    result = runner.invoke(args=["sidelog", "verify", *args])
    return result.exit_code, result.output


def rows(app: Flask, sidelog: SideLog) -> list[dict[str, t.Any]]:
    with app.app_context(), sidelog.log_session() as session:
        found = session.execute(sa.text(f"SELECT * FROM {TABLE} ORDER BY seq"))
        return [dict(r) for r in found.mappings()]


def rehash(
    app: Flask,
    sidelog: SideLog,
    from_seq: int,
    key: bytes | None = None,
    to_seq: int | None = None,
) -> None:
    """Recompute the hashes from ``from_seq`` on (up to ``to_seq``) from the
    raw rows, as a forger would, with ``key`` (or SHA-256)."""
    hasher = chain.make_hasher(key)
    found = rows(app, sidelog)
    prev = chain.GENESIS
    for row in found:
        if from_seq <= row["seq"] <= (to_seq or row["seq"]):
            data = row["data"]
            if isinstance(data, str):  # SQLite's raw JSON text
                data = json.loads(data)
            values = [row[name] for name in chain.HASHED_FIELDS]
            values[chain.HASHED_FIELDS.index("data")] = data
            values[1] = _parse_time(values[1])
            row["hash"] = hasher(chain.record(values, row["seq"], prev))
            sql(
                app,
                sidelog,
                f"UPDATE {TABLE} SET hash = :h WHERE seq = :s",
                h=row["hash"],
                s=row["seq"],
            )
        prev = row["hash"]


def _parse_time(value: t.Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def renumber_from(app: Flask, sidelog: SideLog, seq: int) -> None:
    """Shift every entry from ``seq`` on by one, making room at ``seq``."""
    sql(
        app,
        sidelog,
        f"UPDATE {TABLE} SET seq = -seq WHERE seq >= :s",
        f"UPDATE {TABLE} SET seq = 1 - seq WHERE seq < 0",
        s=seq,
    )


def forge(app: Flask, sidelog: SideLog, seq: int) -> None:
    """Insert a made-up entry at ``seq`` (hash to be filled in), stored as
    the log stores its own: a careful forger."""
    entry = make_entry("forged", data={"by": "attacker"})
    sqlite = app.extensions["sidelog"].writer.engine.dialect.name == "sqlite"
    sql(
        app,
        sidelog,
        f"INSERT INTO {TABLE} (uuid, created_at, event, level, data, seq, hash)"
        " VALUES (:uuid, :created_at, 'forged', 'info', :data, :seq, :hash)",
        uuid=entry["uuid"],
        created_at=entry["created_at"].strftime(
            "%Y-%m-%d %H:%M:%S.%f" if sqlite else "%Y-%m-%d %H:%M:%S.%f+00:00"
        ),
        data='{"by": "attacker"}',
        seq=seq,
        hash="0" * 64,
    )


def test_intact_chain_verifies_and_prints_its_head(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    entries = fill(app, sidelog, 5)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    code, out = verify(runner)
    assert code == 0, out
    head = entries[-1]["hash"]
    assert re.fullmatch(r"[0-9a-f]{64}", head)
    assert out.splitlines() == [
        f"OK: 5 entries, head {head}",
        f"To check this head later: --expect-head 5:{head}",
    ]
    assert verify(runner, "--expect-head", f"5:{head}")[0] == 0
    assert verify(runner, "--expect-head", head.upper())[0] == 0
    assert verify(runner, "--expect-head", f"3:{entries[2]['hash']}")[0] == 0
    code, out = verify(runner, "--from", "4")
    assert (code, out.splitlines()[0]) == (0, f"OK: 2 entries, head {head}")


def test_stored_values_hash_the_same_when_read_back(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """What goes in is not always what comes back (floats, key types, tuples,
    time zones, int durations); the chain covers what comes back."""
    tricky = {
        "floats": [0.1, 1e-7, 1e22, -0.0, 1.0, 2.5e-308, 1.7976931348623157e308],
        "ints": [2**62, -(2**63), 0],
        "text": ["e\u0301", "\u00e9", "\U0001f600", "\u2028", "tab\tnl\n", ""],
        "nested": {"b": {"z": 1, "a": [None, True, False]}, "a": ()},
        3: "int key",
        "none": None,
    }
    with app.app_context():
        sidelog.log("tricky", data=tricky, actor="\u00e9ve")
        entry = make_entry("odd", duration_ms=5, status_code=200)
        entry["data"] = {3: "int key, past make_entry", "a": (1, 2)}
        entry["created_at"] = datetime(
            1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5))
        )
        ancient = make_entry("ancient")
        ancient["created_at"] = datetime(5, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        app.extensions["sidelog"].writer.insert([entry, ancient])
        sidelog.log("last")
        stored = {e["event"]: e for e in sidelog.entries()}
    assert stored["odd"]["created_at"] == datetime(
        1999, 12, 31, 18, 59, 59, 999999, tzinfo=timezone.utc
    )
    assert stored["tricky"]["data"]["3"] == "int key"
    code, out = verify(runner)
    assert code == 0, out
    assert out.startswith("OK: 4 entries")
    # verify's fast path (hashing the stored text) holds for all of them.
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        with writer.engine.connect() as conn:
            dialect = conn.dialect.name
            with chain._walk(conn, writer.table, sa.true()) as result:
                raws = list(result)
    prev = chain.GENESIS
    for raw in raws:
        decoded = chain._decoded(raw, dialect)
        assert decoded is not None
        expected = chain.record(decoded[2:], raw[0], prev)
        assert chain._quick_message(raw, raw[0], prev, dialect == "sqlite") == expected
        prev = raw[1]


@pytest.mark.parametrize(
    ("statement", "report"),
    [
        pytest.param(
            "UPDATE {t} SET actor = 'mallory' WHERE seq = 3",
            "FAILED at seq 3: modified: it does not match its hash, and the next"
            " entry follows from that hash: its fields were changed, or the entry"
            " before it was changed and its hash recomputed (2 entries verified"
            " before it)",
            id="field",
        ),
        pytest.param(
            "UPDATE {t} SET status_code = 200 WHERE seq = 5",
            "FAILED at seq 5: modified: the newest entry does not match its hash",
            id="newest-field",
        ),
        pytest.param(
            "UPDATE {t} SET hash = '" + "a" * 64 + "' WHERE seq = 2",
            "FAILED at seq 2: modified: it does not match its hash, and the next",
            id="hash",
        ),
        pytest.param(
            "DELETE FROM {t} WHERE seq <= 2",
            "FAILED at seq 1: missing: the entries at seq 1 to 2 are missing",
            id="oldest-without-checkpoint",
        ),
    ],
)
def test_changed_entries_are_detected(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner, statement: str, report: str
) -> None:
    fill(app, sidelog, 5)
    sql(app, sidelog, statement.format(t=TABLE))
    code, out = verify(runner)
    assert code == 1
    assert out.startswith(report)


def test_deleted_entry_in_the_middle_is_detected(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    fill(app, sidelog, 5)
    sql(app, sidelog, f"DELETE FROM {TABLE} WHERE seq = 3")
    code, out = verify(runner)
    assert code == 1
    assert out.startswith(
        "FAILED at seq 3: missing: the entry at seq 3 is missing (deleted)"
    )
    sql(app, sidelog, f"DELETE FROM {TABLE} WHERE seq = 4")
    assert verify(runner)[1].startswith(
        "FAILED at seq 3: missing: the entries at seq 3 to 4 are missing"
    )


def test_deleted_entry_renumbered_is_detected(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    fill(app, sidelog, 5)
    sql(
        app,
        sidelog,
        f"DELETE FROM {TABLE} WHERE seq = 3",
        f"UPDATE {TABLE} SET seq = -seq WHERE seq > 3",
        f"UPDATE {TABLE} SET seq = -seq - 1 WHERE seq < 0",
    )
    code, out = verify(runner)
    assert code == 1
    assert out.startswith(
        "FAILED at seq 3: missing: 1 entry was deleted here and the later ones"
        " renumbered"
    )


def test_deleted_newest_entries_are_detected_by_the_expected_head(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    entries = fill(app, sidelog, 5)
    saved = f"5:{entries[-1]['hash']}"
    sql(app, sidelog, f"DELETE FROM {TABLE} WHERE seq >= 4")
    code, out = verify(runner)
    assert code == 0
    assert out.startswith(f"OK: 3 entries, head {entries[2]['hash']}")
    code, out = verify(runner, "--expect-head", saved)
    assert code == 1
    assert out == (
        "FAILED at seq 4: missing: the chain ends at seq 3 but the expected head is"
        " at seq 5: the newest entries were deleted (3 entries verified before it)\n"
    )
    code, out = verify(runner, "--expect-head", entries[-1]["hash"])
    assert code == 1
    assert out.startswith("FAILED at seq 4: missing: the expected head")


def test_an_expected_head_just_before_the_range_is_checked(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """``--from 4 --expect-head 3:...``: the head is the entry the walk
    starts after, and its hash differs: rewritten there, not deleted."""
    entries = fill(app, sidelog, 6)
    code, out = verify(runner, "--from", "4", "--expect-head", f"3:{'a' * 64}")
    assert code == 1
    assert out.startswith(
        f"FAILED at seq 3: modified: its hash {entries[2]['hash']} is not the"
        f" expected head {'a' * 64}: the chain was rewritten up to here"
    )
    assert (
        verify(runner, "--from", "4", "--expect-head", f"3:{entries[2]['hash']}")[0]
        == 0
    )


def test_an_expected_head_before_the_range(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """``--from 5 --expect-head 3:HASH`` is a usage error. A HASH alone of
    seq 3 still fails (exit 1): the entry that carries it is not verified,
    and anyone can set a hash column to turn a failure into a usage error.
    The report says where the hash is, and how to verify from there."""
    entries = fill(app, sidelog, 8)
    code, out = verify(
        runner, "--from", "5", "--expect-head", f"3:{entries[2]['hash']}"
    )
    assert code == 2, out
    assert (
        "Error: the expected head's seq 3 is before the verified range (from seq"
        " 5); give a later head, or a smaller --from."
    ) in out
    code, out = verify(runner, "--from", "5", "--expect-head", entries[2]["hash"])
    assert code == 1, out
    assert out.startswith("FAILED at seq 9: missing: the expected head ")
    assert (
        "an entry before the verified range (seq 3), not verified here, carries"
        " that hash: if the head was saved then, verify from it (--from 3"
        f" --expect-head 3:{entries[2]['hash']})"
    ) in out
    assert verify(runner, "--from", "3", "--expect-head", entries[2]["hash"])[0] == 0
    # Just before the range (seq 4), in it, and unknown: as before.
    for entry in entries[3:]:
        assert verify(runner, "--from", "5", "--expect-head", entry["hash"])[0] == 0
    code, out = verify(runner, "--from", "5", "--expect-head", "b" * 64)
    assert code == 1
    assert out.startswith("FAILED at seq 9: missing: the expected head bbbb")


@pytest.mark.parametrize("seq", [2**63, 99999999999999999999])
def test_an_expected_heads_seq_beyond_any_is_a_usage_error(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner, seq: int
) -> None:
    """Capped as --from is: a seq no chain reaches failed as 'missing'."""
    entries = fill(app, sidelog, 2)
    code, out = verify(runner, "--expect-head", f"{seq}:{entries[1]['hash']}")
    assert code == 2, out
    assert f"the SEQ of SEQ:HASH must be a number from 1 to {2**63 - 1}" in out
    head = f"{2**63 - 1}:{entries[1]['hash']}"
    assert verify(runner, "--expect-head", head)[0] == 1


def test_an_expected_head_saved_before_a_prune(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """A head saved before a prune deleted it cannot be checked: with its
    seq, that is the usage error; as a hash alone, the failure says it may be
    that."""
    entries = fill(app, sidelog, 6)
    prune(app, sidelog, 4)
    saved = entries[2]["hash"]
    code, out = verify(runner, "--expect-head", f"3:{saved}")
    assert code == 2
    assert (
        "Error: the expected head's seq 3 was pruned (the chain goes on from the"
        " checkpoint at seq 4): a head saved before a prune cannot be checked"
    ) in out
    code, out = verify(runner, "--expect-head", saved)
    assert code == 1
    assert "or it was pruned (saved before the checkpoint at seq 4)" in out


def test_forged_entry_with_recomputed_hashes(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """Without a key a forger can recompute every later hash: the walk passes,
    a head saved before the forgery does not."""
    entries = fill(app, sidelog, 5)
    saved = f"5:{entries[-1]['hash']}"
    renumber_from(app, sidelog, 3)
    forge(app, sidelog, 3)
    rehash(app, sidelog, 3)
    code, out = verify(runner)
    assert (code, out.splitlines()[0][:15]) == (0, "OK: 6 entries, ")
    code, out = verify(runner, "--expect-head", saved)
    assert code == 1
    assert out.startswith("FAILED at seq 5: modified: its hash ")
    assert "is not the expected head" in out


def test_forged_entry_is_detected_with_a_key(
    keyed: tuple[Flask, SideLog, FlaskCliRunner],
) -> None:
    app, sidelog, runner = keyed
    fill(app, sidelog, 5)
    assert verify(runner)[0] == 0
    renumber_from(app, sidelog, 3)
    forge(app, sidelog, 3)
    rehash(app, sidelog, 3)  # with SHA-256: the forger lacks the key
    code, out = verify(runner)
    assert code == 1
    assert out.startswith(
        "FAILED at seq 3: inserted: its hash was made without SIDELOG_CHAIN_KEY"
    )


def test_forged_entry_with_a_wrong_key_is_detected(
    keyed: tuple[Flask, SideLog, FlaskCliRunner],
) -> None:
    app, sidelog, runner = keyed
    fill(app, sidelog, 5)
    renumber_from(app, sidelog, 3)
    forge(app, sidelog, 3)
    wrong = b"not the key, but as long"
    rehash(app, sidelog, 3, key=wrong, to_seq=3)
    code, out = verify(runner)
    assert code == 1
    assert out.startswith("FAILED at seq 3: inserted: this entry is not part of the")
    rehash(app, sidelog, 3, key=wrong)
    code, out = verify(runner)
    assert code == 1
    assert out.startswith("FAILED at seq 3: modified: it does not match its hash")
    # Appended at the end, the forgery is found too.
    sql(app, sidelog, f"DELETE FROM {TABLE} WHERE seq >= 3")
    assert verify(runner)[0] == 0
    forge(app, sidelog, 3)
    rehash(app, sidelog, 3, key=wrong)
    code, out = verify(runner)
    assert code == 1
    assert out.startswith("FAILED at seq 3: modified: the newest entry")


@pytest.mark.parametrize("backend", ["sqlite_file"])
@pytest.mark.parametrize("entries", [1, 2])
def test_verify_of_fewer_than_three_entries_without_the_key(
    keyed: tuple[Flask, SideLog, FlaskCliRunner],
    database_uri: str,
    tmp_path: t.Any,
    entries: int,
) -> None:
    """Too few entries to tell a left-out key from tampering: the report
    says to check the key, and that it cannot tell."""
    app, sidelog, runner = keyed
    fill(app, sidelog, entries)
    other, _, _ = make_app(database_uri, str(tmp_path / "other"), CHAINED)
    try:
        code, out = verify(other.test_cli_runner())
    finally:
        dispose(other)
    assert code == 1
    assert out.startswith("FAILED at seq 1: modified: ")
    assert (
        "; if the entries were written with SIDELOG_CHAIN_KEY, check that it is set"
        " here (with fewer than three entries, verify cannot tell)"
    ) in out


def test_an_entry_moved_two_places_is_reordered(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """In mid-chain, the entry two after the break was read ahead for the
    key hint and then left out of the search for where it belongs."""
    fill(app, sidelog, 7)
    swap = (
        f"UPDATE {TABLE} SET seq = -1 WHERE seq = 3;"
        f" UPDATE {TABLE} SET seq = 3 WHERE seq = 5;"
        f" UPDATE {TABLE} SET seq = 5 WHERE seq = -1"
    )
    for statement in swap.split(";"):
        sql(app, sidelog, statement)
    code, out = verify(runner)
    assert code == 1
    assert out.startswith(
        "FAILED at seq 3: reordered: the entry now at seq 5 belongs at seq 3"
    ), out


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
@pytest.mark.parametrize(
    ("key", "hint"),
    [
        (None, "as when the entries were written with SIDELOG_CHAIN_KEY and it is"),
        ("another key, as long as it", "as when SIDELOG_CHAIN_KEY differs from the"),
    ],
    ids=["missing", "wrong"],
)
@pytest.mark.parametrize("entries", [3, 5])
def test_verify_without_the_chains_key_hints_at_it(
    keyed: tuple[Flask, SideLog, FlaskCliRunner],
    database_uri: str,
    tmp_path: t.Any,
    key: str | None,
    hint: str,
    entries: int,
) -> None:
    """Verified without the key (or with another), a keyed chain failed at
    seq 1 as 'modified', and nothing suggested the key. The hint needs the
    first three entries to fail: a tamper of one or two does not blame it."""
    app, sidelog, runner = keyed
    fill(app, sidelog, entries)
    config = {**CHAINED, "SIDELOG_CHAIN_KEY": key}
    other, _, _ = make_app(database_uri, str(tmp_path / "other"), config)
    try:
        runner = other.test_cli_runner()
        code, out = verify(runner)
        assert code == 1
        assert out.startswith("FAILED at seq 1: modified: ")
        assert f"none of the first three entries matches its hash, {hint}" in out
        result = runner.invoke(args=["sidelog", "prune", "--before", "0s", "-y"])
        assert result.exit_code == 1
        assert hint in result.output
    finally:
        dispose(other)
    # With the key, it verifies; a break of one entry there is no key matter.
    assert verify(keyed[2])[0] == 0
    sql(app, sidelog, f"UPDATE {TABLE} SET event = 'x' WHERE seq = 1")
    code, out = verify(keyed[2])
    assert code == 1
    assert "next entry follows from that hash" in out
    assert "SIDELOG_CHAIN_KEY" not in out
    # The first two changed: the third still follows from the second's hash.
    sql(app, sidelog, f"UPDATE {TABLE} SET event = 'y' WHERE seq < 3")
    code, out = verify(keyed[2])
    assert (code, out.startswith("FAILED at seq 1: modified: ")) == (1, True)
    assert "SIDELOG_CHAIN_KEY" not in out


def test_swapped_entries_are_detected(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    fill(app, sidelog, 6)
    swap = (
        f"UPDATE {TABLE} SET seq = -1 WHERE seq = :a",
        f"UPDATE {TABLE} SET seq = :a WHERE seq = :b",
        f"UPDATE {TABLE} SET seq = :b WHERE seq = -1",
    )
    sql(app, sidelog, *swap, a=2, b=5)
    code, out = verify(runner)
    assert code == 1
    assert out.startswith(
        "FAILED at seq 2: reordered: the entry now at seq 5 belongs at seq 2"
    )
    sql(app, sidelog, *swap, a=2, b=5)
    assert verify(runner)[0] == 0
    sql(app, sidelog, *swap, a=3, b=4)
    code, out = verify(runner)
    assert code == 1
    assert out.startswith(
        "FAILED at seq 3: reordered: the entries at seq 3 and 4 were swapped"
    )


def prune(app: Flask, sidelog: SideLog, up_to: int, key: bytes | None = None) -> None:
    """What ``flask sidelog prune`` does: checkpoint and delete in one
    transaction."""
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        table = writer.table
        with writer.engine.begin() as conn:
            last = conn.execute(
                sa.select(table.c.seq, table.c.hash)
                .where(table.c.seq <= up_to)
                .order_by(table.c.seq.desc())
                .limit(1)
            ).one()
            count = conn.execute(sa.delete(table).where(table.c.seq <= up_to)).rowcount
            chain.record_checkpoint(conn, table, last.seq, last.hash, count, key)


def test_pruning_with_a_checkpoint_keeps_the_chain_verifiable(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    entries = fill(app, sidelog, 10)
    prune(app, sidelog, 4)
    code, out = verify(runner)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("Checkpoint: entries up to seq 4 pruned (4 at ")
    assert lines[0].endswith(f"hash {entries[3]['hash']}")
    assert lines[1] == f"OK: 6 entries, head {entries[-1]['hash']}"
    code, out = verify(runner, "--from", "2")
    assert code == 2
    assert "entries up to seq 4 were pruned; use --from 5" in out
    assert verify(runner, "--from", "5")[0] == 0
    assert verify(runner, "--expect-head", f"4:{entries[3]['hash']}")[0] == 0
    # Pruning everything: the next entry continues from the checkpoint.
    prune(app, sidelog, 10)
    assert (
        verify(runner)[1].splitlines()[1]
        == f"OK: 0 entries, head {entries[-1]['hash']}"
    )
    with app.app_context():
        assert sidelog.log("after")["seq"] == 11
    code, out = verify(runner)
    assert code == 0
    assert "OK: 1 entries" in out


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_a_prune_that_commits_during_verify_is_not_a_deletion(
    tmp_path: t.Any,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    """verify read the checkpoint just before a prune committed a newer one.
    On PostgreSQL its reads share one snapshot, from before the prune; on
    SQLite the walk starts at a gap, and again from the newer checkpoint."""
    uri = new_database_uri(backend, tmp_path, request)
    app, _, sidelog = make_app(uri, str(tmp_path / "i"), CHAINED)
    read = chain.latest_checkpoint
    reads: list[object] = []

    def prune_after_the_first_read(*args: t.Any) -> t.Any:
        found = read(*args)
        reads.append(found)
        if len(reads) == 1:
            prune(app, sidelog, 3)
        return found

    try:
        fill(app, sidelog, 5)
        monkeypatch.setattr(chain, "latest_checkpoint", prune_after_the_first_read)
        with app.app_context():
            result = sidelog.verify()
    finally:
        dispose(app)
    assert result.ok, str(result)
    pruned = 0 if backend == "postgres" else 3
    assert (result.entries, result.head_seq) == (5 - pruned, 5)
    assert (result.checkpoint.seq if result.checkpoint else 0) == pruned
    assert reads[0] is None


def test_forged_checkpoint_is_detected_with_a_key(
    keyed: tuple[Flask, SideLog, FlaskCliRunner],
) -> None:
    app, sidelog, runner = keyed
    fill(app, sidelog, 5)
    prune(app, sidelog, 2, key=KEY.encode())
    assert verify(runner)[0] == 0
    sql(app, sidelog, f"DELETE FROM {TABLE} WHERE seq <= 4")
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        with writer.engine.begin() as conn:
            hash4 = "0" * 64
            chain.record_checkpoint(conn, writer.table, 4, hash4, 2)  # no key
    code, out = verify(runner)
    assert code == 1
    assert out.startswith("Checkpoint: entries up to seq 4")
    assert "FAILED at seq 4: modified: the checkpoint does not match its seal" in out


def test_checkpoint_with_entries_left_is_detected(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """A checkpoint inserted to skip the walk over entries that still exist."""
    entries = fill(app, sidelog, 5)
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        with writer.engine.begin() as conn:
            chain.record_checkpoint(conn, writer.table, 5, entries[-1]["hash"], 5)
    code, out = verify(runner)
    assert code == 1
    assert "FAILED at seq 5: inserted: 5 entries at or before the checkpoint" in out


def test_bad_options_say_what_is_accepted(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    fill(app, sidelog, 2)
    code, out = verify(runner, "--expect-head", "nope")
    assert code == 2
    assert "expected a head as SEQ:HASH or HASH (64 hex digits), got 'nope'" in out
    for seq in ("x", "\u00b2"):  # a letter; a superscript two, a digit to isdigit()
        code, out = verify(runner, "--expect-head", f"{seq}:" + "a" * 64)
        assert code == 2
        assert "SEQ of SEQ:HASH must be a number from 1 to 9223" in out
    code, out = verify(runner, "--from", "0")
    assert code == 2
    assert "Traceback" not in out
    code, out = verify(runner, "--from", "9")
    assert code == 2
    assert "there is no entry at seq 8 to start after" in out


def test_chain_is_on_by_default(tmp_path: t.Any) -> None:
    app, _, sidelog = make_app("sqlite://", str(tmp_path / "i"))
    try:
        assert app.config["SIDELOG_CHAIN"] is True
        (entry,) = fill(app, sidelog, 1)
        assert entry["seq"] == 1
        assert [(r["seq"], r["hash"]) for r in rows(app, sidelog)] == [
            (1, entry["hash"])
        ]
        assert verify(app.test_cli_runner()) == (
            0,
            f"OK: 1 entries, head {entry['hash']}\n"
            f"To check this head later: --expect-head 1:{entry['hash']}\n",
        )
    finally:
        dispose(app)


def test_chain_off_writes_no_chain_and_verify_says_so(
    tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    uri = new_database_uri("sqlite_file", tmp_path, request)
    app, _, sidelog = make_app(uri, str(tmp_path / "i"), {"SIDELOG_CHAIN": False})
    try:
        entries = fill(app, sidelog, 2)
        assert "seq" not in entries[0]
        assert [(r["seq"], r["hash"]) for r in rows(app, sidelog)] == [(None, None)] * 2
        code, out = verify(app.test_cli_runner())
        assert code == 1
        assert out.startswith(
            "FAILED at seq 1: inserted: 2 entries have no chain position"
        )
    finally:
        dispose(app)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"SIDELOG_CHAIN": "yes"}, "SIDELOG_CHAIN must be True or False, got 'yes'"),
        ({"SIDELOG_CHAIN_KEY": "short"}, "at least 16 bytes long"),
        ({"SIDELOG_CHAIN_KEY": 12345}, "a secret str or bytes"),
    ],
)
def test_bad_chain_settings_say_what_is_accepted(
    config: dict[str, t.Any], message: str, tmp_path: t.Any
) -> None:
    with pytest.raises(ValueError, match=message):
        make_app("sqlite://", str(tmp_path), config)


def test_record_is_the_documented_format() -> None:
    """The example of docs/tamper-evidence.rst, byte for byte."""
    values = [None] * len(chain.HASHED_FIELDS)
    values[0] = "00000000-0000-4000-8000-000000000000"
    values[1] = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    values[2] = "user.login"
    values[3] = "info"
    values[4] = "\u00e9ve"
    values[14] = 12.5
    values[16] = {"b": [1.5, 10**20], "a": "\u2603"}
    message = chain.record(values, 1, chain.GENESIS)
    assert message == (
        b'[1,1,"' + b"0" * 64 + b'","00000000-0000-4000-8000-000000000000",'
        b'"2026-01-02T03:04:05.000006Z","user.login","info","\\u00e9ve",'
        b"null,null,null,null,null,null,null,null,null,12.5,null,"
        b'{"a":"\\u2603","b":[1.5,100000000000000000000]}]'
    )
    assert chain.make_hasher(None)(message) == hashlib.sha256(message).hexdigest()
    assert chain.make_hasher(None)(message) == (
        "a0542203192daa57b0546fcff73b8efdcfa8c97fea73d684155021cfaa33dede"
    )
    assert chain.make_hasher(b"k" * 32)(message) == (
        "32003dba2ec720c02aaad2e6875642fcb35c62e497300e01f08c8780d9aef0b5"
    )


def _write_from_process(uri: str, instance: str, threads: int, each: int) -> int:
    """Write ``threads * each`` entries from threads of a new process; return
    how many failed."""

    app, _, sidelog = make_app(
        uri, instance, {**CHAINED, "SIDELOG_DATABASE_URI": uri}, False
    )
    failed: list[object] = []

    def count(sender: Flask, **kwargs: t.Any) -> None:
        failed.append(kwargs)

    def work(n: int) -> None:
        for i in range(each):
            with app.app_context():
                sidelog.log("load", data={"thread": n, "i": i})

    with entry_failed.connected_to(count, app):
        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    dispose(app)
    return len(failed)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend_name", "processes", "threads", "each"),
    [("postgres", 8, 4, 125), ("sqlite_file", 4, 2, 50)],
)
def test_concurrent_writers_make_one_unbroken_chain(
    backend_name: str,
    processes: int,
    threads: int,
    each: int,
    tmp_path: t.Any,
    request: pytest.FixtureRequest,
) -> None:
    uri = new_database_uri(backend_name, tmp_path, request)
    app, _, sidelog = make_app(uri, str(tmp_path / "i"), CHAINED)
    try:
        with app.app_context():
            sidelog.create_table()
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes) as pool:
            failed = pool.starmap(
                _write_from_process,
                [(uri, str(tmp_path / "i"), threads, each)] * processes,
            )
        assert failed == [0] * processes
        total = processes * threads * each
        with app.app_context():
            result = sidelog.verify()
        assert result.ok, str(result)
        assert (result.entries, result.head_seq) == (total, total)
    finally:
        dispose(app)


def test_undecodable_stored_value_is_detected(
    tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    """SQLite stores any text in the JSON column; verify must not crash on it."""
    uri = new_database_uri("sqlite_file", tmp_path, request)
    app, _, sidelog = make_app(uri, str(tmp_path / "i"), CHAINED)
    try:
        fill(app, sidelog, 4)
        sql(app, sidelog, f"UPDATE {TABLE} SET data = 'not json' WHERE seq = 2")
        sql(app, sidelog, f"UPDATE {TABLE} SET data = '{{' WHERE seq = 4")
        code, out = verify(app.test_cli_runner())
        assert code == 1
        assert out.startswith(
            "FAILED at seq 2: modified: its data is not JSON or its created_at"
        )
        sql(app, sidelog, f"UPDATE {TABLE} SET data = '{{\"i\": 2}}' WHERE seq = 2")
        code, out = verify(app.test_cli_runner())
        assert out.startswith("FAILED at seq 4: modified: its data is not JSON")
        # Diagnosing a change next to an undecodable entry does not crash.
        sql(app, sidelog, f"UPDATE {TABLE} SET data = 'x' WHERE seq = 3")
        sql(app, sidelog, f"UPDATE {TABLE} SET actor = 'm' WHERE seq = 2")
        code, out = verify(app.test_cli_runner())
        assert out.startswith("FAILED at seq 2: modified: it does not match its hash")
    finally:
        dispose(app)


@pytest.mark.parametrize("seq", [0, -1])
def test_an_entry_below_the_first_seq_is_detected(
    app: Flask, sidelog: SideLog, seq: int
) -> None:
    """A row at seq 0 or below sits before the chain's first position, which
    the walk starts from: it is there, so it was inserted."""
    fill(app, sidelog, 3)
    forge(app, sidelog, seq)
    code, out = verify(app.test_cli_runner())
    assert code == 1, out
    assert out.startswith(
        f"FAILED at seq {seq}: inserted: 1 entries have a seq before 1, where"
        " the chain starts"
    )


UNLIKE_THE_LOG = "its data is not JSON or its created_at not a time, as the log"


@pytest.mark.parametrize(
    ("backend", "statement"),
    [
        # The same instant, but compared as text by SQLite's queries: an
        # entry moved out of (or into) a time range.
        ("sqlite_file", "created_at = replace(created_at, ' ', 'T')"),
        ("sqlite_file", "created_at = created_at || '+00:00'"),
        ("sqlite_file", "created_at = replace(created_at, ' ', 'T') || 'Z'"),
        # The same object to json.loads, but SQLite's json_extract reads the
        # first of the two keys.
        ("sqlite_file", r"""data = '{"i"\:999,"i"\:2}'"""),  # \: for text()
        ("postgres", r"""data = '{"i"\:999,"i"\:2}'"""),
        # SQLite keeps any type in any column.
        ("sqlite_file", "data = 5"),
        ("sqlite_file", "data = CAST(data AS BLOB)"),
        ("sqlite_file", "created_at = 5"),
        ("sqlite_file", "event = X'6162'"),
    ],
)
def test_a_value_stored_unlike_the_log_is_detected(
    tmp_path: t.Any, request: pytest.FixtureRequest, backend: str, statement: str
) -> None:
    code, out = verify_after(tmp_path, request, backend, statement, seq=2)
    assert code == 1, out
    assert out.startswith(f"FAILED at seq 2: modified: {UNLIKE_THE_LOG}")


def test_a_seq_that_is_not_a_number_is_detected(
    tmp_path: t.Any, request: pytest.FixtureRequest
) -> None:
    """SQLite keeps text in an integer column: that is a changed entry, not
    a usage error."""
    code, out = verify_after(tmp_path, request, "sqlite_file", "seq = 'x'", seq=3)
    assert code == 1, out
    assert out.startswith(
        "FAILED at seq 3: modified: its seq 'x' is not a whole number"
    )


def verify_after(
    tmp_path: t.Any,
    request: pytest.FixtureRequest,
    backend: str,
    statement: str,
    seq: int,
) -> tuple[int, str]:
    """``verify`` of three entries, after ``UPDATE ... SET statement`` of the
    one at ``seq``."""
    uri = new_database_uri(backend, tmp_path, request)
    app, _, sidelog = make_app(uri, str(tmp_path / "i"), CHAINED)
    try:
        fill(app, sidelog, 3)
        sql(app, sidelog, f"UPDATE {TABLE} SET {statement} WHERE seq = {seq}")
        return verify(app.test_cli_runner())
    finally:
        dispose(app)


@pytest.mark.parametrize("how", ["table", "metadata"])
def test_checkpoints_table_is_created_with_the_entries_table(
    how: str, tmp_path: t.Any
) -> None:
    metadata = sa.MetaData()
    table = make_entries_table("log", metadata)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    if how == "table":
        table.create(engine)
    else:
        metadata.create_all(engine)
    assert sorted(sa.inspect(engine).get_table_names()) == ["log", "log_checkpoints"]
    engine.dispose()


def test_prune_command_keeps_the_chain_verifiable(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """``flask sidelog prune`` on a chained log: it deletes by chain position
    up to the first entry it keeps, so an old-dated entry that landed late
    (a replayed one) stays, and verify still proves the rest."""
    fill(app, sidelog, 10)
    old = datetime.now(timezone.utc) - timedelta(days=2)
    with app.app_context(), sidelog.log_session() as session:
        table = app.extensions["sidelog"].table
        session.execute(
            sa.update(table)
            .where((table.c.seq <= 6) | (table.c.seq == 8))
            .values(created_at=old)
        )
    # Re-hash what the update changed, as the writer would have stored it.
    rehash(app, sidelog, 1)
    assert verify(runner)[0] == 0
    result = runner.invoke(args=["sidelog", "prune", "--before", "1d", "--yes"])
    assert result.exit_code == 0, result.output
    assert "Deleted 6 entries" in result.output
    assert [r["seq"] for r in rows(app, sidelog)] == [7, 8, 9, 10]
    code, out = verify(runner)
    assert code == 0, out
    assert out.splitlines()[0].startswith("Checkpoint: entries up to seq 6 pruned")


@pytest.mark.parametrize(
    ("tamper", "report"),
    [
        (f"DELETE FROM {TABLE} WHERE seq = 2", "missing"),
        (f"UPDATE {TABLE} SET actor = 'mallory' WHERE seq = 2", "modified"),
    ],
)
def test_prune_refuses_to_delete_a_broken_range(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner, tamper: str, report: str
) -> None:
    """Pruning entries that do not verify would delete the evidence, and
    the checkpoint would make the rest verify: prune refuses, keeping all."""
    fill(app, sidelog, 6)
    old = datetime.now(timezone.utc) - timedelta(days=2)
    with app.app_context(), sidelog.log_session() as session:
        table = app.extensions["sidelog"].table
        session.execute(sa.update(table).where(table.c.seq <= 4).values(created_at=old))
    rehash(app, sidelog, 1)
    sql(app, sidelog, tamper)
    kept = rows(app, sidelog)
    result = runner.invoke(args=["sidelog", "prune", "--before", "1d", "--yes"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(
        f"Error: The chain is broken at seq 2 ({report}:"
    ), result.output
    assert "Traceback" not in result.output
    assert rows(app, sidelog) == kept
    code, out = verify(runner)
    assert (code, out.split(":")[0]) == (1, "FAILED at seq 2")


def test_prune_in_batches_records_a_checkpoint_each(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    fill(app, sidelog, 5)
    with app.app_context():
        later = datetime.now(timezone.utc) + timedelta(days=1)
        assert sidelog.prune(later, dry_run=True) == 5
        assert sidelog.prune(later, batch_size=2) == 5
        with sidelog.log_session() as session:
            seqs = session.scalars(sa.text(f"SELECT seq FROM {TABLE}_checkpoints"))
            assert sorted(seqs) == [2, 4, 5]
    assert verify(runner)[0] == 0
    fill(app, sidelog, 1)
    assert [r["seq"] for r in rows(app, sidelog)] == [6]
    assert verify(runner)[0] == 0


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_replayed_entries_join_the_chain(
    backend: str, database_uri: str, tmp_path: t.Any
) -> None:
    """Entries spooled while the table was missing join the chain when
    ``replay`` lands them, keep their time, and verify passes."""
    app, _, sidelog = make_app(
        database_uri,
        str(tmp_path / "instance"),
        {**CHAINED, "SIDELOG_CREATE_TABLE": False},
    )
    runner = app.test_cli_runner()
    try:
        with app.app_context():
            spooled = [sidelog.log(f"while.missing.{i}") for i in range(3)]
        assert runner.invoke(args=["sidelog", "init"]).exit_code == 0
        fill(app, sidelog, 2)
        result = runner.invoke(args=["sidelog", "replay"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("Moved 3 entries")
        stored = rows(app, sidelog)
        assert [r["seq"] for r in stored] == [1, 2, 3, 4, 5]
        replayed = {r["uuid"]: r for r in stored[2:]}
        assert set(replayed) == {e["uuid"] for e in spooled}
        code, out = verify(runner)
        assert code == 0, out
        assert out.startswith("OK: 5 entries")
        assert runner.invoke(args=["sidelog", "replay"]).output.startswith(
            "Moved 0 entries"
        )
        assert verify(runner)[0] == 0
    finally:
        dispose(app)


@pytest.mark.parametrize("backend", ["sqlite_file", "postgres"])
def test_prune_deletes_old_entries_outside_the_chain(
    backend: str, database_uri: str, tmp_path: t.Any
) -> None:
    """Entries written while the chain was off have no place in it; a prune
    of the chained log deletes them by age, and verify passes without them."""
    unchained, _, _ = make_app(
        database_uri, str(tmp_path / "instance"), {"SIDELOG_CHAIN": False}
    )
    try:
        add_entries(
            unchained, *[dict(event="before.chain", created_at=ago(days=40))] * 2
        )
    finally:
        dispose(unchained)
    app, _, sidelog = make_app(database_uri, str(tmp_path / "instance"), CHAINED)
    runner = app.test_cli_runner()
    try:
        add_entries(
            app,
            dict(event="old", created_at=ago(days=35)),
            dict(event="new", created_at=ago(days=1)),
        )
        assert "2 entries have no chain position" in verify(runner)[1]
        with app.app_context():
            assert sidelog.prune(ago(days=30), dry_run=True) == 3
            assert sidelog.prune(ago(days=30), batch_size=1) == 3
            assert [e["event"] for e in sidelog.entries()] == ["new"]
        code, out = verify(runner)
        assert code == 0, out
        assert out.splitlines()[0].startswith("Checkpoint: entries up to seq 1 pruned")
    finally:
        dispose(app)


_text_or_none = st.none() | st.text()
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(_text_or_none, min_size=13, max_size=13),
    status=st.none() | st.integers(100, 599),
    duration=st.none() | st.floats(0, 1e9, allow_nan=False),
    data=st.none() | st.dictionaries(st.text(max_size=5), _json, max_size=4),
    at=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        lambda d: d.replace(tzinfo=timezone.utc)
    ),
)
def test_link_hashes_the_documented_record(
    text: list[str | None],
    status: int | None,
    duration: float | None,
    data: dict[str, t.Any] | None,
    at: datetime,
) -> None:
    """The writer's quick serialisation is exactly :func:`chain.record`."""
    names = [
        n
        for n in chain.HASHED_FIELDS
        if n not in ("created_at", "status_code", "duration_ms", "data")
    ]
    entry: dict[str, t.Any] = dict(zip(names, text, strict=True))
    entry.update(created_at=at, status_code=status, duration_ms=duration, data=data)
    values = [entry[name] for name in chain.HASHED_FIELDS]
    expected = chain.record(values, 7, "p")
    assert f'[1,7,"p",{chain._stored_tail(entry)[1:]}'.encode("ascii") == expected


class Event(str, enum.Enum):
    LOGIN = "login"


def test_str_enum_event_is_stored_and_hashed_as_its_text(
    app: Flask, sidelog: SideLog, runner: FlaskCliRunner
) -> None:
    """str(Event.LOGIN) is "Event.LOGIN"; the event holds its text, "login",
    and the chain hashes what is stored."""
    with app.app_context():
        sidelog.log(Event.LOGIN)
        (entry,) = sidelog.entries()
    assert entry["event"] == "login"
    code, out = verify(runner)
    assert code == 0, out


@pytest.mark.postgres
def test_chain_holds_under_a_stricter_default_isolation(
    postgres: t.Any, tmp_path: t.Any
) -> None:
    """The head is read after the lock with a snapshot of its own: the log
    engine runs READ COMMITTED whatever the server's default."""
    uri = postgres.create_database("chain_repeatable_read")
    postgres.psql(
        "ALTER DATABASE chain_repeatable_read"
        " SET default_transaction_isolation = 'repeatable read'"
    )
    app, _, sidelog = make_app(
        uri, str(tmp_path), {"SIDELOG_WRITE_MODE": "sync"}, with_db=False
    )

    try:
        with failures(app) as failed:
            with app.app_context():
                sidelog.create_table()
            log_from_threads(app, sidelog, 8)
        with app.app_context():
            result = sidelog.verify()
    finally:
        dispose(app)
    assert failed == []
    assert result.ok and result.entries == 80


@pytest.mark.postgres
def test_table_name_with_a_percent_sign(postgres: t.Any, tmp_path: t.Any) -> None:
    """Statements sent without parameters (COPY, the chain's lock and head)
    must not keep the doubled % that SQLAlchemy escapes identifiers with."""
    uri = postgres.create_database("percent_table")
    app, _, sidelog = make_app(
        uri, str(tmp_path), {"SIDELOG_TABLE": "audit%log"}, with_db=False
    )
    try:
        with app.app_context():
            sidelog.log("single")
            writer = app.extensions["sidelog"].writer
            writer.insert([make_entry("batch.1"), make_entry("batch.2")])
            events = [e["event"] for e in sidelog.entries()]
            result = sidelog.verify()
    finally:
        dispose(app)
    assert events == ["single", "batch.1", "batch.2"]
    assert result.ok


class _Shown(str):
    """Text whose str() is not its text, as a StrEnum member's may be."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"Shown({str.__str__(self)})"


@pytest.mark.parametrize("size", [1, 2, 6], ids=["one", "few", "copy"])
def test_text_of_a_str_subclass_is_hashed_as_stored(
    app: Flask, sidelog: SideLog, size: int
) -> None:
    """Entries made past make_entry (spooled, replayed, or by hand) may hold a
    str subclass: the database stores its text, and the chain must hash that,
    not its str()."""
    entries = []
    for _ in range(size):
        entry = make_entry("shown")
        entry.update(main_tx=_Shown("committed"), uuid=_Shown(entry["uuid"]))
        entries.append(entry)
    with app.app_context():
        app.extensions["sidelog"].writer.insert(entries)
        assert sidelog.verify().ok
        assert {e["main_tx"] for e in sidelog.entries()} == {"committed"}


@pytest.fixture
def heads_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Grows by one each time the app takes the chain's lock and reads its
    head itself, instead of the database's append function."""
    read: list[int] = []
    lock_and_read_head = chain.lock_and_read_head

    def counted(*args: t.Any, **kwargs: t.Any) -> tuple[int, str]:
        read.append(1)
        return lock_and_read_head(*args, **kwargs)

    monkeypatch.setattr(chain, "lock_and_read_head", counted)
    return read


@pytest.mark.postgres
@pytest.mark.parametrize("keyed_chain", [False, True], ids=["unkeyed", "keyed"])
def test_postgresql_links_small_batches_unless_the_chain_is_keyed(
    postgres: t.Any, tmp_path: t.Any, keyed_chain: bool, heads_read: list[int]
) -> None:
    """On PostgreSQL, batches of up to SERVER_LINKED_ROWS entries of an
    unkeyed chain go to the table's append function, which hashes them as
    the app would (verify recomputes every hash). The app links the first
    entry of a new chain, larger batches, a value JSON cannot hold, and every
    entry of a keyed chain: its key must not reach the database."""
    uri = postgres.create_database(f"server_linked_{keyed_chain}")
    config = {**CHAINED, "SIDELOG_WRITE_MODE": "sync"}
    if keyed_chain:
        config["SIDELOG_CHAIN_KEY"] = KEY
    app, _, sidelog = make_app(uri, str(tmp_path), config, with_db=False)
    odd = {"é": "\u2028", "q": 'it\'s \\ "quoted"', "n": None, "f": 0.1}
    try:
        with app.app_context():
            written = [sidelog.log("first", data=odd)]
            assert heads_read == [1]  # a new chain has no head to give
            writer = app.extensions["sidelog"].writer
            east = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=9)))
            batches = [
                [
                    make_entry(f"few.{i}", data={"i": i})
                    for i in range(SERVER_LINKED_ROWS)
                ],
                [make_entry("many") for _ in range(SERVER_LINKED_ROWS + 1)],
                [make_entry("nan", duration_ms=float("nan"))],
                [
                    {
                        **make_entry("east", actor="ann", status_code=201),
                        "created_at": east,
                    }
                ],
            ]
            for batch in batches:
                writer.insert(batch)
                written += batch
            written.append(sidelog.log("last", data=odd))
            result = sidelog.verify()
            stored = sidelog.entries(limit=1000)
    finally:
        dispose(app)
    # The first, "many" and "nan" batches are linked by the app.
    assert len(heads_read) == (6 if keyed_chain else 3)
    assert result.ok, str(result)
    assert [e["seq"] for e in written] == list(range(1, len(written) + 1))
    assert {e["seq"]: e["hash"] for e in stored} == {
        e["seq"]: e["hash"] for e in written
    }
    east_stored = next(e for e in stored if e["event"] == "east")
    assert (east_stored["created_at"], east_stored["status_code"]) == (east, 201)


@pytest.mark.postgres
def test_a_missing_append_function_costs_a_round_trip_not_an_entry(
    postgres: t.Any, tmp_path: t.Any, heads_read: list[int]
) -> None:
    """A function dropped while the app runs, or missing from a table made
    before it existed, leaves the linking to the app. The table's first
    write with SIDELOG_CREATE_TABLE on, and ``create_table()`` (``flask
    sidelog init``), add it to an existing table."""
    uri = postgres.create_database("append_function_missing")
    drop = "DROP FUNCTION sidelog_entries_append_v1(JSONB)"
    configs = [
        {**CHAINED, "SIDELOG_WRITE_MODE": "sync", "SIDELOG_CREATE_TABLE": create}
        for create in (True, False, True)
    ]
    apps = [
        make_app(uri, str(tmp_path / str(i)), config, with_db=False)[::2]
        for i, config in enumerate(configs)
    ]
    try:
        (app, sidelog), (managed_app, managed), (later_app, later) = apps
        with app.app_context():
            sidelog.log("one")
            sidelog.log("two")
            assert len(heads_read) == 1  # "two" went to the function
            sql(app, sidelog, drop)
            with failures(app) as failed:
                sidelog.log("dropped while running")
                sidelog.log("after")
            assert len(heads_read) == 3
        with managed_app.app_context():
            managed.log("no function, table made elsewhere")
            assert len(heads_read) == 4
            assert managed.create_table() is False  # the table was there
            managed.log("still linked by this app")
            assert len(heads_read) == 5
        with later_app.app_context():
            later.log("a new process: the function")
            assert len(heads_read) == 5
            sql(later_app, later, drop)
        # A new process on a table without the function creates it.
        fresh_app, _, fresh = make_app(
            uri, str(tmp_path / "f"), configs[0], with_db=False
        )
        apps.append((fresh_app, fresh))
        with fresh_app.app_context():
            fresh.log("created before the first write, which it links")
            assert len(heads_read) == 5
            result = fresh.verify()
    finally:
        for app, _ in apps:
            dispose(app)
    assert failed == []
    assert result.ok and result.entries == 8, str(result)


class _EqualsAnything(str):
    """Text that says it equals anything, None included."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


@pytest.mark.parametrize("size", [1, 10, 40])
def test_values_are_stored_as_the_chain_hashed_them(
    app: Flask, sidelog: SideLog, size: int
) -> None:
    """Whatever path a batch takes (on PostgreSQL: up to 4 rows bound in the
    client, up to 32 through the append function, more by COPY): -0.0 (as
    a float or as text), a float or text status code and text that equals
    None are stored as hashed."""
    odd = [
        {"duration_ms": -0.0, "status_code": 201.0, "outcome": _EqualsAnything("ok")},
        {"duration_ms": "-0.0", "status_code": "201", "outcome": "ok"},
    ]
    batch = [
        make_entry("plain") if i % 2 else make_entry("odd", **odd[i // 2 % 2])
        for i in range(size)
    ]
    with app.app_context():
        sidelog.log("first")  # so that the chain has a head
        app.extensions["sidelog"].writer.insert(batch)
        result = sidelog.verify()
        stored = [e for e in sidelog.entries(limit=100) if e["event"] == "odd"]
    assert result.ok, str(result)
    assert len(stored) == (size + 1) // 2
    for entry in stored:
        assert (entry["duration_ms"], entry["status_code"], entry["outcome"]) == (
            0.0,
            201,
            "ok",
        )


def test_replayed_entries_missing_fields_are_inserted_together(
    app: Flask, sidelog: SideLog
) -> None:
    """Entries not made by make_entry (a spool of an older version) may lack
    fields: one whose field the chain converts keeps the others missing, so
    that the batch still has one set of columns."""
    made = [make_entry("old.1"), make_entry("old.2")]
    for entry in made:
        del entry["actor"]
    made[0]["status_code"] = "201"
    with app.app_context():
        sidelog.log("first")
        assert app.extensions["sidelog"].writer.insert_missing(made) == 2
        result = sidelog.verify()
        stored = {e["event"]: e["status_code"] for e in sidelog.entries()}
    assert result.ok, str(result)
    assert stored == {"first": None, "old.1": 201, "old.2": None}


@pytest.fixture
def limited_role(postgres: t.Any) -> str:
    """A login role that may only read and insert: no function, no table of
    its own (PostgreSQL 15 gives PUBLIC no CREATE on schema public)."""
    postgres.psql(
        "DO $$ BEGIN CREATE ROLE sidelog_app LOGIN;"
        " EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    return "sidelog_app"


def _grant(postgres: t.Any, database: str, role: str) -> None:
    engine = sa.create_engine(postgres.url_for(database), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(
            f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role};"
            f" GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        )
    engine.dispose()


@pytest.mark.postgres
def test_a_role_that_may_not_run_the_append_function_still_writes(
    postgres: t.Any, tmp_path: t.Any, limited_role: str, heads_read: list[int]
) -> None:
    """EXECUTE revoked from PUBLIC (a common hardening step): the app links,
    and ``flask sidelog init`` by that role, which may not create a
    function either, still says the table exists."""
    uri = postgres.create_database("append_function_revoked")
    owner, _, owner_log = make_app(uri, str(tmp_path / "o"), CHAINED, with_db=False)
    try:
        with owner.app_context():
            owner_log.log("by the owner")
        sql(
            owner,
            owner_log,
            "REVOKE EXECUTE ON FUNCTION sidelog_entries_append_v1(JSONB) FROM PUBLIC",
        )
        _grant(postgres, "append_function_revoked", limited_role)
        limited_uri = uri.replace("postgres@", f"{limited_role}@")
        config = {
            **CHAINED,
            "SIDELOG_CREATE_TABLE": False,
            "SIDELOG_WRITE_MODE": "sync",
        }
        app, _, sidelog = make_app(
            limited_uri, str(tmp_path / "l"), config, with_db=False
        )
        try:
            with (
                failures(app) as failed,
                app.app_context(),
            ):
                for i in range(3):
                    sidelog.log(f"by the app role {i}")
            runner = app.test_cli_runner()
            init = runner.invoke(args=["sidelog", "init"])
        finally:
            dispose(app)
        with owner.app_context():
            result = owner_log.verify()
    finally:
        dispose(owner)
    assert failed == []
    assert len(heads_read) == 4  # the owner's first entry, then the app's
    assert result.ok and result.entries == 4, str(result)
    assert init.exit_code == 0, init.output
    assert "already exists" in init.output


@pytest.mark.postgres
def test_the_append_function_declines_a_stricter_isolation(
    postgres: t.Any, tmp_path: t.Any, heads_read: list[int]
) -> None:
    """The default isolation made stricter after the app checked it: the
    function declines each write (its head would be read in a snapshot
    taken before the lock) and the app links, so concurrent writers still
    make one chain, without a failed write."""
    uri = postgres.create_database("append_isolation")
    config = {**CHAINED, "SIDELOG_WRITE_MODE": "sync"}
    app, _, sidelog = make_app(uri, str(tmp_path), config, with_db=False)

    try:
        with failures(app) as failed:
            with app.app_context():
                sidelog.log("first")
                sidelog.log("checked and linked by the function")
            assert len(heads_read) == 1
            postgres.psql(
                "ALTER DATABASE append_isolation"
                " SET default_transaction_isolation = 'repeatable read'"
            )
            app.extensions["sidelog"].writer.engine.dispose()  # new sessions
            log_from_threads(app, sidelog, 6)
        with app.app_context():
            result = sidelog.verify()
    finally:
        dispose(app)
    assert failed == []
    assert len(heads_read) == 61  # each of the 60 declined and linked by the app
    assert result.ok and result.entries == 62, str(result)


@pytest.mark.postgres
def test_writes_leave_no_prepared_statement(postgres: t.Any, tmp_path: t.Any) -> None:
    """A pooler in transaction mode (PgBouncer before 1.21) loses prepared
    statements: the writes prepare none, however often they run."""
    uri = postgres.create_database("append_unprepared")
    one = {"pool_size": 1, "max_overflow": 0}
    config = {**CHAINED, "SIDELOG_WRITE_MODE": "sync", "SIDELOG_ENGINE_OPTIONS": one}
    app, _, sidelog = make_app(uri, str(tmp_path), config, with_db=False)
    try:
        with app.app_context():
            for _ in range(8):
                sidelog.log("written")
            writer = app.extensions["sidelog"].writer
            writer.insert([make_entry("batch") for _ in range(SERVER_LINKED_ROWS + 1)])
            with writer.engine.connect() as conn:
                prepared = conn.exec_driver_sql(
                    "SELECT statement FROM pg_prepared_statements"
                ).all()
            assert sidelog.verify().ok
    finally:
        dispose(app)
    assert prepared == []


@pytest.mark.postgres
def test_a_role_that_may_not_use_plpgsql_still_gets_its_table(
    postgres: t.Any, tmp_path: t.Any, limited_role: str, heads_read: list[int]
) -> None:
    """The append function is made in a savepoint: a role that may create
    tables but not use PL/pgSQL gets the table on its first write, and the
    app links its entries."""
    uri = postgres.create_database("append_no_plpgsql")
    postgres.psql(
        f"GRANT CREATE ON SCHEMA public TO {limited_role};"
        " REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC",
        dbname="append_no_plpgsql",
    )
    limited_uri = uri.replace("postgres@", f"{limited_role}@")
    config = {**CHAINED, "SIDELOG_CREATE_TABLE": True, "SIDELOG_WRITE_MODE": "sync"}
    app, _, sidelog = make_app(limited_uri, str(tmp_path), config, with_db=False)
    try:
        with failures(app) as failed, app.app_context():
            for i in range(3):
                sidelog.log(f"entry {i}")
            result = sidelog.verify()
    finally:
        dispose(app)
    assert failed == []
    assert len(heads_read) == 3
    assert result.ok and result.entries == 3, str(result)


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_autocommit_log_engine_still_reads_replays_and_prunes(
    database_uri: str, tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine in autocommit mode (``SIDELOG_ENGINE_OPTIONS``) starts no
    transaction, which PostgreSQL's server-side cursors need (verify, export,
    iter_entries), and neither do the chain's lock for a replay and a prune's
    delete with its checkpoint: each gets one."""
    app, _, sidelog = make_app(
        database_uri,
        str(tmp_path / "instance"),
        {
            **CHAINED,
            "SIDELOG_CREATE_TABLE": False,
            "SIDELOG_ENGINE_OPTIONS": {"isolation_level": "AUTOCOMMIT"},
        },
    )
    runner = app.test_cli_runner()
    try:
        with app.app_context():
            for i in range(2):
                sidelog.log(f"spooled.{i}")  # no table yet
        assert runner.invoke(args=["sidelog", "init"]).exit_code == 0
        fill(app, sidelog, 3)
        replayed = runner.invoke(args=["sidelog", "replay"])
        assert replayed.output.startswith("Moved 2 entries"), replayed.output
        code, out = verify(runner)
        assert code == 0, out
        assert out.startswith("OK: 5 entries")
        exported = runner.invoke(args=["sidelog", "export"])
        assert exported.exit_code == 0, exported.output
        *lines, summary = exported.output.splitlines()
        assert sorted(json.loads(line)["seq"] for line in lines) == [1, 2, 3, 4, 5]
        assert summary == "Exported 5 entries."
        with app.app_context():
            assert len(list(sidelog.iter_entries())) == 5

            def refuse(*args: t.Any, **kwargs: t.Any) -> None:
                raise RuntimeError("checkpoint refused")

            later = datetime.now(timezone.utc) + timedelta(seconds=1)
            with monkeypatch.context() as patch:
                patch.setattr(chain, "record_checkpoint", refuse)
                with pytest.raises(RuntimeError, match="checkpoint refused"):
                    sidelog.prune(later)
            assert len(sidelog.entries()) == 5  # the delete was undone with it
            assert sidelog.prune(later) == 5
        code, out = verify(runner)
        assert code == 0, out
        assert out.startswith("Checkpoint: entries up to seq 5 pruned (5 at")
        assert "\nOK: 0 entries" in out
        with app.app_context():
            writer = app.extensions["sidelog"].writer
            with writer.engine.connect() as conn:  # back in the pool as it was
                assert conn.connection.driver_connection.autocommit is True
    finally:
        dispose(app)
