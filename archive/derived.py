"""Derived objects: DICOM SEG segments, TID 1500 SR measurements and SCOORD3D landmarks,
parametric maps and RT structure sets, indexed from the stored objects with the series they
were made from, so they can be searched by coded concept, value and source."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Protocol

import highdicom as hd
import numpy as np
from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydicom import dcmread
from pydicom.dataset import Dataset

from . import sr
from .index import PUBLISHED
from .sr import code_columns, code_json
from .storage import ObjectStore

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# SOP class -> kind of derived object (PS3.4 B.5). Basic Text SR cannot hold NUM or SCOORD3D
# items (PS3.3 A.35.1), so it yields no rows, but its sources are still indexed.
KINDS = {
    sr.SEGMENTATION: "SEG",  # BINARY and FRACTIONAL
    sr.LABEL_MAP_SEGMENTATION: "SEG",
    "1.2.840.10008.5.1.4.1.1.88.11": "SR",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",  # Comprehensive SR
    COMPREHENSIVE_3D_SR: "SR",
    "1.2.840.10008.5.1.4.1.1.30": "PM",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",  # RT Structure Set
}

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


@dataclass
class _Indexed:
    """The rows of one derived object, replacing whatever it had before."""

    kind: str
    label: str | None = None
    sources: list[str] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    landmarks: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def index_batch(pool: ConnectionPool, store: ObjectStore, records: Sequence[StoredObject]) -> int:
    """Index the derived objects among records; return how many were indexed. What cannot be
    read is left out and named in the object's problems (its error type is logged)."""
    count = 0
    for record in {r.sop_uid: r for r in records}.values():
        kind = KINDS.get(record.sop_class_uid)
        if kind is None:
            continue
        indexed = _Indexed(kind)
        try:
            _read(record, store, indexed)
        except Exception as e:  # highdicom and pydicom raise many kinds; each means "not read"
            # The type only: a message could quote a value of the object.
            log.warning("derived object %s not indexed: %s", record.sop_uid, type(e).__name__)
            indexed.problems.append(f"not readable as {kind}: {sr.why(e)}")
        if indexed.problems:
            log.warning("derived object %s: %d problems", record.sop_uid, len(indexed.problems))
        _replace(pool, record, indexed)
        count += 1
    return count


@dataclass(frozen=True)
class _Held:
    """A stored instance as the index knows it."""

    collection: str
    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    object_key: str


def reindex(pool: ConnectionPool, store: ObjectStore, batch: int = 100) -> int:
    """Index every stored derived object again, from its stored bytes; return how many. Rows
    indexed by an older Carina (before landmarks, sources and problems) are replaced."""
    with pool.connection() as conn:
        held = [
            _Held(*row)
            for row in conn.execute(
                "SELECT s.collection, i.sop_uid, i.sop_class_uid, i.series_uid, i.study_uid,"
                " i.object_key FROM instances i JOIN studies s ON s.study_uid = i.study_uid"
                " WHERE i.sop_class_uid = ANY(%s) ORDER BY i.sop_uid",
                (list(KINDS),),
            )
        ]
    return sum(index_batch(pool, store, held[i : i + batch]) for i in range(0, len(held), batch))


def _read(record: StoredObject, store: ObjectStore, indexed: _Indexed) -> None:
    """Fill indexed from the stored object: its sources first, then its content."""
    # Only a SEG's content is in its pixel data.
    ds = dcmread(
        BytesIO(store.read(record.object_key)),
        stop_before_pixels=indexed.kind != "SEG",
    )
    indexed.sources = _source_series(ds)
    if indexed.kind == "SEG":
        indexed.label = _text(ds, "ContentLabel")
        indexed.segments = _segment_rows(record, ds, indexed.problems)
    elif indexed.kind == "SR":
        indexed.label = sr.label(ds)
        content = sr.read(record, ds)
        indexed.measurements = content.measurements
        indexed.landmarks = content.landmarks
        indexed.problems += content.problems
    elif indexed.kind == "PM":
        indexed.label = _text(ds, "ContentLabel")
    else:
        indexed.label = _text(ds, "StructureSetLabel")


def _text(ds: Dataset, keyword: str) -> str | None:
    return str(ds.get(keyword) or "") or None


