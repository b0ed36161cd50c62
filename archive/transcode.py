"""Transcoding of a stored instance to another transfer syntax for WADO-RS (PS3.18 8.7.3.5),
with pydicom's own pixel data decoders and encoders (and the plugins installed for them).

Only lossless targets are produced, so the pixel values a client decodes are those stored. The
rest of the data set is kept as stored; pydicom changes what re-encoding requires (see
`transcode`)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from io import BytesIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from .errors import StorageError
from .retrieve import NotRetrievable

# Any transfer syntax, as stored (PS3.18 8.7.3.5.2).
AS_STORED = "*"
# No transfer syntax asked for: PS3.18 8.7.3.4 / 8.7.8.2 make Explicit VR Little Endian the
# default, "unless the origin server has only access to the pixel data in lossy compressed
# form" (then it is sent as stored, as it is when it cannot be decoded here).
DEFAULT = "default"
# Lossy (or possibly lossy) stored forms, sent as stored when the default is asked for.
LOSSY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy allowed)
    }
)
# Native syntaxes pydicom writes from any little-endian data set without touching pixel data.
NATIVE_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
# Lossless compressed syntaxes, most widely supported first; offered when an encoder is installed
# (RLE is pydicom's own; JPEG-LS needs pyjpegls, JPEG 2000 pylibjpeg-openjpeg). Lossy targets
# are never produced: a client that asks only for those gets a 406.
COMPRESSED_TARGETS = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
# Sources pydicom reads without a pixel data decoder. Explicit VR Big Endian (retired) is not
# one: pydicom does not convert between big and little endian when writing.
NATIVE_SOURCES = frozenset(NATIVE_TARGETS)


@cache
def targets() -> tuple[str, ...]:
    """The transfer syntaxes an instance can be transcoded to here, in order of preference."""
    encodable = tuple(ts for ts in COMPRESSED_TARGETS if _encoder_available(ts))
    return (*NATIVE_TARGETS, *encodable)


@cache
def can_decode(transfer_syntax: str) -> bool:
    """Whether instances stored in transfer_syntax can be transcoded (decoded) here."""
    ts = UID(transfer_syntax)
    if ts in NATIVE_SOURCES:
        return True
    if not ts.is_transfer_syntax or not ts.is_encapsulated:
        return False
    try:
        return bool(get_decoder(ts).is_available)
    except NotImplementedError:  # no decoder for this syntax in pydicom at all
        return False


def _encoder_available(ts: str) -> bool:
    encoder = get_encoder(ts)
    return encoder is not None and bool(encoder.is_available)


def producible(stored: str, acceptable: Sequence[str]) -> list[str]:
    """The transfer syntaxes of acceptable (in order) an instance stored in stored can be sent
    in: stored itself where "*" or stored is listed, else what it can be transcoded to."""
    out: list[str] = []
    for ts in acceptable:
        if ts == DEFAULT:
            lossless_decodable = stored not in LOSSY and can_decode(stored)
            ts = ExplicitVRLittleEndian if lossless_decodable else stored
        if ts in (AS_STORED, stored):
            choice = stored
        elif ts in targets() and can_decode(stored):
            choice = ts
        else:
            continue
        if choice not in out:
            out.append(choice)
    return out


def transcode(data: bytes, stored: str, choices: Sequence[str]) -> tuple[bytes, str]:
    """The instance (a PS3.10 file in transfer syntax stored) in the first of choices it can be
    encoded in, and that syntax. choices come from `producible`.

    Decoding is lossless and keeps SOPInstanceUID; pydicom sets what the decoded form requires:
    PhotometricInterpretation YBR_FULL_422 becomes YBR_FULL, YBR_ICT/YBR_RCT become RGB, and
    PlanarConfiguration follows the decoder's output. An encoder that refuses the image (bit
    depth, photometric interpretation) passes to the next choice; NotRetrievable when none is
    left (for an image without pixel data any compressed syntax works: only the pixel data is
    encapsulated, PS3.5 A.4)."""
    failures: list[str] = []
    for ts in choices:
        if ts == stored:
            return data, stored
        ds = _read(data)
        try:
            return _encode(ds, stored, UID(ts)), ts
        except (ValueError, RuntimeError, NotImplementedError, TypeError) as e:
            failures.append(f"{UID(ts).name}: {type(e).__name__}")
    raise NotRetrievable(
        f"the instance stored as {UID(stored).name or stored} could not be encoded in any "
        f"acceptable transfer syntax ({'; '.join(failures)})"
    )


def _read(data: bytes) -> object:
    try:
        return dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError) as e:
        raise StorageError(f"stored object cannot be parsed: {type(e).__name__}") from e


def _encode(ds: object, stored: str, target: UID) -> bytes:
    """ds (read from a file in stored) written in target."""
    has_pixels = "PixelData" in ds  # type: ignore[operator]
    if UID(stored).is_encapsulated and has_pixels:
        # Lossless decoding of what is stored: the object stays the same instance (no new UID);
        # colour stays in its stored space (as_rgb=False) so pixel values are kept exactly.
        ds.decompress(as_rgb=False, generate_instance_uid=False)  # type: ignore[attr-defined]
    if target.is_encapsulated and has_pixels:
        ds.compress(target, generate_instance_uid=False)  # type: ignore[attr-defined]
    else:
        # Native target, or no pixel data: every element is written in target's encoding.
        ds.file_meta.TransferSyntaxUID = target  # type: ignore[attr-defined]
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)  # type: ignore[attr-defined]
    return out.getvalue()
