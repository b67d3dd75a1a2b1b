"""A throwaway PostgreSQL server for the test session, from Debian's ``postgresql`` package.

:func:`start` runs ``initdb`` into a new temporary folder and starts ``postgres`` on it, listening
on 127.0.0.1 only (a free port; its unix socket in that folder, nowhere else), with durability
off (``fsync``, ``synchronous_commit``, ``full_page_writes``: nothing here must survive a power
loss) and trust authentication for the one superuser. As root, both run as the ``postgres``
user (which the package creates; ``nobody`` otherwise), since PostgreSQL refuses to run as root,
and the folder is theirs. :meth:`PostgresServer.stop` ends the server by its PID (a fast
shutdown, then SIGKILL if it lingers) and removes the folder.

Tests reach it through the fixtures in ``tests/conftest.py``: one server per session, one new
database per test module (``CREATE DATABASE``), emptied before each test that asks for a store.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPERUSER = "gradwire"
DRIVER = "postgresql+psycopg"


def binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding ``initdb`` and ``postgres``, if any."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        folder = Path(initdb).parent
        version = folder.parent.name
        if (folder / "postgres").exists() and version.isdigit():
            found.append((int(version), folder))
    return max(found)[1] if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _account() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: ``None`` when we are not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@dataclass
class PostgresServer:
    folder: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    databases: list[str] = field(default_factory=list)

    def url(self, database: str = "postgres") -> str:
        return f"{DRIVER}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database,
            autocommit=True, connect_timeout=5,
        )

    def create_database(self, name: str) -> str:
        """A new, empty database (any older one of that name dropped first); its SQLAlchemy URL."""
        with self.connect() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self.connect() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def empty(self, name: str) -> None:
        """Drop every table of database ``name`` (its ``public`` schema made anew)."""
        with self.connect(name) as connection:
            connection.execute("DROP SCHEMA public CASCADE")
            connection.execute("CREATE SCHEMA public")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def start(bin_dir: Path, *, timeout: float = 60.0) -> PostgresServer:
    """initdb + postgres in a new temporary folder; returns once it accepts connections."""
    account = _account()
    folder = Path(tempfile.mkdtemp(prefix="gradwire-pg-"))  # short: the socket path has a length limit
    try:
        if account is not None:
            os.chown(folder, *account)
        as_user: dict[str, Any] = {}
        if account is not None:
            as_user = {"user": account[0], "group": account[1], "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "HOME": str(folder)}
        data = folder / "data"
        done = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--no-locale",
             "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, env=env, cwd=folder, timeout=120, **as_user,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        log = folder / "postgres.log"
        for _attempt in range(3):  # the free port may be taken between the probe and the bind
            port = _free_port()
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                     "-k", str(folder), "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=200",
                     "-c", "shared_buffers=32MB", "-c", "log_min_messages=warning"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder, **as_user,
                )  # fmt: skip
            server = PostgresServer(folder, port, process, log)
            if _wait_ready(server, timeout):
                return server
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text(errors='replace')[-3000:]}")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _wait_ready(server: PostgresServer, timeout: float) -> bool:
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with server.connect():
                return True
        except psycopg.OperationalError:
            time.sleep(0.1)
    return False
