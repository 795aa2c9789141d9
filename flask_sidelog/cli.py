"""The ``flask sidelog`` command group: each command wraps a public method of
:class:`~flask_sidelog.SideLog`."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import sys
import time
import typing as t
from datetime import datetime

import click
import sqlalchemy as sa
from flask import current_app
from flask.cli import AppGroup

from .chain import SEQ_MAX
from .chain import timestamp
from .engine import resolve_url
from .engine import safe_url
from .engine import sqlite_path
from .entry import LEVELS
from .entry import OUTCOMES
from .query import changed_tables
from .query import recorded_keys
from .render import csv_writer
from .render import escape
from .render import json_line
from .render import Table
from .render import to_json_text
from .render import use_colour
from .spool import REPLAY_SUFFIX
from .times import ACCEPTED
from .times import parse_time
from .tracking import parse_pk
from .tracking import split_pairs

if t.TYPE_CHECKING:
    from .extension import _AppState
    from .extension import SideLog

F = t.TypeVar("F", bound=t.Callable[..., t.Any])

#: Seconds between two looks for new entries in ``show --follow``.
FOLLOW_INTERVAL = 1.0

sidelog_group = AppGroup("sidelog", help="Read and manage the flask-sidelog audit log.")


class TimeType(click.ParamType):  # type: ignore[type-arg]
    """An ISO 8601 date or date-time, or a relative time such as ``2h``."""

    name = "time"

    def convert(
        self, value: t.Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


TIME = TimeType()


def filter_options(command: F) -> F:
    """The filters that ``show`` and ``export`` share."""
    options = [
        click.option(
            "--event",
            help="Event name, exact or a glob with * such as 'login.*'.",
        ),
        click.option("--actor", help="Who did it, exactly."),
        click.option(
            "--outcome",
            type=click.Choice(OUTCOMES),
            help="Outcome of an audited request.",
        ),
        click.option("--level", type=click.Choice(LEVELS), help="Entry level."),
        click.option("--request-id", help="All entries of one request."),
        click.option("--since", type=TIME, help=f"Entries at or after: {ACCEPTED}."),
        click.option(
            "--until", type=TIME, help="Entries before this time (as --since)."
        ),
    ]

    @functools.wraps(command)
    def checked(*args: t.Any, **kwargs: t.Any) -> t.Any:
        since, until = kwargs.get("since"), kwargs.get("until")
        if since is not None and until is not None and since >= until:
            # A mistake, such as a time ago given as --until: nothing matches.
            raise click.UsageError(
                f"--since ({timestamp(since)}) must be before --until"
                f" ({timestamp(until)}); both take {ACCEPTED}."
            )
        return command(*args, **kwargs)

    for option in reversed(options):
        checked = option(checked)
    return t.cast(F, checked)


def _state() -> _AppState:
    return t.cast("_AppState", current_app.extensions["sidelog"])


def _reason(error: Exception) -> str:
    """The driver's first line, without SQLAlchemy's SQL and parameters."""
    orig = getattr(error, "orig", None)
    lines = str(orig if orig is not None else error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def with_log_database(*, need_table: bool | None = True) -> t.Callable[[F], F]:
    """Run the command against the log database, turning what can go wrong
    there into one line and exit status 1 instead of a traceback.

    :param need_table: refuse to run without the entries table; None: only
        if the first write will not create it (``SIDELOG_CREATE_TABLE``).
    """

    def decorator(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            state = _state()
            try:
                writer = state.writer
            except (RuntimeError, sa.exc.ArgumentError) as e:
                raise click.ClickException(str(e)) from None
            except ValueError as e:  # a URL value the dialect refuses
                raise click.ClickException(
                    f"cannot make the sidelog database's engine: {e}"
                ) from None
            except ImportError as e:  # the URL names a driver not installed
                raise click.ClickException(
                    f"cannot load the sidelog database's driver: {e}"
                ) from None
            where = safe_url(writer.engine.url)
            try:
                with writer.connect() as conn:
                    exists = sa.inspect(conn).has_table(writer.table.name)
            except (sa.exc.SQLAlchemyError, TypeError, ValueError) as e:
                # The last two: connect arguments the driver refuses.
                raise click.ClickException(
                    f"cannot reach the sidelog database {where}: {_reason(e)}"
                ) from None
            needed = not writer.creates_table if need_table is None else need_table
            if needed and not exists:
                raise click.ClickException(
                    "no sidelog entries table in DB: run `flask sidelog init`"
                    f" (looked for {writer.table.name} in {where})"
                )
            try:
                return command(*args, **kwargs)
            except sa.exc.SQLAlchemyError as e:
                raise click.ClickException(
                    f"the sidelog database {where} failed: {_reason(e)}"
                ) from None
            except BrokenPipeError:
                _stop_writing()
                sys.exit(1)
            except OSError as e:
                if e.filename is not None:  # a file of the app's, the spool say
                    raise click.ClickException(
                        f"{e.filename}: {e.strerror or e}"
                    ) from None
                _stop_writing()  # standard output: a full disk, say
                raise click.ClickException(
                    f"cannot write the output: {e.strerror or e}"
                ) from None

        return t.cast(F, wrapper)

    return decorator


def _stop_writing() -> None:
    """The reader went away (``sidelog export | head``): point standard output
    at /dev/null, so that Python's final flush has nowhere to fail."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _extension() -> SideLog:
    return _state().extension


