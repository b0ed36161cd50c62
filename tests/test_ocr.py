"""OCR of burned-in text with Debian's tesseract: text drawn (DejaVu Sans, a real TrueType
font) into the pixels of CT and ultrasound images holds their series as burned-in-ocr, with
where the text is but never what it says; a clean CT is published."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import UltrasoundImageStorage

from carina.archive.storage import FilesystemStore
from carina.curation import ocr
from carina.curation.ocr import (
    NICENESS,
    OcrEnvironment,
    read_series,
    run_tesseract,
    sample_frames,
)
from carina.curation.rules import BurnedInSettings, InstanceFacts, SeriesFacts, series_facts
from tests.conftest import Server
from tests.factory import Phi, ct_series, to_bytes

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # Debian's fonts-dejavu-core
# What the text says: PHI as a scanner burns it in. None of it may leave the pixels.
WORDS = ("SMITHERSON", "JOHANNA", "7734921")
TEXT_LINES = ("SMITHERSON JOHANNA", "MRN 7734921")


def phantom(size: int, seed: int) -> np.ndarray:
    """A CT-like slice in HU: an elliptic body of soft tissue with noise, in air."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    body = ((x - size / 2) / (size * 0.4)) ** 2 + ((y - size / 2) / (size * 0.3)) ** 2 < 1
    hu = np.where(body, 40, -1000) + rng.normal(0, 15, (size, size))
    return hu.astype(np.int16)


def text_mask(size: tuple[int, int], lines: tuple[str, ...], height: int) -> np.ndarray:
    """Where lines of text drawn in DejaVu Sans, height pixels high, cover a (rows, columns)
    image: the first line at the top left, the last at the bottom left, as scanners put them."""
    image = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(str(FONT), height)
    draw.text((6, 6), lines[0], fill=255, font=font)
    if len(lines) > 1:
        draw.text((6, size[0] - height - 12), lines[-1], fill=255, font=font)
    return np.array(image) > 127


def ct_with_text(phi: Phi, count: int = 3, text: bool = True) -> list[Dataset]:
    """count 256 x 256 CT slices of a phantom, with TEXT_LINES burned in at 3000 HU."""
    out = ct_series(phi, count, rows=256, columns=256)
    for n, ds in enumerate(out):
        hu = phantom(256, n)
        if text:
            hu[text_mask((256, 256), TEXT_LINES, 14)] = 3000
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()  # RescaleIntercept -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
    return out


def ultrasound_with_text(phi: Phi, text: bool = True) -> list[Dataset]:
    """One 480 x 640 grey ultrasound frame with TEXT_LINES burned in at white."""
    [ds] = ct_series(phi, 1, rows=480, columns=640)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.Modality = "US"
    for keyword in ("RescaleIntercept", "RescaleSlope", "ImagePositionPatient", "PixelSpacing"):
        delattr(ds, keyword)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 60, (480, 640)).astype(np.uint8)
    if text:
        pixels[text_mask((480, 640), TEXT_LINES, 20)] = 255
    ds.PixelData = pixels.tobytes()
    return [ds]


def stored_facts(
    tmp_path: Path, datasets: list[Dataset]
) -> tuple[OcrEnvironment, dict[str, str], SeriesFacts]:
    """The datasets in a filesystem store as the series worker sees them."""
    store = FilesystemStore(tmp_path / "objects")
    keys, instances = {}, []
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_bytes(ds))
        keys[ds.SOPInstanceUID] = f"x/{ds.SOPInstanceUID}.dcm"
        store.put_files([(keys[ds.SOPInstanceUID], path)])
        meta = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
        instances.append(InstanceFacts(ds.SOPInstanceUID, "", meta))
    return OcrEnvironment(store), keys, series_facts("c", instances)


# ---------------------------------------------------------------------------------------------
# The detector alone


def test_tesseract_reads_drawn_words_from_stdin() -> None:
    mask = text_mask((200, 600), ("SMITHERSON JOHANNA",), 28)
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
    png = _png(image)
    words = run_tesseract("tesseract", png)
    confident = [w for w in words if w.confidence >= 80 and w.chars >= 3]
    assert len(confident) == 2
    assert all(w.top < 60 for w in confident)


def test_tesseract_runs_below_the_priority_of_intake(tmp_path: Path) -> None:
    """OCR is background work: tesseract gets a lower scheduling priority (nice) than the
    server, so instances being sent are processed first."""
    seen = tmp_path / "niceness"
    fake = tmp_path / "tesseract"
    # Reads the image, says its niceness, answers an empty TSV.
    fake.write_text(f"#!/bin/sh\ncat > /dev/null\nnice > {seen}\nprintf 'level\\ttext\\n'\n")
    fake.chmod(0o755)
    assert run_tesseract(str(fake), b"an image") == []
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert int(seen.read_text()) == min(19, mine + NICENESS) > mine


def test_detector_finds_text_lines_in_ct_without_keeping_the_text(tmp_path: Path) -> None:
    env, keys, facts = stored_facts(tmp_path, ct_with_text(Phi()))
    detection = read_series(env, keys, facts, BurnedInSettings())
    assert detection.ran and detection.frames == 3
    assert len(detection.instances_with_text) == 3
    first = [r for r in detection.regions if r.instance == detection.instances_with_text[0]]
    top = min(first, key=lambda r: r.y)
    bottom = max(first, key=lambda r: r.y)
    # Boxes in the image's own 256-pixel grid (the frames were read enlarged twice).
    assert top.y < 30 and top.x < 30 and top.words == 2
    assert bottom.y > 200 and bottom.y + bottom.height <= 256
    assert sum(r.words for r in first) == 4
    assert not any(word in repr(detection) for word in WORDS)


