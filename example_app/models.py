"""Users and their accounts."""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask_login import UserMixin
from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from .extensions import db
from .extensions import login_manager


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "user"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    username: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(80), unique=True)
    password_hash: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(255))
    accounts: sa_orm.Mapped[list[Account]] = sa_orm.relationship(
        back_populates="owner", order_by="Account.id"
    )

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)


class Account(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "account"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    owner_id: sa_orm.Mapped[int] = sa_orm.mapped_column(sa.ForeignKey("user.id"))
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(80))
    #: In cents.
    balance: sa_orm.Mapped[int] = sa_orm.mapped_column(default=0)
    owner: sa_orm.Mapped[User] = sa_orm.relationship(back_populates="accounts")


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    return db.session.get(User, int(user_id))
