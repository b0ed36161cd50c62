"""DICOM Query/Retrieve: PACS peers C-FIND, C-MOVE and C-GET a real `carina serve`, from dcmtk,
pynetdicom and Orthanc, and see only the collection their AE title is registered for."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from bench.servers import OrthancServer
from carina.curation.pseudonyms import Pseudonymizer, collection_key
from tests.conftest import Server, free_port, run_cli, running_orthanc, wait_for_series
from tests.factory import Phi, ct_series, to_bytes

pytestmark = pytest.mark.slow

COLLECTION = "qr-a"
OTHER_COLLECTION = "qr-b"
DICOM_MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'
TIMEOUT = 60
SECRET = "qr-test-key"


@dataclass
class Receiver:
    """A pynetdicom Storage SCP run by a test: a C-MOVE destination, or a C-GET requestor."""

    ae_title: str
    port: int
    received: list[Dataset] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: Event) -> int:
        """Keep each received dataset, with the transfer syntax it came in."""
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000


@dataclass(frozen=True)
class Archive:
    """Carina with its DICOM listener, the stored study and the peers that call it."""

    server: Server
    port: int
    database_url: str
    receiver: Receiver
    study: str  # de-identified Study Instance UID
    series: dict[str, int]  # de-identified Series Instance UID -> number of instances
    sops: list[str]  # de-identified SOP Instance UIDs


def _start_receiver(ae_title: str) -> tuple[Receiver, AE]:
    receiver = Receiver(ae_title, free_port())
    ae = AE(ae_title=ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(
            cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    ae.start_server(
        ("127.0.0.1", receiver.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, receiver.on_store)],
    )
    return receiver, ae


@pytest.fixture(scope="module")
def archive(
    server_factory: object, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Archive]:
    """Carina holding one de-identified study of two series (5 CT images) in COLLECTION,
    pushed by C-STORE from QRSCU; OTHER is registered for another collection."""
    receiver, receiver_ae = _start_receiver("DEST")
    port = free_port()
    server = server_factory(  # type: ignore[operator]
        CARINA_DIMSE_PORT=str(port), CARINA_SECRET_KEY=SECRET
    )
    cli_dir = tmp_path_factory.mktemp("cli")
    for name in (COLLECTION, OTHER_COLLECTION):
        # Dates kept (shifted per patient), so that date range matching has something to match.
        done = run_cli(
            database_url,
            cli_dir,
            "collection",
            "create",
            name,
            "--option",
            "retain_long_modified_dates",
        )
        assert done.returncode == 0, done.stderr
    for args in (
        ("QRSCU", "--collection", COLLECTION, "--host", "127.0.0.1"),
        ("OTHER", "--collection", OTHER_COLLECTION),
        ("DEST", "--collection", COLLECTION, "--host", "127.0.0.1", "--port", str(receiver.port)),
        ("DESTB", "--collection", OTHER_COLLECTION, "--host", "127.0.0.1", "--port", "104"),
    ):
        done = run_cli(database_url, cli_dir, "ae", "add", *args)
        assert done.returncode == 0, done.stderr

    phi = Phi()
    first = ct_series(phi, 3, rows=32, columns=32)
    second = ct_series(Phi(study_uid=phi.study_uid), 2, rows=32, columns=32)
    for ds in second:
        ds.SeriesNumber = 4
        ds.SeriesDescription = "CORONAL"
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CARINA")
    assert assoc.is_established
    # Stored, each with the warning that de-identification coerced it (PS3.4 B.2.3).
    assert [assoc.send_c_store(ds).Status for ds in first + second] == [0xB000] * 5
    assoc.release()
    assert set(wait_for_series(database_url).values()) == {"published"}

    study = uid_in(COLLECTION, phi.study_uid)
    instances = server.http.get(f"{server.dicomweb}/studies/{study}/instances", timeout=30).json()
    series: dict[str, int] = {}
    for item in instances:
        uid = item["0020000E"]["Value"][0]
        series[uid] = series.get(uid, 0) + 1
    sops = [item["00080018"]["Value"][0] for item in instances]
    yield Archive(server, port, database_url, receiver, study, series, sops)
    receiver_ae.shutdown()


def uid_in(collection: str, uid: str) -> str:
    """The de-identified UID Carina gives an original UID in a collection (same secret key)."""
    return Pseudonymizer(collection_key(SECRET.encode(), collection)).uid(uid)


def study_json(archive: Archive) -> dict:
    """The stored study as QIDO-RS describes it."""
    r = archive.server.http.get(
        f"{archive.server.dicomweb}/studies?StudyInstanceUID={archive.study}"
        "&includefield=PatientID",
        timeout=30,
    )
    [item] = r.json()
    return item


def wado_pixels(archive: Archive) -> dict[str, bytes]:
    """SOP Instance UID -> Pixel Data of every instance of the study, by WADO-RS."""
    r = archive.server.http.get(
        f"{archive.server.dicomweb}/studies/{archive.study}",
        headers={"Accept": DICOM_MULTIPART},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    head = f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + r.content)
    parts = [dcmread(BytesIO(p.get_payload(decode=True))) for p in msg.iter_parts()]
    return {str(ds.SOPInstanceUID): ds.PixelData for ds in parts}


def dcmtk(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool; its output for the assertion message."""
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, check=False
    )


