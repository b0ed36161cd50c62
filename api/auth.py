"""Authentication and authorization of HTTP requests, as FastAPI dependencies.

A request is anonymous or carries `Authorization: Bearer <token>` (RFC 6750; what
dicomweb-client and OHIF send). A presented token must be valid wherever it is sent: an expired
or revoked one is refused (401), never quietly treated as anonymous, so a client whose token
lapsed is told rather than shown less. Data a caller may not read is answered as if it did not
exist (404, and absent from searches), so restricted collections do not reveal what they hold.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TypeVar

from fastapi import Request
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.concurrency import run_in_threadpool

from carina.archive import access, audit, collections, shares, tokens
from carina.archive.access import ANONYMOUS, Principal, Scope
from carina.archive.auth_cache import AuthCache
from carina.archive.errors import NotFound

from .context import runtime as _runtime

REALM = 'Bearer realm="carina"'
T = TypeVar("T")


class AuthError(Exception):
    """A request refused for who sent it; api/errors.py answers it with status and headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def challenge(error: str | None = None, description: str | None = None) -> dict[str, str]:
    """The WWW-Authenticate header of RFC 6750 3: the scheme, and why a token was refused."""
    value = REALM
    if error:
        value += f', error="{error}"'
    if description:
        value += f', error_description="{description}"'
    return {"WWW-Authenticate": value}


class FailureLimit:
    """Bad tokens allowed per client (by address) in a moving window, e.g. "10/minute"; past
    it, every request of that client that presents a token gets 429 until the window moves
    (guessing tokens stays slow). Kept in memory: each `carina serve` process counts its own."""

    def __init__(self, rate: str) -> None:
        self._limit = parse(rate)
        self._window = MovingWindowRateLimiter(MemoryStorage())

    def blocked(self, client: str) -> bool:
        """Whether client has used up its bad tokens."""
        return not self._window.test(self._limit, client)

    def failed(self, client: str) -> None:
        """Count one bad token of client."""
        self._window.hit(self._limit, client)

    def retry_after(self, client: str) -> int:
        """Seconds until client may try a token again."""
        reset = self._window.get_window_stats(self._limit, client).reset_time
        return max(1, int(reset - time.time()) + 1)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def authenticate(request: Request) -> Principal:
    """Dependency of every data route: the request's principal (kept on request.state). A
    token the cache knows is answered here, on the event loop; any other goes to the
    database in a worker thread."""
    header = request.headers.get("authorization")
    if header is None:
        principal = ANONYMOUS
    else:
        found = _cached(request, header)
        principal = found or await run_in_threadpool(_bearer, request, header)
    request.state.principal = principal
    return principal


def _presented(header: str) -> str:
    """The credentials of a Bearer Authorization header ("" for any other scheme)."""
    scheme, _, credentials = header.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def _bearer(request: Request, header: str) -> Principal:
    presented = _presented(header)
    oidc = request.app.state.oidc
    if presented and oidc is not None and not presented.startswith(tokens.PREFIX):
        return _checked(request, lambda: oidc.principal(presented))
    return Principal.of_token(verify(request, presented or None))


def _auth_cache(request: Request) -> AuthCache | None:
    return getattr(request.app.state, "auth_cache", None)


def _token_key(presented: str) -> bytes:
    """What a verified token is cached under: a digest, never the token itself."""
    return hashlib.sha256(presented.encode()).digest()


def _cached(request: Request, header: str) -> Principal | None:
    """The principal of a Carina token verified before and unchanged since (None: ask the
    database); a client over its bad-token limit is always sent the long way, to its 429."""
    cache = _auth_cache(request)
    presented = _presented(header)
    if cache is None or not presented.startswith(tokens.PREFIX):
        return None
    token = cache.get("token", _token_key(presented))
    if not isinstance(token, tokens.Token) or token.state(datetime.now(UTC)) != "active":
        return None
    if request.app.state.auth_failures.blocked(_client(request)):
        return None
    return Principal.of_token(token)


def verify(request: Request, presented: str | None) -> tokens.Token:
    """The active token of a presented one (None: a malformed header), or AuthError: 401 for a
    bad token (counted against the client), 429 once the client has sent too many."""

    def check() -> tokens.Token:
        if presented is None:
            raise tokens.InvalidToken("the Authorization header must be 'Bearer <token>'")
        pool = _runtime(request).pool
        cache = _auth_cache(request)
        if cache is None:
            return tokens.verify(pool, presented)
        return cache.lookup(
            "token", _token_key(presented), lambda _: tokens.verify(pool, presented)
        )

    return _checked(request, check)


