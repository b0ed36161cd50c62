"""QIDO-RS matching (PS3.18 8.3.4, PS3.4 C.2.2.2) turned into SQL over the index."""

from __future__ import annotations

import calendar
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from psycopg_pool import ConnectionPool
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from .access import EVERYTHING, Scope
from .errors import InvalidQuery
from .index import INSTANCE_TAGS, PATIENT_TAGS, PUBLISHED, SERIES_TAGS, STUDY_TAGS

Level = Literal["study", "series", "instance"]

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000

# keyword -> (SQL column, matching kind)
_KEYS: dict[str, tuple[str, str]] = {
    "PatientName": ("p.patient_name", "pn"),
    "PatientID": ("p.patient_id", "str"),
    "PatientBirthDate": ("p.birth_date", "date"),
    "PatientSex": ("p.sex", "str"),
    "StudyInstanceUID": ("s.study_uid", "uid"),
    "StudyDate": ("s.study_date", "date"),
    "StudyTime": ("s.study_time", "time"),
    "AccessionNumber": ("s.accession_number", "str"),
    "ReferringPhysicianName": ("s.referring_physician_name", "pn"),
    "StudyID": ("s.study_id", "str"),
    "StudyDescription": ("s.study_description", "str"),
    "ModalitiesInStudy": ("", "modalities"),
    "SeriesInstanceUID": ("se.series_uid", "uid"),
    "Modality": ("se.modality", "str"),
    "SeriesNumber": ("se.series_number", "int"),
    "SeriesDescription": ("se.series_description", "str"),
    "PerformedProcedureStepStartDate": ("se.pps_start_date", "date"),
    "PerformedProcedureStepStartTime": ("se.pps_start_time", "time"),
    "SOPClassUID": ("i.sop_class_uid", "uid"),
    "SOPInstanceUID": ("i.sop_uid", "uid"),
    "InstanceNumber": ("i.instance_number", "int"),
}
#: Matching keys of the series and instance levels (refused in queries above their level).
SERIES_KEYS = {
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
}
INSTANCE_KEYS = {"SOPClassUID", "SOPInstanceUID", "InstanceNumber"}
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
# PS3.5 Table 6.2-1 DT: YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][&ZZXX]
_DT = r"[0-9]{4}(?:[0-9]{2}){0,5}(?:\.[0-9]{1,6})?(?:[+-][0-9]{4})?"
_DATETIME = re.compile(f"({_DT})")
_DATETIME_RANGE = re.compile(f"({_DT})?-({_DT})?")
_DT_PARTS = re.compile(r"([0-9]{4}(?:[0-9]{2}){0,5})(\.[0-9]{1,6})?([+-][0-9]{4})?")
_OFFSET = re.compile(r"[+-][0-9]{4}")
# PS3.18 8.3.4.1 / PS3.4 C.2.2.2.5: a TimezoneOffsetFromUTC key is not matched; it says which
# offset the query's date-time values without one are in.
_TIMEZONE_KEYS = {"TimezoneOffsetFromUTC", "00080201"}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = {
    "includefield",
    "limit",
    "offset",
    "fuzzymatching",
    "emptyvaluematching",
    "multiplevaluematching",
}
# PS3.4 C.2.2.2.1 (Empty Value Matching): with emptyvaluematching=true this value, two quotation
# marks, matches only entities whose attribute is empty or absent.
EMPTY_VALUE = '""'
# PS3.4 C.2.2.2: Specific Character Set says how values are encoded; it is never matched.
_NEVER_MATCHED = {"00080005"}
# Values kept as DICOM JSON numbers (PS3.18 F.2.3.1); matched as numbers.
_NUMBER_VRS = {"IS", "DS", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"}
# No matching is defined on binary values (PS3.4 C.2.2.2 lists none); they are ignored.
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


@dataclass(frozen=True)
class MetaKey:
    """A matching key answered from the instances' metadata JSON: an attribute, or one inside
    sequence items (PS3.18 8.3.4.1 `Seq.Attr`, PS3.4 C.2.2.2.6 Sequence Matching)."""

    #: tags (8 hex digits) from the top-level attribute down to the matched one
    path: tuple[str, ...]
    vr: str
    name: str


@dataclass
class Query:
    """A parsed QIDO-RS request."""

    level: Level
    study: str | None = None
    series: str | None = None
    #: what is searched; callers pass what the requester may read
    scope: Scope = EVERYTHING
    matches: list[tuple[str, list[str]]] = field(default_factory=list)
    #: keys not held in an indexed column, matched on the instances' metadata
    meta_matches: list[tuple[MetaKey, list[str]]] = field(default_factory=list)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    fuzzy: bool = False
    #: emptyvaluematching=true (PS3.18 8.3.4.1): empty attributes also match
    empty_values: bool = False
    #: multiplevaluematching=true (PS3.18 8.3.4.1): backslash-separated values are alternatives
    multiple_values: bool = False
    #: TimezoneOffsetFromUTC of the query (+HHMM/-HHMM): the offset of its DT values without one
    timezone: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Result:
    """DICOM JSON objects answering a query, and whether more matches exist past the limit."""

    items: list[dict]
    more: bool
    warnings: list[str]


def _tag_key(name: str) -> tuple[str, str]:
    """(keyword, 8-hex tag) of a query attribute given by keyword or tag."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        tag = int(name, 16)
        return keyword_for_tag(tag) or name.upper(), f"{tag:08X}"
    tag = tag_for_keyword(name)
    if tag is None:
        raise InvalidQuery(f"unknown attribute {name!r} in query")
    return name, f"{tag:08X}"


def _vr(tag: str) -> str:
    """The VR of a tag in the data dictionary; UN for a private or unknown one."""
    try:
        return str(dictionary_VR(int(tag, 16))).split(" or ")[0]
    except KeyError:
        return "UN"


def _meta_key(name: str) -> MetaKey:
    """The key of a query attribute `Attr` or `Seq.Attr` (keywords or tags at each step)."""
    steps = [_tag_key(step) for step in name.split(".")]
    for keyword, tag in steps[:-1]:
        if _vr(tag) != "SQ":
            raise InvalidQuery(f"{keyword} in {name!r} is not a sequence (PS3.18 8.3.4.1)")
    return MetaKey(tuple(tag for _, tag in steps), _vr(steps[-1][1]), name)


def _int_param(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError as e:
        raise InvalidQuery(f"{name} must be a non-negative integer, not {value!r}") from e
    if n < 0:
        raise InvalidQuery(f"{name} must be a non-negative integer, not {value!r}")
    return n


def _boolean(name: str, value: str) -> bool:
    """A true/false query parameter (PS3.18 Table 8.3.4-1)."""
    if value.lower() not in ("true", "false"):
        raise InvalidQuery(f"{name} must be true or false, not {value!r}")
    return value.lower() == "true"


def _control(q: Query, name: str, value: str) -> None:
    """Apply one of the search parameters that are not attribute matches (PS3.18 8.3.4)."""
    if name == "includefield":
        for f in value.split(","):
            f = f.strip()
            if f == "all":
                q.include_all = True
            elif f:
                # `Seq.Attr` asks for the whole top-level sequence.
                q.include.add(_tag_key(f.split(".")[0])[1])
    elif name == "limit":
        q.limit = _int_param(name, value)
        if q.limit > MAX_LIMIT:
            q.warnings.append(f"limit reduced to {MAX_LIMIT}")
            q.limit = MAX_LIMIT
    elif name == "offset":
        q.offset = _int_param(name, value)
    elif name == "fuzzymatching":
        q.fuzzy = _boolean(name, value)
    elif name == "emptyvaluematching":
        q.empty_values = _boolean(name, value)
    else:
        q.multiple_values = _boolean(name, value)


def _check_level(level: Level, keyword: str, top_tag: str) -> None:
    """Refuse matching on a key of a lower level than the one searched (PS3.18 10.6.1.2)."""
    if level == "study" and (keyword in SERIES_KEYS | INSTANCE_KEYS or top_tag in _LOWER_TAGS):
        raise InvalidQuery(f"{keyword} is not a study-level attribute")
    if level == "series" and (keyword in INSTANCE_KEYS or top_tag in _INSTANCE_ONLY):
        raise InvalidQuery(f"{keyword} is not a series-level attribute")


_UPPER_TAGS = PATIENT_TAGS | STUDY_TAGS
_LOWER_TAGS = (SERIES_TAGS | INSTANCE_TAGS) - _UPPER_TAGS
_INSTANCE_ONLY = INSTANCE_TAGS - _UPPER_TAGS - SERIES_TAGS


def parse_query(
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    study: str | None = None,
    series: str | None = None,
    scope: Scope = EVERYTHING,
) -> Query:
    """Parse query parameters; unknown attributes and malformed values raise InvalidQuery."""
    q = Query(level=level, study=study, series=series, scope=scope)
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        if "\x00" in value:  # PostgreSQL text cannot hold NUL; no DICOM value has one
            raise InvalidQuery(f"the value of {name} contains a NUL character")
        if name in _CONTROL:
            _control(q, name, value)
        elif name in _TIMEZONE_KEYS:
            q.timezone = _offset(value, "TimezoneOffsetFromUTC")
        else:
            grouped.setdefault(name, []).append(value)
    for name, values in grouped.items():
        key = _meta_key(name)
        top = key.path[0]
        keyword = keyword_for_tag(int(top, 16)) or top
        if any(v not in ("", "*") for v in values):
            _check_level(level, keyword, top)
        q.include.add(top)
        if len(key.path) == 1 and keyword in _KEYS:
            q.matches.append((keyword, values))
        elif top in _NEVER_MATCHED:
            continue
        elif key.vr in _BINARY_VRS:
            q.warnings.append(f"matching on {name} ({key.vr}) is not supported; ignored")
        else:
            for value in values:
                _meta_matching(q, key, value)  # malformed values: 400 before the query
            q.meta_matches.append((key, values))
    return q


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _range(
    column: str, value: str, pattern: re.Pattern[str], what: str
) -> tuple[str, list[object]]:
    if "-" not in value:
        if not pattern.match(value):
            raise InvalidQuery(f"{what} {value!r} is not valid")
        return f"{column} = %s", [value]
    lo, _, hi = value.partition("-")
    if not lo and not hi:
        raise InvalidQuery(f"{what} range {value!r} has no bounds")
    for bound in (lo, hi):
        if bound and not pattern.match(bound):
            raise InvalidQuery(f"{what} range bound {bound!r} is not valid")
    conds, args = [], []
    if lo:
        conds.append(f"{column} >= %s")
        args.append(lo)
    if hi:
        conds.append(f"{column} <= %s")
        # A partial time as upper bound covers its whole hour or minute: "10" admits "1059".
        args.append(hi + "~" if what == "time" else hi)
    return " AND ".join(conds), args


def _offset(text: str, what: str) -> str:
    """A UTC offset &ZZXX (PS3.5 Table 6.2-1: -1200 to +1400)."""
    if _OFFSET.fullmatch(text) and int(text[3:]) < 60:
        minutes = int(text[1:3]) * 60 + int(text[3:])
        if minutes <= (720 if text[0] == "-" else 840):
            return text
    raise InvalidQuery(f"{what} {text!r} is not a UTC offset from -1200 to +1400")


def _instant(text: str, upper: bool, timezone: str | None) -> str:
    """A DT value as a UTC text comparable with dicom_dt_utc() (migration 021): the start of
    the period it names, or its end (upper: "2020" ends at 20201231235959.999999); in its own
    offset, else the query's TimezoneOffsetFromUTC, else UTC."""
    digits, fraction, offset = _DT_PARTS.fullmatch(text).groups()  # type: ignore[union-attr]
    fields = [int(digits[0:4])] + [int(digits[i : i + 2]) for i in range(4, len(digits), 2)]
    micro = int(fraction[1:].ljust(6, "9" if upper else "0")) if fraction else 0
    try:
        start = datetime(*fields, *[1, 1][: max(0, 3 - len(fields))], microsecond=micro)
        if upper and not fraction:
            start = _period_end(start, len(fields))
    except (ValueError, OverflowError):
        raise InvalidQuery(f"date-time {text!r} is not valid") from None
    zone = _offset(offset, "offset") if offset else timezone
    if zone:
        sign = -1 if zone[0] == "-" else 1
        start -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[3:]))
    return start.strftime("%Y%m%d%H%M%S.%f")


