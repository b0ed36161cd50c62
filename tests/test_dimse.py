"""DICOM C-STORE / C-ECHO: sites push to a real `carina serve`, from pynetdicom and dcmtk."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg_pool import ConnectionPool
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from carina.api.dimse_transport import MAXIMUM_PDU_SIZE
from carina.archive import db, peers
from carina.curation.pseudonyms import Pseudonymizer, collection_key
from tests.conftest import Server, free_port, run_cli, wait_count, wait_for_series
from tests.factory import Phi, ct_instance, ct_series, to_bytes

pytestmark = pytest.mark.slow

SECRET = "dimse-test-key"
COLLECTION = "site-a"
# PS3.4 B.2.3 / B.4.1.3: de-identification coerces every instance it stores.
COERCED = 0xB000
DICOM_MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# Send files as they are on disk (file meta gives the SOP Class/Instance): the only way to put a
# truncated or inconsistent dataset on the wire.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class Listener:
    """A running `carina serve` with its DICOM port."""

    server: Server
    port: int
    database_url: str


@pytest.fixture(scope="module")
def listener(
    server_factory: object, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Listener:
    """Carina with its DICOM listener on a free port, and the AE titles the tests call from."""
    port = free_port()
    server = server_factory(  # type: ignore[operator]
        CARINA_DIMSE_PORT=str(port), CARINA_SECRET_KEY=SECRET
    )
    cli_dir = tmp_path_factory.mktemp("cli")
    done = run_cli(database_url, cli_dir, "collection", "create", COLLECTION)
    assert done.returncode == 0, done.stderr
    for args in (
        ("SITEA", "--collection", COLLECTION),
        ("WRONGHOST", "--collection", COLLECTION, "--host", "10.9.9.9"),
    ):
        done = run_cli(database_url, cli_dir, "ae", "add", *args)
        assert done.returncode == 0, done.stderr
    return Listener(server, port, database_url)


@pytest.fixture(scope="module")
def pool(listener: Listener) -> Iterator[ConnectionPool]:
    """A connection pool on the module's database (already migrated by the server)."""
    p = db.open_pool(listener.database_url, max_size=2)
    yield p
    p.close()


