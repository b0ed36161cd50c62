"""C-STORE acknowledged on admission (CARINA_DIMSE_ACK=intake, the default): the status comes
once the original is durable in the intake area, before the index is written; nothing
acknowledged is lost when the store fails or the server is killed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from carina.curation.pseudonyms import Pseudonymizer, collection_key
from tests.conftest import Server, free_port, indexed, run_cli, start_server, wait_for_series
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow

SECRET = "admission-test-key"
COLLECTION = "site-adm"
COERCED = 0xB000


def _register(database_url: str, cwd: Path) -> None:
    """The test collection and its AE title (once per database)."""
    for args in (
        ("collection", "create", COLLECTION),
        ("ae", "add", "SITEADM", "--collection", COLLECTION),
    ):
        done = run_cli(database_url, cwd, *args)
        assert done.returncode == 0 or "exists" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def registered(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The module's database with the collection and AE title the tests push with."""
    cwd = tmp_path_factory.mktemp("cli")
    done = run_cli(database_url, cwd, "migrate")
    assert done.returncode == 0, done.stderr
    _register(database_url, cwd)
    return database_url


def serve(data_dir: Path, database_url: str, port: int, **env: str) -> Server:
    """`carina serve` with its DICOM listener on port."""
    return start_server(
        data_dir, database_url, CARINA_DIMSE_PORT=str(port), CARINA_SECRET_KEY=SECRET, **env
    )


@contextmanager
def serving(tmp_path: Path, database_url: str, **env: str) -> Iterator[tuple[Server, Path, int]]:
    """A server (its data directory and DICOM port) for the block, stopped after it."""
    port = free_port()
    server = serve(tmp_path / "data", database_url, port, **env)
    try:
        yield server, tmp_path / "data", port
    finally:
        server.stop()


def associate(port: int, timeout: float = 30.0) -> Association:
    """An association from SITEADM proposing CT Image Storage; DIMSE replies awaited at most
    timeout seconds."""
    ae = AE(ae_title="SITEADM")
    ae.dimse_timeout = timeout
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CARINA")
    assert assoc.is_established
    return assoc


def pseudonymizer() -> Pseudonymizer:
    """The UID remapping the server applies in the collection."""
    return Pseudonymizer(collection_key(SECRET.encode(), COLLECTION))


@contextmanager
def index_locked(database_url: str) -> Iterator[None]:
    """Hold the instances table so that no instance can be indexed until the block ends
    (reading it still works)."""
    with psycopg.connect(database_url) as conn:
        conn.execute("LOCK TABLE instances IN EXCLUSIVE MODE")
        yield
        conn.rollback()


def test_c_store_is_acknowledged_before_it_is_indexed_and_indexed_at_release(
    registered: str, tmp_path: Path
) -> None:
    with serving(tmp_path, registered) as (_, _, port):
        sent = ct_series(Phi(), 3, rows=16, columns=16)
        sops = [pseudonymizer().uid(ds.SOPInstanceUID) for ds in sent]
        assoc = associate(port, timeout=20)
        with index_locked(registered):
            # Statuses arrive while nothing can be indexed: acknowledged on admission.
            statuses = [assoc.send_c_store(ds).get("Status") for ds in sent]
            assert statuses == [COERCED] * 3
            assert indexed(registered, sops) == 0
        # The release response waits for what the association had acknowledged.
        assoc.release()
        assert indexed(registered, sops) == 3


def test_ack_setting_indexed_answers_only_once_indexed(registered: str, tmp_path: Path) -> None:
    with serving(tmp_path, registered, CARINA_DIMSE_ACK="indexed") as (_, _, port):
        [ds] = ct_series(Phi(), 1, rows=16, columns=16)
        assoc = associate(port, timeout=4)
        with index_locked(registered):
            # No answer while the index is held: pynetdicom gives up waiting for it.
            status = assoc.send_c_store(ds)
            assert "Status" not in status
        assoc.abort()


def _log_says(server: Server, text: str, timeout: float = 60.0) -> None:
    """Wait until the server's log has text."""
    deadline = time.monotonic() + timeout
    while text not in server.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.1)


def test_instance_whose_store_fails_after_its_ack_is_processed_again_until_indexed(
    registered: str, tmp_path: Path
) -> None:
    with serving(tmp_path, registered) as (server, data, port):
        phi = Phi()
        sent = ct_series(phi, 2, rows=16, columns=16)
        p = pseudonymizer()
        sops = [p.uid(ds.SOPInstanceUID) for ds in sent]
        # A file where the study's directory of the object store must go: storing fails.
        blocker = data / "objects" / p.uid(phi.study_uid)
        blocker.write_bytes(b"")
        assoc = associate(port)
        assert [assoc.send_c_store(ds).get("Status") for ds in sent] == [COERCED] * 2
        _log_says(server, "processing again in")
        assert indexed(registered, sops) == 0
        blocker.unlink()
        assoc.release()  # waits for the retry that now succeeds
        assert indexed(registered, sops) == 2
        log = server.log.read_bytes()
        for s in phi.strings():
            assert s.encode() not in log


