"""The app the real-process tests run in a server of its own (gunicorn, or
Werkzeug's one-thread server via ``python _reliability_app.py``).

Configured by environment variables: ``SIDELOG_TEST_MAIN_URI``,
``SIDELOG_TEST_LOG_URI``, ``SIDELOG_TEST_INSTANCE`` (the instance folder,
where the spool is) and ``SIDELOG_TEST_MAIN_POOL`` (the main pool size; no
overflow). The tables must exist before it starts.

Routes: ``/ok`` commits a row and logs an entry, ``/fail/<code>`` aborts with
``code`` after a flush, ``/boom`` raises after a flush (a 500). Each is
audited and answers with its request id in ``X-Request-ID``.
"""

from __future__ import annotations

import os
import uuid

from flask import abort
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from conftest import Account
from flask_sidelog import SideLog


def create_app() -> Flask:
    app = Flask(__name__, instance_path=os.environ["SIDELOG_TEST_INSTANCE"])
    pool = os.environ.get("SIDELOG_TEST_MAIN_POOL")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ["SIDELOG_TEST_MAIN_URI"],
        SQLALCHEMY_ENGINE_OPTIONS=(
            {"pool_size": int(pool), "max_overflow": 0} if pool else {}
        ),
        SIDELOG_DATABASE_URI=os.environ["SIDELOG_TEST_LOG_URI"],
        SIDELOG_CREATE_TABLE=False,
        SIDELOG_WRITE_TIMEOUT=2,
        SIDELOG_REQUEST_ID_RESPONSE_HEADER="X-Request-ID",
    )
    db = SQLAlchemy()
    db.init_app(app)
    sidelog = SideLog(app, db)

    @app.route("/ok", methods=["GET", "POST"])
    @sidelog.audit("test.ok")
    def ok() -> str:
        db.session.add(Account(name=uuid.uuid4().hex))
        db.session.commit()
        sidelog.log("test.ok.done")
        return "ok"

    @app.route("/fail/<int:code>", methods=["GET", "POST"])
    @sidelog.audit("test.fail")
    def fail(code: int) -> str:
        db.session.add(Account(name=uuid.uuid4().hex))
        db.session.flush()
        abort(code)

    @app.route("/boom", methods=["GET", "POST"])
    @sidelog.audit("test.boom")
    def boom() -> str:
        db.session.add(Account(name=uuid.uuid4().hex))
        db.session.flush()
        raise RuntimeError("boom")

    return app


def serve() -> None:
    """Serve on a free port of 127.0.0.1, one request at a time; print the
    port on the first line of stdout."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app())
    print(server.port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve()
