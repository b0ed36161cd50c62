"""Series geometry from DICOM JSON metadata: the figures IDC selects series by.

Input is what Carina stores per instance, the PS3.18 F.2 DICOM JSON model keyed by 8-hex tags (as
pydicom's ``Dataset.to_json_dict`` writes it). Output is a frozen ``Geometry`` of plain numbers and
flags, cheap to store per series and to search later.

Supported: single-frame image series (one slice per instance, geometry in the top-level Image Plane
module, PS3.3 C.7.6.2) and enhanced multi-frame instances whose frames carry Plane Position /
Plane Orientation / Pixel Measures in the per-frame or shared functional groups (PS3.3 C.7.6.16),
mixed freely. Frames of a multi-frame instance without per-frame positions (US cine, NM, XA) have
no slice geometry: ``Geometry.has_geometry`` is False and ``notes`` says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword

Metadata = Mapping[str, Any]
"""One instance's DICOM JSON dict: ``{"00200032": {"vr": "DS", "Value": [...]}, ...}``."""


@lru_cache(maxsize=512)
def json_key(keyword: str) -> str:
    """The DICOM JSON key (8 upper-case hex digits) of a dictionary keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return f"{tag:08X}"


def values(meta: Metadata | None, keyword: str) -> list[Any]:
    """The Value array of keyword in meta; empty when absent or empty (PS3.18 F.2.2)."""
    if not meta:
        return []
    element = meta.get(json_key(keyword))
    if not isinstance(element, Mapping):
        return []
    value = element.get("Value")
    return list(value) if isinstance(value, list) else []


def first(meta: Metadata | None, keyword: str) -> Any:
    """The first value of keyword in meta, or None."""
    found = values(meta, keyword)
    return found[0] if found else None


def text(meta: Metadata | None, keyword: str) -> str | None:
    """The first value of keyword as a string (PN as its Alphabetic group), or None."""
    value = first(meta, keyword)
    if value is None:
        return None
    if isinstance(value, Mapping):  # PN, PS3.18 F.2.2
        value = value.get("Alphabetic", "")
    return str(value)


def item(meta: Metadata | None, keyword: str) -> Metadata | None:
    """The first item of sequence keyword in meta, or None."""
    value = first(meta, keyword)
    return value if isinstance(value, Mapping) else None


def floats(meta: Metadata | None, keyword: str) -> list[float] | None:
    """The values of a numeric (DS/FD/IS) keyword as floats; None when absent or not numbers."""
    try:
        found = [float(v) for v in values(meta, keyword)]
    except (TypeError, ValueError):
        return None
    return found or None


@dataclass(frozen=True)
class GeometryTolerances:
    """How far figures may differ and still count as equal; tunable per collection."""

    # Direction cosines are written with ~6 significant digits; 1e-3 is about 0.06 degrees.
    orientation: float = 1e-3
    pixel_spacing: float = 1e-3  # mm
    position: float = 1e-3  # mm: two slices closer than this along the normal are duplicates
    spacing_relative: float = 0.01  # gaps within 1 % of the median gap are uniform
    spacing_absolute: float = 0.01  # mm, a floor for the above on thin slices
    tilt_degrees: float = 0.5  # stacking direction vs slice normal
    localizer_degrees: float = 45.0  # a slice this far off the stack's normal is orthogonal


@dataclass(frozen=True)
class Slice:
    """One frame's plane as read from metadata (all in the patient coordinate system, mm)."""

    instance: int
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    thickness: float | None
    localizer_type: bool


@dataclass(frozen=True)
class Geometry:
    """Figures of a series' geometry; booleans already apply the tolerances they were made with.

    The stack figures (orientation through tilt) are computed over the slices that are not
    localizers, so one localizer gives one finding and not also spacing and orientation findings.
    """

    instances: int
    frames: int
    has_geometry: bool
    multiframe: bool
    localizers: int
    slice_count: int
    orientation_consistent: bool
    orientation_deviation: float
    pixel_spacing_consistent: bool
    dimensions_consistent: bool
    positions_unique: bool
    duplicate_positions: int
    thickness_min: float | None
    thickness_max: float | None
    spacing_min: float | None
    spacing_max: float | None
    spacing_mean: float | None
    spacing_uniform: bool
    missing_slices: int
    tilt_degrees: float | None
    tilted: bool
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict, for storing per series."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _vector(meta: Metadata | None, keyword: str, length: int) -> tuple[float, ...] | None:
    found = floats(meta, keyword)
    return tuple(found) if found is not None and len(found) == length else None


