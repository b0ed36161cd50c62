"""GET /api/series: published series selected by their QC figures (slice count, slice
thickness, spacing uniformity, localizer, tilt), as IDC selects series, with each row's
DICOMweb series URL, as JSON, CSV or Parquet."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from carina.archive import qc
from carina.archive.qc import SeriesQuery

from .search import SCOPE, BadParameter, Endpoint, Filter, Params, series_url, table_columns

# PS3.3 C.7.3.1.1.1: Modality is a CS (upper-case letters, digits, space, underscore).
_MODALITY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ")


def _modality(p: Params, key: str) -> str | None:
    modality = p.text(key)
    if modality is not None and (len(modality) > 16 or not set(modality) <= _MODALITY_CHARS):
        raise BadParameter("modality must be a DICOM modality code, e.g. CT")
    return modality


_FILTERS = (
    Filter("modality", _modality, "modality"),
    *SCOPE,
    Filter("slices_min", Params.count, "slices_min"),
    Filter("slices_max", Params.count, "slices_max"),
    Filter("thickness_min", Params.number, "thickness_min"),
    Filter("thickness_max", Params.number, "thickness_max"),
    Filter("spacing_uniform", Params.flag, "spacing_uniform"),
    Filter("localizer", Params.flag, "localizer"),
    Filter("tilted", Params.flag, "tilted"),
)


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
    SeriesQuery,
    _FILTERS,
    qc.search_series,
    "series_uid",
    SERIES_COLUMNS,
    ranges=(("slices_min", "slices_max"), ("thickness_min", "thickness_max")),
    shape=_series_rows,
)


def router(prefix: str = "/api") -> APIRouter:
    """GET {prefix}/series."""
    r = APIRouter(prefix=prefix)
    r.add_api_route(f"/{ENDPOINT.name}", ENDPOINT.answer, methods=["GET"])
    return r
