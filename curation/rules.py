"""Series rules: pure functions from what Carina knows of a settled series to findings.

A rule takes a ``SeriesFacts`` and its own frozen settings and returns zero or more ``Finding``s;
``run_rules`` applies every enabled rule, and a series is quarantined when any finding is a hold.
Nothing here touches the database, the object store or HTTP: the lifecycle builds the facts from
the index (DICOM JSON metadata, sha256 per instance) and the original patient identifiers, which it
passes in memory only and which no finding ever repeats (CONVENTIONS: log events, not data).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.valuerep import PersonName

from carina.archive import derived

from .errors import CurationError
from .geometry import (
    Geometry,
    GeometryTolerances,
    Metadata,
    series_geometry,
    text,
    values,
)

Severity = Literal["hold", "warn", "info"]


@dataclass(frozen=True)
class TextRegion:
    """A line of text a detector saw in one frame: where (image pixels, origin top left) and
    how many words, never what it says (burned-in text may be PHI)."""

    instance: str  # de-identified SOP Instance UID
    frame: int  # 1-based
    x: int
    y: int
    width: int
    height: int
    words: int


@dataclass(frozen=True)
class Finding:
    """One reason about a series: a stable code, how serious, and a sentence without PHI."""

    code: str
    severity: Severity
    message: str
    attribute: str | None = None  # a keyword or private tag description, never a value
    instances: tuple[str, ...] = ()  # de-identified SOP Instance UIDs concerned
    rule: str = ""  # the RulesConfig field of the rule that found it (set by run_rules)
    regions: tuple[TextRegion, ...] = ()  # where text was seen in the pixels (never the text)


@dataclass(frozen=True)
class InstanceFacts:
    """One stored instance: its de-identified SOP Instance UID, content sha256 and metadata."""

    sop_uid: str
    sha256: str
    metadata: Metadata


@dataclass(frozen=True)
class SeriesFacts:
    """What the series rules see of one settled series (all de-identified)."""

    collection: str
    series_uid: str
    modality: str
    sop_classes: frozenset[str]
    instances: tuple[InstanceFacts, ...]
    geometry: Geometry

    @property
    def metadata(self) -> list[Metadata]:
        """The instances' DICOM JSON metadata, in order."""
        return [i.metadata for i in self.instances]


def series_facts(
    collection: str,
    instances: Sequence[InstanceFacts],
    tolerances: GeometryTolerances | None = None,
) -> SeriesFacts:
    """Facts of one series from its stored instances, deriving modality, classes and geometry."""
    metas = [i.metadata for i in instances]
    modalities = Counter(text(m, "Modality") or "" for m in metas)
    return SeriesFacts(
        collection=collection,
        series_uid=next((s for m in metas if (s := text(m, "SeriesInstanceUID"))), ""),
        modality=modalities.most_common(1)[0][0] if modalities else "",
        sop_classes=frozenset(c for m in metas if (c := text(m, "SOPClassUID"))),
        instances=tuple(instances),
        geometry=series_geometry(metas, tolerances),
    )


@dataclass(frozen=True)
class PatientIdentifiers:
    """The original patient's identifiers, held in memory for the residual-PHI rule only."""

    names: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    birth_dates: tuple[str, ...] = ()  # DA, YYYYMMDD

    def __repr__(self) -> str:
        # Never let a traceback or log line print the identifiers.
        return "PatientIdentifiers(<redacted>)"

    def without(self, other: PatientIdentifiers) -> PatientIdentifiers:
        """These identifiers, less those other has."""
        return PatientIdentifiers(
            tuple(n for n in self.names if n not in other.names),
            tuple(i for i in self.ids if i not in other.ids),
            tuple(b for b in self.birth_dates if b not in other.birth_dates),
        )

    def union(self, other: PatientIdentifiers) -> PatientIdentifiers:
        """The identifiers of both (a series may hold originals with different spellings)."""
        return PatientIdentifiers(
            tuple(dict.fromkeys(self.names + other.names)),
            tuple(dict.fromkeys(self.ids + other.ids)),
            tuple(dict.fromkeys(self.birth_dates + other.birth_dates)),
        )


def patient_identifiers(original: Dataset) -> PatientIdentifiers:
    """The identifiers of an identified original, read before it is de-identified."""
    names: list[str] = []
    for keyword in ("PatientName", "OtherPatientNames", "PatientBirthName"):
        for value in _multi(original.get(keyword)):
            names.append(str(value))
    ids = [str(v) for k in ("PatientID", "OtherPatientIDs") for v in _multi(original.get(k))]
    for entry in original.get("OtherPatientIDsSequence", []):
        ids.extend(str(v) for v in _multi(entry.get("PatientID")))
    births = [str(v) for v in _multi(original.get("PatientBirthDate"))]
    return PatientIdentifiers(
        names=tuple(n for n in names if n),
        ids=tuple(i for i in ids if i),
        birth_dates=tuple(b for b in births if b),
    )


def _multi(value: Any) -> list[Any]:
    """The values of a possibly multi-valued element value."""
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | PersonName) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _sentence_count(facts: SeriesFacts, sops: Sequence[str]) -> str:
    return f"{len(sops)} of {len(facts.instances)} instance(s)"


# ---------------------------------------------------------------------------------------------
# (a) Burned-in text


