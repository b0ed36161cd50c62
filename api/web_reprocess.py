"""The curator page's reprocessing with another de-identification profile: the form on the
series view posts here, and goes through the REST route's checks and function
(curation/originals.py), audited the same way."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from carina.curation import originals
from carina.curation.deid import OPTIONS

from . import curation, web
from .context import runtime


def router() -> APIRouter:
    """The route (included before the page's generic decision route, which it would match)."""
    r = APIRouter(prefix=web.PREFIX, include_in_schema=False)

    @r.post("/series/{series_uid}/reprocess")
    async def reprocess(
        request: Request,
        session: web.LoggedIn,
        series_uid: str,
        reason: Annotated[str, Form(min_length=1, max_length=2000)],
        profile: Annotated[str, Form(min_length=1, max_length=64)],
        options: Annotated[list[str], Form(max_length=len(OPTIONS))] = [],  # noqa: B006
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        web.check_csrf(session, csrf)
        await run_in_threadpool(curation.check, request, series_uid)
        await run_in_threadpool(
            originals.reprocess,
            runtime(request).intake,
            series_uid,
            curation.actor(request),
            reason,
            profile,
            options,
        )
        return RedirectResponse(f"{web.PREFIX}/series/{series_uid}", status_code=303)

    return r
