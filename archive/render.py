"""Rendering of a stored image frame to JPEG or PNG for WADO-RS rendered and thumbnail
resources (PS3.18 8.3.5, 8.7.4): pydicom decodes the frame and applies the Modality LUT and the
VOI LUT or window (PS3.4 N.2 pipeline), Pillow crops, scales and encodes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from io import BytesIO
from typing import BinaryIO

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing
from pydicom.pixels import pixel_array as decode_frame

from .errors import StorageError
from .retrieve import DEFER_SIZE, PIXEL_TAGS, InvalidRequest, NotRetrievable

JPEG = "image/jpeg"
PNG = "image/png"
MEDIA_TYPES = (JPEG, PNG)
# Pillow's format names.
_FORMATS = {JPEG: "JPEG", PNG: "PNG"}
# PS3.18 8.3.5.1.4 names the VOI LUT functions of PS3.3 C.11.2.1.3 in lower case.
_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
DEFAULT_QUALITY = 90  # JPEG quality when the request names none (Orthanc's default too)
THUMBNAIL_SIZE = 128  # a thumbnail fits in this many pixels square unless a viewport is given
# Largest rendered side: a larger viewport is refused (PS3.18 8.3.5.1.3: a viewport that is not
# supported is a Bad Request) rather than allocating a huge image.
MAX_VIEWPORT = 8192
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and VOI LUT Function."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class Viewport:
    """The rendered size (vw x vh, fitted keeping the aspect ratio) and an optional source
    region (sx, sy, sw, sh); a negative sw or sh flips that axis (PS3.18 8.3.5.1.3)."""

    width: int | None
    height: int | None
    region: tuple[int, int, int, int] | None = None
    enlarge: bool = True  # False: only ever shrink to fit (a thumbnail of a small image)


@dataclass(frozen=True)
class Rendering:
    """How to render: output media type, window (None: the object's own), viewport, quality."""

    media_type: str = JPEG
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY

    def fitted(self, size: int) -> Rendering:
        """This rendering, shrunk to fit size x size unless the request gave a viewport."""
        return (
            self if self.viewport else replace(self, viewport=Viewport(size, size, enlarge=False))
        )


def parse_window(text: str) -> Window:
    """`window=center,width,function` (PS3.18 8.3.5.1.4)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise InvalidRequest(f"window must be center,width,function; got {text!r}")
    center, width = (_number(p, "window center and width") for p in parts[:2])
    function = _FUNCTIONS.get(parts[2].lower())
    if function is None:
        raise InvalidRequest(f"window function {parts[2]!r} is not one of {', '.join(_FUNCTIONS)}")
    # PS3.3 C.11.2.1.2.1: LINEAR needs a width of at least 1; the others a positive width.
    if width < 1 if function == "LINEAR" else width <= 0:
        raise InvalidRequest(f"window width {parts[1]} is too small for {parts[2]}")
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """`viewport=vw,vh[,sx,sy,sw,sh]` (PS3.18 8.3.5.1.3); vw or vh may be left empty."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise InvalidRequest(f"viewport must be vw,vh or vw,vh,sx,sy,sw,sh; got {text!r}")
    vw, vh = (
        _integer(p, "viewport vw and vh", minimum=1, maximum=MAX_VIEWPORT) if p else None
        for p in parts[:2]
    )
    if len(parts) == 2:
        if vw is None and vh is None:
            raise InvalidRequest("viewport names neither vw nor vh")
        return Viewport(vw, vh)
    sx, sy = (_integer(p, "viewport sx and sy", minimum=0) for p in parts[2:4])
    sw, sh = (_integer(p, "viewport sw and sh") for p in parts[4:])
    if sw == 0 or sh == 0:
        raise InvalidRequest("viewport sw and sh must not be 0")
    return Viewport(vw, vh, (sx, sy, sw, sh))


def parse_quality(text: str) -> int:
    """`quality=1..100` (PS3.18 8.3.5.1.2)."""
    return _integer(text, "quality", minimum=1, maximum=100)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"{what} must be numbers; got {text!r}") from None
    if not math.isfinite(value):
        raise InvalidRequest(f"{what} must be finite; got {text!r}")
    return value