@dataclass(frozen=True)
class TextDetection:
    """What a pixel text detector (OCR) made of a series; ran is False when it could not run."""

    ran: bool
    instances_with_text: tuple[str, ...] = ()
    reason: str = ""  # why it could not run, e.g. "tesseract not installed"; never pixel text
    regions: tuple[TextRegion, ...] = ()
    frames: int = 0  # how many frames it looked at


TextDetector = Callable[[SeriesFacts], TextDetection]


class ReadFirst(Exception):  # noqa: N818 (a request, not an error)
    """Raised through the rules by a detector that must read pixels before the series can be
    judged: the caller gives up its locks, calls read (None: another worker is reading them
    now) and judges the series again (curation/lifecycle.py)."""

    def __init__(self, series_uid: str, read: Callable[[], None] | None) -> None:
        super().__init__(series_uid)
        self.series_uid = series_uid
        self.read = read


# PS3.4 B.5: Secondary Capture and its multi-frame variants: screenshots and scanned documents.
SECONDARY_CAPTURE = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)


@dataclass(frozen=True)
class BurnedInSettings:
    """Burned-in text risk: which series are suspect, and OCR of a sample of their frames."""

    enabled: bool = True
    # Modalities that usually carry burned-in text (TCIA and IDC review these by eye).
    modalities: frozenset[str] = frozenset({"US", "SC", "XC", "OT"})
    include_cr_dx: bool = False  # CR/DX often carry side markers and site text; per collection
    sop_classes: frozenset[str] = SECONDARY_CAPTURE
    # OCR (curation/ocr.py, Debian's tesseract) of every image series but computed objects.
    ocr: bool = True
    ocr_frames: int = 3  # at most this many frames per series, spread over it
    ocr_size: int = 1024  # frames are scaled towards this longer side (enlarged 2x at most)
    ocr_min_confidence: float = 80.0  # tesseract's word confidence, 0-100
    ocr_min_chars: int = 3  # letters or digits a word needs ("L", "R" side markers are not text)
    # How serious it is that OCR could not run on a series nothing else makes suspect
    # (tesseract missing or failing): "hold" keeps such series for a curator.
    ocr_unavailable: Severity = "warn"
    detector: TextDetector | None = None  # set by the lifecycle from the settings above


# PS3.16 CID 7050: the Clean Pixel Data Option (PS3.15 E.3.1), which a curator's pixel
# redaction records in DeidentificationMethodCodeSequence (curation/redaction.py).
CLEAN_PIXEL_DATA = ("113101", "DCM")


def pixels_cleaned(meta: Metadata) -> bool:
    """Whether an instance's pixel data was cleaned of burned-in text (reviewed and redacted
    by a curator): its de-identification method codes name the Clean Pixel Data Option."""
    return any(
        (text(code, "CodeValue"), text(code, "CodingSchemeDesignator")) == CLEAN_PIXEL_DATA
        for code in values(meta, "DeidentificationMethodCodeSequence")
        if isinstance(code, Mapping)
    )


def burned_in_text(facts: SeriesFacts, settings: BurnedInSettings) -> list[Finding]:
    """Hold series declared to have burned-in text, or in whose pixels OCR found text, or
    likely to have it when OCR did not clear them; say so when OCR could not run. Instances
    whose pixel data a curator cleaned (pixels_cleaned) are no longer suspect."""
    findings: list[Finding] = []
    suspect = tuple(i for i in facts.instances if not pixels_cleaned(i.metadata))
    if not suspect:
        return findings
    facts = replace(facts, instances=suspect)
    yes = [
        i.sop_uid
        for i in facts.instances
        if (text(i.metadata, "BurnedInAnnotation") or "").upper() == "YES"
    ]
    if yes:
        # PS3.3 C.7.6.1.1.7: YES means the pixels identify the patient enough to need review.
        findings.append(
            Finding(
                "burned-in-annotation",
                "hold",
                f"BurnedInAnnotation is YES on {_sentence_count(facts, yes)}.",
                "BurnedInAnnotation",
                tuple(yes),
            )
        )
    modalities = settings.modalities | ({"CR", "DX"} if settings.include_cr_dx else set())
    why = []
    # Their modality (SEG, SR, OT, RTSTRUCT) says nothing of burned-in text.
    if facts.modality in modalities and not computed(facts):
        why.append(f"modality {facts.modality}")
    if facts.sop_classes & settings.sop_classes:
        why.append("a Secondary Capture SOP class")
    images = not computed(facts) and any(values(m, "Rows") for m in facts.metadata)
    detection = _detect(facts, settings) if images or why else None
    if detection is None and why:
        off = "OCR is off for the collection" if not settings.ocr else "no detector configured"
        detection = TextDetection(ran=False, reason=off)
    if detection is not None and detection.ran and detection.instances_with_text:
        words = sum(r.words for r in detection.regions)
        findings.append(
            Finding(
                "burned-in-ocr",
                "hold",
                f"OCR found {words} word(s) in {len(detection.regions)} line(s) of text in the "
                f"pixels of {_sentence_count(facts, detection.instances_with_text)} "
                f"({detection.frames} frame(s) read).",
                instances=tuple(detection.instances_with_text),
                regions=detection.regions,
            )
        )
    elif why and detection is not None and not detection.ran:
        findings.append(
            Finding(
                "burned-in-risk",
                "hold",
                f"The series is {' and '.join(why)}, which usually carries burned-in text, and "
                f"OCR was not run ({detection.reason}).",
            )
        )
    elif detection is not None and not detection.ran:
        findings.append(
            Finding(
                "burned-in-ocr-unavailable",
                settings.ocr_unavailable,
                f"OCR could not run ({detection.reason}), so the pixels were not read for "
                "burned-in text.",
            )
        )
    return findings


