"""Domain errors mapped to HTTP statuses: the only place that knows both."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from carina.archive.errors import InvalidQuery, NotFound, OutOfResources, StorageError
from carina.curation.errors import ChangeRefused, DecisionRefused, ProfileError, UnknownSeries
from carina.curation.originals import ProfileChoiceRefused

from . import web
from .auth import AuthError

log = logging.getLogger(__name__)


def http_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error body with a sentence saying what was wrong."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _refusal(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    """The curator page's refusals as a page saying why; everything else's as JSON."""
    if request.url.path.startswith(web.PREFIX + "/"):
        return web.error_page(request, status, message)
    return http_error(status, message, headers)


# A curator's request refused, by the error's type: the status, with the error's sentence (a
# page of the curator's web page, or JSON).
CURATION_REFUSALS: dict[type[Exception], int] = {
    UnknownSeries: 404,
    DecisionRefused: 409,  # OriginalsUnavailable too
    ProfileChoiceRefused: 422,
    ChangeRefused: 422,
}


def _curation_refusal(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handler(request: Request, exc: Exception) -> Response:
        return _refusal(request, status, str(exc))

    return handler


def install(app: FastAPI) -> None:
    """Register the mapping of domain errors to responses."""

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return http_error(404, "not found")

    @app.exception_handler(AuthError)
    async def _auth_refused(request: Request, exc: AuthError) -> Response:
        return _refusal(request, exc.status, exc.reason, exc.headers)

    for error, status in CURATION_REFUSALS.items():
        app.add_exception_handler(error, _curation_refusal(status))

    @app.exception_handler(InvalidQuery)
    async def _invalid_query(request: Request, exc: InvalidQuery) -> JSONResponse:
        return http_error(400, str(exc))

    @app.exception_handler(OutOfResources)
    async def _full(request: Request, exc: OutOfResources) -> JSONResponse:
        return http_error(503, "storage is out of resources")

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage error: %s", type(exc).__name__)
        return http_error(503, "storage is unavailable")

    @app.exception_handler(ProfileError)
    async def _profile(request: Request, exc: ProfileError) -> JSONResponse:
        # A collection's stored profile or recipe lines no longer compile: nothing can be
        # de-identified for it until an admin fixes them, so nothing is taken in.
        log.error("de-identification profile unusable: %s", exc)
        return http_error(503, f"the collection's de-identification profile is unusable: {exc}")