def _is_localizer_type(meta: Metadata) -> bool:
    # PS3.3 C.8.2.1.1.1 / C.8.3.1.1.1: value 3 of ImageType is LOCALIZER for scout views.
    return any(str(v).upper() == "LOCALIZER" for v in values(meta, "ImageType"))


def _frame_group(groups: Metadata | None, sequence: str) -> Metadata | None:
    return item(groups, sequence) if groups else None


def slices_of(metadata: Sequence[Metadata]) -> tuple[list[Slice], list[str]]:
    """Every frame of every instance as a Slice, and notes on what could not be read."""
    out: list[Slice] = []
    notes: list[str] = []
    for index, meta in enumerate(metadata):
        localizer = _is_localizer_type(meta)
        per_frame = values(meta, "PerFrameFunctionalGroupsSequence")
        frames = int(first(meta, "NumberOfFrames") or 1)
        if per_frame:
            # PS3.3 C.7.6.16: a functional group is in the shared or the per-frame sequence.
            shared = item(meta, "SharedFunctionalGroupsSequence")
            for groups in per_frame:

                def pick(
                    sequence: str, groups: Metadata = groups, shared: Metadata | None = shared
                ) -> Metadata | None:
                    return _frame_group(groups, sequence) or _frame_group(shared, sequence)

                measures = pick("PixelMeasuresSequence")
                thickness = floats(measures, "SliceThickness")
                out.append(
                    Slice(
                        instance=index,
                        orientation=_vector(
                            pick("PlaneOrientationSequence"), "ImageOrientationPatient", 6
                        ),
                        position=_vector(pick("PlanePositionSequence"), "ImagePositionPatient", 3),
                        pixel_spacing=_vector(measures, "PixelSpacing", 2),
                        thickness=thickness[0] if thickness else None,
                        localizer_type=localizer,
                    )
                )
            continue
        if frames > 1:
            notes.append(f"instance {index + 1} has {frames} frames without per-frame positions")
        thickness = floats(meta, "SliceThickness")
        out.append(
            Slice(
                instance=index,
                orientation=_vector(meta, "ImageOrientationPatient", 6),
                position=_vector(meta, "ImagePositionPatient", 3),
                pixel_spacing=_vector(meta, "PixelSpacing", 2),
                thickness=thickness[0] if thickness else None,
                localizer_type=localizer,
            )
        )
    return out, notes


def _normal(orientation: Iterable[float]) -> np.ndarray:
    # PS3.3 C.7.6.2.1.1: the slice normal is the cross product of the row and column cosines.
    iop = np.asarray(list(orientation), dtype=float)
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def _reference(normals: np.ndarray, cos_tol: float) -> np.ndarray:
    """The normal most slices share (parallel or anti-parallel within cos_tol)."""
    agree = np.abs(normals @ normals.T) >= cos_tol
    return normals[int(np.argmax(agree.sum(axis=1)))]


