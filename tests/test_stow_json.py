"""STOW-RS of DICOM JSON metadata plus bulk data parts (PS3.18 10.5.1.2), sent as raw HTTP:
dicomweb-client only sends application/dicom parts. Stored instances go through the same
intake as Part 10 ones: de-identified, retrievable with the pixels that were sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from pydicom import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from tests.conftest import Server
from tests.factory import Phi, ct_instance
from tests.test_stow_bad_input import failures, stored

pytestmark = pytest.mark.slow

CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH = 0xA900
JSON_MULTIPART = 'multipart/related; type="application/dicom+json"; boundary=XyZ'
OCTET = "application/octet-stream"

Part = tuple[dict[str, str], bytes]


def body(*parts: Part) -> bytes:
    """A multipart/related body of parts given as (headers, content)."""
    out = b""
    for headers, data in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out += f"--XyZ\r\n{head}\r\n".encode() + data + b"\r\n"
    return out + b"--XyZ--\r\n"


def metadata(*instances: dict) -> Part:
    return {"Content-Type": "application/dicom+json"}, json.dumps(list(instances)).encode()


def bulk(location: str, data: bytes, ctype: str = OCTET) -> Part:
    return {"Content-Type": ctype, "Content-Location": location}, data


def as_json(ds: Dataset, prefix: str) -> dict:
    """ds in DICOM JSON, each binary value over 1 KB as a BulkDataURI under prefix."""
    return ds.to_json_dict(1024, lambda elem: f"{prefix}/{elem.tag:08X}")


def stow(server: Server, data: bytes, content_type: str = JSON_MULTIPART) -> requests.Response:
    r = server.http.post(
        f"{server.dicomweb}/studies", data=data, headers={"Content-Type": content_type}, timeout=60
    )
    server.settled()
    return r


def retrieve(server: Server, r: requests.Response, transfer_syntax: str | None = None) -> Dataset:
    """The instance a STOW response names, from its Retrieve URL."""
    url = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    st, se, sop = url.split("/")[-5], url.split("/")[-3], url.split("/")[-1]
    media = (("application/dicom", transfer_syntax),) if transfer_syntax else None
    return server.client().retrieve_instance(st, se, sop, media_types=media)


def test_json_stow_with_native_pixel_data_retrieves_the_same_pixels(server: Server) -> None:
    phi = Phi()
    ds = ct_instance(phi, 1, rows=64, columns=48)
    r = stow(server, body(metadata(as_json(ds, "urn:a")), bulk("urn:a/7FE00010", ds.PixelData)))
    assert r.status_code in (200, 202), r.text
    assert "00081198" not in r.json()
    got = retrieve(server, r)
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # The same intake as a Part 10 instance: de-identified.
    assert got.SOPInstanceUID.startswith("2.25.")
    assert str(got.PatientName) != phi.patient_name
    assert not any(s.encode() in got.PatientName.original_string for s in phi.strings())
    assert "AccessionNumber" not in got or got.AccessionNumber != phi.accession


def test_json_stow_with_compressed_pixel_data_keeps_it_compressed(server: Server) -> None:
    ds = ct_instance(Phi(), 1, rows=32, columns=32)
    pixels = ds.pixel_array.copy()
    ds.compress(RLELossless)
    [frame] = list(generate_frames(ds.PixelData, number_of_frames=1))
    meta = as_json(ds, "urn:b")
    parts = (metadata(meta), bulk("urn:b/7FE00010", frame, "image/dicom-rle"))
    r = stow(server, body(*parts))
    assert r.status_code in (200, 202), r.text
    as_stored = retrieve(server, r, "*")
    assert as_stored.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(as_stored.pixel_array, pixels)
    assert np.array_equal(retrieve(server, r).pixel_array, pixels)  # decoded when asked


def test_compressed_frames_come_one_per_part_under_one_location(server: Server) -> None:
    ds = ct_instance(Phi(), 1, rows=32, columns=32)
    rng = np.random.default_rng(7)
    frames = rng.integers(-1024, 3000, size=(2, 32, 32), dtype=np.int16)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    ds.compress(RLELossless)
    meta = as_json(ds, "urn:mf")
    encoded = generate_frames(ds.PixelData, number_of_frames=2)
    parts = [bulk("urn:mf/7FE00010", f, "image/dicom-rle") for f in encoded]
    r = stow(server, body(metadata(meta), *parts))
    assert r.status_code in (200, 202), r.text
    got = retrieve(server, r, "*")
    assert got.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(got.pixel_array, frames)


def test_relative_bulk_data_uris_match_relative_content_locations(server: Server) -> None:
    ds = ct_instance(Phi(), 2)
    parts = (metadata(as_json(ds, "bulk/1")), bulk("bulk/1/7FE00010", ds.PixelData))
    r = stow(server, body(*parts))
    assert r.status_code in (200, 202), r.text
    assert np.array_equal(retrieve(server, r).pixel_array, ds.pixel_array)


def test_bulk_data_uri_without_its_part_is_refused_and_the_others_stored(server: Server) -> None:
    good, lost = ct_instance(Phi(), 1), ct_instance(Phi(), 2)
    parts = (
        metadata(as_json(good, "urn:g"), as_json(lost, "urn:lost")),
        bulk("urn:g/7FE00010", good.PixelData),
    )
    r = stow(server, body(*parts))
    assert r.status_code == 202
    assert len(stored(r)) == 1
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert "Content-Location" in reason
    [item] = r.json()["00081198"]["Value"]
    assert item["00081155"]["Value"] == [lost.SOPInstanceUID]  # the sender's own UID


@pytest.mark.parametrize("missing", ["00080016", "00080018"])
def test_json_instance_without_sop_uid_is_refused(server: Server, missing: str) -> None:
    ds = ct_instance(Phi(), 1)
    meta = as_json(ds, "urn:m")
    del meta[missing]
    r = stow(server, body(metadata(meta), bulk("urn:m/7FE00010", ds.PixelData)))
    assert r.status_code == 409
    [(code, reason)] = failures(r)
    assert code == DOES_NOT_MATCH
    assert "missing required" in reason


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"this is not JSON", "not JSON"),
        (b'{"00100010": {"vr": "PN"}}', "array"),
        (b"[]", "array"),
        (b'[{"00100010": "SMITH"}]', "DICOM JSON"),
        (b'[{"00100010": {"Value": ["SMITH"]}}]', "DICOM JSON"),
        (b'[{"7FE00010": {"vr": "OW", "InlineBinary": "!!not base64!!"}}]', "DICOM JSON"),
    ],
)
def test_metadata_that_is_not_dicom_json_is_refused_with_a_reason(
    server: Server, content: bytes, why: str
) -> None:
    r = stow(server, body(({"Content-Type": "application/dicom+json"}, content)))
    assert r.status_code == 409
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert why in reason


def test_compressed_frame_count_must_match_the_parts(server: Server) -> None:
    ds = ct_instance(Phi(), 1, rows=32, columns=32)
    ds.compress(RLELossless)
    [frame] = list(generate_frames(ds.PixelData, number_of_frames=1))
    meta = as_json(ds, "urn:f")
    meta["00280008"] = {"vr": "IS", "Value": [2]}
    r = stow(server, body(metadata(meta), bulk("urn:f/7FE00010", frame, "image/dicom-rle")))
    assert r.status_code == 409
    [(code, reason)] = failures(r)
    assert code == DOES_NOT_MATCH
    assert "2 frames but 1" in reason


def test_bulk_data_of_an_unsupported_media_type_is_refused(server: Server) -> None:
    ds = ct_instance(Phi(), 1)
    parts = (metadata(as_json(ds, "urn:v")), bulk("urn:v/7FE00010", ds.PixelData, "video/mp4"))
    r = stow(server, body(*parts))
    assert r.status_code == 409
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert "video/mp4" in reason


def test_first_part_that_is_not_metadata_is_refused(server: Server) -> None:
    ds = ct_instance(Phi(), 1)
    r = stow(server, body(bulk("urn:x/7FE00010", ds.PixelData)))
    assert r.status_code == 409
    [(_, reason)] = failures(r)
    assert "metadata" in reason


@pytest.mark.parametrize("data", [b"", b"no multipart here at all"])
def test_json_body_that_cannot_be_parsed_is_400(server: Server, data: bytes) -> None:
    r = stow(server, data)
    assert r.status_code == 400
    assert r.json()["error"]


def test_stored_instances_carry_the_coercion_warning_with_202(server: Server) -> None:
    # PS3.18 10.5.3: de-identification coerced them; Table 10.5.3-1: warnings answer 202.
    ds = ct_instance(Phi(), 1)
    r = stow(server, body(metadata(as_json(ds, "urn:w")), bulk("urn:w/7FE00010", ds.PixelData)))
    assert r.status_code == 202
    [item] = r.json()["00081199"]["Value"]
    assert item["00081196"] == {"vr": "US", "Value": [0xB000]}
    # The same for Part 10 instances, and dicomweb-client takes it as stored.
    response = server.client().store_instances([ct_instance(Phi(), 1), ct_instance(Phi(), 2)])
    assert [i.WarningReason for i in response.ReferencedSOPSequence] == [0xB000, 0xB000]
    assert "FailedSOPSequence" not in response


def test_json_body_cut_short_refuses_the_instance_waiting_for_its_part(server: Server) -> None:
    ds = ct_instance(Phi(), 1)
    data = body(metadata(as_json(ds, "urn:c")), bulk("urn:c/7FE00010", ds.PixelData))
    r = stow(server, data[: len(data) - 3000])
    assert r.status_code == 409
    [(code, reason)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert "closing boundary" in reason
