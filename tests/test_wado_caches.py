"""What WADO-RS keeps in memory between requests (frame layouts, rendered images) is keyed by
the stored content's digest: once an instance's object is rewritten (as a redaction does: a
new object under a new key, its index row updated), frames and rendered images come from the
new object at once, never from what was kept of the old one."""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from carina.archive import index, retrieve
from tests.conftest import Server
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"'


def _frame(server: Server, url: str) -> bytes:
    r = server.http.get(f"{url}/frames/1", headers={"Accept": FRAME_ACCEPT}, timeout=30)
    assert r.status_code == 200, r.text
    head, _, rest = r.content.partition(b"\r\n\r\n")
    return rest[: rest.rindex(b"\r\n--")]


def _png(server: Server, url: str) -> np.ndarray:
    r = server.http.get(f"{url}/rendered", headers={"Accept": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(BytesIO(r.content)))


def test_frames_and_rendered_follow_an_object_rewritten_under_a_new_key(server: Server) -> None:
    study, series, sop = server.store(ct_series(Phi(), 1, rows=64, columns=64))
    url = f"{server.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
    assert server.database_url is not None
    with psycopg.connect(server.database_url) as conn:
        (key,) = conn.execute(
            "SELECT object_key FROM instances WHERE sop_uid = %s", (sop,)
        ).fetchone()  # type: ignore[misc]
    old = dcmread(server.data_dir / "objects" / key)
    for _ in range(2):  # read twice: whatever is kept of the old object is kept by now
        assert _frame(server, url) == old.PixelData
        before = _png(server, url)

    # The rewrite: other pixels (a left-right mirror) and a longer header, so the pixel data
    # starts elsewhere in the file too.
    pixels = old.pixel_array
    new = dcmread(server.data_dir / "objects" / key)
    new.PixelData = np.ascontiguousarray(pixels[:, ::-1]).tobytes()
    new.ImageComments = "rewritten " * 400
    new_key = f"{key}-rewritten"
    path = server.data_dir / "objects" / new_key
    new.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    with psycopg.connect(server.database_url) as conn:
        conn.execute(
            "UPDATE instances SET object_key = %s, sha256 = %s, size = %s, updated_at = now()"
            " WHERE sop_uid = %s",
            (new_key, hashlib.sha256(data).hexdigest(), len(data), sop),
        )
    (server.data_dir / "objects" / key).unlink()

    assert _frame(server, url) == new.PixelData != old.PixelData
    after = _png(server, url)
    assert (after == before[:, ::-1]).all() and not (after == before).all()


def test_a_frame_layout_is_parsed_once_per_content(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ds = ct_series(Phi(), 1, rows=16, columns=16)[0]
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    parsed: list[str] = []
    layout = retrieve.pixel_layout

    def counted(obj: retrieve.StoredObject, ts: str) -> retrieve.PixelLayout:
        parsed.append(ts)
        return layout(obj, ts)

    monkeypatch.setattr(retrieve, "pixel_layout", counted)
    store = retrieve.FilesystemStore(tmp_path)
    syntax = ds.file_meta.TransferSyntaxUID
    for version in ("digest-1", "digest-1", "digest-2"):
        with retrieve.StoredObject(store, "ct.dcm") as obj:
            found = retrieve.cached_layout(obj, syntax, ("ct.dcm", version))
        assert found.ranges([1]) == [retrieve.ByteRange(found.pixels.offset, 16 * 16 * 2)]
    assert len(parsed) == 2  # once for each content digest


def _geometry(ds: Dataset) -> tuple[str | None, ...]:
    """The indexed geometry of ds, as index.instance_object reads it from the metadata."""
    return tuple(
        str(ds[Tag(int(t, 16))].value) if Tag(int(t, 16)) in ds else None
        for t in index.GEOMETRY_TAGS
    )


@pytest.mark.parametrize(
    ("syntax", "rows", "bits", "frames", "trailing"),
    [
        (ExplicitVRLittleEndian, 16, 16, 1, False),
        (ImplicitVRLittleEndian, 16, 16, 1, False),
        (ExplicitVRLittleEndian, 3, 8, 1, False),  # 9 bytes, padded to 10
        (ExplicitVRLittleEndian, 8, 16, 3, False),
        (ExplicitVRLittleEndian, 16, 16, 1, True),
        (ImplicitVRLittleEndian, 16, 16, 1, True),
    ],
)
def test_frames_are_placed_from_the_file_end_only_where_pixel_data_ends_it(
    tmp_path: Path, syntax: str, rows: int, bits: int, frames: int, trailing: bool
) -> None:
    ds = ct_series(Phi(), 1, rows=rows, columns=rows)[0]
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    size = rows * rows * bits // 8 * frames
    ds.PixelData = bytes(range(256)) * (size // 256) + bytes(size % 256)
    if frames > 1:
        ds.NumberOfFrames = frames
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 8)  # Data Set Trailing Padding after the pixels
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    file_size = (tmp_path / "x.dcm").stat().st_size
    store = retrieve.FilesystemStore(tmp_path)
    with retrieve.StoredObject(store, "x.dcm") as obj:
        parsed = retrieve.pixel_layout(obj, syntax)
        tail = retrieve.tail_layout(obj, syntax, file_size, _geometry(ds))
        wrong = retrieve.tail_layout(obj, syntax, file_size, (str(rows + 1), *_geometry(ds)[1:]))
    assert tail == (None if trailing else parsed)
    assert wrong is None
    assert parsed.frames == frames and parsed.frame_size == rows * rows * bits // 8
