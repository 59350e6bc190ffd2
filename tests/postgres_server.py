"""A throwaway PostgreSQL cluster from the local binaries, for tests and benchmarks.

``initdb`` and ``pg_ctl`` must be on PATH (or in ``/usr/lib/postgresql/*/bin``). PostgreSQL
refuses to run as root, so as root the cluster runs as the ``postgres`` system user through
``runuser``, on a directory that user owns. It listens on a free loopback port with trust
authentication and is stopped (``pg_ctl stop -m immediate``) and deleted on exit.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REQUIRE_ENV = "HOLYSHEEP_REQUIRE_POSTGRES"
"""Set to ``1`` (``.ci/run`` does) to turn "PostgreSQL unavailable" skips into failures."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster.

    Attributes:
        host: Loopback address it listens on.
        port: Its TCP port.
        user: Superuser name (trust authentication, no password).
        dbname: The database to use.
        directory: The cluster's temporary directory (data, socket, log).
    """

    host: str
    port: int
    user: str
    dbname: str
    directory: Path

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL for psycopg, langchain-postgres and the stores."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def sqlalchemy_url(self) -> str:
        """The same database as a SQLAlchemy URL using the psycopg 3 driver."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.dbname}"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def unavailable_reason() -> str | None:
    """Return why a throwaway cluster cannot be started here, or ``None`` if it can."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if _binary(name) is None:
            return f"PostgreSQL binary {name!r} not found on PATH or in /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root and 'runuser' is missing (PostgreSQL refuses to run as root)"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' system user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_owner(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@contextmanager
def throwaway_postgres(
    *, fsync: bool = False, max_connections: int = 400, attempts: int = 3
) -> Iterator[PostgresServer]:
    """Start a cluster, yield it, then stop it and remove its directory.

    Args:
        fsync: Keep PostgreSQL's fsync on (benchmarks) or off (tests: faster, same semantics
            as long as the machine does not crash).
        max_connections: Server ``max_connections``.
        attempts: Tries with a new port if the chosen one is taken in the meantime.

    Raises:
        RuntimeError: The binaries are missing or the server does not start; the message
            includes the server log.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    assert initdb is not None
    assert pg_ctl is not None
    directory = Path(tempfile.mkdtemp(prefix="holysheep-pg-"))
    data, log = directory / "data", directory / "server.log"
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    started = False
    try:
        subprocess.run(
            _as_owner([initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--no-sync", "--locale=C"]),
            check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        for _ in range(attempts):
            port = _free_port()
            options = (
                f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 "
                f"-c max_connections={max_connections} -c fsync={'on' if fsync else 'off'} "
                f"-c synchronous_commit={'on' if fsync else 'off'} "
                f"-c full_page_writes={'on' if fsync else 'off'}"
            )
            result = subprocess.run(
                _as_owner([pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60",
                           "-o", options, "start"]),
                capture_output=True, text=True, timeout=90,
            )  # fmt: skip
            if result.returncode == 0:
                started = True
                break
        if not started:
            log_text = log.read_text(errors="replace") if log.exists() else "(no log)"
            raise RuntimeError(f"PostgreSQL did not start after {attempts} attempts:\n{log_text}")
        yield PostgresServer("127.0.0.1", port, "postgres", "postgres", directory)
    finally:
        if started:
            subprocess.run(
                _as_owner([pg_ctl, "-D", str(data), "stop", "-m", "immediate"]),
                capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)
