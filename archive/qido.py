"""QIDO-RS matching (PS3.18 8.3.4, PS3.4 C.2.2.2) turned into SQL over the index."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from psycopg_pool import ConnectionPool
from pydicom.datadict import keyword_for_tag, tag_for_keyword

from .errors import InvalidQuery
from .index import INSTANCE_TAGS, PUBLISHED, SERIES_TAGS

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
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}


@dataclass
class Query:
    """A parsed QIDO-RS request."""

    level: Level
    study: str | None = None
    series: str | None = None
    #: the collections searched (None: all); callers pass those the requester may read
    collections: list[str] | None = None
    matches: list[tuple[str, list[str]]] = field(default_factory=list)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
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


def _int_param(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError as e:
        raise InvalidQuery(f"{name} must be a non-negative integer, not {value!r}") from e
    if n < 0:
        raise InvalidQuery(f"{name} must be a non-negative integer, not {value!r}")
    return n


def parse_query(
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    study: str | None = None,
    series: str | None = None,
    collections: list[str] | None = None,
) -> Query:
    """Parse query parameters; unknown attributes and malformed values raise InvalidQuery."""
    q = Query(level=level, study=study, series=series, collections=collections)
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        if name in _CONTROL:
            if name == "includefield":
                for f in value.split(","):
                    f = f.strip()
                    if f == "all":
                        q.include_all = True
                    elif f:
                        q.include.add(_tag_key(f)[1])
            elif name == "limit":
                q.limit = _int_param(name, value)
                if q.limit > MAX_LIMIT:
                    q.warnings.append(f"limit reduced to {MAX_LIMIT}")
                    q.limit = MAX_LIMIT
            elif name == "offset":
                q.offset = _int_param(name, value)
            elif name == "fuzzymatching" and value.lower() == "true":
                q.warnings.append(
                    "The fuzzymatching parameter is not supported. "
                    "Only literal matching has been performed."
                )
            continue
        if "." in name:
            q.warnings.append(f"sequence matching on {name} is not supported; ignored")
            continue
        keyword, tag = _tag_key(name)
        q.include.add(tag)
        grouped.setdefault(keyword, []).append(value)
    for keyword, values in grouped.items():
        if keyword not in _KEYS:
            q.warnings.append(f"matching on {keyword} is not supported; ignored")
            continue
        if level == "study" and keyword in SERIES_KEYS | INSTANCE_KEYS:
            raise InvalidQuery(f"{keyword} is not a study-level attribute")
        if level == "series" and keyword in INSTANCE_KEYS:
            raise InvalidQuery(f"{keyword} is not a series-level attribute")
        q.matches.append((keyword, values))
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


def _condition(keyword: str, value: str) -> tuple[str, list[object]] | None:
    """SQL for one attribute's matching value; None for universal matching."""
    column, kind = _KEYS[keyword]
    if value == "" or value == "*":
        return None  # PS3.4 C.2.2.2.3: universal matching
    if kind == "uid":
        uids = [u for u in re.split(r"[,\\]", value) if u]
        return f"{column} = ANY(%s)", [uids]
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
    wild = "*" in value or "?" in value
    if kind == "pn":
        # PN matching is case-insensitive here, as in Orthanc and dcm4chee.
        if wild:
            return f"upper({column}) LIKE upper(%s)", [_like(value)]
        return f"upper({column}) = upper(%s)", [value]
    if wild:
        return f"{column} LIKE %s", [_like(value)]
    return f"{column} = %s", [value]


def _where(q: Query) -> tuple[list[str], list[object]]:
    conds: list[str] = []
    args: list[object] = []
    if q.study is not None:
        conds.append("s.study_uid = %s")
        args.append(q.study)
    if q.series is not None:
        conds.append("se.series_uid = %s")
        args.append(q.series)
    if q.collections is not None:
        conds.append("s.collection = ANY(%s)")
        args.append(q.collections)
    for keyword, values in q.matches:
        for value in values:
            c = _condition(keyword, value)
            if c is not None:
                conds.append(c[0])
                args.extend(c[1])
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
_REP = {
    "study": "(SELECT r.metadata::text FROM instances r WHERE r.study_uid = s.study_uid LIMIT 1)",
    "series": "(SELECT r.metadata::text FROM instances r WHERE r.series_uid = se.series_uid"
    " LIMIT 1)",
    "instance": "NULL",
}


def _page_sql(q: Query, conds: list[str]) -> str:
    where, order = _PAGE[q.level]
    if conds:
        where += " AND " + " AND ".join(conds)
    return f"{where}{order} LIMIT %s OFFSET %s"


def search(pool: ConnectionPool, q: Query, base_url: str) -> Result:
    """Run a parsed query; each item is a DICOM JSON object (PS3.18 F.2)."""
    conds, args = _where(q)
    page = _page_sql(q, conds)
    rep = _REP[q.level] if (q.include_all or q.include) else "NULL"
    params: list[object] = [PUBLISHED, *args, q.limit + 1, q.offset]
    if q.level == "study":
        sql = (
            "SELECT s.study_uid, NULL, NULL, p.attrs::text, s.attrs::text, NULL, NULL,"
            f" agg.modalities, agg.n_series, agg.n_instances, {rep}"
            f" FROM ({page}) pg JOIN studies s ON s.study_uid = pg.study_uid"
            " JOIN patients p ON p.pk = s.patient_pk"
            " CROSS JOIN LATERAL (SELECT"
            "   array_agg(DISTINCT x.modality ORDER BY x.modality)"
            "     FILTER (WHERE x.modality IS NOT NULL) AS modalities,"
            "   count(*) AS n_series,"
            "   coalesce(sum((SELECT count(*) FROM instances i"
            "     WHERE i.series_uid = x.series_uid)), 0)::bigint AS n_instances"
            "   FROM series x WHERE x.study_uid = s.study_uid AND x.state = %s) agg"
            + _PAGE["study"][1]
        )
        params.append(PUBLISHED)
    elif q.level == "series":
        sql = (
            "SELECT se.study_uid, se.series_uid, NULL, p.attrs::text, s.attrs::text,"
            " se.attrs::text, NULL, NULL, NULL,"
            " (SELECT count(*) FROM instances i WHERE i.series_uid = se.series_uid),"
            f" {rep} FROM ({page}) pg JOIN series se ON se.series_uid = pg.series_uid"
            " JOIN studies s ON s.study_uid = se.study_uid"
            " JOIN patients p ON p.pk = s.patient_pk" + _PAGE["series"][1]
        )
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
