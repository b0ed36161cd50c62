"""The requests OHIF's DICOMweb data source sends (extensions/default/src/DicomWebDataSource of
OHIF/Viewers 3.x, with dicomweb-client JS and cornerstone's WADO-RS image loader), replayed
against a real server with CORS enabled, exactly as a browser would send them."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from urllib.parse import quote

import pytest
import requests
from PIL import Image
from pydicom.uid import generate_uid

from tests.conftest import Server
from tests.factory import Phi, ct_instance
from tests.test_wado_frames import parts

pytestmark = pytest.mark.slow

VIEWER = "http://ohif.test"
# Images large enough for PixelData to be a BulkDataURI (not InlineBinary) in the metadata.
SIZE = 32
QIDO_ACCEPT = "application/dicom+json"
# What OHIF's utils.generateAcceptHeader builds for image requests (quoted parameters), and what
# cornerstone's wadors loadImage sends for /frames (unquoted); both ask for any stored syntax.
OHIF_IMAGE_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax="*"'
CORNERSTONE_FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
# dicomweb-client JS retrieveBulkData without mediaTypes (OHIF's thumbnail "bulkDataRetrieve").
BULKDATA_ACCEPT = 'multipart/related; type="application/octet-stream"'


@pytest.fixture(scope="module")
def ohif(server_factory: Callable[..., Server]) -> Server:
    """A Carina that lets the OHIF origin in, as an OHIF deployment configures it."""
    return server_factory(CARINA_CORS_ORIGINS=json.dumps([VIEWER]))


@pytest.fixture(scope="module")
def studies(ohif: Server) -> dict[str, dict]:
    """Study "ct": a CT series of 2 images and an MR series of 1; study "mr": one MR image.
    Keyed by name, each its QIDO study answer."""
    ct = Phi(patient_id="MRN-OHIF-1", study_date="20190304")
    mr = Phi(patient_id="MRN-OHIF-2", study_date="20210506")
    datasets = [ct_instance(ct, n, rows=SIZE, columns=SIZE) for n in (1, 2)]
    extra = ct_instance(replace(ct, series_uid=generate_uid()), 1, rows=SIZE, columns=SIZE)
    extra.Modality, extra.SeriesNumber = "MR", 4
    other = ct_instance(mr, 1, rows=SIZE, columns=SIZE)
    other.Modality = "MR"
    made = {}
    for name, sent in (("ct", [*datasets, extra]), ("mr", [other])):
        study, _, _ = ohif.store(sent)
        [made[name]] = ohif.client().search_for_studies(search_filters={"StudyInstanceUID": study})
    return made


def browser_get(
    server: Server, path: str, params: dict[str, str], accept: str
) -> requests.Response:
    """A GET as OHIF sends it from the viewer's origin: dicomweb-client JS encodes each query
    value with encodeURIComponent (so `*` stays, `,` becomes %2C), after a CORS preflight that
    must let the Authorization and Accept headers through."""
    url = server.dicomweb + path
    if params:
        url += "?" + "&".join(f"{k}={quote(str(v), safe='-_.!~*()')}" for k, v in params.items())
    preflight = requests.options(
        url,
        headers={
            "Origin": VIEWER,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "accept,authorization",
        },
        timeout=30,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == VIEWER
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "accept" in allowed
    r = requests.get(url, headers={**server.auth, "Accept": accept, "Origin": VIEWER}, timeout=60)
    assert r.headers.get("access-control-allow-origin") == VIEWER
    return r


def uid(item: dict, tag: str = "0020000D") -> str:
    return item[tag]["Value"][0]


def test_study_list_query_as_the_worklist_sends_it(ohif: Server, studies: dict) -> None:
    # qido.js mapParams: wildcards around typed text, PatientID by tag, modalities from the
    # filter's array (joined with commas by encodeURIComponent), the 101-study page, and a
    # StudyDate range from 19700102 when only an end date is set.
    name = studies["ct"]["00100010"]["Value"][0]["Alphabetic"]
    pid = uid(studies["ct"], "00100020")
    today = dt.date.today().strftime("%Y%m%d")
    params = {
        "PatientName": f"*{name[1:-1].lower()}*",
        "00100020": f"*{pid[1:-1]}*",
        "ModalitiesInStudy": "CT,MR",
        "limit": "101",
        "offset": "0",
        "fuzzymatching": "false",
        "includefield": "00081030,00080060,00080090,00100030",
        "StudyDate": f"19700102-{today}",
    }
    r = browser_get(ohif, "/studies", params, QIDO_ACCEPT)
    assert r.status_code == 200, r.text
    assert "warning" not in r.headers
    [study] = r.json()
    assert uid(study) == uid(studies["ct"])
    # What processResults reads for the list row.
    for tag in ("00080020", "00080030", "00080050", "00100020", "00100010", "00201208"):
        assert tag in study, tag
    assert study["00080061"]["Value"] == ["CT", "MR"]
    assert study["00201208"]["Value"] == [3]
    # The comma list of modalities matches either; the plain study list finds both studies.
    either = browser_get(ohif, "/studies", {"ModalitiesInStudy": "MR,PT", "limit": "101"}, "*/*")
    assert {uid(s) for s in either.json()} == {uid(s) for s in studies.values()}


def test_series_list_of_an_expanded_study_row(ohif: Server, studies: dict) -> None:
    # qido.js seriesInStudy: includefield SeriesDescription and SeriesDate (the description
    # itself is removed on intake by the Basic Profile).
    params = {"includefield": "0008103E,00080021"}
    r = browser_get(ohif, f"/studies/{uid(studies['ct'])}/series", params, QIDO_ACCEPT)
    assert r.status_code == 200, r.text
    series = r.json()
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["CT", "MR"]
    for s in series:
        for tag in ("0020000E", "00200011", "00201209", "00080021"):
            assert tag in s, tag
    assert sorted(s["00201209"]["Value"][0] for s in series) == [1, 2]


def test_viewer_loads_series_metadata_then_every_frame(ohif: Server, studies: dict) -> None:
    # retrieveMetadataLoaderAsync: series search, then each series' metadata; then cornerstone
    # fetches /frames/1 of every instance (wadors: imageIds) with its own Accept header.
    study = uid(studies["ct"])
    found = browser_get(ohif, f"/studies/{study}/series", {}, QIDO_ACCEPT).json()
    loaded = 0
    for series in (uid(s, "0020000E") for s in found):
        r = browser_get(ohif, f"/studies/{study}/series/{series}/metadata", {}, QIDO_ACCEPT)
        assert r.status_code == 200, r.text
        for instance in r.json():
            sop = uid(instance, "00080018")
            assert uid(instance, "0020000E") == series
            pixel_uri = instance["7FE00010"]["BulkDataURI"]
            assert pixel_uri.startswith(ohif.dicomweb + f"/studies/{study}/series/{series}/")
            frame = f"/studies/{study}/series/{series}/instances/{sop}/frames/1"
            for accept in (CORNERSTONE_FRAME_ACCEPT, OHIF_IMAGE_ACCEPT):
                got = browser_get(ohif, frame, {}, accept)
                assert got.status_code == 200, got.text
                [part] = parts(got)
                assert part.get_param("transfer-syntax") == "1.2.840.10008.1.2.1"
                assert len(part.get_payload(decode=True)) == SIZE * SIZE * 2
            loaded += 1
    assert loaded == 3


def test_thumbnails_as_the_study_browser_asks_for_them(ohif: Server, studies: dict) -> None:
    study = uid(studies["ct"])
    [series] = [
        s for s in ohif.client().search_for_series(study) if s["00080060"]["Value"] == ["CT"]
    ]
    path = f"/studies/{study}/series/{uid(series, '0020000E')}/thumbnail"
    # thumbnailRendering "thumbnail" through retrieveBulkData: accept=image/jpeg in the query,
    # the bulk data Accept header in the request.
    r = browser_get(ohif, path, {"accept": "image/jpeg"}, BULKDATA_ACCEPT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert Image.open(BytesIO(r.content)).format == "JPEG"
    # thumbnailRequestStrategy "fetch": viewport=256,256 and Accept: image/jpeg.
    r = browser_get(ohif, path, {"viewport": "256,256"}, "image/jpeg")
    assert r.status_code == 200, r.text
    assert Image.open(BytesIO(r.content)).size == (256, 256)


def test_rendered_instance_as_direct_url_fetches_it(ohif: Server, studies: dict) -> None:
    # createRenderedRetrieve + fetchRenderedURL: GET .../rendered with the token, no Accept set
    # by the page (a browser fetch sends */*).
    study = uid(studies["mr"])
    [instance] = ohif.client().search_for_instances(study)
    path = f"/studies/{study}/series/{uid(instance, '0020000E')}/instances/"
    path += f"{uid(instance, '00080018')}/rendered"
    r = browser_get(ohif, path, {}, "*/*")
    assert r.status_code == 200, r.text
    assert Image.open(BytesIO(r.content)).size == (SIZE, SIZE)
