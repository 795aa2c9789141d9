"""How fast ``flask sidelog show`` answers, and how much memory ``export``
takes, on a log of 1,000,000 entries, on SQLite and PostgreSQL.

One command: ``python benchmarks/bench_cli.py`` (``--rows 2000`` for a smoke
run). It loads the entries in bulk, times ``show`` with each filter alone and
with ``--since`` (in process, median of 5 after one warm-up, so Python's start
is not counted), prints each query's plan, and exports every entry from a real
``flask`` process whose peak RSS a small parent process reads with
``getrusage(RUSAGE_CHILDREN)``. Results go to
``benchmarks/results/cli.json`` and ``cli.md``.

Targets: each ``show`` under 0.3 s, ``export`` under 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import sqlalchemy as sa
from flask import Flask

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The checkout's flask_sidelog, the tests' throwaway PostgreSQL, cli_app.
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

from _args import positive  # noqa: E402

from _postgres import ThrowawayPostgres  # noqa: E402
from flask_sidelog import SideLog  # noqa: E402
from flask_sidelog.entry import make_entry  # noqa: E402

SHOW_TARGET_S = 0.3
EXPORT_TARGET_MB = 100
CHUNK = 50_000
# Event, weight, audited (has an outcome), method and path.
EVENTS = [
    ("login.ok", 30, False, "POST", "/login"),
    ("login.failed", 8, False, "POST", "/login"),
    ("login.mfa", 4, False, "POST", "/login/mfa"),
    ("password.reset", 2, False, "POST", "/password/reset"),
    ("funds.transfer", 25, True, "POST", "/transfers"),
    ("account.update", 10, True, "PATCH", "/account"),
    ("invoice.create", 8, True, "POST", "/invoices"),
    ("report.export", 5, True, "GET", "/reports/export"),
    ("admin.delete_user", 1, True, "DELETE", "/admin/users/7"),
    ("job.nightly", 1, False, None, None),
    ("api.key_rotate", 1, True, "POST", "/api/keys"),
]
OUTCOMES = [
    ("success", "info", 200),
    ("failure", "warning", 403),
    ("error", "error", 500),
]


def generate(rows: int, seed: int = 7) -> t.Iterator[list[dict[str, t.Any]]]:
    """Entries spread over 30 days up to now, oldest first, in chunks."""
    rng = random.Random(seed)
    end = datetime.now(timezone.utc)
    start = end - timedelta(days=30)
    step = (end - start) / rows
    weights = [e[1] for e in EVENTS]
    chunk: list[dict[str, t.Any]] = []
    for i in range(rows):
        event, _, audited, method, path = rng.choices(EVENTS, weights)[0]
        actor = (
            None
            if rng.random() < 0.03
            else f"user-{int(rng.paretovariate(1.1)) % 20000}"
        )
        outcome = status = None
        level = "warning" if event == "login.failed" else "info"
        if audited:
            outcome, level, status = rng.choices(OUTCOMES, (88, 9, 3))[0]
        chunk.append(
            {
                "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "created_at": start + step * i,
                "event": event,
                "level": level,
                "actor": actor,
                "outcome": outcome,
                "status_code": status,
                "main_tx": None
                if outcome is None
                else ("committed" if outcome == "success" else "rolled_back"),
                "method": method,
                "path": path,
                "endpoint": None if path is None else path.strip("/").replace("/", "."),
                "remote_addr": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}",
                "user_agent": "Mozilla/5.0 (bench)",
                "request_id": uuid.UUID(int=rng.getrandbits(128)).hex,
                "duration_ms": round(rng.uniform(1, 80), 3),
                "error": "RuntimeError: insufficient funds"
                if outcome == "error"
                else None,
                "data": {"amount": rng.randrange(1, 10000), "currency": "EUR"},
            }
        )
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load(app: Flask, sidelog: SideLog, rows: int) -> float:
    """Bulk-load ``rows`` entries: indexes dropped, COPY on PostgreSQL and
    executemany on SQLite, indexes built again, statistics gathered."""
    started = time.perf_counter()
    with app.app_context():
        sidelog.create_table()
        table = app.extensions["sidelog"].writer.table
        # Not the log engine: its statement timeout is for single writes.
        engine = sa.create_engine(app.extensions["sidelog"].writer.engine.url)
        with engine.begin() as conn:
            for index in table.indexes:
                index.drop(conn)
        if engine.dialect.name == "postgresql":
            from psycopg.types.json import Jsonb

            names = [c.name for c in table.columns if c.name != "id"]
            raw = engine.raw_connection()
            try:
                with raw.cursor() as cur:
                    copy_sql = f"COPY {table.name} ({', '.join(names)}) FROM STDIN"
                    with cur.copy(copy_sql) as copy:  # type: ignore[attr-defined]
                        for chunk in generate(rows):
                            for entry in chunk:
                                entry["data"] = Jsonb(entry["data"])
                                copy.write_row([entry.get(n) for n in names])
                raw.commit()
            finally:
                raw.close()
        else:
            # The driver's executemany with values made by the column types'
            # own bind processors: what SQLAlchemy stores, without its
            # per-row overhead.
            names = [c.name for c in table.columns if c.name != "id"]
            dialect = engine.dialect
            convert = [
                table.c[n].type.dialect_impl(dialect).bind_processor(dialect)
                for n in names
            ]
            insert = (
                f"INSERT INTO {table.name} ({', '.join(names)})"
                f" VALUES ({', '.join('?' * len(names))})"
            )
            raw = engine.raw_connection()
            try:
                cursor = raw.cursor()
                for chunk in generate(rows):
                    cursor.executemany(
                        insert,
                        [
                            [
                                v if f is None or v is None else f(v)
                                for f, v in zip(
                                    convert, (e.get(n) for n in names), strict=True
                                )
                            ]
                            for e in chunk
                        ],
                    )
                raw.commit()
            finally:
                raw.close()
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                # SQLite stores times as text: the bulk load must write the
                # same text as the writer does.
                check = make_entry("check", created_at=datetime(2024, 5, 1, 12))
                conn.execute(table.insert(), [check])
                stored = conn.execute(
                    sa.select(sa.cast(table.c.created_at, sa.String))
                    .order_by(table.c.id.desc())
                    .limit(2)
                ).all()
                assert len({len(text) for (text,) in stored}) == 1, stored
                conn.execute(table.delete().where(table.c.event == "check"))
            for index in table.indexes:
                index.create(conn)
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"ANALYZE {table.name}")
        engine.dispose()
    return time.perf_counter() - started


def show_cases(app: Flask) -> list[list[str]]:
    with app.app_context():
        writer = app.extensions["sidelog"].writer
        with writer.engine.connect() as conn:
            request_id = conn.scalar(
                sa.select(writer.table.c.request_id)
                .order_by(writer.table.c.id.desc())
                .limit(1)
            )
    singles = [
        [],
        ["--event", "funds.transfer"],
        ["--event", "admin.delete_user"],
        ["--event", "login.*"],
        ["--event", "admin.*"],
        # A glob that matches nothing: the worst case, every entry in range read.
        ["--event", "nomatch.*"],
        ["--actor", "user-1"],
        ["--actor", "user-12345"],
        ["--outcome", "error"],
        ["--level", "error"],
        ["--request-id", str(request_id)],
    ]
    cases = []
    for since in ([], ["--since", "24h"], ["--since", "7d"]):
        for single in singles:
            if single or since:
                cases.append(single + since)
    return cases


def time_show(app: Flask, args: list[str], repeat: int = 5) -> dict[str, t.Any]:
    runner = app.test_cli_runner()
    times = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        result = runner.invoke(args=["sidelog", "show", "--format", "jsonl", *args])
        times.append(time.perf_counter() - started)
        if result.exit_code != 0:
            raise SystemExit(f"show {args} failed: {result.output}")
    rows = len(result.output.splitlines())
    return {
        "args": " ".join(args),
        "rows": rows,
        "first_s": times[0],
        "median_s": statistics.median(times[1:]),
        "max_s": max(times[1:]),
    }


def plan(app: Flask, args: list[str]) -> str:
    """The plans of the statements ``show`` runs for ``args``: those that
    ``SideLog.entries`` executes, captured and explained one by one."""
    from flask_sidelog.cli import show_command

    ctx = show_command.make_context("show", list(args))
    params = {
        k: v
        for k, v in ctx.params.items()
        if k in ("event", "actor", "outcome", "level", "request_id", "since", "until")
    }
    captured: list[tuple[str, t.Any]] = []

    def capture(
        conn: t.Any,
        cursor: t.Any,
        statement: str,
        parameters: t.Any,
        context: t.Any,
        executemany: bool,
    ) -> None:
        captured.append((statement, parameters))

    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
        sa.event.listen(engine, "before_cursor_execute", capture)
        try:
            app.extensions["sidelog"].extension.entries(limit=50, **params)
        finally:
            sa.event.remove(engine, "before_cursor_execute", capture)
        lines = []
        with engine.connect() as conn:
            for statement, parameters in captured:
                if len(captured) > 1:
                    lines.append("-- " + " ".join(statement.split())[:70] + " ...")
                if engine.dialect.name == "postgresql":
                    explain = f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {statement}"
                    rows = conn.exec_driver_sql(explain, parameters)
                    lines += [r[0] for r in rows]
                else:
                    explain = f"EXPLAIN QUERY PLAN {statement}"
                    rows = conn.exec_driver_sql(explain, parameters)
                    lines += [r[-1] for r in rows]
    return "\n".join(lines)


# Runs the command and prints its peak RSS in KiB. A process forked from this
# big benchmark would start with our RSS as its high-water mark (it survives
# exec), so the command is started by this small process instead.
MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def measure_export(uri: str, fmt: str, workdir: str, rows: int) -> dict[str, t.Any]:
    """Export every entry from a real ``flask`` process; its peak RSS."""
    out = os.path.join(workdir, f"export.{fmt}")
    env = dict(
        os.environ, SIDELOG_BENCH_URI=uri, PYTHONPATH=os.pathsep.join([HERE, ROOT])
    )
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    results = {}
    for name, args in (
        ("baseline", ["sidelog", "show", "-n", "1", "--format", "jsonl"]),
        ("export", ["sidelog", "export", "--format", fmt, "-o", out]),
    ):
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, flask, "--app", "cli_app", *args],
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr}")
        peak = int(proc.stdout.split()[-1]) / 1024
        results[name] = {"seconds": elapsed, "peak_rss_mb": peak}
    with open(out, "rb") as f:
        lines = sum(1 for _ in f)
    size = os.path.getsize(out)
    os.remove(out)
    expected = rows + (fmt == "csv")
    if lines != expected:
        raise SystemExit(f"export {fmt} wrote {lines} lines, not {expected}")
    return {
        "format": fmt,
        "seconds": results["export"]["seconds"],
        "peak_rss_mb": results["export"]["peak_rss_mb"],
        "baseline_rss_mb": results["baseline"]["peak_rss_mb"],
        "lines": lines,
        "file_mb": size / 2**20,
    }


def server_side_cursor(app: Flask) -> bool | None:
    """Whether streaming uses a server-side (named) cursor on PostgreSQL."""
    with app.app_context():
        engine = app.extensions["sidelog"].writer.engine
        if engine.dialect.name != "postgresql":
            return None
        names: list[t.Any] = []

        def record(conn: t.Any, cursor: t.Any, *args: t.Any) -> None:
            names.append(getattr(cursor, "name", None))

        sa.event.listen(engine, "before_cursor_execute", record)
        try:
            entries = app.extensions["sidelog"].extension.iter_entries()
            next(entries)
            entries.close()
        finally:
            sa.event.remove(engine, "before_cursor_execute", record)
    return bool(names and names[-1])


def run_backend(name: str, uri: str, rows: int, workdir: str) -> dict[str, t.Any]:
    app = Flask("bench_cli")
    app.config.update(SQLALCHEMY_DATABASE_URI=uri, SIDELOG_DATABASE_URI=uri)
    sidelog = SideLog(app)
    print(f"[{name}] loading {rows:,} entries ...", flush=True)
    load_s = load(app, sidelog, rows)
    print(f"[{name}] loaded in {load_s:.1f} s", flush=True)
    shows = []
    plans = {}
    for args in show_cases(app):
        result = time_show(app, args)
        result["plan"] = plans[result["args"]] = plan(app, args)
        shows.append(result)
        mark = "ok " if result["max_s"] < SHOW_TARGET_S else "SLOW"
        print(
            f"[{name}] {mark} show {result['args']:<40}"
            f" median {result['median_s'] * 1000:7.1f} ms"
            f"  max {result['max_s'] * 1000:7.1f} ms  rows {result['rows']}",
            flush=True,
        )
        print("    " + result["plan"].replace("\n", "\n    "), flush=True)
    exports = []
    for fmt in ("jsonl", "csv"):
        result = measure_export(uri, fmt, workdir, rows)
        exports.append(result)
        print(
            f"[{name}] export {fmt}: {result['lines']:,} lines,"
            f" {result['file_mb']:.0f} MB in {result['seconds']:.1f} s,"
            f" peak RSS {result['peak_rss_mb']:.1f} MB"
            f" (show -n 1: {result['baseline_rss_mb']:.1f} MB)",
            flush=True,
        )
    return {
        "rows": rows,
        "load_s": load_s,
        "show": shows,
        "export": exports,
        "server_side_cursor": server_side_cursor(app),
    }


def write_results(results: dict[str, t.Any]) -> None:
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cli.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "# `flask sidelog` on a large log",
        "",
        f"{results['rows']:,} entries over 30 days; `python benchmarks/bench_cli.py`"
        f" on {results['cpus']} CPUs, {results['when']}. `show`: in process,"
        " median and max of 5 runs after a warm-up (targets: under"
        f" {SHOW_TARGET_S} s). `export`: a real `flask` process, peak RSS from"
        f" `getrusage(RUSAGE_CHILDREN)` in a small parent process"
        f" (target: under {EXPORT_TARGET_MB} MB). `show -n 1` RSS: the same"
        " process doing almost nothing, for comparison.",
        "",
    ]
    for backend, data in results["backends"].items():
        lines += [
            f"## {backend}",
            "",
            f"Loaded in {data['load_s']:.1f} s."
            f" Server-side cursor for export: {data['server_side_cursor']}.",
            "",
            "| show | rows | median ms | max ms | plan |",
            "|---|---:|---:|---:|---|",
        ]
        for s in data["show"]:
            plan_text = s["plan"].replace("\n", "<br>").replace("|", "\\|")
            lines.append(
                f"| `{s['args']}` | {s['rows']} | {s['median_s'] * 1000:.1f}"
                f" | {s['max_s'] * 1000:.1f} | {plan_text} |"
            )
        lines += [
            "",
            "| export | lines | file MB | seconds | peak RSS MB | `show -n 1` RSS MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for e in data["export"]:
            lines.append(
                f"| {e['format']} | {e['lines']:,} | {e['file_mb']:.0f}"
                f" | {e['seconds']:.1f} | {e['peak_rss_mb']:.1f}"
                f" | {e['baseline_rss_mb']:.1f} |"
            )
        lines.append("")
    with open(os.path.join(out, "cli.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=positive(int), default=1_000_000, help="entries to load"
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgres"),
        action="append",
        help="default: both",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not write benchmarks/results"
    )
    args = parser.parse_args()
    backends = args.backend or ["sqlite", "postgres"]
    results: dict[str, t.Any] = {
        "rows": args.rows,
        "cpus": os.cpu_count(),
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="sidelog-bench-cli-") as workdir:
        if "sqlite" in backends:
            uri = f"sqlite:///{os.path.join(workdir, 'log.db')}"
            results["backends"]["sqlite"] = run_backend(
                "sqlite", uri, args.rows, workdir
            )
        if "postgres" in backends:
            with ThrowawayPostgres() as pg:
                uri = pg.create_database("bench_cli")
                results["backends"]["postgres"] = run_backend(
                    "postgres", uri, args.rows, workdir
                )
    failed = [
        f"{backend}: show {s['args']} took {s['max_s']:.3f} s"
        for backend, data in results["backends"].items()
        for s in data["show"]
        if s["max_s"] >= SHOW_TARGET_S
    ] + [
        f"{backend}: export {e['format']} peaked at {e['peak_rss_mb']:.0f} MB"
        for backend, data in results["backends"].items()
        for e in data["export"]
        if e["peak_rss_mb"] >= EXPORT_TARGET_MB
    ]
    if not args.no_write:
        previous = os.path.join(HERE, "results", "cli.json")
        if args.backend and os.path.exists(previous):
            # A run of one backend keeps the other's last results.
            with open(previous) as f:
                kept = json.load(f)["backends"]
            results["backends"] = {**kept, **results["backends"]}
        write_results(results)
    print("\n".join(failed) if failed else "All targets met.")


if __name__ == "__main__":
    main()
