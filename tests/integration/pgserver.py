"""A real PostgreSQL (Debian's postgresql package) started by the tests on a free loopback
port in a temporary directory, and a read-only view of the node's tables in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.support import free_port, wait_port

BIN = Path("/usr/lib/postgresql/15/bin")


def _bindir() -> Path | None:
    if (BIN / "initdb").exists():
        return BIN
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PostgresServer:
    """initdb + postgres, owned by an unprivileged user when the tests run as root
    (postgres refuses to run as root)."""

    def __init__(self, directory: Path, bindir: Path) -> None:
        self.directory = directory
        self.bindir = bindir
        self.port = free_port()
        self.user = "pacsnode"
        self.password = "s3cret-" + os.urandom(4).hex()
        self._as: list[str] = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        """With the password (tests); the node gets it from a file instead."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/pacsnode"

    def password_file(self, directory: Path) -> Path:
        path = directory / "db-password"
        path.write_text(self.password + "\n")
        return path

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o777)
        data = self.directory / "data"
        pwfile = self.directory / "pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o644)
        # TCP connections need the password (scram), so a node that did not read its
        # password file could not connect
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", self.user,
                  f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                  "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        self.resume()
        self._run(str(self.bindir / "createdb"), "-h", str(self.directory), "-p",
                  str(self.port), "-U", self.user, "pacsnode")
        return self

    def resume(self) -> None:
        """Start the server (again) on its port and data directory."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-l",
                  str(self.directory / "postgres.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
                  f"-c fsync=off -c max_connections=200", "start")
        wait_port(self.port, timeout=30)

    def pause(self) -> None:
        """Stop the server as an outage would (connections cut), keeping its data."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-m",
                  "fast", "-w", "stop")

    def stop(self) -> None:
        subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D",
                        str(self.directory / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)

    def engine(self) -> Engine:
        return create_engine(self.url)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian package postgresql; "
                    "scripts/test installs it)")
    # not tmp_path: the unprivileged server user must be able to reach the directory
    directory = Path(tempfile.mkdtemp(prefix="pacsnode-pg-"))
    directory.chmod(0o755)
    server = PostgresServer(directory / "pg", bindir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def fresh_database(server: PostgresServer, name: str) -> str:
    """A new empty database on the server; returns its URL."""
    admin = create_engine(server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server.url.rsplit("/", 1)[0] + "/" + name


def without_password(url: str) -> str:
    return url.replace(":" + url.split("@")[0].split(":")[-1] + "@", "@")


class PgView:
    """What a test reads from the node's PostgreSQL tables."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def _query(self, sql: str, **args: Any) -> list[Any]:
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(text(sql), args))
        except Exception:  # noqa: BLE001  tables not created yet
            return []

    def sop_uids(self) -> set[str]:
        return {r[0] for r in self._query("select sop_instance_uid from instances")}

    def paths(self) -> list[str]:
        return [r[0] for r in self._query("select path from instances")]

    def jobs(self) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in self._query("select * from jobs order by id")]

    def close(self) -> None:
        self.engine.dispose()
