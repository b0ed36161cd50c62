"""The permission matrix over EVERY route of the app (issue 7): the test walks FastAPI's route
table and fails for a route that has no row in ROUTES, so a new route cannot ship without
saying who may use it. Each row gives the exact status for every kind of caller: anonymous, a
reader of the data's collection and of another one, a submitter, a curator of the data's
collection and of another one, an admin, and a share's link token. A caller who may not read
the data never sees its UIDs in an answer.

To add a route: add a row to ROUTES (or to the DICOMweb suffixes, which every root shares),
with the placeholders of its path filled from World.params, and the status of each caller."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import requests
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount

from api.app import create_app
from carina.settings import Settings
from tests.conftest import Server, bearer
from tests.factory import Phi, burned_in_series, ct_series, to_bytes

pytestmark = pytest.mark.slow

CALLERS = (
    "anonymous",
    "reader",
    "other_reader",
    "submitter",
    "curator",
    "other_curator",
    "admin",
    "link",
    "revoked",  # a revoked token: refused (401) wherever a token is read
)
# Who may read the data (collection SECRET, and the share made of it).
READERS = frozenset({"reader", "curator", "admin"})
CURATORS = frozenset({"curator", "admin"})
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XyZ'


def _each(default: int, **overrides: int) -> dict[str, int]:
    """A status per caller: default, except those named (and a revoked token: 401)."""
    return {who: overrides.get(who, 401 if who == "revoked" else default) for who in CALLERS}


def _readers(ok: int, others: int, **overrides: int) -> dict[str, int]:
    """ok for those who may read SECRET, others for the rest (a revoked token: 401)."""
    return _each(others, **({w: ok for w in READERS} | overrides))


@dataclass(frozen=True)
class Row:
    """Who gets what from one route: the status per caller, and how the request is made.

    body(world, who) gives requests' keyword arguments (json, data, headers); fresh names
    path parameters that take a new held series for each caller the route lets through (the
    route changes it: a release, a rejection); web: a curator page, used with the session
    cookie its login gives (callers that cannot log in have none)."""

    expect: dict[str, int]
    body: Callable[[World, str], dict[str, Any]] | None = None
    fresh: tuple[str, ...] = ()
    web: bool = False
    params: dict[str, str] = field(default_factory=dict)


def _stow_body(world: World, who: str) -> dict[str, Any]:
    # In the study the path names (STOW-RS to /studies/{study} accepts only that study).
    ds = ct_series(Phi(study_uid=world.params["study"]), 1, rows=8, columns=8)[0]
    part = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(ds) + b"\r\n--XyZ--\r\n"
    return {"data": part, "headers": {"Content-Type": MULTIPART}}


def _reason(world: World, who: str) -> dict[str, Any]:
    return {"json": {"reason": "permission matrix"}}


def _share_body(world: World, who: str) -> dict[str, Any]:
    return {"json": {"name": f"by {who}", "studies": [world.params["study"]]}}


def _version_body(world: World, who: str) -> dict[str, Any]:
    return {"json": {"studies": [world.params["study"]]}}


def _redaction_body(world: World, who: str) -> dict[str, Any]:
    return {"json": {"reason": "matrix", "rectangles": [{"x": 0, "y": 0, "width": 2, "height": 2}]}}


def _edit_body(world: World, who: str) -> dict[str, Any]:
    return {"json": {"reason": "matrix", "attribute": "SeriesNumber", "value": 7}}


def _login_body(world: World, who: str) -> dict[str, Any]:
    return {"data": {"token": world.tokens.get(who, "")}}


def _form(**fields: str) -> Callable[[World, str], dict[str, Any]]:
    def body(world: World, who: str) -> dict[str, Any]:
        return {"data": {**fields, "csrf": world.csrf.get(who, "")}}

    return body


def _bulk_body(world: World, who: str) -> dict[str, Any]:
    series = world.fresh_series() if who in CURATORS else world.params["held"]
    return {"data": {"decision": "release", "reason": "matrix", "series": series, "csrf": ""}}


# DICOMweb routes, by their path below a root: read (QIDO, WADO, metadata, frames, bulk data,
# rendered, thumbnail) and store (STOW-RS).
_INSTANCE = "/studies/{study}/series/{series}/instances/{sop}"
DICOMWEB_READS = (
    "/studies/{study}",
    "/studies/{study}/series/{series}",
    _INSTANCE,
    f"{_INSTANCE}/frames/{{frames}}",
    f"{_INSTANCE}/bulkdata/{{tag}}",
    "/studies/{study}/metadata",
    "/studies/{study}/series/{series}/metadata",
    f"{_INSTANCE}/metadata",
    "/studies/{study}/rendered",
    "/studies/{study}/series/{series}/rendered",
    f"{_INSTANCE}/rendered",
    f"{_INSTANCE}/frames/{{frames}}/rendered",
    "/studies/{study}/thumbnail",
    "/studies/{study}/series/{series}/thumbnail",
    f"{_INSTANCE}/thumbnail",
    f"{_INSTANCE}/frames/{{frames}}/thumbnail",
)
QIDO_ALL = ("/studies", "/series", "/instances")
QIDO_IN_STUDY = (
    "/studies/{study}/series",
    "/studies/{study}/instances",
    "/studies/{study}/series/{series}/instances",
)
STOW = ("/studies", "/studies/{study}")


def _dicomweb_rows() -> dict[tuple[str, str], Row]:
    rows: dict[tuple[str, str], Row] = {}
    roots = {
        "/dicomweb": "everything",
        "/collections/{collection}/dicomweb": "collection",
        "/shares/{share}/dicomweb": "share",
        "/shares/{share}/versions/{version}/dicomweb": "share",
    }
    for root, kind in roots.items():
        share = kind == "share"
        # A share's root opens to its link token too; a collection root the caller may not
        # read is not found, even for a search; /dicomweb searches find nothing (204).
        read = _readers(200, 404, link=200) if share else _readers(200, 404)
        search = read if kind != "everything" else _readers(200, 204)
        for suffix in DICOMWEB_READS:
            rows["GET", root + suffix] = Row(read)
        for suffix in (*QIDO_ALL, *QIDO_IN_STUDY):
            rows["GET", root + suffix] = Row(search)
        for suffix in STOW:
            if share:  # a share is read-only, for everyone
                stow = _each(405)
            elif kind == "everything":  # stores into `default`, which only admins may
                stow = _each(403, anonymous=401, admin=202)
            else:  # SECRET: its submitter and admins; invisible to those who cannot read it
                stow = _readers(403, 404, anonymous=401, submitter=202, admin=202)
            rows["POST", root + suffix] = Row(stow, body=_stow_body)
    for root in ("/shares/{share}", "/shares/{share}/versions/{version}"):
        rows["GET", f"{root}/manifest"] = Row(_readers(200, 404, link=200))
    return rows


# Routes that read no token: the revoked one is not even looked at.
OPEN = _each(200, revoked=200)
# Searches answer everyone, with only what each may read.
SEARCH = _each(200)
CURATION = _each(403, anonymous=401, curator=200, other_curator=200, admin=200)
CURATED_SERIES = _each(403, anonymous=401, curator=200, other_curator=404, admin=200)
DECISIONS = {"release": 200, "reject": 200, "reprocess": 202}  # reprocessing is queued
SHARE_MAKERS = _each(403, anonymous=401, reader=200, other_reader=200, curator=200)
SHARE_MAKERS |= {"other_curator": 200, "admin": 200}
# The owner of the share (reader) and admins; others' shares are not found.
SHARE_OWNER = _each(404, anonymous=401, submitter=403, link=403, reader=201, admin=201)
# Submission reports: curators of the collection and admins see all of it, a submitter its own
# token's requests (SECRET's was made by the admin: not found), a curator of another collection
# lists only its own (none here).
SUBMISSIONS = _each(403, anonymous=401, submitter=200, curator=200, other_curator=200, admin=200)
SUBMISSION = SUBMISSIONS | {"other_curator": 404, "submitter": 404}
# A curator page's change posts (redact, edit, reprocess): without a session 401; done, back
# to the series page (303).
PAGE_CHANGE = _each(401, curator=303, other_curator=404, admin=303)
# Curator pages: a page without a session goes to the login page (303); an image or a
# post without one is refused (401); a curator of another collection finds no such series.
PAGE = _each(303, curator=200, other_curator=200, admin=200, revoked=303)
SERIES_PAGE = _each(303, curator=200, other_curator=404, admin=200, revoked=303)
IMAGE = _each(401, curator=200, other_curator=404, admin=200)

ROUTES: dict[tuple[str, str], Row] = {
    **_dicomweb_rows(),
    ("GET", "/healthz"): Row(OPEN),
    ("GET", "/openapi.json"): Row(OPEN),
    ("GET", "/docs"): Row(OPEN),
    ("GET", "/docs/oauth2-redirect"): Row(OPEN),
    ("GET", "/redoc"): Row(OPEN),
    ("GET", "/api/segments"): Row(SEARCH),
    ("GET", "/api/measurements"): Row(SEARCH),
    ("GET", "/api/landmarks"): Row(SEARCH),
    ("GET", "/api/derived-objects"): Row(SEARCH),
    ("GET", "/api/series"): Row(SEARCH),
    ("GET", "/api/curation/queue"): Row(CURATION),
    ("GET", "/api/curation/series/{series_uid}"): Row(CURATED_SERIES),
    ("GET", "/api/curation/series/{series_uid}/changes"): Row(CURATED_SERIES),
    ("POST", "/api/curation/series/{series_uid}/redact"): Row(
        CURATED_SERIES, body=_redaction_body, fresh=("series_uid",)
    ),
    ("POST", "/api/curation/series/{series_uid}/edit"): Row(
        CURATED_SERIES, body=_edit_body, fresh=("series_uid",)
    ),
    ("GET", "/api/submissions"): Row(SUBMISSIONS),
    ("GET", "/api/submissions/{submission_id}"): Row(SUBMISSION),
    # The curation audit: admins all of it, curators their collections' (none: an empty file).
    ("GET", "/api/audit/curation"): Row(CURATION),
    **{
        ("POST", f"/api/curation/series/{{series_uid}}/{decision}"): Row(
            CURATED_SERIES | {"curator": ok, "admin": ok}, body=_reason, fresh=("series_uid",)
        )
        for decision, ok in DECISIONS.items()
    },
    # Shares of what the caller may read: SECRET's study is "missing" to other readers.
    ("POST", "/api/shares"): Row(
        _readers(201, 400, anonymous=401, submitter=403, link=403), body=_share_body
    ),
    ("GET", "/api/shares"): Row(SHARE_MAKERS),
    ("POST", "/api/shares/{share}/versions"): Row(SHARE_OWNER, body=_version_body),
    ("POST", "/api/shares/{share}/links"): Row(SHARE_OWNER, body=lambda w, who: {"json": {}}),
    ("GET", "/curation"): Row(_each(303, revoked=303), web=True),
    ("GET", "/curation/login"): Row(OPEN, web=True),
    ("POST", "/curation/login"): Row(
        # Anonymous sends no token: the form is incomplete.
        _each(403, anonymous=422, curator=303, other_curator=303, admin=303),
        body=_login_body,
        web=True,
    ),
    ("POST", "/curation/logout"): Row(
        _each(401, curator=303, other_curator=303, admin=303), body=_form(), web=True
    ),
    ("GET", "/curation/queue"): Row(PAGE, web=True),
    ("GET", "/curation/series/{series_uid}"): Row(SERIES_PAGE, web=True),
    ("GET", "/curation/series/{series_uid}/instances/{sop}/thumbnail"): Row(
        IMAGE, web=True, params={"sop": "held_sop"}
    ),
    ("GET", "/curation/series/{series_uid}/instances/{sop}/frames/{frame}/rendered"): Row(
        IMAGE, web=True, params={"sop": "held_sop"}
    ),
    ("POST", "/curation/series/{series_uid}/{decision}"): Row(
        _each(401, curator=303, other_curator=404, admin=303),
        body=_form(reason="matrix"),
        fresh=("series_uid",),
        web=True,
    ),
    ("POST", "/curation/series/{series_uid}/redact"): Row(
        PAGE_CHANGE,
        body=_form(reason="matrix", sop="matrix", rectangles="0,0,2,2", scope="series"),
        fresh=("series_uid",),
        web=True,
    ),
    ("POST", "/curation/series/{series_uid}/edit"): Row(
        PAGE_CHANGE,
        body=_form(reason="matrix", sop="matrix", attribute="SeriesNumber", value="7"),
        fresh=("series_uid",),
        web=True,
    ),
    ("POST", "/curation/series/{series_uid}/reprocess"): Row(
        PAGE_CHANGE, body=_form(reason="matrix", profile="basic"), fresh=("series_uid",), web=True
    ),
    ("POST", "/curation/bulk"): Row(
        _each(401, curator=200, other_curator=409, admin=200), body=_bulk_body, web=True
    ),
    ("GET", "/curation/static"): Row(OPEN, web=True),
}


def app_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route of the app, HEAD aside; a mount is a GET."""
    app = create_app(Settings())
    found = set()
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            found.add(("GET", str(route.path)))
            continue
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, str(route.path)))
    return found


