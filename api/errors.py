"""Domain errors mapped to HTTP statuses: the only place that knows both."""

from __future__ import annotations

import logging

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


def install(app: FastAPI) -> None:
    """Register the mapping of domain errors to responses."""

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return http_error(404, "not found")

    @app.exception_handler(AuthError)
    async def _auth_refused(request: Request, exc: AuthError) -> Response:
        return _refusal(request, exc.status, exc.reason, exc.headers)

    @app.exception_handler(UnknownSeries)
    async def _unknown_series(request: Request, exc: UnknownSeries) -> Response:
        return _refusal(request, 404, str(exc))

    @app.exception_handler(DecisionRefused)
    async def _refused(request: Request, exc: DecisionRefused) -> Response:
        return _refusal(request, 409, str(exc))

    @app.exception_handler(ProfileChoiceRefused)
    async def _choice(request: Request, exc: ProfileChoiceRefused) -> Response:
        return _refusal(request, 422, str(exc))

    @app.exception_handler(ChangeRefused)
    async def _change_refused(request: Request, exc: ChangeRefused) -> Response:
        return _refusal(request, 422, str(exc))

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
