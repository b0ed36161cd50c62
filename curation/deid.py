"""De-identification engine: deid recipes compiled once into a per-tag action table, applied in
one pass over each dataset (PS3.15 Annex E). Pixel data bytes are never touched."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydicom import DataElement, Dataset, Sequence, config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

from .errors import ProfileError
from .pseudonyms import Pseudonymizer

log = logging.getLogger(__name__)

# The PS3.15 E.1-1 option columns, in the order they are layered over the Basic Profile.
OPTIONS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)

# PS3.16 CID 7050 De-identification Method: the profile and each option (scheme DCM).
CID_7050 = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_long_full_dates": (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_long_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

_TAG = re.compile(r"^\(([0-9A-Fa-fXx]{4}),([0-9A-Fa-fXx]{4})\)$")
_TEXT_VRS = {
    "AE",
    "AS",
    "CS",
    "DA",
    "DS",
    "DT",
    "IS",
    "LO",
    "LT",
    "PN",
    "SH",
    "ST",
    "TM",
    "UC",
    "UR",
    "UT",
}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
# PS3.15 E.1-1 D is "a non-zero length value ... consistent with the VR": 8 zero bytes are a whole
# number of OB/OW/OF/OL/OD/OV words.
_DUMMY_BINARY = bytes(8)
# PS3.5 Table 6.2-1 TM: HH, HHMM, HHMMSS or HHMMSS.FFFFFF (60 allows a leap second).
_TM = re.compile(r"^([01]\d|2[0-3])([0-5]\d(([0-5]\d|60)(\.\d{1,6})?)?)?$")
_NUMBER_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"}
_DUMMY_TEXT = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "PN": "ANONYMIZED",
}

# Operations a compiled rule can carry.
KEEP, REMOVE, BLANK, DUMMY, CLEAN, UID, VALUE, PSEUDO_ID, PSEUDO_NAME, SHIFT = (
    "keep",
    "remove",
    "blank",
    "dummy",
    "clean",
    "uid",
    "value",
    "pseudonym_id",
    "pseudonym_name",
    "shift",
)
# PS3.15 E.1.1 compound codes: "X unless Z (or D) is needed for the IOD to stay conformant".
# Without per-IOD attribute types at hand, take the choice that is conformant for every type
# and still keeps nothing of the original: X/Z -> Z (an X/Z attribute is never Type 1),
# X/D, Z/D, X/Z/D -> D (a dummy; on a sequence, its items kept and cleaned), X/Z/U* -> U (so
# references still resolve). Removing instead broke Type 1/2 attributes (dciodvfy: a SEG's
# DeviceSerialNumber, an SR's ReferencedPerformedProcedureStepSequence).
_FUNCS = {
    "dummy": DUMMY,
    "clean": CLEAN,
    "uid": UID,
    "z_d": DUMMY,
    "x_z": BLANK,
    "x_d": DUMMY,
    "x_z_d": DUMMY,
    "x_z_u": UID,
    "pseudonym_id": PSEUDO_ID,
    "pseudonym_name": PSEUDO_NAME,
    "shift": SHIFT,
}


# A collection's own recipe line: ACTION FIELD [VALUE], FIELD a keyword, (GGGG,EEEE) with x for
# any digit, or a private attribute as (gggg,"Private Creator",ee) (the DCMTK dictionary form).
_LINE = re.compile(r"^(?P<action>[A-Za-z]+)\s+(?P<field>\([^)]*\)|\S+)(?:\s+(?P<value>.+))?$")
_PRIVATE_FIELD = re.compile(
    r'^\(([0-9A-Fa-f]{3}[13579BDFbdf]),"([^"\\]{1,64})",([0-9A-Fa-f]{2})\)$'
)
_LINE_ACTIONS = ("KEEP", "REMOVE", "BLANK", "REPLACE", "ADD")
# Carina's pseudonyms (or a mapping file) decide these two; a collection's line may not.
_PSEUDONYMISED = frozenset({0x00100010, 0x00100020})
# Direct identifiers that no PS3.15 option retains: a collection's line may not keep them either.
_NEVER_KEPT = frozenset(
    tag_for_keyword(k)
    for k in (
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "IssuerOfPatientID",
        "MedicalRecordLocator",
        "AccessionNumber",
    )
)


@dataclass(frozen=True)
class Rule:
    """One compiled action: an operation and, for VALUE, the literal to write."""

    op: str
    value: str | None = None


@dataclass(frozen=True)
class Profile:
    """A compiled de-identification profile: exact tags, masked tags, attributes to add."""

    name: str
    options: tuple[str, ...]
    exact: dict[int, Rule]
    masks: tuple[tuple[int, int, Rule], ...]
    additions: tuple[tuple[int, str], ...]
    keep_private: bool = False
    shift_dates: bool = field(default=False)
    # (private creator, group, element offset) -> the VRs the safe attribute may have (empty:
    # any), from PS3.15 Table E.3.10-1 and the collection's own list; used when keep_private.
    safe_private: dict[tuple[str, int, int], frozenset[str]] = field(default_factory=dict)
    own_lines: int = 0  # the collection's own recipe lines compiled in

    def rule_for(self, tag: int) -> Rule | None:
        """The rule for a tag: exact match first, then the first matching mask."""
        rule = self.exact.get(tag)
        if rule is not None:
            return rule
        for mask, value, r in self.masks:
            if tag & mask == value:
                return r
        return None


def _parse_field(text: str) -> tuple[int, int]:
    """A recipe field as (mask, value): `(GGGG,EEEE)` with x digits, or a keyword."""
    m = _TAG.match(text.strip())
    if m:
        digits = m.group(1) + m.group(2)
        mask = int("".join("0" if c in "xX" else "F" for c in digits), 16)
        value = int("".join("0" if c in "xX" else c for c in digits), 16)
        return mask, value
    tag = tag_for_keyword(text.strip())
    if tag is None:
        raise ProfileError(f"recipe field {text!r} is neither a tag nor a DICOM keyword")
    return 0xFFFFFFFF, tag


def _rule(action: str, value: str | None) -> Rule:
    action = action.upper()
    if action == "KEEP":
        return Rule(KEEP)
    if action == "REMOVE":
        return Rule(REMOVE)
    if action == "BLANK":
        return Rule(BLANK)
    if action == "JITTER":
        return Rule(SHIFT)
    if action in ("REPLACE", "ADD"):
        if value and value.startswith("func:"):
            op = _FUNCS.get(value[5:])
            if op is None:
                raise ProfileError(f"unknown recipe function {value!r}")
            return Rule(op)
        return Rule(VALUE, value or "")
    raise ProfileError(f"unsupported recipe action {action!r}")


def recipe_paths(profile: str, options: Iterable[str]) -> list[Path]:
    """The recipe files composing a profile: basic, then options in table order, then Carina's."""
    root = resources.files("carina.deid_profiles")
    opts = set(options)
    unknown = opts - set(OPTIONS)
    if unknown:
        raise ProfileError(f"unknown de-identification options: {', '.join(sorted(unknown))}")
    names = [f"recipes/{profile}.dicom"] + [f"recipes/{o}.dicom" for o in OPTIONS if o in opts]
    paths = [Path(str(root / n)) for n in names] + [Path(str(root / "carina.dicom"))]
    for p in paths:
        if not p.is_file():
            raise ProfileError(f"recipe {p.name} is missing from deid_profiles/")
    return paths