def test_every_route_has_a_row_in_the_permission_matrix() -> None:
    routes = app_routes()
    missing = sorted(routes - set(ROUTES))
    assert not missing, "routes without a row in tests/test_permissions.py ROUTES: " + ", ".join(
        f"{m} {p}" for m, p in missing
    )
    stale = sorted(set(ROUTES) - routes)
    assert not stale, f"rows of ROUTES naming no route: {stale}"


@dataclass
class World:
    """The server, what is stored, and each caller's credentials."""

    server: Server
    params: dict[str, Any]
    tokens: dict[str, str]
    held: list[str]
    secrets: tuple[str, ...]  # UIDs of SECRET's data: never in an answer to others
    csrf: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, dict[str, str]] = field(default_factory=dict)

    def fresh_series(self) -> str:
        """A held series of SECRET that no route has changed yet."""
        return self.held.pop()

    def headers(self, who: str) -> dict[str, str]:
        token = self.tokens.get(who)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def login(self, who: str) -> None:
        """A curator page session for who, when who may log in (none otherwise)."""
        self.cookies.pop(who, None)
        self.csrf.pop(who, None)
        if who not in ("curator", "other_curator", "admin"):
            return
        session = requests.Session()
        r = session.post(
            f"{self.server.url}/curation/login", data={"token": self.tokens[who]}, timeout=30
        )
        assert r.ok, r.text
        self.cookies[who] = session.cookies.get_dict()
        self.csrf[who] = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def world(
    server_factory: Callable[..., Server],
    database_url: str,
) -> World:
    # Logins with refused tokens are part of the matrix; the rate limit has its own test.
    server = server_factory(CARINA_AUTH_FAILURE_LIMIT="100000/minute")
    for name in ("SECRET", "OTHER"):
        server.create_collection(name)  # restricted
    study, series, sop = server.store(ct_series(Phi(), 2, rows=16, columns=16), "SECRET")
    server.store([ds for _ in range(24) for ds in burned_in_series(1)], "SECRET")
    queue = server.http.get(
        f"{server.url}/api/curation/queue", params={"collection": "SECRET"}, timeout=30
    ).json()
    held = [row["series_uid"] for row in queue]
    assert len(held) == 24

    def token(role: str, collection: str | None = None, name: str | None = None) -> str:
        args = ["--role", role, *(["--collection", collection] if collection else [])]
        return server.new_token(*args, "--name", name or role)

    tokens = {
        "reader": token("reader", "SECRET"),
        "other_reader": token("reader", "OTHER", "other_reader"),
        "submitter": token("submitter", "SECRET"),
        "curator": token("curator", "SECRET"),
        "other_curator": token("curator", "OTHER", "other_curator"),
        "admin": token("admin"),
        "revoked": token("reader", "SECRET", "revoked"),
    }
    server.cli("token", "revoke", tokens["revoked"].split("_")[1])
    reader = bearer(tokens["reader"])
    made = requests.post(
        f"{server.url}/api/shares",
        json={"name": "matrix", "studies": [study]},
        headers=reader,
        timeout=30,
    ).json()
    link = requests.post(
        f"{server.url}/api/shares/{made['share_id']}/links", json={}, headers=reader, timeout=30
    ).json()
    tokens["link"] = link["token"]
    held_series = held.pop()
    with psycopg.connect(database_url) as conn:
        (held_sop,) = conn.execute(  # type: ignore[misc]
            "SELECT sop_uid FROM instances WHERE series_uid = %s LIMIT 1", (held_series,)
        ).fetchone()
        (submission,) = conn.execute(  # type: ignore[misc]
            "SELECT min(id) FROM submissions WHERE collection = 'SECRET'"
        ).fetchone()
    params = {
        "study": study,
        "series": series,
        "sop": sop,
        "frames": "1",
        "frame": "1",
        "tag": "7FE00010",
        "collection": "SECRET",
        "share": made["share_id"],
        "version": "1",
        "series_uid": held_series,
        "held": held_series,
        "held_sop": held_sop,
        "submission_id": str(submission),
        "decision": "release",
        "path": "curation.css",  # a file of the curator page's static mount
    }
    return World(server, params, tokens, held, (study, series, sop, held_series))


