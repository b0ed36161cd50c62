"""DICOM JSON (PS3.18 Annex F) rewritten as the Native DICOM Model XML of PS3.19 A.1, for Search
and Metadata answers in `multipart/related; type="application/dicom+xml"` (PS3.18 8.7.3.2).

No maintained Python library writes the Native DICOM Model (pydicom reads and writes DICOM JSON
only; dcmtk's dcm2xml works on Part 10 files, not on the index's JSON), so this is the mapping
of PS3.18 F.3 done with the standard library's ElementTree."""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement, tostring

from pydicom.datadict import keyword_for_tag

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
