"""The example app: what each of its stories leaves in the database and the log."""

from __future__ import annotations

import os
import sys
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from conftest import dispose

# The example lives next to tests/, outside the package under test. Appended,
# not prepended, so that flask_sidelog still comes from the installed wheel.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from example_app import create_app  # noqa: E402
from example_app.demo import seed  # noqa: E402
from example_app.extensions import db  # noqa: E402
from example_app.extensions import sidelog  # noqa: E402
from example_app.models import Account  # noqa: E402


@pytest.fixture
def app(tmp_path: t.Any) -> t.Iterator[Flask]:
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'bank.db'}",
        }
    )
    yield app
    dispose(app)


@pytest.fixture
def ids(app: Flask) -> dict[str, list[int]]:
    with app.app_context():
        return seed()


def balances(app: Flask) -> list[int]:
    with app.app_context():
        return list(db.session.scalars(sa.select(Account.balance).order_by(Account.id)))


def entries(app: Flask, **filters: t.Any) -> list[dict[str, t.Any]]:
    with app.app_context():
        return sidelog.entries(**filters)


def sign_in(client: FlaskClient, username: str = "alice") -> None:
    password = f"{username}-password"
    response = client.post("/login", data={"username": username, "password": password})
    assert response.status_code == 302


def test_transfer(app: Flask, ids: dict[str, list[int]]) -> None:
    client = app.test_client()
    sign_in(client)
    form = {"source": ids["alice"][0], "target": ids["bob"][0], "amount": 2500}
    assert client.post("/transfers", data=form).status_code == 302
    assert balances(app) == [7_500, 5_000, 4_500]
    (entry,) = entries(app, event="funds.transfer")
    assert (entry["outcome"], entry["status_code"]) == ("success", 302)
    assert entry["main_tx"] == "committed"
    assert entry["actor"] == "alice"
    assert entry["data"] == {"source": 1, "target": 3, "amount": 2500}
    assert "2,500" not in client.get("/").get_data(as_text=True)
    assert "75.00" in client.get("/").get_data(as_text=True)


def test_insufficient_funds_rolls_back_the_debit(
    app: Flask, ids: dict[str, list[int]]
) -> None:
    client = app.test_client()
    sign_in(client)
    form = {"source": ids["alice"][1], "target": ids["bob"][0], "amount": 100_000}
    response = client.post("/transfers", data=form)
    assert response.status_code == 409
    assert "Insufficient funds" in response.get_data(as_text=True)
    assert balances(app) == [10_000, 5_000, 2_000]
    (entry,) = entries(app, event="funds.transfer")
    assert (entry["outcome"], entry["status_code"]) == ("failure", 409)
    assert entry["main_tx"] == "rolled_back"
    assert entry["data"]["amount"] == 100_000
    assert entry["error"] == "example_app.views.InsufficientFunds: 409 Conflict"


def test_transfer_from_someone_elses_account_is_denied(
    app: Flask, ids: dict[str, list[int]]
) -> None:
    client = app.test_client()
    sign_in(client)
    form = {"source": ids["bob"][0], "target": ids["alice"][0], "amount": 100}
    assert client.post("/transfers", data=form).status_code == 403
    assert balances(app) == [10_000, 5_000, 2_000]
    (entry,) = entries(app, event="funds.transfer")
    assert (entry["outcome"], entry["status_code"], entry["actor"]) == (
        "failure",
        403,
        "alice",
    )
    assert entry["main_tx"] == "none"


@pytest.mark.parametrize("amount", ["ten", "-5", "0"])
def test_bad_amount(app: Flask, ids: dict[str, list[int]], amount: str) -> None:
    client = app.test_client()
    sign_in(client)
    form = {"source": ids["alice"][0], "target": ids["bob"][0], "amount": amount}
    assert client.post("/transfers", data=form).status_code == 400
    assert balances(app) == [10_000, 5_000, 2_000]
    (entry,) = entries(app, event="funds.transfer")
    assert entry["outcome"] == "failure"


def test_failed_sign_in_is_logged_without_the_password(
    app: Flask, ids: dict[str, list[int]]
) -> None:
    client = app.test_client()
    data = {"username": "alice", "password": "hunter2-guess"}
    response = client.post("/login", data=data)
    assert response.status_code == 401
    assert "Wrong username or password." in response.get_data(as_text=True)
    failed, login = entries(app)
    assert failed["event"] == "login.failed"
    assert failed["level"] == "warning"
    assert failed["data"] == {"username": "alice"}
    assert (login["event"], login["outcome"], login["status_code"]) == (
        "auth.login",
        "failure",
        401,
    )
    assert failed["request_id"] == login["request_id"]
    assert all("hunter2" not in str(entry) for entry in entries(app))


def test_transfer_needs_a_signed_in_user(app: Flask, ids: dict[str, list[int]]) -> None:
    """And the attempt is recorded all the same."""
    response = app.test_client().post("/transfers", data={"amount": 1})
    assert response.status_code == 401
    ((event, outcome, status, actor, main_tx),) = [
        (e["event"], e["outcome"], e["status_code"], e["actor"], e["main_tx"])
        for e in entries(app)
    ]
    assert (event, outcome, status, actor, main_tx) == (
        "funds.transfer",
        "failure",
        401,
        None,
        "none",
    )


def test_seed_demo_then_show(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["seed-demo"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:6] == [
        "401  sign in with a wrong password",
        "302  sign in as alice",
        "302  transfer 25.00 to bob",
        "409  transfer 1,000.00 from savings: insufficient funds",
        "403  transfer from bob's account: forbidden",
        "302  sign out",
    ]
    assert "flask --app example_app sidelog show" in result.output
    assert balances(app) == [7_500, 5_000, 4_500]
    shown = runner.invoke(args=["sidelog", "show", "--event", "funds.*"])
    assert shown.exit_code == 0, shown.output
    rows = shown.output.splitlines()[1:]
    assert [row.split()[3:6] for row in rows] == [
        ["success", "302", "committed"],
        ["failure", "409", "rolled_back"],
        ["failure", "403", "none"],
    ]
    (logout,) = entries(app, event="auth.logout")
    assert logout["data"] == {"username": "alice"}
    # Seeding again adds no users and runs the same requests.
    assert runner.invoke(args=["seed-demo"]).exit_code == 0
    assert len(entries(app, event="login.failed")) == 2