@sidelog_group.command("init")
@with_log_database(need_table=False)
def init_command() -> None:
    """Create the entries table if it does not exist (safe to run again);
    on PostgreSQL, also the chain's append function if it is missing."""
    state = _state()
    table = state.writer.table
    where = f"{table.name} in {safe_url(state.writer.engine.url)}"
    with state.writer.connect() as conn:
        inspector = sa.inspect(conn)
        if inspector.has_table(table.name):
            present = {column["name"] for column in inspector.get_columns(table.name)}
            if conn.dialect.name == "sqlite":  # its names ignore case
                present = {name.lower() for name in present}
            missing = [c.name for c in table.c if c.name not in present]
            if missing and set(missing) <= {"seq", "hash"}:
                raise click.ClickException(
                    f"{where} was made before the hash chain (it has no"
                    f" {', '.join(missing)}): add the chain's columns as"
                    " docs/tamper-evidence.rst shows ('Adding the chain to an"
                    " existing table'), and run `flask sidelog init` again."
                )
            if missing:  # an app table, say: writes would all fail
                listed = ", ".join(missing[:4]) + (", ..." * (len(missing) > 4))
                raise click.ClickException(
                    f"{where} is not a flask-sidelog table (it has no {listed}):"
                    " set SIDELOG_TABLE to a name no other table has, and run"
                    " `flask sidelog init` again."
                )
    created = state.extension.create_table()
    click.echo(f"Created {where}." if created else f"{where} already exists.")


@sidelog_group.command("replay")
@with_log_database(need_table=None)
def replay_command() -> None:
    """Move the entries of the spool (SIDELOG_SPOOL_PATH) into the log
    database. Safe to run again, and while the app runs: no entry is ever
    duplicated or lost; what still fails stays in the spool."""
    state = current_app.extensions["sidelog"]
    result = state.extension.replay()
    spool = state.writer.spool.path
    click.echo(
        f"Moved {result.moved} entr{'y' if result.moved == 1 else 'ies'} from"
        f" {spool} to the log database"
        f" ({result.already_present} already there, dropped from the spool)."
    )
    if result.kept or result.unreadable:
        raise click.ClickException(
            f"{result.kept} entries could not be written and"
            f" {result.unreadable} lines are not entries; they stay in {spool}."
            " Check that the log database is reachable and run replay again."
        )


