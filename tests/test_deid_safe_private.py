"""Every row of PS3.15 Table E.3.10-1 (deid_profiles/safe_private.csv), checked against the engine.

Generated from the CSV: each safe attribute is planted under its Private Creator (in a block
number that varies from row to row, since the match is by creator and element offset, not by
block), next to an attribute of the same creator that is not on the list and one of an unknown
creator at the same offset; at the top level and inside a kept sequence item. With the Retain
Safe Private Option only the safe one survives (its UID remapped, its sequence items cleaned);
without it none does."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import DataElement, Dataset, Sequence

from carina.curation.deid import load_profile
from carina.curation.pseudonyms import Pseudonymizer
from tests.test_deid_table import (
    CARRIER,
    KEY,
    PLANT,
    PLANTED_NAME,
    _assert_item_cleaned,
    _deidentify,
    _minimal,
)

TABLE = Path(__file__).resolve().parent.parent / "deid_profiles" / "safe_private.csv"
UNKNOWN_CREATOR = "NOT ON ANY SAFE LIST 1.0"
BLOCKS = (0x10, 0x11, 0x4F, 0xFF)


@dataclass(frozen=True)
class SafeRow:
    """One row of Table E.3.10-1."""

    creator: str
    group: int
    element: int
    vrs: tuple[str, ...]

    @property
    def vr(self) -> str:
        """The VR to plant: the table's first, or UN where it gives none."""
        return self.vrs[0] if self.vrs else "UN"


def _read() -> list[SafeRow]:
    with TABLE.open(newline="", encoding="utf-8") as f:
        return [
            SafeRow(
                r["private_creator"],
                int(r["group"], 16),
                int(r["element"], 16),
                tuple(v for v in r["vr"].split("/") if v),
            )
            for r in csv.DictReader(f)
        ]


ROWS = _read()
SAFE = {(r.creator, r.group, r.element) for r in ROWS}


def _value(vr: str) -> object:
    if vr == "SQ":
        item = Dataset()
        item.PatientName = PLANTED_NAME
        return Sequence([item])
    if vr in ("OB", "OW", "UN"):
        return b"PLANTED!"
    return PLANT[vr]


def _unsafe_offset(row: SafeRow) -> int:
    """An element offset of the same creator that the table does not list."""
    return next(e for e in range(0x100) if (row.creator, row.group, e) not in SAFE)


def _plant(ds: Dataset, row: SafeRow, block: int) -> None:
    """The safe attribute and an unlisted one in row's creator block; the same offset under an
    unknown creator in the next block."""
    base = row.group << 16
    ds[base | block] = DataElement(base | block, "LO", row.creator)
    ds[base | block << 8 | row.element] = DataElement(
        base | block << 8 | row.element, row.vr, _value(row.vr)
    )
    unsafe = base | block << 8 | _unsafe_offset(row)
    ds[unsafe] = DataElement(unsafe, "LO", PLANTED_NAME)
    other = 0x10 if block == 0xFF else block + 1
    ds[base | other] = DataElement(base | other, "LO", UNKNOWN_CREATOR)
    ds[base | other << 8 | row.element] = DataElement(
        base | other << 8 | row.element, row.vr, _value(row.vr)
    )


def _planted(row: SafeRow, block: int, nested: bool) -> tuple[Dataset, Dataset]:
    ds = _minimal()
    where = ds
    if nested:
        where = Dataset()
        where.CodeValue = "39607008"
        ds[CARRIER] = DataElement(CARRIER, "SQ", Sequence([where]))
    _plant(where, row, block)
    return ds, where


def _after(ds: Dataset, nested: bool) -> Dataset:
    return ds[CARRIER].value[0] if nested else ds


CASES = [
    pytest.param(row, BLOCKS[i % len(BLOCKS)], nested, id=f"{row.group:04X}-{i}-{where}")
    for i, row in enumerate(ROWS)
    for nested, where in ((False, "top"), (True, "nested"))
]


def test_table_has_every_row() -> None:
    assert len(ROWS) == 479  # PS3.15 2026d Table E.3.10-1
    assert len(SAFE) == len(ROWS)


@pytest.mark.parametrize(("row", "block", "nested"), CASES)
def test_safe_private_attribute_is_kept_with_the_option(
    row: SafeRow, block: int, nested: bool
) -> None:
    ds, _ = _planted(row, block, nested)
    before = _value(row.vr)
    _deidentify(ds, load_profile("basic", ("retain_safe_private",)))
    where = _after(ds, nested)
    tag = row.group << 16 | block << 8 | row.element
    assert str(where[row.group << 16 | block].value) == row.creator, "its creator was removed"
    assert tag in where, "safe attribute removed"
    value = where[tag].value
    if row.vr == "SQ":
        _assert_item_cleaned(value)
    elif row.vr == "UI":
        assert value == Pseudonymizer(KEY).uid(str(before)), "a safe UID must still be remapped"
    else:
        assert value == before
    private = [e.tag for e in where if e.tag.is_private]
    assert private == [row.group << 16 | block, tag], "an unlisted attribute survived"


@pytest.mark.parametrize(("row", "block", "nested"), CASES)
def test_safe_private_attribute_is_removed_without_the_option(
    row: SafeRow, block: int, nested: bool
) -> None:
    ds, _ = _planted(row, block, nested)
    _deidentify(ds, load_profile("basic", ("retain_long_modified_dates",)))
    assert [e.tag for e in _after(ds, nested) if e.tag.is_private] == []


def test_safe_offset_with_another_vr_is_removed() -> None:
    # (0019,xx23) GEMS_ACQU_01 is DS in the table; free text there is not that attribute.
    ds = _minimal()
    ds[0x00190010] = DataElement(0x00190010, "LO", "GEMS_ACQU_01")
    ds[0x00191023] = DataElement(0x00191023, "LT", "Seen by Dr SMITHERSON")
    _deidentify(ds, load_profile("basic", ("retain_safe_private",)))
    assert [e.tag for e in ds if e.tag.is_private] == []


def test_safe_attribute_read_as_un_is_kept() -> None:
    # An implicit VR file gives an undictionaried private attribute the VR UN.
    ds = _minimal()
    ds[0x70530010] = DataElement(0x70530010, "LO", "Philips PET Private Group")
    ds[0x70531000] = DataElement(0x70531000, "UN", b"0.000123")
    _deidentify(ds, load_profile("basic", ("retain_safe_private",)))
    assert ds[0x70531000].value == b"0.000123"
