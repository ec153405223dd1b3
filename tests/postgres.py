"""A throw-away PostgreSQL server for the tests: Debian's binaries, a temporary data directory,
a Unix socket only (``listen_addresses=''``), trust authentication, stopped and deleted at the end.

``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``), on a folder that user owns. ``start_server`` returns the server, or the reason none
could be started (the tests that need one skip with it).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/usr/pgsql-*/bin")
_SERVER_USER = "postgres"


def _bin_dir() -> Path | None:
    """The newest folder holding ``initdb`` and ``pg_ctl`` (Debian keeps them off the PATH)."""
    found = [Path(p) for pattern in _SEARCH for p in glob.glob(pattern) if (Path(p) / "pg_ctl").exists()]
    if found:
        return max(found, key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")])
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


@dataclass
class PostgresServer:
    """A running server: ``root`` holds its data directory, socket and log."""

    root: Path
    bin_dir: Path
    as_user: str | None  # run the server's tools as this user (None: as ourselves)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_user:
            command = ["runuser", "-u", self.as_user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check, cwd=self.root)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server (psycopg 3, over the Unix socket)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}"

    def _sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.root), user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self) -> str:
        """A new, empty database: its URL."""
        name = f"lib_{uuid.uuid4().hex[:12]}"
        self._sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by ``create_database`` (its connections are closed first)."""
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        self._sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer | str:
    """Start a server (a few seconds); returns it, or why it could not be started."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        return "no PostgreSQL server binaries (Debian: apt-get install postgresql)"
    if importlib.util.find_spec("psycopg") is None:  # the driver the engine's URLs name
        return "psycopg is not installed (pip install 'engine[postgres]')"
    as_user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            return f"running as root and there is no {_SERVER_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
        as_user = _SERVER_USER
    root = Path(tempfile.mkdtemp(prefix="engine-pg-"))  # short: a socket path is limited to ~100 bytes
    if as_user:
        entry = pwd.getpwnam(as_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(root, bin_dir, as_user)
    try:
        server._run("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        # only durability against a crash of the machine is given up (the tests kill clients, never the server)
        options = f"-k {root} -c listen_addresses='' -c fsync=off -c full_page_writes=off -c max_connections=200"
        server._run("pg_ctl", "-D", str(server.data), "-l", str(root / "log"), "-o", options, "-w", "-t", "60", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        server.stop()
        return f"PostgreSQL could not be started: {detail.strip().splitlines()[-1] if detail.strip() else exc}"
    return server
