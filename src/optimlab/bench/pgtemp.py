"""A throwaway local PostgreSQL server, for the tests and the scale-out benchmark (and for trying the lab).

:class:`TemporaryPostgres` runs the installed server binaries (Debian's ``postgresql`` package:
``/usr/lib/postgresql/*/bin``, or ``initdb`` on ``PATH``) on a free local port, with its data directory in
a fresh temporary folder, and removes everything on :meth:`~TemporaryPostgres.stop`. As root, the server
runs as the unprivileged ``postgres`` user (``initdb`` refuses root). TCP connections need the password
(scram-sha-256); the Unix socket in the data folder trusts local users. A watchdog stops the server if
the process that started it dies without calling :meth:`~TemporaryPostgres.stop`.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["TemporaryPostgres", "find_server_binaries"]


def find_server_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest installed version), or ``None``."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if Path(folder, "pg_ctl").exists() and Path(folder, "initdb").exists():
            return Path(folder)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryPostgres:
    """Start with :meth:`start` (or ``with``); :meth:`url` names a database; :meth:`create_database` makes one.

    Args:
        durable: keep PostgreSQL's default durability (fsync on every commit). ``False`` (faster, for tests)
            turns ``fsync`` and ``synchronous_commit`` off.
    """

    user = "optimlab"

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable
        self.binaries = find_server_binaries()
        self.password = secrets.token_hex(8)
        self.port = 0
        self.folder: Path | None = None
        self._watchdog: subprocess.Popen | None = None

    def _as_server_user(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        return ["runuser", "-u", "postgres", "--", *command]

    def _run(self, *command: str) -> None:
        result = subprocess.run(self._as_server_user(list(command)), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()}")

    def start(self) -> TemporaryPostgres:
        """initdb + pg_ctl start; raises ``RuntimeError`` with the reason when the server cannot start."""
        if self.binaries is None:
            raise RuntimeError("no PostgreSQL server binaries (install Debian's postgresql package)")
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root but there is no 'postgres' user to run the server") from None
        self.folder = Path(tempfile.mkdtemp(prefix="optimlab-pg-"))
        data, password_file = self.folder / "data", self.folder / "password"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            os.chown(password_file, account.pw_uid, account.pw_gid)
        password_file.chmod(0o600)
        self._run(str(self.binaries / "initdb"), "-D", str(data), "-U", self.user, "-E", "UTF8", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}")
        self.port = _free_port()
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=100"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.binaries / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"), "-w",
                  "-t", "60", "-o", options, "start")
        self._watchdog = self._start_watchdog()
        return self

    def _start_watchdog(self) -> subprocess.Popen:
        """A detached shell that stops the server and deletes its folder once this process is gone, so a
        test run that is killed (no fixture teardown) leaves no server behind."""
        assert self.folder is not None and self.binaries is not None
        stop = shlex.join(self._as_server_user([str(self.binaries / "pg_ctl"), "-D", str(self.folder / "data"),
                                                "-m", "immediate", "-w", "stop"]))
        script = (f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
                  f"{stop} >/dev/null 2>&1; rm -rf {shlex.quote(str(self.folder))}")
        return subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """Stop the server and delete its files."""
        if self.folder is None:
            return
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if (self.folder / "data" / "postmaster.pid").exists():
            self._run(str(self.binaries / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        """``postgresql+psycopg://optimlab:PASSWORD@127.0.0.1:PORT/DATABASE`` (``password`` overrides)."""
        return (f"postgresql+psycopg://{self.user}:{self.password if password is None else password}"
                f"@127.0.0.1:{self.port}/{database}")

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
