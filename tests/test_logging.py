"""The server log names events, never identifying values a client sent (PS3.15 spirit: nothing
identified is logged), not even the original UIDs in a study-level STOW path."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Server
from tests.factory import Phi, ct_instance, to_bytes

pytestmark = pytest.mark.slow


def test_requests_are_logged_by_route_without_uids_or_query_values(server: Server) -> None:
    phi = Phi()
    body = (
        b"--B\r\nContent-Type: application/dicom\r\n\r\n"
        + to_bytes(ct_instance(phi, 1, rows=16, columns=16))
        + b"\r\n--B--\r\n"
    )
    r = server.http.post(
        f"{server.dicomweb}/studies/{phi.study_uid}",
        data=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'},
    )
    assert r.status_code == 202, r.text  # stored, coerced
    server.http.get(f"{server.dicomweb}/studies", params={"PatientName": phi.patient_name})
    server.http.get(f"{server.dicomweb}/studies/{phi.study_uid}/metadata")
    time.sleep(0.5)  # let the log lines reach the file
    log = server.log.read_text(errors="replace")
    assert "/dicomweb/studies/{study}" in log  # the request is still logged, by its route
    for value in (phi.study_uid, phi.patient_name, phi.patient_name.split("^")[0]):
        assert value not in log


def test_malformed_identified_values_are_not_quoted_in_the_log(server: Server) -> None:
    """pydicom's validation warnings quote the value they complain about; the originals
    Carina parses are identified, so none of that may reach the log."""
    phi = Phi()
    ds = ct_instance(phi, 1, rows=16, columns=16)
    ds.PatientBirthDate = "1958-03-14"  # DA in the wrong format: pydicom would warn, quoting it
    ds.OperatorsName = "TECHNICIAN^" + "Q" * 70  # over-long PN component group
    ds.ImageComments = "WRONG\x01CONTROL CHARACTER NOTE"
    # An original UID that breaks the UI rules: pydicom quotes it when it reads it.
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1958.SMITHERSONFRAME"
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(ds) + b"\r\n--B--\r\n"
    r = server.http.post(
        f"{server.dicomweb}/studies",
        data=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'},
    )
    assert r.status_code == 202, r.text  # stored, coerced
    time.sleep(0.5)
    log = server.log.read_text(errors="replace")
    for value in ("1958-03-14", "Q" * 20, "CONTROL CHARACTER", "SMITHERSONFRAME", phi.patient_name):
        assert value not in log
