"""WADO-RS rendered and thumbnail resources over real HTTP: the images are decoded and their
pixels checked against the PS3.3 C.11.2 window math, computed here from the pixels sent."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import Server
from tests.derived import build
from tests.factory import Phi, ct_instance, ct_series
from tests.test_wado_frames import FRAMES, multiframe_ct, parts, store

pytestmark = pytest.mark.slow
INTERCEPT = -1024  # the factory's RescaleIntercept


def linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, as a reference."""
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 255, y)
    return np.rint(y)


def sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 (SIGMOID) onto 0..255."""
    return np.rint(255 / (1 + np.exp(-4 * (x - center) / width)))


def hounsfield(ds: Dataset, frame: int = 1) -> np.ndarray:
    """Modality values (HU) of a frame of a factory CT, from its raw bytes."""
    size = ds.Rows * ds.Columns
    raw = np.frombuffer(ds.PixelData, dtype=np.int16)[(frame - 1) * size : frame * size]
    return raw.reshape(ds.Rows, ds.Columns).astype(np.float64) + INTERCEPT


def decode(content: bytes) -> Image.Image:
    """An image as sent, opened by Pillow."""
    image = Image.open(BytesIO(content))
    image.load()
    return image


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(decode(content)).astype(np.float64)


@pytest.fixture(scope="module")
def ct(server: Server) -> tuple[str, str, str, Dataset]:
    """(study, series, sop, dataset sent) of a 16x12 CT carrying its own window."""
    ds = ct_instance(Phi(), 1, rows=16, columns=12)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return (*store(server, ds), ds)


@pytest.fixture(scope="module")
def multiframe(server: Server) -> tuple[str, str, str, Dataset]:
    ds = multiframe_ct(Phi())
    return (*store(server, ds), ds)


def url(server: Server, uids: tuple) -> str:
    st, se, sop = uids[:3]
    return f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sop}"


def test_dicomweb_client_renders_png_with_requested_window(server: Server, ct: tuple) -> None:
    st, se, sop, sent = ct
    client = server.client()
    png = client.retrieve_instance_rendered(
        st, se, sop, media_types=("image/png",), params={"window": "100,500,linear"}
    )
    got = pixels(png)
    assert got.shape == (16, 12)
    assert np.abs(got - linear(hounsfield(sent), 100, 500)).max() <= 1


def test_sigmoid_window_follows_its_formula(server: Server, ct: tuple) -> None:
    r = server.http.get(
        url(server, ct) + "/rendered",
        params={"window": "0,800,sigmoid"},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200
    assert np.abs(pixels(r.content) - sigmoid(hounsfield(ct[3]), 0, 800)).max() <= 1


def test_object_window_is_used_when_the_request_names_none(server: Server, ct: tuple) -> None:
    r = server.http.get(url(server, ct) + "/rendered", headers={"Accept": "image/png"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert np.abs(pixels(r.content) - linear(hounsfield(ct[3]), 40, 400)).max() <= 1


def test_default_media_type_is_jpeg_of_the_image_size(server: Server, ct: tuple) -> None:
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "image/*"}):
        r = server.http.get(url(server, ct) + "/rendered", headers=headers)
        assert r.status_code == 200, headers
        assert r.headers["content-type"] == "image/jpeg"
        image = decode(r.content)
        assert (image.format, image.size, image.mode) == ("JPEG", (12, 16), "L")


def test_image_without_window_spans_its_whole_range(server: Server) -> None:
    ds = ct_instance(Phi(), 1, rows=8, columns=8)
    uids = store(server, ds)
    r = server.http.get(url(server, uids) + "/rendered", headers={"Accept": "image/png"})
    hu = hounsfield(ds)
    expected = np.rint((hu - hu.min()) * 255 / (hu.max() - hu.min()))
    assert np.abs(pixels(r.content) - expected).max() <= 1


def test_monochrome1_is_inverted(server: Server) -> None:
    ds = ct_instance(Phi(), 1, rows=8, columns=8)
    ds.PhotometricInterpretation = "MONOCHROME1"
    uids = store(server, ds)
    r = server.http.get(
        url(server, uids) + "/rendered",
        params={"window": "100,500,linear"},
        headers={"Accept": "image/png"},
    )
    assert np.abs(pixels(r.content) - (255 - linear(hounsfield(ds), 100, 500))).max() <= 1


def test_rendered_frames_are_the_frames_asked_for(server: Server, multiframe: tuple) -> None:
    st, se, sop, sent = multiframe
    client = server.client()
    png = client.retrieve_instance_frames_rendered(
        st,
        se,
        sop,
        frame_numbers=[3],
        media_types=("image/png",),
        params={"window": "0,900,linear"},
    )
    x = hounsfield(sent, 3)
    assert np.abs(pixels(png) - linear(x, 0, 900)).max() <= 1
    assert not np.array_equal(linear(x, 0, 900), linear(hounsfield(sent, 1), 0, 900))


def test_several_frames_come_as_multipart_of_images(server: Server, multiframe: tuple) -> None:
    sent = multiframe[3]
    r = server.http.get(
        url(server, multiframe) + "/frames/3,1/rendered",
        params={"window": "0,900,linear"},
        headers={"Accept": 'multipart/related; type="image/png"'},
    )
    assert r.status_code == 200
    got = parts(r)
    assert [p.get_content_type() for p in got] == ["image/png", "image/png"]
    for part, n in zip(got, (3, 1), strict=True):
        expected = linear(hounsfield(sent, n), 0, 900)
        assert np.abs(pixels(part.get_payload(decode=True)) - expected).max() <= 1


def test_viewport_fits_keeping_aspect_ratio(server: Server, ct: tuple) -> None:
    r = server.http.get(
        url(server, ct) + "/rendered", params={"viewport": "24,24"}, headers={"Accept": "image/png"}
    )
    assert decode(r.content).size == (18, 24)  # 12x16 scaled by 1.5


def test_viewport_source_region_crops_and_flips(server: Server, ct: tuple) -> None:
    base = url(server, ct) + "/rendered"
    png = {"Accept": "image/png"}
    full = pixels(server.http.get(base, headers=png).content)
    crop = server.http.get(base, params={"viewport": "4,5,2,3,4,5"}, headers=png)
    assert np.array_equal(pixels(crop.content), full[3:8, 2:6])
    flipped = server.http.get(base, params={"viewport": "4,5,2,3,-4,-5"}, headers=png)
    assert np.array_equal(pixels(flipped.content), full[3:8, 2:6][::-1, ::-1])


def test_quality_changes_jpeg_size(server: Server) -> None:
    ds = ct_instance(Phi(), 1, rows=128, columns=128)
    uids = store(server, ds)
    sizes = [
        len(server.http.get(url(server, uids) + "/rendered", params={"quality": q}).content)
        for q in (5, 95)
    ]
    assert sizes[0] < sizes[1]


def test_compressed_colour_instance_is_rendered_in_colour(server: Server) -> None:
    # A Secondary Capture is held for burned-in text review by default; this one is known clean.
    server.set_rules("default", "burned_in.enabled=false")
    ds = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    expected = ds.pixel_array.astype(np.float64)  # RGB, decoded by pydicom
    r = server.http.get(
        url(server, store(server, ds)) + "/rendered", headers={"Accept": "image/png"}
    )
    assert r.status_code == 200
    got = pixels(r.content)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1


def test_series_rendered_is_one_image_or_one_part_per_instance(server: Server) -> None:
    sent = ct_series(Phi(), 3, rows=8, columns=8)
    client = server.client()
    client.store_instances(sent)
    st, se = store(server, sent[0])[:2]  # the same instance again: its UIDs
    one = client.retrieve_series_rendered(st, se, media_types=("image/jpeg",))
    assert decode(one).format == "JPEG"
    r = server.http.get(
        f"{server.dicomweb}/studies/{st}/series/{se}/rendered",
        headers={"Accept": 'multipart/related; type="image/png"'},
        params={"window": "0,1000,linear"},
    )
    got = [pixels(p.get_payload(decode=True)) for p in parts(r)]
    assert len(got) == 3
    for image, ds in zip(got, sent, strict=True):  # instance number order
        assert np.abs(image - linear(hounsfield(ds), 0, 1000)).max() <= 1


def test_study_rendered_is_one_part_per_instance_of_every_series(server: Server) -> None:
    phi = Phi()
    first = ct_series(phi, 2, rows=8, columns=8)
    second = ct_instance(phi, 1, rows=8, columns=8)
    second.SeriesInstanceUID, second.SeriesNumber = generate_uid(), 4
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    server.client().store_instances(first)
    st = store(server, second)[0]
    url = f"{server.dicomweb}/studies/{st}/rendered"
    png = {"Accept": 'multipart/related; type="image/png"'}
    r = server.http.get(url, headers=png, params={"window": "0,1000,linear", "iccprofile": "no"})
    assert r.status_code == 200, r.text
    got = [pixels(p.get_payload(decode=True)) for p in parts(r)]
    assert len(got) == 3
    for image, ds in zip(got, [*first, second], strict=True):  # series number order
        assert np.abs(image - linear(hounsfield(ds), 0, 1000)).max() <= 1
    # A bare image/jpeg asks for one image: the first instance's (dicomweb-client has no
    # study-level rendered call).
    one = server.http.get(url, headers={"Accept": "image/jpeg"})
    assert decode(one.content).format == "JPEG"


def test_thumbnails_are_small_images_of_study_series_and_instance(server: Server) -> None:
    sent = ct_series(Phi(), 3, rows=256, columns=200)
    server.client().store_instances(sent)
    server.settled()
    st, se, sop = store(server, sent[1])
    for path in (
        f"/studies/{st}",
        f"/studies/{st}/series/{se}",
        f"/studies/{st}/series/{se}/instances/{sop}",
        f"/studies/{st}/series/{se}/instances/{sop}/frames/1",
    ):
        r = server.http.get(f"{server.dicomweb}{path}/thumbnail", headers={"Accept": "image/png"})
        assert r.status_code == 200, path
        assert decode(r.content).size == (100, 128), path
    small = server.http.get(
        f"{server.dicomweb}/studies/{st}/thumbnail", params={"viewport": "50,50"}
    ).content
    assert decode(small).size == (39, 50)


def test_thumbnail_of_a_small_image_is_not_enlarged(server: Server, ct: tuple) -> None:
    r = server.http.get(url(server, ct) + "/thumbnail")
    assert decode(r.content).size == (12, 16)


@pytest.mark.parametrize(
    "params",
    [
        {"window": "abc"},
        {"window": "40,400"},
        {"window": "40,0,linear"},
        {"window": "40,400,cubic"},
        {"window": "nan,400,linear"},
        {"quality": "0"},
        {"quality": "101"},
        {"quality": "high"},
        {"viewport": "a,b"},
        {"viewport": "0,5"},
        {"viewport": "10"},
        {"viewport": "100000,10"},
        {"viewport": "10,10,0,0,0,5"},
        {"viewport": "10,10,50,50,5,5"},
        {"annotation": "patient"},
        {"annotation": "technique"},
        {"iccprofile": "srgb"},
    ],
)
def test_bad_rendering_parameters_are_400(server: Server, ct: tuple, params: dict) -> None:
    r = server.http.get(url(server, ct) + "/rendered", params=params)
    assert r.status_code == 400, params
    assert r.json()["error"]


@pytest.mark.parametrize("frames", ["0", "4", "x", "1,1"])
def test_bad_or_out_of_range_rendered_frames_are_400(
    server: Server, multiframe: tuple, frames: str
) -> None:
    assert FRAMES == 3
    r = server.http.get(url(server, multiframe) + f"/frames/{frames}/rendered")
    assert r.status_code == 400, frames
    thumb = server.http.get(url(server, multiframe) + f"/frames/{frames}/thumbnail")
    assert thumb.status_code == 400, frames


@pytest.mark.parametrize("accept", ["image/gif", "image/jp2", "text/html", "application/dicom"])
def test_unsupported_rendered_media_types_are_406(server: Server, ct: tuple, accept: str) -> None:
    for resource in ("/rendered", "/thumbnail"):
        r = server.http.get(url(server, ct) + resource, headers={"Accept": accept})
        assert r.status_code == 406, (resource, accept)


def test_several_frames_as_a_single_image_are_406(server: Server, multiframe: tuple) -> None:
    r = server.http.get(url(server, multiframe) + "/frames/1,2/rendered")
    assert r.status_code == 406


def test_instance_without_pixel_data_is_406(server: Server) -> None:
    cts, _, sr = build(Phi())
    server.store(cts)  # its source first: an SR naming a series not held is quarantined
    r = server.http.get(url(server, store(server, sr)) + "/rendered")
    assert r.status_code == 406
    assert "pixel data" in r.json()["error"]


def test_unknown_resources_are_404(server: Server, ct: tuple) -> None:
    st, se, _, _ = ct
    unknown = generate_uid()
    for path in (
        f"/studies/{st}/series/{se}/instances/{unknown}/rendered",
        f"/studies/{st}/series/{unknown}/rendered",
        f"/studies/{unknown}/thumbnail",
        f"/studies/{st}/series/{unknown}/thumbnail",
    ):
        assert server.http.get(server.dicomweb + path).status_code == 404, path


def test_image_whose_palette_cannot_be_applied_is_406(server: Server) -> None:
    ds = ct_instance(Phi(), 1, rows=8, columns=8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    # An identity rescale keeps the CT Image module valid (Type 1 in PS3.3 C.8.2.1), so the
    # IOD rule does not hold the series and the palette is what is tested.
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = bytes(range(64))
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", b"\x00\x01" * 5)  # too short
    r = server.http.get(url(server, store(server, ds)) + "/rendered")
    assert r.status_code == 406
    assert "cannot be rendered" in r.json()["error"]