def _detect(facts: SeriesFacts, settings: BurnedInSettings) -> TextDetection | None:
    """What the detector made of the series; None when OCR is off or no detector is set."""
    if not settings.ocr or settings.detector is None:
        return None
    try:
        return settings.detector(facts)
    except ReadFirst:
        raise
    except Exception as exc:  # a broken detector must not stop the other rules
        return TextDetection(ran=False, reason=f"detector failed: {type(exc).__name__}")


# ---------------------------------------------------------------------------------------------
# (b) Residual PHI

FREE_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "PN", "UC"})
DATE_VRS = frozenset({"DA", "DT"})  # searched for the birth date only
_SEARCHED_VRS = FREE_TEXT_VRS | DATE_VRS

# Attributes de-identification itself writes, where dates and names are expected.
_EXPECTED_TEXT = frozenset(
    {
        "DeidentificationMethod",
        "PatientIdentityRemoved",
        "LongitudinalTemporalInformationModified",
        "CodeMeaning",  # coded concepts: "Date of birth" is a concept, not a date
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
    }
)

_MONTHS = (
    "jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec|january|february|march|april|june|"
    "july|august|september|october|november|december"
)
# Dates as people type them: 2024-01-17, 17/01/2024, 1/17/24, 17.01.2024, 17 Jan 2024, Jan 17, 2024
# and a bare YYYYMMDD with a plausible century, month and day. One separator per date, a two-digit
# year only with "/", no digits or dots around it, so versions ("3.1.20", "1.2.840") do not match.
_D = r"(?:0?[1-9]|[12]\d|3[01])"
_M = r"(?:0?[1-9]|1[0-2])"
DATE_PATTERN = re.compile(
    r"(?<![\d.])(?:"
    rf"(?:19|20)\d\d([-/.]){_M}\1{_D}"
    rf"|{_D}([-/.]){_D}\2(?:19|20)\d\d"
    rf"|{_D}/{_D}/\d\d"
    r"|(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    rf"|{_D}\s*(?:{_MONTHS})\.?\s*,?\s*(?:19|20)\d\d"
    rf"|(?:{_MONTHS})\.?\s+{_D}(?:st|nd|rd|th)?,?\s+(?:19|20)\d\d"
    r")(?!\d|\.\d)",
    re.IGNORECASE,
)
# Names as they leak into free text: DICOM PN syntax (FAMILY^GIVEN) or an honorific and a name.
NAME_PATTERN = re.compile(
    r"\b[A-Za-z][A-Za-z'-]+\^[A-Za-z][A-Za-z'-]*"
    r"|\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+[A-Z][A-Za-z'-]+",
)


@dataclass(frozen=True)
class ResidualPhiSettings:
    """Residual PHI: what counts as an identifier and which patterns to look for."""

    enabled: bool = True
    min_name_part: int = 3  # shorter name parts ("Q", "LI") match too much ordinary text
    min_id: int = 3
    date_patterns: bool = True
    name_patterns: bool = True
    pattern_severity: Severity = "hold"
    ignore: frozenset[str] = _EXPECTED_TEXT


def _elements(
    meta: Metadata, vrs: Collection[str], path: str = ""
) -> Iterator[tuple[str, str, str, list[Any]]]:
    """(keyword path, keyword, VR, values) of every element of one of vrs, descending into
    sequences."""
    for key, element in meta.items():
        if not isinstance(element, Mapping):
            continue
        vr = element.get("vr", "")
        found = element.get("Value")
        if not isinstance(found, list) or (vr != "SQ" and vr not in vrs):
            continue
        keyword = _keyword(key)
        here = f"{path}.{keyword}" if path else keyword
        if vr == "SQ":
            for entry in found:
                if isinstance(entry, Mapping):
                    yield from _elements(entry, vrs, here)
        else:
            yield here, keyword, vr, found


@lru_cache(maxsize=4096)
def _keyword(key: str) -> str:
    """The keyword of a DICOM JSON key ("00100010" -> "PatientName"), or "(gggg,eeee)"."""
    return keyword_for_tag(int(key, 16)) or f"({key[:4]},{key[4:]})"


def _strings(vr: str, found: list[Any]) -> Iterator[str]:
    for value in found:
        if vr == "PN" and isinstance(value, Mapping):
            # PS3.18 F.2.2: every component group may hold the name.
            yield from (str(v) for v in value.values() if v)
        elif value is not None:
            yield str(value)


def _name_parts(names: Iterable[str], minimum: int) -> list[Callable[[str], bool]]:
    parts = {p for n in names for p in re.split(r"[\^=,\s.]+", n) if len(p) >= minimum}
    return [_name_matcher(p) for p in sorted(parts)]