def findscu(archive: Archive, out: Path, *keys: str, aet: str = "QRSCU") -> list[Dataset]:
    """findscu -S with keys; the response identifiers it wrote."""
    out.mkdir()
    args = ["findscu", "-S", "-aet", aet, "-aec", "CARINA", "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    done = dcmtk(*args, "127.0.0.1", str(archive.port))
    assert done.returncode == 0, done.stdout + done.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def identifier(level: str, **keys: object) -> Dataset:
    """A Query/Retrieve identifier at level, with keys given as keyword=value."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@contextmanager
def qr_association(
    archive: Archive,
    model: str,
    aet: str = "QRSCU",
    on_store: Callable[[Event], int] | None = None,
) -> Iterator[Association]:
    """A pynetdicom association from aet proposing a Query/Retrieve model, released after; with
    on_store, also CT Image Storage with the SCP role (PS3.7 D.3.3.4), as a C-GET needs."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(model)
    extra: dict[str, Any] = {}
    if on_store is not None:
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        extra = {
            "ext_neg": [build_role(CTImageStorage, scp_role=True)],
            "evt_handlers": [(evt.EVT_C_STORE, on_store)],
        }
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="CARINA", **extra)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def c_find(archive: Archive, query: Dataset, aet: str = "QRSCU") -> list[tuple[int, Dataset]]:
    """(status, identifier) of every C-FIND response from pynetdicom."""
    model = StudyRootQueryRetrieveInformationModelFind
    with qr_association(archive, model, aet) as assoc:
        return [(int(status.Status), ident) for status, ident in assoc.send_c_find(query, model)]


def c_move(archive: Archive, query: Dataset, destination: str, aet: str = "QRSCU") -> Dataset:
    """The final C-MOVE response (status and sub-operation counts) from pynetdicom."""
    model = StudyRootQueryRetrieveInformationModelMove
    with qr_association(archive, model, aet) as assoc:
        return list(assoc.send_c_move(query, destination, model))[-1][0]


def c_get(
    archive: Archive, query: Dataset, on_store: Callable[[Event], int] | None = None
) -> Dataset:
    """The final C-GET response from pynetdicom; instances go to on_store (with none, the
    association offers no storage context to send them in)."""
    model = StudyRootQueryRetrieveInformationModelGet
    with qr_association(archive, model, on_store=on_store) as assoc:
        return list(assoc.send_c_get(query, model, msg_id=1))[-1][0]