def _period_end(start: datetime, precision: int) -> datetime:
    """The last microsecond of the year, month, day, hour, minute or second start begins."""
    if precision == 1:
        return start.replace(month=12, day=31, hour=23, minute=59, second=59, microsecond=999999)
    if precision == 2:
        last = calendar.monthrange(start.year, start.month)[1]
        return start.replace(day=last, hour=23, minute=59, second=59, microsecond=999999)
    unit = (timedelta(days=1), timedelta(hours=1), timedelta(minutes=1), timedelta(seconds=1))
    return start + unit[precision - 3] - timedelta(microseconds=1)


# PS3.3 C.12.1.1.8: an instance's Timezone Offset From UTC is the offset of its DT values that
# have none of their own.
_STORED_OFFSET = "{m} -> '00080201' -> 'Value' ->> 0"


def _datetime(expr: str, value: str, timezone: str | None) -> Condition:
    """DT single value or range matching (PS3.4 C.2.2.2.5) on instants, over `{m}`: stored
    values and query values are both brought to UTC, each by its own offset, else (stored) the
    instance's TimezoneOffsetFromUTC or (query) the query's, else taken as UTC; so
    `20200101120000+0100` matches `20200101110000+0000`. A value that reads both as one
    date-time with an offset and as a range is the former."""
    utc = f"dicom_dt_utc({expr}, {_STORED_OFFSET})"
    if _DATETIME.fullmatch(value):
        return f"{utc} BETWEEN %s AND %s", [
            _instant(value, False, timezone),
            _instant(value, True, timezone),
        ]
    m = _DATETIME_RANGE.fullmatch(value)
    if m is None or not (m[1] or m[2]):
        raise InvalidQuery(f"datetime {value!r} is not a valid value or range")
    conds, args = [], []
    for bound, upper, op in ((m[1], False, ">="), (m[2], True, "<=")):
        if bound:
            conds.append(f"{utc} {op} %s")
            args.append(_instant(bound, upper, timezone))
    return " AND ".join(conds), args