def _name_matcher(part: str) -> Callable[[str], bool]:
    """Whether a text holds part as a whole word, in any case: "ANN" must not flag
    "ANNOTATION". ASCII text is searched with str.find (a regex compile per new patient cost
    more than all the searches); other text with the regex, whose case folding knows more."""
    if not part.isascii():
        return lambda text: _name_pattern(part).search(text) is not None
    word = part.lower()

    def match(text: str) -> bool:
        if not text.isascii():
            return _name_pattern(part).search(text) is not None
        text = text.lower()
        start = text.find(word)
        while start >= 0:
            end = start + len(word)
            if not (start and text[start - 1].isalpha()) and not (
                end < len(text) and text[end].isalpha()
            ):
                return True
            start = text.find(word, start + 1)
        return False

    return match


@lru_cache(maxsize=256)
def _name_pattern(part: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z]){re.escape(part)}(?![A-Za-z])", re.IGNORECASE)


def _id_matchers(ids: Iterable[str], minimum: int) -> list[Callable[[str], bool]]:
    out: list[Callable[[str], bool]] = []
    for raw in {i.strip() for i in ids if len(i.strip()) >= minimum}:
        lowered = raw.lower()
        squashed = re.sub(r"[^0-9a-z]", "", lowered)
        out.append(lambda s, lowered=lowered: lowered in s.lower())
        if len(squashed) >= 6:  # "MRN-7734921" typed as "mrn 7734921" or "7734921"
            digits = re.sub(r"[^0-9]", "", squashed)
            for needle in {squashed, digits} - {""}:
                if len(needle) >= 6:
                    out.append(
                        lambda s, needle=needle: needle in re.sub(r"[^0-9a-z]", "", s.lower())
                    )
    return out


def _birth_date_forms(birth: str) -> list[str]:
    match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", birth.strip())
    if not match:
        return [birth.strip()] if birth.strip() else []
    y, m, d = match.groups()
    mi, di = str(int(m)), str(int(d))
    forms = {f"{y}{m}{d}"}
    for sep in "-/.":
        forms |= {f"{y}{sep}{m}{sep}{d}", f"{d}{sep}{m}{sep}{y}", f"{m}{sep}{d}{sep}{y}"}
        forms |= {f"{di}{sep}{mi}{sep}{y}", f"{mi}{sep}{di}{sep}{y}"}
    return sorted(forms)


def _birth_matchers(births: Iterable[str]) -> list[re.Pattern[str]]:
    return [m for m in map(_birth_matcher, births) if m is not None]


@lru_cache(maxsize=1024)
def _birth_matcher(birth: str) -> re.Pattern[str] | None:
    """A matcher of the ways people write one birth date (cached, as _name_pattern)."""
    forms = [re.escape(f) for f in _birth_date_forms(birth)]
    match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", birth.strip())
    if match:
        y, m, d = match.groups()
        name = _MONTHS.split("|")[int(m) - 1]  # the three-letter month; "march" has "mar"
        day = str(int(d))
        forms.append(rf"0?{day}\s*{name}[a-z]*\.?,?\s*{y}")
        forms.append(rf"{name}[a-z]*\.?\s+0?{day}(?:st|nd|rd|th)?,?\s+{y}")
    if not forms:
        return None
    return re.compile(rf"(?<!\d)(?:{'|'.join(forms)})(?!\d)", re.IGNORECASE)


# Matchers of a patient's name parts, IDs and birth dates.
_Matchers = tuple[list[Callable[[str], bool]], list[Callable[[str], bool]], list[re.Pattern[str]]]
PhiHit = tuple[str, str, str]
"""(code, kind, attribute path) of one residual-PHI match; the kind names the identifier
("a patient ID"), never its value."""


@lru_cache(maxsize=64)
def _identifier_matchers(
    identifiers: PatientIdentifiers | None, settings: ResidualPhiSettings
) -> _Matchers:
    """The matchers of one patient's identifiers; cached, as the instances of a series come
    one after another (the lists are never changed)."""
    if identifiers is None:
        return [], [], []
    return (
        _name_parts(identifiers.names, settings.min_name_part),
        _id_matchers(identifiers.ids, settings.min_id),
        _birth_matchers(identifiers.birth_dates),
    )


def _phi_hits(
    meta: Metadata,
    settings: ResidualPhiSettings,
    matchers: _Matchers,
    patterns: bool,
) -> set[PhiHit]:
    """What one instance's free text still holds: identifiers, and (if patterns) dates/names."""
    names, ids, births = matchers
    hits: set[PhiHit] = set()
    for path, keyword, vr, found in _elements(meta, _SEARCHED_VRS):
        if keyword in settings.ignore:
            continue
        for value in _strings(vr, found):
            kinds: list[tuple[str, str]] = []
            if any(b.search(value) for b in births):
                kinds.append(("residual-phi", "the patient's birth date"))
            if vr in FREE_TEXT_VRS:
                if any(match(value) for match in names):
                    kinds.append(("residual-phi", "a part of the patient's name"))
                if any(match(value) for match in ids):
                    kinds.append(("residual-phi", "a patient ID"))
                if patterns and vr != "PN":  # PN is a name; pseudonyms look like names
                    if settings.date_patterns and DATE_PATTERN.search(value):
                        kinds.append(("residual-phi-pattern", "a date"))
                    if settings.name_patterns and NAME_PATTERN.search(value):
                        kinds.append(("residual-phi-pattern", "a person's name"))
            hits.update((code, kind, path) for code, kind in kinds)
    return hits


def instance_residual_phi(
    meta: Metadata, identifiers: PatientIdentifiers, settings: ResidualPhiSettings
) -> list[PhiHit]:
    """The original identifiers one de-identified instance still holds, for the intake worker:
    it alone has the original in hand, and only these hits (no PHI) leave it."""
    matchers = _identifier_matchers(identifiers, settings)
    return sorted(_phi_hits(meta, settings, matchers, patterns=False))


