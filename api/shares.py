"""A share's manifest: every instance of one version with its collection, size and SHA-256,
as JSON or CSV (the DICOMweb root of a share is api/dicomweb.py's, scoped by api/auth.py)."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from carina.archive import shares

from . import auth
from .context import runtime as _runtime
from .errors import http_error


def router(prefix: str) -> APIRouter:
    """GET {prefix}/manifest[?format=csv] of a share root prefix."""
    r = APIRouter(prefix=prefix)

    @r.get("/manifest")
    def manifest(request: Request, format: str = "json") -> Response:
        if format not in ("json", "csv"):
            return http_error(400, "format must be json or csv")
        scope = auth.read_scope(request)  # NotFound unless the caller may read the share
        assert scope.share is not None
        share_id, version = scope.share
        pool = _runtime(request).pool
        rows = shares.manifest(pool, share_id, version)
        if format == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(shares.MANIFEST_COLUMNS)
            writer.writerows([getattr(row, c) for c in shares.MANIFEST_COLUMNS] for row in rows)
            return Response(buf.getvalue(), media_type="text/csv; charset=utf-8")
        share = shares.get(pool, share_id, version)
        return JSONResponse(
            {
                "share": share.share_id,
                "name": share.name,
                "version": share.version,
                "created_at": share.created_at.isoformat(),
                "instances": [asdict(row) for row in rows],
            }
        )

    return r
