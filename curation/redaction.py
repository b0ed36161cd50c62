"""Pixel redaction by curators: rectangles of a held series' frames overwritten in the stored
de-identified instances (PS3.15 E.3.1 Clean Pixel Data Option, done by a human operator).

- Coordinates are pixels of the stored image: x is the column and y the row of the top left
  corner, 0-based from the top left of the frame; width and height are at least 1, and the
  rectangle must lie inside the image (Columns x Rows) of every instance it applies to.
- Fill value: the minimum of the stored range (0 for unsigned pixel data, -2^(BitsStored-1)
  for signed), black on MONOCHROME2, RGB and PALETTE COLOR index 0 (white on MONOCHROME1,
  PS3.3 C.7.6.3.1.2); YBR_FULL gets luminance 0 and mid chrominance, its black.
- The redacted instance says so: BurnedInAnnotation (0028,0301) NO, as E.3.1 asks, and the
  Clean Pixel Data Option code (CID 7050 113101) added to DeidentificationMethodCodeSequence;
  the burned-in text rule no longer holds the instance on a later evaluation (rules.py
  pixels_cleaned). An icon image (IconImageSequence) could show the text again: it is removed.
- Compressed stored transfer syntaxes are decoded (pydicom's decoders) and the redacted
  instance is stored as Explicit VR Little Endian: every reader takes it, lossy pixel data is
  not compressed a second time (LossyImageCompression stays, or becomes, 01, PS3.3
  C.7.6.1.1.5), and WADO-RS still serves it in a lossless compressed syntax when asked.
- UIDs are kept. PS3.15 E.1 makes the de-identified instance a new one (its UIDs replaced, or
  retained under Retain UIDs with its header already changed), and a held series has never
  been released: the redacted pixels are the first content ever published under these UIDs,
  as in TCIA's curation, where redaction is part of de-identification before publication.
  Keeping them also keeps references from other objects and the pseudonym mapping valid.

Each redaction is recorded per instance in pixel_redactions (migration 016) and audited, so
it can be applied again (recorded, rewrite.reapply) to an instance de-identified anew from its
original."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from carina.archive.storage import ObjectStore
from carina.archive.transcode import LOSSY

from . import rewrite
from .errors import ChangeRefused
from .rules import CLEAN_PIXEL_DATA

CLEAN_PIXEL_DATA_MEANING = "Clean Pixel Data Option"


@dataclass(frozen=True)
class Rectangle:
    """A region of a frame, in pixels: top left corner (x column, y row), width and height."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Redaction:
    """Rectangles to blank in the chosen frames (1-based; None: every frame)."""

    rectangles: tuple[Rectangle, ...]
    frames: tuple[int, ...] | None = None


def redact_dataset(ds: Dataset, redaction: Redaction) -> None:
    """Blank the redaction's rectangles in ds's pixel data (decoded first when compressed) and
    mark the instance cleaned; ChangeRefused when the redaction does not fit the image."""
    sop = ds.get("SOPInstanceUID", "")
    if "PixelData" not in ds:
        raise ChangeRefused(f"instance {sop} has no Pixel Data to redact")
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    for r in redaction.rectangles:
        if r.width < 1 or r.height < 1 or r.x < 0 or r.y < 0:
            raise ChangeRefused(f"rectangle {asdict(r)} is empty or has a negative corner")
        if r.x + r.width > columns or r.y + r.height > rows:
            raise ChangeRefused(
                f"rectangle {asdict(r)} lies outside the {columns}x{rows} image of instance {sop}"
            )
    chosen = range(1, frames + 1) if redaction.frames is None else redaction.frames
    outside = [f for f in chosen if not 1 <= f <= frames]
    if outside:
        raise ChangeRefused(f"frame {outside[0]} is not one of the {frames} of instance {sop}")
    pixels = _pixels(ds, rows, columns, frames)
    fill = _fill(ds)
    # A view (frames, rows, columns[, samples]) of the stored layout, planar colour included.
    view = pixels
    if pixels.ndim == 4 and int(ds.get("PlanarConfiguration") or 0) == 1:
        view = pixels.transpose(0, 2, 3, 1)  # stored (frames, samples, rows, columns)
    value = fill if pixels.ndim == 4 else fill[0]
    for number in chosen:
        for r in redaction.rectangles:
            view[number - 1, r.y : r.y + r.height, r.x : r.x + r.width] = value
    ds.PixelData = pixels.tobytes() + ds.PixelData[pixels.nbytes :]  # any padding byte kept
    _mark_cleaned(ds)


