"""SECURITY.md: what a client controlling request input cannot make the log say."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient

from flask_sidelog import SideLog


def test_request_input_cannot_set_the_actor(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    """The actor comes from the server side (the actor loader), never from
    headers, cookies, the query string or the body."""

    @app.post("/act")
    @sidelog.audit("act")
    def act() -> str:
        sidelog.log("act.inner")
        return "ok"

    forged = {"X-Actor": "admin", "X-User": "admin", "X-Forwarded-User": "admin"}
    client.set_cookie("actor", "admin")
    client.post("/act?actor=admin", headers=forged, data={"actor": "admin"})

    @sidelog.actor_loader
    def load() -> str:
        return "alice"

    client.post("/act?actor=admin", headers=forged, data={"actor": "admin"})
    with app.app_context():
        actors = [(e["event"], e["actor"]) for e in sidelog.entries()]
    assert actors == [
        ("act.inner", None),
        ("act", None),
        ("act.inner", "alice"),
        ("act", "alice"),
    ]
