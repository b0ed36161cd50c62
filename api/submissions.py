"""Submission reports under /api/submissions: what each C-STORE association or STOW-RS request
brought and what became of it (accepted and refused instances with reasons, studies, series
and their states with the codes of the findings that hold them), by de-identified UIDs only.

A submitter reads the reports of the STOW-RS requests made with its own token, a curator
every report of the collections it curates, an admin all; any other report is not found, as
if it did not exist.
Readers and share tokens may not read reports (403). STOW-RS requests are recorded here too."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from carina.archive import submissions
from carina.archive.access import ANONYMOUS, Principal
from carina.curation.intake import BatchResult

from . import auth
from .context import runtime as _runtime
from .errors import http_error

log = logging.getLogger(__name__)


def reporting(who: Principal) -> submissions.Visible:
    """The submissions who may read: admins every one, curators those of their collections,
    submitters their own token's STOW-RS requests and the associations of the AE title the
    token is named after; AuthError 401 for anonymous, 403 for a
    principal that neither submits nor curates."""
    if who is ANONYMOUS:
        raise auth.AuthError(
            401, "submission reports need a token", {"WWW-Authenticate": auth.REALM}
        )
    if who.is_admin:
        return submissions.EVERY
    curated = sorted({g.collection for g in who.grants if g.role == "curator" and g.collection})
    own = sorted({g.collection for g in who.grants if g.role == "submitter" and g.collection})
    if not curated and not own:
        raise auth.AuthError(
            403,
            "this token may not read submission reports (submitter, curator or admin)",
            {"WWW-Authenticate": f'{auth.REALM}, error="insufficient_scope"'},
        )
    return submissions.Visible(tuple(curated), tuple(own), who.token_id, who.name)


async def record_stow(
    request: Request, collection: str, started_at: datetime, result: BatchResult
) -> None:
    """Record a STOW-RS request that got as far as its parts as a submission; a failure is
    logged, never the request's (its instances are stored either way)."""
    if not result.outcomes:
        return
    who = auth.principal(request)
    reasons = Counter(f"{r.code:04X} {r.reason}" for r in result.refused)
    stow = submissions.StowRequest(
        collection=collection,
        submitter=who.name,
        token_id=who.token_id,
        peer_host=request.client.host if request.client else "unknown",
        started_at=started_at,
        accepted=len(result.stored),
        refused=len(result.refused),
        reasons=reasons,
        series=Counter(r.series_uid for r in result.stored),
    )
    try:
        await run_in_threadpool(submissions.record_stow, _runtime(request).pool, stow)
    except Exception as e:
        log.error("could not record a STOW-RS submission: %s", type(e).__name__)


def utc(moment: datetime | None) -> datetime | None:
    """A moment given without a time zone, taken as UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def router(prefix: str = "/api/submissions") -> APIRouter:
    """The submission report routes."""
    r = APIRouter(prefix=prefix, tags=["submissions"])

    @r.get("")
    async def list_submissions(
        request: Request,
        collection: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        submitter: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        since: Annotated[datetime | None, Query(description="started at or after")] = None,
        until: Annotated[datetime | None, Query(description="started before")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> JSONResponse:
        visible = reporting(auth.principal(request))
        since, until = utc(since), utc(until)
        if since is not None and until is not None and since >= until:
            return http_error(400, "since must be before until")
        f = submissions.SubmissionFilter(
            visible, collection, submitter, since, until, limit, offset
        )
        rows = await run_in_threadpool(submissions.list_reports, _runtime(request).pool, f)
        return JSONResponse(jsonable_encoder(rows))

    @r.get("/{submission_id}")
    async def show_submission(
        request: Request, submission_id: Annotated[int, Path(ge=1, le=2**63 - 1)]
    ) -> JSONResponse:
        visible = reporting(auth.principal(request))
        found = await run_in_threadpool(
            submissions.report, _runtime(request).pool, submission_id, visible
        )
        return JSONResponse(jsonable_encoder(found))

    return r
