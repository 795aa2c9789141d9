"""What recording a request costs before anything is written: ``@audit``
against the least any audit hook of a Flask app can do.

Usage::

    python benchmarks/bench_floor.py             # CPU time, interleaved rounds
    python benchmarks/bench_floor.py --valgrind  # instructions (callgrind)
    python benchmarks/bench_floor.py --smoke     # a few requests, to check it runs

One view, ``POST /items``, inserts a row into a SQLite file (with
``synchronous=OFF``, so the disk does not blur the figures) and commits. Each
variant runs in a process of its own:

- ``plain``: the view alone;
- ``bare``: a decorator and a ``teardown_appcontext`` function that keep a
  tuple (the cost of being called at all);
- ``naive``: the same, building an entry as a plain dict: two ``uuid4``,
  the time, the request's fields, outcome and duration;
- ``sidelog``: ``@sidelog.audit`` in ``sync`` mode, with the write switched
  off (``Writer.insert`` does nothing), so what is left is recording: the
  request id and fields, the main session's events, the entry, the teardown.

Reported per request: the cost over ``plain`` and its share of ``plain``. CPU
time is the median over interleaved rounds (noisy on a shared machine).
``--valgrind`` counts instructions, which a busy machine does not change: the
difference between a run of 100 requests and one of 1,100, so that start-up
is not counted. The counts of one invocation repeat to within a few
instructions, but separate invocations have differed by up to 23,000 a
request: compare variants within one invocation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from _args import positive  # noqa: E402

VARIANTS = ("plain", "bare", "naive", "sidelog")


def build(variant: str, folder: str) -> t.Any:
    """The app of ``variant``, its databases in ``folder``."""
    import sqlalchemy as sa
    from flask import Flask
    from flask import g
    from flask import request
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{folder}/{variant}.db"
    app.config["SIDELOG_DATABASE_URI"] = f"sqlite:///{folder}/{variant}-log.db"
    app.config["SIDELOG_WRITE_MODE"] = "sync"
    db = SQLAlchemy(app)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(100))

    with app.app_context():

        @sa.event.listens_for(db.engine, "connect")
        def unsynced(dbapi: t.Any, record: t.Any) -> None:
            dbapi.execute("PRAGMA synchronous=OFF")

        db.create_all()

    def view() -> tuple[dict[str, str], int]:
        db.session.add(Item(name="item"))
        db.session.commit()
        return {"status": "created"}, 201

    kept: list[t.Any] = []
    if variant in ("bare", "naive"):
        inner = view

        @functools.wraps(inner)
        def view() -> tuple[dict[str, str], int]:
            g.audit = (time.perf_counter(), request._get_current_object())
            return inner()

        if variant == "bare":

            @app.teardown_appcontext
            def keep(exc: BaseException | None) -> None:
                kept.append((g.pop("audit", None), exc))
                del kept[:-100]
        else:

            @app.teardown_appcontext
            def keep_entry(exc: BaseException | None) -> None:
                started, req = g.pop("audit")
                kept.append(
                    {
                        "uuid": str(uuid.uuid4()),
                        "created_at": datetime.datetime.now(datetime.timezone.utc),
                        "event": "items.create",
                        "level": "info",
                        "outcome": "error" if exc else "success",
                        "status_code": 500 if exc else 201,
                        "method": req.method,
                        "path": req.path,
                        "endpoint": req.endpoint,
                        "remote_addr": req.remote_addr,
                        "request_id": uuid.uuid4().hex,
                        "duration_ms": (time.perf_counter() - started) * 1000,
                    }
                )
                del kept[:-100]
    elif variant == "sidelog":
        from flask_sidelog import SideLog
        from flask_sidelog.writer import Writer

        Writer.insert = lambda self, entries: None  # type: ignore[method-assign]
        view = SideLog(app, db).audit("items.create")(view)
    app.add_url_rule("/items", "create_item", view, methods=["POST"])
    return app


def worker(variant: str, folder: str, count: int | None) -> None:
    """Serve ``count`` requests and exit (for callgrind), or, with no count,
    for each line ``N`` on stdin serve N and print the CPU time per request."""
    # run.py's in-process call, a request straight to the WSGI callable.
    from run import _caller

    call, statuses = _caller(build(variant, folder))
    if count is not None:
        for _ in range(count):
            call()
        _check(statuses)
        return
    for line in sys.stdin:
        n = int(line)
        started = time.process_time()
        for _ in range(n):
            call()
        _check(statuses)
        print(json.dumps((time.process_time() - started) / n), flush=True)


def _check(statuses: list[str]) -> None:
    if any(status != "201 CREATED" for status in statuses):
        raise RuntimeError(f"the view did not always answer 201: {set(statuses)}")
    statuses.clear()


def _command(variant: str, folder: str, count: int | None = None) -> list[str]:
    extra = [] if count is None else [str(count)]
    return [sys.executable, __file__, "--worker", variant, folder, *extra]


def cpu_time(folder: str, rounds: int, count: int) -> dict[str, list[float]]:
    """Per variant, the CPU time per request of each round, sorted."""
    procs = {
        v: subprocess.Popen(
            _command(v, folder),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for v in VARIANTS
    }
    per_request: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for round_ in range(rounds + 1):
            for variant, proc in procs.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{count}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{variant} worker exited with {proc.wait()}")
                if round_:  # the first round warms up
                    per_request[variant].append(json.loads(line))
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
    return {v: sorted(c * 1e6 for c in cost) for v, cost in per_request.items()}


def instructions(folder: str, few: int, many: int) -> dict[str, list[float]]:
    """Per variant, the instructions per request (one figure)."""

    def collected(variant: str, count: int) -> int:
        own = os.path.join(folder, f"{variant}-{count}")  # runs side by side
        os.mkdir(own)
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                *_command(variant, own, count),
            ],
            capture_output=True,
            text=True,
            # The same string hashes in every run, so the same dict probes.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        if done.returncode != 0:
            last = "\n".join(done.stderr.splitlines()[-15:])
            code = done.returncode
            sys.exit(f"valgrind on the {variant} worker exited with {code}:\n{last}")
        for line in done.stderr.splitlines():
            if "Collected :" in line:
                return int(line.split()[-1])
        raise RuntimeError(f"callgrind printed no count:\n{done.stderr}")

    # A count is the same on a busy machine: run them side by side.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        runs = {
            (v, n): pool.submit(collected, v, n) for v in VARIANTS for n in (few, many)
        }
        return {
            v: [(runs[v, many].result() - runs[v, few].result()) / (many - few)]
            for v in VARIANTS
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few requests")
    parser.add_argument(
        "--valgrind", action="store_true", help="count instructions with callgrind"
    )
    parser.add_argument(
        "--rounds",
        type=positive(int),
        default=7,
        help="CPU time (without --valgrind or --smoke): rounds per variant",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, folder, *count = args.worker
        worker(variant, folder, int(count[0]) if count else None)
        return
    if args.valgrind and shutil.which("valgrind") is None:
        parser.error("--valgrind needs valgrind on PATH (Debian: apt install valgrind)")
    with tempfile.TemporaryDirectory() as folder:
        if args.valgrind:
            few, many = (20, 40) if args.smoke else (100, 1100)
            unit = "instructions"
            cost = instructions(folder, few, many)
        else:
            rounds, count = (1, 50) if args.smoke else (args.rounds, 3000)
            unit = "us of CPU"
            cost = cpu_time(folder, rounds, count)
    median = {v: statistics.median(found) for v, found in cost.items()}
    rounds = len(cost["plain"])
    each = f" (median of {rounds} rounds, and range)" if rounds > 1 else ""
    print(f"per request, {unit}{each}:")
    for variant in VARIANTS:
        found = cost[variant]
        line = f"  {variant:<8} {median[variant]:>12,.1f}"
        if rounds > 1:
            line += f"  ({found[0]:,.0f} to {found[-1]:,.0f})"
        if variant != "plain":
            extra = median[variant] - median["plain"]
            line += f"   {extra:+,.0f} ({extra / median['plain']:+.1%} of plain)"
        print(line)


if __name__ == "__main__":
    main()
