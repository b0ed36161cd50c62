"""A de-identified instance's header as rows a curator reads, with the attributes a finding
flagged marked.

Findings name attributes by keyword path ("ContentSequence.TextValue") or, for private ones,
by a label ('(0009,xx01) of "ACME"'); the rows carry the same names, so marking is a match of
names, never of values."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_for_tag

MAX_VALUE = 200  # characters of a value shown in the table; the rest is elided


@dataclass(frozen=True)
class HeaderRow:
    """One element: its path (keywords through sequences), tag, VR, value as text, and
    whether a finding flagged it."""

    depth: int
    path: str
    tag: str
    vr: str
    value: str
    flagged: bool


def rows(metadata: Mapping[str, Any], flagged: Iterable[str]) -> list[HeaderRow]:
    """The elements of DICOM JSON metadata in order, descending into sequences."""
    marks = {f for f in flagged if f}
    return list(_walk(metadata, "", 0, marks))


def _walk(meta: Mapping[str, Any], prefix: str, depth: int, marks: set[str]) -> Iterator[HeaderRow]:
    for key in sorted(meta):
        element = meta[key]
        if not isinstance(element, Mapping):
            continue
        group, elem = key[:4].upper(), key[4:].upper()
        keyword = keyword_for_tag(int(key, 16)) or f"({group},{elem})"
        path = f"{prefix}.{keyword}" if prefix else keyword
        vr = str(element.get("vr", ""))
        values = element.get("Value")
        if vr == "SQ":
            yield HeaderRow(depth, path, f"({group},{elem})", vr, "", _marked(path, key, marks))
            for item in values if isinstance(values, list) else []:
                if isinstance(item, Mapping):
                    yield from _walk(item, path, depth + 1, marks)
            continue
        yield HeaderRow(
            depth, path, f"({group},{elem})", vr, _text(element), _marked(path, key, marks)
        )


def _marked(path: str, key: str, marks: set[str]) -> bool:
    """Whether a finding names this element: by keyword path, or a private data element by
    its label '(gggg,xxee)' (the creator's block left out, as the private rule writes it)."""
    if path in marks:
        return True
    group, element = int(key[:4], 16), int(key[4:], 16)
    # PS3.5 7.8.1: only (gggg,xxee) with xx >= 0x10 are private data elements; below are
    # the private creators, which name blocks and are not flagged themselves.
    if group % 2 == 0 or element < 0x1000:
        return False
    label = f"({key[:4]},XX{key[6:]})".upper()
    return any(label in m.upper() for m in marks)


def _text(element: Mapping[str, Any]) -> str:
    if "InlineBinary" in element or "BulkDataURI" in element:
        return "(binary data)"
    values = element.get("Value")
    if not isinstance(values, list):
        return ""
    parts = []
    for v in values:
        if isinstance(v, Mapping):  # PN (PS3.18 F.2.2): every component group
            parts.append("=".join(str(x) for x in v.values() if x))
        else:
            parts.append(str(v))
    text = "\\".join(parts)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE] + "…"