def associate(
    listener: Listener,
    aet: str = "SITEA",
    syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,),
) -> Association:
    """An association from aet proposing Verification, CT and MR Image Storage."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, list(syntaxes))
    ae.add_requested_context(MRImageStorage, list(syntaxes))
    return ae.associate("127.0.0.1", listener.port, ae_title="CARINA")


def pseudonymizer(collection: str = COLLECTION) -> Pseudonymizer:
    """The UID remapping the server applies in a collection (same secret key)."""
    return Pseudonymizer(collection_key(SECRET.encode(), collection))


def qido(listener: Listener, path: str) -> tuple[list[dict], str]:
    """A QIDO-RS answer as (results, raw text)."""
    r = listener.server.http.get(listener.server.dicomweb + path, timeout=30)
    assert r.status_code in (200, 204), r.text
    return (r.json() if r.status_code == 200 else []), r.text


def retrieve(listener: Listener, study: str) -> list[tuple[str, bytes]]:
    """WADO-RS retrieve of a study as (transfer syntax of the part, part bytes)."""
    r = listener.server.http.get(
        f"{listener.server.dicomweb}/studies/{study}",
        headers={"Accept": DICOM_MULTIPART},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    head = f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + r.content)
    return [
        (str(p.get_param("transfer-syntax")), p.get_payload(decode=True)) for p in msg.iter_parts()
    ]


def assert_no_phi(phi: Phi, *texts: str | bytes) -> None:
    """None of the planted identifying strings appears in texts."""
    for text in texts:
        blob = text.encode() if isinstance(text, str) else text
        for s in phi.strings():
            assert s.encode() not in blob, f"planted PHI {s!r} leaked"


def write(path: Path, data: bytes) -> Path:
    """Write bytes to path; return it."""
    path.write_bytes(data)
    return path


def test_c_echo_succeeds_for_registered_ae_from_pynetdicom_and_echoscu(
    listener: Listener,
) -> None:
    assoc = associate(listener)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000
    done = subprocess.run(
        ["echoscu", "-aet", "SITEA", "-aec", "CARINA", "127.0.0.1", str(listener.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def test_listener_takes_a_ct_in_one_pdu(listener: Listener) -> None:
    # PS3.8 9.3.1: the acceptor's Maximum Length; pynetdicom's default (16 KiB) cuts a 0.5 MB
    # CT into 33 PDUs, each a pass through pynetdicom's state machine.
    assoc = associate(listener)
    assert assoc.is_established
    assoc.release()
    assert assoc.acceptor.maximum_length == MAXIMUM_PDU_SIZE > 512 * 512 * 2


def test_cli_lists_registered_ae_titles_and_refuses_a_duplicate(
    listener: Listener, tmp_path: Path
) -> None:
    listed = run_cli(listener.database_url, tmp_path, "ae", "list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split("\t")[:2] == ["SITEA", COLLECTION] for line in listed.stdout.splitlines())
    assert "10.9.9.9" in listed.stdout
    again = run_cli(listener.database_url, tmp_path, "ae", "add", "SITEA", "--collection", "x")
    assert again.returncode == 1
    assert "already registered" in again.stderr


def test_c_store_from_pynetdicom_is_deidentified_and_found_by_qido(
    listener: Listener, pool: ConnectionPool
) -> None:
    phi = Phi()
    sent = ct_series(phi, 4, rows=32, columns=32)
    assoc = associate(listener)
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in sent]
    assoc.release()
    assert statuses == [COERCED] * 4
    wait_for_series(listener.database_url)

    study = pseudonymizer().uid(phi.study_uid)
    studies, studies_text = qido(listener, f"/studies?StudyInstanceUID={study}")
    assert len(studies) == 1
    instances, instances_text = qido(listener, f"/studies/{study}/instances")
    expected = {pseudonymizer().uid(ds.SOPInstanceUID) for ds in sent}
    assert {i["00080018"]["Value"][0] for i in instances} == expected
    parts = retrieve(listener, study)
    assert len(parts) == 4
    assert_no_phi(phi, studies_text, instances_text, *(body for _, body in parts))
    # The calling AE's collection decides where the study goes.
    with pool.connection() as conn:
        row = conn.execute("SELECT collection FROM studies WHERE study_uid = %s", (study,))
        assert row.fetchone() == (COLLECTION,)


def test_c_store_reports_deidentification_as_a_coercion_warning(
    listener: Listener, tmp_path: Path
) -> None:
    [ds] = ct_series(Phi(), 1, rows=16, columns=16)
    assoc = associate(listener)
    status = assoc.send_c_store(ds)
    assoc.release()
    # PS3.4 B.2.3: stored, with Warning "Coercion of Data Elements", and why.
    assert status.Status == COERCED
    assert code_to_category(status.Status) == "Warning"
    assert "de-identified" in status.ErrorComment
    # dcmtk's storescu takes the warning for what it is: reported, and the send succeeded.
    [again] = ct_series(Phi(), 1, rows=16, columns=16)
    done = subprocess.run(
        ["storescu", "-v", "-aet", "SITEA", "-aec", "CARINA", "127.0.0.1", str(listener.port)]
        + [str(write(tmp_path / "one.dcm", to_bytes(again)))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning: CoercionOfDataElements" in done.stdout + done.stderr


def test_coercion_warnings_can_be_turned_off(server_factory: object, listener: Listener) -> None:
    port = free_port()
    quiet = server_factory(  # type: ignore[operator]
        CARINA_DIMSE_PORT=str(port), CARINA_SECRET_KEY=SECRET, CARINA_COERCION_WARNINGS="false"
    )
    first, second = ct_series(Phi(), 2, rows=16, columns=16)
    assoc = associate(Listener(quiet, port, listener.database_url))
    status = assoc.send_c_store(first)
    assoc.release()
    assert status.Status == 0x0000
    assert "ErrorComment" not in status
    r = quiet.http.post(
        f"{quiet.dicomweb}/studies",
        data=b"--B\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(second) + b"\r\n--B--",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    [item] = r.json()["00081199"]["Value"]
    assert "00081196" not in item


def test_storescu_pushes_native_and_rle_instances_stored_as_received(
    listener: Listener, tmp_path: Path
) -> None:
    phi = Phi()
    sent = ct_series(phi, 3, rows=32, columns=32)
    rle = copy.deepcopy(sent[0])
    rle.SOPInstanceUID = rle.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rle.InstanceNumber = 4
    rle.ImagePositionPatient = [0.0, 0.0, 4.0]  # the fourth slice, not a duplicate of the first
    rle.compress(RLELossless)  # pydicom's own RLE encoder: no extra package
    assert rle.file_meta.TransferSyntaxUID == RLELossless
    files = [write(tmp_path / f"{i}.dcm", to_bytes(ds)) for i, ds in enumerate(sent)]
    files.append(write(tmp_path / "rle.dcm", to_bytes(rle)))

    # -xr: propose RLE Lossless besides the uncompressed syntaxes, so nothing is converted.
    done = subprocess.run(
        ["storescu", "-xr", "-aet", "SITEA", "-aec", "CARINA", "127.0.0.1", str(listener.port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Failed" not in done.stderr
    wait_for_series(listener.database_url)

    study = pseudonymizer().uid(phi.study_uid)
    instances, instances_text = qido(listener, f"/studies/{study}/instances")
    assert len(instances) == 4
    parts = retrieve(listener, study)
    assert len(parts) == 4
    assert_no_phi(phi, instances_text, *(body for _, body in parts))
    rle_sop = pseudonymizer().uid(rle.SOPInstanceUID)
    by_sop = {dcmread(BytesIO(body)).SOPInstanceUID: (ts, body) for ts, body in parts}
    ts, body = by_sop[rle_sop]
    assert ts == RLELossless
    stored = dcmread(BytesIO(body))
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(stored.pixel_array, sent[0].pixel_array)
    for ds in sent:
        ts, _ = by_sop[pseudonymizer().uid(ds.SOPInstanceUID)]
        assert ts == ExplicitVRLittleEndian


def _rejects(pool: ConnectionPool, calling_ae: str) -> list[peers.AssociationReject]:
    return [r for r in peers.list_rejects(pool) if r.calling_ae == calling_ae]


def _assert_rejected_calling_ae_not_recognized(assoc: Association) -> None:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # PS3.8 9.3.4: rejected-permanent, service-user, calling-AE-title-not-recognized.
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


def test_unknown_calling_ae_is_rejected_at_association_and_audited(
    listener: Listener, pool: ConnectionPool
) -> None:
    assoc = associate(listener, aet="NOBODY")
    _assert_rejected_calling_ae_not_recognized(assoc)
    [reject] = _rejects(pool, "NOBODY")
    assert reject.peer_host == "127.0.0.1"
    assert "not registered" in reject.reason


def test_registered_ae_calling_from_another_host_is_rejected_and_audited(
    listener: Listener, pool: ConnectionPool
) -> None:
    assoc = associate(listener, aet="WRONGHOST")
    _assert_rejected_calling_ae_not_recognized(assoc)
    [reject] = _rejects(pool, "WRONGHOST")
    assert reject.peer_host == "127.0.0.1"
    assert "another host" in reject.reason


def test_bad_instances_get_failure_statuses_and_the_association_stays_usable(
    listener: Listener, tmp_path: Path
) -> None:
    phi = Phi()
    truncated, no_sop, wrong_class, good = ct_series(phi, 4, rows=32, columns=32)
    truncated_file = write(tmp_path / "truncated.dcm", to_bytes(truncated)[:-700])
    del no_sop.SOPInstanceUID  # file meta still names it, so it can be sent
    no_sop_file = write(tmp_path / "no_sop.dcm", to_bytes(no_sop))
    # Sent on the CT context (file meta says CT) while the dataset says MR.
    wrong_class.SOPClassUID = MRImageStorage
    wrong_class.preamble = b"\0" * 128
    wrong_class.save_as(tmp_path / "wrong_class.dcm", enforce_file_format=False)  # keeps meta
    wrong_class_file = tmp_path / "wrong_class.dcm"
    assert dcmread(wrong_class_file).file_meta.MediaStorageSOPClassUID == CTImageStorage

    assoc = associate(listener)
    assert assoc.is_established
    r_truncated = assoc.send_c_store(truncated_file)
    r_no_sop = assoc.send_c_store(no_sop_file)
    r_wrong = assoc.send_c_store(wrong_class_file)
    r_good = assoc.send_c_store(good)
    assert assoc.is_established
    assoc.release()

    assert r_truncated.Status & 0xF000 == 0xC000
    assert "truncated" in r_truncated.ErrorComment
    assert r_no_sop.Status == 0xA900
    assert "SOPInstanceUID" in r_no_sop.ErrorComment
    assert r_wrong.Status == 0xA900
    assert "SOP Class" in r_wrong.ErrorComment
    assert r_good.Status == COERCED
    assert_no_phi(phi, *(str(r.get("ErrorComment", "")) for r in (r_truncated, r_no_sop, r_wrong)))
    wait_for_series(listener.database_url)
    study = pseudonymizer().uid(phi.study_uid)
    instances, _ = qido(listener, f"/studies/{study}/instances")
    assert [i["00080018"]["Value"][0] for i in instances] == [
        pseudonymizer().uid(good.SOPInstanceUID)
    ]


def test_deflated_dataset_of_another_sop_class_does_not_match(
    listener: Listener, tmp_path: Path
) -> None:
    # The listener reads the SOP Class from the first elements only; deflated, it inflates them.
    (wrong_class,) = ct_series(Phi(), 1, rows=32, columns=32)
    wrong_class.SOPClassUID = MRImageStorage
    wrong_class.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    wrong_class.preamble = b"\0" * 128
    path = tmp_path / "wrong_class_deflated.dcm"
    wrong_class.save_as(path, enforce_file_format=False)
    assert dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assoc = associate(listener, syntaxes=(DeflatedExplicitVRLittleEndian,))
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xA900
    assert "SOP Class" in status.ErrorComment


def test_instances_acknowledged_before_an_abort_are_all_kept(listener: Listener) -> None:
    phi = Phi()
    sent = ct_series(phi, 3, rows=32, columns=32)
    assoc = associate(listener)
    assert [assoc.send_c_store(ds).Status for ds in sent] == [COERCED] * 3
    assoc.abort()
    # Acknowledged means durable in the intake area: indexed right after, abort or not (an
    # abort has no release response to hold until then, so the test waits for it).
    sops = [pseudonymizer().uid(ds.SOPInstanceUID) for ds in sent]
    wait_count(
        listener.database_url,
        "SELECT count(*) FROM instances WHERE sop_uid = ANY(%s)",
        (sops,),
        len(sops),
    )
    # And published once the series is evaluated (the abort ends the quiet period).
    listener.server.settled()
    instances, _ = qido(listener, f"/studies/{pseudonymizer().uid(phi.study_uid)}/instances")
    assert len(instances) == 3


def test_eight_concurrent_associations_store_eighty_intact_instances(
    listener: Listener, tmp_path: Path
) -> None:
    # Eight storescu processes at once, ten instances each over one association. (Eight
    # pynetdicom requestors in threads of one process lose a response now and then: a
    # requestor's reactor can take the C-STORE-RSP off the queue before send_c_store waits for
    # it, pynetdicom 3.0's pause being a flag the reactor may have set before it was asked.)
    series = []
    for t in range(8):
        phi = Phi()
        sent = [ct_instance(phi, i + 1, seed=t * 100 + i) for i in range(10)]
        files = [write(tmp_path / f"{t}-{i}.dcm", to_bytes(ds)) for i, ds in enumerate(sent)]
        series.append((phi, sent, files))
    senders = [
        subprocess.Popen(
            ["storescu", "-v", "-aet", "SITEA", "-aec", "CARINA", "127.0.0.1", str(listener.port)]
            + [str(f) for f in files],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _, _, files in series
    ]
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
        # Every instance answered, each with the de-identification warning (PS3.4 B.2.3).
        assert out.count("Received Store Response") == 10, out
        assert out.count("Warning: CoercionOfDataElements") == 10, out
    wait_for_series(listener.database_url)

    p = pseudonymizer()
    for phi, sent, _ in series:
        parts = retrieve(listener, p.uid(phi.study_uid))
        got = {ds.SOPInstanceUID: ds for ds in (dcmread(BytesIO(b)) for _, b in parts)}
        assert len(got) == 10
        for ds in sent:
            assert got[p.uid(ds.SOPInstanceUID)].PixelData == ds.PixelData


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_c_store_recovers_when_intake_worker_processes_are_killed(
    server_factory: object, listener: Listener
) -> None:
    # A worker killed (out of memory, by an operator) fails at most the instance it had: the
    # next C-STORE gets a new worker (a broken process pool would fail every later one).
    server = server_factory(  # type: ignore[operator]
        CARINA_DIMSE_PORT=str(port := free_port()), CARINA_SECRET_KEY=SECRET
    )
    other = Listener(server, port, listener.database_url)
    first, second = ct_series(Phi(), 2, rows=16, columns=16)
    assoc = associate(other)
    assert assoc.send_c_store(first).Status == COERCED
    assoc.release()
    (forkserver,) = [
        pid
        for pid in _children(server.process.pid)
        if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    workers = _children(forkserver)
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assoc = associate(other)
    assert assoc.send_c_store(second).Status == COERCED
    assoc.release()


def test_submission_records_accepted_and_refused_counts(
    listener: Listener, pool: ConnectionPool, tmp_path: Path
) -> None:
    peers.add_ae_title(pool, "SITEC", COLLECTION)
    phi = Phi()
    first, second, bad = ct_series(phi, 3, rows=32, columns=32)
    del bad.SOPInstanceUID
    bad_file = write(tmp_path / "bad.dcm", to_bytes(bad))
    assoc = associate(listener, aet="SITEC")
    statuses = [assoc.send_c_store(x).Status for x in (first, bad_file, second)]
    assoc.release()
    assert statuses == [COERCED, 0xA900, COERCED]

    deadline = time.monotonic() + 10
    while True:
        [submission] = peers.list_submissions(pool, ae_title="SITEC")
        if submission.ended_at is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert submission.ended_at is not None
    assert (submission.accepted, submission.refused) == (2, 1)
    assert submission.peer_host == "127.0.0.1"
    assert list(submission.reasons.values()) == [1]
    [reason] = submission.reasons
    assert reason.startswith("A900 ") and "SOPInstanceUID" in reason


def test_listener_answers_after_every_test_above(listener: Listener) -> None:
    """No earlier test (aborts, bad data, concurrency) left the listener unable to serve."""
    assoc = associate(listener)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    with psycopg.connect(listener.database_url) as conn:
        open_ones = conn.execute(
            "SELECT count(*) FROM submissions WHERE ended_at IS NULL AND started_at < now()"
            " - interval '5 seconds'"
        ).fetchone()
    assert open_ones == (0,)


def test_carina_dimse_runs_the_listener_alone_and_stops_on_sigterm(
    listener: Listener, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARINA_")}
    env.update(
        DATABASE_URL=listener.database_url,
        CARINA_DATA_DIR=str(tmp_path / "data"),
        CARINA_DIMSE_PORT=str(port),
        CARINA_WORKERS="1",
        CARINA_SECRET_KEY=SECRET,
    )
    log = tmp_path / "dimse.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carina", "dimse"], env=env, stdout=out, stderr=out
        )
    try:
        alone = Listener(listener.server, port, listener.database_url)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assoc = associate(alone)
            if assoc.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert assoc.is_established, log.read_text()
        phi = Phi()
        [ds] = ct_series(phi, 1, rows=16, columns=16)
        assert assoc.send_c_store(ds).Status == COERCED
        assoc.release()
        # Same database and key: the HTTP server's worker evaluates what the lone listener
        # stored, and then serves it.
        wait_for_series(listener.database_url)
        instances, _ = qido(listener, f"/studies/{pseudonymizer().uid(phi.study_uid)}/instances")
        assert len(instances) == 1
    finally:
        proc.terminate()
        rc = proc.wait(30)
    assert rc == 0, log.read_text()
    assert "DICOM listener stopped" in log.read_text()
