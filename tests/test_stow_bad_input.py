"""Bad STOW-RS input gets a clear refusal with a reason, never a 500, and never loses the good
parts of the same request."""

from __future__ import annotations

import pytest
import requests
from pydicom.uid import generate_uid

from tests.conftest import Server, intake_leftovers, wait_for_series
from tests.factory import Phi, ct_instance, ct_series, to_bytes

pytestmark = pytest.mark.slow

CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH = 0xA900
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XyZ'


def body(*parts: bytes | tuple[str, bytes], close: bool = True) -> bytes:
    """A multipart/related body; a part is bytes (application/dicom) or (type, bytes)."""
    out = b""
    for p in parts:
        ctype, data = p if isinstance(p, tuple) else ("application/dicom", p)
        out += f"--XyZ\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return out + (b"--XyZ--\r\n" if close else b"")


def stow(
    server: Server, data: bytes, study: str | None = None, content_type: str = MULTIPART
) -> requests.Response:
    url = f"{server.dicomweb}/studies" + (f"/{study}" if study else "")
    return server.http.post(url, data=data, headers={"Content-Type": content_type}, timeout=60)


def failures(r: requests.Response) -> list[tuple[int, str]]:
    items = r.json().get("00081198", {}).get("Value", [])
    return [(i["00081197"]["Value"][0], i["00091001"]["Value"][0]) for i in items]


def stored(r: requests.Response) -> list[str]:
    return [i["00081155"]["Value"][0] for i in r.json().get("00081199", {}).get("Value", [])]


def good(n: int = 2) -> list[bytes]:
    return [to_bytes(ds) for ds in ct_series(Phi(), n)]


def test_non_dicom_part_is_refused_and_the_others_stored(server: Server) -> None:
    a, b = good()
    r = stow(server, body(a, b"this is not DICOM at all" * 20, b))
    assert r.status_code == 202
    assert len(stored(r)) == 2
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert "not a DICOM" in reason


def test_truncated_pixel_data_is_refused_with_reason(server: Server) -> None:
    a, b = good()
    r = stow(server, body(a, b[: len(b) - 1000]))
    assert r.status_code == 202
    assert len(stored(r)) == 1
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert "truncated" in reason or "cannot parse" in reason


def test_file_cut_inside_the_header_is_refused(server: Server) -> None:
    a, b = good()
    r = stow(server, body(a, b[:400]))
    assert r.status_code == 202
    [(code, _)] = failures(r)
    assert code == CANNOT_UNDERSTAND


@pytest.mark.parametrize(
    "missing", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"]
)
def test_instance_missing_a_required_uid_is_refused(server: Server, missing: str) -> None:
    ds = ct_instance(Phi(), 1)
    delattr(ds, missing)
    r = stow(server, body(to_bytes(ds), good(1)[0]))
    assert r.status_code == 202
    [(code, reason)] = failures(r)
    assert code == DOES_NOT_MATCH
    assert missing in reason


def test_all_parts_refused_answers_409(server: Server) -> None:
    r = stow(server, body(b"garbage", b"more garbage"))
    assert r.status_code == 409
    assert len(failures(r)) == 2
    assert "00081199" not in r.json()


def test_part_of_another_media_type_is_refused(server: Server) -> None:
    a = good(1)[0]
    r = stow(server, body(a, ("application/json", b'{"not": "dicom"}')))
    assert r.status_code == 202
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert "application/json" in reason


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        'multipart/related; type="application/pdf"; boundary=XyZ',
        "text/plain",
    ],
)
def test_wrong_content_type_is_415(server: Server, content_type: str) -> None:
    r = stow(server, body(*good(1)), content_type=content_type)
    assert r.status_code == 415
    assert r.json()["error"]


def test_missing_boundary_is_400(server: Server) -> None:
    r = stow(server, body(*good(1)), content_type='multipart/related; type="application/dicom"')
    assert r.status_code == 400


def test_body_without_parts_is_400(server: Server) -> None:
    assert stow(server, b"--XyZ--\r\n").status_code == 400
    assert stow(server, b"").status_code == 400
    assert stow(server, b"no multipart here").status_code == 400


def test_body_cut_mid_part_keeps_the_complete_parts(server: Server) -> None:
    a, b = good()
    data = (
        body(a).removesuffix(b"--XyZ--\r\n") + b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n"
    )
    r = stow(server, data + b[:5000])
    assert r.status_code == 202
    assert len(stored(r)) == 1
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert "closing boundary" in reason


def test_study_level_stow_refuses_instance_of_another_study(server: Server) -> None:
    phi = Phi()
    mine = ct_instance(phi, 1)
    other = ct_instance(Phi(), 1)
    r = stow(server, body(to_bytes(mine), to_bytes(other)), study=phi.study_uid)
    assert r.status_code == 202
    assert len(stored(r)) == 1
    [(code, reason)] = failures(r)
    assert code == DOES_NOT_MATCH
    assert "another study" in reason
    # The study can also be named by its de-identified UID.
    study = r.json()["00081190"]["Value"][0].rsplit("/", 1)[1]
    again = stow(server, body(to_bytes(ct_instance(phi, 2))), study=study)
    assert again.status_code == 202  # stored, coerced


def test_refused_parts_leave_nothing_behind(server: Server) -> None:
    r = stow(server, body(b"garbage", good(1)[0][:3000]))
    assert r.status_code == 409
    assert not intake_leftovers(server.data_dir)
    assert not any((server.data_dir / "staging").iterdir())


def test_every_acknowledged_instance_can_be_retrieved(server: Server) -> None:
    parts = good(3)
    r = stow(server, body(parts[0], b"junk", parts[1], parts[2][:100], parts[2]))
    assert r.status_code == 202
    wait_for_series(server.database_url)
    for item in r.json()["00081199"]["Value"]:
        url = item["00081190"]["Value"][0]
        got = server.http.get(
            url, headers={"Accept": 'multipart/related; type="application/dicom"'}
        )
        assert got.status_code == 200, url


def test_unknown_sop_instance_is_404_not_500(server: Server) -> None:
    uid = generate_uid()
    r = server.http.get(f"{server.dicomweb}/studies/{uid}")
    assert r.status_code == 404
    r = server.http.get(f"{server.dicomweb}/studies/{uid}/metadata")
    assert r.status_code == 404
