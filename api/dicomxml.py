"""DICOM JSON (PS3.18 Annex F) rewritten as the Native DICOM Model XML of PS3.19 A.1, for Search
and Metadata answers in `multipart/related; type="application/dicom+xml"` (PS3.18 8.7.3.2), and
read back from it for STOW-RS metadata in that form (PS3.18 10.5.1.2).

No maintained Python library reads or writes the Native DICOM Model (pydicom reads and writes
DICOM JSON only; dcmtk's dcm2xml works on Part 10 files, not on the index's JSON), so this is the
mapping of PS3.18 F.3 done with the standard library's ElementTree; documents are parsed with
defusedxml, which refuses DTDs and entities (no entity expansion bombs, no external entities)."""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement, tostring

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring
from pydicom.datadict import keyword_for_tag, tag_for_keyword

DICOM_XML = "application/dicom+xml"
NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
# PS3.19 A.1.1: the components of a PN name group, in value order.
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def native_xml(dataset: dict) -> bytes:
    """One DICOM JSON object as a NativeDicomModel document (UTF-8)."""
    root = Element("NativeDicomModel", xmlns=NAMESPACE)
    _attributes(root, dataset)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + tostring(root, encoding="unicode")
    ).encode()


def _attributes(parent: Element, dataset: dict) -> None:
    for tag, element in sorted(dataset.items()):
        vr = element.get("vr", "UN")
        attrs = {"tag": tag, "vr": vr}
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            attrs["keyword"] = keyword
        node = SubElement(parent, "DicomAttribute", attrs)
        if "BulkDataURI" in element:
            SubElement(node, "BulkData", uri=element["BulkDataURI"])
        elif "InlineBinary" in element:
            SubElement(node, "InlineBinary").text = element["InlineBinary"]
        for number, value in enumerate(element.get("Value", []), 1):
            if vr == "SQ":
                _attributes(SubElement(node, "Item", number=str(number)), value or {})
            elif vr == "PN":
                _person_name(SubElement(node, "PersonName", number=str(number)), value or {})
            else:
                text = SubElement(node, "Value", number=str(number))
                if value is not None:
                    text.text = str(value)


def _person_name(node: Element, value: dict) -> None:
    """PS3.19 A.1.1: each name group split into its `^`-separated components."""
    for group in _PN_GROUPS:
        if value.get(group) is None:
            continue
        group_node = SubElement(node, group)
        for component, text in zip(_PN_COMPONENTS, value[group].split("^"), strict=False):
            if text:
                SubElement(group_node, component).text = text


# Values DICOM JSON holds as numbers (PS3.18 F.2.3.1); the XML holds them as text.
_INTEGER_VRS = {"IS", "SL", "SS", "SV", "UL", "US", "UV"}
_FLOAT_VRS = {"DS", "FL", "FD"}


class InvalidXml(ValueError):
    """The document is not a Native DICOM Model data set that can be read (the reason says why)."""


def read_native_xml(document: bytes) -> dict:
    """One NativeDicomModel document (PS3.19 A.1) as a DICOM JSON object (PS3.18 F.3, read
    the other way); InvalidXml if it is not well-formed, declares a DTD or entities, or is not
    a Native DICOM Model."""
    try:
        root = fromstring(document, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ParseError, DefusedXmlException) as e:
        reason = f"metadata part is not well-formed XML without a DTD: {type(e).__name__}"
        raise InvalidXml(reason) from None
    if _local(root.tag) != "NativeDicomModel":
        raise InvalidXml("metadata part is not a NativeDicomModel document (PS3.19 A.1)")
    return _dataset(root)


def _local(name: str) -> str:
    """An element name without its namespace."""
    return name.rsplit("}", 1)[-1]


def _dataset(parent: Element) -> dict:
    out: dict = {}
    for node in parent:
        if _local(node.tag) != "DicomAttribute":
            continue
        tag = node.get("tag") or _keyword_tag(node.get("keyword"))
        if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
            raise InvalidXml(f"DicomAttribute tag {tag!r} is not 8 hexadecimal digits")
        vr = node.get("vr") or "UN"
        out[tag.upper()] = _element(node, vr)
    return out


def _keyword_tag(keyword: str | None) -> str:
    tag = tag_for_keyword(keyword) if keyword else None
    if tag is None:
        raise InvalidXml(f"DicomAttribute without a tag and with an unknown keyword {keyword!r}")
    return f"{tag:08X}"


def _element(node: Element, vr: str) -> dict:
    element: dict = {"vr": vr}
    values: dict[int, object] = {}
    for child in node:
        name = _local(child.tag)
        if name == "BulkData":
            element["BulkDataURI"] = child.get("uri") or child.get("uuid") or ""
        elif name == "InlineBinary":
            element["InlineBinary"] = (child.text or "").strip()
        elif name in ("Value", "Item", "PersonName"):
            values[_number(child)] = _value(child, name, vr)
    if values:
        element["Value"] = [values[n] for n in sorted(values)]
    return element


def _number(node: Element) -> int:
    try:
        return int(node.get("number", ""))
    except ValueError:
        raise InvalidXml(f"{_local(node.tag)} without a valid number attribute") from None


def _value(node: Element, name: str, vr: str) -> object:
    if name == "Item":
        return _dataset(node)
    if name == "PersonName":
        return {
            _local(group.tag): "^".join(_components(group)).rstrip("^")
            for group in node
            if _local(group.tag) in _PN_GROUPS
        }
    text = node.text
    if text is None:
        return None
    number = text.strip()
    try:
        if vr in _INTEGER_VRS or (vr in _FLOAT_VRS and number.lstrip("+-").isdigit()):
            return int(number)
        if vr in _FLOAT_VRS:
            return float(number)
    except ValueError:
        raise InvalidXml(f"a {vr} value is not a number") from None
    return text


def _components(group: Element) -> list[str]:
    """The `^`-joined components of a PN name group (PS3.19 A.1.1), in their fixed order."""
    parts = {_local(c.tag): c.text or "" for c in group}
    return [parts.get(component, "") for component in _PN_COMPONENTS]
