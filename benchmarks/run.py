"""Measure what auditing costs a Flask view, against a baseline and the peers.

Usage (from anywhere)::

    python benchmarks/run.py            # full run: PostgreSQL and SQLite, ~5 min
    python benchmarks/run.py --smoke    # seconds: every variant, a few requests
    python benchmarks/run.py --profile a b   # where a request's time goes

If the running interpreter lacks a benchmark dependency, the script builds
``benchmarks/.venv`` from ``benchmarks/requirements.txt`` and runs itself
again there. flask-sidelog is always imported from this checkout.

Variants (one process each, see ``PEERS.md``): a baseline, b/c/d flask-sidelog
in ``sync``/``group``/``buffered`` mode, e postgresql-audit (PostgreSQL only),
f SQLAlchemy-Continuum. Every view inserts one row and commits.

Drivers, each in interleaved rounds (a b c d e f a b c ...):

- ``sequential``: one request at a time, straight into the app's WSGI callable
  in a worker process of its own; latency of each call.
- ``concurrent``: 16 client threads (``http.client``, keep-alive) against
  ``gunicorn --preload -k gthread -w 2 --threads 8`` on 127.0.0.1, each
  sending its next request when the last one is answered (saturation).
- ``paced`` (PostgreSQL): the same 16 clients and servers, sending on a fixed
  schedule at a quarter of the rate the baseline reached in ``concurrent``
  (``--paced-share``). Latency
  counts from the scheduled time, so a late answer also delays the next. At
  saturation a closed loop's latency is the number of clients over the
  throughput, so its p99 restates the throughput ratio; at a fixed rate the
  p99 overhead is what auditing adds to a request. The p99 target is checked
  here; the saturated figures are reported beside it.

Reported per backend and driver: requests/s as the median over rounds of the
ratio to the baseline of the same round, p50/p99 latency over all rounds, and
peak RSS (``ru_maxrss`` of the sequential worker; ``VmHWM`` of the largest
gunicorn worker). Results go to ``benchmarks/results/<stamp>/`` as
``results.json``, ``results.md`` and ``ratios.png``.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import venv

from _args import positive

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
NEEDED = (
    "flask",
    "pyinstrument",
    "flask_sqlalchemy",
    "psycopg",
    "gunicorn",
    "matplotlib",
    "postgresql_audit",
    "sqlalchemy_continuum",
)

VARIANTS: dict[str, str] = {
    "a": "baseline",
    "b": "sidelog sync",
    "c": "sidelog group",
    "d": "sidelog buffered",
    "e": "postgresql-audit (trigger peer)",
    "f": "SQLAlchemy-Continuum",
}
FACTORY: dict[str, str] = {
    "a": "create_baseline_app({url!r})",
    "b": "create_sidelog_app({url!r}, 'sync')",
    "c": "create_sidelog_app({url!r}, 'group')",
    "d": "create_sidelog_app({url!r}, 'buffered')",
    "e": "create_trigger_peer_app({url!r})",
    "f": "create_continuum_app({url!r})",
}
NOT_RUN = {
    ("sqlite", "e"): "postgresql-audit audits through PostgreSQL triggers; no SQLite.",
}
NOT_USED = {
    "flask-audit-logger": "a fork of postgresql-audit that needs a User model and"
    " installs its triggers only through Alembic autogenerate; postgresql-audit is"
    " the same mechanism (see PEERS.md).",
}
#: Requests per round and variant (sequential, concurrent); SQLite commits
#: wait for fsync, so it gets fewer to keep the run within minutes.
COUNTS = {"postgresql": (400, 800), "sqlite": (150, 320)}
CLIENTS = 16
WORKERS = 2
THREADS = 8
#: The paced driver's default rate, as a share of the baseline's saturated
#: req/s: a load every variant but the slowest peer serves with room to spare,
#: so that the p99 shows what auditing adds to a request, not a queue.
PACED_SHARE = 0.25

TARGETS = [
    # (text, backend, driver, variant, kind, bound)
    ("sync, sequential >= 0.50x", "postgresql", "sequential", "b", "ratio", 0.50),
    ("group, 16 clients >= 0.90x", "postgresql", "concurrent", "c", "ratio", 0.90),
    ("buffered, sequential >= 0.95x", "postgresql", "sequential", "d", "ratio", 0.95),
    ("buffered, 16 clients >= 0.95x", "postgresql", "concurrent", "d", "ratio", 0.95),
]


# -- environment ------------------------------------------------------------


def _missing() -> list[str]:
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def ensure_environment(argv: list[str]) -> None:
    """Re-run in ``benchmarks/.venv`` if this interpreter lacks a dependency."""
    missing = _missing()
    if not missing:
        return
    python = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        sys.exit(f"benchmarks/.venv lacks {', '.join(missing)}; delete it and rerun.")
    if not os.path.exists(python):
        print(f"Missing {', '.join(missing)}: creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "-r",
             os.path.join(HERE, "requirements.txt")],
            check=True,
        )  # fmt: skip
    os.execv(python, [python, os.path.abspath(__file__), *argv])


# -- the sequential driver: runs inside a worker process --------------------


def _build(variant: str, url: str) -> t.Any:
    sys.path.insert(0, HERE)
    import apps

    return eval(f"apps.{FACTORY[variant].format(url=url)}", {"apps": apps})


def _caller(app: t.Any) -> tuple[t.Callable[[], None], list[str]]:
    """A function that sends ``app`` one request in-process, straight to its
    WSGI callable, and the list it appends each response's status to."""
    environ_base = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/items",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": "0",
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    statuses: list[str] = []

    def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> None:
        statuses.append(status)

    wsgi = app.wsgi_app

    def call() -> None:
        body = wsgi(dict(environ_base, **{"wsgi.input": io.BytesIO()}), start_response)
        b"".join(body)
        getattr(body, "close", lambda: None)()

    return call, statuses


