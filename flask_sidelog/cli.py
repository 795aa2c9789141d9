"""The ``flask sidelog`` command group."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup

from .engine import safe_url

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
