"""The series queue with workers as separate processes: `carina serve` without its own worker
keeps new series incoming and invisible; `carina worker` processes decide them, several at once
with each series decided once, and a job whose worker died is taken by another."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from carina.archive import jobs
from tests.conftest import Server, cli_env, wait_for_series
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow

# A worker that takes a job with Carina's own claim, says which, and waits to be killed.
CLAIM_AND_HANG = textwrap.dedent(
    """
    import sys, time
    import psycopg
    from carina.archive import jobs
    with psycopg.connect(sys.argv[1]) as conn:
        claimed = jobs.claim(conn)
        print(claimed[0] if claimed else "", flush=True)
        time.sleep(600)
    """
)


@pytest.fixture(scope="module")
def server(server_factory: object) -> Server:
    """Carina serving HTTP without evaluating series itself."""
    return server_factory(CARINA_SERVE_WORKER="false")  # type: ignore[operator]


@pytest.fixture(scope="module")
def stowed(server: Server) -> list[tuple[str, str]]:
    """(study, series) of six series stored while no worker runs."""
    client = server.client()
    made = []
    for _ in range(6):
        response = client.store_instances(ct_series(Phi(), 3, rows=16, columns=16))
        url = str(response.ReferencedSOPSequence[0].RetrieveURL).split("/studies/", 1)[1]
        study, _, series = url.split("/")[:3]
        made.append((study, series))
    return made


def states(database_url: str) -> dict[str, str]:
    with psycopg.connect(database_url) as conn:
        return dict(conn.execute("SELECT series_uid, state FROM series").fetchall())


def test_series_stay_incoming_and_invisible_without_a_worker(
    server: Server, stowed: list[tuple[str, str]], database_url: str
) -> None:
    assert set(states(database_url).values()) == {"incoming"}
    for study, series in stowed:
        r = server.http.get(f"{server.dicomweb}/studies", params={"StudyInstanceUID": study})
        assert r.status_code == 204
        r = server.http.get(f"{server.dicomweb}/studies/{study}/series/{series}/metadata")
        assert r.status_code == 404


@pytest.mark.parametrize("decision", ["release", "reject", "reprocess"])
def test_curators_cannot_decide_a_series_the_rules_have_not_judged(
    server: Server, stowed: list[tuple[str, str]], decision: str
) -> None:
    _, series = stowed[0]
    r = server.http.post(
        f"{server.url}/api/curation/series/{series}/{decision}", json={"reason": "too early"}
    )
    assert r.status_code == 409
    assert "incoming" in r.json()["error"]


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_two_workers_decide_every_series_once_after_a_worker_died_holding_a_job(
    stowed: list[tuple[str, str]],
    database_url: str,
    tmp_path: Path,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    crasher = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HANG, database_url],
        stdout=subprocess.PIPE,
        env=cli_env(database_url, tmp_path),
    )
    workers.append(crasher)
    taken = crasher.stdout.readline().decode().strip()  # type: ignore[union-attr]
    assert taken in {series for _, series in stowed}
    crasher.send_signal(signal.SIGKILL)  # dies mid-job: its transaction never commits
    crasher.wait(10)

    for n in range(2):
        log = open(tmp_path / f"worker{n}.log", "wb")  # noqa: SIM115 - closed with the process
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "carina", "worker"],
                env=cli_env(database_url, tmp_path),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    decided = wait_for_series(database_url)
    assert decided == {series: "published" for _, series in stowed}
    with psycopg.connect(database_url) as conn:
        evaluations = dict(
            conn.execute(
                "SELECT series_uid, count(*) FROM audit_log WHERE action = 'evaluate'"
                " GROUP BY series_uid"
            ).fetchall()
        )
    assert evaluations == {series: 1 for _, series in stowed}

    # Both up (their SIGTERM handler installed) before they are asked to stop.
    logs = [tmp_path / f"worker{n}.log" for n in range(2)]
    deadline = time.monotonic() + 60
    while not all("series worker listening" in p.read_text() for p in logs):
        assert time.monotonic() < deadline, [p.read_text()[-2000:] for p in logs]
        time.sleep(0.1)
    for proc in workers[1:]:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(30) for proc in workers[1:]] == [0, 0], [p.read_text()[-2000:] for p in logs]


def test_a_job_that_keeps_failing_is_held_for_a_curator_not_retried_for_ever(
    server: Server,
    database_url: str,
    tmp_path: Path,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    response = server.client().store_instances(ct_series(Phi(), 2, rows=16, columns=16))
    url = str(response.ReferencedSOPSequence[0].RetrieveURL).split("/studies/", 1)[1]
    series = url.split("/")[2]
    with psycopg.connect(database_url) as conn:
        # As failed attempts (a database error, a bug) leave it: counted, with the last error.
        conn.execute(
            "UPDATE series_jobs SET attempts = 5, last_error = 'OperationalError'"
            " WHERE series_uid = %s",
            (series,),
        )
    workers.append(
        subprocess.Popen(
            [sys.executable, "-m", "carina", "worker"],
            env=cli_env(database_url, tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    assert wait_for_series(database_url)[series] == "quarantined"
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT code, severity, message FROM series_findings WHERE series_uid = %s",
            (series,),
        ).fetchall()
    assert found == [
        (
            "evaluation-failed",
            "hold",
            "The series could not be evaluated after 5 attempts; see the server log.",
        )
    ]


def test_an_empty_queue_has_nothing_due_so_idle_workers_sleep(
    server: Server, stowed: list[tuple[str, str]]
) -> None:
    with psycopg.connect(str(server.database_url)) as conn:
        conn.execute("DELETE FROM series_jobs")
        assert jobs.seconds_to_next(conn) is None
        conn.execute(
            "INSERT INTO series_jobs (series_uid, due_at)"
            " SELECT series_uid, now() - interval '1 minute' FROM series LIMIT 1"
        )
        assert jobs.seconds_to_next(conn) == 0.0
        conn.rollback()  # the module's other tests keep their queue