def _uids(value: str) -> list[str]:
    """The UIDs of a UID list matching value (PS3.18 8.3.4.1: comma-separated; PS3.4 C.2.2.2.2:
    backslash-separated), each checked against PS3.5 9.1."""
    uids = [u for u in re.split(r"[,\\]", value) if u]
    for uid in uids:
        if len(uid) > 64 or not _UID.match(uid):
            raise InvalidQuery(f"{uid!r} is not a UID (PS3.5 9.1)")
    return uids


def _fold(expr: str) -> str:
    """SQL folding a name for fuzzy matching: lower case, accents removed (unaccent)."""
    return f"lower(unaccent({expr}))"


def _fuzzy_pn(expr: str, value: str) -> tuple[str, list[object]]:
    """Fuzzy person name matching (PS3.18 8.3.4.2), Carina's definition: case- and
    accent-insensitive, and each word of the value (split at `^`, `=`, spaces, commas) is the
    start of some word of the name, in any order; with wildcards, the whole value is a
    case- and accent-insensitive wildcard pattern."""
    if "*" in value or "?" in value:
        return f"{_fold(expr)} LIKE {_fold('%s')}", [_like(value)]
    words = [w for w in re.split(r"[\^= ,]+", value) if w]
    conds = [
        f"EXISTS (SELECT 1 FROM regexp_split_to_table({_fold(expr)}, '[\\^= ,-]+') w"
        f" WHERE starts_with(w, {_fold('%s')}))"
        for _ in words
    ]
    return " AND ".join(conds) or "TRUE", list(words)