def text_phi(meta: Metadata, settings: ResidualPhiSettings) -> list[PhiHit]:
    """What the residual-PHI rule would flag in one instance's metadata without the original
    identifiers: dates and names in free text (a curator's edit is checked with it)."""
    return sorted(_phi_hits(meta, settings, _identifier_matchers(None, settings), patterns=True))


def residual_phi(
    facts: SeriesFacts,
    settings: ResidualPhiSettings,
    identifiers: PatientIdentifiers | None = None,
    intake_hits: Mapping[str, Iterable[PhiHit]] | None = None,
) -> list[Finding]:
    """Hold free text that still holds the original patient's identifiers, or dates and names.

    intake_hits (SOP UID -> hits) are what the intake found with the originals in hand; given
    for every instance, they stand in for identifiers."""
    matchers = _identifier_matchers(identifiers, settings)
    hits: dict[PhiHit, list[str]] = defaultdict(list)
    for inst in facts.instances:
        found = _phi_hits(inst.metadata, settings, matchers, patterns=True)
        if intake_hits is not None:
            found.update(tuple(h) for h in intake_hits.get(inst.sop_uid, ()))  # type: ignore[misc]
        for hit in found:
            hits[hit].append(inst.sop_uid)
    findings = []
    for (code, kind, path), sops in sorted(hits.items()):
        if code == "residual-phi":
            sentence = f"{path} still holds {kind} after de-identification"
            severity: Severity = "hold"
        else:
            sentence = f"{path} holds what looks like {kind} where none should remain"
            severity = settings.pattern_severity
        findings.append(
            Finding(
                code,
                severity,
                f"{sentence} ({_sentence_count(facts, sops)}).",
                path,
                tuple(sops),
            )
        )
    if identifiers is None and intake_hits is None:
        findings.append(
            Finding(
                "residual-phi-unchecked",
                "warn",
                "The original patient identifiers were not available, so only date and name "
                "patterns were searched for.",
            )
        )
    return findings


# ---------------------------------------------------------------------------------------------
# (c) Private attributes

SafePrivate = frozenset[tuple[int, str, int]]
"""Safe private attributes as (group, private creator, element offset 0x00-0xFF)."""


@dataclass(frozen=True)
class PrivateSettings:
    """Private attributes: the safe list (PS3.15 E.3.10 Retain Safe Private)."""

    enabled: bool = True
    safe: SafePrivate = frozenset()


def _private_elements(meta: Metadata, path: str = "") -> Iterator[tuple[str, str, str]]:
    """(where, tag, creator) of private data elements, descending into sequences."""
    creators = {
        key: str((element.get("Value") or [""])[0])
        for key, element in meta.items()
        if isinstance(element, Mapping) and _is_private_creator(key)
    }
    for key, element in meta.items():
        if not isinstance(element, Mapping):
            continue
        group, elem = int(key[:4], 16), int(key[4:], 16)
        if group % 2 and elem >= 0x1000:
            # PS3.5 7.8.1: (gggg,xxyy) is reserved by the creator at (gggg,00xx).
            creator = creators.get(f"{group:04X}00{elem >> 8:02X}", "")
            yield path, key, creator
        if element.get("vr") == "SQ":
            for entry in element.get("Value") or []:
                if isinstance(entry, Mapping):
                    name = keyword_for_tag(int(key, 16)) or f"({key[:4]},{key[4:]})"
                    yield from _private_elements(entry, f"{path}{name}.")


def _is_private_creator(key: str) -> bool:
    return bool(int(key[:4], 16) % 2) and 0x10 <= int(key[4:], 16) <= 0xFF


def private_attributes(facts: SeriesFacts, settings: PrivateSettings) -> list[Finding]:
    """Hold private attributes that are not on the safe list."""
    hits: dict[str, list[str]] = defaultdict(list)
    for inst in facts.instances:
        for where, key, creator in set(_private_elements(inst.metadata)):
            group, elem = int(key[:4], 16), int(key[4:], 16)
            if (group, creator, elem & 0xFF) in settings.safe:
                continue
            label = (
                f'{where}({key[:4]},xx{key[6:]}) of "{creator}"'
                if creator
                else f"{where}({key[:4]},{key[4:]}) without a private creator"
            )
            hits[label].append(inst.sop_uid)
    return [
        Finding(
            "private-attribute",
            "hold",
            f"Private attribute {label} is not on the safe list ({_sentence_count(facts, sops)}).",
            label,
            tuple(sops),
        )
        for label, sops in sorted(hits.items())
    ]


# ---------------------------------------------------------------------------------------------
# (d) Geometry


@dataclass(frozen=True)
class GeometrySettings:
    """Geometry checks as IDC selects series, with the collection's limits."""

    enabled: bool = True
    tolerances: GeometryTolerances = GeometryTolerances()
    min_slices: int | None = None
    max_slices: int | None = None
    min_thickness: float | None = None  # mm
    max_thickness: float | None = None  # mm
    hold_localizers: bool = True


