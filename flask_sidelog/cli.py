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


@sidelog_group.command("verify")
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(min=1),
    help="Start at this seq, trusting the entry before it (incremental checks).",
)
@click.option(
    "--expect-head",
    metavar="SEQ:HASH",
    help="A head printed by an earlier verify; the chain must still contain it.",
)
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
