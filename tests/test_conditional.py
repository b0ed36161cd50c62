"""Conditional WADO-RS over real HTTP: ETag and Last-Modified on retrieve and metadata
responses, 304 Not Modified for If-None-Match and If-Modified-Since (RFC 9110 13)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime

import pytest

from tests.conftest import Server
from tests.factory import Phi, ct_instance, ct_series
from tests.test_wado_frames import store

pytestmark = pytest.mark.slow
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
IMPLICIT = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'


@pytest.fixture(scope="module")
def series(server: Server) -> tuple[Phi, str, str]:
    """(phi, study, series) of a stored two-instance series."""
    phi = Phi()
    sent = ct_series(phi, 2, rows=8, columns=8)
    server.client().store_instances(sent[1:])
    server.settled()
    st, se, _ = store(server, sent[0])
    return phi, st, se


def urls(server: Server, st: str, se: str) -> list[str]:
    base = f"{server.dicomweb}/studies/{st}"
    return [base, f"{base}/series/{se}", f"{base}/metadata", f"{base}/series/{se}/metadata"]


def test_retrieve_and_metadata_carry_validators(server: Server, series: tuple) -> None:
    _, st, se = series
    for url in urls(server, st, se):
        r = server.http.get(url)
        assert r.status_code == 200, url
        assert r.headers["etag"].startswith('W/"'), url
        parsedate_to_datetime(r.headers["last-modified"])


def test_if_none_match_with_current_etag_is_304_without_body(server: Server, series: tuple) -> None:
    _, st, se = series
    for url in urls(server, st, se):
        first = server.http.get(url)
        etag = first.headers["etag"]
        again = server.http.get(url, headers={"If-None-Match": f'"other", {etag}'})
        assert again.status_code == 304, url
        assert again.content == b""
        assert again.headers["etag"] == etag
        assert server.http.get(url, headers={"If-None-Match": "*"}).status_code == 304
        assert server.http.get(url, headers={"If-None-Match": '"stale"'}).status_code == 200


def test_if_modified_since(server: Server, series: tuple) -> None:
    _, st, se = series
    for url in urls(server, st, se):
        modified = parsedate_to_datetime(server.http.get(url).headers["last-modified"])
        at = format_datetime(modified, usegmt=True)
        before = format_datetime(modified - timedelta(days=1), usegmt=True)
        assert server.http.get(url, headers={"If-Modified-Since": at}).status_code == 304
        assert server.http.get(url, headers={"If-Modified-Since": before}).status_code == 200
        assert server.http.get(url, headers={"If-Modified-Since": "yesterday"}).status_code == 200
        # If-None-Match decides alone when both are sent.
        both = {"If-Modified-Since": at, "If-None-Match": '"stale"'}
        assert server.http.get(url, headers=both).status_code == 200


def test_etag_depends_on_the_transfer_syntax_sent(server: Server, series: tuple) -> None:
    _, st, _ = series
    url = f"{server.dicomweb}/studies/{st}"
    stored = server.http.get(url, headers={"Accept": AS_STORED})
    implicit = server.http.get(url, headers={"Accept": IMPLICIT})
    assert stored.headers["etag"] != implicit.headers["etag"]
    r = server.http.get(url, headers={"Accept": IMPLICIT, "If-None-Match": stored.headers["etag"]})
    assert r.status_code == 200


def test_metadata_etag_depends_on_the_root(server: Server, series: tuple) -> None:
    _, st, _ = series
    plain = server.http.get(f"{server.dicomweb}/studies/{st}/metadata")
    collection = server.http.get(f"{server.url}/collections/default/dicomweb/studies/{st}/metadata")
    assert collection.status_code == 200
    assert plain.headers["etag"] != collection.headers["etag"]


def test_conditional_request_of_unknown_study_is_still_404(server: Server) -> None:
    r = server.http.get(f"{server.dicomweb}/studies/1.2.3.4.5", headers={"If-None-Match": "*"})
    assert r.status_code == 404


def test_browser_viewer_may_read_the_validators(
    server_factory: Callable[..., Server], series: tuple
) -> None:
    viewer = "http://viewer.test"
    cors = server_factory(CARINA_CORS_ORIGINS=json.dumps([viewer]))
    r = cors.http.get(f"{cors.dicomweb}/studies/{series[1]}/metadata", headers={"Origin": viewer})
    exposed = r.headers["access-control-expose-headers"].lower()
    assert "etag" in exposed and "last-modified" in exposed


def test_rendered_and_thumbnails_are_revalidated(server: Server, series: tuple) -> None:
    _, st, se = series
    base = f"{server.dicomweb}/studies/{st}"
    for url in (
        f"{base}/thumbnail",
        f"{base}/series/{se}/thumbnail",
        f"{base}/series/{se}/rendered",
    ):
        r = server.http.get(url)
        assert r.status_code == 200, url
        etag = r.headers["etag"]
        assert server.http.get(url, headers={"If-None-Match": etag}).status_code == 304, url
        png = server.http.get(url, headers={"Accept": "image/png", "If-None-Match": etag})
        assert png.status_code == 200, url  # another representation
        assert png.headers["etag"] != etag


def test_rendering_parameters_change_the_etag(server: Server, series: tuple) -> None:
    _, st, se = series
    url = f"{server.dicomweb}/studies/{st}/series/{se}/rendered"
    plain = server.http.get(url).headers["etag"]
    windowed = server.http.get(url, params={"window": "40,400,linear"})
    assert windowed.headers["etag"] != plain
    again = server.http.get(
        url, params={"window": "40,400,linear"}, headers={"If-None-Match": plain}
    )
    assert again.status_code == 200


def test_a_new_instance_changes_the_etag(server: Server, series: tuple) -> None:
    phi, st, se = series
    thumbnail = f"{server.dicomweb}/studies/{st}/thumbnail"
    before = {
        url: server.http.get(url).headers["etag"] for url in [*urls(server, st, se), thumbnail]
    }
    store(server, ct_instance(phi, 3, rows=8, columns=8))  # the next slice: no gap
    for url, etag in before.items():
        r = server.http.get(url, headers={"If-None-Match": etag})
        assert r.status_code == 200, url
        assert r.headers["etag"] != etag


def test_frames_and_bulk_data_are_revalidated(server: Server, series: tuple) -> None:
    _, st, se = series
    [first, *_] = server.client().search_for_instances(st, se)
    sop = first["00080018"]["Value"][0]
    base = f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sop}"
    multipart = {"Accept": 'multipart/related; type="application/octet-stream"'}
    for url in (f"{base}/frames/1", f"{base}/bulkdata/7FE00010"):
        r = server.http.get(url, headers=multipart)
        assert r.status_code == 200, url
        etag = r.headers["etag"]
        parsedate_to_datetime(r.headers["last-modified"])
        again = server.http.get(url, headers={**multipart, "If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"", url
        # A bare application/octet-stream body is another representation.
        single = {"Accept": "application/octet-stream", "If-None-Match": etag}
        bare = server.http.get(url, headers=single)
        assert bare.status_code == 200 and bare.headers["etag"] != etag, url