Condition = tuple[str, list[object]]


def _extended(
    q: Query, value: str, one: Callable[[str], Condition | None], empty: Condition
) -> Condition | None:
    """The condition of one matching value with the query's extended matching (PS3.18
    8.3.4.1): with multiplevaluematching=true each backslash-separated value is an alternative
    (PS3.4 C.2.2.2.1: any of them may match); with emptyvaluematching=true an entity whose
    attribute is empty or absent (`empty`) matches too, and the value `""` matches only such
    entities. one(value) is the plain condition of a value, None for universal matching."""
    if q.empty_values and value == EMPTY_VALUE:
        return empty
    alternatives = [value]
    if q.multiple_values and "\\" in value:
        alternatives = [v for v in value.split("\\") if v] or [value]
    conds = [one(v) for v in alternatives]
    if any(c is None for c in conds):
        return None
    found = [c for c in conds if c is not None]
    if q.empty_values:
        found.append(empty)
    if len(found) == 1:
        return found[0]
    return "(" + " OR ".join(f"({sql})" for sql, _ in found) + ")", [
        a for _, args in found for a in args
    ]


def _matching(q: Query, keyword: str, value: str) -> Condition | None:
    """SQL for one matching value of an indexed attribute, extended matching included."""
    column, kind = _KEYS[keyword]
    if kind == "modalities":
        empty = (
            "NOT EXISTS (SELECT 1 FROM series m WHERE m.study_uid = s.study_uid"
            " AND m.state = %s AND coalesce(m.modality, '') <> '')",
            [PUBLISHED],
        )
    else:
        empty = (f"({column} IS NULL OR {column}::text = '')", [])
    return _extended(q, value, lambda v: _condition(keyword, v, q.fuzzy), empty)


