"""WADO-RS frames and bulk data over real HTTP, plus CORS and gzip of the DICOMweb API."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from carina.api.dicomweb import _absolute_bulk_uris
from carina.archive import retrieve, storage
from tests.conftest import Server, run_cli
from tests.factory import Phi, ct_instance, to_bytes
from tests.pagecache import evict, in_memory_filesystem

pytestmark = pytest.mark.slow
OCTET_MULTIPART = 'multipart/related; type="application/octet-stream"'
ROWS, COLUMNS, FRAMES = 16, 12, 3
VIEWER = "http://viewer.test"


def multiframe_ct(phi: Phi) -> Dataset:
    """A native (Explicit VR Little Endian) CT with three distinct 16-bit frames."""
    ds = ct_instance(phi, 1, rows=ROWS, columns=COLUMNS)
    ds.NumberOfFrames = FRAMES
    pixels = np.arange(FRAMES * ROWS * COLUMNS, dtype=np.int16).reshape(FRAMES, ROWS, COLUMNS)
    ds.PixelData = (pixels * 7 - 500).astype(np.int16).tobytes()
    return ds


def frame_bytes(ds: Dataset, number: int) -> bytes:
    """The native bytes of 1-based frame number of ds."""
    size = ROWS * COLUMNS * 2
    return bytes(ds.PixelData[(number - 1) * size : number * size])


@pytest.fixture(scope="module")
def stored(server: Server) -> tuple[str, str, str, Dataset]:
    """(study, series, sop, dataset sent) of one stored multi-frame instance."""
    sent = multiframe_ct(Phi())
    return (*store(server, sent), sent)


def store(server: Server, ds: Dataset) -> tuple[str, str, str]:
    """STOW one instance; (study, series, sop) of the de-identified instance stored."""
    response = server.client().store_instances([ds])
    server.settled()
    [item] = response.ReferencedSOPSequence
    url = item.RetrieveURL.split("/studies/", 1)[1]
    st, _, se, _, sop = url.split("/")
    return st, se, sop


def instance_url(server: Server, stored: tuple) -> str:
    st, se, sop, _ = stored
    return f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sop}"


def parts(r: requests.Response) -> list:
    """The parts of a multipart/related response, parsed by the standard library."""
    head = f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + r.content)
    return list(msg.iter_parts())


@pytest.mark.parametrize("numbers", [[1], [3], [3, 1], [1, 2, 3]])
def test_dicomweb_client_retrieves_native_frames_in_requested_order(
    server: Server, stored: tuple, numbers: list[int]
) -> None:
    st, se, sop, sent = stored
    client = server.client()
    frames = client.retrieve_instance_frames(st, se, sop, frame_numbers=numbers)
    assert frames == [frame_bytes(sent, n) for n in numbers]


def test_frames_response_is_multipart_octet_stream_one_part_per_frame(
    server: Server, stored: tuple
) -> None:
    r = server.http.get(
        instance_url(server, stored) + "/frames/3,1", headers={"Accept": OCTET_MULTIPART}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("multipart/related")
    assert 'type="application/octet-stream"' in r.headers["content-type"]
    got = parts(r)
    assert [p.get_content_type() for p in got] == ["application/octet-stream"] * 2
    assert [p.get_payload(decode=True) for p in got] == [
        frame_bytes(stored[3], 3),
        frame_bytes(stored[3], 1),
    ]
    assert all(p.get_param("transfer-syntax") == "1.2.840.10008.1.2.1" for p in got)


def test_frame_list_with_encoded_comma_is_understood(server: Server, stored: tuple) -> None:
    r = server.http.get(instance_url(server, stored) + "/frames/2%2C3")
    assert r.status_code == 200
    assert [p.get_payload(decode=True) for p in parts(r)] == [
        frame_bytes(stored[3], 2),
        frame_bytes(stored[3], 3),
    ]


def test_single_frame_as_bare_octet_stream_when_only_that_is_accepted(
    server: Server, stored: tuple
) -> None:
    r = server.http.get(
        instance_url(server, stored) + "/frames/2", headers={"Accept": "application/octet-stream"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == frame_bytes(stored[3], 2)


@pytest.mark.parametrize("frame_list", ["4", "0", "-1", "1,x", "1.5", "1,,2", "2,2"])
def test_bad_or_out_of_range_frame_numbers_are_400(
    server: Server, stored: tuple, frame_list: str
) -> None:
    r = server.http.get(instance_url(server, stored) + f"/frames/{frame_list}")
    assert r.status_code == 400, frame_list
    assert r.json()["error"]


@pytest.mark.parametrize("accept", ["image/jpeg", 'multipart/related; type="image/jpeg"'])
def test_frames_in_unavailable_media_type_are_406(
    server: Server, stored: tuple, accept: str
) -> None:
    r = server.http.get(instance_url(server, stored) + "/frames/1", headers={"Accept": accept})
    assert r.status_code == 406


def test_frames_and_bulk_data_of_unknown_instance_are_404(server: Server, stored: tuple) -> None:
    st, se, _, _ = stored
    base = f"{server.dicomweb}/studies/{st}/series/{se}/instances/{generate_uid()}"
    assert server.http.get(base + "/frames/1").status_code == 404
    assert server.http.get(base + "/bulkdata/7FE00010").status_code == 404


def test_metadata_bulk_data_uri_is_absolute_and_returns_pixel_data(
    server: Server, stored: tuple
) -> None:
    url = instance_url(server, stored)
    [meta] = server.http.get(url + "/metadata").json()
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri == url + "/bulkdata/7FE00010"
    r = server.http.get(uri, headers={"Accept": OCTET_MULTIPART})
    assert r.status_code == 200
    [part] = parts(r)
    assert part.get_payload(decode=True) == stored[3].PixelData
    assert part["content-location"] == uri
    client = server.client()
    assert client.retrieve_bulkdata(uri) == [stored[3].PixelData]


def test_study_metadata_bulk_data_uris_name_their_own_instance(
    server: Server, stored: tuple
) -> None:
    st = stored[0]
    meta = server.http.get(f"{server.dicomweb}/studies/{st}/metadata").json()
    for m in meta:
        sop = m["00080018"]["Value"][0]
        assert m["7FE00010"]["BulkDataURI"].endswith(f"/instances/{sop}/bulkdata/7FE00010")


def test_bulk_data_of_absent_or_malformed_tag_is_404(server: Server, stored: tuple) -> None:
    url = instance_url(server, stored)
    assert server.http.get(url + "/bulkdata/00091010").status_code == 404
    assert server.http.get(url + "/bulkdata/PIXELS").status_code == 404


@pytest.fixture(scope="module")
def compressed(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(study, series, sop) of a stored JPEG Baseline instance (stored as received). It is a
    Secondary Capture, which the burned-in text rule would hold: the collection opts out."""
    cli = run_cli(
        server.database_url,  # type: ignore[arg-type]
        tmp_path_factory.mktemp("cli"),
        *("collection", "rules", "default", "--set", "burned_in.enabled=false"),
    )
    assert cli.returncode == 0, cli.stderr
    ds = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return store(server, ds)


