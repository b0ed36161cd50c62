"""A search result as a user's ready-to-analyse table: JSON, CSV or Apache Parquet, chosen by
?format= or by the Accept header, with typed columns so a Parquet reader gets numbers as
numbers and coordinates as lists."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.responses import JSONResponse, Response

# IANA media type of Apache Parquet (registered 2024); x-parquet is what older tools send.
PARQUET = "application/vnd.apache.parquet"
FORMATS = {
    "application/json": "json",
    "text/csv": "csv",
    PARQUET: "parquet",
    "application/x-parquet": "parquet",
}
# Column kinds: how a value is typed in Parquet (and whether CSV writes it as JSON text).
_ARROW = {
    "text": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "json": pa.string(),  # nested objects of varying shape: JSON text in every format but JSON
    "points": pa.list_(pa.list_(pa.float64())),
    "texts": pa.list_(pa.string()),
    "ints": pa.list_(pa.int64()),
}


class NotAcceptable(ValueError):
    """No format the client accepts; its message is the 406 answer."""


@dataclass(frozen=True)
class Column:
    """One column of an exported table: its name and kind (a key of _ARROW)."""

    name: str
    kind: str = "text"


def negotiate(asked: str | None, accept: str | None) -> str:
    """json, csv or parquet: the format parameter if given (checked by the caller), else the
    acceptable media type of highest quality (RFC 9110 12.5.1), JSON for */* or no Accept."""
    if asked is not None:
        return asked
    if not accept:
        return "json"
    best: tuple[float, str] | None = None
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        fmt = "json" if media in ("*/*", "application/*") else FORMATS.get(media)
        if fmt is None or quality <= 0:
            continue
        if best is None or quality > best[0]:
            best = (quality - position * 1e-6, fmt)  # ties go to the first listed
    if best is None:
        raise NotAcceptable(
            "none of the accepted media types is available: ask for application/json,"
            f" text/csv or {PARQUET}"
        )
    return best[1]


def respond(rows: list[dict[str, Any]], columns: list[Column], fmt: str, name: str) -> Response:
    """rows in the chosen format; CSV and Parquet are offered as files named name.csv/.parquet."""
    if fmt == "json":
        return JSONResponse(rows)
    disposition = {"Content-Disposition": f'attachment; filename="{name}.{fmt}"'}
    if fmt == "csv":
        return Response(
            _csv(rows, columns), media_type="text/csv; charset=utf-8", headers=disposition
        )
    return Response(_parquet(rows, columns), media_type=PARQUET, headers=disposition)


def _csv(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.name for c in columns])
    for row in rows:
        writer.writerow(
            [
                json.dumps(row[c.name]) if isinstance(row[c.name], list | dict) else row[c.name]
                for c in columns
            ]
        )
    return buf.getvalue()


def _parquet(rows: list[dict[str, Any]], columns: list[Column]) -> bytes:
    schema = pa.schema([pa.field(c.name, _ARROW[c.kind]) for c in columns])
    data = {c.name: [_arrow_value(row[c.name], c.kind) for row in rows] for c in columns}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(data, schema=schema), buf)
    return buf.getvalue()


def _arrow_value(value: Any, kind: str) -> Any:
    if kind == "json" and value is not None and not isinstance(value, str):
        return json.dumps(value)
    return value
