"""Pixel redaction of one dataset (curation/redaction.py) across pixel layouts: signed and
unsigned, multi-frame with a frame list, colour interleaved and planar, YBR, compressed
(decoded and stored Explicit VR Little Endian), and the refusals of what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from carina.curation.errors import ChangeRefused
from carina.curation.redaction import Rectangle, Redaction, redact_dataset
from tests.factory import Phi, ct_instance

BOX = Rectangle(x=2, y=1, width=3, height=4)


def image(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", planar: int | None = None
) -> Dataset:
    """A de-identified-looking instance holding pixels ((frames,) rows, columns(, samples))."""
    ds = ct_instance(Phi(), 1, rows=8, columns=8)
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    frames = pixels.shape[0] if pixels.ndim == (4 if samples == 3 else 3) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if samples == 3 else pixels.shape[-2:]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if frames > 1:
        ds.NumberOfFrames = frames
    if samples == 3:
        ds.PlanarConfiguration = planar or 0
        if planar:
            pixels = np.moveaxis(pixels, -1, -3)  # samples before rows and columns
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def inside(shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    mask[BOX.y : BOX.y + BOX.height, BOX.x : BOX.x + BOX.width] = True
    return mask


def test_unsigned_frames_listed_are_blanked_to_zero_and_the_others_kept() -> None:
    sent = np.random.default_rng(1).integers(1, 255, size=(3, 8, 8), dtype=np.uint8)
    ds = image(sent)
    redact_dataset(ds, Redaction((BOX,), frames=(2,)))
    got = ds.pixel_array
    mask = inside((8, 8))
    assert (got[1][mask] == 0).all() and (got[1][~mask] == sent[1][~mask]).all()
    assert (got[0] == sent[0]).all() and (got[2] == sent[2]).all()
    assert ds.BurnedInAnnotation == "NO"


def test_signed_pixels_take_the_minimum_of_bits_stored() -> None:
    sent = np.full((8, 8), 100, np.int16)
    ds = image(sent)
    ds.BitsStored, ds.HighBit = 12, 11
    redact_dataset(ds, Redaction((BOX,)))
    assert (ds.pixel_array[inside((8, 8))] == -2048).all()


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_is_blanked_to_black_in_either_planar_configuration(planar: int) -> None:
    sent = np.full((8, 8, 3), 200, np.uint8)
    sent[..., 1] = 150
    ds = image(sent, "RGB", planar)
    redact_dataset(ds, Redaction((BOX,)))
    got = ds.pixel_array
    mask = inside((8, 8))
    assert (got[mask] == 0).all() and (got[~mask] == sent[~mask]).all()
    assert int(ds.PlanarConfiguration) == planar


def test_ybr_full_is_blanked_to_its_black() -> None:
    ds = image(np.full((8, 8, 3), 90, np.uint8), "YBR_FULL")
    redact_dataset(ds, Redaction((BOX,)))
    raw = np.frombuffer(ds.PixelData, np.uint8).reshape(8, 8, 3)
    assert (raw[inside((8, 8))] == [0, 128, 128]).all()


def test_compressed_pixels_are_decoded_and_stored_explicit_vr_little_endian() -> None:
    ds = ct_instance(Phi(), 1, rows=16, columns=16)
    sent = ds.pixel_array.copy()
    ds.compress(RLELossless, generate_instance_uid=False)
    uid = ds.SOPInstanceUID
    redact_dataset(ds, Redaction((BOX,)))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds.SOPInstanceUID == uid
    mask = np.zeros((16, 16), bool)
    mask[BOX.y : BOX.y + BOX.height, BOX.x : BOX.x + BOX.width] = True
    assert (ds.pixel_array[mask] == -32768).all() and (ds.pixel_array[~mask] == sent[~mask]).all()


def test_redaction_is_recorded_in_the_deidentification_codes_once() -> None:
    ds = image(np.ones((8, 8), np.uint8))
    icon = Dataset()
    icon.Rows = 1
    ds.IconImageSequence = [icon]
    redact_dataset(ds, Redaction((BOX,)))
    redact_dataset(ds, Redaction((BOX,)))
    codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
    assert codes.count(("113101", "DCM")) == 1 and "IconImageSequence" not in ds


@pytest.mark.parametrize(
    ("redaction", "said"),
    [
        (Redaction((Rectangle(6, 0, 3, 1),)), "outside the 8x8 image"),
        (Redaction((Rectangle(0, 0, 0, 1),)), "empty"),
        (Redaction((BOX,), frames=(2,)), "frame 2 is not one of the 1"),
    ],
)
def test_what_does_not_fit_the_image_is_refused_and_changes_nothing(
    redaction: Redaction, said: str
) -> None:
    ds = image(np.ones((8, 8), np.uint8))
    before = ds.PixelData
    with pytest.raises(ChangeRefused, match=said):
        redact_dataset(ds, redaction)
    assert ds.PixelData == before and "BurnedInAnnotation" not in ds


def test_an_instance_without_pixel_data_is_refused() -> None:
    ds = image(np.ones((8, 8), np.uint8))
    del ds.PixelData
    with pytest.raises(ChangeRefused, match="no Pixel Data"):
        redact_dataset(ds, Redaction((BOX,)))
