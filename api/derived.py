"""Search of derived objects: SEG segments and TID 1500 SR measurements, as JSON or CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from carina.archive import derived
from carina.archive.derived import Code, MeasurementQuery, SegmentQuery
from carina.runtime import Runtime

from . import auth
from .errors import http_error

# A coded concept in a query: SCHEME:VALUE, e.g. SCT:39607008 (PS3.3 8.8 code sequence items).
_CODE = re.compile(r"^([A-Za-z0-9_.\-]{1,64}):([^\s:][^\s]{0,63})$")
# UCUM codes are printable ASCII without spaces.
_UCUM = re.compile(r"^[\x21-\x7e]{1,64}$")
_UID = re.compile(r"^[0-9.]{1,64}$")
DICOMWEB_ROOT = "/dicomweb"


class BadParameter(ValueError):
    """A query parameter that cannot be used; its message is the 400 answer."""


class _Params:
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

    def output_format(self) -> str:
        value = self.text("format") or "json"
        if value not in ("json", "csv"):
            raise BadParameter("format must be json or csv")
        return value


_COMMON = frozenset({"collection", "study", "series", "limit", "offset", "format"})
_SEGMENT_PARAMS = _COMMON | {"category", "type", "referenced_series", "algorithm"}
_MEASUREMENT_PARAMS = _COMMON | {
    "concept",
    "finding",
    "finding_site",
    "min",
    "max",
    "unit",
    "source_series",
}


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def _paging(p: _Params) -> tuple[int, int]:
    return p.integer("limit", 100, 1, derived.MAX_LIMIT), p.integer("offset", 0, 0, 2**31 - 1)


def _segment_query(p: _Params) -> SegmentQuery:
    limit, offset = _paging(p)
    return SegmentQuery(
        category=p.code("category"),
        type=p.code("type"),
        collection=p.text("collection"),
        study_uid=p.uid("study"),
        series_uid=p.uid("series"),
        referenced_series_uid=p.uid("referenced_series"),
        algorithm_name=p.text("algorithm"),
        limit=limit,
        offset=offset,
    )


def _measurement_query(p: _Params) -> MeasurementQuery:
    limit, offset = _paging(p)
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


def _series_url(base: str, study: str | None, series: str | None) -> str | None:
    if study is None or series is None:
        return None
    return f"{base}/studies/{study}/series/{series}"


def _rows_out(rows: list[dict[str, Any]], base: str, reference: str) -> list[dict[str, Any]]:
    """Rows as answered: without internal keys, with the DICOMweb URLs of the object's own
    series and of the series it was derived from (retrieve_url; None when not held here)."""
    out = []
    for row in rows:
        row = dict(row)
        row.pop("pk", None)
        referenced_study = row.pop("referenced_study_uid")
        row["object_url"] = _series_url(base, row["study_uid"], row["series_uid"])
        row["retrieve_url"] = _series_url(base, referenced_study, row[reference])
        out.append(row)
    return out


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> Response:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()}
        )
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8")


def _answer(
    request: Request,
    allowed: frozenset[str],
    build: Callable[[_Params], Any],
    search: Callable[[Any, Any], list[dict[str, Any]]],
    reference: str,
    columns: list[str],
) -> Response:
    try:
        p = _Params(request, allowed)
        query = build(p)
        fmt = p.output_format()
    except BadParameter as e:
        return http_error(400, str(e))
    query = dataclasses.replace(query, readable=auth.read_scope(request).collections)
    rows = search(_runtime(request).pool, query)
    auth.record_access(request, (row["study_uid"] for row in rows))
    root = request.scope.get("root_path", "")
    base = f"{request.url.scheme}://{request.url.netloc}{root}{DICOMWEB_ROOT}"
    out = _rows_out(rows, base, reference)
    if fmt == "csv":
        return _csv(out, columns)
    return JSONResponse(out)


SEGMENT_COLUMNS = [
    "sop_uid",
    "series_uid",
    "study_uid",
    "collection",
    "segment_number",
    "label",
    "category_value",
    "category_scheme",
    "category_meaning",
    "type_value",
    "type_scheme",
    "type_meaning",
    "type_modifiers",
    "anatomic_region_value",
    "anatomic_region_scheme",
    "anatomic_region_meaning",
    "algorithm_type",
    "algorithm_name",
    "tracking_id",
    "tracking_uid",
    "referenced_series_uid",
    "frame_count",
    "object_url",
    "retrieve_url",
]
MEASUREMENT_COLUMNS = [
    "sop_uid",
    "series_uid",
    "study_uid",
    "collection",
    "group_index",
    "group_template",
    "tracking_id",
    "tracking_uid",
    "finding_value",
    "finding_scheme",
    "finding_meaning",
    "finding_site_value",
    "finding_site_scheme",
    "finding_site_meaning",
    "concept_value",
    "concept_scheme",
    "concept_meaning",
    "value",
    "unit_value",
    "unit_meaning",
    "derivation_value",
    "derivation_scheme",
    "derivation_meaning",
    "method_value",
    "method_scheme",
    "method_meaning",
    "referenced_seg_sop_uid",
    "referenced_segment_number",
    "source_series_uid",
    "evaluations",
    "object_url",
    "retrieve_url",
]


def router(prefix: str = "/api") -> APIRouter:
    """GET {prefix}/segments and GET {prefix}/measurements."""
    r = APIRouter(prefix=prefix)

    @r.get("/segments")
    def search_segments(request: Request) -> Response:
        return _answer(
            request,
            _SEGMENT_PARAMS,
            _segment_query,
            derived.search_segments,
            "referenced_series_uid",
            SEGMENT_COLUMNS,
        )

    @r.get("/measurements")
    def search_measurements(request: Request) -> Response:
        return _answer(
            request,
            _MEASUREMENT_PARAMS,
            _measurement_query,
            derived.search_measurements,
            "source_series_uid",
            MEASUREMENT_COLUMNS,
        )

    return r