def _source_series(ds: Dataset) -> list[str]:
    """The series a derived object names as its sources, in order: the Common Instance
    Reference module (PS3.3 C.12.2), SR evidence (C.17.2) and RT Referenced Series (C.8.8.5)."""
    groups = [
        ds.get("ReferencedSeriesSequence", []),
        *(
            study.get("ReferencedSeriesSequence", [])
            for key in (
                "StudiesContainingOtherReferencedInstancesSequence",
                "CurrentRequestedProcedureEvidenceSequence",
                "PertinentOtherEvidenceSequence",
            )
            for study in ds.get(key, [])
        ),
        *(
            study.get("RTReferencedSeriesSequence", [])
            for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
            for study in frame.get("RTReferencedStudySequence", [])
        ),
    ]
    found: list[str] = []
    for items in groups:
        for item in items:
            uid = str(item.get("SeriesInstanceUID") or "")
            if uid and uid not in found and uid != ds.get("SeriesInstanceUID"):
                found.append(uid)
    return found


def _replace(pool: ConnectionPool, record: StoredObject, indexed: _Indexed) -> None:
    """Replace the rows of one object in one transaction (a re-send gives the same rows)."""
    sop_uid = record.sop_uid
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        for table in ("segments", "measurements", "landmarks", "derived_objects"):
            cur.execute(f"DELETE FROM {table} WHERE sop_uid = %s", (sop_uid,))
        cur.execute(
            "INSERT INTO derived_objects (sop_uid, series_uid, study_uid, collection,"
            " sop_class_uid, kind, label, problems) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                sop_uid,
                record.series_uid,
                record.study_uid,
                record.collection,
                record.sop_class_uid,
                indexed.kind,
                indexed.label,
                json.dumps(indexed.problems),
            ),
        )
        cur.executemany(
            "INSERT INTO derived_sources (sop_uid, source_series_uid) VALUES (%s, %s)",
            [(sop_uid, series) for series in indexed.sources],
        )
        for table, rows in (
            ("segments", indexed.segments),
            ("measurements", indexed.measurements),
            ("landmarks", indexed.landmarks),
        ):
            if not rows:
                continue
            columns = list(rows[0])
            cur.executemany(
                f"INSERT INTO {table} ({', '.join(columns)})"
                f" VALUES ({', '.join(['%s'] * len(columns))})",
                [tuple(row[c] for c in columns) for row in rows],
            )


def _segment_rows(record: StoredObject, ds: Dataset, problems: list[str]) -> list[dict[str, Any]]:
    """One row per segment of a SEG (PS3.3 C.8.20.4), with the frames it occupies."""
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    source_series = {series for _, series, _ in seg.get_source_image_uids()}
    referenced = None
    if "ReferencedSeriesSequence" in seg:
        referenced = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    elif source_series:
        referenced = str(sorted(source_series)[0])
    try:
        frames: dict[int, list[tuple[int, str | None]]] | None = _segment_frames(seg)
    except Exception as e:  # a frame that does not decode: the segments without their frames
        problems.append(f"segment frames not read: {sr.why(e)}")
        frames = None
    rows = []
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        algorithm = desc.algorithm_identification
        regions = desc.anatomic_regions
        modifiers = desc.get("SegmentedPropertyTypeCodeSequence", [None])[0]
        # Plain items when read from a file: highdicom's CodedConcept gives them value/scheme.
        modifier_codes = [
            hd.sr.CodedConcept.from_dataset(item)
            for item in (modifiers or Dataset()).get(
                "SegmentedPropertyTypeModifierCodeSequence", []
            )
        ]
        occupied = None if frames is None else frames.get(number, [])
        rows.append(
            {
                "sop_uid": record.sop_uid,
                "series_uid": record.series_uid,
                "study_uid": record.study_uid,
                "collection": record.collection,
                "segment_number": number,
                "label": desc.segment_label,
                **code_columns("category", desc.segmented_property_category),
                **code_columns("type", desc.segmented_property_type),
                "type_modifiers": json.dumps([code_json(c) for c in modifier_codes]),
                **code_columns("anatomic_region", regions[0] if regions else None),
                "algorithm_type": desc.algorithm_type.value,
                "algorithm_name": str(algorithm[0].AlgorithmName) if algorithm else None,
                "tracking_id": desc.tracking_id,
                "tracking_uid": desc.tracking_uid,
                "referenced_series_uid": referenced,
                "frame_count": None if occupied is None else len(occupied),
                "frames": None if occupied is None else [n for n, _ in occupied],
                "frame_sop_uids": None if occupied is None else [uid for _, uid in occupied],
            }
        )
    return rows


