"""What the hash chain costs: throughput with ``SIDELOG_CHAIN`` on vs off,
16 concurrent clients, PostgreSQL.

Usage: ``python benchmarks/bench_chain.py [--seconds 10] [--rounds 3]
[--only http|insert] [--modes sync group buffered]`` (from the checkout with
``PYTHONPATH=.``, or with flask-sidelog installed).

Two measurements, each on one throwaway PostgreSQL server, one fresh database
per variant, rounds alternating off/on so that drift in the machine's load
hits both alike:

- ``http``: each write mode end to end. gunicorn (gthread, 2 workers x 8
  threads,
  ``--preload``) serves the ``POST /items`` app of :mod:`apps` with the view
  under ``@sidelog.audit``; 16 client threads with keep-alive connections send
  requests for ``--seconds``; requests/s.
- ``insert``: ``Writer.insert`` called directly in a loop, entries/s: by 16
  threads with batches of 1 (sync mode's shape), by 16 threads with batches
  of 50 (the worst case of the group and buffered modes, which call
  ``Writer.insert(batch)``), and by 2 threads with batches of 50 (one
  flusher per gunicorn worker, as a buffered mode would run).

The figure is on/off throughput per round and overall (sum of on / sum of off).
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
import typing as t

from flask import Flask

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import apps  # noqa: E402
from _args import positive  # noqa: E402

from _postgres import ThrowawayPostgres  # noqa: E402
from flask_sidelog import SideLog  # noqa: E402
from flask_sidelog.entry import make_entry  # noqa: E402

CLIENTS = 16


def create_app(db_url: str, chain: str, mode: str = "sync") -> Flask:
    """``POST /items`` audited by SideLog in write ``mode``, chain ``"on"``
    or ``"off"``; for ``gunicorn --preload``."""
    app, db = apps.base_app(db_url)
    app.config.update(
        SIDELOG_CHAIN=chain == "on", SIDELOG_CREATE_TABLE=True, SIDELOG_WRITE_MODE=mode
    )
    sidelog = SideLog(app, db)
    apps.add_items_view(app, db, apps.item_model(db))
    app.view_functions["create_item"] = sidelog.audit(app.view_functions["create_item"])
    apps.create_tables(app, db)
    with app.app_context():
        sidelog.create_table()
        app.extensions["sidelog"].dispose()
    return app


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_clients(client: t.Callable[[int], None], clients: int = CLIENTS) -> None:
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _load(port: int, seconds: float) -> int:
    """Requests completed by :data:`CLIENTS` keep-alive clients in ``seconds``."""
    done = [0] * CLIENTS
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", "/items")
            response = conn.getresponse()
            response.read()
            if response.status != 201:
                raise RuntimeError(f"POST /items answered {response.status}")
            done[n] += 1
        conn.close()

    _run_clients(client)
    return sum(done)


def _serve(url: str, chain: str, mode: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = dict(os.environ)
    root = os.path.join(os.path.dirname(__file__), "..")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "-k",
            "gthread",
            "--workers",
            "2",
            "--threads",
            "8",
            "--log-level",
            "warning",
            "-b",
            f"127.0.0.1:{port}",
            "--chdir",
            os.path.dirname(os.path.abspath(__file__)),
            f"bench_chain:create_app({url!r}, {chain!r}, {mode!r})",
        ],
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("gunicorn did not start within 60 s")


def bench_http(
    server: ThrowawayPostgres, seconds: float, rounds: int, mode: str
) -> None:
    urls = {c: server.create_database(f"chain_http_{mode}_{c}") for c in ("off", "on")}
    totals = {"off": 0, "on": 0}
    for r in range(1, rounds + 1):
        rate = {}
        for chain in ("off", "on"):
            process, port = _serve(urls[chain], chain, mode)
            try:
                _load(port, 2)  # warm up: connections, caches
                n = _load(port, seconds)
            finally:
                process.terminate()
                process.wait(30)
            totals[chain] += n
            rate[chain] = n / seconds
        print(
            f"http {mode:<8} round {r}: off {rate['off']:7.1f} req/s,"
            f" on {rate['on']:7.1f} req/s, on/off {rate['on'] / rate['off']:.3f}"
        )
    print(f"http {mode:<8} overall on/off {totals['on'] / totals['off']:.3f}")


def _writer_app(url: str, chain: str) -> tuple[Flask, SideLog]:
    app = Flask(f"bench_chain_{chain}")
    app.config.update(
        SIDELOG_DATABASE_URI=url,
        SQLALCHEMY_DATABASE_URI=url,
        SIDELOG_CHAIN=chain == "on",
        SIDELOG_ENGINE_OPTIONS={"pool_size": CLIENTS, "max_overflow": 0},
    )
    sidelog = SideLog(app)
    with app.app_context():
        sidelog.create_table()
    return app, sidelog


def _insert_load(app: Flask, batch: int, writers: int, seconds: float) -> int:
    with app.app_context():
        writer = app.extensions["sidelog"].writer
    done = [0] * writers
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        while time.monotonic() < stop:
            entries = [
                make_entry("bench.insert", actor=f"client-{n}", data={"i": i, "n": n})
                for i in range(batch)
            ]
            writer.insert(entries)
            done[n] += batch

    _run_clients(client, writers)
    return sum(done)


def bench_insert(server: ThrowawayPostgres, seconds: float, rounds: int) -> None:
    variants: dict[str, tuple[Flask, SideLog]] = {
        c: _writer_app(server.create_database(f"chain_insert_{c}"), c)
        for c in ("off", "on")
    }
    for batch, writers in ((1, CLIENTS), (50, CLIENTS), (50, 2)):
        name = f"insert batch {batch:2} x {writers:2} writers"
        totals = {"off": 0, "on": 0}
        for r in range(1, rounds + 1):
            rate = {}
            for chain in ("off", "on"):
                app = variants[chain][0]
                _insert_load(app, batch, writers, 1)
                n = _insert_load(app, batch, writers, seconds)
                totals[chain] += n
                rate[chain] = n / seconds
            print(
                f"{name} round {r}: off {rate['off']:8.1f} entries/s,"
                f" on {rate['on']:8.1f} entries/s, on/off"
                f" {rate['on'] / rate['off']:.3f}"
            )
        print(f"{name} overall on/off {totals['on'] / totals['off']:.3f}")
    for chain, (app, sidelog) in variants.items():
        with app.app_context():
            result = sidelog.verify()
            app.extensions["sidelog"].dispose()
        if chain == "on" and not result.ok:
            raise RuntimeError(f"the chain written under load is broken: {result}")
        if chain == "on":
            print(f"insert chain after the load: {str(result).splitlines()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=positive(float), default=10.0, help="per measurement"
    )
    parser.add_argument("--rounds", type=positive(int), default=3, help="off/on pairs")
    parser.add_argument("--only", choices=("http", "insert"), help="one part only")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("sync", "group", "buffered"),
        default=["sync", "group", "buffered"],
        help="write modes the http part measures",
    )
    args = parser.parse_args()
    with ThrowawayPostgres() as server:
        if args.only in (None, "insert"):
            bench_insert(server, args.seconds, args.rounds)
        if args.only in (None, "http"):
            for mode in args.modes:
                bench_http(server, args.seconds, args.rounds, mode)


if __name__ == "__main__":
    main()
