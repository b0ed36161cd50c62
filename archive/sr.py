"""SR content trees read as far as they are valid: the measurement groups of a TID 1500
Measurement Report, their numeric measurements, and every SCOORD3D item (3D landmarks and
regions). Each group is parsed with highdicom on its own, so one bad content item costs only
itself: it is left out and named in the object's problems, and the rest is indexed."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import highdicom as hd
from pydicom.dataset import Dataset

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"  # PS3.4 B.5 (Sup 243)
SEGMENTATIONS = frozenset({SEGMENTATION, LABEL_MAP_SEGMENTATION})
# PS3.16 concept names of the TID 1500 structure.
_IMAGING_MEASUREMENTS = ("126010", "DCM")
_MEASUREMENT_GROUP = ("125007", "DCM")
# PS3.16 CID 7181 / DCM 121232 "Source series for segmentation" (a UIDREF item).
_SOURCE_SERIES_FOR_SEGMENTATION = ("121232", "DCM")
# The measurement group templates, in the order highdicom's MeasurementReport tells them apart.
_GROUP_TEMPLATES: list[tuple[str, Any]] = [
    ("1410", hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations),
    ("1411", hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations),
    ("1501", hd.sr.MeasurementsAndQualitativeEvaluations),
]
_MISSING = re.compile(r"has no attribute '(\w+)'")


class StoredObject(Protocol):
    """What a row needs of the stored instance."""

    collection: str
    sop_uid: str
    series_uid: str
    study_uid: str


@dataclass
class SrContent:
    """What was indexed of one SR, and what was not (sentences)."""

    measurements: list[dict[str, Any]] = field(default_factory=list)
    landmarks: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Group:
    """A measurement group highdicom accepted, with what its rows share."""

    index: int
    template: str
    parsed: Any
    source_series_uid: str | None


def read(record: StoredObject, ds: Dataset) -> SrContent:
    """The measurements and landmarks of an SR, with the problems met on the way."""
    out = SrContent()
    evidence = _evidence(ds)
    groups: dict[int, _Group] = {}
    for index, item in enumerate(_measurement_groups(ds)):
        parsed = _parse_group(record, index, item, evidence, out.problems)
        if parsed is not None:
            groups[id(item)], rows = parsed
            out.measurements += rows
    out.landmarks = _landmark_rows(record, ds, groups, evidence, out.problems)
    return out


def label(ds: Dataset) -> str | None:
    """The document title (the root content item's concept name)."""
    name = _name(ds)
    return str(name.get("CodeMeaning", "")) or None if name is not None else None


# ---------------------------------------------------------------------------------------------
# The tree


def _name(item: Dataset) -> Dataset | None:
    names = item.get("ConceptNameCodeSequence")
    return names[0] if names else None


def _is(item: Dataset, concept: tuple[str, str]) -> bool:
    name = _name(item)
    return (
        name is not None
        and (name.get("CodeValue"), name.get("CodingSchemeDesignator")) == concept
        and item.get("ValueType") == "CONTAINER"
    )


def _describe(item: Dataset) -> str:
    """A content item as a reader finds it: value type and concept, e.g. NUM SCT:118565006."""
    name = _name(item)
    concept = (
        f"{name.get('CodingSchemeDesignator')}:{name.get('CodeValue')} ({name.get('CodeMeaning')})"
        if name is not None
        else "without a concept name"
    )
    return f"{item.get('ValueType', 'item without ValueType')} {concept}"


def why(error: Exception) -> str:
    """A short reason from a highdicom or pydicom error: its first line only, which names
    what is wrong; the lines after it can dump the offending item's values."""
    text = str(error).split("\n", 1)[0].rstrip(":")
    missing = _MISSING.search(text)
    if isinstance(error, AttributeError) and missing:
        return f"{missing.group(1)} is missing"
    return f"{type(error).__name__}: {text[:160]}"


def _measurement_groups(ds: Dataset) -> list[Dataset]:
    """The Measurement Group containers of a TID 1500 report (none in other SRs)."""
    templates = ds.get("ContentTemplateSequence") or [Dataset()]
    if templates[0].get("TemplateIdentifier") != "1500":
        return []
    return [
        group
        for container in ds.get("ContentSequence", [])
        if _is(container, _IMAGING_MEASUREMENTS)
        for group in container.get("ContentSequence", [])
        if _is(group, _MEASUREMENT_GROUP)
    ]


def _content_items(item: Dataset) -> Iterator[Dataset]:
    """Every content item below item, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _content_items(child)


def _evidence(ds: Dataset) -> dict[str, str]:
    """SOP instance UID -> series UID of every instance the SR names as evidence."""
    found = {}
    for key in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(key, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for sop in series.get("ReferencedSOPSequence", []):
                    if "ReferencedSOPInstanceUID" in sop and "SeriesInstanceUID" in series:
                        found[str(sop.ReferencedSOPInstanceUID)] = str(series.SeriesInstanceUID)
    return found


# ---------------------------------------------------------------------------------------------
# Measurement groups


def _parse_group(
    record: StoredObject,
    index: int,
    item: Dataset,
    evidence: dict[str, str],
    problems: list[str],
) -> tuple[_Group, list[dict[str, Any]]] | None:
    """The group as highdicom reads it once the content items it refuses are left out, and
    its measurement rows; None (and a problem) when no group template reads it."""
    where = f"measurement group {index + 1}"
    pruned = copy.deepcopy(item)
    kept = []
    for child in pruned.get("ContentSequence", []):
        try:
            hd.sr.ContentSequence.from_sequence([child], is_root=False)
        except Exception as e:  # highdicom raises many kinds; each means "not valid"
            problems.append(f"{where}: {_describe(child)} left out: {why(e)}")
        else:
            kept.append(child)
    if not kept:  # highdicom would read an empty container as a TID 1501 group
        problems.append(f"{where} not indexed: it has no valid content items")
        return None
    pruned.ContentSequence = kept
    reasons = []
    for template, cls in _GROUP_TEMPLATES:
        try:
            parsed = cls.from_sequence([pruned])
            group = _Group(index, template, parsed, _group_source_series(parsed, evidence))
            # highdicom checks some of a group only when asked (its ROI reference type).
            return group, _measurement_rows(record, group)
        except Exception as e:
            reasons.append(f"TID {template}: {why(e)}")
    problems.append(f"{where} not indexed: " + "; ".join(reasons))
    return None


def _group_source_series(group: Any, evidence: dict[str, str]) -> str | None:
    """The image series a measurement group was made on: a "Source series for segmentation"
    UIDREF, else the series (from the SR's evidence) of the first image it references that is
    not a SEG, else the series of the evidence when there is only one."""
    images = []
    for item in _content_items(group[0]):
        kind = item.get("ValueType")
        if kind == "UIDREF":
            name = item.ConceptNameCodeSequence[0]
            if (name.CodeValue, name.CodingSchemeDesignator) == _SOURCE_SERIES_FOR_SEGMENTATION:
                return str(item.UID)
        elif kind == "IMAGE" and "ReferencedSOPSequence" in item:
            ref = item.ReferencedSOPSequence[0]
            if ref.ReferencedSOPClassUID not in SEGMENTATIONS:
                images.append(str(ref.ReferencedSOPInstanceUID))
    for sop in images:
        if sop in evidence:
            return evidence[sop]
    series = set(evidence.values())
    return series.pop() if len(series) == 1 else None


def code_columns(prefix: str, code: Any) -> dict[str, str | None]:
    """A coded concept as the three columns prefix_value, prefix_scheme, prefix_meaning."""
    if code is None:
        return {f"{prefix}_value": None, f"{prefix}_scheme": None, f"{prefix}_meaning": None}
    return {
        f"{prefix}_value": str(code.value),
        f"{prefix}_scheme": str(code.scheme_designator),
        f"{prefix}_meaning": str(code.meaning),
    }


def code_json(code: Any) -> dict[str, str]:
    """A coded concept as a JSON object."""
    return {
        "value": str(code.value),
        "scheme": str(code.scheme_designator),
        "meaning": str(code.meaning),
    }


def _referenced_segment(group: Any) -> tuple[str | None, int | None]:
    """The SEG instance and segment number a ROI group references, if it does."""
    ref = None
    if isinstance(group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
        ref = group.referenced_segment
    elif isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
        ref = group.referenced_segmentation_frame
    if ref is None:
        return None, None
    numbers = ref.referenced_segment_numbers
    return str(ref.referenced_sop_instance_uid), (int(numbers[0]) if numbers else None)


def _group_columns(record: StoredObject, group: _Group) -> dict[str, Any]:
    """The columns every row of a group shares: its object, place, tracking and finding."""
    g = group.parsed
    return {
        "sop_uid": record.sop_uid,
        "series_uid": record.series_uid,
        "study_uid": record.study_uid,
        "collection": record.collection,
        "group_index": group.index,
        "tracking_id": g.tracking_identifier,
        "tracking_uid": g.tracking_uid,
        **code_columns("finding", g.finding_type),
        "source_series_uid": group.source_series_uid,
    }


def _measurement_rows(record: StoredObject, group: _Group) -> list[dict[str, Any]]:
    """One row per numeric measurement of a group (TID 300)."""
    g = group.parsed
    seg_sop, segment_number = _referenced_segment(g)
    evaluations = [
        {"concept": code_json(e.name), "value": code_json(e.value)}
        for e in g.get_qualitative_evaluations()
    ]
    common = {
        **_group_columns(record, group),
        "group_template": group.template,
        "referenced_seg_sop_uid": seg_sop,
        "referenced_segment_number": segment_number,
        "evaluations": json.dumps(evaluations),
    }
    rows = []
    for m in g.get_measurements():
        sites = m.finding_sites or g.finding_sites
        rows.append(
            {
                **common,
                **code_columns("finding_site", sites[0].value if sites else None),
                **code_columns("concept", m.name),
                "value": float(m.value),
                "unit_value": str(m.unit.value),
                "unit_meaning": str(m.unit.meaning),
                **code_columns("derivation", m.derivation),
                **code_columns("method", m.method or g.method),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Landmarks


def _scoord3d_items(item: Dataset, group: Dataset | None = None) -> Iterator[tuple[Dataset, Any]]:
    """(SCOORD3D item, the measurement group container holding it or None), depth first."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "SCOORD3D":
            yield child, group
        inner = child if _is(child, _MEASUREMENT_GROUP) else group
        yield from _scoord3d_items(child, inner)


def _landmark_rows(
    record: StoredObject,
    ds: Dataset,
    groups: dict[int, _Group],
    evidence: dict[str, str],
    problems: list[str],
) -> list[dict[str, Any]]:
    """One row per SCOORD3D item (PS3.3 C.18.9), with its group's tracking and finding."""
    rows = []
    for index, (item, container) in enumerate(_scoord3d_items(ds)):
        group = groups.get(id(container)) if container is not None else None
        try:
            rows.append(_landmark_row(record, index, item, group, evidence))
        except Exception as e:  # highdicom raises many kinds; each means "not valid"
            problems.append(f"SCOORD3D item {index + 1} ({_describe(item)}) left out: {why(e)}")
    return rows


def _landmark_row(
    record: StoredObject,
    index: int,
    item: Dataset,
    group: _Group | None,
    evidence: dict[str, str],
) -> dict[str, Any]:
    scoord = hd.sr.Scoord3DContentItem.from_dataset(item)
    points = [[float(c) for c in point] for point in scoord.value]
    return {
        **_landmark_context(record, group, evidence),
        "item_index": index,
        **code_columns("concept", scoord.name),
        "graphic_type": scoord.graphic_type.value,
        "coordinates": json.dumps(points),
        "frame_of_reference_uid": str(scoord.frame_of_reference_uid),
        "fiducial_uid": str(item.FiducialUID) if "FiducialUID" in item else None,
    }


def _landmark_context(
    record: StoredObject, group: _Group | None, evidence: dict[str, str]
) -> dict[str, Any]:
    """The group columns of a landmark: its measurement group's, or none but the source series
    when the SR's evidence names only one."""
    if group is None:
        series = set(evidence.values())
        return {
            "sop_uid": record.sop_uid,
            "series_uid": record.series_uid,
            "study_uid": record.study_uid,
            "collection": record.collection,
            "group_index": None,
            "tracking_id": None,
            "tracking_uid": None,
            **code_columns("finding", None),
            **code_columns("finding_site", None),
            **code_columns("finding_site_modifier", None),
            "source_series_uid": series.pop() if len(series) == 1 else None,
        }
    sites = group.parsed.finding_sites
    site = sites[0] if sites else None
    return {
        **_group_columns(record, group),
        **code_columns("finding_site", site.value if site else None),
        **code_columns("finding_site_modifier", site.topographical_modifier if site else None),
    }