@sidelog_group.command("history")
@click.argument("table")
@click.argument("pk")
@click.option(
    "--only-committed",
    is_flag=True,
    help="Show only the changes whose transaction committed.",
)
@click.option(
    "--only-rolled-back",
    is_flag=True,
    help="Show only the changes whose transaction was rolled back.",
)
@with_log_database()
def history_command(
    table: str, pk: str, only_committed: bool, only_rolled_back: bool
) -> None:
    """Show one row's life: every attempted change to row PK of TABLE,
    oldest first, with its time, actor, request id and whether it stuck.

    PK is the primary key value, or k1=v1,k2=v2 for a composite key
    (\\, for a comma within a value, \\\\ for a backslash that ends one).
    Where PK names none of the key's columns and the key is one column, the
    whole of PK is its value too: as given (a value with = in it), then with
    its escapes read.
    """
    if only_committed and only_rolled_back:
        raise click.UsageError(
            "--only-committed and --only-rolled-back exclude each other;"
            " give one, or neither for every change."
        )
    only = (
        "committed" if only_committed else "rolled_back" if only_rolled_back else None
    )
    changes = _history(table, pk, only)
    if not changes:
        click.echo(f"No recorded changes for {escape(table)} {escape(pk)}.")
        return
    for entry in changes:
        data = entry["data"] or {}
        stuck = "committed" if entry["main_tx"] == "committed" else "ROLLED BACK"
        # Actors and values came from requests: escaped like show's table.
        click.echo(
            f"{entry['created_at'].isoformat(timespec='seconds')}"
            f"  {stuck:<11}  {entry['event'].rpartition('.')[2]:<6}"
            f"  actor={escape(entry['actor'] or '-')}"
            f"  request={escape(entry['request_id'] or '-')}"
            f"  {escape(_describe_changes(data.get('changes')))}"
        )


def _history(table: str, pk: str, only: str | None) -> list[dict[str, t.Any]]:
    """The changes of row ``pk`` of ``table``, read as docs/change-history.rst
    says; a usage error for a lookup the log cannot serve, which looks at the
    table's row changes only when nothing was found."""
    sidelog = _extension()
    unreadable = None
    try:
        read: dict[str, str] | str | None = parse_pk(pk)
    except ValueError as e:
        read, unreadable = None, str(e)
    else:
        changes = sidelog.history(table, pk, only)
        if changes:
            return changes
    state = _state()
    with state.writer.connect() as conn:
        keys = recorded_keys(conn, state.writer.table, table)
        if keys is None and state.tracks_table(table):
            return []  # tracked, and none of its rows changed yet (or kept)
        tables = changed_tables(conn, state.writer.table) if keys is None else []
    if keys is None:
        listed = ", ".join(map(escape, tables[:20])) + (", ..." * (len(tables) > 20))
        raise click.BadParameter(
            f"the log holds no row changes of table {table!r}; "
            + (
                f"tables with row changes: {listed}."
                if tables
                else "nor of any other (tracked models' tables, as SideLog.track"
                " records them)."
            ),
            param_hint="TABLE",
        )
    if not keys:  # its changes' keys are not readable (redacted, say)
        return []
    named = set(read) if isinstance(read, dict) else set()
    if any(named == set(names) for names in keys):
        return []  # a key of the form recorded: that row has no changes
    # Not the key's own name=value: for a one-column key, the whole of PK
    # is its value too (one that holds "=", say), as given, then with its
    # escapes read (\, for a comma).
    singles = [names[0] for names in keys if len(names) == 1]
    values = [] if isinstance(read, str) else [pk]
    parts = split_pairs(pk)
    if len(parts) == 1 and parts[0] != pk:
        values.append(parts[0])
    for column in singles:
        for value in values:
            changes = sidelog.history(table, {column: value}, only)
            if changes:
                return changes
    composite = {name for names in keys if len(names) > 1 for name in names}
    text_key = any(text for names, text in keys.items() if len(names) == 1)
    if singles and (isinstance(read, str) or (text_key and not named & composite)):
        # A value of a one-column key (a text one may hold "=" or fail to
        # read as k=v): that row has no changes.
        return []
    forms = [
        f"its value, or as {escape(names[0])}=VALUE"
        if len(names) == 1
        else ",".join(f"{escape(name)}=V{i}" for i, name in enumerate(names, 1))
        for names in keys
    ]
    tip = " (\\, for a comma within a value)" if len(forms) > len(singles) else ""
    raise click.BadParameter(
        (f"{unreadable.rstrip('.')}; " if unreadable else "")
        + f"the row changes of {table!r} record the key "
        + " or ".join(", ".join(map(escape, names)) for names in keys)
        + f": give PK as {', or as '.join(forms)}{'' if unreadable else tip}.",
        param_hint="PK",
    )