def test_findscu_matches_studies_by_date_range_and_wildcard(
    archive: Archive, tmp_path: Path
) -> None:
    item = study_json(archive)
    date = item["00080020"]["Value"][0]
    pid = item["00100020"]["Value"][0]
    found = findscu(
        archive,
        tmp_path / "hit",
        "QueryRetrieveLevel=STUDY",
        f"StudyDate={int(date) - 1}-{int(date) + 1}",
        f"PatientID={pid[:3]}*",
        "StudyInstanceUID",
        "PatientName",
        "NumberOfStudyRelatedInstances",
        "ModalitiesInStudy",
    )
    [ds] = found
    assert ds.StudyInstanceUID == archive.study
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.PatientID == pid
    assert int(ds.NumberOfStudyRelatedInstances) == 5
    assert ds.ModalitiesInStudy == "CT"
    assert "PatientName" in ds  # asked for: returned, with the stored (pseudonymous) value
    missed = findscu(
        archive, tmp_path / "miss", "QueryRetrieveLevel=STUDY", "StudyDate=19000101-19000102"
    )
    assert missed == []


def test_findscu_lists_series_then_images_of_the_study(archive: Archive, tmp_path: Path) -> None:
    series = findscu(
        archive,
        tmp_path / "series",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={archive.study}",
        "SeriesInstanceUID",
        "SeriesNumber",
        "Modality=C*",
        "NumberOfSeriesRelatedInstances",
    )
    got = {ds.SeriesInstanceUID: int(ds.NumberOfSeriesRelatedInstances) for ds in series}
    assert got == archive.series
    assert sorted(int(ds.SeriesNumber) for ds in series) == [3, 4]
    [three] = [ds.SeriesInstanceUID for ds in series if int(ds.SeriesNumber) == 3]
    images = findscu(
        archive,
        tmp_path / "images",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={archive.study}",
        f"SeriesInstanceUID={three}",
        "SOPInstanceUID",
        "InstanceNumber",
    )
    assert sorted(int(ds.InstanceNumber) for ds in images) == [1, 2, 3]
    assert {ds.SOPInstanceUID for ds in images} <= set(archive.sops)
    assert all(ds.QueryRetrieveLevel == "IMAGE" for ds in images)


def test_pynetdicom_c_find_returns_each_key_asked_for_and_empty_when_not_held(
    archive: Archive,
) -> None:
    item = study_json(archive)
    query = identifier("STUDY", StudyInstanceUID=archive.study)
    query.PatientID = item["00100020"]["Value"][0]
    query.StudyDescription = ""
    query.StudyDate = ""
    query.AccessionNumber = ""
    query.NumberOfStudyRelatedSeries = ""
    query.InstitutionalDepartmentName = ""  # not held: returned empty
    query.RetrieveAETitle = ""
    responses = c_find(archive, query)
    assert [s for s, _ in responses] == [0xFF00, 0x0000]
    ds = responses[0][1]
    assert ds.StudyInstanceUID == archive.study
    assert ds.StudyDescription == item.get("00081030", {}).get("Value", [""])[0]
    assert ds.StudyDate == item["00080020"]["Value"][0]
    assert int(ds.NumberOfStudyRelatedSeries) == 2
    assert "InstitutionalDepartmentName" in ds and ds.InstitutionalDepartmentName in ("", None)
    assert ds.RetrieveAETitle == "CARINA"
    assert ds.QueryRetrieveLevel == "STUDY"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_c_find_refuses_malformed_identifiers_with_a_failure_status_and_comment(
    archive: Archive,
) -> None:
    no_level = Dataset()
    no_level.StudyInstanceUID = ""
    for query, status in (
        (no_level, 0xA900),
        (identifier("SERIES", SeriesInstanceUID=""), 0xA900),
        (identifier("STUDY", SOPInstanceUID="1.2.3"), 0xA900),
        (identifier("STUDY", StudyDate="2024-01"), 0xC000),
    ):
        [(got, ident)] = c_find(archive, query)
        assert got == status, query
        assert ident is None


def test_c_find_failure_comments_name_the_problem(archive: Archive) -> None:
    model = StudyRootQueryRetrieveInformationModelFind
    with qr_association(archive, model) as assoc:
        [(status, _)] = list(assoc.send_c_find(identifier("SERIES"), model))
    assert status.Status == 0xA900
    assert "StudyInstanceUID" in status.ErrorComment


