"""A throwaway PostgreSQL server for the tests and benchmarks.

Each :class:`ThrowawayPostgres` runs its own ``initdb`` into a fresh directory
under ``/tmp`` and its own server on a free port of ``127.0.0.1``, with trust
authentication for the ``postgres`` superuser. When running as root, the
server runs as the ``postgres`` system user, since PostgreSQL refuses root.

.. code-block:: python

    with ThrowawayPostgres() as pg:
        engine = sa.create_engine(pg.url)
        pg.stop()   # simulate an outage
        pg.start()  # same port, same data
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import typing as t

if t.TYPE_CHECKING:
    from types import TracebackType

_RUN_AS = "postgres"
_SUPERUSER = "postgres"
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    # Durability against power loss is no concern for a throwaway server.
    # synchronous_commit stays on: benchmarks need commits that really wait
    # for the WAL write.
    "fsync": "off",
    "full_page_writes": "off",
    "logging_collector": "off",
}


def _find_bindir() -> str | None:
    """The directory holding both ``initdb`` and ``pg_ctl``: the one on
    ``PATH`` first, else the newest ``/usr/lib/postgresql/*/bin``.
    """
    candidates = []
    found = shutil.which("initdb")
    if found is not None:
        candidates.append(os.path.dirname(os.path.realpath(found)))
        candidates.append(os.path.dirname(found))
    candidates.extend(
        sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: [int(x) for x in p.split("/")[-2].split(".") if x.isdigit()],
            reverse=True,
        )
    )
    for bindir in candidates:
        if all(
            os.access(os.path.join(bindir, n), os.X_OK) for n in ("initdb", "pg_ctl")
        ):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """A PostgreSQL server in a temporary directory, removed on exit.

    :param timeout: Seconds to wait for ``initdb``, start and stop.
    """

    def __init__(self, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.port: int | None = None
        self.base: str | None = None
        self.running = False
        self._bindir: str | None = None

    @staticmethod
    def available() -> str | None:
        """``None`` if a throwaway server can be run here, else the reason why not."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "psycopg is not installed: pip install 'psycopg[binary]'"
        if _find_bindir() is None:
            return (
                "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in"
                " /usr/lib/postgresql/*/bin: install the postgresql package"
            )
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_RUN_AS)
            except KeyError:
                return (
                    f"running as root and there is no {_RUN_AS!r} user to run"
                    " PostgreSQL as: create one or run the tests as another user"
                )
            if shutil.which("runuser") is None and shutil.which("su") is None:
                return "running as root and neither runuser nor su is available"
        return None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``postgres`` database."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        """The SQLAlchemy URL of database ``dbname`` on this server."""
        self._require_port()
        return f"postgresql+psycopg://{_SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``psycopg.connect``."""
        self._require_port()
        return f"host=127.0.0.1 port={self.port} user={_SUPERUSER} dbname={dbname}"

    @property
    def datadir(self) -> str:
        assert self.base is not None, "call setup() or use the context manager"
        return os.path.join(self.base, "data")

    @property
    def logfile(self) -> str:
        assert self.base is not None, "call setup() or use the context manager"
        return os.path.join(self.base, "server.log")

    def __enter__(self) -> ThrowawayPostgres:
        self.setup()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def setup(self) -> None:
        """Create the cluster and start the server."""
        reason = self.available()
        if reason is not None:
            raise RuntimeError(f"cannot run a throwaway PostgreSQL: {reason}")
        self._bindir = _find_bindir()
        self.base = tempfile.mkdtemp(
            prefix="sidelog-pg-", dir="/tmp" if os.path.isdir("/tmp") else None
        )
        try:
            if os.geteuid() == 0:
                user = pwd.getpwnam(_RUN_AS)
                os.chown(self.base, user.pw_uid, user.pw_gid)
            self._run(
                "initdb",
                "-D",
                self.datadir,
                "-A",
                "trust",
                "-U",
                _SUPERUSER,
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            )
            settings = dict(_SETTINGS, unix_socket_directories=f"'{self.base}'")
            with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
                f.write("\n# flask-sidelog throwaway server\n")
                f.writelines(f"{k} = {v}\n" for k, v in settings.items())
            # The free port can be taken between probing and binding; retry then.
            for attempt in range(3):
                self.port = _free_port()
                try:
                    self.start()
                    break
                except RuntimeError:
                    if attempt == 2 or "already in use" not in self._log_tail():
                        raise
        except BaseException:
            self.cleanup()
            raise

    def start(self) -> None:
        """Start the server, on the same port and data as before."""
        self._require_port()
        if self.running:
            return
        result = self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            str(int(self.timeout)),
            "-D",
            self.datadir,
            "-l",
            self.logfile,
            "-o",
            f"-p {self.port}",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port}"
                f" (pg_ctl exit {result.returncode}):\n{result.stdout}"
                f"\n--- last lines of {self.logfile} ---\n{self._log_tail()}"
            )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; :meth:`start` brings it back with its data."""
        if not self.running:
            return
        timeout = str(int(self.timeout))
        self._run("pg_ctl", "stop", "-w", "-t", timeout, "-m", mode, "-D", self.datadir)
        self.running = False

    def cleanup(self) -> None:
        """Stop the server if it runs and remove its directory."""
        if self.running:
            try:
                self.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def psql(
        self,
        sql: str,
        params: t.Sequence[t.Any] | None = None,
        dbname: str = "postgres",
    ) -> list[tuple[t.Any, ...]]:
        """Run one statement in autocommit mode; return its rows, if any."""
        import psycopg

        with psycopg.connect(self.conninfo(dbname), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def _require_port(self) -> None:
        if self.port is None:
            raise RuntimeError(
                "the server was never set up: use 'with ThrowawayPostgres()'"
            )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no server log: {e})"

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self._bindir is not None and self.base is not None
        argv = [os.path.join(self._bindir, program), *args]
        if os.geteuid() == 0:
            if shutil.which("runuser") is not None:
                argv = ["runuser", "-u", _RUN_AS, "--", *argv]
            else:
                argv = ["su", "-s", "/bin/sh", _RUN_AS, "-c", shlex.join(argv)]
        result = subprocess.run(
            argv,
            cwd=self.base,  # root's cwd may be unreadable for the postgres user
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.timeout + 30,
            # Keep the server out of the terminal's process group, so Ctrl-C
            # reaches the tests and the cleanup, not the server first.
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{program} failed (exit {result.returncode}): {shlex.join(argv)}\n"
                f"{result.stdout}"
            )
        return result