def _describe_changes(changes: t.Any) -> str:
    if not isinstance(changes, dict):
        return json.dumps(changes)
    parts = []
    for column, value in changes.items():
        if isinstance(value, list) and len(value) == 2:
            old, new = (json.dumps(v, ensure_ascii=False) for v in value)
            parts.append(f"{column}: {old} -> {new}")
        else:
            parts.append(f"{column}: {json.dumps(value, ensure_ascii=False)}")
    return ", ".join(parts)


class _Output:
    """Writes entries in one format to one stream."""

    def __init__(self, fmt: str, stream: t.TextIO) -> None:
        self.fmt = fmt
        self.stream = stream
        self.collected: list[dict[str, t.Any]] = []
        self._csv: t.Callable[[dict[str, t.Any]], None] | None = None
        self._table: Table | None = None
        if fmt == "table":
            self._table = Table(
                shutil.get_terminal_size().columns,
                use_colour(sys.stdout.isatty()),
            )
            click.echo(self._table.header(), file=stream)
        elif fmt == "csv":
            self._csv = csv_writer(stream)

    def write(self, entry: dict[str, t.Any]) -> None:
        if self._table is not None:
            click.echo(self._table.row(entry), file=self.stream)
        elif self._csv is not None:
            self._csv(entry)
        elif self.fmt == "jsonl":
            self.stream.write(json_line(entry) + "\n")
        else:
            self.collected.append(entry)

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write(to_json_text(self.collected) + "\n")
        self.stream.flush()


@sidelog_group.command("show")
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="How many of the newest matching entries to show.",
)
@filter_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("table", "json", "jsonl", "csv")),
    default="table",
    show_default=True,
    help="json is one array; csv has a header row and every field.",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep printing new entries as they land, until Ctrl-C.",
)
@click.option("--reverse", is_flag=True, help="Newest first.")
@with_log_database()
def show_command(
    limit: int, fmt: str, follow: bool, reverse: bool, **filters: t.Any
) -> None:
    """Show the newest matching entries, oldest first (like tail)."""
    if follow and (reverse or fmt == "json"):
        raise click.UsageError(
            "--follow prints entries as they land: use it without --reverse,"
            " with --format table, jsonl or csv."
        )
    sidelog = _extension()
    entries = sidelog.entries(limit=limit, **filters)
    if reverse:
        entries.reverse()
    out = _Output(fmt, sys.stdout)
    for entry in entries:
        out.write(entry)
    out.close()
    if not follow:
        return
    if entries:
        last = max(entry["id"] for entry in entries)
    else:  # with --limit 0, start after the newest match
        newest = sidelog.entries(limit=1, **filters) if limit == 0 else []
        last = newest[0]["id"] if newest else 0
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(FOLLOW_INTERVAL)
            for entry in sidelog.iter_entries(after_id=last, **filters):
                out.write(entry)
                last = entry["id"]
            out.close()


@sidelog_group.command("stats")
@click.option(
    "--since",
    type=TIME,
    default="24h",
    show_default=True,
    help=f"Count entries at or after: {ACCEPTED}.",
)
@with_log_database()
def stats_command(since: datetime) -> None:
    """Count entries per event and outcome, the failed ones first."""
    rows = _extension().stats(since=since)
    if not rows:
        click.echo(f"No entries since {since:%Y-%m-%dT%H:%M:%SZ}.")
        return
    colour = use_colour(sys.stdout.isatty())
    click.echo(f"{'count':>8}  {'outcome':<8}  {'last (UTC)':<20}  event")
    for row in rows:
        outcome = row["outcome"] or "-"
        line = (
            f"{row['count']:>8}  {outcome:<8}"
            f"  {row['last_at']:%Y-%m-%dT%H:%M:%SZ}  {escape(row['event'])}"
        )
        if colour and outcome in ("failure", "error"):
            line = click.style(line, fg="red" if outcome == "error" else "yellow")
        click.echo(line)