def _pixels(ds: Dataset, rows: int, columns: int, frames: int) -> np.ndarray:
    """A writable copy of ds's native pixel data, shaped (frames, rows, columns[, samples]) or
    (frames, samples, rows, columns) for planar colour; compressed pixel data is decoded and
    the transfer syntax becomes Explicit VR Little Endian."""
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if not ts.is_little_endian:
        raise ChangeRefused(f"pixel data in {ts.name or ts} (big endian) cannot be redacted")
    if ts.is_compressed:
        try:
            ds.decompress(as_rgb=False, generate_instance_uid=False)
        except Exception as e:  # no decoder installed, or a corrupt stream
            raise ChangeRefused(
                f"the pixel data ({ts.name or ts}) cannot be decoded for redaction: "
                f"{type(e).__name__}"
            ) from e
        if ts in LOSSY:
            ds.LossyImageCompression = "01"  # PS3.3 C.7.6.1.1.5: once lossy, always lossy
    bits = int(ds.BitsAllocated)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if bits not in (8, 16, 32) or photometric == "YBR_FULL_422":
        raise ChangeRefused(
            f"pixel data of {bits} bits allocated, {photometric or 'no'} photometric"
            " interpretation cannot be redacted"
        )
    samples = int(ds.get("SamplesPerPixel") or 1)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    count = frames * rows * columns * samples
    if len(ds.PixelData) < count * dtype.itemsize:
        raise ChangeRefused("the pixel data is shorter than the image description says")
    flat = np.frombuffer(ds.PixelData, dtype, count=count).copy()
    if samples == 1:
        return flat.reshape(frames, rows, columns)
    if int(ds.get("PlanarConfiguration") or 0) == 1:
        return flat.reshape(frames, samples, rows, columns)
    return flat.reshape(frames, rows, columns, samples)


def _fill(ds: Dataset) -> np.ndarray:
    """The fill value per sample (see the module's docstring)."""
    samples = int(ds.get("SamplesPerPixel") or 1)
    stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
        middle = 1 << (stored - 1)
        return np.array([0] + [middle] * (samples - 1))
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    return np.array([-(1 << (stored - 1)) if signed else 0] * samples)


def _mark_cleaned(ds: Dataset) -> None:
    """BurnedInAnnotation NO, the Clean Pixel Data Option among the de-identification method
    codes (once), and no icon image left to show what was redacted."""
    ds.BurnedInAnnotation = "NO"
    codes = ds.get("DeidentificationMethodCodeSequence") or DicomSequence()
    if not any(
        (c.get("CodeValue"), c.get("CodingSchemeDesignator")) == CLEAN_PIXEL_DATA for c in codes
    ):
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = CLEAN_PIXEL_DATA
        code.CodeMeaning = CLEAN_PIXEL_DATA_MEANING
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = codes
    if "IconImageSequence" in ds:
        del ds.IconImageSequence


def redact(
    pool: ConnectionPool,
    store: ObjectStore,
    staging_dir: Path,
    series_uid: str,
    actor: str,
    reason: str,
    redaction: Redaction,
    sops: Sequence[str] | None = None,
) -> int:
    """Redact the instances sops (None: every one) of a held series, record and audit it; the
    number of instances redacted."""

    def record(conn: Connection, held: rewrite.Held) -> None:
        rectangles = Jsonb([asdict(r) for r in redaction.rectangles])
        frames = None if redaction.frames is None else list(redaction.frames)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO pixel_redactions (series_uid, sop_uid, frames, rectangles, actor,"
                " reason) VALUES (%s, %s, %s, %s, %s, %s)",
                [(series_uid, t.sop_uid, frames, rectangles, actor, reason) for t in held.targets],
            )
        after = {
            "instances": [t.sop_uid for t in held.targets],
            "frames": frames or "all",
            "rectangles": rectangles.obj,
            "BurnedInAnnotation": "NO",
        }
        rewrite.audited(conn, held, actor, "redact", reason, after)

    held = rewrite.apply(
        pool,
        store,
        staging_dir,
        series_uid,
        sops,
        lambda ds, _: redact_dataset(ds, redaction),
        record,
    )
    return len(held.targets)


def recorded(conn: Connection, series_uid: str) -> list[tuple[str, Redaction]]:
    """The redactions recorded for a series' instances, oldest first, as (SOP Instance UID,
    redaction): what a reprocess that de-identifies the instances anew applies again
    (rewrite.reapply with redact_dataset), so no redacted pixel comes back."""
    rows = conn.execute(
        "SELECT sop_uid, frames, rectangles FROM pixel_redactions WHERE series_uid = %s"
        " ORDER BY pk",
        (series_uid,),
    ).fetchall()
    return [
        (sop, Redaction(tuple(Rectangle(**r) for r in rects), None if f is None else tuple(f)))
        for sop, f, rects in rows
    ]
