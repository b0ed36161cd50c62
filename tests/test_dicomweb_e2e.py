"""End to end over real HTTP: STOW identified studies with dicomweb-client, find them with QIDO,
retrieve them with WADO, and prove no planted PHI survives anywhere Carina writes or serves."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import date
from io import BytesIO
from pathlib import Path

import psycopg
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from tests.conftest import Server, intake_leftovers, wait_for_series
from tests.factory import Phi, ct_series, to_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server: Server) -> DICOMwebClient:
    return server.client()


@pytest.fixture(scope="module")
def stowed(client: DICOMwebClient, database_url: str) -> tuple[Phi, list, dict]:
    """One identified study of 4 CT images, stored through dicomweb-client and published."""
    phi = Phi()
    sent = ct_series(phi, 4)
    response = client.store_instances(sent)
    assert set(wait_for_series(database_url).values()) == {"published"}
    return phi, sent, response.to_json_dict()


def _assert_no_phi(blob: bytes | str, phi: Phi, where: str) -> None:
    text = blob.decode("latin-1") if isinstance(blob, bytes) else blob
    for s in phi.strings():
        assert s not in text, f"planted {s!r} found in {where}"


def test_stow_response_references_every_stored_instance(stowed: tuple) -> None:
    _, sent, body = stowed
    refs = body["00081199"]["Value"]
    assert len(refs) == len(sent)
    assert "00081198" not in body
    for item in refs:
        assert item["00081155"]["Value"][0].startswith("2.25.")
        assert "/instances/" in item["00081190"]["Value"][0]


def test_qido_finds_study_with_deidentified_attributes(
    stowed: tuple, client: DICOMwebClient
) -> None:
    phi, sent, _ = stowed
    studies = client.search_for_studies()
    assert len(studies) == 1
    study = studies[0]
    _assert_no_phi(json.dumps(study), phi, "QIDO study result")
    assert study["00201208"]["Value"] == [len(sent)]
    assert study["00080061"]["Value"] == ["CT"]
    assert study["0020000D"]["Value"][0].startswith("2.25.")


def test_wado_returns_pixel_data_unchanged_and_no_planted_phi(
    stowed: tuple, client: DICOMwebClient, server: Server
) -> None:
    phi, sent, _ = stowed
    study_uid = client.search_for_studies()[0]["0020000D"]["Value"][0]
    got = client.retrieve_study(study_uid)
    assert len(got) == len(sent)
    by_number = {int(ds.InstanceNumber): ds for ds in got}
    for original in sent:
        ds = by_number[int(original.InstanceNumber)]
        assert ds.PixelData == original.PixelData
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.SOPInstanceUID != original.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # Dates move back by one per-patient offset: intervals between them are kept.
        assert ds.StudyDate < original.StudyDate
        assert ds.PatientName == ds.PatientID != ""
    # The raw bytes as served, not only what pydicom shows.
    r = server.http.get(
        f"{server.dicomweb}/studies/{study_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert r.status_code == 200
    _assert_no_phi(r.content, phi, "WADO-RS study retrieve")


def test_metadata_has_no_planted_phi_and_one_entry_per_instance(
    stowed: tuple, client: DICOMwebClient, server: Server
) -> None:
    phi, sent, _ = stowed
    study_uid = client.search_for_studies()[0]["0020000D"]["Value"][0]
    meta = client.retrieve_study_metadata(study_uid)
    assert len(meta) == len(sent)
    assert all("7FE00010" in m and "BulkDataURI" in m["7FE00010"] for m in meta)
    _assert_no_phi(json.dumps(meta), phi, "WADO-RS metadata")
    series_uid = meta[0]["0020000E"]["Value"][0]
    sop_uid = meta[0]["00080018"]["Value"][0]
    assert len(client.retrieve_series_metadata(study_uid, series_uid)) == len(sent)
    one = client.retrieve_instance_metadata(study_uid, series_uid, sop_uid)
    assert one["00080018"]["Value"] == [sop_uid]


def test_nothing_identified_is_written_to_store_database_or_log(
    stowed: tuple, server: Server, database_url: str
) -> None:
    phi, _, _ = stowed
    files = [p for p in server.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".dcm" for p in files)
    for p in files:
        if p.name != "secret.key":
            _assert_no_phi(p.read_bytes(), phi, str(p))
    # Nothing left behind in the intake and staging areas once the request is answered.
    assert not intake_leftovers(server.data_dir)
    assert not any((server.data_dir / "staging").iterdir())
    with psycopg.connect(database_url) as conn:
        for table in ("patients", "studies", "series", "instances"):
            rows = conn.execute(f"SELECT row_to_json(t)::text FROM {table} t").fetchall()
            assert rows
            _assert_no_phi("\n".join(r[0] for r in rows), phi, f"table {table}")
    _assert_no_phi(server.log.read_bytes(), phi, "server log")


def test_retrieved_instances_parse_with_dcmtk(
    stowed: tuple, client: DICOMwebClient, tmp_path: Path
) -> None:
    """An independent parser (dcmtk's dcmdump) reads what Carina serves."""
    dcmdump = shutil.which("dcmdump")
    assert dcmdump, "dcmtk is installed by scripts/test"
    phi, _, _ = stowed
    study_uid = client.search_for_studies()[0]["0020000D"]["Value"][0]
    for i, ds in enumerate(client.retrieve_study(study_uid)):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = subprocess.run([dcmdump, "-q", str(path)], capture_output=True, text=True, check=True)
        assert "PatientIdentityRemoved" in out.stdout
        _assert_no_phi(out.stdout, phi, "dcmdump output")


def test_resending_same_study_stores_each_instance_once(
    stowed: tuple, client: DICOMwebClient, server: Server
) -> None:
    _, sent, first = stowed
    again = client.store_instances(sent).to_json_dict()
    wait_for_series(server.database_url)
    uids = sorted(i["00081155"]["Value"][0] for i in first["00081199"]["Value"])
    assert sorted(i["00081155"]["Value"][0] for i in again["00081199"]["Value"]) == uids
    study_uid = client.search_for_studies()[0]["0020000D"]["Value"][0]
    assert len(client.search_for_instances(study_uid)) == len(sent)
    stored = list((server.data_dir / "objects").rglob("*.dcm"))
    assert len([p for p in stored if p.stem in uids]) == len(sent)


def _stow_one(client: DICOMwebClient, server: Server, phi: Phi) -> str:
    """Store one instance of phi's study; return the de-identified StudyInstanceUID once
    published."""
    body = client.store_instances(ct_series(phi, 1)).to_json_dict()
    wait_for_series(server.database_url)
    return body["00081190"]["Value"][0].rsplit("/", 1)[1]


def test_same_patient_in_two_requests_gets_same_pseudonym_and_date_shift(
    client: DICOMwebClient, server: Server
) -> None:
    study_a = _stow_one(client, server, Phi(patient_id="MRN-SAME-1", study_date="20230101"))
    study_b = _stow_one(client, server, Phi(patient_id="MRN-SAME-1", study_date="20230301"))
    other = _stow_one(client, server, Phi(patient_id="MRN-OTHER-2", study_date="20230101"))
    a, b, c = (client.retrieve_study(s)[0] for s in (study_a, study_b, other))
    assert a.PatientID == b.PatientID != c.PatientID

    def day(v: str) -> date:
        return date(int(v[:4]), int(v[4:6]), int(v[6:]))

    # 59 days apart as sent, 59 days apart as stored; another patient moves differently.
    assert (day(b.StudyDate) - day(a.StudyDate)).days == 59
    assert a.StudyDate != c.StudyDate


def test_stowed_bytes_round_trip_through_plain_http(server: Server) -> None:
    """The same flow with requests and a hand-built multipart body (curl-like clients)."""
    phi = Phi()
    ds = ct_series(phi, 1)[0]
    body = b"--B1\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(ds) + b"\r\n--B1--\r\n"
    r = server.http.post(
        f"{server.dicomweb}/studies",
        data=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B1'},
    )
    assert r.status_code == 202, r.text  # stored, with the coercion warning
    wait_for_series(server.database_url)
    url = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    got = server.http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("multipart/related")
    part = got.content.split(b"\r\n\r\n", 1)[1]
    parsed = dcmread(BytesIO(part))
    assert parsed.PixelData == ds.PixelData
