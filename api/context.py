"""What every DICOMweb handler needs of its request: the runtime and the root it came through
(which collections it may read is api/auth.py's read_scope)."""

from __future__ import annotations

from fastapi import Request
from psycopg_pool import AsyncConnectionPool

from carina.runtime import Runtime

ROOT = "/dicomweb"


def runtime(request: Request) -> Runtime:
    """The application's Runtime (database pool, object store, intake)."""
    return request.app.state.runtime  # type: ignore[no-any-return]


def statements(request: Request) -> AsyncConnectionPool:
    """The application's pool for single statements from the event loop (archive.db's
    open_statement_pool)."""
    return request.app.state.statements  # type: ignore[no-any-return]


def base_url(request: Request) -> str:
    """The DICOMweb root the request came through: /dicomweb or /collections/{name}/dicomweb."""
    path = request.url.path
    root = path[: path.index(ROOT) + len(ROOT)]
    return f"{request.url.scheme}://{request.url.netloc}{root}"
