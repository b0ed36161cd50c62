"""Attribute edits by curators: give one top-level attribute (named by keyword or tag) a value,
or remove it, in every instance of a held series or in one of them.

An edit is refused (ChangeRefused) when it could make the object invalid or identify the
patient again:
- private, unknown or repeating-group tags, the file meta (group 0002), and sequence, binary
  or ambiguous VRs: nothing here can validate them;
- UIDs (VR UI: SOP Class and Instance, Study, Series, Frame of Reference...), the attributes
  that describe the pixel data (PS3.3 C.7.6.3 Image Pixel module, frames, compression) and
  those de-identification writes about itself (PS3.15 E.1.1: PatientIdentityRemoved,
  DeidentificationMethod and its code sequence), and the character set;
- removing or emptying a Type 1 attribute of the instance's IOD, or removing a Type 2 one
  (PS3.3's module tables in curation/iod_required.json, and curation/iod_type1.json);
- a value that does not fit the attribute's VR (pydicom's validate_value) or its VM;
- a value for an attribute the collection's de-identification profile removes, empties,
  replaces or shifts (only those it keeps, or cleans and are not dates, may get one): an edit
  must not put back what de-identification takes out;
- a value the residual-PHI check would flag (dates and names in free text, with the
  collection's settings).

Each edit is recorded per instance in attribute_edits (migration 016) with the element set,
never the value it replaced (which may be the PHI the edit removes), and audited. A removal or
new value also clears what the intake's residual-PHI check had found in that attribute."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydicom import DataElement, Dataset
from pydicom.config import RAISE
from pydicom.datadict import DicomDictionary, dictionary_VM, keyword_for_tag, tag_for_keyword
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

from carina.archive.storage import ObjectStore

from . import rewrite
from .deid import CLEAN, KEEP, Profile, load_profile
from .errors import ChangeRefused
from .lifecycle import series_head
from .quarantine import collection_of
from .rule_settings import RuleSettingError, config_from
from .rules import ResidualPhiSettings, RulesConfig, text_phi, type1_table

SET, REMOVE = "set", "remove"
# Values a curator can type and pydicom can validate; the rest (SQ, binary, AT, UI) are refused.
TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"})
# PS3.3 C.7.6.3 Image Pixel module and what else describes how the pixel data is encoded.
PIXEL_DESCRIPTION = frozenset(
    {
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PlanarConfiguration",
        "PixelAspectRatio",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "PixelPaddingValue",
        "PixelPaddingRangeLimit",
        "RedPaletteColorLookupTableDescriptor",
        "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor",
        "NumberOfFrames",
        "FrameIncrementPointer",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        "ColorSpace",
    }
)
# Written by de-identification about itself (PS3.15 E.1.1), or deciding how text is decoded.
DEIDENTIFICATION_RECORD = frozenset(
    {
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "SpecificCharacterSet",
    }
)
_TAG = re.compile(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?")


@dataclass(frozen=True)
class Edit:
    """Set (values: [] for an empty value) or remove one top-level attribute."""

    tag: BaseTag
    keyword: str
    vr: str
    action: str
    values: tuple[Any, ...] = ()


def parse(attribute: str, action: str, value: Any = None) -> Edit:
    """The edit of an attribute named by keyword, (gggg,eeee) or ggggeeee; ChangeRefused when
    it names nothing editable or the value does not fit the attribute's VR and VM."""
    tag = _tag(attribute.strip())
    keyword = keyword_for_tag(tag)
    if tag.group == 0x0002 or tag.is_private or tag not in DicomDictionary or not keyword:
        raise ChangeRefused(
            f"{attribute} is private, file meta or not in the DICOM dictionary: it cannot be "
            "validated, so it cannot be edited"
        )
    vr = DicomDictionary[tag][0]
    if vr == "UI" or _describes_pixels(tag, keyword) or keyword in DEIDENTIFICATION_RECORD:
        raise ChangeRefused(
            f"{keyword} is a UID, describes the pixel data or records the de-identification: "
            "editing it would make the object invalid"
        )
    if action == REMOVE:
        return Edit(tag, keyword, vr, REMOVE)
    if action != SET:
        raise ChangeRefused(f"no action {action!r}; set or remove")
    if vr not in TEXT_VRS | NUMBER_VRS:
        raise ChangeRefused(f"{keyword} has VR {vr}: only text and numbers can be edited here")
    values = _values(keyword, vr, value)
    vm = dictionary_VM(tag)
    if values and not _vm_allows(vm, len(values)):
        raise ChangeRefused(f"{keyword} takes {vm} value(s) (VM), not {len(values)}")
    return Edit(tag, keyword, vr, SET, values)