def parse_recipe_lines(
    lines: Iterable[str], options: Iterable[str]
) -> list[tuple[str, str, str | None]]:
    """A collection's own recipe lines as (action, field, value), or ProfileError naming the
    first bad line and why. Blank lines and # comments are skipped."""
    numbered = [(n, line.strip()) for n, line in enumerate(lines, 1)]
    numbered = [(n, text) for n, text in numbered if text and not text.startswith("#")]
    if not numbered:
        return []
    opts = set(options)
    basic = load_profile("basic", ())  # which attributes the Basic Profile gives new UIDs
    parsed = []
    for number, text in numbered:
        try:
            parsed.append(_parse_line(text, opts, basic))
        except ProfileError as e:
            raise ProfileError(f"recipe line {number}: {e}") from None
    return parsed


def _parse_line(text: str, options: set[str], basic: Profile) -> tuple[str, str, str | None]:
    m = _LINE.match(text)
    if m is None:
        raise ProfileError("not ACTION FIELD [VALUE]")
    action, field_text, value = m["action"].upper(), m["field"], m["value"]
    if action not in _LINE_ACTIONS:
        raise ProfileError(f"unknown action {m['action']!r} (one of {', '.join(_LINE_ACTIONS)})")
    if _PRIVATE_FIELD.match(field_text):
        if action != "KEEP" or value:
            raise ProfileError("a private attribute can only be kept (KEEP, no value)")
        if "retain_safe_private" not in options:
            raise ProfileError("keeping a private attribute needs the retain_safe_private option")
        return action, field_text, None
    mask, tag = _parse_field(field_text)
    exact = mask == 0xFFFFFFFF
    if exact and tag >> 16 & 1:
        raise ProfileError('name a private attribute as (gggg,"Private Creator",ee)')
    if exact and tag in _PSEUDONYMISED:
        raise ProfileError("PatientID and PatientName are Carina's pseudonyms (see mapping files)")
    if action in ("KEEP", "REMOVE", "BLANK"):
        if value:
            raise ProfileError(f"{action} takes no value")
        if action == "KEEP" and exact and tag in _NEVER_KEPT:
            raise ProfileError(f"{field_text} identifies the patient; no PS3.15 option keeps it")
        if action == "KEEP" and exact and (basic.rule_for(tag) or Rule(KEEP)).op == UID:
            raise ProfileError(f"{field_text} is a UID: use the retain_uids option to keep UIDs")
        return action, field_text, None
    if not value:
        raise ProfileError(f"{action} needs a value")
    if action == "ADD" and not exact:
        raise ProfileError("ADD needs a single tag")
    if value.startswith("func:"):
        _rule(action, value)  # an unknown function is refused here
        return action, field_text, value
    vr = _vr_of(Tag(tag)) if exact else "UN"
    if vr not in _TEXT_VRS:
        raise ProfileError(f"{field_text}: a literal value needs a text VR, not {vr}")
    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError) as e:
        raise ProfileError(f"{value!r} is not a valid {vr} ({e})") from None
    return action, field_text, value