def _meta_matching(q: Query, key: MetaKey, value: str) -> Condition | None:
    """SQL over `{m}` for one matching value of a metadata key, extended matching included:
    empty is no value at the key's path (absent, or present without a value)."""
    values = "$" + "".join(f'."{tag}".Value[*]' for tag in key.path)
    empty = ("NOT jsonb_path_exists({m}, %s::jsonpath)", [values])
    return _extended(q, value, lambda v: _meta_condition(key, v, q.fuzzy, q.timezone), empty)


def _condition(keyword: str, value: str, fuzzy: bool) -> tuple[str, list[object]] | None:
    """SQL for one attribute's matching value; None for universal matching."""
    column, kind = _KEYS[keyword]
    if value == "" or value == "*":
        return None  # PS3.4 C.2.2.2.3: universal matching
    if kind == "uid":
        return f"{column} = ANY(%s)", [_uids(value)]
    if kind == "date":
        return _range(column, value, _DATE, "date")
    if kind == "time":
        return _range(column, value, _TIME, "time")
    if kind == "int":
        try:
            return f"{column} = %s", [int(value)]
        except ValueError as e:
            raise InvalidQuery(f"{keyword} must be an integer, not {value!r}") from e
    if kind == "modalities":
        # Any of the listed modalities. A CS value never holds a comma, so a comma separates
        # values as a backslash does: OHIF's study list sends its modality filter (an array)
        # through encodeURIComponent, which joins it with commas ("CT,MR").
        mods = [m for m in re.split(r"[,\\]", value) if m]
        return (
            "EXISTS (SELECT 1 FROM series m WHERE m.study_uid = s.study_uid"
            " AND m.state = %s AND m.modality = ANY(%s))",
            [PUBLISHED, mods],
        )
    if kind == "pn":
        return _pn(column, value, fuzzy)
    if "*" in value or "?" in value:
        return f"{column} LIKE %s", [_like(value)]
    return f"{column} = %s", [value]


def _pn(expr: str, value: str, fuzzy: bool) -> tuple[str, list[object]]:
    """Person name matching: fuzzy when asked, else case-insensitive (as Orthanc, dcm4chee)."""
    if fuzzy:
        return _fuzzy_pn(expr, value)
    if "*" in value or "?" in value:
        return f"upper({expr}) LIKE upper(%s)", [_like(value)]
    return f"upper({expr}) = upper(%s)", [value]


