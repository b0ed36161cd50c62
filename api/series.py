"""GET /api/series: published series selected by their QC figures (slice count, slice
thickness, spacing uniformity, localizer, tilt), as IDC selects series, with each row's
DICOMweb series URL, as JSON, CSV or Parquet."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from carina.archive import qc
from carina.archive.qc import SeriesQuery

from .derived import COMMON, BadParameter, Endpoint, Params, paging, series_url, table_columns

_SERIES_PARAMS = (COMMON - {"series"}) | {
    "modality",
    "slices_min",
    "slices_max",
    "thickness_min",
    "thickness_max",
    "spacing_uniform",
    "localizer",
    "tilted",
}
# PS3.3 C.7.3.1.1.1: Modality is a CS (upper-case letters, digits, space, underscore).
_MODALITY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ")


def _series_query(p: Params) -> SeriesQuery:
    limit, offset = paging(p)
    modality = p.text("modality")
    if modality is not None and (len(modality) > 16 or not set(modality) <= _MODALITY_CHARS):
        raise BadParameter("modality must be a DICOM modality code, e.g. CT")
    query = SeriesQuery(
        modality=modality,
        collection=p.text("collection"),
        study_uid=p.uid("study"),
        slices_min=p.count("slices_min"),
        slices_max=p.count("slices_max"),
        thickness_min=p.number("thickness_min"),
        thickness_max=p.number("thickness_max"),
        spacing_uniform=p.flag("spacing_uniform"),
        localizer=p.flag("localizer"),
        tilted=p.flag("tilted"),
        limit=limit,
        offset=offset,
    )
    for low, high in (("slices_min", "slices_max"), ("thickness_min", "thickness_max")):
        a, b = getattr(query, low), getattr(query, high)
        if a is not None and b is not None and a > b:
            raise BadParameter(f"{low} is greater than {high}")
    return query


def _series_rows(rows: list[dict[str, Any]], base: str, _reference: str) -> list[dict[str, Any]]:
    """Rows with the series' own DICOMweb URL."""
    return [
        {**row, "retrieve_url": series_url(base, row["study_uid"], row["series_uid"])}
        for row in rows
    ]


SERIES_COLUMNS = table_columns(
    "series_uid",
    "study_uid",
    "collection",
    "modality",
    "series_number:int",
    "instance_count:int",
    "slice_count:int",
    "slice_thickness_min:float",
    "slice_thickness_max:float",
    "spacing_min:float",
    "spacing_max:float",
    "spacing_mean:float",
    "spacing_uniform:bool",
    "missing_slices:int",
    "has_localizer:bool",
    "localizer_count:int",
    "tilted:bool",
    "tilt_degrees:float",
    "retrieve_url",
)
ENDPOINT = Endpoint(
    "series",
    _SERIES_PARAMS,
    _series_query,
    qc.search_series,
    "series_uid",
    SERIES_COLUMNS,
    _series_rows,
)


def router(prefix: str = "/api") -> APIRouter:
    """GET {prefix}/series."""
    r = APIRouter(prefix=prefix)
    r.add_api_route(f"/{ENDPOINT.name}", ENDPOINT.answer, methods=["GET"])
    return r