def test_ae_registered_for_another_collection_finds_nothing_of_this_one(
    archive: Archive, tmp_path: Path
) -> None:
    query = identifier("STUDY", StudyInstanceUID="")
    assert [s for s, _ in c_find(archive, query, aet="OTHER")] == [0x0000]
    assert len([s for s, _ in c_find(archive, query)]) == 2  # the owner sees its study
    series = identifier("SERIES", StudyInstanceUID=archive.study, SeriesInstanceUID="")
    assert [s for s, _ in c_find(archive, series, aet="OTHER")] == [0x0000]
    assert findscu(archive, tmp_path / "o", "QueryRetrieveLevel=STUDY", aet="OTHER") == []


def dcmtk_retrieve_study(archive: Archive, tool: str, *options: str) -> None:
    """movescu or getscu (Study Root) of the archive's study, as QRSCU."""
    done = dcmtk(
        tool, "-S", "-aet", "QRSCU", "-aec", "CARINA", *options,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={archive.study}",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def assert_the_stored_study(archive: Archive, retrieved: list[Dataset]) -> None:
    """retrieved is every instance of the study, with the pixel data WADO-RS serves."""
    got = {str(ds.SOPInstanceUID): ds for ds in retrieved}
    assert sorted(got) == sorted(archive.sops)
    pixels = wado_pixels(archive)
    assert all(ds.PixelData == pixels[sop] for sop, ds in got.items())


def test_movescu_sends_every_instance_to_the_registered_destination(archive: Archive) -> None:
    archive.receiver.received.clear()
    dcmtk_retrieve_study(archive, "movescu", "-aem", "DEST")
    assert_the_stored_study(archive, archive.receiver.received)
    for ds in archive.receiver.received:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # as stored


def test_pynetdicom_c_move_of_one_series_reports_completed_sub_operations(
    archive: Archive,
) -> None:
    archive.receiver.received.clear()
    series, count = next(iter(archive.series.items()))
    query = identifier("SERIES", StudyInstanceUID=archive.study, SeriesInstanceUID=series)
    final = c_move(archive, query, "DEST")
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (count, 0)
    assert {ds.SeriesInstanceUID for ds in archive.receiver.received} == {series}
    assert len(archive.receiver.received) == count


def test_c_move_to_an_unknown_or_other_collection_destination_fails_a801(
    archive: Archive,
) -> None:
    query = identifier("STUDY", StudyInstanceUID=archive.study)
    for destination in ("NOWHERE", "DESTB", "OTHER"):
        assert c_move(archive, query, destination).Status == 0xA801, destination


def test_c_move_of_another_collections_study_sends_nothing(archive: Archive) -> None:
    # DESTB is registered for OTHER's collection but listens nowhere: no association is tried
    # when nothing matches.
    query = identifier("STUDY", StudyInstanceUID=archive.study)
    status = c_move(archive, query, "DESTB", aet="OTHER")
    assert status.Status == 0x0000
    assert status.NumberOfCompletedSuboperations == 0


def test_getscu_retrieves_every_instance_over_the_same_association(
    archive: Archive, tmp_path: Path
) -> None:
    dcmtk_retrieve_study(archive, "getscu", "-od", str(tmp_path))
    assert_the_stored_study(archive, [dcmread(p) for p in tmp_path.iterdir()])


def test_pynetdicom_c_get_of_listed_images_retrieves_exactly_those(archive: Archive) -> None:
    requestor = Receiver("QRSCU", 0)  # C-GET: the requestor receives over its association
    series, _ = next(iter(archive.series.items()))
    query = identifier(
        "IMAGE", StudyInstanceUID=archive.study, SeriesInstanceUID=series, SOPInstanceUID=""
    )
    wanted = [str(ds.SOPInstanceUID) for _, ds in c_find(archive, query) if ds is not None][:2]
    query.SOPInstanceUID = wanted
    final = c_get(archive, query, requestor.on_store)
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 2
    assert sorted(str(ds.SOPInstanceUID) for ds in requestor.received) == sorted(wanted)


def test_c_get_without_storage_role_reports_failed_sub_operations(archive: Archive) -> None:
    final = c_get(archive, identifier("STUDY", StudyInstanceUID=archive.study))
    # PS3.4 C.4.3.1.4: every sub-operation failed -> Failure 0xA702, counts in the response.
    assert final.Status == 0xA702
    assert final.NumberOfFailedSuboperations == len(archive.sops)
    assert final.NumberOfCompletedSuboperations == 0


def test_c_move_without_the_study_of_a_series_fails_a900_with_a_comment(archive: Archive) -> None:
    query = identifier("SERIES", SeriesInstanceUID=next(iter(archive.series)))
    final = c_move(archive, query, "DEST")
    assert final.Status == 0xA900
    assert "StudyInstanceUID" in final.ErrorComment
    assert final.NumberOfCompletedSuboperations == 0


def test_c_cancel_stops_a_c_get_after_the_current_sub_operation(archive: Archive) -> None:
    received: list[Dataset] = []

    def on_store(event: Event) -> int:
        received.append(event.dataset)
        if len(received) == 1:  # C-GET-CANCEL before acknowledging the first instance
            cx = next(
                c
                for c in event.assoc.accepted_contexts
                if c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
            )
            event.assoc.send_c_cancel(1, cx.context_id)
        return 0x0000

    final = c_get(archive, identifier("STUDY", StudyInstanceUID=archive.study), on_store)
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfRemainingSuboperations == len(archive.sops) - 1
    assert len(received) == 1


@pytest.fixture(scope="module")
def orthanc(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc with its DICOM server on, knowing Carina as modality `carina`; registered in
    Carina as ORTHANC for COLLECTION."""
    with running_orthanc(
        DicomServerEnabled=True,
        DicomAet="ORTHANC",
        DicomModalities={"carina": ["CARINA", "127.0.0.1", archive.port]},
    ) as server:
        cli_dir = tmp_path_factory.mktemp("cli-orthanc")
        done = run_cli(
            archive.database_url, cli_dir, "ae", "add", "ORTHANC", "--collection", COLLECTION,
            "--host", "127.0.0.1", "--port", str(server.config["DicomPort"]),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        yield server


def test_orthanc_queries_and_moves_a_study_from_carina(
    archive: Archive, orthanc: OrthancServer
) -> None:
    r = requests.post(
        f"{orthanc.base}/modalities/carina/query",
        json={"Level": "Study", "Query": {"StudyInstanceUID": archive.study}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    query_id = r.json()["ID"]
    answers = requests.get(f"{orthanc.base}/queries/{query_id}/answers", timeout=30).json()
    assert len(answers) == 1
    r = requests.post(
        f"{orthanc.base}/queries/{query_id}/retrieve",
        json={"TargetAet": "ORTHANC", "Synchronous": True},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    studies = requests.get(f"{orthanc.base}/studies?expand", timeout=30).json()
    [study] = [s for s in studies if s["MainDicomTags"]["StudyInstanceUID"] == archive.study]
    instances = requests.get(f"{orthanc.base}/studies/{study['ID']}/instances", timeout=30)
    assert len(instances.json()) == len(archive.sops)


def test_orthanc_stores_an_instance_to_carina_deidentified(
    archive: Archive, orthanc: OrthancServer
) -> None:
    phi = Phi()
    [ds] = ct_series(phi, 1, rows=16, columns=16)
    r = requests.post(f"{orthanc.base}/instances", data=to_bytes(ds), timeout=30)
    assert r.status_code == 200, r.text
    r = requests.post(
        f"{orthanc.base}/modalities/carina/store",
        json={"Resources": [r.json()["ID"]], "Synchronous": True},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert r.json()["FailedInstancesCount"] == 0  # Carina's 0xB000 warning is a success here
    wait_for_series(archive.server.database_url)
    study = uid_in(COLLECTION, phi.study_uid)  # de-identified on intake, into COLLECTION
    found = archive.server.http.get(
        f"{archive.server.dicomweb}/studies?StudyInstanceUID={study}&includefield=PatientID",
        timeout=30,
    )
    assert len(found.json()) == 1
    assert phi.patient_id not in found.text and phi.patient_name not in found.text