def _integer(text: str, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidRequest(f"{what} must be integers; got {text!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f" from {minimum}"
        high = "" if maximum is None else f" to {maximum}"
        raise InvalidRequest(f"{what} must be{low}{high}; got {value}")
    return value


def check_frames(file: BinaryIO, numbers: list[int]) -> None:
    """InvalidRequest unless the stored image has every 1-based frame of numbers;
    NotRetrievable if it has no pixel data."""
    _check_frames(_header(file), numbers)


def _check_frames(ds: Dataset, numbers: list[int]) -> None:
    frames = int(ds.get("NumberOfFrames") or 1)
    for n in numbers:
        if n > frames:
            # PS3.18 9.5.2: a frame number beyond the instance's frames is a Bad Request.
            raise InvalidRequest(f"frame {n} is out of range: the instance has {frames}")


def render(file: BinaryIO, frame: int, rendering: Rendering) -> bytes:
    """The 1-based frame of the stored instance in file, rendered as asked."""
    image = render_image(file, frame, rendering.window, rendering.viewport)
    out = BytesIO()
    if rendering.media_type == JPEG:
        image.save(out, "JPEG", quality=rendering.quality)
    else:
        image.save(out, _FORMATS[rendering.media_type])
    return out.getvalue()


def render_image(
    file: BinaryIO, frame: int, window: Window | None = None, viewport: Viewport | None = None
) -> Image.Image:
    """The 1-based frame of the stored instance in file as 8-bit grey or RGB pixels (render's
    image before it is encoded)."""
    # The header is parsed once, by the decoder, which copies the pixel module (group 0028:
    # rescale, windows, LUTs, palettes) into ds.
    ds = Dataset()
    file.seek(0)
    try:
        arr = decode_frame(file, ds_out=ds, index=frame - 1)
    except (InvalidDicomError, EOFError) as e:
        raise StorageError(f"stored object cannot be parsed: {type(e).__name__}") from e
    except (ValueError, AttributeError, NotImplementedError, RuntimeError, KeyError) as e:
        _check_frames(ds, [frame])  # a frame past the last is the request's error
        if "PhotometricInterpretation" not in ds:
            raise NotRetrievable("the instance has no pixel data to render") from e
        raise NotRetrievable(f"the image cannot be decoded here ({type(e).__name__})") from e
    try:
        image = _to_image(arr, ds, window)
    except (ValueError, KeyError, AttributeError, IndexError, TypeError) as e:
        # A pixel module pydicom's LUT functions refuse (malformed palette or VOI LUT).
        raise NotRetrievable(f"the image cannot be rendered ({type(e).__name__})") from e
    return _apply_viewport(image, viewport)


def _header(file: BinaryIO) -> Dataset:
    file.seek(0)
    try:
        ds = dcmread(file, defer_size=DEFER_SIZE)
    except (InvalidDicomError, EOFError, ValueError) as e:
        raise StorageError(f"stored object cannot be parsed: {type(e).__name__}") from e
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise NotRetrievable("the instance has no pixel data to render")
    return ds


def _to_image(arr: np.ndarray, ds: Dataset, window: Window | None) -> Image.Image:
    """8-bit grey or RGB pixels of one decoded frame (PS3.4 N.2: Modality LUT, VOI, and
    Presentation LUT for grey; Palette Color LUT for palette images)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in _MONOCHROME:
        grey = _grey(arr, ds, window)
        if photometric == "MONOCHROME1":  # PS3.3 C.7.6.3.1.2: minimum is white
            grey = 255 - grey
        return Image.fromarray(grey, "L")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:  # RGB, or YBR already converted to RGB by pydicom's decoding
        rgb, bits = arr, int(ds.get("BitsStored") or 8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise NotRetrievable(f"photometric interpretation {photometric!r} is not rendered")
    if rgb.dtype == np.uint8 and bits == 8:
        return Image.fromarray(rgb, "RGB")
    return Image.fromarray(_scale(rgb, 0.0, float(2**bits - 1)), "RGB")


# Pixels of at most 16 bits go through a table of every value they can hold (the unsigned
# view indexes it): one lookup a pixel instead of several floating-point passes over a frame.
_TABLE_INDEX = {
    np.dtype(t): np.dtype(u)
    for t, u in (
        (np.int8, np.uint8),
        (np.uint8, np.uint8),
        (np.int16, np.uint16),
        (np.uint16, np.uint16),
    )
}


def _grey(arr: np.ndarray, ds: Dataset, window: Window | None) -> np.ndarray:
    """Stored values through the Modality LUT and the VOI transform, onto 0..255."""
    index = _TABLE_INDEX.get(arr.dtype)
    if index is None:  # 32-bit or float pixels: every pixel computed
        values = apply_modality_lut(arr, ds)
        return _voi(values, ds, window, float(values.min()), float(values.max()))
    # Only the values between the frame's least and greatest are computed (a CT's 12 bits,
    # not all 65536); the rest of the table is never looked up.
    low, high = arr.min(), arr.max()
    domain = np.arange(int(low), int(high) + 1).astype(arr.dtype)
    ends = apply_modality_lut(np.array([low, high], dtype=arr.dtype), ds)
    table = np.zeros(2 ** (8 * arr.itemsize), np.uint8)
    values = apply_modality_lut(domain, ds)
    table[domain.view(index)] = _voi(values, ds, window, float(ends.min()), float(ends.max()))
    # np.take: about half the time of table[...] for a frame of 16-bit indexes.
    return np.take(table, arr.view(index))


def _voi(
    values: np.ndarray, ds: Dataset, window: Window | None, low: float, high: float
) -> np.ndarray:
    """Modality values mapped to 0..255: by the requested window, else by the object's first
    VOI LUT or window, else linearly over low..high (the frame's whole dynamics)."""
    if window is None:
        if "VOILUTSequence" in ds:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return _scale(apply_voi(values, ds, index=0), 0.0, float(2**bits - 1))
        window = _object_window(ds)
    if window is None:
        return _scale(values, low, high)
    # An 8-bit unsigned output range: pydicom's PS3.3 C.11.2.1.2 math then yields 0..255.
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored = 8
    voi.PixelRepresentation = 0
    voi.WindowCenter = window.center
    voi.WindowWidth = window.width
    voi.VOILUTFunction = window.function
    return np.clip(np.rint(apply_windowing(values, voi)), 0, 255).astype(np.uint8)


def _object_window(ds: Dataset) -> Window | None:
    """The object's first window (PS3.3 C.11.2), if it has a usable one."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = (
        ds[k].value[0] if ds[k].VM > 1 else ds[k].value for k in ("WindowCenter", "WindowWidth")
    )
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    try:
        return parse_window(f"{float(center)},{float(width)},{function.lower().replace('_', '-')}")
    except (InvalidRequest, TypeError, ValueError):
        return None  # a malformed window in the object: fall back to the frame's range


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """values linearly from low..high to 0..255 (all 0 when the range is empty)."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    out = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _apply_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    """Crop to the source region (flipping on negative sizes), then fit the result into
    vw x vh keeping its aspect ratio."""
    if viewport is None:
        return image
    if viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        right = min(image.width, sx + abs(sw))
        bottom = min(image.height, sy + abs(sh))
        if sx >= image.width or sy >= image.height:
            raise InvalidRequest("viewport source region lies outside the image")
        image = image.crop((sx, sy, right, bottom))
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    scales = []
    if viewport.width is not None:
        scales.append(viewport.width / image.width)
    if viewport.height is not None:
        scales.append(viewport.height / image.height)
    if not scales:
        return image
    scale = min(scales) if viewport.enlarge else min(1.0, *scales)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)
