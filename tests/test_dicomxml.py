"""Search and Metadata as multipart/related; type="application/dicom+xml" (PS3.18 8.7.3.2):
PS3.19 Native DICOM Model documents, checked against the JSON answer and against dcmtk's own
Native DICOM Model output (dcm2xml --native-format) for the same instance."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
import requests

from tests.conftest import Server
from tests.factory import Phi, ct_instance
from tests.test_wado_frames import parts

pytestmark = pytest.mark.slow

XML_ACCEPT = 'multipart/related; type="application/dicom+xml"'
NS = {"n": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
NUMBERS = {"DS", "FD", "FL", "IS", "SL", "SS", "UL", "US", "SV", "UV"}


@pytest.fixture(scope="module")
def stored(server: Server) -> tuple[str, str, str]:
    """(study, series, sop) of a stored CT image large enough to have a BulkDataURI."""
    return server.store([ct_instance(Phi(), 1, rows=32, columns=32)])


def documents(r: requests.Response) -> list[ElementTree.Element]:
    """The NativeDicomModel documents of a multipart/related XML answer, parsed."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(XML_ACCEPT)
    found = []
    for part in parts(r):
        assert part.get_content_type() == "application/dicom+xml"
        found.append(ElementTree.fromstring(part.get_payload(decode=True)))
    return found


def values(node: ElementTree.Element) -> dict[str, tuple[str, list]]:
    """tag -> (vr, values) of a NativeDicomModel element or Item; PN values as their
    Alphabetic components, sequence items recursively, bulk data as its URI."""
    out = {}
    for attr in node.findall("n:DicomAttribute", NS):
        vr = attr.get("vr")
        if vr == "SQ":
            vals = [values(item) for item in attr.findall("n:Item", NS)]
        elif vr == "PN":
            vals = [
                {c.tag.split("}")[1]: c.text for c in pn.findall("n:Alphabetic/*", NS)}
                for pn in attr.findall("n:PersonName", NS)
            ]
        else:
            vals = [v.text for v in attr.findall("n:Value", NS)]
            vals += [b.get("uri") for b in attr.findall("n:BulkData", NS)]
        out[attr.get("tag")] = (vr, vals)
    return out


def same(a: tuple[str, list], b: tuple[str, list]) -> bool:
    """Equal values, numbers compared as numbers (dcmtk prints them as stored)."""
    (vr, xs), (_, ys) = a, b
    if len(xs) != len(ys):
        return False
    if vr in NUMBERS:
        return all(
            math.isclose(float(x), float(y), rel_tol=1e-9) for x, y in zip(xs, ys, strict=True)
        )
    if vr == "SQ":
        return all(_same_items(x, y) for x, y in zip(xs, ys, strict=True))
    return xs == ys


def _same_items(x: dict, y: dict) -> bool:
    return all(t in x and same(y[t], x[t]) for t in y if y[t][1])


def test_search_in_xml_holds_what_the_json_answer_holds(server: Server, stored: tuple) -> None:
    url = f"{server.dicomweb}/studies/{stored[0]}/series/{stored[1]}/instances"
    [doc] = documents(server.http.get(url, headers={"Accept": XML_ACCEPT}))
    [item] = server.http.get(url).json()
    got = values(doc)
    assert set(got) == set(item)
    for tag, element in item.items():
        assert got[tag][0] == element["vr"], tag
        expected = [str(v) if isinstance(v, str) else v for v in element.get("Value", [])]
        if element["vr"] in NUMBERS:
            assert [float(v) for v in got[tag][1]] == [float(v) for v in expected], tag
        elif element["vr"] not in ("PN", "SQ"):
            assert got[tag][1] == expected, tag
    # A whole study list: one document per study.
    studies = server.http.get(f"{server.dicomweb}/studies", headers={"Accept": XML_ACCEPT})
    assert len(documents(studies)) == 1


def test_metadata_in_xml_matches_dcmtk_native_model_of_the_instance(
    server: Server, stored: tuple, tmp_path: Path
) -> None:
    study, series, sop = stored
    url = f"{server.dicomweb}/studies/{study}/series/{series}/metadata"
    [doc] = documents(server.http.get(url, headers={"Accept": XML_ACCEPT}))
    ours = values(doc)
    assert ours["7FE00010"][1] == [
        f"{server.dicomweb}/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"
    ]
    assert ours["00100010"][1][0]  # the research name, as components
    instance = server.client().retrieve_instance(study, series, sop)
    path = tmp_path / "instance.dcm"
    instance.save_as(path, enforce_file_format=True)
    dcmtk = subprocess.run(
        ["dcm2xml", "--native-format", "--use-xml-namespace", str(path)],
        capture_output=True,
        check=True,
    ).stdout
    reference = values(ElementTree.fromstring(dcmtk))
    compared = 0
    for tag, element in reference.items():
        if tag.startswith("0002") or not element[1] or element[0] in ("OB", "OW", "UN"):
            continue
        assert tag in ours, tag
        assert same(ours[tag], element), (tag, ours[tag], element)
        compared += 1
    assert compared > 30


def test_bare_xml_or_other_types_are_406_and_json_stays_the_default(
    server: Server, stored: tuple
) -> None:
    for accept in ("application/dicom+xml", "text/html"):
        r = server.http.get(f"{server.dicomweb}/studies", headers={"Accept": accept})
        assert r.status_code == 406
        assert "dicom+xml" in r.json()["error"]
    both = f"application/dicom+json, {XML_ACCEPT}"
    r = server.http.get(f"{server.dicomweb}/studies", headers={"Accept": both})
    assert r.headers["content-type"].startswith("application/dicom+json")