def test_frames_reach_tesseract_as_pgm_and_read_as_from_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacked frames go to tesseract as binary PGM (no zlib pass over them in the
    serving process), from which it reads exactly what it reads from the same pixels in PNG."""
    sent: list[bytes] = []

    def keep(command: str, image: bytes) -> list[ocr.Word]:
        sent.append(image)
        return run_tesseract(command, image)

    monkeypatch.setattr(ocr, "run_tesseract", keep)
    env, keys, facts = stored_facts(tmp_path, ct_with_text(Phi()))
    detection = read_series(env, keys, facts, BurnedInSettings())
    assert detection.ran and len(detection.instances_with_text) == 3
    [pgm] = sent
    assert pgm.startswith(b"P5")
    with Image.open(io.BytesIO(pgm)) as stack:
        png = _png(stack)
    words = run_tesseract("tesseract", pgm)
    assert len(words) >= 8 and words == run_tesseract("tesseract", png)


def test_detector_finds_no_text_in_clean_ct(tmp_path: Path) -> None:
    env, keys, facts = stored_facts(tmp_path, ct_with_text(Phi(), text=False))
    detection = read_series(env, keys, facts, BurnedInSettings())
    assert detection.ran and detection.regions == () and detection.instances_with_text == ()


def test_detector_reads_at_most_the_configured_frames_spread_over_the_series() -> None:
    metas = [{"00280010": {"vr": "US", "Value": [16]}} for _ in range(11)]
    facts = series_facts("c", [InstanceFacts(f"1.{n}", "", m) for n, m in enumerate(metas)])
    assert sample_frames(facts, 3) == [("1.0", 1), ("1.5", 1), ("1.10", 1)]
    assert len(sample_frames(facts, 50)) == 11


def test_a_series_read_again_unchanged_is_not_read_twice(tmp_path: Path) -> None:
    """The series worker reads ahead of its decision and the decision finds the reading; a
    changed instance (another digest) or other settings are read again."""
    env, keys, facts = stored_facts(tmp_path, ct_with_text(Phi(), 2))
    runs = tmp_path / "runs"
    counting = tmp_path / "tesseract"
    counting.write_text(f'#!/bin/sh\necho run >> "{runs}"\nexec tesseract "$@"\n')
    counting.chmod(0o755)
    env = OcrEnvironment(env.store, str(counting))
    first = read_series(env, keys, facts, BurnedInSettings())
    assert read_series(env, keys, facts, BurnedInSettings()) == first
    assert runs.read_text().count("run") == 1
    one, two = facts.instances
    changed = replace(facts, instances=(replace(one, sha256="new"), two))
    read_series(env, keys, changed, BurnedInSettings())
    read_series(env, keys, facts, BurnedInSettings(ocr_min_chars=4))
    assert runs.read_text().count("run") == 3
    assert first.ran and len(first.instances_with_text) == 2


def test_missing_tesseract_is_a_reason_not_an_error(tmp_path: Path) -> None:
    env, keys, facts = stored_facts(tmp_path, ct_with_text(Phi(), 1))
    missing = OcrEnvironment(env.store, str(tmp_path / "no-such-tesseract"))
    detection = read_series(missing, keys, facts, BurnedInSettings())
    assert not detection.ran
    assert detection.reason == "tesseract not found (no-such-tesseract)"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# In the lifecycle


def _findings(server: Server, series: str) -> list[tuple[str, str, str, dict]]:
    with psycopg.connect(server.database_url) as conn:
        return conn.execute(
            "SELECT code, severity, message, details FROM series_findings"
            " WHERE series_uid = %s ORDER BY pk",
            (series,),
        ).fetchall()


def _state(server: Server, series: str) -> str:
    return server.settled()[series]


@pytest.mark.slow
def test_text_burned_into_ct_and_ultrasound_holds_them_as_burned_in_ocr(server: Server) -> None:
    phi = Phi()
    _, ct, _ = server.store(ct_with_text(phi))
    _, us, _ = server.store(ultrasound_with_text(Phi()))
    for series in (ct, us):
        assert _state(server, series) == "quarantined"
        found = _findings(server, series)
        [(code, severity, message, details)] = [f for f in found if f[0] == "burned-in-ocr"]
        assert severity == "hold" and "word(s)" in message
        regions = details["regions"]
        assert regions and all({"x", "y", "width", "height", "words"} <= set(r) for r in regions)
        stored = json.dumps(found)
        assert not any(word in stored for word in WORDS)
    # Nothing the detector read reaches the log.
    log = server.log.read_text()
    assert "OCR found" in log
    assert not any(word in log for word in WORDS)
    r = server.http.get(f"{server.dicomweb}/series", params={"SeriesInstanceUID": ct}, timeout=30)
    assert r.status_code == 204


@pytest.mark.slow
def test_clean_ct_is_read_and_published(server: Server) -> None:
    _, series, _ = server.store(ct_with_text(Phi(), text=False))
    assert _state(server, series) == "published"
    assert [f[0] for f in _findings(server, series)] == []


@pytest.mark.slow
def test_clean_ultrasound_read_by_ocr_is_published(server: Server) -> None:
    _, series, _ = server.store(ultrasound_with_text(Phi(), text=False))
    assert _state(server, series) == "published"