@sidelog_group.command("export")
@filter_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("jsonl", "csv")),
    default="jsonl",
    show_default=True,
    help="One JSON object a line, or CSV with a header row.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    default="-",
    help="File to write; default: standard output.",
)
@with_log_database()
def export_command(fmt: str, output: str, **filters: t.Any) -> None:
    """Write every matching entry, oldest first, streaming in constant memory."""
    if not output:
        raise click.UsageError(
            "--output is empty: give a file name, or - for standard output."
        )
    if output != "-":
        _refuse_own_files(output)
    count = 0
    try:
        with contextlib.ExitStack() as stack:
            if output == "-":
                stream = sys.stdout
            else:
                stream = stack.enter_context(
                    open(output, "w", encoding="utf-8", newline="")
                )
            out = _Output(fmt, stream)
            for entry in _extension().iter_entries(**filters):
                out.write(entry)
                count += 1
            out.close()
    except OSError as e:
        if output == "-":
            raise  # a closed pipe: see with_log_database
        raise click.ClickException(
            f"cannot write {output}: {e.strerror or e}; it is incomplete"
        ) from None
    where = "" if output == "-" else f" to {output}"
    click.echo(f"Exported {count} entr{'y' if count == 1 else 'ies'}{where}.", err=True)


#: The files SQLite keeps next to a database (``<database><suffix>``).
_SQLITE_FILES = ("-journal", "-wal", "-shm")


def _refuse_own_files(output: str) -> None:
    """Opening ``output`` for writing empties it: refuse the app's SQLite
    files and its spool, and the files that go with them (SQLite's journal,
    the spool's lock, a replay's renamed spool), which an export would wipe."""
    state = _state()
    urls = [state.writer.engine.url]
    try:
        urls.append(state.main_engine.url)
    except Exception:
        # No main database, or one whose engine cannot be made (a query
        # value its dialect refuses): its file, if it has one, is the app's.
        uri = state.settings.main_database_uri
        with contextlib.suppress(Exception):
            if uri is not None:
                urls.append(resolve_url(uri, current_app.instance_path))
    if state.db is not None:
        urls += [engine.url for engine in state.db.engines.values()]
    spool = state.writer.spool
    databases = [p for p in map(sqlite_path, urls) if p]
    own = [spool.path, spool.lock_path, *databases]
    # SQLite's rollback journal and write-ahead log hold a database's writes.
    own += [path + suffix for path in databases for suffix in _SQLITE_FILES]
    replaying = os.path.realpath(spool.path) + REPLAY_SUFFIX  # replay's renames
    for path in own:
        # By path too: a spool not there yet, created by the export, would
        # have the wrong mode and hold lines replay cannot read.
        same = os.path.realpath(output) == os.path.realpath(path)
        with contextlib.suppress(OSError):  # not there (yet)
            same = same or os.path.samefile(output, path)
        if same or os.path.realpath(output).startswith(replaying):
            raise click.UsageError(
                f"--output {output} is a file of the app's (its database or"
                " the spool, or one that goes with them), which exporting would"
                " empty; give another file."
            )


@sidelog_group.command("prune")
@click.option(
    "--before",
    type=TIME,
    required=True,
    help=f"Delete entries created before: {ACCEPTED}.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@with_log_database()
def prune_command(before: datetime, dry_run: bool, yes: bool) -> None:
    """Delete entries older than --before, in small batches. With the hash
    chain on, deletion stops at the first entry to keep: an older entry
    chained after it (a replayed one) waits for a later prune."""
    sidelog = _extension()
    when = timestamp(before)
    count = sidelog.prune(before, dry_run=True)
    if count == 0:
        click.echo(f"No entries created before {when} to delete.")
        return
    if dry_run:
        click.echo(f"{count} entries created before {when} would be deleted.")
        return
    if not yes:
        click.confirm(f"Delete {count} entries created before {when}?", abort=True)
    try:
        deleted = sidelog.prune(before)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Deleted {deleted} entries created before {when}.")


@sidelog_group.command("verify")
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(min=1, max=SEQ_MAX),
    help="Start at this seq, trusting the entry before it (incremental checks).",
)
@click.option(
    "--expect-head",
    metavar="SEQ:HASH",
    help="A head printed by an earlier verify; the chain must still contain it.",
)
@with_log_database()
def verify_command(from_seq: int | None, expect_head: str | None) -> None:
    """Check the log's hash chain: exit 0 and print the head if every entry is
    intact, else exit 1 at the first broken position and say what is wrong."""
    state = current_app.extensions["sidelog"]
    try:
        result = state.extension.verify(from_seq=from_seq, expect_head=expect_head)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    click.echo(str(result))
    if not result.ok:
        click.get_current_context().exit(1)
