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
