"""WADO-RS transfer syntax negotiation and transcoding (PS3.18 8.7.3.5) over real HTTP, and the
transcoding module on pydicom's own test files."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from carina.archive import transcode
from tests.conftest import Server
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow
DICOM_MULTIPART = 'multipart/related; type="application/dicom"'
MPEG2 = "1.2.840.10008.1.2.4.100"
# OpenJPEG encodes with 6 resolution levels, so JPEG 2000 needs both dimensions >= 32.
ROWS, COLUMNS = 40, 36


def accept(*syntaxes: str) -> dict[str, str]:
    """An Accept header listing multipart DICOM in each of syntaxes, in order."""
    return {"Accept": ", ".join(f"{DICOM_MULTIPART}; transfer-syntax={ts}" for ts in syntaxes)}


@pytest.fixture(scope="module")
def study(server: Server) -> tuple[str, list[Dataset]]:
    """(study uid, datasets sent) of one series: instance 1 in Explicit VR Little Endian,
    instance 2 RLE Lossless (compressed by pydicom before STOW, which keeps it as received)."""
    sent = ct_series(Phi(), 2, rows=ROWS, columns=COLUMNS)
    # Distinct, signed pixel values so a decoding mistake cannot go unnoticed.
    for n, ds in enumerate(sent):
        pixels = np.arange(ROWS * COLUMNS, dtype=np.int16).reshape(ROWS, COLUMNS) * (n + 3) - 1000
        ds.PixelRepresentation = 1
        ds.PixelData = pixels.astype(np.int16).tobytes()
    sent[1].compress(RLELossless, generate_instance_uid=False)
    response = server.client().store_instances(sent)
    server.settled()
    urls = {item.RetrieveURL for item in response.ReferencedSOPSequence}
    assert len(urls) == 2
    study_uid = next(iter(urls)).split("/studies/", 1)[1].split("/")[0]
    return study_uid, sent


def retrieve(server: Server, study_uid: str, headers: dict[str, str]) -> requests.Response:
    return server.http.get(f"{server.dicomweb}/studies/{study_uid}", headers=headers, timeout=60)


def parts(r: requests.Response) -> list[tuple[str, Dataset]]:
    """(transfer-syntax parameter, dataset) of each part, in instance-number order."""
    head = f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + r.content)
    out = []
    for p in msg.iter_parts():
        assert p.get_content_type() == "application/dicom"
        body = p.get_payload(decode=True)
        assert int(p["content-length"]) == len(body)
        out.append((p.get_param("transfer-syntax"), dcmread(BytesIO(body))))
    return sorted(out, key=lambda item: int(item[1].InstanceNumber))


def assert_same_pixels(got: list[tuple[str, Dataset]], sent: list[Dataset]) -> None:
    for (_, ds), original in zip(got, sent, strict=True):
        assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_explicit_le_request_decodes_rle_instance_and_keeps_pixels(
    server: Server, study: tuple
) -> None:
    study_uid, sent = study
    r = retrieve(server, study_uid, accept(ExplicitVRLittleEndian))
    assert r.status_code == 200
    got = parts(r)
    assert [ts for ts, _ in got] == [ExplicitVRLittleEndian] * 2
    assert [ds.file_meta.TransferSyntaxUID for _, ds in got] == [ExplicitVRLittleEndian] * 2
    assert_same_pixels(got, sent)


def test_implicit_le_request_is_served_in_implicit_le(server: Server, study: tuple) -> None:
    study_uid, sent = study
    got = parts(retrieve(server, study_uid, accept(ImplicitVRLittleEndian)))
    assert [ds.file_meta.TransferSyntaxUID for _, ds in got] == [ImplicitVRLittleEndian] * 2
    assert_same_pixels(got, sent)


@pytest.mark.parametrize("target", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compressed_request_encodes_every_instance_and_decodes_equal(
    server: Server, study: tuple, target: str
) -> None:
    if target not in transcode.targets():
        pytest.skip(f"no encoder installed for {target}")
    study_uid, sent = study
    r = retrieve(server, study_uid, accept(target))
    assert r.status_code == 200
    got = parts(r)
    assert [ts for ts, _ in got] == [target] * 2
    assert [ds.file_meta.TransferSyntaxUID for _, ds in got] == [target] * 2
    assert_same_pixels(got, sent)


def test_any_transfer_syntax_serves_each_instance_as_stored(server: Server, study: tuple) -> None:
    study_uid, sent = study
    got = parts(retrieve(server, study_uid, accept("*")))
    assert [ts for ts, _ in got] == [ExplicitVRLittleEndian, RLELossless]
    assert got[1][1].file_meta.TransferSyntaxUID == RLELossless
    assert_same_pixels(got, sent)


def test_transcoding_changes_only_pixel_encoding_and_transfer_syntax(
    server: Server, study: tuple
) -> None:
    study_uid, _ = study
    stored = parts(retrieve(server, study_uid, accept("*")))
    explicit = parts(retrieve(server, study_uid, accept(ExplicitVRLittleEndian)))
    for (_, before), (_, after) in zip(stored, explicit, strict=True):
        for ds in (before, after):
            del ds.PixelData
        assert before == after  # every other element, SOPInstanceUID included
        assert before.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID


@pytest.mark.parametrize("syntax", [MPEG2, JPEGBaseline8Bit, "1.2.3.4"])
def test_unsupported_or_lossy_transfer_syntax_is_406_naming_the_stored_one(
    server: Server, study: tuple, syntax: str
) -> None:
    study_uid, _ = study
    r = retrieve(server, study_uid, accept(syntax))
    assert r.status_code == 406
    error = r.json()["error"]
    assert "Explicit VR Little Endian" in error and syntax in error


def test_first_producible_item_of_the_accept_list_is_used(server: Server, study: tuple) -> None:
    study_uid, sent = study
    got = parts(retrieve(server, study_uid, accept(MPEG2, ImplicitVRLittleEndian, RLELossless)))
    assert [ts for ts, _ in got] == [ImplicitVRLittleEndian] * 2
    assert_same_pixels(got, sent)


def test_higher_q_value_wins_over_header_order(server: Server, study: tuple) -> None:
    study_uid, _ = study
    header = (
        f"{DICOM_MULTIPART}; transfer-syntax={ImplicitVRLittleEndian}; q=0.5, "
        f"{DICOM_MULTIPART}; transfer-syntax={RLELossless}"
    )
    got = parts(retrieve(server, study_uid, {"Accept": header}))
    assert [ts for ts, _ in got] == [RLELossless] * 2


def test_stored_syntax_listed_later_is_served_as_stored_per_instance(
    server: Server, study: tuple
) -> None:
    study_uid, _ = study
    # RLE first: the native instance is encoded; the RLE instance goes as stored.
    got = parts(retrieve(server, study_uid, accept(RLELossless, ExplicitVRLittleEndian)))
    assert [ts for ts, _ in got] == [RLELossless] * 2
    # Explicit first: the native instance as stored, the RLE one decoded.
    got = parts(retrieve(server, study_uid, accept(ExplicitVRLittleEndian, RLELossless)))
    assert [ts for ts, _ in got] == [ExplicitVRLittleEndian] * 2


def test_dicomweb_client_retrieves_rle_instance_as_explicit_le(
    server: Server, study: tuple
) -> None:
    study_uid, sent = study
    client = server.client()
    [item] = [
        i
        for i in client.search_for_instances(study_uid)
        if int(i["00200013"]["Value"][0]) == 2  # InstanceNumber: the RLE one
    ]
    ds = client.retrieve_instance(
        study_uid,
        item["0020000E"]["Value"][0],
        item["00080018"]["Value"][0],
        media_types=(("application/dicom", ExplicitVRLittleEndian),),
    )
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, sent[1].pixel_array)


# ------------------------------------------------------------------ the module on test files


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm", "CT_small.dcm"]
)
def test_transcode_to_every_target_keeps_pixel_values(name: str) -> None:
    path = get_testdata_file(name)
    data = open(path, "rb").read()  # noqa: SIM115 - a test file, read once
    original = dcmread(BytesIO(data))
    stored = original.file_meta.TransferSyntaxUID
    for target in transcode.targets():
        out, ts = transcode.transcode(data, stored, transcode.producible(stored, [target]))
        ds = dcmread(BytesIO(out))
        assert ts == target == ds.file_meta.TransferSyntaxUID
        assert np.array_equal(ds.pixel_array, original.pixel_array), (name, target)
        assert ds.SOPInstanceUID == original.SOPInstanceUID


def test_big_endian_and_unknown_syntaxes_are_not_decodable() -> None:
    assert not transcode.can_decode(ExplicitVRBigEndian)
    assert not transcode.can_decode("1.2.3.4")
    assert transcode.producible(ExplicitVRBigEndian, [ExplicitVRLittleEndian]) == []
    assert transcode.producible(ExplicitVRBigEndian, ["*"]) == [ExplicitVRBigEndian]


@pytest.mark.parametrize(
    "headers",
    [{"Accept": DICOM_MULTIPART}, {"Accept": "*/*"}, {}],
    ids=["no-transfer-syntax", "any-media-type", "no-accept"],
)
def test_no_transfer_syntax_asked_means_explicit_le(
    server: Server, study: tuple, headers: dict[str, str]
) -> None:
    """PS3.18 8.7.3.4 / 8.7.8.2: without a transfer-syntax the default, Explicit VR Little
    Endian, is sent: the RLE instance is decoded (only '*' asks for the stored form)."""
    study_uid, sent = study
    r = retrieve(server, study_uid, headers)
    assert r.status_code == 200
    got = parts(r)
    assert [ts for ts, _ in got] == [ExplicitVRLittleEndian] * 2
    assert_same_pixels(got, sent)


def test_lossy_stored_instance_is_sent_as_stored_by_default() -> None:
    """The exception of PS3.18 8.7.3.4: pixel data held only in lossy form goes as stored."""
    from carina.archive import transcode

    jpeg_baseline = "1.2.840.10008.1.2.4.50"
    assert transcode.producible(jpeg_baseline, [transcode.DEFAULT]) == [jpeg_baseline]
    assert transcode.producible(RLELossless, [transcode.DEFAULT]) == [ExplicitVRLittleEndian]
    assert transcode.producible(RLELossless, [transcode.AS_STORED]) == [RLELossless]