def geometry(facts: SeriesFacts, settings: GeometrySettings) -> list[Finding]:
    """Hold series whose geometry would not make a clean volume, or is outside the limits.
    Derived objects are not judged: a SEG's frames lie where its segments do (two segments on
    one slice share a position; a lesion skips slices), and their sources are judged."""
    g = facts.geometry
    findings: list[Finding] = []
    if computed(facts):
        return findings

    def hold(code: str, message: str) -> None:
        findings.append(Finding(code, "hold", message))

    if g.has_geometry:
        if g.localizers:
            findings.append(
                Finding(
                    "geometry-localizer",
                    "hold" if settings.hold_localizers else "warn",
                    f"The series holds {g.localizers} localizer slice(s) among its images.",
                )
            )
        if not g.orientation_consistent:
            hold(
                "geometry-orientation",
                "ImageOrientationPatient differs between slices (largest direction cosine "
                f"difference {g.orientation_deviation:.4f}).",
            )
        if not g.pixel_spacing_consistent:
            hold("geometry-pixel-spacing", "PixelSpacing differs between slices.")
        if not g.dimensions_consistent:
            hold("geometry-dimensions", "Rows and Columns differ between instances.")
        if not g.positions_unique:
            hold(
                "geometry-duplicate-position",
                f"{g.duplicate_positions} slice(s) share an ImagePositionPatient with another.",
            )
        if not g.spacing_uniform:
            hold(
                "geometry-missing-slices",
                f"Slice spacing is not uniform ({g.spacing_min:.3f} to {g.spacing_max:.3f} mm); "
                f"about {g.missing_slices} slice(s) appear to be missing.",
            )
        if g.tilted:
            hold(
                "geometry-tilt",
                f"Slices are stacked {g.tilt_degrees:.2f} degrees off their normal "
                "(gantry tilt or a displaced slice).",
            )
    count = g.slice_count
    if settings.min_slices is not None and count < settings.min_slices:
        hold("geometry-slice-count", f"{count} slice(s), fewer than {settings.min_slices}.")
    if settings.max_slices is not None and count > settings.max_slices:
        hold("geometry-slice-count", f"{count} slice(s), more than {settings.max_slices}.")
    if settings.min_thickness is not None or settings.max_thickness is not None:
        if g.thickness_min is None or g.thickness_max is None:
            hold("geometry-slice-thickness", "SliceThickness is absent, so limits can't apply.")
        else:
            if settings.min_thickness is not None and g.thickness_min < settings.min_thickness:
                hold(
                    "geometry-slice-thickness",
                    f"SliceThickness {g.thickness_min:g} mm is below {settings.min_thickness:g}.",
                )
            if settings.max_thickness is not None and g.thickness_max > settings.max_thickness:
                hold(
                    "geometry-slice-thickness",
                    f"SliceThickness {g.thickness_max:g} mm is above {settings.max_thickness:g}.",
                )
    return findings


# ---------------------------------------------------------------------------------------------
# (e) Consistency


@dataclass(frozen=True)
class ConsistencySettings:
    """Mixed patients or studies in a series, and duplicate SOP instances."""

    enabled: bool = True


def consistency(facts: SeriesFacts, settings: ConsistencySettings) -> list[Finding]:
    """Hold series mixing patients or studies, or holding one SOP UID with different content."""
    findings = []
    for keyword, code, what in (
        ("PatientID", "mixed-patients", "patients"),
        ("StudyInstanceUID", "mixed-studies", "studies"),
    ):
        distinct = {text(m, keyword) or "" for m in facts.metadata}
        if len(distinct) > 1:
            findings.append(
                Finding(
                    code,
                    "hold",
                    f"The series holds instances of {len(distinct)} different {what} "
                    f"({keyword} differs).",
                    keyword,
                )
            )
    shas: dict[str, set[str]] = defaultdict(set)
    for inst in facts.instances:
        shas[inst.sop_uid].add(inst.sha256)
    clashing = sorted(uid for uid, found in shas.items() if len(found) > 1)
    if clashing:
        findings.append(
            Finding(
                "duplicate-sop-instance",
                "hold",
                f"{len(clashing)} SOP Instance UID(s) arrived more than once with different "
                "content.",
                "SOPInstanceUID",
                tuple(clashing),
            )
        )
    return findings


# ---------------------------------------------------------------------------------------------
# (g) IOD validity


@dataclass(frozen=True)
class IodSettings:
    """IOD validity: Type 1 attributes present and not empty (PS3.5 7.4.1)."""

    enabled: bool = True


@lru_cache(maxsize=1)
def type1_table() -> dict[str, tuple[str, tuple[str, ...]]]:
    """SOP Class UID -> (IOD name, Type 1 keywords), from iod_type1.json (PS3.3, by hand)."""
    raw = json.loads(resources.files("carina.curation").joinpath("iod_type1.json").read_text())
    table = {}
    for uid, iod in raw["iods"].items():
        keywords = [k for module in iod["modules"] for k in raw["modules"][module]]
        table[uid] = (iod["name"], tuple(dict.fromkeys(keywords)))
    return table


def iod_validity(facts: SeriesFacts, settings: IodSettings) -> list[Finding]:
    """Hold instances missing a Type 1 attribute of their IOD (known SOP classes only)."""
    table = type1_table()
    missing: dict[tuple[str, str], list[str]] = defaultdict(list)
    for inst in facts.instances:
        sop_class = text(inst.metadata, "SOPClassUID") or ""
        if sop_class not in table:
            continue
        name, keywords = table[sop_class]
        for keyword in keywords:
            if not values(inst.metadata, keyword):  # absent, or present with zero length
                missing[(name, keyword)].append(inst.sop_uid)
    return [
        Finding(
            "iod-type1-missing",
            "hold",
            f"{keyword} is Type 1 in {name} but missing or empty ({_sentence_count(facts, sops)}).",
            keyword,
            tuple(sops),
        )
        for (name, keyword), sops in sorted(missing.items())
    ]


