"""WADO-RS frames of compressed instances, as stored in their own media types (PS3.18
8.7.3.3.2, Table 8.7.3-5), over real HTTP; 406 where a form cannot be given."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import JPEGLSLossless, generate_uid

from tests.conftest import Server
from tests.factory import Phi
from tests.test_wado_frames import FRAMES, frame_bytes, multiframe_ct, parts, store

pytestmark = pytest.mark.slow
JLS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def stored_frames(ds: Dataset) -> list[bytes]:
    """The compressed frames of ds as sent (de-identification copies pixel data untouched)."""
    count = int(ds.get("NumberOfFrames") or 1)
    return list(generate_frames(ds.PixelData, number_of_frames=count))


def fresh_uids(ds: Dataset) -> Dataset:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


@pytest.fixture(scope="module")
def jls(server: Server) -> tuple[str, str, str, Dataset]:
    """A three-frame CT compressed with JPEG-LS Lossless (pydicom's encoder, pyjpegls)."""
    ds = multiframe_ct(Phi())
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    return (*store(server, ds), ds)


@pytest.fixture(scope="module")
def captures(server: Server) -> Server:
    """The server, with the Secondary Captures below (known clean) not held for burned-in text
    review."""
    server.set_rules("default", "burned_in.enabled=false")
    return server


@pytest.fixture(scope="module")
def rle(captures: Server) -> tuple[str, str, str, Dataset]:
    server = captures
    ds = fresh_uids(dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm")))
    return (*store(server, ds), ds)


@pytest.fixture(scope="module")
def jpeg(captures: Server) -> tuple[str, str, str, Dataset]:
    server = captures
    ds = fresh_uids(dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    return (*store(server, ds), ds)


def url(server: Server, stored: tuple) -> str:
    st, se, sop, _ = stored
    return f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sop}"


def test_dicomweb_client_retrieves_jpeg_ls_frames_as_stored(server: Server, jls: tuple) -> None:
    st, se, sop, sent = jls
    client = server.client()
    got = client.retrieve_instance_frames(st, se, sop, [3, 1], media_types=("image/jls",))
    expected = stored_frames(sent)
    assert got == [expected[2], expected[0]]


def test_jpeg_ls_frames_decode_to_the_original_pixels(server: Server, jls: tuple) -> None:
    r = server.http.get(
        url(server, jls) + "/frames/1,2,3",
        headers={"Accept": 'multipart/related; type="image/jls"'},
    )
    assert r.status_code == 200
    got = parts(r)
    assert [p.get_content_type() for p in got] == ["image/jls"] * FRAMES
    assert {p.get_param("transfer-syntax") for p in got} == {JLS}
    original = multiframe_ct(Phi())  # the same pixels, not compressed
    for n, part in enumerate(got):
        decoded = jls_decode(part.get_payload(decode=True), jls[3])
        expected = np.frombuffer(original.PixelData, np.int16).reshape(FRAMES, 16, 12)[n]
        assert np.array_equal(decoded, expected)


def jls_decode(frame: bytes, like: Dataset, syntax: str = JLS) -> np.ndarray:
    """One compressed frame (JPEG-LS unless syntax says otherwise) decoded by pydicom,
    described by the sent dataset's pixel module."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    for keyword in (
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PhotometricInterpretation",
    ):
        setattr(ds, keyword, getattr(like, keyword))
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([frame])
    return pixel_array(ds)


def test_octet_stream_with_any_transfer_syntax_gets_frames_as_stored(
    server: Server, jls: tuple
) -> None:
    # OHIF's request for frames.
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    r = server.http.get(url(server, jls) + "/frames/2", headers={"Accept": accept})
    assert r.status_code == 200
    [part] = parts(r)
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_param("transfer-syntax") == JLS
    assert part.get_payload(decode=True) == stored_frames(jls[3])[1]


def test_rle_frames_as_image_dicom_rle(server: Server, rle: tuple) -> None:
    r = server.http.get(
        url(server, rle) + "/frames/2",
        headers={"Accept": 'multipart/related; type="image/dicom-rle"'},
    )
    assert r.status_code == 200
    [part] = parts(r)
    assert (part.get_content_type(), part.get_param("transfer-syntax")) == ("image/dicom-rle", RLE)
    assert part.get_payload(decode=True) == stored_frames(rle[3])[1]


def test_single_jpeg_frame_as_bare_image_jpeg(server: Server, jpeg: tuple) -> None:
    for accept in ("image/jpeg", None):  # no Accept: anything, so the frame as stored
        headers = {"Accept": accept} if accept else {}
        r = server.http.get(url(server, jpeg) + "/frames/1", headers=headers)
        assert r.status_code == 200, accept
        if accept:
            assert r.headers["content-type"] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
            body = r.content
        else:
            [part] = parts(r)
            assert part.get_content_type() == "image/jpeg"
            body = part.get_payload(decode=True)
        assert body == stored_frames(jpeg[3])[0]
        assert body.startswith(b"\xff\xd8")


@pytest.mark.parametrize(
    "accept",
    [
        'multipart/related; type="image/jpx"',
        'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.81',
        "image/jpeg",
    ],
)
def test_forms_a_jpeg_ls_instance_cannot_be_given_in_are_406(
    server: Server, jls: tuple, accept: str
) -> None:
    r = server.http.get(url(server, jls) + "/frames/1", headers={"Accept": accept})
    assert r.status_code == 406, accept
    assert "image/jls" in r.json()["error"]


def test_compressed_frames_out_of_range_are_400(server: Server, jls: tuple) -> None:
    r = server.http.get(
        url(server, jls) + "/frames/4", headers={"Accept": "multipart/related; type=image/jls"}
    )
    assert r.status_code == 400
    assert "out of range" in r.json()["error"]


def test_several_frames_as_one_bare_image_are_406(server: Server, jls: tuple) -> None:
    r = server.http.get(url(server, jls) + "/frames/1,2", headers={"Accept": "image/jls"})
    assert r.status_code == 406


def test_grey_compressed_frames_are_decoded_for_octet_stream(server: Server, jls: tuple) -> None:
    st, se, sop, _ = jls
    original = multiframe_ct(Phi())  # the same pixels, not compressed
    client = server.client()
    got = client.retrieve_instance_frames(
        st, se, sop, [3, 1], media_types=("application/octet-stream",)
    )
    assert got == [frame_bytes(original, 3), frame_bytes(original, 1)]
    r = server.http.get(
        url(server, jls) + "/frames/2",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
    )
    [part] = parts(r)
    assert part.get_param("transfer-syntax") == "1.2.840.10008.1.2.1"
    assert part.get_payload(decode=True) == frame_bytes(original, 2)


def test_colour_compressed_frames_are_not_decoded(server: Server, rle: tuple) -> None:
    r = server.http.get(
        url(server, rle) + "/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
    )
    assert r.status_code == 406
    assert "colour" in r.json()["error"]


@pytest.fixture(scope="module")
def native(server: Server) -> tuple[str, str, str, Dataset]:
    """The three-frame CT of test_wado_frames, stored uncompressed."""
    ds = multiframe_ct(Phi())
    return (*store(server, ds), ds)


def original_frame(n: int) -> np.ndarray:
    """Frame n (0-based) of the multi-frame CT, as its pixels were made."""
    pixels = np.frombuffer(multiframe_ct(Phi()).PixelData, np.int16)
    return pixels.reshape(FRAMES, 16, 12)[n]


@pytest.mark.parametrize(
    ("accept", "syntax"),
    [
        ('multipart/related; type="image/jls"', JLS),
        ('multipart/related; type="image/jls"; transfer-syntax=*', JLS),
        (f'multipart/related; type="image/jls"; transfer-syntax={JLS}', JLS),
        ('multipart/related; type="image/dicom-rle"', RLE),
    ],
)
def test_native_frames_are_encoded_in_the_compressed_media_type_asked_for(
    server: Server, native: tuple, accept: str, syntax: str
) -> None:
    r = server.http.get(url(server, native) + "/frames/3,1", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    got = parts(r)
    assert {p.get_param("transfer-syntax") for p in got} == {syntax}
    for part, n in zip(got, (2, 0), strict=True):
        decoded = jls_decode(part.get_payload(decode=True), native[3], syntax)
        assert np.array_equal(decoded, original_frame(n))


def test_dicomweb_client_gets_compressed_frames_of_a_native_instance(
    server: Server, native: tuple
) -> None:
    st, se, sop, sent = native
    client = server.client()
    [frame] = client.retrieve_instance_frames(st, se, sop, [2], media_types=("image/jls",))
    assert np.array_equal(jls_decode(frame, sent), original_frame(1))


def test_jpeg_ls_frames_are_re_encoded_as_rle(server: Server, jls: tuple) -> None:
    accept = 'multipart/related; type="image/dicom-rle"'
    r = server.http.get(url(server, jls) + "/frames/2", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    [part] = parts(r)
    assert part.get_content_type() == "image/dicom-rle"
    decoded = jls_decode(part.get_payload(decode=True), jls[3], RLE)
    assert np.array_equal(decoded, original_frame(1))


@pytest.mark.parametrize(
    "accept",
    [
        "image/jpeg",  # JPEG Lossless SV1 by default: no encoder
        'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50',  # lossy
        'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.90',  # not jls
        'multipart/related; type="image/jp2"',  # OpenJPEG refuses a 16 x 12 image
    ],
)
def test_encodings_that_cannot_be_made_are_406_with_reason(
    server: Server, native: tuple, accept: str
) -> None:
    r = server.http.get(url(server, native) + "/frames/1", headers={"Accept": accept})
    assert r.status_code == 406, accept
    assert r.json()["error"]


def test_colour_frames_are_not_re_encoded(server: Server, rle: tuple) -> None:
    r = server.http.get(url(server, rle) + "/frames/1", headers={"Accept": "image/jls"})
    assert r.status_code == 406
    assert "colour" in r.json()["error"]
