"""Interoperability with a real DICOMweb peer: Orthanc's DICOMweb plugin, configured with Carina
as a remote server, searches Carina (QIDO-RS), retrieves a study from it into Orthanc (WADO-RS)
and sends Orthanc's instances to it (STOW-RS)."""

from __future__ import annotations

from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO

import pytest
import requests
from pydicom import Dataset, dcmread

from bench.servers import OrthancServer
from tests.conftest import Server, running_orthanc
from tests.factory import Phi, ct_series, to_bytes
from tests.test_wado_frames import multiframe_ct, store

pytestmark = pytest.mark.slow
TIMEOUT = 120
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def study(server: Server) -> tuple[str, list[str]]:
    """(study, SOP Instance UIDs) of a de-identified study in Carina: a CT series of three
    and a multi-frame CT."""
    phi = Phi()
    sent = ct_series(phi, 3, rows=16, columns=16)
    server.client().store_instances(sent[1:])
    server.settled()
    st, _, first = store(server, sent[0])
    frames = multiframe_ct(Phi(study_uid=phi.study_uid))
    sop = store(server, frames)[2]
    sops = [i["00080018"]["Value"][0] for i in carina_instances(server, st)]
    assert first in sops and sop in sops and len(sops) == 4
    return st, sops


@pytest.fixture(scope="module")
def orthanc(server: Server) -> Iterator[OrthancServer]:
    """Orthanc whose DICOMweb plugin knows Carina's root as server `carina`."""
    with running_orthanc(
        DicomWeb={
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {"carina": {"Url": server.dicomweb, "HttpHeaders": server.auth}},
        }
    ) as o:
        yield o


def carina_instances(server: Server, study: str) -> list[dict]:
    r = server.http.get(f"{server.dicomweb}/studies/{study}/instances", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def carina_files(server: Server, study: str) -> dict[str, Dataset]:
    """Carina's stored instances of a study, by SOP Instance UID, as WADO-RS sends them."""
    r = server.http.get(
        f"{server.dicomweb}/studies/{study}", headers={"Accept": AS_STORED}, timeout=TIMEOUT
    )
    assert r.status_code == 200
    head = f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + r.content)
    files = [dcmread(BytesIO(p.get_payload(decode=True))) for p in msg.iter_parts()]
    return {ds.SOPInstanceUID: ds for ds in files}


def orthanc_file(orthanc: OrthancServer, instance_id: str) -> Dataset:
    r = requests.get(f"{orthanc.base}/instances/{instance_id}/file", timeout=TIMEOUT)
    assert r.status_code == 200
    return dcmread(BytesIO(r.content))


def test_orthanc_lists_carina_as_a_dicomweb_server(orthanc: OrthancServer) -> None:
    r = requests.get(f"{orthanc.base}/dicom-web/servers/", timeout=TIMEOUT)
    assert "carina" in r.json()


def test_orthanc_searches_carina(server: Server, orthanc: OrthancServer, study: tuple) -> None:
    st, sops = study
    r = requests.post(
        f"{orthanc.base}/dicom-web/servers/carina/get",
        json={"Uri": "/studies", "Arguments": {"StudyInstanceUID": st}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    [found] = r.json()
    assert found["0020000D"]["Value"] == [st]
    assert found["00201208"]["Value"] == [len(sops)]  # NumberOfStudyRelatedInstances
    r = requests.post(
        f"{orthanc.base}/dicom-web/servers/carina/get",
        json={"Uri": f"/studies/{st}/instances"},
        timeout=TIMEOUT,
    )
    assert sorted(i["00080018"]["Value"][0] for i in r.json()) == sorted(sops)


def test_orthanc_retrieves_a_study_from_carina_intact(
    server: Server, orthanc: OrthancServer, study: tuple
) -> None:
    st, sops = study
    r = requests.post(
        f"{orthanc.base}/dicom-web/servers/carina/retrieve",
        json={"Resources": [{"Study": st}]},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    [o_study] = [
        s
        for s in requests.get(f"{orthanc.base}/studies?expand", timeout=TIMEOUT).json()
        if s["MainDicomTags"]["StudyInstanceUID"] == st
    ]
    ids = requests.get(f"{orthanc.base}/studies/{o_study['ID']}/instances", timeout=TIMEOUT)
    received = {
        ds.SOPInstanceUID: ds for ds in (orthanc_file(orthanc, i["ID"]) for i in ids.json())
    }
    assert sorted(received) == sorted(sops)
    for sop, ds in carina_files(server, st).items():
        got = received[sop]
        assert got.PixelData == ds.PixelData, sop
        assert got == ds, sop  # every element, not only the pixels


def test_orthanc_stores_its_instances_into_carina(
    server: Server, orthanc: OrthancServer, study: tuple
) -> None:
    phi = Phi()
    sent = ct_series(phi, 2, rows=16, columns=16)
    ids = []
    for ds in sent:
        r = requests.post(f"{orthanc.base}/instances", data=to_bytes(ds), timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        ids.append(r.json()["ID"])
    before = {
        s["0020000D"]["Value"][0] for s in server.http.get(f"{server.dicomweb}/studies").json()
    }
    r = requests.post(
        f"{orthanc.base}/dicom-web/servers/carina/stow", json={"Resources": ids}, timeout=TIMEOUT
    )
    assert r.status_code == 200, r.text
    after = {
        s["0020000D"]["Value"][0] for s in server.http.get(f"{server.dicomweb}/studies").json()
    }
    [new] = after - before  # de-identified on intake: a new, remapped Study Instance UID
    stored = sorted(carina_files(server, new).values(), key=lambda ds: ds.InstanceNumber)
    assert [ds.PixelData for ds in stored] == [ds.PixelData for ds in sent]
    for ds in stored:
        assert ds.PatientName != phi.patient_name and ds.PatientID != phi.patient_id
        assert ds.StudyInstanceUID != phi.study_uid