# ---------------------------------------------------------------------------------------------
# (g) Derived objects whose sources are not held

# SOP classes of derived objects (PS3.4 B.5): SEG, SR, parametric map, RT structure set.
DERIVED_SOP_CLASSES = frozenset(derived.KINDS)


def computed(facts: SeriesFacts) -> bool:
    """Whether a series holds derived objects only (segmentations, SRs, parametric maps,
    structure sets): computed from their sources, not captured."""
    return bool(facts.sop_classes) and facts.sop_classes <= DERIVED_SOP_CLASSES


# Where a derived object names its source series: the Common Instance Reference module
# (PS3.3 C.12.2), SR evidence (C.17.2) and RT Referenced Series (C.8.8.5).
_STUDY_REFERENCES = (
    "StudiesContainingOtherReferencedInstancesSequence",
    "CurrentRequestedProcedureEvidenceSequence",
    "PertinentOtherEvidenceSequence",
)


@dataclass(frozen=True)
class DerivedSourcesSettings:
    """Derived objects whose references resolve to nothing Carina holds."""

    enabled: bool = True


def referenced_series(meta: Metadata) -> list[str]:
    """The source series a derived object names, in order (its own series left out)."""
    groups = [values(meta, "ReferencedSeriesSequence")]
    groups += [
        values(study, "ReferencedSeriesSequence")
        for key in _STUDY_REFERENCES
        for study in values(meta, key)
    ]
    groups += [
        values(study, "RTReferencedSeriesSequence")
        for frame in values(meta, "ReferencedFrameOfReferenceSequence")
        for study in values(frame, "RTReferencedStudySequence")
    ]
    own = text(meta, "SeriesInstanceUID")
    found = [text(entry, "SeriesInstanceUID") for group in groups for entry in group]
    return list(dict.fromkeys(uid for uid in found if uid and uid != own))


def derived_references(facts: SeriesFacts) -> dict[str, list[str]]:
    """SOP Instance UID -> source series, for the derived objects of a series."""
    return {
        i.sop_uid: referenced_series(i.metadata)
        for i in facts.instances
        if text(i.metadata, "SOPClassUID") in DERIVED_SOP_CLASSES
    }


def derived_sources(
    facts: SeriesFacts, settings: DerivedSourcesSettings, held: Collection[str] | None
) -> list[Finding]:
    """Hold derived objects that name a source series Carina does not hold: their segments
    and measurements would point at nothing. held is the referenced series Carina holds
    (None: not looked up, so nothing is judged)."""
    if held is None:
        return []
    missing: dict[str, list[str]] = defaultdict(list)
    for sop_uid, sources in derived_references(facts).items():
        for series in sources:
            if series not in held:
                missing[series].append(sop_uid)
    if not missing:
        return []
    sops = tuple(sorted({sop for found in missing.values() for sop in found}))
    return [
        Finding(
            "derived-source-missing",
            "hold",
            f"{len(sops)} derived object(s) reference series that Carina does not hold:"
            f" {', '.join(sorted(missing))}. The series is evaluated again when one arrives.",
            "ReferencedSeriesSequence",
            sops,
        )
    ]


# ---------------------------------------------------------------------------------------------
# Running them


@dataclass(frozen=True)
class RulesConfig:
    """Every series rule's settings for one collection."""

    burned_in: BurnedInSettings = BurnedInSettings()
    residual_phi: ResidualPhiSettings = ResidualPhiSettings()
    private: PrivateSettings = PrivateSettings()
    geometry: GeometrySettings = GeometrySettings()
    consistency: ConsistencySettings = ConsistencySettings()
    iod: IodSettings = IodSettings()
    derived_sources: DerivedSourcesSettings = DerivedSourcesSettings()


def run_rules(
    facts: SeriesFacts,
    config: RulesConfig | None = None,
    identifiers: PatientIdentifiers | None = None,
    intake_hits: Mapping[str, Iterable[PhiHit]] | None = None,
    held_sources: Collection[str] | None = None,
) -> list[Finding]:
    """Every enabled rule's findings for one series, each labelled with its rule; identifiers
    are used, never kept; held_sources are the series its derived objects reference that
    Carina holds. A rule that raises holds the series with a rule-failed finding
    instead of taking the evaluation (and the other rules) down."""
    config = config or RulesConfig()
    checks: list[tuple[str, Callable[[], list[Finding]]]] = [
        ("burned_in", lambda: burned_in_text(facts, config.burned_in)),
        (
            "residual_phi",
            lambda: residual_phi(facts, config.residual_phi, identifiers, intake_hits),
        ),
        ("private", lambda: private_attributes(facts, config.private)),
        ("geometry", lambda: geometry(facts, config.geometry)),
        ("consistency", lambda: consistency(facts, config.consistency)),
        ("iod", lambda: iod_validity(facts, config.iod)),
        ("derived_sources", lambda: derived_sources(facts, config.derived_sources, held_sources)),
    ]
    findings: list[Finding] = []
    for name, check in checks:
        if not getattr(config, name).enabled:
            continue
        try:
            found = check()
        except ReadFirst:  # not a failure: pixels to read with no lock held first
            raise
        except Exception as exc:
            found = [rule_failed(name, exc)]
        findings += [replace(f, rule=name) for f in found]
    return findings


