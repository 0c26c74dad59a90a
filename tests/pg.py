"""A private PostgreSQL cluster for the tests: initdb/pg_ctl in a temporary directory,
listening only on a Unix socket in that directory (listen_addresses = ''), fsync on.
Never the system's service.

One cluster per test session (`pg_cluster`, session-scoped); each test gets a schema of
its own in the one database (`pg_dsn`: the DSN names it with `search_path`), which costs
a CREATE SCHEMA instead of a CREATE DATABASE. PostgreSQL refuses to run as root: when the
tests run as root (CI does) the cluster's files belong to `nobody` and its commands run
through `runuser -u nobody --`.

Without PostgreSQL's binaries the tests that need it skip, unless WEBHOOKD_REQUIRE_POSTGRES=1
(CI sets it), which makes them fail instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "webhookd"
DATABASE = "webhookd"
SECRET_USER = "webhookd_pw"  # the role that must log in with a password (scram-sha-256)
SECRET_PASSWORD = "pw-0f9c-Sekrit!"


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").exists():
        return Path(found).resolve().parent  # Debian links only some of them into PATH
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def require_postgres() -> Path:
    bindir = _bindir()
    if bindir is None:
        if os.environ.get("WEBHOOKD_REQUIRE_POSTGRES") == "1":
            pytest.fail("WEBHOOKD_REQUIRE_POSTGRES=1 but PostgreSQL's initdb/pg_ctl are not installed")
        pytest.skip("PostgreSQL is not installed (initdb, pg_ctl); set WEBHOOKD_REQUIRE_POSTGRES=1 to fail instead")
    return bindir


@dataclass
class Cluster:
    bindir: Path
    root: Path  # the socket directory too

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, database: str = DATABASE, *, user: str = SUPERUSER, schema: str | None = None) -> str:
        dsn = f"postgresql://{user}@/{database}?host={self.root}"
        return dsn + (f"&search_path={schema}" if schema else "")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"{args[0]} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-instructions")
        (self.data / "pg_hba.conf").write_text(
            f"local all {SUPERUSER} trust\nlocal all all scram-sha-256\n", encoding="utf-8"
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = on\nsynchronous_commit = on\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
                "log_min_messages = warning\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def psql(self, sql: str, database: str = DATABASE) -> str:
        done = self._run("psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", str(self.root),
                         "-U", SUPERUSER, "-d", database, "-c", sql)
        return done.stdout.strip()


def start_cluster() -> Cluster:
    bindir = require_postgres()
    root = Path(tempfile.mkdtemp(prefix="whpg", dir="/tmp"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    root.chmod(0o700)
    cluster = Cluster(bindir, root)
    try:
        cluster.init()
        cluster.start()
        cluster.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        cluster.psql(f"CREATE ROLE {SECRET_USER} LOGIN PASSWORD '{SECRET_PASSWORD}';"
                     f" GRANT ALL ON DATABASE {DATABASE} TO {SECRET_USER}")
    except BaseException:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(cluster.root, ignore_errors=True)


async def new_schema(cluster: Cluster, *, owner: str = SUPERUSER) -> str:
    """A fresh, empty schema in the test database; its DSN (search_path set to it)."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"CREATE SCHEMA {name} AUTHORIZATION {owner}")
    finally:
        await conn.close()
    return cluster.dsn(schema=name)


@pytest.fixture
async def pg_dsn(pg_cluster: Cluster) -> AsyncIterator[str]:
    yield await new_schema(pg_cluster)


def wait_ready(cluster: Cluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster._run("pg_isready", "-h", str(cluster.root), "-U", SUPERUSER, check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError("PostgreSQL did not become ready")
