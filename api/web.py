"""The curator's web page under /curation: log in with an API token, work the queue of held
series, look at one (thumbnails, a frame viewer with window/level, the de-identified header
with the flagged attributes marked) and release or reject it, alone or in bulk.

Server-rendered (Jinja2) with a little plain JS, everything served from here (no CDN). After
login the browser holds only an opaque session id (HttpOnly, SameSite=Strict cookie; see
archive/sessions.py), never the token. Every form post carries the session's CSRF token.
Authorization and decisions go through the same functions as the REST routes (api/curation.py),
so the page can do nothing the curator's token could not, and is audited the same way."""

from __future__ import annotations

import hmac
import pathlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool

from carina.archive import render, retrieve, sessions, tokens
from carina.archive.access import Principal
from carina.curation import header, originals, quarantine
from carina.curation.errors import DecisionRefused, UnknownSeries
from carina.curation.lifecycle import QUARANTINED

from . import auth, curation
from .context import runtime

PREFIX = "/curation"
COOKIE = "carina_session"
PAGE_SIZE = 100
HERE = pathlib.Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
# The pages load nothing but their own scripts, styles and images, and are never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none';"
    " form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
DECISIONS = {"release": quarantine.release, "reject": quarantine.reject}


class NotLoggedIn(Exception):
    """No live session: pages send the browser to the login page, posts get 401."""


def static_files() -> StaticFiles:
    """The page's own script and style sheet (mounted at /curation/static)."""
    return StaticFiles(directory=HERE / "static")