def compile_recipes(
    name: str, options: Iterable[str], paths: Iterable[Path], lines: Iterable[str] = ()
) -> Profile:
    """Compile deid recipe files (later files override earlier ones), then a collection's own
    lines, into a Profile."""
    from deid.config import DeidRecipe
    from deid.logger import bot

    # deid prints every recipe line at DEBUG through its own logger unless told otherwise.
    bot.level = min(bot.level, 1)
    exact: dict[int, Rule] = {}
    masks: dict[tuple[int, int], Rule] = {}
    additions: dict[int, str] = {}
    own_private: dict[tuple[str, int, int], frozenset[str]] = {}
    file_actions = [
        (a["action"], a["field"], a.get("value"))
        for path in paths
        for a in DeidRecipe(str(path), base=False).get_actions() or []
    ]
    own = parse_recipe_lines(lines, options)
    for action, field_text, field_value in [*file_actions, *own]:
        private = _PRIVATE_FIELD.match(field_text)
        if private:
            group, creator, element = private.groups()
            own_private[(creator, int(group, 16), int(element, 16))] = frozenset()
            continue
        mask, tag = _parse_field(field_text)
        if action.upper() == "ADD":
            if mask != 0xFFFFFFFF:
                raise ProfileError(f"ADD needs a single tag, not {field_text}")
            additions[tag] = field_value or ""
            continue
        rule = _rule(action, field_value)
        if mask == 0xFFFFFFFF:
            exact[tag] = rule
        else:
            masks[(mask, tag)] = rule
    opts = tuple(o for o in OPTIONS if o in set(options))
    # More specific masks (more fixed bits) first.
    ordered = sorted(masks.items(), key=lambda kv: -bin(kv[0][0]).count("1"))
    return Profile(
        name=name,
        options=opts,
        exact=exact,
        masks=tuple((m, v, r) for (m, v), r in ordered),
        additions=tuple(additions.items()),
        # PS3.15 E.3.10: Retain Safe Private keeps only the private attributes known to be safe
        # (Table E.3.10-1); without it every private attribute goes (E.1-1: X).
        keep_private="retain_safe_private" in opts,
        shift_dates="retain_long_modified_dates" in opts,
        safe_private={**safe_private_table(), **own_private}
        if "retain_safe_private" in opts
        else {},
        own_lines=len(own),
    )


@lru_cache(maxsize=1)
def safe_private_table() -> dict[tuple[str, int, int], frozenset[str]]:
    """PS3.15 Table E.3.10-1 (deid_profiles/safe_private.csv) keyed as Profile.safe_private."""
    path = resources.files("carina.deid_profiles") / "safe_private.csv"
    with path.open(encoding="utf-8", newline="") as f:
        return {
            (r["private_creator"], int(r["group"], 16), int(r["element"], 16)): frozenset(
                v for v in r["vr"].split("/") if v
            )
            for r in csv.DictReader(f)
        }


@lru_cache(maxsize=16)
def load_profile(name: str, options: tuple[str, ...], lines: tuple[str, ...] = ()) -> Profile:
    """The compiled profile for a name, options and a collection's own recipe lines (compiled
    once per process)."""
    return compile_recipes(name, options, recipe_paths(name, options), lines)


