"""Curator routes under /api/curation: the queue of held series, one series' findings, QC
figures and audit trail, and the decisions (release, reject, reprocess), each audited.

All of them need a curator token (of the series' collection) or an admin token: a series of
a collection the caller does not curate is not found, as if it did not exist."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from carina.curation import originals, quarantine
from carina.curation.deid import OPTIONS
from carina.curation.errors import UnknownSeries

from . import auth
from .context import runtime as _runtime

State = Literal["incoming", "published", "quarantined", "rejected"]


class Decision(BaseModel):
    """A curator's decision: why, in words (kept in the audit trail)."""

    reason: str = Field(min_length=1, max_length=2000)


class Reprocess(Decision):
    """A reprocessing: with a profile or options, the series' kept originals are
    de-identified again with them (unset: the collection's); without, the rules run again."""

    profile: str | None = Field(default=None, min_length=1, max_length=64)
    options: list[str] | None = Field(default=None, max_length=len(OPTIONS))


def actor(request: Request) -> str:
    """Who acts, as the audit records it: the identity's name and its token's id (an OpenID
    Connect identity has no Carina token)."""
    who = auth.principal(request)
    return f"{who.name} (token {who.token_id})" if who.token_id else who.name


def check(request: Request, series_uid: str) -> None:
    """UnknownSeries (404) unless the caller curates the series' collection (the web page's
    routes check through this too)."""
    curated = auth.curated_collections(request)
    if curated is not None:
        collection = quarantine.collection_of(_runtime(request).pool, series_uid)
        if collection not in curated:
            raise UnknownSeries(f"no series {series_uid}")


def json_response(content: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(jsonable_encoder(content), status_code=status)


def router(prefix: str = "/api/curation") -> APIRouter:
    """The curator routes (one place for the role check to come)."""
    r = APIRouter(
        prefix=prefix, tags=["curation"], dependencies=[Depends(auth.curated_collections)]
    )

    @r.get("/queue")
    async def list_queue(
        request: Request,
        state: State = "quarantined",
        collection: Annotated[str | None, Query(max_length=64)] = None,
        rule: Annotated[str | None, Query(max_length=64)] = None,
        submitter: Annotated[
            str | None, Query(min_length=1, max_length=200, description="AE title or token name")
        ] = None,
        min_age: Annotated[float | None, Query(ge=0, description="seconds since decided")] = None,
        max_age: Annotated[float | None, Query(ge=0, description="seconds since decided")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> JSONResponse:
        f = quarantine.QueueFilter(
            state,
            collection,
            auth.curated_collections(request),
            rule,
            min_age,
            max_age,
            limit,
            offset,
            submitter=submitter,
        )
        rows = await run_in_threadpool(quarantine.queue, _runtime(request).pool, f)
        return json_response(rows)

    @r.get("/series/{series_uid}")
    async def show_series(request: Request, series_uid: str) -> JSONResponse:
        await run_in_threadpool(check, request, series_uid)
        view = await run_in_threadpool(quarantine.series_view, _runtime(request).pool, series_uid)
        return json_response(view)

    @r.post("/series/{series_uid}/release")
    async def release(request: Request, series_uid: str, decision: Decision) -> JSONResponse:
        await run_in_threadpool(check, request, series_uid)
        pool = _runtime(request).pool
        await run_in_threadpool(
            quarantine.release, pool, series_uid, actor(request), decision.reason
        )
        return json_response({"series_uid": series_uid, "state": "published"})

    @r.post("/series/{series_uid}/reject")
    async def reject(request: Request, series_uid: str, decision: Decision) -> JSONResponse:
        await run_in_threadpool(check, request, series_uid)
        runtime = _runtime(request)
        deleted = await run_in_threadpool(
            quarantine.reject,
            runtime.pool,
            runtime.store,
            series_uid,
            actor(request),
            decision.reason,
        )
        return json_response({"series_uid": series_uid, "state": "rejected", "deleted": deleted})

    @r.post("/series/{series_uid}/reprocess")
    async def reprocess(request: Request, series_uid: str, decision: Reprocess) -> JSONResponse:
        await run_in_threadpool(check, request, series_uid)
        rt = _runtime(request)
        answer: dict[str, Any] = {"series_uid": series_uid, "state": "incoming"}
        if decision.profile is None and decision.options is None:
            await run_in_threadpool(
                quarantine.reprocess, rt.pool, series_uid, actor(request), decision.reason
            )
        else:
            choice, count = await run_in_threadpool(
                originals.reprocess,
                rt.intake,
                series_uid,
                actor(request),
                decision.reason,
                decision.profile,
                decision.options,
            )
            answer |= {**choice.as_dict(), "instances": count}
        return json_response(answer, status=202)

    return r