def rule_failed(rule: str, exc: BaseException) -> Finding:
    """The finding for a rule that could not run: a hold, since the series is unchecked."""
    return Finding(
        "rule-failed",
        "hold",
        f"The {rule} rule failed ({type(exc).__name__}), so the series was not checked by it.",
        rule=rule,
    )


def quarantined(findings: Iterable[Finding]) -> bool:
    """Whether findings hold the series for a curator."""
    return any(f.severity == "hold" for f in findings)


# ---------------------------------------------------------------------------------------------
# (f) Submission manifest


class ManifestError(CurationError):
    """A manifest CSV cannot be read; says which line and why."""


@dataclass(frozen=True)
class ManifestRow:
    """Expected counts for one modality of a submission."""

    modality: str
    patients: int
    studies: int
    series: int
    instances: int


@dataclass(frozen=True)
class Manifest:
    """What a submitter says they sent, per modality."""

    rows: tuple[ManifestRow, ...] = field(default_factory=tuple)


MANIFEST_COLUMNS = ("modality", "patients", "studies", "series", "instances")


def parse_manifest(source: str) -> Manifest:
    """A manifest from CSV with the header modality,patients,studies,series,instances."""
    reader = csv.reader(io.StringIO(source.lstrip("\ufeff")))
    header = next(reader, None)
    if header is None:
        raise ManifestError(
            "the manifest is empty; expected a header " + ",".join(MANIFEST_COLUMNS)
        )
    columns = [h.strip().lower() for h in header]
    absent = [c for c in MANIFEST_COLUMNS if c not in columns]
    if absent:
        raise ManifestError(f"line 1: the header lacks column(s) {', '.join(absent)}")
    rows: list[ManifestRow] = []
    seen: set[str] = set()
    for line, record in enumerate(reader, start=2):
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(columns):
            raise ManifestError(f"line {line}: {len(record)} fields, expected {len(columns)}")
        cells = dict(zip(columns, (c.strip() for c in record), strict=True))
        modality = cells["modality"].upper()
        # PS3.3 C.7.3.1.1.1: Modality is a CS, at most 16 upper-case characters.
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality):
            raise ManifestError(f"line {line}: modality {cells['modality']!r} is not a DICOM CS")
        if modality in seen:
            raise ManifestError(f"line {line}: modality {modality} is listed twice")
        seen.add(modality)
        counts = []
        for column in MANIFEST_COLUMNS[1:]:
            cell = cells[column]
            if not cell.isdigit():
                raise ManifestError(
                    f"line {line}: {column} must be a whole number >= 0, got {cell!r}"
                )
            counts.append(int(cell))
        rows.append(ManifestRow(modality, *counts))
    return Manifest(tuple(rows))


@dataclass(frozen=True)
class SubmissionCounts:
    """What arrived, per modality: distinct patients, studies, series and instances."""

    by_modality: Mapping[str, tuple[int, int, int, int]]


def submission_counts(series: Iterable[SeriesFacts]) -> SubmissionCounts:
    """Count what a submission's series hold, per modality (patients by de-identified ID)."""
    patients: dict[str, set[str]] = defaultdict(set)
    studies: dict[str, set[str]] = defaultdict(set)
    series_uids: dict[str, set[str]] = defaultdict(set)
    instances: dict[str, set[str]] = defaultdict(set)
    for facts in series:
        m = facts.modality
        series_uids[m].add(facts.series_uid)
        for inst in facts.instances:
            patients[m].add(text(inst.metadata, "PatientID") or "")
            studies[m].add(text(inst.metadata, "StudyInstanceUID") or "")
            instances[m].add(inst.sop_uid)
    return SubmissionCounts(
        {
            m: (len(patients[m]), len(studies[m]), len(series_uids[m]), len(instances[m]))
            for m in series_uids
        }
    )


def check_manifest(manifest: Manifest, series: Iterable[SeriesFacts]) -> list[Finding]:
    """Hold a submission whose counts differ from its manifest, one finding per difference."""
    return check_counts(manifest, submission_counts(series))


def check_counts(manifest: Manifest, arrived: SubmissionCounts) -> list[Finding]:
    """Findings for each count that differs from the manifest (counts made anywhere, e.g. SQL)."""
    counts = arrived.by_modality
    findings = []
    expected = {row.modality: row for row in manifest.rows}
    for modality, row in sorted(expected.items()):
        got = counts.get(modality, (0, 0, 0, 0))
        want = (row.patients, row.studies, row.series, row.instances)
        for label, w, g in zip(MANIFEST_COLUMNS[1:], want, got, strict=True):
            if w != g:
                findings.append(
                    Finding(
                        "manifest-count",
                        "hold",
                        f"The manifest expects {w} {modality} {label}, {g} arrived.",
                    )
                )
    for modality in sorted(set(counts) - set(expected)):
        findings.append(
            Finding(
                "manifest-unexpected-modality",
                "hold",
                f"{counts[modality][2]} {modality or 'unknown-modality'} series arrived that the "
                "manifest does not list.",
            )
        )
    return findings
