"""Search of derived objects: SEG segments, TID 1500 SR measurements, SR 3D landmarks and the
derived objects themselves with their source series, as JSON, CSV or Parquet."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter

from carina.archive import derived
from carina.archive.derived import (
    DerivedObjectQuery,
    LandmarkQuery,
    MeasurementQuery,
    SegmentQuery,
)

from .search import (
    SCOPE,
    SERIES,
    SOURCE_STUDY,
    BadParameter,
    Endpoint,
    Filter,
    Params,
    one_of,
    table_columns,
)

# UCUM codes are printable ASCII without spaces.
_UCUM = re.compile(r"^[\x21-\x7e]{1,64}$")
# PS3.3 C.18.9.1.2: the graphic types of SCOORD3D.
GRAPHIC_TYPES_3D = ("POINT", "MULTIPOINT", "POLYLINE", "POLYGON", "ELLIPSE", "ELLIPSOID")
KINDS = tuple(dict.fromkeys(derived.KINDS.values()))  # SEG, SR, PM, RTSTRUCT


def _code(param: str) -> Filter:
    return Filter(param, Params.code, param)


def _unit(p: Params, key: str) -> str | None:
    unit = p.text(key)
    if unit is not None and not _UCUM.match(unit):
        raise BadParameter("unit must be a UCUM code, e.g. mm3")
    return unit


def _needs_unit(values: dict[str, Any]) -> None:
    if (values["min"] is not None or values["max"] is not None) and values["unit"] is None:
        # Values in different units do not compare (mm and cm, mm3 and ml).
        raise BadParameter("min and max need unit (a UCUM code, e.g. mm3)")


_SOURCE = Filter("source_series", Params.uid, "source_series_uid")
# A measurement's or landmark's concept, and the finding and site of its measurement group.
_GROUP = (_code("concept"), _code("finding"), _code("finding_site"))


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
        SegmentQuery,
        (
            _code("category"),
            _code("type"),
            *SCOPE,
            SERIES,
            SOURCE_STUDY,
            Filter("referenced_series", Params.uid, "referenced_series_uid"),
            Filter("referenced_instance", Params.uid, "referenced_sop_uid"),
            Filter("algorithm", Params.text, "algorithm_name"),
        ),
        derived.search,
        "referenced_series_uid",
        SEGMENT_COLUMNS,
    ),
    Endpoint(
        "measurements",
        MeasurementQuery,
        (
            *_GROUP,
            Filter("min", Params.number, "min_value"),
            Filter("max", Params.number, "max_value"),
            Filter("unit", _unit, "unit"),
            *SCOPE,
            SERIES,
            SOURCE_STUDY,
            _SOURCE,
        ),
        derived.search,
        "source_series_uid",
        MEASUREMENT_COLUMNS,
        ranges=(("min", "max"),),
        check=_needs_unit,
    ),
    Endpoint(
        "landmarks",
        LandmarkQuery,
        (
            *_GROUP,
            Filter("graphic_type", one_of(*GRAPHIC_TYPES_3D), "graphic_type"),
            *SCOPE,
            SERIES,
            SOURCE_STUDY,
            _SOURCE,
        ),
        derived.search,
        "source_series_uid",
        LANDMARK_COLUMNS,
    ),
    Endpoint(
        "derived-objects",
        DerivedObjectQuery,
        (
            Filter("kind", one_of(*KINDS), "kind"),
            *SCOPE,
            SERIES,
            SOURCE_STUDY,
            _SOURCE,
            Filter("flagged", Params.flag, "flagged"),
        ),
        derived.search,
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
