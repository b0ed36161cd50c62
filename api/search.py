"""The shape every /api search shares (derived objects, series by QC figures): query
parameters read and checked once each, turned into an archive query by a table of filters,
paged, answered as JSON, CSV or Parquet with the DICOMweb URL of the series each row names."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from carina.archive.derived import MAX_LIMIT, Code

from . import auth, export
from .context import runtime as _runtime
from .errors import http_error
from .export import Column

# A coded concept in a query: SCHEME:VALUE, e.g. SCT:39607008 (PS3.3 8.8 code sequence items).
_CODE = re.compile(r"^([A-Za-z0-9_.\-]{1,64}):([^\s:][^\s]{0,63})$")
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


Reader = Callable[[Params, str], Any]


def one_of(*allowed: str) -> Reader:
    """A reader of a parameter that must be one of allowed."""
    return lambda p, key: p.choice(key, allowed)


@dataclass(frozen=True)
class Filter:
    """A query parameter: its name, how it is read and checked, and the query field it fills."""

    param: str
    read: Reader
    field: str


# The filters of every search: collection and study (and series, where rows have one).
SCOPE = (Filter("collection", Params.text, "collection"), Filter("study", Params.uid, "study_uid"))
SERIES = Filter("series", Params.uid, "series_uid")
SOURCE_STUDY = Filter("source_study", Params.uid, "source_study_uid")


def series_url(base: str, study: str | None, series: str | None) -> str | None:
    if study is None or series is None:
        return None
    return f"{base}/studies/{study}/series/{series}"


def table_columns(*spec: str) -> list[Column]:
    """Columns from "name" or "name:kind" strings (kind text when not given)."""
    return [Column(*item.split(":")) for item in spec]


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
    """One search: the archive query it builds from its filters (plus limit and offset), the
    (low, high) parameter pairs that must not cross, other checks of the parameters read, the
    search, the column holding the series whose DICOMweb URL each row carries, the table's
    columns and how rows get their URLs."""

    name: str
    query: type
    filters: tuple[Filter, ...]
    search: Callable[[Any, Any], list[dict[str, Any]]]
    reference: str
    columns: list[Column]
    ranges: tuple[tuple[str, str], ...] = ()
    check: Callable[[dict[str, Any]], None] | None = None
    shape: Callable[[list[dict[str, Any]], str, str], list[dict[str, Any]]] = _rows_out

    def build(self, p: Params) -> Any:
        """The archive query of the request's parameters."""
        limit = p.integer("limit", 100, 1, MAX_LIMIT)
        offset = p.integer("offset", 0, 0, 2**31 - 1)
        values = {f.param: f.read(p, f.param) for f in self.filters}
        if self.check is not None:
            self.check(values)
        for low, high in self.ranges:
            if values[low] is not None and values[high] is not None and values[low] > values[high]:
                raise BadParameter(f"{low} is greater than {high}")
        fields = {f.field: values[f.param] for f in self.filters}
        return self.query(**fields, limit=limit, offset=offset)

    def answer(self, request: Request) -> Response:
        """The rows matching the request, in the format it asks for."""
        allowed = frozenset({f.param for f in self.filters} | {"limit", "offset", "format"})
        try:
            p = Params(request, allowed)
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
