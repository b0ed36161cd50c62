"""The curator web page, in Debian's chromium driven by Playwright and over plain HTTP: log in
with a token, work the queue, view a series, release and reject (alone and in bulk), with the
refusals (bad login, another collection, unknown or decided series, a missing CSRF token)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Server
from tests.factory import burned_in_series

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BAD_TOKEN = "carina_000000000000_" + 43 * "A"


@pytest.fixture(scope="module")
def held(server: Server) -> dict[str, tuple[str, str]]:
    """(study, series) of named held series: four in `default`, one in OTHER."""
    server.create_collection("OTHER")
    found = {}
    for name in ("release", "reject", "decided", "nocsrf"):
        study, series, _ = server.store(burned_in_series())
        found[name] = (study, series)
    study, series, _ = server.store(burned_in_series(), "OTHER")
    found["other"] = (study, series)
    return found


@pytest.fixture(scope="module")
def curator(server: Server) -> str:
    """A curator token of the default collection, named as the audit will show it."""
    return server.new_token("--role", "curator", "--collection", "default", "--name", "web-curator")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, through Playwright (no browser download)."""
    assert Path(CHROMIUM).exists(), "chromium is a test requirement (scripts/test installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def page_url(server: Server, path: str) -> str:
    return f"{server.url}/curation{path}"


def series_in_qido(server: Server, study: str) -> set[str]:
    r = server.http.get(f"{server.dicomweb}/studies/{study}/series", timeout=30)
    assert r.status_code in (200, 204), r.text
    return {s["0020000E"]["Value"][0] for s in r.json()} if r.status_code == 200 else set()


def stored_objects(server: Server) -> set[str]:
    return {p.stem for p in (server.data_dir / "objects").rglob("*.dcm")}


def object_keys(server: Server, series: str) -> list[str]:
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        rows = conn.execute("SELECT object_key FROM instances WHERE series_uid = %s", (series,))
        return [r[0] for r in rows]


def log_in(page: Page, server: Server, token: str) -> None:
    page.goto(page_url(server, "/queue"))
    expect(page).to_have_url(page_url(server, "/login"))
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")


