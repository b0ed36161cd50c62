"""Curator routes that change a held series' instances: pixel redaction and attribute edits,
under /api/curation/series/{uid}/ like the decisions (api/curation.py), with the same checks:
a curator of the series' collection or an admin; a series of another collection is not found.

- POST .../redact {"reason", "rectangles": [{"x", "y", "width", "height"}], "frames": [1-based]
  or null (every frame), "instances": [SOP Instance UIDs] or null (every instance)}
- GET .../changes: the redactions and edits recorded for the series (who, when, what)
- POST .../edit {"reason", "attribute": keyword or tag, "action": "set" | "remove",
  "value": a value, a list of values, or null/"" (empty), "instance": a SOP UID or null}

Unknown series or instance 404, a series not held (published, rejected, incoming) 409, a
redaction or edit that does not apply 422 with the reason (curation/redaction.py, edits.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from carina.curation import edits, quarantine, redaction, rewrite

from . import auth
from .context import runtime as _runtime
from .curation import Decision, actor, check, json_response

Uid = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]


class RectangleIn(BaseModel):
    """A rectangle in pixels of the stored image: top left corner (x column, y row)."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class RedactionIn(Decision):
    """Rectangles to blank in the chosen frames of the chosen instances."""

    rectangles: list[RectangleIn] = Field(min_length=1, max_length=100)
    frames: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, max_length=10000)
    instances: list[Uid] | None = Field(None, min_length=1, max_length=10000)

    def redaction(self) -> redaction.Redaction:
        """The redaction the request asks for."""
        return redaction.Redaction(
            tuple(redaction.Rectangle(r.x, r.y, r.width, r.height) for r in self.rectangles),
            None if self.frames is None else tuple(self.frames),
        )


Scalar = str | int | float


class EditIn(Decision):
    """Set or remove one top-level attribute in one instance or in all of the series."""

    attribute: str = Field(min_length=1, max_length=64)
    action: Literal["set", "remove"] = "set"
    value: Scalar | list[Scalar] | None = None
    instance: Uid | None = None


def run_redaction(request: Request, series_uid: str, body: RedactionIn) -> int:
    """Redact through the same checks as every curator route (the web page's too)."""
    check(request, series_uid)
    return _run(
        request, redaction.redact, series_uid, body.reason, body.redaction(), body.instances
    )


def run_edit(request: Request, series_uid: str, body: EditIn) -> int:
    """Edit through the same checks as every curator route (the web page's too)."""
    check(request, series_uid)
    edit = edits.parse(body.attribute, body.action, body.value)
    sops = None if body.instance is None else [body.instance]
    return _run(request, edits.edit_series, series_uid, body.reason, edit, sops)


def _run(request: Request, change: Callable[..., int], series_uid: str, *args: object) -> int:
    """change(pool, store, staging, series, actor, reason, ...) with the request's runtime."""
    rt = _runtime(request)
    return change(rt.pool, rt.store, rt.settings.staging_dir, series_uid, actor(request), *args)


def router(prefix: str = "/api/curation") -> APIRouter:
    """The redaction and edit routes."""
    r = APIRouter(
        prefix=prefix, tags=["curation"], dependencies=[Depends(auth.curated_collections)]
    )

    @r.get("/series/{series_uid}/changes")
    async def changes(request: Request, series_uid: str) -> JSONResponse:
        await run_in_threadpool(check, request, series_uid)
        pool = _runtime(request).pool
        await run_in_threadpool(quarantine.collection_of, pool, series_uid)  # 404 if unknown
        listed = await run_in_threadpool(rewrite.listed, pool, series_uid)
        return json_response({"series_uid": series_uid, **listed})

    @r.post("/series/{series_uid}/redact")
    async def redact(request: Request, series_uid: str, body: RedactionIn) -> JSONResponse:
        count = await run_in_threadpool(run_redaction, request, series_uid, body)
        return json_response({"series_uid": series_uid, "redacted": count})

    @r.post("/series/{series_uid}/edit")
    async def edit(request: Request, series_uid: str, body: EditIn) -> JSONResponse:
        count = await run_in_threadpool(run_edit, request, series_uid, body)
        return json_response({"series_uid": series_uid, "edited": count})

    return r
