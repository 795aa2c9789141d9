"""The extensions, created once and bound to each app by ``create_app``."""

from __future__ import annotations

import sqlalchemy.orm as sa_orm
from flask_login import current_user
from flask_login import LoginManager
from flask_sqlalchemy import SQLAlchemy

from flask_sidelog import SideLog


class Base(sa_orm.DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
sidelog = SideLog()
login_manager = LoginManager()
login_manager.login_view = "bank.login"


@sidelog.actor_loader
def actor() -> str | None:
    """Entries name the signed-in user by username rather than by id."""
    if current_user.is_authenticated:
        return str(current_user.username)
    return None