def _segment_frames(seg: hd.seg.Segmentation) -> dict[int, list[tuple[int, str | None]]]:
    """segment number -> [(frame number, source SOP instance UID), ...]: the frames in which
    the segment has a pixel, in frame order, each with the image it was derived from.

    A BINARY or FRACTIONAL frame belongs to the one segment its Segment Identification names
    (PS3.3 C.8.20.3.1), per frame or shared by every frame; a LABELMAP frame holds every
    segment whose number is one of its pixel values (PS3.3 C.8.20.2, Sup 243). Frames are
    decoded one at a time (a SEG can be large) and an all-zero frame occupies nothing."""
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    labels = set(seg.segment_numbers)  # without a LABELMAP's background (PixelPaddingValue)
    labelmap = seg.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP
    found: dict[int, list[tuple[int, str | None]]] = {}
    for number in range(1, seg.number_of_frames + 1):
        item = per_frame[number - 1] if number <= len(per_frame) else Dataset()
        pixels = seg.get_stored_frame(number)
        if labelmap:
            present = [int(v) for v in np.unique(pixels) if int(v) in labels]
        else:
            ident = item.get("SegmentIdentificationSequence") or shared.get(
                "SegmentIdentificationSequence"
            )
            present = [int(ident[0].ReferencedSegmentNumber)] if ident and pixels.any() else []
        source = _frame_source(item) or _frame_source(shared)
        for segment in present:
            found.setdefault(segment, []).append((number, source))
    return found


def _frame_source(group: Dataset) -> str | None:
    """The first source image a frame was derived from (PS3.3 C.7.6.16.2.6 Derivation Image
    functional group), if it names one."""
    for derivation in group.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            uid = str(source.get("ReferencedSOPInstanceUID") or "")
            if uid:
                return uid
    return None