def _contains(path: tuple[str, ...], leaf: object) -> str:
    """The DICOM JSON fragment a metadata document contains when the attribute at path (inside
    items of the sequences before it) has leaf among its values."""
    doc: object = leaf
    for tag in reversed(path):
        doc = {tag: {"Value": [doc]}}
    return json.dumps(doc)


def _number(key: MetaKey, value: str) -> int | float:
    try:
        n = int(value) if key.vr in ("IS", "SL", "SS", "SV", "UL", "US", "UV") else float(value)
    except ValueError as e:
        raise InvalidQuery(f"{key.name} ({key.vr}) must be a number, not {value!r}") from e
    if not math.isfinite(n):  # JSON has no NaN or infinity
        raise InvalidQuery(f"{key.name} ({key.vr}) must be a finite number, not {value!r}")
    return n


def _meta_condition(
    key: MetaKey, value: str, fuzzy: bool, timezone: str | None = None
) -> Condition | None:
    """SQL over `{m}` (an instance's metadata) for one matching value of a key not held in a
    column; None for universal matching. Exact values (and UID lists) are containment, which
    the GIN index answers; wildcards, ranges and person names look at each value in turn.
    Either way a multi-valued attribute matches when any of its values does, and a key inside
    a sequence when any item matches (PS3.4 C.2.2.2.6)."""
    if value == "" or value == "*":
        return None
    if key.vr == "SQ":
        raise InvalidQuery(f"{key.name} is a sequence: match on an attribute of its items")
    if key.vr == "UI":
        docs = [_contains(key.path, u) for u in _uids(value)]
        return "(" + " OR ".join(["{m} @> %s::jsonb"] * len(docs)) + ")", list(docs)
    if key.vr in _NUMBER_VRS:
        return "{m} @> %s::jsonb", [_contains(key.path, _number(key, value))]
    path = "$" + "".join(f'."{tag}".Value[*]' for tag in key.path)
    if key.vr == "PN":
        cond, args = _pn("v.x", value, fuzzy)
        path += ".Alphabetic"
    elif key.vr == "DT":
        cond, args = _datetime("v.x", value, timezone)
    elif key.vr in ("DA", "TM"):
        pattern, what = (_DATE, "date") if key.vr == "DA" else (_TIME, "time")
        cond, args = _range("v.x", value, pattern, what)
    elif "*" in value or "?" in value:
        cond, args = "v.x LIKE %s", [_like(value)]
    else:
        return "{m} @> %s::jsonb", [_contains(key.path, value)]
    return (
        "EXISTS (SELECT 1 FROM jsonb_path_query({m}, %s::jsonpath) j,"
        f" LATERAL (SELECT j #>> '{{}}' AS x) v WHERE {cond})",
        [path, *args],
    )


# Where the instances of a study or series are, for keys matched on their metadata; only
# published series count, so nothing held back can make a study match.
_META_SCOPE = {
    "study": "r.study_uid = s.study_uid",
    "series": "r.series_uid = se.series_uid",
}


def _where(q: Query) -> tuple[list[str], list[object]]:
    conds: list[str] = []
    args: list[object] = []
    if q.study is not None:
        conds.append("s.study_uid = %s")
        args.append(q.study)
    if q.series is not None:
        conds.append("se.series_uid = %s")
        args.append(q.series)
    if q.scope.collections is not None:
        conds.append("s.collection = ANY(%s)")
        args.append(list(q.scope.collections))
    if q.scope.share is not None:
        # Through a share's root: studies and series holding a member, member instances.
        key = {"study": "s.study_uid", "series": "se.series_uid", "instance": "i.sop_uid"}
        column = {"study": "si.study_uid", "series": "si.series_uid", "instance": "si.sop_uid"}
        conds.append(
            "EXISTS (SELECT 1 FROM share_instances si WHERE si.share_id = %s"
            f" AND si.version = %s AND {column[q.level]} = {key[q.level]})"
        )
        args.extend(q.scope.share)
    for keyword, values in q.matches:
        for value in values:
            c = _matching(q, keyword, value)
            if c is not None:
                conds.append(c[0])
                args.extend(c[1])
    meta: list[str] = []
    column = "i.metadata" if q.level == "instance" else "r.metadata"
    for key, values in q.meta_matches:
        for value in values:
            c = _meta_matching(q, key, value)
            if c is not None:
                meta.append(c[0].replace("{m}", column))
                args.extend(c[1])
    if meta and q.level == "instance":
        conds.extend(meta)
    elif meta:
        conds.append(
            "EXISTS (SELECT 1 FROM instances r JOIN series x ON x.series_uid = r.series_uid"
            f" WHERE {_META_SCOPE[q.level]} AND " + " AND ".join(meta) + " AND x.state = %s)"
        )
        args.append(PUBLISHED)
    return conds, args