def series_geometry(
    metadata: Sequence[Metadata], tolerances: GeometryTolerances | None = None
) -> Geometry:
    """The geometry figures of one series from its instances' DICOM JSON metadata."""
    tol = tolerances or GeometryTolerances()
    slices, notes = slices_of(metadata)
    multiframe = any(values(m, "PerFrameFunctionalGroupsSequence") for m in metadata) or any(
        int(first(m, "NumberOfFrames") or 1) > 1 for m in metadata
    )
    dims = {(first(m, "Rows"), first(m, "Columns")) for m in metadata}
    thicknesses = [s.thickness for s in slices if s.thickness is not None]
    base = {
        "instances": len(metadata),
        "frames": len(slices),
        "multiframe": multiframe,
        "dimensions_consistent": len(dims) <= 1,
        "thickness_min": min(thicknesses) if thicknesses else None,
        "thickness_max": max(thicknesses) if thicknesses else None,
    }
    placed = [s for s in slices if s.orientation is not None and s.position is not None]
    if not placed or len(placed) < len(slices):
        if slices and len(placed) < len(slices):
            notes.append(f"{len(slices) - len(placed)} of {len(slices)} frames have no plane")
        return Geometry(
            **base,
            has_geometry=False,
            localizers=sum(1 for s in slices if s.localizer_type),
            slice_count=len(slices),
            orientation_consistent=True,
            orientation_deviation=0.0,
            pixel_spacing_consistent=True,
            positions_unique=True,
            duplicate_positions=0,
            spacing_min=None,
            spacing_max=None,
            spacing_mean=None,
            spacing_uniform=True,
            missing_slices=0,
            tilt_degrees=None,
            tilted=False,
            notes=tuple(notes),
        )

    normals = np.array([_normal(s.orientation or ()) for s in placed])
    cos_loc = float(np.cos(np.radians(tol.localizer_degrees)))
    reference = _reference(normals, cos_loc)
    # A localizer is typed as one (ImageType LOCALIZER) or is a minority slice whose plane is
    # roughly orthogonal to the rest (a scout stored in the axial series, as IDC excludes).
    off_axis = np.abs(normals @ reference) < cos_loc
    is_localizer = np.array([s.localizer_type for s in placed]) | (
        off_axis if off_axis.sum() * 2 < len(placed) else np.zeros(len(placed), dtype=bool)
    )
    stack = [s for s, loc in zip(placed, is_localizer, strict=True) if not loc]
    if not stack:  # a series of localizers only: describe it as it is
        stack = placed

    iops = np.array([s.orientation for s in stack], dtype=float)
    deviation = float(np.max(np.abs(iops - iops[0]))) if len(stack) > 1 else 0.0
    spacings = [s.pixel_spacing for s in stack if s.pixel_spacing is not None]
    spacing_ok = len(spacings) == len(stack) and all(
        max(abs(a - b) for a, b in zip(sp, spacings[0], strict=True)) <= tol.pixel_spacing
        for sp in spacings
    )

    normal = _normal(iops[0])
    positions = np.array([s.position for s in stack], dtype=float)
    # IDC / dcm2niix: order slices by the projection of ImagePositionPatient on the normal.
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    along = positions @ normal
    gaps = np.diff(along)
    duplicates = int(np.sum(np.abs(gaps) <= tol.position))
    real_gaps = gaps[np.abs(gaps) > tol.position]

    spacing_min = spacing_max = spacing_mean = None
    uniform = True
    missing = 0
    tilt: float | None = None
    if len(real_gaps):
        spacing_min = float(real_gaps.min())
        spacing_max = float(real_gaps.max())
        spacing_mean = float(real_gaps.mean())
        # The nominal gap is the median: one missing slice doubles one gap, not the median.
        nominal = float(np.median(real_gaps))
        allowed = max(nominal * tol.spacing_relative, tol.spacing_absolute)
        uniform = bool(np.all(np.abs(real_gaps - nominal) <= allowed))
        if not uniform and nominal > 0:
            missing = int(sum(max(round(g / nominal) - 1, 0) for g in real_gaps))
        # Tilt: every step between neighbouring distinct positions must run along the normal.
        # Gantry tilt shears the whole stack; one displaced slice bends two steps.
        steps = np.diff(positions, axis=0)
        steps = steps[np.linalg.norm(steps, axis=1) > tol.position]
        cosines = np.abs(steps @ normal) / np.linalg.norm(steps, axis=1)
        tilt = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))

    return Geometry(
        **base,
        has_geometry=True,
        localizers=int(is_localizer.sum()),
        slice_count=len(stack),
        orientation_consistent=deviation <= tol.orientation,
        orientation_deviation=deviation,
        pixel_spacing_consistent=spacing_ok,
        positions_unique=duplicates == 0,
        duplicate_positions=duplicates,
        spacing_min=spacing_min,
        spacing_max=spacing_max,
        spacing_mean=spacing_mean,
        spacing_uniform=uniform,
        missing_slices=missing,
        tilt_degrees=tilt,
        tilted=tilt is not None and tilt > tol.tilt_degrees,
        notes=tuple(notes),
    )