def _flush(app: t.Any) -> None:
    if "sidelog" in app.extensions:
        with app.app_context():
            app.extensions["sidelog"].extension.flush()


def sequential_worker(variant: str, url: str) -> None:
    """Build one variant; for each line ``N`` on stdin, call it N times and
    print a JSON line with the wall time and each call's latency."""
    app = _build(variant, url)
    call, statuses = _caller(app)
    for line in sys.stdin:
        count = int(line)
        latencies = []
        statuses.clear()
        clock = time.perf_counter
        started = clock()
        for _ in range(count):
            t0 = clock()
            call()
            latencies.append(clock() - t0)
        wall = clock() - started
        _flush(app)
        bad = [s for s in statuses if not s.startswith("201")]
        print(
            json.dumps(
                {
                    "wall": wall,
                    "latencies": latencies,
                    "errors": len(bad),
                    "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                }
            ),
            flush=True,
        )


def profile_worker(variant: str, url: str, requests: str) -> None:
    """Build one variant, warm it up, and print pyinstrument's call tree of
    ``requests`` sequential requests (1 ms sampling), buffered entries'
    last flush included."""
    from pyinstrument import Profiler

    app = _build(variant, url)
    call, _ = _caller(app)
    for _ in range(300):
        call()
    _flush(app)
    profiler = Profiler(interval=0.001)
    profiler.start()
    for _ in range(int(requests)):
        call()
    _flush(app)
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False), flush=True)


class SequentialVariant:
    def __init__(self, variant: str, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", variant, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, count: int) -> dict[str, t.Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        result: dict[str, t.Any] = json.loads(line)
        result["rss_kb"] = result.pop("max_rss_kb")
        return result

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the concurrent driver: gunicorn and client threads ---------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(name))
    return found


