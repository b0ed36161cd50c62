"""Derived objects: the segments of DICOM SEG and the measurements of TID 1500 SR, indexed
from the stored objects so they can be searched by coded concept and value."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol

import highdicom as hd
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydicom import dcmread
from pydicom.dataset import Dataset

from .storage import ObjectStore

log = logging.getLogger(__name__)

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# highdicom reads Basic Text SR through EnhancedSR (its from_dataset does not check the class);
# a Basic Text SR cannot hold NUM items (PS3.3 A.35.1), so it yields no measurements anyway.
_SR_CLASSES: dict[str, type[hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR]] = {
    BASIC_TEXT_SR: hd.sr.EnhancedSR,
    ENHANCED_SR: hd.sr.EnhancedSR,
    COMPREHENSIVE_SR: hd.sr.ComprehensiveSR,
    COMPREHENSIVE_3D_SR: hd.sr.Comprehensive3DSR,
}
DERIVED_CLASSES = frozenset({SEGMENTATION, *_SR_CLASSES})
# PS3.16 CID 7181 / DCM 121232 "Source series for segmentation" (a UIDREF item).
_SOURCE_SERIES_FOR_SEGMENTATION = ("121232", "DCM")

MAX_LIMIT = 10000


class StoredObject(Protocol):
    """What indexing needs of a stored instance (curation's InstanceRecord has it)."""

    collection: str
    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str

    @property
    def object_key(self) -> str: ...


@dataclass(frozen=True)
class Code:
    """A coded concept as searched: coding scheme designator and code value."""

    scheme: str
    value: str


# ---------------------------------------------------------------------------------------------
# Indexing


def index_batch(pool: ConnectionPool, store: ObjectStore, records: Sequence[StoredObject]) -> int:
    """Index the SEG and SR objects among records; return how many were indexed. An object
    that cannot be read or parsed is logged (its error type) and indexes nothing."""
    count = 0
    for record in {r.sop_uid: r for r in records}.values():
        if record.sop_class_uid not in DERIVED_CLASSES:
            continue
        try:
            ds = dcmread(BytesIO(store.read(record.object_key)))
            if record.sop_class_uid == SEGMENTATION:
                segments, measurements = _segment_rows(record, ds), None
            else:
                segments, measurements = None, _measurement_rows(record, ds)
        except Exception as e:  # highdicom raises many kinds; each means "not indexable"
            # The type only: a message could quote a value of the object.
            log.warning("derived object %s not indexed: %s", record.sop_uid, type(e).__name__)
            segments, measurements = [], []
        _replace(pool, record.sop_uid, segments, measurements)
        count += 1
    return count


def _replace(
    pool: ConnectionPool,
    sop_uid: str,
    segments: list[dict[str, Any]] | None,
    measurements: list[dict[str, Any]] | None,
) -> None:
    """Replace the rows of one object in one transaction (a re-send gives the same rows)."""
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        cur.execute("DELETE FROM segments WHERE sop_uid = %s", (sop_uid,))
        cur.execute("DELETE FROM measurements WHERE sop_uid = %s", (sop_uid,))
        for table, rows in (("segments", segments), ("measurements", measurements)):
            if not rows:
                continue
            columns = list(rows[0])
            cur.executemany(
                f"INSERT INTO {table} ({', '.join(columns)})"
                f" VALUES ({', '.join(['%s'] * len(columns))})",
                [tuple(row[c] for c in columns) for row in rows],
            )


def _code(prefix: str, code: Any) -> dict[str, str | None]:
    """A coded concept as the three columns prefix_value, prefix_scheme, prefix_meaning."""
    if code is None:
        return {f"{prefix}_value": None, f"{prefix}_scheme": None, f"{prefix}_meaning": None}
    return {
        f"{prefix}_value": str(code.value),
        f"{prefix}_scheme": str(code.scheme_designator),
        f"{prefix}_meaning": str(code.meaning),
    }


def _code_json(code: Any) -> dict[str, str]:
    return {
        "value": str(code.value),
        "scheme": str(code.scheme_designator),
        "meaning": str(code.meaning),
    }


def _segment_rows(record: StoredObject, ds: Dataset) -> list[dict[str, Any]]:
    """One row per segment of a SEG (PS3.3 C.8.20.4)."""
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    source_series = {series for _, series, _ in seg.get_source_image_uids()}
    referenced = None
    if "ReferencedSeriesSequence" in seg:
        referenced = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    elif source_series:
        referenced = str(sorted(source_series)[0])
    frames: dict[int, int] = {}
    # PS3.3 C.7.6.16: Segment Identification is per frame, or shared by every frame.
    shared = seg.get("SharedFunctionalGroupsSequence")
    if shared and "SegmentIdentificationSequence" in shared[0]:
        number = int(shared[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames[number] = int(seg.get("NumberOfFrames") or 1)
    for item in seg.get("PerFrameFunctionalGroupsSequence", []):
        ident = item.get("SegmentIdentificationSequence")
        if ident:
            number = int(ident[0].ReferencedSegmentNumber)
            frames[number] = frames.get(number, 0) + 1
    rows = []
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        algorithm = desc.algorithm_identification
        regions = desc.anatomic_regions
        modifiers = desc.get("SegmentedPropertyTypeCodeSequence", [None])[0]
        modifier_codes = (
            list(modifiers.get("SegmentedPropertyTypeModifierCodeSequence", []))
            if modifiers is not None
            else []
        )
        rows.append(
            {
                "sop_uid": record.sop_uid,
                "series_uid": record.series_uid,
                "study_uid": record.study_uid,
                "collection": record.collection,
                "segment_number": number,
                "label": desc.segment_label,
                **_code("category", desc.segmented_property_category),
                **_code("type", desc.segmented_property_type),
                "type_modifiers": json.dumps([_code_json(c) for c in modifier_codes]),
                **_code("anatomic_region", regions[0] if regions else None),
                "algorithm_type": desc.algorithm_type.value,
                "algorithm_name": str(algorithm[0].AlgorithmName) if algorithm else None,
                "tracking_id": desc.tracking_id,
                "tracking_uid": desc.tracking_uid,
                "referenced_series_uid": referenced,
                "frame_count": frames.get(number),
            }
        )
    return rows


def _content_items(item: Dataset) -> Iterator[Dataset]:
    """Every content item below item, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _content_items(child)


def _source_series(group: Any, evidence: dict[str, str]) -> str | None:
    """The image series a measurement group was made on: a "Source series for segmentation"
    UIDREF, else the series (from the SR's evidence) of the first image it references that is
    not a SEG."""
    images = []
    for item in _content_items(group[0]):
        kind = item.get("ValueType")
        if kind == "UIDREF":
            name = item.ConceptNameCodeSequence[0]
            if (name.CodeValue, name.CodingSchemeDesignator) == _SOURCE_SERIES_FOR_SEGMENTATION:
                return str(item.UID)
        elif kind == "IMAGE" and "ReferencedSOPSequence" in item:
            ref = item.ReferencedSOPSequence[0]
            if ref.ReferencedSOPClassUID != SEGMENTATION:
                images.append(str(ref.ReferencedSOPInstanceUID))
    for sop in images:
        if sop in evidence:
            return evidence[sop]
    return None


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


def _measurement_rows(record: StoredObject, ds: Dataset) -> list[dict[str, Any]]:
    """One row per numeric measurement of each measurement group of a TID 1500 report."""
    sr = _SR_CLASSES[record.sop_class_uid].from_dataset(ds, copy=False)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        return []  # an SR, but not a TID 1500 Measurement Report
    evidence = {sop: series for _, series, sop, _ in sr.get_evidence()}
    groups: list[tuple[str, Any]] = [
        *(("1410", g) for g in report.get_planar_roi_measurement_groups()),
        *(("1411", g) for g in report.get_volumetric_roi_measurement_groups()),
        *(("1501", g) for g in report.get_image_measurement_groups()),
    ]
    rows = []
    for index, (template, group) in enumerate(groups):
        seg_sop, segment_number = _referenced_segment(group)
        group_sites = group.finding_sites
        evaluations = [
            {"concept": _code_json(e.name), "value": _code_json(e.value)}
            for e in group.get_qualitative_evaluations()
        ]
        common = {
            "sop_uid": record.sop_uid,
            "series_uid": record.series_uid,
            "study_uid": record.study_uid,
            "collection": record.collection,
            "group_index": index,
            "group_template": template,
            "tracking_id": group.tracking_identifier,
            "tracking_uid": group.tracking_uid,
            **_code("finding", group.finding_type),
            "referenced_seg_sop_uid": seg_sop,
            "referenced_segment_number": segment_number,
            "source_series_uid": _source_series(group, evidence),
            "evaluations": json.dumps(evaluations),
        }
        for m in group.get_measurements():
            sites = m.finding_sites or group_sites
            rows.append(
                {
                    **common,
                    **_code("finding_site", sites[0].value if sites else None),
                    **_code("concept", m.name),
                    "value": float(m.value),
                    "unit_value": str(m.unit.value),
                    "unit_meaning": str(m.unit.meaning),
                    **_code("derivation", m.derivation),
                    **_code("method", m.method or group.method),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Search


@dataclass(frozen=True)
class SegmentQuery:
    """Filters of a segment search; None matches anything."""

    category: Code | None = None
    type: Code | None = None
    collection: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    referenced_series_uid: str | None = None
    algorithm_name: str | None = None
    #: the collections searched (None: all); callers pass those the requester may read
    readable: tuple[str, ...] | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class MeasurementQuery:
    """Filters of a measurement search; None matches anything. min/max bound the value
    (inclusive) in unit (a UCUM code)."""

    concept: Code | None = None
    finding: Code | None = None
    finding_site: Code | None = None
    min_value: float | None = None
    max_value: float | None = None
    unit: str | None = None
    collection: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    source_series_uid: str | None = None
    #: the collections searched (None: all); callers pass those the requester may read
    readable: tuple[str, ...] | None = None
    limit: int = 100
    offset: int = 0


def _match_code(where: list[str], params: list[Any], prefix: str, code: Code | None) -> None:
    if code is not None:
        where.append(f"d.{prefix}_scheme = %s AND d.{prefix}_value = %s")
        params += [code.scheme, code.value]


def _match(where: list[str], params: list[Any], column: str, value: Any) -> None:
    if value is not None:
        where.append(f"d.{column} = %s")
        params.append(value)


def _select(
    table: str,
    reference: str,
    where: list[str],
    params: list[Any],
    order: str,
    q: SegmentQuery | MeasurementQuery,
) -> tuple[str, list[Any]]:
    readable = list(q.readable) if q.readable is not None else None
    if readable is not None:
        where = [*where, "d.collection = ANY(%s)"]
        params = [*params, readable]
    # The referenced series' study comes from the index (None when Carina does not hold it,
    # or holds it in a collection the requester may not read: its existence is not revealed).
    sql = (
        f"SELECT d.*, r.study_uid AS referenced_study_uid FROM {table} d"
        f" LEFT JOIN (series r JOIN studies rs ON rs.study_uid = r.study_uid"
        f" AND (%s::text[] IS NULL OR rs.collection = ANY(%s)))"
        f" ON r.series_uid = d.{reference}"
        f" WHERE {' AND '.join(where) or 'true'} ORDER BY {order} LIMIT %s OFFSET %s"
    )
    return sql, [readable, readable, *params, q.limit, q.offset]


def _fetch(pool: ConnectionPool, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall()


def search_segments(pool: ConnectionPool, q: SegmentQuery) -> list[dict[str, Any]]:
    """Segments matching q, ordered by SEG instance and segment number."""
    return _fetch(pool, *segment_sql(q))


def segment_sql(q: SegmentQuery) -> tuple[str, list[Any]]:
    """The SQL and parameters of a segment search."""
    where: list[str] = []
    params: list[Any] = []
    _match_code(where, params, "category", q.category)
    _match_code(where, params, "type", q.type)
    _match(where, params, "collection", q.collection)
    _match(where, params, "study_uid", q.study_uid)
    _match(where, params, "series_uid", q.series_uid)
    _match(where, params, "referenced_series_uid", q.referenced_series_uid)
    _match(where, params, "algorithm_name", q.algorithm_name)
    return _select(
        "segments",
        "referenced_series_uid",
        where,
        params,
        "d.sop_uid, d.segment_number",
        q,
    )


def search_measurements(pool: ConnectionPool, q: MeasurementQuery) -> list[dict[str, Any]]:
    """Measurements matching q, in the order they were indexed."""
    return _fetch(pool, *measurement_sql(q))


def measurement_sql(q: MeasurementQuery) -> tuple[str, list[Any]]:
    """The SQL and parameters of a measurement search."""
    where: list[str] = []
    params: list[Any] = []
    _match_code(where, params, "concept", q.concept)
    _match_code(where, params, "finding", q.finding)
    _match_code(where, params, "finding_site", q.finding_site)
    _match(where, params, "unit_value", q.unit)
    if q.min_value is not None:
        where.append("d.value >= %s")
        params.append(q.min_value)
    if q.max_value is not None:
        where.append("d.value <= %s")
        params.append(q.max_value)
    _match(where, params, "collection", q.collection)
    _match(where, params, "study_uid", q.study_uid)
    _match(where, params, "series_uid", q.series_uid)
    _match(where, params, "source_series_uid", q.source_series_uid)
    return _select("measurements", "source_series_uid", where, params, "d.pk", q)


def analyze(pool: ConnectionPool) -> None:
    """Refresh the planner's statistics of the derived-object tables."""
    with pool.connection() as conn:
        conn.execute("ANALYZE segments, measurements")