def router() -> APIRouter:
    """The curator page's routes."""
    r = APIRouter(prefix=PREFIX, include_in_schema=False)

    @r.get("")
    def home() -> Response:
        return RedirectResponse(f"{PREFIX}/queue", status_code=303)

    @r.get("/login")
    def login_page(request: Request) -> Response:
        return _page(request, "login.html", {})

    @r.post("/login")
    async def login(request: Request, token: Annotated[str, Form(max_length=200)]) -> Response:
        try:
            record = await run_in_threadpool(auth.verify, request, token.strip())
            auth.curated_by(Principal.of_token(record))
        except auth.AuthError as e:
            return _page(request, "login.html", {"error": e.reason}, e.status)
        session_id, _ = await run_in_threadpool(sessions.create, runtime(request).pool, record)
        response = RedirectResponse(f"{PREFIX}/queue", status_code=303)
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=int(sessions.LIFETIME.total_seconds()),
            path=PREFIX,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @r.post("/logout")
    async def logout(
        request: Request, session: LoggedIn, csrf: Annotated[str, Form()] = ""
    ) -> Response:
        check_csrf(session, csrf)
        await run_in_threadpool(sessions.end, runtime(request).pool, request.cookies[COOKIE])
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    @r.get("/queue")
    def queue_page(
        request: Request,
        session: LoggedIn,
        collection: Annotated[str | None, Query(max_length=64)] = None,
        rule: Annotated[str | None, Query(max_length=64)] = None,
        submitter: Annotated[str | None, Query(max_length=200)] = None,
        min_hours: Annotated[float | None, Query(ge=0), BeforeValidator(_blank)] = None,
        max_hours: Annotated[float | None, Query(ge=0), BeforeValidator(_blank)] = None,
        page: Annotated[int, Query(ge=1, le=100000)] = 1,
    ) -> Response:
        # One query for the whole page (findings included): nothing is fetched per series.
        f = quarantine.QueueFilter(
            QUARANTINED,
            collection or None,
            auth.curated_collections(request),
            rule or None,
            None if min_hours is None else min_hours * 3600,
            None if max_hours is None else max_hours * 3600,
            PAGE_SIZE + 1,
            (page - 1) * PAGE_SIZE,
            submitter=submitter or None,
        )
        rows = quarantine.queue(runtime(request).pool, f)
        filters = {"collection": collection, "rule": rule, "submitter": submitter}
        filters |= {"min_hours": min_hours, "max_hours": max_hours}
        return _page(
            request,
            "queue.html",
            {
                "session": session,
                "rows": rows[:PAGE_SIZE],
                "page": page,
                "more": len(rows) > PAGE_SIZE,
                "filters": {k: v for k, v in filters.items() if v not in (None, "")},
                "age": _age,
            },
        )

    @r.get("/series/{series_uid}")
    def series_page(
        request: Request,
        session: LoggedIn,
        series_uid: str,
        sop: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        curation.check(request, series_uid)
        pool = runtime(request).pool
        view = quarantine.series_view(pool, series_uid)
        instances = quarantine.series_instances(pool, series_uid)
        shown = _chosen(instances, sop, series_uid)
        flagged = [(f["details"] or {}).get("attribute") for f in view["findings"]]
        rows = (
            header.rows(quarantine.instance_metadata(pool, series_uid, shown.sop_uid), flagged)
            if shown
            else []
        )
        return _page(
            request,
            "series.html",
            {
                "session": session,
                "view": view,
                "instances": instances,
                "shown": shown,
                "header": rows,
                "decidable": view["state"] == QUARANTINED,
                "reprocess": originals.choices(pool, series_uid),
            },
        )

    @r.get("/series/{series_uid}/instances/{sop}/thumbnail")
    def thumbnail(request: Request, _: LoggedIn, series_uid: str, sop: str) -> Response:
        rendering = render.Rendering(render.JPEG).fitted(render.THUMBNAIL_SIZE)
        return _image(request, series_uid, sop, 1, rendering)

    @r.get("/series/{series_uid}/instances/{sop}/frames/{frame}/rendered")
    def rendered(
        request: Request,
        _: LoggedIn,
        series_uid: str,
        sop: str,
        frame: Annotated[int, Path(ge=1, le=1_000_000)],
        window: Annotated[str | None, Query(max_length=100)] = None,
    ) -> Response:
        try:
            win = render.parse_window(window) if window else None
        except retrieve.InvalidRequest as e:
            return error_page(request, 400, str(e))
        return _image(request, series_uid, sop, frame, render.Rendering(render.PNG, win))

    @r.post("/series/{series_uid}/{decision}")
    def decide(
        request: Request,
        session: LoggedIn,
        series_uid: str,
        decision: str,
        reason: Annotated[str, Form(min_length=1, max_length=2000)],
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(session, csrf)
        if decision not in DECISIONS:
            return error_page(request, 404, f"no decision {decision!r}; release or reject")
        _decide(request, decision, series_uid, reason)
        return RedirectResponse(f"{PREFIX}/series/{series_uid}", status_code=303)

    @r.post("/bulk")
    def bulk(
        request: Request,
        session: LoggedIn,
        decision: Annotated[str, Form()],
        reason: Annotated[str, Form(min_length=1, max_length=2000)],
        series: Annotated[list[str], Form(max_length=1000)] = [],  # noqa: B006 (FastAPI copies)
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(session, csrf)
        if decision not in DECISIONS:
            return error_page(request, 400, f"no decision {decision!r}; release or reject")
        if not series:
            return error_page(request, 400, "select at least one series")
        outcomes = []
        for uid in series:
            try:
                _decide(request, decision, uid, reason)
                outcomes.append((uid, "done"))
            except (UnknownSeries, DecisionRefused) as e:
                outcomes.append((uid, str(e)))
        failed = sum(1 for _, outcome in outcomes if outcome != "done")
        return _page(
            request,
            "bulk.html",
            {"session": session, "decision": decision, "outcomes": outcomes, "failed": failed},
            409 if failed else 200,
        )

    return r


def _blank(value: object) -> object:
    """An empty form field (the filter form sends every field) as if it were absent."""
    return None if value == "" else value


def install(app: Any) -> None:
    """Mount the page, its static files, and the answers to its refusals."""
    app.include_router(router())
    app.mount(f"{PREFIX}/static", static_files(), name="curation-static")

    @app.exception_handler(NotLoggedIn)
    async def _not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        if request.method == "GET" and not request.url.path.endswith(("rendered", "thumbnail")):
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        return error_page(request, 401, "not logged in, or the session has ended; log in again")


def _logged_in(request: Request) -> sessions.Session:
    """Dependency of every page but login: the request's live session, its principal set as
    the request's (before any form is read); NotLoggedIn without one."""
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        raise NotLoggedIn()
    try:
        session = sessions.lookup(runtime(request).pool, session_id)
    except tokens.InvalidToken:
        raise NotLoggedIn() from None
    request.state.principal = Principal.of_token(session.token)
    auth.curated_by(auth.principal(request))
    return session


LoggedIn = Annotated[sessions.Session, Depends(_logged_in)]


def check_csrf(session: sessions.Session, csrf: str) -> None:
    """A form post must carry its session's CSRF token (403 otherwise)."""
    if not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
        raise auth.AuthError(403, "the form's CSRF token is missing or wrong; reload the page")


def _chosen(
    instances: list[quarantine.HeldInstance], sop: str | None, series_uid: str
) -> quarantine.HeldInstance | None:
    """The instance the series view shows: the one asked for (UnknownSeries if the series has
    no such instance), else the first."""
    if sop is None:
        return instances[0] if instances else None
    for i in instances:
        if i.sop_uid == sop:
            return i
    raise UnknownSeries(f"no instance {sop} in series {series_uid}")


def _decide(request: Request, decision: str, series_uid: str, reason: str) -> None:
    """Release or reject one series through the REST routes' checks and functions."""
    curation.check(request, series_uid)
    rt = runtime(request)
    if decision == "reject":
        quarantine.reject(rt.pool, rt.store, series_uid, curation.actor(request), reason)
    else:
        quarantine.release(rt.pool, series_uid, curation.actor(request), reason)


def _image(
    request: Request, series_uid: str, sop: str, frame: int, rendering: render.Rendering
) -> Response:
    """One frame of an instance of a series the curator may see, rendered; the read audited."""
    curation.check(request, series_uid)
    pool = runtime(request).pool
    found = [i for i in quarantine.series_instances(pool, series_uid) if i.sop_uid == sop]
    if not found:
        raise UnknownSeries(f"no instance {sop} in series {series_uid}")
    try:
        with retrieve.StoredObject(runtime(request).store, found[0].object_key) as obj:
            image = render.render(obj.file, frame, rendering)
    except retrieve.InvalidRequest as e:
        return error_page(request, 400, str(e))
    except retrieve.NotRetrievable as e:
        return error_page(request, 406, str(e))
    auth.record_access(request, [found[0].study_uid])
    return Response(image, media_type=rendering.media_type, headers={"Cache-Control": "no-store"})


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"prefix": PREFIX, **context}, status_code=status, headers=SECURITY_HEADERS
    )


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    """A refusal as a page saying why (the REST routes answer the same refusals in JSON)."""
    return _page(request, "error.html", {"status": status, "message": message}, status)


def _age(seconds: float | None) -> str:
    """A held series' age in the largest whole unit: 45 s, 12 min, 5 h, 3 d."""
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"