def test_curator_reviews_releases_and_rejects_in_a_browser(
    server: Server,
    held: dict[str, tuple[str, str]],
    curator: str,
    browser: Browser,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    shots = tmp_path_factory.mktemp("screenshots")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()

    # A bad token is refused, and no session is opened.
    log_in(page, server, BAD_TOKEN)
    expect(page.locator(".error")).to_contain_text("Refused: unknown token")
    assert not context.cookies()

    # The curator's token opens the queue of its own collection's held series only.
    log_in(page, server, curator)
    expect(page).to_have_url(page_url(server, "/queue"))
    [cookie] = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert curator not in cookie["value"]
    shown = set(page.locator("tr[data-series]").evaluate_all("rs => rs.map(r => r.dataset.series)"))
    mine = {series for name, (_, series) in held.items() if name != "other"}
    assert shown == mine
    expect(page.locator("table.queue")).to_contain_text("burned-in-annotation")
    page.screenshot(path=str(shots / "queue.png"), full_page=True)

    # The series view: thumbnails, the frame viewer with a window, the flagged header.
    study, series = held["release"]
    page.click(f"a[href='/curation/series/{series}']")
    thumbs = page.locator("img.thumb")
    expect(thumbs).to_have_count(3)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.thumb, #frame-image')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    page.fill("#center", "40")
    page.fill("#width", "400")
    expect(page.locator("#frame-image")).to_have_attribute("src", re.compile(r"window=40%2C400"))
    page.wait_for_function(
        "() => { const i = document.getElementById('frame-image');"
        " return i.complete && i.naturalWidth === 16; }"
    )
    flagged = page.locator("tr.flagged")
    expect(flagged).to_have_count(1)
    expect(flagged).to_have_attribute("data-path", "BurnedInAnnotation")
    page.screenshot(path=str(shots / "series.png"), full_page=True)

    # Release: published, and visible over QIDO.
    assert series not in series_in_qido(server, study)
    page.fill("#release input[name=reason]", "marker only, no PHI")
    page.click("#release button")
    expect(page.locator("#state")).to_have_text("published")
    assert series in series_in_qido(server, study)

    # Reject another from the queue (bulk): gone from QIDO and from the store.
    study, series = held["reject"]
    keys = object_keys(server, series)
    before = stored_objects(server)
    page.goto(page_url(server, "/queue"))
    page.check(f"input.pick[value='{series}']")
    page.fill("#bulk input[name=reason]", "face visible")
    page.click("button[value=reject]")
    expect(page.locator("table.outcomes")).to_contain_text("done")
    assert series not in series_in_qido(server, study)
    assert len(before - stored_objects(server)) == len(keys) == 3
    assert not object_keys(server, series)

    # Both decisions are audited under the curator's token name.
    for name, action in (("release", "release"), ("reject", "reject")):
        view = server.http.get(f"{server.url}/api/curation/series/{held[name][1]}").json()
        assert [a["actor"].split(" (")[0] for a in view["audit"] if a["action"] == action] == [
            "web-curator"
        ]
    context.close()


def logged_in(server: Server, token: str) -> tuple[requests.Session, str]:
    """A requests session logged in to the page, and its CSRF token (read from the page)."""
    s = requests.Session()
    r = s.post(page_url(server, "/login"), data={"token": token}, timeout=30)
    assert r.status_code == 200 and r.url == page_url(server, "/queue"), r.text
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert m
    return s, m.group(1)


def test_login_cookie_is_an_opaque_httponly_strict_session(server: Server, curator: str) -> None:
    r = requests.post(
        page_url(server, "/login"), data={"token": curator}, allow_redirects=False, timeout=30
    )
    assert r.status_code == 303 and r.headers["location"] == "/curation/queue"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/curation" in cookie
    assert curator not in cookie and curator.split("_", 2)[2] not in cookie


def test_page_refuses_a_bad_or_non_curator_token(server: Server) -> None:
    r = requests.post(page_url(server, "/login"), data={"token": BAD_TOKEN}, timeout=30)
    assert r.status_code == 401 and "unknown token" in r.text
    assert "set-cookie" not in r.headers
    reader = server.new_token("--role", "reader", "--collection", "default")
    r = requests.post(page_url(server, "/login"), data={"token": reader}, timeout=30)
    assert r.status_code == 403 and "may not curate" in r.text
    # Without a session, pages send the browser to the login page and posts are refused.
    r = requests.get(page_url(server, "/queue"), allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"] == "/curation/login"
    r = requests.post(page_url(server, "/bulk"), data={"reason": "x"}, timeout=30)
    assert r.status_code == 401


def test_page_answers_unknown_or_other_collections_series_with_404(
    server: Server, held: dict[str, tuple[str, str]], curator: str
) -> None:
    s, csrf = logged_in(server, curator)
    _, other = held["other"]
    for uid in ("1.2.3.999", other):
        r = s.get(page_url(server, f"/series/{uid}"), timeout=30)
        assert r.status_code == 404 and f"no series {uid}" in r.text
        r = s.post(page_url(server, f"/series/{uid}/release"), data={"reason": "x", "csrf": csrf})
        assert r.status_code == 404
    _, mine = held["decided"]
    assert s.get(page_url(server, f"/series/{mine}?sop=1.2.3.4"), timeout=30).status_code == 404
    r = s.get(page_url(server, f"/series/{mine}/instances/1.2.3.4/thumbnail"), timeout=30)
    assert r.status_code == 404


def test_page_decision_on_a_decided_series_is_409(
    server: Server, held: dict[str, tuple[str, str]], curator: str
) -> None:
    s, csrf = logged_in(server, curator)
    _, uid = held["decided"]
    r = s.post(page_url(server, f"/series/{uid}/release"), data={"reason": "ok", "csrf": csrf})
    assert r.status_code == 200 and "published" in r.text
    for decision in ("release", "reject"):
        r = s.post(
            page_url(server, f"/series/{uid}/{decision}"), data={"reason": "again", "csrf": csrf}
        )
        assert r.status_code == 409 and "is published" in r.text, decision
    r = s.post(
        page_url(server, "/bulk"),
        data={"decision": "reject", "reason": "again", "series": [uid], "csrf": csrf},
    )
    assert r.status_code == 409 and "is published" in r.text


def test_page_posts_without_the_csrf_token_are_403_and_change_nothing(
    server: Server, held: dict[str, tuple[str, str]], curator: str
) -> None:
    s, csrf = logged_in(server, curator)
    study, uid = held["nocsrf"]
    for data in ({"reason": "forged"}, {"reason": "forged", "csrf": csrf[::-1]}):
        r = s.post(page_url(server, f"/series/{uid}/reject"), data=data, timeout=30)
        assert r.status_code == 403 and "CSRF" in r.text
        r = s.post(page_url(server, "/bulk"), data={**data, "decision": "reject", "series": uid})
        assert r.status_code == 403
    r = s.post(page_url(server, "/logout"), data={}, timeout=30)
    assert r.status_code == 403
    view = server.http.get(f"{server.url}/api/curation/series/{uid}", timeout=30).json()
    assert view["state"] == "quarantined" and view["instances"] == 3


def test_logout_and_revocation_end_the_session(
    server: Server, held: dict[str, tuple[str, str]]
) -> None:
    token = server.new_token("--role", "curator", "--collection", "default")
    s, csrf = logged_in(server, token)
    cookie = s.cookies["carina_session"]
    r = s.post(page_url(server, "/logout"), data={"csrf": csrf}, timeout=30)
    assert r.status_code == 200 and r.url == page_url(server, "/login")
    stale = {"carina_session": cookie}
    r = requests.get(page_url(server, "/queue"), cookies=stale, allow_redirects=False)
    assert r.status_code == 303
    # A live session ends when its token is revoked.
    s, _ = logged_in(server, token)
    server.cli("token", "revoke", token.split("_")[1])
    r = s.get(page_url(server, "/queue"), allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"] == "/curation/login"


def test_queue_pages_a_hundred_series_at_a_time_with_filters(
    server: Server, held: dict[str, tuple[str, str]], curator: str
) -> None:
    server.store([burned_in_series(1)[0] for _ in range(101)])
    expected = {
        row["series_uid"]
        for row in server.http.get(
            f"{server.url}/api/curation/queue",
            params={"collection": "default", "limit": 1000},
            timeout=30,
        ).json()
    }
    assert len(expected) > 101
    s, _ = logged_in(server, curator)
    first = s.get(page_url(server, "/queue"), timeout=60)
    second = s.get(page_url(server, "/queue"), params={"page": 2}, timeout=60)
    on_first, on_second = (re.findall(r'data-series="([^"]+)"', r.text) for r in (first, second))
    assert len(on_first) == 100 and 'rel="next"' in first.text
    assert 'rel="next"' not in second.text and 'rel="prev"' in second.text
    assert set(on_first) | set(on_second) == expected and not set(on_first) & set(on_second)
    # Filters narrow it: no geometry findings here, and OTHER is not this curator's.
    for params in ({"rule": "geometry"}, {"collection": "OTHER"}, {"min_hours": 24}):
        r = s.get(page_url(server, "/queue"), params=params, timeout=30)
        assert r.status_code == 200 and "data-series=" not in r.text, params
    assert s.get(page_url(server, "/queue"), params={"page": 0}).status_code == 422
