"""The views. Every one that changes state is audited: its entry records the
outcome and whether the transaction committed, even when it rolled back.

A real app would also protect these forms against CSRF (Flask-WTF).
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import abort
from flask import Blueprint
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask_login import current_user
from flask_login import login_user
from flask_login import logout_user
from werkzeug import Response
from werkzeug.exceptions import Conflict

from .extensions import db
from .extensions import sidelog
from .models import Account
from .models import User

bp = Blueprint("bank", __name__)


class InsufficientFunds(Conflict):
    description = "Insufficient funds: nothing was transferred."


@bp.get("/")
def index() -> str:
    accounts = db.session.scalars(sa.select(Account).order_by(Account.id)).all()
    return render_template("index.html", accounts=accounts)


@bp.get("/login")
def login_form() -> str:
    return render_template("login.html")


@bp.post("/login")
@sidelog.audit("auth.login")
def login() -> Response | tuple[str, int]:
    username = request.form.get("username", "")
    user = db.session.scalar(sa.select(User).filter_by(username=username))
    if user is None or not user.check_password(request.form.get("password", "")):
        # Its own entry, kept whatever the request does next; never log the
        # password (a "password" key would be redacted anyway).
        sidelog.log("login.failed", level="warning", data={"username": username})
        return render_template("login.html", error="Wrong username or password."), 401
    login_user(user)
    return redirect(url_for("bank.index"))


@bp.post("/logout")
@sidelog.audit("auth.logout")
def logout() -> Response:
    if current_user.is_authenticated:
        # The actor is read when the view ends, after the sign-out.
        sidelog.annotate(username=current_user.username)
    logout_user()
    return redirect(url_for("bank.index"))


@bp.post("/transfers")
@sidelog.audit("funds.transfer")
def transfer() -> Response:
    # Checked inside the audited view, not by @login_required above it, so
    # that an attempt without signing in is recorded too (a 401 failure).
    if not current_user.is_authenticated:
        abort(401, "Sign in to transfer.")
    try:
        amount = int(request.form["amount"])
        source_id = int(request.form["source"])
        target_id = int(request.form["target"])
    except (KeyError, ValueError):
        abort(400, "Give source, target and a whole amount of cents.")
    sidelog.annotate(source=source_id, target=target_id, amount=amount)
    if amount <= 0 or source_id == target_id:
        abort(400, "The amount must be above 0, between two accounts.")
    source = db.session.get(Account, source_id)
    target = db.session.get(Account, target_id)
    if source is None or target is None:
        abort(404)
    if source.owner_id != current_user.id:
        abort(403, "You can only transfer from your own accounts.")
    source.balance -= amount
    # The debit is now written in the transaction; the check below undoes it
    # by raising, and the audit entry still says what was tried.
    db.session.flush()
    if source.balance < 0:
        raise InsufficientFunds()
    target.balance += amount
    db.session.commit()
    return redirect(url_for("bank.index"))
