"""The app ``bench_cli.py`` runs ``flask sidelog`` against, as a real process:
``flask --app cli_app sidelog ...`` with ``SIDELOG_BENCH_URI`` naming the log."""

from __future__ import annotations

import os

from flask import Flask

from flask_sidelog import SideLog


def create_app() -> Flask:
    app = Flask(__name__)
    uri = os.environ["SIDELOG_BENCH_URI"]
    app.config.update(SQLALCHEMY_DATABASE_URI=uri, SIDELOG_DATABASE_URI=uri)
    SideLog(app)
    return app
