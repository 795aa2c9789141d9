"""``flask --app example_app seed-demo``: users, accounts and a few requests."""

from __future__ import annotations

import contextvars
import typing as t

import click
import sqlalchemy as sa
from flask import current_app
from flask import Flask
from flask.cli import with_appcontext

from .extensions import db
from .models import Account
from .models import User

USERS = {
    "alice": ("alice-password", [("checking", 10_000), ("savings", 5_000)]),
    "bob": ("bob-password", [("checking", 2_000)]),
}


def seed() -> dict[str, list[int]]:
    """Create the demo users and accounts unless they exist; their account ids."""
    ids = {}
    for username, (password, accounts) in USERS.items():
        user = db.session.scalar(sa.select(User).filter_by(username=username))
        if user is None:
            user = User(username=username)
            user.set_password(password)
            user.accounts = [Account(name=n, balance=b) for n, b in accounts]
            db.session.add(user)
            db.session.commit()
        ids[username] = [account.id for account in user.accounts]
    # End the read transaction: on SQLite it would block the requests' writes.
    db.session.close()
    return ids


def demo_requests(ids: dict[str, list[int]]) -> list[tuple[str, str, dict[str, t.Any]]]:
    """What the demo does: a label, a path to POST to and the form."""
    alice, bob = ids["alice"], ids["bob"]
    return [
        (
            "sign in with a wrong password",
            "/login",
            {"username": "alice", "password": "guess"},
        ),
        (
            "sign in as alice",
            "/login",
            {"username": "alice", "password": "alice-password"},
        ),
        (
            "transfer 25.00 to bob",
            "/transfers",
            {"source": alice[0], "target": bob[0], "amount": 2500},
        ),
        (
            "transfer 1,000.00 from savings: insufficient funds",
            "/transfers",
            {"source": alice[1], "target": bob[0], "amount": 100_000},
        ),
        (
            "transfer from bob's account: forbidden",
            "/transfers",
            {"source": bob[0], "target": alice[0], "amount": 100},
        ),
        ("sign out", "/logout", {}),
    ]


def drive(app: Flask, steps: list[tuple[str, str, dict[str, t.Any]]]) -> None:
    with app.test_client() as client:
        for label, path, form in steps:
            response = client.post(path, data=form)
            click.echo(f"{response.status_code}  {label}")


@click.command("seed-demo")
@with_appcontext
def seed_demo_command() -> None:
    """Create two users (alice, bob) and make requests the log records: a
    failed sign-in, a transfer, one with insufficient funds, a forbidden one."""
    ids = seed()
    app = t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    # The requests run in an empty context, so each gets an app context of
    # its own, as under a real server, instead of sharing the command's.
    contextvars.Context().run(drive, app, demo_requests(ids))
    click.echo("\nSee what was logged: flask --app example_app sidelog show")
