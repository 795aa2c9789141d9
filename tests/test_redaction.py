"""Case 8: redaction wherever request or caller data enters an entry:
``log(data=...)``, ``annotate(...)``, and URL variables in the path; query
strings are never recorded. Matching is case-insensitive and reaches nested
dicts and lists."""

from __future__ import annotations

import json
import typing as t

from flask import Flask
from flask.testing import FlaskClient

from conftest import dispose
from conftest import make_app
from flask_sidelog import SideLog

SECRET = "s3cr3t-value"

NESTED = {
    "user": "ann",
    "PassWord": SECRET,
    "profile": {"Api_Key": SECRET, "age": 3, "tags": ["a", {"AUTHORIZATION": SECRET}]},
    "history": [[{"refresh_TOKEN": SECRET}], {"SessionCookie": SECRET}],
}
NESTED_REDACTED = {
    "user": "ann",
    "PassWord": "[redacted]",
    "profile": {
        "Api_Key": "[redacted]",
        "age": 3,
        "tags": ["a", {"AUTHORIZATION": "[redacted]"}],
    },
    "history": [[{"refresh_TOKEN": "[redacted]"}], {"SessionCookie": "[redacted]"}],
}


def test_log_and_annotate_redact_nested_keys_in_any_case(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.post("/profile")
    @sidelog.audit("profile.update")
    def update() -> str:
        sidelog.log("profile.change", data=NESTED)
        sidelog.annotate(**NESTED)
        sidelog.annotate(extra={"X-Auth-Token": SECRET})
        return "ok"

    client.post("/profile")
    with app.app_context():
        logged, audited = sidelog.entries()
    assert logged["data"] == NESTED_REDACTED
    assert audited["data"] == {
        **NESTED_REDACTED,
        "extra": {"X-Auth-Token": "[redacted]"},
    }
    assert SECRET not in json.dumps([logged, audited], default=str)


def test_url_variables_are_redacted_and_query_strings_not_recorded(
    app: Flask, sidelog: SideLog, client: FlaskClient
) -> None:
    @app.get("/reset/<reset_token>/<int:user_id>")
    @sidelog.audit("password.reset")
    def reset(reset_token: str, user_id: int) -> str:
        sidelog.log("reset.link.used")
        return "ok"

    client.get(f"/reset/{SECRET}/42?password={SECRET}&next=%2Fhome")
    with app.app_context():
        entries = sidelog.entries()
    assert [e["path"] for e in entries] == ["/reset/[redacted]/42"] * 2
    assert SECRET not in json.dumps(entries, default=str)
    assert "next" not in json.dumps(entries, default=str)


def test_redact_keys_are_configurable_and_case_insensitive(tmp_path: t.Any) -> None:
    app, _, sidelog = make_app(
        f"sqlite:///{tmp_path / 'app.db'}",
        str(tmp_path / "instance"),
        {"SIDELOG_REDACT_KEYS": ["IBAN"]},
    )
    with app.app_context():
        entry = sidelog.log(
            "payout", data={"payee": {"iban": "DE00", "Iban_Check": 1}, "password": "p"}
        )
        (stored,) = sidelog.entries()
    # Setting the key replaces the defaults: "password" is kept here.
    expected = {
        "payee": {"iban": "[redacted]", "Iban_Check": "[redacted]"},
        "password": "p",
    }
    assert stored["data"] == entry["data"] == expected
    dispose(app)