def _request(world: World, method: str, template: str, row: Row, who: str) -> requests.Response:
    params = {**world.params, **{k: world.params[v] for k, v in row.params.items()}}
    may_pass = row.expect[who] not in (401, 403, 404, 405)
    for name in row.fresh:
        params[name] = world.fresh_series() if may_pass else world.params["held"]
    path = template.format(**params) if "{" in template else template
    if template == "/curation/static":
        path += "/" + params["path"]
    kwargs: dict[str, Any] = row.body(world, who) if row.body else {}
    headers = {**world.headers(who), **kwargs.pop("headers", {})}
    cookies = None
    if row.web:
        world.login(who)
        cookies = world.cookies.get(who)
        if "data" in kwargs and isinstance(kwargs["data"], dict) and "csrf" in kwargs["data"]:
            kwargs["data"]["csrf"] = world.csrf.get(who, "")
    return requests.request(
        method,
        world.server.url + path,
        headers=headers,
        cookies=cookies,
        allow_redirects=False,
        timeout=120,
        **kwargs,
    )


def _may_see(who: str, template: str) -> bool:
    """Whether who may see SECRET's UIDs in an answer of the route: its readers anywhere, a
    link token through its share's root, a curator page's session its own series."""
    return who in READERS or (who == "link" and template.startswith("/shares/"))


@pytest.mark.parametrize("who", CALLERS)
def test_each_caller_gets_exactly_what_the_matrix_says_on_every_route(
    world: World, who: str
) -> None:
    wrong = []
    for (method, template), row in sorted(ROUTES.items()):
        r = _request(world, method, template, row, who)
        if r.status_code != row.expect[who]:
            wrong.append(f"{method} {template}: {r.status_code} (expected {row.expect[who]})")
        elif r.ok and method == "GET" and not _may_see(who, template):
            leaked = [uid for uid in world.secrets if uid in r.text]
            if leaked:
                wrong.append(f"{method} {template}: shows SECRET's {leaked}")
    assert not wrong, f"{who}:\n" + "\n".join(wrong)
