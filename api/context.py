"""What every DICOMweb handler needs of its request: the runtime, the root it came through and
the collection that root is scoped to."""

from __future__ import annotations

from fastapi import Request

from carina.archive import collections
from carina.runtime import Runtime

ROOT = "/dicomweb"


def runtime(request: Request) -> Runtime:
    """The application's Runtime (database pool, object store, intake)."""
    return request.app.state.runtime  # type: ignore[no-any-return]


def base_url(request: Request) -> str:
    """The DICOMweb root the request came through: /dicomweb or /collections/{name}/dicomweb."""
    path = request.url.path
    root = path[: path.index(ROOT) + len(ROOT)]
    return f"{request.url.scheme}://{request.url.netloc}{root}"


def collection(request: Request) -> str | None:
    """The collection a /collections/{name}/dicomweb root is scoped to (NotFound if there is
    no such collection); None on /dicomweb."""
    name = request.path_params.get("collection")
    if name is None:
        return None
    return collections.get(runtime(request).pool, name).name