def _ended_submission(database_url: str, timeout: float = 60.0) -> tuple[int, int, dict]:
    """(accepted, refused, reasons) of SITEADM's latest submission, once its association's
    end has written them (just after the release response)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT ended_at IS NOT NULL, accepted, refused, reasons FROM submissions"
                " WHERE ae_title = 'SITEADM' ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if row is not None and row[0]:
                return row[1], row[2], row[3]
            assert time.monotonic() < deadline, "the submission did not end"
            time.sleep(0.05)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _pending(data: Path) -> list[Path]:
    """The pending originals of the intake area (not the context or lock files)."""
    return [
        p for p in _files(data / "intake" / "pending") if p.name not in ("context.json", ".owner")
    ]


def test_instances_acknowledged_before_a_kill_are_indexed_after_restart(
    registered: str, tmp_path: Path
) -> None:
    port = free_port()
    data = tmp_path / "data"
    server = serve(data, registered, port)
    phi = Phi()
    sent = ct_series(phi, 5, rows=16, columns=16)
    p = pseudonymizer()
    sops = [p.uid(ds.SOPInstanceUID) for ds in sent]
    try:
        assoc = associate(port, timeout=20)
        with index_locked(registered):
            assert [assoc.send_c_store(ds).get("Status") for ds in sent] == [COERCED] * 5
            assert indexed(registered, sops) == 0
            # Each acknowledged original waits in the intake area, sealed: no PHI in clear.
            pending = _pending(data)
            assert len(pending) == 5
            for path in pending:
                blob = path.read_bytes()
                for s in phi.strings():
                    assert s.encode() not in blob
            server.process.kill()  # SIGKILL: no clean shutdown, the commit never happens
            server.process.wait(30)
        threading.Thread(target=assoc.abort, daemon=True).start()
    finally:
        server.stop()

    again = serve(data, registered, port)
    try:
        # Processed at start-up, before the listener listens.
        assert indexed(registered, sops) == 5
        assert _pending(data) == []
        # The association cut by the kill is closed, its recovered instances accepted.
        assert _ended_submission(registered)[:2] == (5, 0)
        wait_for_series(registered)
        study = p.uid(phi.study_uid)
        r = again.http.get(f"{again.dicomweb}/studies/{study}/instances", timeout=30)
        assert r.status_code == 200, r.text
        assert sorted(i["00080018"]["Value"][0] for i in r.json()) == sorted(sops)
        retrieved = again.client().retrieve_study(study)
        assert len(retrieved) == 5
        stored = b"".join(path.read_bytes() for path in _files(data / "objects"))
        logs = server.log.read_bytes() + again.log.read_bytes()
        for s in phi.strings():
            assert s.encode() not in stored
            assert s.encode() not in logs
            for ds in retrieved:
                assert s not in str(ds)
    finally:
        again.stop()


def test_instance_forgotten_after_its_ack_is_refused_in_the_association_report(
    registered: str, tmp_path: Path
) -> None:
    with serving(tmp_path, registered) as (server, data, port):
        p = pseudonymizer()
        first = Phi()
        later = Phi(patient_id=first.patient_id)  # the same subject, another study
        assoc = associate(port)
        [ds] = ct_series(first, 1, rows=16, columns=16)
        assert assoc.send_c_store(ds).get("Status") == COERCED
        # The later study cannot be stored for now: admitted, then waiting to be retried.
        blocker = data / "objects" / p.uid(later.study_uid)
        blocker.write_bytes(b"")
        [ds] = ct_series(later, 1, rows=16, columns=16)
        assert assoc.send_c_store(ds).get("Status") == COERCED
        _log_says(server, "processing again in")
        # Meanwhile the subject is forgotten (its first instance is indexed by now).
        done = run_cli(
            registered,
            tmp_path,
            "subject",
            "forget",
            COLLECTION,
            "--research-id",
            p.patient_id(first.patient_id),
            CARINA_SECRET_KEY=SECRET,
        )
        assert done.returncode == 0, done.stderr
        blocker.unlink()
        assoc.release()  # waits for the retry, which refuses it
        assert indexed(registered, [p.uid(ds.SOPInstanceUID)]) == 0
        assert _pending(data) == []
        accepted, refused, reasons = _ended_submission(registered)
        assert (accepted, refused) == (1, 1)
        [reason] = reasons
        assert reason.startswith("0124 subject forgotten")
        log = server.log.read_bytes()
        for s in first.strings():
            assert s.encode() not in log