def _element(vr: str, *values: object) -> dict:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


# Each level picks one page of keys first (in an order an index can produce, so no sort of
# the whole table and no per-row work for rows that `offset` skips), then joins what the page
# needs: level attributes, counts, modalities, and a representative instance for includefield.
_PAGE = {
    "study": (
        "SELECT s.study_uid FROM studies s JOIN patients p ON p.pk = s.patient_pk"
        " WHERE EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid"
        " AND x.state = %s)",
        " ORDER BY s.study_date DESC, s.study_time DESC, s.study_uid DESC",
    ),
    "series": (
        "SELECT se.series_uid FROM series se JOIN studies s ON s.study_uid = se.study_uid"
        " JOIN patients p ON p.pk = s.patient_pk WHERE se.state = %s",
        " ORDER BY se.study_uid, se.series_number, se.series_uid",
    ),
    "instance": (
        "SELECT i.sop_uid FROM instances i JOIN series se ON se.series_uid = i.series_uid"
        " JOIN studies s ON s.study_uid = i.study_uid JOIN patients p ON p.pk = s.patient_pk"
        " WHERE se.state = %s",
        " ORDER BY i.series_uid, i.instance_number, i.sop_uid",
    ),
}


def _representative(q: Query) -> tuple[str, list[object]]:
    """SQL (and parameters) of one instance's metadata, the source of includefield values at
    the study and series levels: a published instance the scope holds (through a share's
    root a member, so attributes of instances outside it are not shown)."""
    if q.level == "instance" or not (q.include_all or q.include):
        return "NULL", []
    member, member_args = q.scope.member("r.sop_uid")
    if q.level == "series":
        return (
            "(SELECT r.metadata::text FROM instances r"
            f" WHERE r.series_uid = se.series_uid AND {member} LIMIT 1)",
            member_args,
        )
    return (
        "(SELECT r.metadata::text FROM instances r JOIN series rs ON rs.series_uid = r.series_uid"
        f" WHERE r.study_uid = s.study_uid AND rs.state = %s AND {member} LIMIT 1)",
        [PUBLISHED, *member_args],
    )


def _page_sql(q: Query, conds: list[str]) -> str:
    where, order = _PAGE[q.level]
    if conds:
        where += " AND " + " AND ".join(conds)
    return f"{where}{order} LIMIT %s OFFSET %s"