def _shift_da(value: str, days: int) -> str:
    try:
        d = dt.date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError):
        return ""
    return (d - dt.timedelta(days=days)).strftime("%Y%m%d")


def _shift_dt(value: str, days: int) -> str:
    if len(value) < 8:
        return ""  # a year or year-month alone cannot be shifted by days: remove it
    shifted = _shift_da(value[:8], days)
    return shifted + value[8:] if shifted else ""


def subject_key(ds: Dataset) -> str:
    """What an identified dataset's pseudonyms are keyed on: its PatientID; without one, its
    study (each study its own subject rather than pooling strangers)."""
    return str(ds.get("PatientID", "") or "") or "no-patient-id:" + str(
        ds.get("StudyInstanceUID", "")
    )


class Deidentifier:
    """Applies one compiled Profile to datasets, with one patient's pseudonyms."""

    def __init__(self, profile: Profile, pseudonyms: Pseudonymizer) -> None:
        self.profile = profile
        self.pseudo = pseudonyms

    def apply(self, ds: Dataset) -> None:
        """De-identify ds in place (file meta included) and record what was done."""
        ctx = _Context(self.pseudo, subject_key(ds))
        self._walk(ds, ctx)
        self._record(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for kw in (
                "SourceApplicationEntityTitle",
                "SendingApplicationEntityTitle",
                "ReceivingApplicationEntityTitle",
                "PrivateInformationCreatorUID",
                "PrivateInformation",
            ):
                if kw in meta:
                    del meta[kw]

    def _walk(self, ds: Dataset, ctx: _Context) -> None:
        profile = self.profile
        creators: list[BaseTag] = []
        kept_blocks: set[int] = set()
        for tag in list(ds.keys()):
            tag = BaseTag(tag)
            if tag.is_private:
                if not profile.keep_private:
                    del ds[tag]
                elif tag.is_private_creator:
                    creators.append(tag)  # kept below if its block keeps an attribute
                elif self._keep_safe_private(ds, tag, ctx):
                    kept_blocks.add(tag & 0xFFFFFF00)
                else:
                    del ds[tag]
                continue
            # Group 0002 here is not the file meta (pydicom keeps that in ds.file_meta), so the
            # table applies to it too: (0002,0003) is U, also inside a sequence item.
            rule = profile.rule_for(tag)
            raw = ds.get_item(tag)
            vr = getattr(raw, "VR", None) or _vr_of(tag)
            if rule is None or rule.op == KEEP:
                if vr == "SQ":
                    # PS3.15 E.1: K keeps a sequence but its items are still cleaned.
                    for item in ds[tag].value or []:
                        self._walk(item, ctx)
                continue
            self._apply_rule(ds, tag, vr, rule, ctx)
        for tag in creators:
            # PS3.5 7.8.1: creator (gggg,00bb) reserves the block (gggg,bb00-bbFF).
            if (tag.group << 16) | (tag.element << 8) not in kept_blocks:
                del ds[tag]

    def _keep_safe_private(self, ds: Dataset, tag: BaseTag, ctx: _Context) -> bool:
        """PS3.15 E.3.10: keep a private attribute only if its creator and element offset are
        on the safe list with a matching VR; a safe UI value is remapped like any UID and a safe
        sequence's items are cleaned like any other."""
        block = tag.element >> 8
        if block < 0x10:
            return False  # (gggg,0000-0FFF) holds no creator-reserved attribute
        creator_elem = ds.get((tag.group << 16) | block)
        creator = _creator_text(creator_elem.value) if creator_elem is not None else ""
        vrs = self.profile.safe_private.get((creator, tag.group, tag.element & 0xFF))
        if vrs is None:
            return False
        elem = ds[tag]
        if vrs and elem.VR != "UN" and elem.VR not in vrs:
            return False  # not the attribute the table describes: its value could be anything
        if elem.VR == "SQ":
            for item in elem.value or []:
                self._walk(item, ctx)
        elif elem.VR == "UI" and "retain_uids" not in self.profile.options:
            ds[tag] = DataElement(tag, "UI", _map_values(elem.value, ctx.pseudo.uid))
        return True

    def _apply_rule(self, ds: Dataset, tag: BaseTag, vr: str, rule: Rule, ctx: _Context) -> None:
        op = rule.op
        if op == REMOVE:
            del ds[tag]
            return
        if vr == "SQ":
            # C, D and U on a sequence (X/Z/U* on reference sequences) keep it and clean its
            # items, so the references inside are remapped rather than lost.
            if op in (CLEAN, DUMMY, UID):
                for item in ds[tag].value or []:
                    self._walk(item, ctx)
            else:
                ds[tag] = DataElement(tag, "SQ", Sequence())
            return
        if op == BLANK:
            ds[tag] = DataElement(tag, vr, _empty(vr))
        elif op == UID:
            ds[tag] = DataElement(tag, vr, _map_values(ds[tag].value, ctx.pseudo.uid))
        elif op == DUMMY:
            ds[tag] = DataElement(tag, vr, self._dummy(ds, tag, vr, ctx))
        elif op == CLEAN:
            ds[tag] = DataElement(tag, vr, self._clean(ds, tag, vr, ctx))
        elif op == SHIFT:
            ds[tag] = DataElement(tag, vr, self._shifted(ds[tag].value, vr, ctx))
        elif op == PSEUDO_ID:
            ds[tag] = DataElement(tag, vr, ctx.pseudo.patient_id(ctx.original_pid))
        elif op == PSEUDO_NAME:
            ds[tag] = DataElement(tag, vr, ctx.pseudo.patient_name(ctx.original_pid))
        elif op == VALUE:
            ds[tag] = DataElement(tag, vr, rule.value)

    def _dummy(self, ds: Dataset, tag: BaseTag, vr: str, ctx: _Context) -> object:
        if vr == "UI":
            return _map_values(ds[tag].value, ctx.pseudo.uid)
        if vr in ("DA", "DT") and self.profile.shift_dates:
            return self._shifted(ds[tag].value, vr, ctx)
        if vr in _TEXT_VRS:
            return _DUMMY_TEXT.get(vr, "ANONYMIZED")
        if vr in _NUMBER_VRS:
            return 0
        return _DUMMY_BINARY if vr in _BINARY_VRS else _empty(vr)

    def _clean(self, ds: Dataset, tag: BaseTag, vr: str, ctx: _Context) -> object:
        if vr in ("DA", "DT"):
            return self._shifted(ds[tag].value, vr, ctx) if self.profile.shift_dates else ""
        if vr == "TM":
            # Whole-day shifts leave times as they were; a value that is not a time (PS3.5 6.2
            # TM) could hold anything, so it is blanked rather than kept.
            if not self.profile.shift_dates:
                return ""
            value = ds[tag].value
            values = [value] if isinstance(value, str) else list(value or [])
            return value if all(_TM.match(str(v).strip()) for v in values) else ""
        if vr == "UI":
            return _map_values(ds[tag].value, ctx.pseudo.uid)
        # Free text cannot be proven clean here: blank it (conservative until text cleaning).
        return _empty(vr)

    def _shifted(self, value: object, vr: str, ctx: _Context) -> object:
        days = ctx.date_offset
        fn: Callable[[str, int], str]
        if vr == "DA":
            fn = _shift_da
        elif vr == "DT":
            fn = _shift_dt
        else:
            return value
        return _map_values(value, lambda v: fn(v, days))

    def _record(self, ds: Dataset) -> None:
        """PS3.15 E.1.1: say that and how the object was de-identified."""
        prof = self.profile
        ds.PatientIdentityRemoved = "YES"
        # PS3.5 6.2: LO is at most 64 characters; the code sequence below names every option.
        method = ("Carina PS3.15 " + "+".join((prof.name, *prof.options)))[:64]
        # PS3.6: De-identification Method is LO, VM 1-n; a second value says that the
        # collection's own lines changed what the profile and options would have done.
        ds.DeidentificationMethod = (
            [method, f"and {prof.own_lines} collection recipe lines"] if prof.own_lines else method
        )
        items = []
        for key in ("basic", *prof.options):
            code, meaning = CID_7050[key]
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if "retain_long_full_dates" in prof.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif prof.shift_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"
        for tag, value in prof.additions:
            ds[tag] = DataElement(tag, _vr_of(Tag(tag)), value)


@dataclass
class _Context:
    pseudo: Pseudonymizer
    original_pid: str
    _offset: int | None = None

    @property
    def date_offset(self) -> int:
        if self._offset is None:
            self._offset = self.pseudo.date_offset(self.original_pid)
        return self._offset


def _creator_text(value: object) -> str:
    """A Private Creator value as text (bytes when read as UN), without padding."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip(" \x00")


def _vr_of(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def _empty(vr: str) -> object:
    if vr in _BINARY_VRS:
        return b""
    if vr in _NUMBER_VRS:
        return None
    return ""


def _map_values(value: object, fn: Callable[[str], str]) -> object:
    """Apply fn to each value of a (possibly multi-valued) string element."""
    if value is None or value == "":
        return value
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Iterable) and not isinstance(value, bytes | bytearray):
        return [fn(str(v)) for v in value]
    return fn(str(value))