def derived_from(conn: Connection, source_series_uid: str) -> list[str]:
    """The series holding derived objects that name source_series_uid as a source."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT DISTINCT o.series_uid FROM derived_sources s"
            " JOIN derived_objects o ON o.sop_uid = s.sop_uid WHERE s.source_series_uid = %s",
            (source_series_uid,),
        )
    ]


# ---------------------------------------------------------------------------------------------
# Search


@dataclass(frozen=True)
class _Scope:
    """What every search filters by and how it pages; None matches anything."""

    collection: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    #: the study of the series the rows were derived from (held, published and readable)
    source_study_uid: str | None = None
    #: the collections searched (None: all); callers pass those the requester may read
    readable: tuple[str, ...] | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class SegmentQuery(_Scope):
    """Filters of a segment search; None matches anything."""

    category: Code | None = None
    type: Code | None = None
    referenced_series_uid: str | None = None
    #: an image one of the segment's frames was derived from
    referenced_sop_uid: str | None = None
    algorithm_name: str | None = None


@dataclass(frozen=True)
class MeasurementQuery(_Scope):
    """Filters of a measurement search; None matches anything. min/max bound the value
    (inclusive) in unit (a UCUM code)."""

    concept: Code | None = None
    finding: Code | None = None
    finding_site: Code | None = None
    min_value: float | None = None
    max_value: float | None = None
    unit: str | None = None
    source_series_uid: str | None = None


@dataclass(frozen=True)
class LandmarkQuery(_Scope):
    """Filters of a landmark search; None matches anything. concept is the SCOORD3D item's
    name; finding and finding_site those of its measurement group."""

    concept: Code | None = None
    finding: Code | None = None
    finding_site: Code | None = None
    graphic_type: str | None = None
    source_series_uid: str | None = None


@dataclass(frozen=True)
class DerivedObjectQuery(_Scope):
    """Filters of a derived-object search; None matches anything. flagged=True keeps the
    objects with problems, False those without."""

    kind: str | None = None
    source_series_uid: str | None = None
    flagged: bool | None = None


Query = SegmentQuery | MeasurementQuery | LandmarkQuery | DerivedObjectQuery


def _code(prefix: str) -> str:
    return f"d.{prefix}_scheme = %s AND d.{prefix}_value = %s"


def _equal(column: str) -> str:
    return f"d.{column} = %s"


@dataclass(frozen=True)
class _Table:
    """How one kind of query is answered: the table (or view) read, the column naming the
    series the rows were derived from, the row order, and the SQL condition of each query
    field (a Code fills two parameters: scheme and value)."""

    name: str
    reference: str
    order: str
    conditions: dict[str, str]


_SCOPE = {
    **{key: _equal(key) for key in ("collection", "study_uid", "series_uid")},
    "source_study_uid": "r.study_uid = %s",  # r: the source series, joined in search_sql
}
_SOURCE = {"source_series_uid": _equal("source_series_uid")}
_TABLES: dict[type, _Table] = {
    SegmentQuery: _Table(
        "segments",
        "referenced_series_uid",
        "d.sop_uid, d.segment_number",
        {
            "category": _code("category"),
            "type": _code("type"),
            **_SCOPE,
            "referenced_series_uid": _equal("referenced_series_uid"),
            "referenced_sop_uid": "d.frame_sop_uids @> ARRAY[%s]::text[]",
            "algorithm_name": _equal("algorithm_name"),
        },
    ),
    MeasurementQuery: _Table(
        "measurements",
        "source_series_uid",
        "d.pk",
        {
            **{key: _code(key) for key in ("concept", "finding", "finding_site")},
            "unit": _equal("unit_value"),
            "min_value": "d.value >= %s",
            "max_value": "d.value <= %s",
            **_SCOPE,
            **_SOURCE,
        },
    ),
    LandmarkQuery: _Table(
        "landmarks",
        "source_series_uid",
        "d.pk",
        {
            **{key: _code(key) for key in ("concept", "finding", "finding_site")},
            "graphic_type": _equal("graphic_type"),
            **_SCOPE,
            **_SOURCE,
        },
    ),
    DerivedObjectQuery: _Table(
        "derived_object_sources",
        "source_series_uid",
        "d.sop_uid, d.source_series_uid",
        {
            "kind": _equal("kind"),
            **_SCOPE,
            **_SOURCE,
            "flagged": "(jsonb_array_length(d.problems) > 0) = %s",
        },
    ),
}


def search(pool: ConnectionPool, q: Query) -> list[dict[str, Any]]:
    """Rows matching q: segments by SEG instance and segment number, measurements and
    landmarks in the order they were indexed, derived objects one row per source series."""
    sql, params = search_sql(q)
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall()


def search_sql(q: Query) -> tuple[str, list[Any]]:
    """The SQL and parameters of a search; each row carries referenced_study_uid, the study
    of the series it was derived from."""
    table = _TABLES[type(q)]
    where: list[str] = []
    params: list[Any] = []
    for key, condition in table.conditions.items():
        value = getattr(q, key)
        if value is not None:
            where.append(condition)
            params += [value.scheme, value.value] if isinstance(value, Code) else [value]
    readable = list(q.readable) if q.readable is not None else None
    if readable is not None:
        where.append("d.collection = ANY(%s)")
        params.append(readable)
    # Only derived objects of published series: an incoming or quarantined one (held for
    # residual PHI, say) is no more searchable here than over QIDO.
    where.append(
        "EXISTS (SELECT 1 FROM series ds WHERE ds.series_uid = d.series_uid AND ds.state = %s)"
    )
    params.append(PUBLISHED)
    # The referenced series' study comes from the index (None when Carina does not publish
    # it, or holds it in a collection the requester may not read: its existence is not
    # revealed).
    sql = (
        f"SELECT d.*, r.study_uid AS referenced_study_uid FROM {table.name} d"
        f" LEFT JOIN (series r JOIN studies rs ON rs.study_uid = r.study_uid"
        f" AND r.state = %s AND (%s::text[] IS NULL OR rs.collection = ANY(%s)))"
        f" ON r.series_uid = d.{table.reference}"
        f" WHERE {' AND '.join(where)} ORDER BY {table.order} LIMIT %s OFFSET %s"
    )
    return sql, [PUBLISHED, readable, readable, *params, q.limit, q.offset]


def analyze(pool: ConnectionPool) -> None:
    """Refresh the planner's statistics of the derived-object tables."""
    with pool.connection() as conn:
        conn.execute("ANALYZE segments, measurements, landmarks, derived_objects, derived_sources")