def _describes_pixels(tag: BaseTag, keyword: str) -> bool:
    """The pixel data itself (group 7FE0), its description, palettes and ICC profile."""
    return (
        tag.group == 0x7FE0
        or keyword in PIXEL_DESCRIPTION
        or "PaletteColorLookupTable" in keyword
        or keyword == "ICCProfile"
    )


def _tag(attribute: str) -> BaseTag:
    m = _TAG.fullmatch(attribute)
    if m:
        return Tag(int(m.group(1) + m.group(2), 16))
    found = tag_for_keyword(attribute)
    if found is None:
        raise ChangeRefused(f"{attribute!r} is neither a DICOM keyword nor a tag")
    return Tag(found)


def _values(keyword: str, vr: str, value: Any) -> tuple[Any, ...]:
    """The value as a tuple of values of VR vr, each validated (PS3.5 6.2)."""
    given = [] if value in (None, "") else value if isinstance(value, list) else [value]
    out: list[Any] = []
    for v in given:
        if vr in NUMBER_VRS:
            if isinstance(v, str):  # typed in a form
                v = _number(keyword, vr, v)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ChangeRefused(f"{keyword} (VR {vr}) takes numbers, not {type(v).__name__}")
            v = int(v) if vr not in ("FL", "FD") and float(v).is_integer() else v
        else:
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise ChangeRefused(f"{keyword} (VR {vr}) takes text")
            v = str(v)
        try:
            validate_value(vr, v, RAISE)
        except ValueError as e:
            raise ChangeRefused(f"{keyword}: {e}") from None
        out.append(v)
    return tuple(out)


def _number(keyword: str, vr: str, text: str) -> int | float:
    try:
        return float(text) if vr in ("FL", "FD") else int(text)
    except ValueError:
        raise ChangeRefused(f"{keyword} (VR {vr}) takes numbers, not {text!r}") from None


def _vm_allows(vm: str, count: int) -> bool:
    """Whether a value multiplicity (PS3.5 6.4: "1", "1-3", "1-n", "2-2n") allows count."""
    low, _, high = vm.partition("-")
    if not high:
        return count == int(low)
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return count >= int(low) and count % step == 0
    return int(low) <= count <= int(high)


def check(edit: Edit, ds: Dataset, profile: Profile, phi: ResidualPhiSettings) -> None:
    """ChangeRefused when edit would leave ds invalid for its IOD or identify the patient."""
    name, types = required(str(ds.get("SOPClassUID", "")))
    required_type = types.get(edit.keyword)
    if required_type == "1" and not edit.values:
        raise ChangeRefused(
            f"{edit.keyword} is Type 1 in {name}: it may not be removed or emptied (PS3.5 7.4.1)"
        )
    if required_type == "2" and edit.action == REMOVE:
        raise ChangeRefused(
            f"{edit.keyword} is Type 2 in {name}: it may be emptied (set with no value) but not "
            "removed (PS3.5 7.4.3)"
        )
    if not edit.values:
        return
    rule = profile.rule_for(int(edit.tag))
    # A cleaned date is a shifted one (Retain Longitudinal Modified Dates): a typed date is not.
    cleaned = rule is not None and rule.op == CLEAN and edit.vr not in ("DA", "DT")
    if rule is not None and rule.op != KEEP and not cleaned:
        raise ChangeRefused(
            f"the collection's de-identification profile ({profile.name}) does not keep "
            f"{edit.keyword} ({rule.op}); an edit may not put a value back"
        )
    hits = text_phi(_element_json(edit), phi)
    if hits:
        kinds = ", ".join(sorted({kind for _, kind, _ in hits}))
        raise ChangeRefused(
            f"the value for {edit.keyword} holds what looks like {kinds}, which the "
            "residual-PHI check flags"
        )


@lru_cache(maxsize=256)
def required(sop_class: str) -> tuple[str, dict[str, str]]:
    """The IOD of a SOP class and its required top-level attributes, keyword -> "1" or "2":
    the Type 1 and Type 2 attributes of its mandatory modules (PS3.3, curation/iod_required.json),
    with curation/iod_type1.json's. Conditional types (1C, 2C) and conditional modules are not
    taken into account."""
    table = _iod_required()
    iod = table["sop_classes"].get(sop_class, "")
    types: dict[str, str] = {}
    for module in table["iods"].get(iod, []):
        for keyword, kind in table["modules"][module].items():
            types[keyword] = min(kind, types.get(keyword, "2"))
    name, type1 = type1_table().get(sop_class, (iod, ()))
    types.update(dict.fromkeys(type1, "1"))
    return name or "its IOD", types


