"""The cache of verified tokens and readable collections (archive/auth_cache.py): it keeps
what the database said only while nothing changed, so every change that takes a grant away
(revocation, re-scoping, a collection made restricted, a share link revoked) is refused as
soon as PostgreSQL notifies it, whoever made it, and it answers nothing while its listener is
not connected."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import pytest
import requests

from carina.archive import auth_cache
from carina.archive.auth_cache import AuthCache
from tests.conftest import Server
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Site:
    """A server and one small study in each of two collections."""

    server: Server
    database_url: str
    pub: tuple[str, str, str]  # study, series, sop in PUB (public)
    secret: tuple[str, str, str]  # the same in SECRET (restricted)

    def token(self, *args: str) -> str:
        """A new token made by the CLI."""
        return self.server.new_token(*args)

    def sql(self, query: str, *params: object) -> None:
        """Run query in a connection of its own, as another process would."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(query, params)

    def frame_url(self, collection_root: str | None, study: tuple[str, str, str]) -> str:
        """The frames URL of the study's instance, through a root."""
        s, se, sop = study
        root = self.server.root(collection_root)
        return f"{root}/studies/{s}/series/{se}/instances/{sop}/frames/1"


@pytest.fixture(scope="module")
def site(
    server_factory: Callable[..., Server],
    database_url: str,
) -> Site:
    server = server_factory()
    for name, visibility in (("PUB", "public"), ("SECRET", "restricted")):
        server.create_collection(name, "--visibility", visibility)
    pub = server.store(ct_series(Phi(), 1, rows=8, columns=8), "PUB")
    secret = server.store(ct_series(Phi(), 1, rows=8, columns=8), "SECRET")
    return Site(server, database_url, pub, secret)


def _get(url: str, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(url, headers=headers, timeout=30)


def _warm(url: str, token: str | None = None) -> None:
    """Read url a few times, so whatever the server caches of the caller is cached."""
    for _ in range(3):
        assert _get(url, token).status_code == 200


# PostgreSQL signals the listener when the change commits; the listener thread then clears the
# cache. That takes milliseconds, so a request sent by the changing process itself right after
# its commit may still be answered from memory; the entries themselves live for minutes
# (auth_cache.TTL), so a refusal within this bound is the notification's doing.
DELIVERY = 2.0


def _answered(
    url: str, token: str | None, status: int, seconds: float = DELIVERY
) -> requests.Response:
    """The first answer of url with status, asking until seconds have passed."""
    assert 10 * seconds < auth_cache.TTL
    deadline = time.monotonic() + seconds
    while True:
        r = _get(url, token)
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, (url, r.status_code)
            return r
        time.sleep(0.002)


def _live(cache: AuthCache, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cache.live:
        assert time.monotonic() < deadline, "the listener did not connect"
        time.sleep(0.01)


def test_cache_answers_until_a_change_is_notified_by_another_connection(site: Site) -> None:
    database_url = site.database_url  # migrated by the site's server
    cache = AuthCache(database_url).start()
    try:
        _live(cache)
        loads: list[str] = []

        def load(key: str) -> str:
            loads.append(key)
            return f"value of {key}"

        assert cache.lookup("token", "k", load) == "value of k"
        assert cache.lookup("token", "k", load) == "value of k"
        assert loads == ["k"]  # the second answer came from memory
        with psycopg.connect(database_url, autocommit=True) as conn:
            # A statement on api_tokens that changes nothing still notifies: the trigger is
            # per statement, and the cache cannot know what changed.
            conn.execute("UPDATE api_tokens SET name = name WHERE id = 'no-such-id'")
        deadline = time.monotonic() + 5
        while cache.get("token", "k") is not None:
            assert time.monotonic() < deadline, "the notification did not clear the cache"
            time.sleep(0.005)
        cache.lookup("token", "k", load)
        assert loads == ["k", "k"]
    finally:
        cache.stop()
    assert not cache.live
    assert cache.lookup("token", "k", load) == "value of k" and len(loads) == 3


def test_cache_answers_nothing_while_its_listener_is_disconnected(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    database_url = site.database_url
    monkeypatch.setattr(auth_cache, "RETRY", 0.5)
    cache = AuthCache(database_url).start()
    try:
        _live(cache)
        cache.lookup("readable", "k", lambda k: "old")
        assert cache.get("readable", "k") == "old"
        with psycopg.connect(database_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query = %s AND datname = current_database() AND pid <> pg_backend_pid()",
                (f"LISTEN {auth_cache.CHANNEL}",),
            ).fetchall()
        assert killed and all(ok for (ok,) in killed)
        deadline = time.monotonic() + 5
        while cache.live:
            assert time.monotonic() < deadline, "the lost connection went unnoticed"
            time.sleep(0.005)
        # Disconnected: nothing is answered from memory, nothing read now is kept.
        assert cache.get("readable", "k") is None
        assert cache.lookup("readable", "k", lambda k: "new") == "new"
        assert cache.get("readable", "k") is None
        _live(cache)  # it listens again by itself, with an empty cache
        assert cache.get("readable", "k") is None
    finally:
        cache.stop()


def test_token_revoked_in_sql_is_refused_on_frames_once_notified(site: Site) -> None:
    token = site.token("--role", "reader", "--collection", "SECRET")
    url = site.frame_url(None, site.secret)
    _warm(url, token)
    site.sql("UPDATE api_tokens SET revoked_at = now() WHERE id = %s", token.split("_")[1])
    r = _answered(url, token, 401)
    assert "revoked" in r.json()["error"]


def test_token_rescoped_in_sql_loses_its_collection_once_notified(site: Site) -> None:
    token = site.token("--role", "reader", "--collection", "SECRET")
    url = site.frame_url("SECRET", site.secret)
    _warm(url, token)
    site.sql(
        "UPDATE api_tokens SET role = 'submitter' WHERE id = %s", token.split("_")[1]
    )  # a role change: a submitter does not read its collection back
    _answered(url, token, 404)
    assert _get(site.frame_url(None, site.secret), token).status_code == 404


def test_collection_made_restricted_is_hidden_once_notified(site: Site) -> None:
    reader = site.token("--role", "reader", "--collection", "SECRET")
    url = site.frame_url(None, site.pub)
    _warm(url)
    _warm(url, reader)
    site.sql("UPDATE collections SET visibility = 'restricted' WHERE name = 'PUB'")
    try:
        _answered(url, None, 404)
        assert _get(url, reader).status_code == 404
        qido = _get(f"{site.server.dicomweb}/studies", reader)
        assert site.pub[0] not in qido.text
    finally:
        site.sql("UPDATE collections SET visibility = 'public' WHERE name = 'PUB'")
    _answered(url, None, 200)  # and readable again


def test_share_link_revoked_by_the_cli_is_refused_at_once(site: Site) -> None:
    share = site.server.cli("share", "create", "c", "--study", site.secret[0]).strip()
    link = site.token("--role", "share", "--share", share)
    s, se, sop = site.secret
    url = f"{site.server.url}/shares/{share}/dicomweb/studies/{s}/series/{se}/instances/{sop}"
    _warm(f"{url}/frames/1", link)
    site.server.cli("token", "revoke", link.split("_")[1])
    # The CLI's process has ended by now: the notification has long been delivered.
    r = _get(f"{url}/frames/1", link)
    assert r.status_code == 401 and "revoked" in r.json()["error"]