def search(pool: ConnectionPool, q: Query, base_url: str) -> Result:
    """Run a parsed query; each item is a DICOM JSON object (PS3.18 F.2)."""
    conds, args = _where(q)
    page = _page_sql(q, conds)
    rep, rep_args = _representative(q)
    # Parameters in the order their placeholders appear: representative, page, counts.
    params: list[object] = [*rep_args, PUBLISHED, *args, q.limit + 1, q.offset]
    # Counts take only what the scope holds (through a share's root: its member instances).
    member, member_args = q.scope.member("i.sop_uid")
    if q.level == "study":
        sql = (
            "SELECT s.study_uid, NULL, NULL, p.attrs::text, s.attrs::text, NULL, NULL,"
            f" agg.modalities, agg.n_series, agg.n_instances, {rep}"
            f" FROM ({page}) pg JOIN studies s ON s.study_uid = pg.study_uid"
            " JOIN patients p ON p.pk = s.patient_pk"
            " CROSS JOIN LATERAL (SELECT"
            "   array_agg(DISTINCT x.modality ORDER BY x.modality)"
            "     FILTER (WHERE x.modality IS NOT NULL) AS modalities,"
            "   count(*) AS n_series, coalesce(sum(x.n), 0)::bigint AS n_instances"
            "   FROM (SELECT sx.modality, (SELECT count(*) FROM instances i"
            f"     WHERE i.series_uid = sx.series_uid AND {member}) AS n"
            "     FROM series sx WHERE sx.study_uid = s.study_uid AND sx.state = %s) x"
            "   WHERE x.n > 0) agg" + _PAGE["study"][1]
        )
        params += [*member_args, PUBLISHED]
    elif q.level == "series":
        sql = (
            "SELECT se.study_uid, se.series_uid, NULL, p.attrs::text, s.attrs::text,"
            " se.attrs::text, NULL, NULL, NULL,"
            " (SELECT count(*) FROM instances i"
            f" WHERE i.series_uid = se.series_uid AND {member}),"
            f" {rep} FROM ({page}) pg JOIN series se ON se.series_uid = pg.series_uid"
            " JOIN studies s ON s.study_uid = se.study_uid"
            " JOIN patients p ON p.pk = s.patient_pk" + _PAGE["series"][1]
        )
        params = [*member_args, *params]  # the instance count comes first at this level
    else:
        sql = (
            "SELECT i.study_uid, i.series_uid, i.sop_uid, p.attrs::text, s.attrs::text,"
            " se.attrs::text, i.metadata::text, NULL, NULL, NULL, NULL"
            f" FROM ({page}) pg JOIN instances i ON i.sop_uid = pg.sop_uid"
            " JOIN series se ON se.series_uid = i.series_uid"
            " JOIN studies s ON s.study_uid = i.study_uid"
            " JOIN patients p ON p.pk = s.patient_pk" + _PAGE["instance"][1]
        )
    with pool.connection() as conn:
        rows = conn.execute(sql, params).fetchall()
    more = len(rows) > q.limit
    items = [_item(q, row, base_url) for row in rows[: q.limit]]
    return Result(items, more, q.warnings)


def _item(q: Query, row: tuple, base_url: str) -> dict:
    (
        study,
        series,
        sop,
        p_attrs,
        s_attrs,
        se_attrs,
        metadata,
        modalities,
        n_series,
        n_inst,
        rep,
    ) = row
    out: dict = {}
    # PS3.18 Table 10.6.1-5..7: higher levels are returned when not fixed by the path.
    if q.level == "study" or q.study is None:
        out.update(json.loads(p_attrs))
        out.update(json.loads(s_attrs))
    if q.level == "series" or (q.level == "instance" and q.series is None):
        out.update(json.loads(se_attrs))
    if q.level == "study":
        out["00080061"] = _element("CS", *(modalities or []))
        out["00201206"] = _element("IS", n_series)
        out["00201208"] = _element("IS", n_inst)
        out["00081190"] = _element("UR", f"{base_url}/studies/{study}")
    elif q.level == "series":
        out["00201209"] = _element("IS", n_inst)
        out["00081190"] = _element("UR", f"{base_url}/studies/{study}/series/{series}")
    else:
        full = json.loads(metadata)
        out.update({k: v for k, v in full.items() if k in INSTANCE_TAGS})
        if q.series is None:
            out.update({k: v for k, v in full.items() if k in SERIES_TAGS and k not in out})
        out["00081190"] = _element(
            "UR", f"{base_url}/studies/{study}/series/{series}/instances/{sop}"
        )
        rep = metadata
    out["00080056"] = _element("CS", "ONLINE")
    if rep is not None:
        extra = json.loads(rep)
        if q.include_all:
            for k, v in extra.items():
                out.setdefault(k, v)
        else:
            for k in q.include:
                if k in extra:
                    out.setdefault(k, extra[k])
    return dict(sorted(out.items()))
