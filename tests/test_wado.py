"""WADO-RS over real HTTP: retrieve at each level, media-type negotiation, metadata, 404s."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

import pytest
import requests
from pydicom.uid import generate_uid

from tests.conftest import Server, wait_for_series
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow
DICOM_MULTIPART = 'multipart/related; type="application/dicom"'


@pytest.fixture(scope="module")
def series(server: Server) -> tuple[str, str, list[str], list]:
    """(study, series, sop uids in instance order, datasets sent) of one stored series."""
    sent = ct_series(Phi(), 3, rows=32, columns=32)
    client = server.client()
    client.store_instances(sent)
    wait_for_series(server.database_url)
    [study] = client.search_for_studies()
    st = study["0020000D"]["Value"][0]
    [se] = client.search_for_series(st)
    se_uid = se["0020000E"]["Value"][0]
    sops = [i["00080018"]["Value"][0] for i in client.search_for_instances(st, se_uid)]
    return st, se_uid, sops, sent


def parts(r: requests.Response) -> list:
    """The parts of a multipart/related response, parsed by the standard library."""
    head = f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + r.content)
    return list(msg.iter_parts())


def test_series_retrieve_streams_every_instance_as_a_part(series: tuple, server: Server) -> None:
    st, se, sops, sent = series
    r = server.http.get(
        f"{server.dicomweb}/studies/{st}/series/{se}", headers={"Accept": DICOM_MULTIPART}
    )
    assert r.status_code == 200
    got = parts(r)
    assert len(got) == len(sent)
    for p in got:
        assert p.get_content_type() == "application/dicom"
        assert p.get_param("transfer-syntax") == "1.2.840.10008.1.2.1"
        assert int(p["content-length"]) == len(p.get_payload(decode=True))


def test_instance_retrieve_gives_one_part(series: tuple, server: Server) -> None:
    st, se, sops, _ = series
    r = server.http.get(
        f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sops[1]}",
        headers={"Accept": DICOM_MULTIPART + "; transfer-syntax=*"},
    )
    assert r.status_code == 200
    assert len(parts(r)) == 1


def test_stored_transfer_syntax_asked_by_name_is_served(series: tuple, server: Server) -> None:
    st, _, _, _ = series
    r = server.http.get(
        f"{server.dicomweb}/studies/{st}",
        headers={"Accept": DICOM_MULTIPART + "; transfer-syntax=1.2.840.10008.1.2.1"},
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "accept",
    [
        DICOM_MULTIPART + "; transfer-syntax=1.2.840.10008.1.2.4.50",
        "application/json",
        'multipart/related; type="application/octet-stream"',
    ],
)
def test_unavailable_media_type_or_syntax_is_406(
    series: tuple, server: Server, accept: str
) -> None:
    st, _, _, _ = series
    r = server.http.get(f"{server.dicomweb}/studies/{st}", headers={"Accept": accept})
    assert r.status_code == 406
    assert r.json()["error"]


def test_metadata_at_each_level_counts_instances(series: tuple, server: Server) -> None:
    st, se, sops, sent = series
    base = f"{server.dicomweb}/studies/{st}"
    for url, n in (
        (f"{base}/metadata", 3),
        (f"{base}/series/{se}/metadata", 3),
        (f"{base}/series/{se}/instances/{sops[0]}/metadata", 1),
    ):
        r = server.http.get(url)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/dicom+json")
        assert len(r.json()) == n


def test_unknown_uids_are_404(series: tuple, server: Server) -> None:
    st, se, _, _ = series
    missing = generate_uid()
    for url in (
        f"/studies/{missing}",
        f"/studies/{st}/series/{missing}",
        f"/studies/{st}/series/{se}/instances/{missing}",
        f"/studies/{missing}/metadata",
        f"/studies/{st}/series/{missing}/metadata",
    ):
        r = server.http.get(server.dicomweb + url)
        assert r.status_code == 404, url


def test_series_under_the_wrong_study_is_404(series: tuple, server: Server) -> None:
    _, se, _, _ = series
    assert (
        server.http.get(f"{server.dicomweb}/studies/{generate_uid()}/series/{se}").status_code
        == 404
    )