def _checked(request: Request, check: Callable[[], T]) -> T:
    """What check proves of a presented token, or AuthError: 401 when it raises InvalidToken
    (counted against the client), 429 once the client has sent too many bad tokens."""
    limit: FailureLimit = request.app.state.auth_failures
    client = _client(request)
    if limit.blocked(client):
        raise AuthError(
            429,
            "too many bad tokens from this client; try again later",
            {"Retry-After": str(limit.retry_after(client))},
        )
    try:
        return check()
    except tokens.InvalidToken as e:
        limit.failed(client)
        raise AuthError(401, str(e), challenge("invalid_token", str(e))) from None


def principal(request: Request) -> Principal:
    """The principal authenticate() found for this request."""
    return getattr(request.state, "principal", ANONYMOUS)  # type: ignore[no-any-return]


def read_scope(request: Request) -> Scope:
    """What this request may read through its root: on /collections/{name}/... that
    collection, on /shares/{id}/... that share's version (NotFound when it does not exist or
    may not be read), elsewhere every collection the principal may read."""
    pool = _runtime(request).pool
    who = principal(request)
    readable = readable_collections(request, who)
    share_id = request.path_params.get("share")
    if share_id is not None:
        version = request.path_params.get("version")
        share = shares.get(pool, share_id, int(version) if version else None)
        if not who.may_read_share(share_id, share.collections, readable):
            raise NotFound("no such share")
        return Scope(share=(share.share_id, share.version))
    name = request.path_params.get("collection")
    if name is None:
        return Scope(None if readable is None else tuple(readable))
    if readable is not None and name not in readable:
        raise NotFound(f"no collection {name}")
    return Scope((collections.get(pool, name).name,))


async def read_scope_async(request: Request) -> Scope:
    """read_scope, answered on the event loop when it needs no database (the root is
    /dicomweb and the caller's readable collections are known: admin, or cached), else in a
    worker thread."""
    who = principal(request)
    params = request.path_params
    if "share" not in params and "collection" not in params:
        if who.is_admin:
            return Scope(None)
        cache = _auth_cache(request)
        readable = cache.get("readable", who.grants) if cache is not None else None
        if isinstance(readable, list):
            return Scope(tuple(readable))
    return await run_in_threadpool(read_scope, request)


def readable_collections(request: Request, who: Principal) -> list[str] | None:
    """access.readable_collections of who, from the cache while no collection has changed."""
    cache = _auth_cache(request)
    pool = _runtime(request).pool
    if cache is None or who.is_admin:
        return access.readable_collections(pool, who)
    return cache.lookup("readable", who.grants, lambda _: access.readable_collections(pool, who))


def curated_collections(request: Request) -> tuple[str, ...] | None:
    """Dependency of the curator routes: the collections the principal curates (None: every
    one, for admin); 401 without a token, 403 with one that curates nothing."""
    return curated_by(principal(request))


def curated_by(who: Principal) -> tuple[str, ...] | None:
    """The collections who curates (None: every one, for admin); AuthError 401 for anonymous,
    403 for a principal that curates nothing."""
    if who is ANONYMOUS:
        raise AuthError(401, "curation needs a curator or admin token", challenge())
    if who.is_admin:
        return None
    curated = tuple(
        sorted({g.collection for g in who.grants if g.role == "curator" and g.collection})
    )
    if not curated:
        raise AuthError(403, "this token may not curate", challenge("insufficient_scope"))
    return curated


def read_only(request: Request) -> None:
    """Dependency of a share's routes: a share is read, never written (RFC 9110 15.5.6)."""
    if request.method not in ("GET", "HEAD"):
        raise AuthError(405, "a share is read-only", {"Allow": "GET, HEAD"})


def store_collection(request: Request) -> str:
    """The collection a STOW-RS request stores into, once its principal may store there."""
    who = principal(request)
    if who is ANONYMOUS:
        raise AuthError(401, "storing needs a submitter or admin token", challenge())
    root = request.path_params.get("collection")
    name = root or collections.DEFAULT
    if not who.may_store(name):
        if root is not None:
            read_scope(request)  # a collection root it may not see is not found, as on reads
        raise AuthError(
            403,
            f"this token may not store into collection {name}",
            challenge("insufficient_scope"),
        )
    return collections.get(_runtime(request).pool, name).name


def record_access(request: Request, studies: Iterable[str]) -> None:
    """Audit that this request read studies (one row each)."""
    audit.record(_runtime(request).pool, access_of(request), studies)


def access_of(request: Request) -> audit.Access:
    """This request as the access audit names it (for a query that audits its own read)."""
    who = principal(request)
    route = request.scope.get("route")
    template = getattr(route, "path_format", None) or "(no route)"
    return audit.Access(who.name, who.token_id, _client(request), request.method, template)