@lru_cache(1)
def _iod_required() -> dict[str, Any]:
    """iod_required.json, made by make_iod_required.py from PS3.3's module tables."""
    text = resources.files("carina.curation").joinpath("iod_required.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


def _element(edit: Edit) -> DataElement:
    value: Any = list(edit.values) if len(edit.values) > 1 else (edit.values or [None])[0]
    return DataElement(edit.tag, edit.vr, value)


def _element_json(edit: Edit) -> dict[str, Any]:
    """The element the edit sets, as DICOM JSON ({"ggggeeee": {"vr":..., "Value": [...]}})."""
    ds = Dataset()
    ds.add(_element(edit))
    return ds.to_json_dict()  # type: ignore[no-any-return]


def apply_edit(ds: Dataset, edit: Edit) -> None:
    """Set or remove the attribute in ds."""
    if edit.action == REMOVE:
        if edit.tag in ds:
            del ds[edit.tag]
    else:
        ds.add(_element(edit))


def edit_series(
    pool: ConnectionPool,
    store: ObjectStore,
    staging_dir: Path,
    series_uid: str,
    actor: str,
    reason: str,
    edit: Edit,
    sops: Sequence[str] | None = None,
) -> int:
    """Apply an edit to the instances sops (None: every one) of a held series after checking it
    against each, record and audit it; the number of instances edited."""
    profile, phi = _collection_settings(pool, series_uid)
    key = f"{int(edit.tag):08X}"
    element = None if edit.action == REMOVE else Jsonb(_element_json(edit)[key])

    def change(ds: Dataset, _: rewrite.Target) -> None:
        check(edit, ds, profile, phi)
        apply_edit(ds, edit)

    def record(conn: Connection, held: rewrite.Held) -> None:
        sops = [t.sop_uid for t in held.targets]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO attribute_edits (series_uid, sop_uid, tag, keyword, action,"
                " element, actor, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (series_uid, s, key, edit.keyword, edit.action, element, actor, reason)
                    for s in sops
                ],
            )
            # The intake's residual-PHI hits in this attribute no longer hold: it was replaced
            # by a checked value, or removed.
            found = cur.execute(
                "SELECT sop_uid, intake_findings::text FROM instances"
                " WHERE sop_uid = ANY(%s) AND jsonb_typeof(intake_findings) = 'array'",
                (sops,),
            ).fetchall()
            cur.executemany(
                "UPDATE instances SET intake_findings = %s::jsonb WHERE sop_uid = %s",
                [(without_hits(hits, {edit.keyword}), sop) for sop, hits in found],
            )
        after = {
            "attribute": edit.keyword,
            "tag": key,
            "action": edit.action,
            "element": None if element is None else element.obj,
            "instances": sops,
        }
        rewrite.audited(conn, held, actor, "edit", reason, after)

    held = rewrite.apply(pool, store, staging_dir, series_uid, sops, change, record)
    return len(held.targets)


def _collection_settings(
    pool: ConnectionPool, series_uid: str
) -> tuple[Profile, ResidualPhiSettings]:
    """The de-identification profile and residual-PHI settings of the series' collection
    (UnknownSeries for an unknown series)."""
    collection_of(pool, series_uid)  # UnknownSeries first
    with pool.connection() as conn:
        _, _, overrides, (name, options, lines) = series_head(conn, series_uid)
    try:
        config = config_from(overrides)
    except RuleSettingError:  # settings stored before a rule changed: the defaults
        config = RulesConfig()
    return load_profile(name, options, lines), config.residual_phi


def without_hits(findings: str | None, keywords: set[str]) -> str | None:
    """An instance's intake residual-PHI hits (JSON list of rules.PhiHit) less those in the
    edited attributes or below them: what an edit's record leaves in the index, and what a
    reprocess keeps of new hits when it applies the edits again."""
    if findings is None or not keywords:
        return findings
    hits = json.loads(findings)
    kept = [h for h in hits if not any(h[2] == k or h[2].startswith(k + ".") for k in keywords)]
    return json.dumps(kept)


def recorded(conn: Connection, series_uid: str) -> list[tuple[str, Edit]]:
    """The edits recorded for a series' instances, oldest first, as (SOP Instance UID, edit):
    what a reprocess that de-identifies the instances anew applies again (rewrite.reapply with
    apply_edit)."""
    rows = conn.execute(
        "SELECT sop_uid, tag, keyword, action, element FROM attribute_edits"
        " WHERE series_uid = %s ORDER BY pk",
        (series_uid,),
    ).fetchall()
    out = []
    for sop, tag, keyword, action, element in rows:
        values = tuple((element or {}).get("Value", ()))
        if element and element.get("vr") == "PN":  # DICOM JSON PN: {"Alphabetic": ...}
            values = tuple(v.get("Alphabetic", "") for v in values)
        vr = element["vr"] if element else DicomDictionary[int(tag, 16)][0]
        out.append((sop, Edit(Tag(int(tag, 16)), keyword, vr, action, values)))
    return out
