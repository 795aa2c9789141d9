"""A small bank: accounts and money transfers, audited with flask-sidelog.

Run it with ``flask --app example_app run``; ``flask --app example_app
seed-demo`` adds two users and drives a few requests, and ``flask --app
example_app sidelog show`` shows what was logged.
"""

from __future__ import annotations

import typing as t

from flask import Flask

from .extensions import db
from .extensions import login_manager
from .extensions import sidelog


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """The app factory.

    :param config: settings that win over the defaults and over ``FLASK_*``
        environment variables (the tests pass their database here).
    """
    app = Flask(__name__, instance_relative_config=True)
    app.config.update(
        # Only for trying it out: set FLASK_SECRET_KEY to a random value.
        SECRET_KEY="dev",
        # Relative to the instance folder; the log shares this database.
        SQLALCHEMY_DATABASE_URI="sqlite:///example.db",
    )
    app.config.from_prefixed_env()
    app.config.update(config or {})

    db.init_app(app)
    sidelog.init_app(app, db)
    login_manager.init_app(app)

    from . import views
    from .demo import seed_demo_command

    app.register_blueprint(views.bp)
    app.cli.add_command(seed_demo_command)

    with app.app_context():
        db.create_all()
        sidelog.create_table()
    return app
