"""The ``flask sidelog`` command group."""

from __future__ import annotations

import json
import typing as t

import click
import sqlalchemy as sa
from flask import current_app
from flask.cli import AppGroup

from .engine import safe_url
from .tracking import parse_pk

sidelog_group = AppGroup("sidelog", help="Read and manage the flask-sidelog audit log.")


@sidelog_group.command("init")
def init_command() -> None:
    """Create the entries table if it does not exist (safe to run again)."""
    state = current_app.extensions["sidelog"]
    created = state.extension.create_table()
    where = f"{state.writer.table.name} in {safe_url(state.writer.engine.url)}"
    click.echo(f"Created {where}." if created else f"{where} already exists.")


@sidelog_group.command("replay")
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
def history_command(
    table: str, pk: str, only_committed: bool, only_rolled_back: bool
) -> None:
    """Show one row's life: every attempted change to row PK of TABLE,
    oldest first, with its time, actor, request id and whether it stuck.

    PK is the primary key value, or k1=v1,k2=v2 for a composite key.
    """
    if only_committed and only_rolled_back:
        raise click.UsageError(
            "--only-committed and --only-rolled-back exclude each other;"
            " give one, or neither for every change."
        )
    only = (
        "committed" if only_committed else "rolled_back" if only_rolled_back else None
    )
    try:
        parse_pk(pk)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="PK") from None
    try:
        changes = current_app.extensions["sidelog"].extension.history(table, pk, only)
    except sa.exc.SQLAlchemyError as e:
        raise click.ClickException(f"Could not read the log: {e}") from None
    if not changes:
        click.echo(f"No recorded changes for {table} {pk}.")
        return
    for entry in changes:
        data = entry["data"] or {}
        stuck = "committed" if entry["main_tx"] == "committed" else "ROLLED BACK"
        click.echo(
            f"{entry['created_at'].isoformat(timespec='seconds')}"
            f"  {stuck:<11}  {entry['event'].rpartition('.')[2]:<6}"
            f"  actor={entry['actor'] or '-'}"
            f"  request={entry['request_id'] or '-'}"
            f"  {_describe_changes(data.get('changes'))}"
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
