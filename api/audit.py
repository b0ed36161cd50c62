"""GET /api/audit/curation: the curation audit (every decision on a series: who, when, what,
why, before and after) exported as CSV or JSON, streamed from PostgreSQL as it is read.

An admin exports every row; a curator the rows of the collections it curates (401 without a
token, 403 for one that curates nothing). The format is ?format=csv|json, else the Accept
header (JSON by default)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from carina.archive import audit as access_audit
from carina.curation import audit

from . import auth, export
from .context import runtime as _runtime
from .errors import http_error
from .submissions import utc

_MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


def router(prefix: str = "/api/audit") -> APIRouter:
    """The audit export routes."""
    r = APIRouter(prefix=prefix, tags=["audit"])

    @r.get("/curation")
    def curation_audit(
        request: Request,
        since: Annotated[datetime | None, Query(description="at or after (ISO 8601)")] = None,
        until: Annotated[datetime | None, Query(description="before (ISO 8601)")] = None,
        collection: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        format: Annotated[Literal["csv", "json"] | None, Query()] = None,  # noqa: A002
    ) -> Response:
        curated = auth.curated_collections(request)
        since, until = utc(since), utc(until)
        if since is not None and until is not None and since >= until:
            return http_error(400, "since must be before until")
        try:
            fmt = export.negotiate(format, request.headers.get("accept"))
        except export.NotAcceptable:
            fmt = "parquet"
        if fmt not in _MEDIA_TYPES:
            return http_error(406, "the curation audit is exported as text/csv or application/json")
        collections = curated
        if collection is not None:
            collections = (collection,) if curated is None or collection in curated else ()
        rows = audit.export_rows(_runtime(request).pool, since, until, collections)
        chunks = access_audit.encode(audit.EXPORT_COLUMNS, rows, fmt)  # type: ignore[arg-type]
        headers = {"Cache-Control": "no-store"}
        if fmt == "csv":
            headers["Content-Disposition"] = 'attachment; filename="curation-audit.csv"'
        return StreamingResponse(chunks, media_type=_MEDIA_TYPES[fmt], headers=headers)

    return r