def _peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class GunicornVariant:
    def __init__(self, variant: str, url: str, logdir: str) -> None:
        self.app = f"apps:{FACTORY[variant].format(url=url)}"
        self.logfile = os.path.join(logdir, f"gunicorn-{variant}.log")
        self.attempts = 0
        self._start()

    def _start(self) -> None:
        # A free port can be taken by someone else before gunicorn binds it;
        # wait_ready() starts again on another port then.
        self.port = _free_port()
        self.attempts += 1
        self.log = open(self.logfile, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn", "--preload",
                "-k", "gthread", "-w", str(WORKERS), "--threads", str(THREADS),
                "-b", f"127.0.0.1:{self.port}", "--keep-alive", "30",
                "--log-level", "warning", "--chdir", HERE, self.app,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                with open(self.logfile) as f:
                    port_taken = "Address already in use" in f.read()
                if port_taken and self.attempts < 5:
                    self._start()
                    continue
                raise RuntimeError(f"gunicorn exited, see {self.logfile}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/ready")
                conn.getresponse().read()
                conn.close()
                if len(_children(self.proc.pid)) >= WORKERS:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer, see {self.logfile}")

    def run(self, count: int, rate: float | None = None) -> dict[str, t.Any]:
        """Send ``count`` requests from :data:`CLIENTS` clients; each sends
        its next when answered, or with ``rate``, on a schedule of ``rate``
        requests/s in all (latency counted from the scheduled time)."""
        per_client = count // CLIENTS
        latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
        errors = [0] * CLIENTS
        start = threading.Barrier(CLIENTS + 1)
        began = [0.0]

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.connect()
            start.wait()
            clock = time.perf_counter
            interval = CLIENTS / rate if rate else 0.0
            for k in range(per_client):
                t0 = clock()
                if rate:
                    t0 = began[0] + (k + i / CLIENTS) * interval
                    if t0 > clock():
                        time.sleep(t0 - clock())
                try:
                    conn.request("POST", "/items", body=b"")
                    response = conn.getresponse()
                    response.read()
                    if response.status != 201:
                        errors[i] += 1
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=30
                    )
                latencies[i].append(clock() - t0)
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        began[0] = time.perf_counter() + 0.01
        start.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        workers = _children(self.proc.pid)
        return {
            "wall": wall,
            "latencies": [x for xs in latencies for x in xs],
            "errors": sum(errors),
            "rss_kb": max((_peak_rss_kb(p) for p in workers), default=0),
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# -- orchestration ------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    driver: str,
    urls: dict[str, str],
    rounds: int,
    count: int,
    logdir: str,
    server: t.Any = None,
    rate: float | None = None,
) -> dict[str, dict[str, t.Any]]:
    """Start every variant, run one warm-up and ``rounds`` interleaved rounds.

    With ``server`` (PostgreSQL), also count the commits of each variant's
    database per request served: how many transactions a request costs.
    With ``rate`` (the ``paced`` driver), clients send on that schedule.
    """
    runners: dict[str, SequentialVariant | GunicornVariant] = {}
    served = dict.fromkeys(urls, 0)
    try:
        for variant, url in urls.items():
            if driver == "sequential":
                runners[variant] = SequentialVariant(variant, url)
            else:
                runners[variant] = GunicornVariant(variant, url, logdir)
        for runner in runners.values():
            if isinstance(runner, GunicornVariant):
                runner.wait_ready()
        for variant, runner in runners.items():
            warm_up = runner.run(max(CLIENTS, count // 5))  # not measured
            served[variant] += len(warm_up["latencies"])
        raw: dict[str, list[dict[str, t.Any]]] = {v: [] for v in runners}
        for n in range(rounds):
            for variant, runner in runners.items():
                if isinstance(runner, GunicornVariant):
                    raw[variant].append(runner.run(count, rate))
                else:
                    raw[variant].append(runner.run(count))
                served[variant] += len(raw[variant][-1]["latencies"])
            print(f"  {driver} round {n + 1}/{rounds} done", flush=True)
    finally:
        for runner in runners.values():
            runner.stop()
    commits = _commits(server, urls) if server is not None else {}
    summary: dict[str, dict[str, t.Any]] = {}
    base = raw["a"]
    for variant, results in raw.items():
        rates = [len(r["latencies"]) / r["wall"] for r in results]
        ratios = [
            rate / (len(b["latencies"]) / b["wall"])
            for rate, b in zip(rates, base, strict=True)
        ]
        latencies = [x for r in results for x in r["latencies"]]
        summary[variant] = {
            "name": VARIANTS[variant],
            "req_per_s": rates,
            "ratios": ratios,
            "ratio": statistics.median(ratios),
            "req_per_s_median": statistics.median(rates),
            "p50_ms": _percentile(latencies, 0.50) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
            "peak_rss_mb": max(r["rss_kb"] for r in results) / 1024,
            "errors": sum(r["errors"] for r in results),
            "commits_per_request": (
                commits[variant] / served[variant] if variant in commits else None
            ),
            "requests": len(latencies),
        }
    for variant in summary:
        summary[variant]["p99_overhead_ms"] = (
            summary[variant]["p99_ms"] - summary["a"]["p99_ms"]
        )
        summary[variant]["extra_rss_mb"] = (
            summary[variant]["peak_rss_mb"] - summary["a"]["peak_rss_mb"]
        )
    return summary


def _commits(server: t.Any, urls: dict[str, str]) -> dict[str, int]:
    """Transactions committed in each variant's database so far. Every
    server process of the variants has exited, so its statistics are in."""
    time.sleep(1)
    found = {}
    for variant, url in urls.items():
        rows = server.psql(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
            [url.rsplit("/", 1)[1]],
        )
        found[variant] = int(rows[0][0])
    return found


def _postgres() -> t.Any:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _postgres import ThrowawayPostgres

    reason = ThrowawayPostgres.available()
    return reason if reason is not None else ThrowawayPostgres()


def profile(variants: list[str], requests: int, outdir: str) -> None:
    """Profile each variant's sequential requests on a throwaway PostgreSQL,
    one process each, into ``outdir/profile-<variant>.txt``."""
    server = _postgres()
    if isinstance(server, str):
        sys.exit(f"Cannot profile: {server}")
    os.makedirs(outdir, exist_ok=True)
    with server:
        for variant in variants:
            url = server.create_database(f"profile_{variant}")
            tree = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--profile-worker",
                 variant, url, str(requests)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            path = os.path.join(outdir, f"profile-{variant}.txt")
            with open(path, "w") as f:
                f.write(f"{VARIANTS[variant]}, {requests} sequential requests\n")
                f.write(tree)
            print(f"{VARIANTS[variant]}: {path}", flush=True)


def run(args: argparse.Namespace) -> dict[str, t.Any]:
    rounds = 1 if args.smoke else args.rounds
    scale = 0.05 if args.smoke else args.scale
    workdir = tempfile.mkdtemp(prefix="sidelog-bench-")
    results: dict[str, t.Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "smoke": args.smoke,
        "settings": {
            "rounds": rounds,
            "requests_per_round": {
                backend: {
                    "sequential": _count(backend, 0, scale),
                    "concurrent": _count(backend, 1, scale),
                }
                for backend in args.backends
            },
            "clients": CLIENTS,
            "gunicorn": f"--preload -k gthread -w {WORKERS} --threads {THREADS}",
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "versions": _versions(),
        },
        "not_run": [],
        "backends": {},
    }
    server = _postgres() if "postgresql" in args.backends else None
    if isinstance(server, str):
        results["not_run"].append({"backend": "postgresql", "why": server})
        server = None
    try:
        if server is not None:
            server.__enter__()
            results["machine"]["postgresql"] = server.psql("SHOW server_version")[0][0]
        for backend in args.backends:
            if backend == "postgresql" and server is None:
                continue
            results["backends"][backend] = {}
            drivers = ["sequential", "concurrent"]
            if backend == "postgresql":
                drivers.append("paced")
            for driver in drivers:
                count = _count(backend, min(drivers.index(driver), 1), scale)
                rate = None
                if driver == "paced":
                    done = results["backends"][backend]["concurrent"]["a"]
                    rate = args.paced_share * done["req_per_s_median"]
                    results["settings"]["paced_rate"] = rate
                    results["settings"]["paced_share"] = args.paced_share
                urls = {}
                for variant in VARIANTS:
                    if (backend, variant) in NOT_RUN:
                        continue
                    name = f"{driver[:3]}_{variant}"
                    if backend == "postgresql":
                        urls[variant] = server.create_database(name)
                    else:
                        urls[variant] = f"sqlite:///{workdir}/{name}.db"
                print(f"{backend}, {driver}: {len(urls)} variants", flush=True)
                results["backends"][backend][driver] = measure(
                    driver,
                    urls,
                    rounds,
                    count,
                    workdir,
                    server if backend == "postgresql" else None,
                    rate,
                )
            for (b, variant), why in NOT_RUN.items():
                if b == backend:
                    results["not_run"].append(
                        {"backend": b, "variant": variant, "why": why}
                    )
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    for peer, why in NOT_USED.items():
        results["not_run"].append({"peer": peer, "why": why})
    results["targets"] = _check_targets(results)
    return results


def _count(backend: str, driver: int, scale: float) -> int:
    return max(CLIENTS * 2, round(COUNTS[backend][driver] * scale))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = (
        "flask", "flask-sqlalchemy", "sqlalchemy", "psycopg", "gunicorn",
        "postgresql-audit", "sqlalchemy-continuum",
    )  # fmt: skip
    found = {name: version(name) for name in names}
    commit = subprocess.run(
        ["git", "-C", ROOT, "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    )
    found["flask-sidelog"] = commit.stdout.strip() or "checkout"
    return found


def _check_targets(results: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    pg = results["backends"].get("postgresql")
    if pg is None:
        return []
    checks = []
    for text, backend, driver, variant, _, bound in TARGETS:
        value = results["backends"][backend][driver][variant]["ratio"]
        checks.append({"target": text, "value": value, "met": value >= bound})
    paced = pg.get("paced")
    for variant in "bcd":
        if paced is not None:
            over = paced[variant]["p99_overhead_ms"]
            checks.append(
                {
                    "target": f"{VARIANTS[variant]}: p99 overhead < 2 ms at 16"
                    " clients, paced",
                    "value": over,
                    "met": over < 2,
                }
            )
        over = pg["concurrent"][variant]["p99_overhead_ms"]
        checks.append(
            {
                "target": f"{VARIANTS[variant]}: p99 overhead < 2 ms at 16"
                " clients, at saturation",
                "value": over,
                "met": over < 2,
            }
        )
    for variant in "bcd":
        extra = max(pg[d][variant]["extra_rss_mb"] for d in pg)
        checks.append(
            {
                "target": f"{VARIANTS[variant]}: extra peak RSS < 20 MB",
                "value": extra,
                "met": extra < 20,
            }
        )
    return checks


# -- reports --------------------------------------------------------------------


def write_reports(results: dict[str, t.Any], outdir: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(markdown(results))
    chart(results, os.path.join(outdir, "ratios.png"))


def markdown(results: dict[str, t.Any]) -> str:
    s = results["settings"]
    lines = [
        f"# flask-sidelog benchmark, {results['started'][:19]} UTC"
        + (" (smoke run)" if results["smoke"] else ""),
        "",
        f"{s['rounds']} interleaved rounds; per round and variant, sequential"
        " requests (in-process WSGI) and requests from"
        f" {s['clients']} clients against gunicorn {s['gunicorn']}: "
        + ", ".join(
            f"{b} {c['sequential']} and {c['concurrent']}"
            for b, c in s["requests_per_round"].items()
        )
        + "."
        " Ratio: median over rounds of req/s against the baseline of the same"
        " round. Latency over all rounds. Peak RSS: the sequential worker, or"
        " the largest gunicorn worker. Commits/request (PostgreSQL):"
        " transactions committed in the variant's database per request served,"
        " warm-up included."
        + (
            f" Paced (PostgreSQL): the concurrent clients and servers, sending"
            f" {s['paced_rate']:.0f} requests/s in all ({s['paced_share']:.2f} of"
            " the baseline's saturated rate); latency from each request's"
            " scheduled time, and"
            " its ratio is near 1.00x by construction."
            if "paced_rate" in s
            else ""
        ),
        "",
        "Machine: " + ", ".join(
            f"{k} {v}" for k, v in results["machine"].items() if k != "versions"
        ),
        "",
        "Versions: " + ", ".join(
            f"{k} {v}" for k, v in results["machine"]["versions"].items()
        ),
        "",
    ]  # fmt: skip
    for backend, drivers in results["backends"].items():
        for driver, summary in drivers.items():
            lines += [
                f"## {backend}, {driver}",
                "",
                "| variant | ratio | req/s (median) | ratios per round | p50 ms"
                " | p99 ms | p99 overhead ms | peak RSS MB | extra RSS MB | errors"
                " | commits/request |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for v, r in summary.items():
                per_round = " ".join(f"{x:.2f}" for x in r["ratios"])
                lines.append(
                    f"| {v} {r['name']} | {r['ratio']:.2f}x"
                    f" | {r['req_per_s_median']:.0f} | {per_round}"
                    f" | {r['p50_ms']:.2f} | {r['p99_ms']:.2f}"
                    f" | {r['p99_overhead_ms']:+.2f} | {r['peak_rss_mb']:.1f}"
                    f" | {r['extra_rss_mb']:+.1f} | {r['errors']}"
                    f" | {_optional(r['commits_per_request'])} |"
                )
            lines.append("")
    if results["targets"]:
        lines += ["## Targets (PostgreSQL)", "", "| target | measured | met |"]
        lines.append("|---|---|---|")
        for c in results["targets"]:
            lines.append(
                f"| {c['target']} | {c['value']:.3f} | {'yes' if c['met'] else 'NO'} |"
            )
        lines.append("")
    lines += ["## Not run", ""]
    for item in results["not_run"]:
        what = item.get("peer") or " ".join(
            x for x in (item.get("backend"), VARIANTS.get(item.get("variant", ""))) if x
        )
        lines.append(f"- {what}: {item['why']}")
    return "\n".join(lines) + "\n"


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def chart(results: dict[str, t.Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        (f"{backend}\n{driver}", summary)
        for backend, drivers in results["backends"].items()
        for driver, summary in drivers.items()
        if driver != "paced"  # a fixed rate: its ratio says nothing
    ]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(VARIANTS)
    for i, (variant, name) in enumerate(VARIANTS.items()):
        xs = [g for g, (_, s) in enumerate(groups) if variant in s]
        ys = [groups[g][1][variant]["ratio"] for g in xs]
        bars = ax.bar([x + i * width for x in xs], ys, width, label=f"{variant} {name}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([g + width * (len(VARIANTS) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([label for label, _ in groups])
    ax.set_ylabel("requests/s, ratio to the baseline")
    ax.set_title("Cost of auditing a view that inserts one row (higher is better)")
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument(
        "--rounds", type=positive(int), default=5, help="interleaved rounds"
    )
    parser.add_argument(
        "--scale",
        type=positive(float),
        default=1.0,
        help="multiply the requests per round",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["postgresql", "sqlite"],
        choices=["postgresql", "sqlite"],
        help="databases to run on",
    )
    parser.add_argument(
        "--paced-share",
        type=float,
        default=PACED_SHARE,
        help="the paced driver's rate, as a share of the baseline's saturated rate",
    )
    parser.add_argument("--out", help="results folder (default: results/<stamp>)")
    parser.add_argument(
        "--profile",
        nargs="+",
        choices=sorted(VARIANTS),
        metavar="VARIANT",
        help="instead of timing, profile these variants' sequential requests on"
        " PostgreSQL with pyinstrument (a b c d e f)",
    )
    parser.add_argument(
        "--requests",
        type=positive(int),
        default=3000,
        help="requests to profile per variant (with --profile)",
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.paced_share <= 1:
        parser.error(
            f"--paced-share takes a share of the baseline's rate above 0 and up"
            f" to 1, such as 0.25; got {args.paced_share}"
        )
    if args.worker or args.profile_worker:
        sys.path.insert(0, ROOT)
        if args.worker:
            sequential_worker(*args.worker)
        else:
            profile_worker(*args.profile_worker)
        return
    ensure_environment(argv)
    # Stopped with SIGTERM, still stop the servers and PostgreSQL.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    # Measure this checkout, in this process and in every server and worker.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
    )
    if args.profile:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        profile(
            args.profile,
            args.requests,
            args.out or os.path.join(HERE, "results", stamp),
        )
        return
    results = run(args)
    stamp = results["started"][:19].replace(":", "").replace("-", "")
    outdir = args.out or os.path.join(
        HERE, "results", "tmp" if args.smoke else "", stamp
    )
    write_reports(results, outdir)
    print(markdown(results))
    print(f"Written to {outdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
