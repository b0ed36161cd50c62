"""Making PS3.10 files of DICOM JSON instances (curation/dicom_json), on their own."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread

from carina.curation.dicom_json import part10

SC = {
    "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
    "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
}


@pytest.mark.parametrize("declared", [None, "ISO_IR 100"])
def test_text_the_declared_character_set_cannot_hold_is_kept_in_utf8(declared: str | None) -> None:
    instance = {**SC, "0008103E": {"vr": "LO", "Value": ["Thorax 日本 Müller"]}}
    if declared:
        instance["00080005"] = {"vr": "CS", "Value": [declared]}
    ds = dcmread(BytesIO(part10(instance, {})))
    assert ds.SeriesDescription == "Thorax 日本 Müller"
    assert ds.SpecificCharacterSet == "ISO_IR 192"


def test_ascii_text_keeps_the_declared_character_set() -> None:
    instance = {
        **SC,
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
    }
    ds = dcmread(BytesIO(part10(instance, {})))
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.PatientName == "DOE^JANE"
