"""STOW-RS of PS3.19 Native DICOM Model XML metadata plus bulk data parts (PS3.18 10.5.1.2),
the XML written by dcmtk's dcm2xml --native-format from the Part 10 file, sent as raw HTTP
(dicomweb-client sends application/dicom parts only). XML that is not a plain Native DICOM
Model document (DTDs, entities, bombs) is refused with a reason."""

from __future__ import annotations

import subprocess
from pathlib import Path
from xml.etree.ElementTree import fromstring

import numpy as np
import pytest
from pydicom import Dataset

from tests.conftest import Server
from tests.factory import Phi, ct_instance
from tests.test_stow_bad_input import failures, stored
from tests.test_stow_json import CANNOT_UNDERSTAND, Part, body, bulk, retrieve, stow

pytestmark = pytest.mark.slow
XML_MULTIPART = 'multipart/related; type="application/dicom+xml"; boundary=XyZ'
NATIVE = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"


def dcm2xml(ds: Dataset, tmp_path: Path, *options: str) -> bytes:
    """ds as dcmtk writes it in the Native DICOM Model (binary values as BulkData uuid)."""
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run(
        ["dcm2xml", "--native-format", "--use-xml-namespace", *options, str(path)],
        capture_output=True,
        check=True,
    )
    return done.stdout


def xml_part(document: bytes) -> Part:
    return {"Content-Type": "application/dicom+xml"}, document


def pixel_uuid(document: bytes) -> str:
    """The uuid dcm2xml gave the Pixel Data's BulkData element."""
    for attribute in fromstring(document).iter(f"{NATIVE}DicomAttribute"):
        if attribute.get("tag") == "7FE00010":
            return attribute.find(f"{NATIVE}BulkData").get("uuid")  # type: ignore[union-attr]
    raise AssertionError("no Pixel Data in the document")


def test_xml_stow_stores_instances_with_their_bulk_data(server: Server, tmp_path: Path) -> None:
    phi = Phi()
    sent = [ct_instance(phi, n, rows=32, columns=24) for n in (1, 2)]
    documents = [dcm2xml(ds, tmp_path) for ds in sent]
    parts = [xml_part(d) for d in documents]
    parts += [bulk(pixel_uuid(d), ds.PixelData) for d, ds in zip(documents, sent, strict=True)]
    r = stow(server, body(*parts), XML_MULTIPART)
    assert r.status_code in (200, 202), r.text
    assert len(stored(r)) == 2 and not failures(r)
    got = retrieve(server, r)
    assert np.array_equal(got.pixel_array, sent[0].pixel_array)
    # The same intake as a Part 10 instance: de-identified.
    assert got.SOPInstanceUID.startswith("2.25.")
    assert not any(s in str(got) for s in phi.strings())
    assert got.ImagePositionPatient == sent[0].ImagePositionPatient


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<NativeDicomModel><DicomAttribute tag="00100010" vr="PN"><Value number="1">&lol3;</Value>
</DicomAttribute></NativeDicomModel>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<NativeDicomModel><DicomAttribute tag="00100010" vr="PN"><Value number="1">&secret;</Value>
</DicomAttribute></NativeDicomModel>"""


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (BOMB, "DTD"),
        (EXTERNAL, "DTD"),
        (b"<NativeDicomModel><DicomAttribute", "well-formed"),
        (b"not xml at all", "well-formed"),
        (b"<html><body/></html>", "NativeDicomModel"),
        (
            b'<NativeDicomModel><DicomAttribute tag="zz" vr="PN"/></NativeDicomModel>',
            "hexadecimal",
        ),
        (
            b'<NativeDicomModel><DicomAttribute tag="00280010" vr="US">'
            b'<Value number="1">many</Value></DicomAttribute></NativeDicomModel>',
            "number",
        ),
    ],
)
def test_xml_that_is_not_a_plain_native_model_is_refused_with_a_reason(
    server: Server, document: bytes, reason: str
) -> None:
    r = stow(server, body(xml_part(document)), XML_MULTIPART)
    assert r.status_code == 409, r.text
    [(code, why)] = failures(r)
    assert code == CANNOT_UNDERSTAND
    assert reason in why
    assert "lol" not in r.text and "root:" not in r.text


def test_xml_instance_missing_its_bulk_data_is_refused_and_others_stored(
    server: Server, tmp_path: Path
) -> None:
    a, b = (ct_instance(Phi(), 1, rows=16, columns=16) for _ in range(2))
    xa, xb = dcm2xml(a, tmp_path), dcm2xml(b, tmp_path)
    r = stow(
        server, body(xml_part(xa), xml_part(xb), bulk(pixel_uuid(xa), a.PixelData)), XML_MULTIPART
    )
    assert r.status_code == 202, r.text
    assert len(stored(r)) == 1
    [(code, why)] = failures(r)
    assert code == CANNOT_UNDERSTAND and "BulkDataURI" in why
