"""What change tracking costs: one request that changes 1,000 rows, tracked
and untracked, on SQLite and PostgreSQL.

Usage::

    python benchmarks/bench_tracking.py            # full run
    python benchmarks/bench_tracking.py --smoke    # a few quick rounds
    python benchmarks/bench_tracking.py --postgres-url postgresql+psycopg://...
    python benchmarks/bench_tracking.py --breakdown  # and where the time goes

Both apps have flask-sidelog installed the same way and the same view; only
the ``tracked`` one calls ``sidelog.track(Item)``. Each has its own database
(a SQLite file, or a fresh PostgreSQL database) holding the log too, as the
default configuration does. The two are timed in alternating rounds within
one process, so drift hits both; the report gives the median time of each and
their ratio. Without ``--postgres-url`` a throwaway server is started (from
``tests/_postgres.py``); without one available, PostgreSQL is skipped.

With ``--breakdown``, more tracked requests follow the timed rounds, with
the parts of tracking timed: capturing the flush, making the entries,
linking them into the chain, converting them for the driver (on SQLite,
grouped by their NULL columns), and the rest of the log's transaction (its
insert and commit; on PostgreSQL that includes encoding ``data``, which
psycopg does while copying).

Views (``ROWS`` = 1,000 rows each, one commit):

- ``update``: load the rows and change one column of each.
- ``insert``: add as many new rows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import typing as t
import uuid

import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

# This checkout's flask_sidelog and the tests' throwaway PostgreSQL helper.
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

from _args import positive  # noqa: E402
from _args import postgres_url  # noqa: E402

from _postgres import ThrowawayPostgres  # noqa: E402
from flask_sidelog import SideLog  # noqa: E402
from flask_sidelog import tracking  # noqa: E402
from flask_sidelog.chain import Chain  # noqa: E402
from flask_sidelog.writer import Writer  # noqa: E402

ROWS = 1000


class Base(sa_orm.DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_item"
    id: sa_orm.Mapped[int] = sa_orm.mapped_column(primary_key=True)
    name: sa_orm.Mapped[str] = sa_orm.mapped_column(sa.String(100))
    value: sa_orm.Mapped[int] = sa_orm.mapped_column(default=0)


def build_app(url: str, tracked: bool, instance: str) -> tuple[Flask, SQLAlchemy]:
    app = Flask(
        f"bench_{'tracked' if tracked else 'untracked'}", instance_path=instance
    )
    app.config.update(SQLALCHEMY_DATABASE_URI=url, SIDELOG_CREATE_TABLE=True)
    db = SQLAlchemy(model_class=Base)
    db.init_app(app)
    sidelog = SideLog(app, db)
    if tracked:
        sidelog.track(Item)

    @app.post("/update")
    def update() -> str:
        for item in db.session.scalars(sa.select(Item).limit(ROWS)):
            item.value += 1
        db.session.commit()
        return "ok"

    @app.post("/insert")
    def insert() -> str:
        db.session.add_all(Item(name=f"item {i}") for i in range(ROWS))
        db.session.commit()
        return "ok"

    with app.app_context():
        Base.metadata.create_all(db.engine)
        db.session.add_all(Item(name=f"seed {i}") for i in range(ROWS))
        db.session.commit()
        sidelog.create_table()
    return app, db


def time_request(app: Flask, path: str) -> float:
    client = app.test_client()
    start = time.perf_counter()
    response = client.post(path)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}")
    return elapsed


#: What --breakdown times: (label, owner, attribute). The log transaction
#: includes the chain and the values; its rest is printed.
PARTS = (
    ("capture", tracking, "_capture_flush"),
    ("entries", tracking, "make_change_entries"),
    ("chain", Chain, "link"),
    ("values", Writer, "_values"),
    ("values", Writer, "_null_groups"),
    ("values", Writer, "_linked_values"),
    ("log transaction", Writer, "_insert_once"),
)


@contextlib.contextmanager
def timing_parts() -> t.Iterator[dict[str, int]]:
    """Within the block, sum the nanoseconds spent in each of :data:`PARTS`."""
    spent = dict.fromkeys([label for label, _, _ in PARTS], 0)
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in PARTS]

    def timed(label: str, function: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        def call(*args: t.Any, **kwargs: t.Any) -> t.Any:
            start = time.perf_counter_ns()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter_ns() - start

        return call

    for (label, _, _), (owner, name, function) in zip(PARTS, originals, strict=True):
        setattr(owner, name, timed(label, function))
    try:
        yield spent
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def print_breakdown(name: str, view: str, app: Flask, requests: int) -> None:
    with timing_parts() as spent:
        for _ in range(requests):
            time_request(app, f"/{view}")
    ms = {label: ns / requests / 1e6 for label, ns in spent.items()}
    rest = ms["log transaction"] - ms["chain"] - ms["values"]
    print(
        f"{name:<10} {view:<7} tracked, per request: capture {ms['capture']:.1f} ms"
        f"  entries {ms['entries']:.1f}  chain {ms['chain']:.1f}"
        f"  values {ms['values']:.1f}  log insert+commit {rest:.1f}"
        f"  (mean of {requests})"
    )


def count_entries(app: Flask) -> int:
    with app.app_context():
        state = app.extensions["sidelog"]
        with state.writer.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(state.table)
                ).scalar_one()
            )


def run_backend(
    name: str, urls: tuple[str, str], rounds: int, instance: str, breakdown: int
) -> None:
    apps = {
        "untracked": build_app(urls[0], False, instance),
        "tracked": build_app(urls[1], True, instance),
    }
    try:
        for view in ("update", "insert"):
            times: dict[str, list[float]] = {"untracked": [], "tracked": []}
            for app, _ in apps.values():
                time_request(app, f"/{view}")  # warm up
            for _ in range(rounds):
                for variant, (app, _) in apps.items():
                    times[variant].append(time_request(app, f"/{view}"))
            base = statistics.median(times["untracked"])
            tracked = statistics.median(times["tracked"])
            print(
                f"{name:<10} {view:<7} {ROWS} rows  untracked {base * 1000:8.1f} ms"
                f"  tracked {tracked * 1000:8.1f} ms  ratio {tracked / base:5.2f}x"
                f"  (median of {rounds})"
            )
            if breakdown:
                print_breakdown(name, view, apps["tracked"][0], breakdown)
        entries = count_entries(apps["tracked"][0])
        expected = (2 * (rounds + 1 + breakdown) + 1) * ROWS  # and the seed rows
        if entries != expected or count_entries(apps["untracked"][0]) != 0:
            raise RuntimeError(
                f"{name}: the tracked app logged {entries} entries, expected {expected}"
            )
    finally:
        for app, db in apps.values():
            with app.app_context():
                app.extensions["sidelog"].dispose()
                db.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="3 rounds, to check it runs"
    )
    parser.add_argument(
        "--rounds", type=positive(int), default=15, help="timed rounds per view"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="then time the parts of tracked requests (5 more per view)",
    )
    parser.add_argument(
        "--postgres-url",
        type=postgres_url,
        help="a PostgreSQL server URL; default: start a throwaway one",
    )
    args = parser.parse_args()
    rounds = 3 if args.smoke else args.rounds
    breakdown = 5 if args.breakdown else 0
    with tempfile.TemporaryDirectory() as tmp:
        urls = (f"sqlite:///{tmp}/untracked.db", f"sqlite:///{tmp}/tracked.db")
        run_backend("sqlite", urls, rounds, tmp, breakdown)
        with contextlib.ExitStack() as stack:
            if args.postgres_url:
                server_url = args.postgres_url
                engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
                names = [f"bench_{uuid.uuid4().hex[:12]}" for _ in range(2)]
                with engine.connect() as conn:
                    for db_name in names:
                        conn.execute(sa.text(f"CREATE DATABASE {db_name}"))
                engine.dispose()
                url = sa.make_url(server_url)
                pg_urls = tuple(
                    url.set(database=n).render_as_string(hide_password=False)
                    for n in names
                )
            else:
                reason = ThrowawayPostgres.available()
                if reason is not None:
                    print(f"postgresql skipped: {reason}")
                    return
                server = stack.enter_context(ThrowawayPostgres())
                pg_urls = tuple(
                    server.create_database(f"bench_{uuid.uuid4().hex[:12]}")
                    for _ in range(2)
                )
            run_backend(
                "postgresql",
                t.cast("tuple[str, str]", pg_urls),
                rounds,
                tmp,
                breakdown,
            )


if __name__ == "__main__":
    main()
