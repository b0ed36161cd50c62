"""Shares over HTTP: a share's manifest (every instance of one version with its collection,
size and SHA-256, as JSON or CSV; the DICOMweb root of a share is api/dicomweb.py's, scoped by
api/auth.py), and /api/shares, where readers, curators and admins make shares of what they
may read, their next versions and their link tokens, as `carina share` does."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from carina.archive import access, shares, tokens
from carina.archive.access import Principal, Scope
from carina.archive.errors import NotFound

from . import auth, curation
from .context import runtime as _runtime
from .errors import http_error

# PS3.5 9.1: a UID is at most 64 characters of digits and periods.
Uid = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
# UIDs one request may name: a cohort larger than this is chosen by a query.
MAX_UIDS = 10_000
# The longest a link token made over HTTP may stay valid.
MAX_LINK_DAYS = 365
#: Roles that may make shares over HTTP (of what they may read).
SHARE_MAKERS = frozenset({"reader", "curator", "admin"})


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


class Selection(BaseModel):
    """What a share version holds: studies and series by UID, and every study a QIDO-RS
    study query matches (PS3.18 8.3.4, e.g. 'ModalitiesInStudy=CT&StudyDate=20200101-')."""

    studies: list[Uid] = Field(default_factory=list, max_length=MAX_UIDS)
    series: list[Uid] = Field(default_factory=list, max_length=MAX_UIDS)
    query: str | None = Field(default=None, max_length=4096)


class NewShare(Selection):
    """A new share: its name and version 1."""

    name: str = Field(min_length=1, max_length=200)


class NewLink(BaseModel):
    """A link token for a share: it opens that share's root only, for this many days."""

    days: int = Field(default=7, ge=1, le=MAX_LINK_DAYS)
    name: str | None = Field(default=None, min_length=1, max_length=200)


def share_maker(request: Request) -> Principal:
    """Dependency of /api/shares: a reader, curator or admin (401 anonymous, 403 others)."""
    who = auth.principal(request)
    if who is access.ANONYMOUS:
        raise auth.AuthError(
            401, "making shares needs a reader, curator or admin token", auth.challenge()
        )
    if not any(g.role in SHARE_MAKERS for g in who.grants):
        raise auth.AuthError(
            403, "this token may not make shares", auth.challenge("insufficient_scope")
        )
    return who


Maker = Annotated[Principal, Depends(share_maker)]


def _described(share: shares.ShareVersion) -> dict[str, Any]:
    """A share version as JSON, with the roots that serve it."""
    root = f"/shares/{share.share_id}"
    return {
        **asdict(share),
        "root": f"{root}/dicomweb",
        "version_root": f"{root}/versions/{share.version}/dicomweb",
        "manifest": f"{root}/versions/{share.version}/manifest",
    }


def _owned(pool: Any, who: Principal, share_id: str) -> shares.ShareVersion:
    """The latest version of a share the caller owns (admins: any); NotFound otherwise, so
    another's share is not revealed."""
    share = shares.get(pool, share_id)
    if not who.is_admin and share.owner != who.name:
        raise NotFound("no such share")
    return share


def api_router(prefix: str = "/api/shares") -> APIRouter:
    """POST/GET {prefix}, POST {prefix}/{share}/versions and POST {prefix}/{share}/links."""
    r = APIRouter(prefix=prefix, tags=["shares"])

    def save(request: Request, who: Principal, body: Selection, share_id: str | None) -> Any:
        pool = _runtime(request).pool
        readable = access.readable_collections(pool, who)
        scope = Scope(None if readable is None else tuple(readable))
        if share_id is not None:
            _owned(pool, who, share_id)  # before anything is said of the selection
        try:
            studies = shares.chosen_studies(pool, body.studies, body.query, scope)
            made_by = curation.actor(request)
            if share_id is None:
                assert isinstance(body, NewShare)
                made = shares.create(
                    pool,
                    body.name,
                    created_by=made_by,
                    studies=studies,
                    series=body.series,
                    readable=readable,
                    owner=who.name,
                )
            else:
                made = shares.new_version(
                    pool,
                    share_id,
                    created_by=made_by,
                    studies=studies,
                    series=body.series,
                    readable=readable,
                )
        except shares.ShareRefused as e:
            return http_error(400, str(e))
        return JSONResponse(jsonable_encoder(_described(made)), status_code=201)

    @r.post("", status_code=201)
    async def create(request: Request, who: Maker, body: NewShare) -> Response:
        return await run_in_threadpool(save, request, who, body, None)  # type: ignore[no-any-return]

    @r.get("")
    async def list_shares(request: Request, who: Maker) -> Response:
        owner = None if who.is_admin else who.name
        found = await run_in_threadpool(shares.list_all, _runtime(request).pool, owner)
        return JSONResponse(jsonable_encoder([_described(s) for s in found]))

    @r.post("/{share}/versions", status_code=201)
    async def new_version(request: Request, share: str, who: Maker, body: Selection) -> Response:
        return await run_in_threadpool(save, request, who, body, share)  # type: ignore[no-any-return]

    @r.post("/{share}/links", status_code=201)
    async def new_link(request: Request, share: str, who: Maker, body: NewLink) -> Response:
        def make() -> tuple[str, tokens.Token]:
            pool = _runtime(request).pool
            _owned(pool, who, share)
            return tokens.create(
                pool,
                "share",
                share_id=share,
                name=body.name or f"link to {share} from {who.name}",
                expires_at=datetime.now(UTC) + timedelta(days=body.days),
            )

        secret, token = await run_in_threadpool(make)
        # Shown once: the response carries the only copy of the secret, never cached.
        return JSONResponse(
            {
                "token": secret,
                "id": token.id,
                "share": share,
                "name": token.name,
                "expires_at": token.expires_at.isoformat() if token.expires_at else None,
            },
            status_code=201,
            headers={"Cache-Control": "no-store"},
        )

    return r