def test_native_frames_and_pixel_bulk_data_of_compressed_instance_are_406_not_transcoded(
    server: Server, compressed: tuple
) -> None:
    st, se, sop = compressed
    url = f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sop}"
    for path, accept in (("/frames/1", OCTET_MULTIPART), ("/bulkdata/7FE00010", "*/*")):
        r = server.http.get(url + path, headers={"Accept": accept})
        assert r.status_code == 406, path
        assert "transcoding" in r.json()["error"]


# ------------------------------------------------------------------- without a server


class ChunksOnlyStore:
    """An object store that can only stream whole objects (as the S3 backend does)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_chunks(self, key: str, chunk_size: int = 7) -> Iterator[bytes]:
        """The object in small chunks."""
        for i in range(0, len(self.data), chunk_size):
            yield self.data[i : i + chunk_size]


def test_frames_are_located_in_an_object_store_without_ranged_reads() -> None:
    ds = multiframe_ct(Phi())
    store = ChunksOnlyStore(to_bytes(ds))
    with retrieve.StoredObject(store, "k") as obj:  # type: ignore[arg-type]
        ranges = retrieve.frame_ranges(obj, "1.2.840.10008.1.2.1", [2, 3])
        assert [b"".join(obj.read(r)) for r in ranges] == [frame_bytes(ds, 2), frame_bytes(ds, 3)]
        pixels = retrieve.bulk_data_range(obj, "1.2.840.10008.1.2.1", 0x7FE00010)
        assert b"".join(obj.read(pixels)) == ds.PixelData


def test_nowait_reads_take_cached_bytes_and_refuse_to_wait_for_the_disk(tmp_path: Path) -> None:
    ds = multiframe_ct(Phi())
    store = storage.FilesystemStore(tmp_path / "objects")
    staged = tmp_path / "staged.dcm"
    staged.write_bytes(to_bytes(ds))
    store.put_file("a/b.dcm", staged)
    with retrieve.StoredObject(store, "a/b.dcm") as obj:
        [r] = retrieve.frame_ranges(obj, "1.2.840.10008.1.2.1", [2])
    got = bytearray(r.length)
    with retrieve.StoredObject(store, "a/b.dcm", nowait=True) as obj:
        obj.read_into(r.offset, memoryview(got))  # just written: in the page cache
    assert got == frame_bytes(ds, 2)
    if in_memory_filesystem(tmp_path):
        pytest.skip("this filesystem keeps every page in memory (tmpfs)")
    evict(tmp_path / "objects" / "a" / "b.dcm")
    with (
        retrieve.StoredObject(store, "a/b.dcm", nowait=True) as obj,
        pytest.raises(retrieve.WouldBlock),
    ):
        obj.read_into(r.offset, memoryview(got))
    with pytest.raises(retrieve.WouldBlock):
        retrieve.StoredObject(ChunksOnlyStore(b""), "k", nowait=True)  # type: ignore[arg-type]


def test_frames_of_an_object_not_in_memory_are_read_for_the_request(
    server: Server, stored: tuple
) -> None:
    """The event loop answers from the page cache only; anything else is read in a thread."""
    if in_memory_filesystem(server.data_dir):
        pytest.skip("this filesystem keeps every page in memory (tmpfs)")
    for path in (server.data_dir / "objects").rglob("*"):
        if path.is_file():
            evict(path)
    r = server.http.get(
        instance_url(server, stored) + "/frames/2", headers={"Accept": OCTET_MULTIPART}
    )
    assert r.status_code == 200
    assert [p.get_payload(decode=True) for p in parts(r)] == [frame_bytes(stored[3], 2)]


def test_one_bit_frames_off_byte_boundaries_are_refused_not_misread() -> None:
    ds = multiframe_ct(Phi())
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 3, 2  # 9 bits a frame
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = b"\x55\xaa\x01\x00"
    store = ChunksOnlyStore(to_bytes(ds))
    with (
        retrieve.StoredObject(store, "k") as obj,  # type: ignore[arg-type]
        pytest.raises(retrieve.NotRetrievable, match="byte boundary"),
    ):
        retrieve.frame_ranges(obj, "1.2.840.10008.1.2.1", [2])


def test_bulk_data_uris_use_the_top_level_uids_not_those_of_sequence_items() -> None:
    item = '{"0020000E": {"vr": "UI", "Value": ["9.9"]}}'
    text = (
        f'{{"00081115": {{"vr": "SQ", "Value": [{item}]}}, '
        '"00080018": {"vr": "UI", "Value": ["1.3"]}, '
        '"0020000E": {"vr": "UI", "Value": ["1.2"]}, '
        '"7FE00010": {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}}'
    )
    out = json.loads(_absolute_bulk_uris(text, "http://h/dicomweb/studies/1.1", None, None))
    assert out["7FE00010"]["BulkDataURI"] == (
        "http://h/dicomweb/studies/1.1/series/1.2/instances/1.3/bulkdata/7FE00010"
    )


# ------------------------------------------------------------------------------ CORS


@pytest.fixture(scope="module")
def cors_server(server_factory: Callable[..., Server]) -> Server:
    """A second Carina on the same database that lets one viewer origin in."""
    return server_factory(CARINA_CORS_ORIGINS=json.dumps([VIEWER]))


def test_cors_preflight_is_allowed_for_the_configured_origin(cors_server: Server) -> None:
    r = requests.options(
        f"{cors_server.dicomweb}/studies",
        headers={
            "Origin": VIEWER,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "accept, authorization",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == VIEWER
    assert "GET" in r.headers["access-control-allow-methods"]


def test_cors_simple_request_exposes_warning_header_to_the_configured_origin(
    cors_server: Server, stored: tuple
) -> None:
    r = cors_server.http.get(f"{cors_server.dicomweb}/studies", headers={"Origin": VIEWER})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == VIEWER
    assert "warning" in r.headers["access-control-expose-headers"].lower()


def test_cors_headers_absent_for_other_origins_and_when_not_configured(
    server: Server, cors_server: Server, stored: tuple
) -> None:
    other = cors_server.http.get(
        f"{cors_server.dicomweb}/studies", headers={"Origin": "http://evil.test"}
    )
    assert "access-control-allow-origin" not in other.headers
    default = server.http.get(f"{server.dicomweb}/studies", headers={"Origin": VIEWER})
    assert "access-control-allow-origin" not in default.headers
    preflight = requests.options(
        f"{server.dicomweb}/studies",
        headers={"Origin": VIEWER, "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers


# ------------------------------------------------------------------------------ gzip


def test_qido_json_is_gzipped_when_asked_and_decodes_to_the_same_answer(
    server: Server, stored: tuple
) -> None:
    url = f"{server.dicomweb}/instances?includefield=all"
    plain = server.http.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    r = server.http.get(url, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert r.headers["content-encoding"] == "gzip"
    raw = r.raw.read(decode_content=False)
    assert json.loads(gzip.decompress(raw)) == plain.json()


def test_metadata_is_gzipped_when_asked(server: Server, stored: tuple) -> None:
    r = server.http.get(
        f"{server.dicomweb}/studies/{stored[0]}/metadata", headers={"Accept-Encoding": "gzip"}
    )
    assert r.headers["content-encoding"] == "gzip"
    assert len(r.json()) == 1


def test_multipart_dicom_and_frames_are_not_gzipped_even_when_asked(
    server: Server, stored: tuple
) -> None:
    st, se, _, _ = stored
    for url in (f"{server.dicomweb}/studies/{st}", instance_url(server, stored) + "/frames/1,2"):
        r = server.http.get(url, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("multipart/related")
        assert "content-encoding" not in r.headers, url


def test_retrieve_as_stored_has_content_length_transcoded_is_chunked(
    server: Server, stored: tuple
) -> None:
    url = f"{server.dicomweb}/studies/{stored[0]}"
    as_stored = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    r = server.http.get(url, headers={"Accept": as_stored})
    assert int(r.headers["content-length"]) == len(r.content)
    assert [dcmread(BytesIO(p.get_payload(decode=True))).SOPInstanceUID for p in parts(r)]
    implicit = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    t = server.http.get(url, headers={"Accept": implicit})
    assert t.status_code == 200
    assert "content-length" not in t.headers
    assert t.headers["transfer-encoding"] == "chunked"
