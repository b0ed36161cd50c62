"""The curator page's header table: every element in order, through sequences, with the ones
a finding names marked (by keyword path, or a private element by the private rule's label)."""

from __future__ import annotations

from pydicom import Dataset

from carina.curation import header
from tests.factory import Phi, ct_instance


def metadata() -> dict:
    ds = ct_instance(Phi(), 1, rows=4, columns=4)
    item = Dataset()
    item.TextValue = "seen by a name"
    ds.ContentSequence = [item]
    return ds.to_json_dict(bulk_data_threshold=16, bulk_data_element_handler=lambda e: "x")


def test_header_rows_mark_keyword_paths_and_private_labels() -> None:
    flagged = ["ContentSequence.TextValue", '(0029,xx10) of "ACME PRIVATE"', None]
    rows = {r.path: r for r in header.rows(metadata(), flagged)}
    assert rows["ContentSequence.TextValue"].flagged
    assert rows["ContentSequence.TextValue"].depth == 1
    assert rows["ContentSequence.TextValue"].value == "seen by a name"
    assert rows["(0029,1010)"].flagged and rows["(0029,1010)"].vr == "LO"
    assert not rows["(0029,0010)"].flagged  # the private creator itself is not named
    assert not rows["PatientName"].flagged
    assert rows["PixelData"].value == "(binary data)"
    assert [r.path for r in header.rows(metadata(), [])] == list(rows)
