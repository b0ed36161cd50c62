"""Search of derived objects: SEG segments, TID 1500 SR measurements, SR 3D landmarks and the
derived objects themselves with their source series, as JSON, CSV or Parquet."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from carina.archive import derived
from carina.archive.derived import (
    Code,
    DerivedObjectQuery,
    LandmarkQuery,
    MeasurementQuery,
    SegmentQuery,
)

from . import auth, export
from .context import runtime as _runtime
from .errors import http_error
from .export import Column

# A coded concept in a query: SCHEME:VALUE, e.g. SCT:39607008 (PS3.3 8.8 code sequence items).
_CODE = re.compile(r"^([A-Za-z0-9_.\-]{1,64}):([^\s:][^\s]{0,63})$")
# UCUM codes are printable ASCII without spaces.
_UCUM = re.compile(r"^[\x21-\x7e]{1,64}$")
_UID = re.compile(r"^[0-9.]{1,64}$")
DICOMWEB_ROOT = "/dicomweb"


class BadParameter(ValueError):
    """A query parameter that cannot be used; its message is the 400 answer."""


class Params:
    """The query parameters of one request, each read once and checked."""

    def __init__(self, request: Request, allowed: frozenset[str]) -> None:
        items = request.query_params.multi_items()
        for key, _ in items:
            if key not in allowed:
                raise BadParameter(f"unknown parameter {key!r}")
        self._values: dict[str, str] = {}
        for key, value in items:
            if key in self._values:
                raise BadParameter(f"parameter {key!r} given more than once")
            self._values[key] = value

    def text(self, key: str) -> str | None:
        value = self._values.get(key)
        if value == "":
            raise BadParameter(f"{key} is empty")
        return value

    def uid(self, key: str) -> str | None:
        value = self.text(key)
        if value is not None and not _UID.match(value):
            raise BadParameter(f"{key} is not a UID (digits and dots)")
        return value

    def code(self, key: str) -> Code | None:
        value = self.text(key)
        if value is None:
            return None
        m = _CODE.match(value)
        if m is None:
            raise BadParameter(f"{key} must be a code as SCHEME:VALUE, e.g. SCT:39607008")
        return Code(m.group(1), m.group(2))

    def number(self, key: str) -> float | None:
        value = self.text(key)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            raise BadParameter(f"{key} must be a number") from None
        if not math.isfinite(number):
            raise BadParameter(f"{key} must be a finite number")
        return number

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.text(key)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise BadParameter(f"{key} must be an integer") from None
        if not low <= number <= high:
            raise BadParameter(f"{key} must be between {low} and {high}")
        return number

    def count(self, key: str) -> int | None:
        """An optional whole number >= 0."""
        value = self.text(key)
        if value is None:
            return None
        if not value.isdigit():
            raise BadParameter(f"{key} must be a whole number >= 0")
        return int(value)

    def flag(self, key: str) -> bool | None:
        """An optional true or false."""
        value = self.choice(key, ("true", "false"))
        return None if value is None else value == "true"

    def output_format(self) -> str | None:
        value = self.text("format")
        if value is not None and value not in ("json", "csv", "parquet"):
            raise BadParameter("format must be json, csv or parquet")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str | None:
        value = self.text(key)
        if value is not None and value not in allowed:
            raise BadParameter(f"{key} must be one of {', '.join(allowed)}")
        return value


COMMON = frozenset({"collection", "study", "series", "limit", "offset", "format"})
_SEGMENT_PARAMS = COMMON | {
    "category",
    "type",
    "referenced_series",
    "referenced_instance",
    "algorithm",
}
_MEASUREMENT_PARAMS = COMMON | {
    "concept",
    "finding",
    "finding_site",
    "min",
    "max",
    "unit",
    "source_series",
}
_LANDMARK_PARAMS = COMMON | {
    "concept",
    "finding",
    "finding_site",
    "graphic_type",
    "source_series",
}
_DERIVED_OBJECT_PARAMS = COMMON | {"kind", "source_series", "flagged"}
# PS3.3 C.18.9.1.2: the graphic types of SCOORD3D.
GRAPHIC_TYPES_3D = ("POINT", "MULTIPOINT", "POLYLINE", "POLYGON", "ELLIPSE", "ELLIPSOID")
KINDS = tuple(dict.fromkeys(derived.KINDS.values()))  # SEG, SR, PM, RTSTRUCT


def paging(p: Params) -> tuple[int, int]:
    return p.integer("limit", 100, 1, derived.MAX_LIMIT), p.integer("offset", 0, 0, 2**31 - 1)


def _segment_query(p: Params) -> SegmentQuery:
    limit, offset = paging(p)
    return SegmentQuery(
        category=p.code("category"),
        type=p.code("type"),
        collection=p.text("collection"),
        study_uid=p.uid("study"),
        series_uid=p.uid("series"),
        referenced_series_uid=p.uid("referenced_series"),
        referenced_sop_uid=p.uid("referenced_instance"),
        algorithm_name=p.text("algorithm"),
        limit=limit,
        offset=offset,
    )


def _measurement_query(p: Params) -> MeasurementQuery:
    limit, offset = paging(p)
    low, high, unit = p.number("min"), p.number("max"), p.text("unit")
    if unit is not None and not _UCUM.match(unit):
        raise BadParameter("unit must be a UCUM code, e.g. mm3")
    if (low is not None or high is not None) and unit is None:
        # Values in different units do not compare (mm and cm, mm3 and ml).
        raise BadParameter("min and max need unit (a UCUM code, e.g. mm3)")
    if low is not None and high is not None and low > high:
        raise BadParameter("min is greater than max")
    return MeasurementQuery(
        concept=p.code("concept"),
        finding=p.code("finding"),
        finding_site=p.code("finding_site"),
        min_value=low,
        max_value=high,
        unit=unit,
        collection=p.text("collection"),
        study_uid=p.uid("study"),
        series_uid=p.uid("series"),
        source_series_uid=p.uid("source_series"),
        limit=limit,
        offset=offset,
    )


def series_url(base: str, study: str | None, series: str | None) -> str | None:
    if study is None or series is None:
        return None
    return f"{base}/studies/{study}/series/{series}"


def _landmark_query(p: Params) -> LandmarkQuery:
    limit, offset = paging(p)
    return LandmarkQuery(
        concept=p.code("concept"),
        finding=p.code("finding"),
        finding_site=p.code("finding_site"),
        graphic_type=p.choice("graphic_type", GRAPHIC_TYPES_3D),
        collection=p.text("collection"),
        study_uid=p.uid("study"),
        series_uid=p.uid("series"),
        source_series_uid=p.uid("source_series"),
        limit=limit,
        offset=offset,
    )


def _derived_object_query(p: Params) -> DerivedObjectQuery:
    limit, offset = paging(p)
    return DerivedObjectQuery(
        kind=p.choice("kind", KINDS),
        collection=p.text("collection"),
        study_uid=p.uid("study"),
        series_uid=p.uid("series"),
        source_series_uid=p.uid("source_series"),
        flagged=p.flag("flagged"),
        limit=limit,
        offset=offset,
    )


def _rows_out(rows: list[dict[str, Any]], base: str, reference: str) -> list[dict[str, Any]]:
    """Rows as answered: without internal keys, with the DICOMweb URLs of the object's own
    series and of the series it was derived from (retrieve_url; None when not held here)."""
    out = []
    for row in rows:
        row = dict(row)
        row.pop("pk", None)
        referenced_study = row.pop("referenced_study_uid")
        row["object_url"] = series_url(base, row["study_uid"], row["series_uid"])
        row["retrieve_url"] = series_url(base, referenced_study, row[reference])
        out.append(row)
    return out


@dataclass(frozen=True)
class Endpoint:
    """One search: its parameters, how they become a query, the search, the column holding the
    source series (whose DICOMweb URL each row carries), the table's columns and how rows get
    their URLs."""

    name: str
    allowed: frozenset[str]
    build: Callable[[Params], Any]
    search: Callable[[Any, Any], list[dict[str, Any]]]
    reference: str
    columns: list[Column]
    shape: Callable[[list[dict[str, Any]], str, str], list[dict[str, Any]]] = _rows_out

    def answer(self, request: Request) -> Response:
        """The rows matching the request, in the format it asks for."""
        try:
            p = Params(request, self.allowed)
            query = self.build(p)
            fmt = export.negotiate(p.output_format(), request.headers.get("accept"))
        except BadParameter as e:
            return http_error(400, str(e))
        except export.NotAcceptable as e:
            return http_error(406, str(e))
        query = dataclasses.replace(query, readable=auth.read_scope(request).collections)
        rows = self.search(_runtime(request).pool, query)
        auth.record_access(request, (row["study_uid"] for row in rows))
        root = request.scope.get("root_path", "")
        base = f"{request.url.scheme}://{request.url.netloc}{root}{DICOMWEB_ROOT}"
        return export.respond(self.shape(rows, base, self.reference), self.columns, fmt, self.name)


def table_columns(*spec: str) -> list[Column]:
    """Columns from "name" or "name:kind" strings (kind text when not given)."""
    return [Column(*item.split(":")) for item in spec]


def _coded(prefix: str) -> list[str]:
    return [f"{prefix}_value", f"{prefix}_scheme", f"{prefix}_meaning"]


_OBJECT = ["sop_uid", "series_uid", "study_uid", "collection"]
_URLS = ["object_url", "retrieve_url"]
SEGMENT_COLUMNS = table_columns(
    *_OBJECT,
    "segment_number:int",
    "label",
    *_coded("category"),
    *_coded("type"),
    "type_modifiers:json",
    *_coded("anatomic_region"),
    "algorithm_type",
    "algorithm_name",
    "tracking_id",
    "tracking_uid",
    "referenced_series_uid",
    "frame_count:int",
    "frames:ints",
    "frame_sop_uids:texts",
    *_URLS,
)
MEASUREMENT_COLUMNS = table_columns(
    *_OBJECT,
    "group_index:int",
    "group_template",
    "tracking_id",
    "tracking_uid",
    *_coded("finding"),
    *_coded("finding_site"),
    *_coded("concept"),
    "value:float",
    "unit_value",
    "unit_meaning",
    *_coded("derivation"),
    *_coded("method"),
    "referenced_seg_sop_uid",
    "referenced_segment_number:int",
    "source_series_uid",
    "evaluations:json",
    *_URLS,
)
LANDMARK_COLUMNS = table_columns(
    *_OBJECT,
    "item_index:int",
    *_coded("concept"),
    "graphic_type",
    "coordinates:points",
    "frame_of_reference_uid",
    "fiducial_uid",
    "group_index:int",
    "tracking_id",
    "tracking_uid",
    *_coded("finding"),
    *_coded("finding_site"),
    *_coded("finding_site_modifier"),
    "source_series_uid",
    *_URLS,
)
DERIVED_OBJECT_COLUMNS = table_columns(
    *_OBJECT,
    "sop_class_uid",
    "kind",
    "label",
    "source_series_uid",
    "problems:texts",
    *_URLS,
)

ENDPOINTS = [
    Endpoint(
        "segments",
        _SEGMENT_PARAMS,
        _segment_query,
        derived.search_segments,
        "referenced_series_uid",
        SEGMENT_COLUMNS,
    ),
    Endpoint(
        "measurements",
        _MEASUREMENT_PARAMS,
        _measurement_query,
        derived.search_measurements,
        "source_series_uid",
        MEASUREMENT_COLUMNS,
    ),
    Endpoint(
        "landmarks",
        _LANDMARK_PARAMS,
        _landmark_query,
        derived.search_landmarks,
        "source_series_uid",
        LANDMARK_COLUMNS,
    ),
    Endpoint(
        "derived-objects",
        _DERIVED_OBJECT_PARAMS,
        _derived_object_query,
        derived.search_derived_objects,
        "source_series_uid",
        DERIVED_OBJECT_COLUMNS,
    ),
]


def router(prefix: str = "/api") -> APIRouter:
    """GET {prefix}/segments, /measurements, /landmarks and /derived-objects."""
    r = APIRouter(prefix=prefix)
    for endpoint in ENDPOINTS:
        r.add_api_route(f"/{endpoint.name}", endpoint.answer, methods=["GET"])
    return r
