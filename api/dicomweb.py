"""DICOMweb routes (PS3.18): STOW-RS, QIDO-RS and WADO-RS under one root."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Hashable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool

from carina.archive import index, qido, retrieve, transcode
from carina.archive.storage import ObjectStore
from carina.curation.intake import CANNOT_UNDERSTAND, BatchResult, InstanceRecord, Refusal

from . import auth, submissions
from .conditional import not_modified, validators
from .context import base_url, runtime, statements
from .dicomxml import DICOM_XML, native_xml
from .errors import http_error
from .multipart import (
    Fill,
    Loaded,
    MultipartError,
    PartLoader,
    PartReader,
    body_length,
    closing,
    negotiate,
    new_boundary,
    parse_media_type,
    part_head,
    write_parts,
)
from .stow_json import COMPRESSED, JSON_METADATA, XML_METADATA, MetadataAndBulkData

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Objects up to this size are read whole and sent in one write; larger ones are streamed.
WHOLE_OBJECT_MAX = 16 << 20
# STOW-RS metadata and bulk data requests (PS3.18 10.5.1.2), by the type of the body.
METADATA_FORMS = {DICOM_JSON: JSON_METADATA, DICOM_XML: XML_METADATA}
# Private block used to say, in words, why a part was refused (next to the FailureReason code).
_CREATOR = {"vr": "LO", "Value": ["CARINA"]}


def _accepts(request: Request, *types: str) -> bool:
    """Whether the Accept header admits one of types (a missing header admits anything)."""
    header = request.headers.get("accept")
    if not header:
        return True
    for item in header.split(","):
        mtype, _ = parse_media_type(item.strip())
        if mtype in ("*/*", "application/*") or mtype in types:
            return True
    return False


def _dicom_accept(request: Request) -> list[str]:
    """Negotiate multipart/related; type=application/dicom (PS3.18 8.7.3.5): the acceptable
    transfer syntaxes ("*" for as stored), highest q-value first, in header order among equals;
    empty when no Accept item admits DICOM instances."""

    def syntax(mtype: str, params: dict[str, str]) -> str | None:
        if mtype in ("*/*", "multipart/*"):
            return transcode.DEFAULT
        if mtype == "multipart/related" and params.get("type", DICOM).lower() == DICOM:
            # PS3.18 8.7.8.2: no transfer-syntax parameter selects the default syntax, Explicit
            # VR Little Endian (8.7.3.4); "*" asks for the stored form, never decoded.
            return params.get("transfer-syntax", transcode.DEFAULT).strip()
        return None

    return negotiate(request.headers.get("accept"), syntax)


def router(prefix: str) -> APIRouter:
    """The DICOMweb routes of one root (e.g. /dicomweb)."""
    r = APIRouter(prefix=prefix)

    # ---------------------------------------------------------------------- WADO-RS frames
    # First: routes are matched in order, and a viewer asks for frames one by one, so each
    # step saved counts. On the event loop, path parameters read as they are (checked by
    # paths.check_path).
    @r.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
    async def retrieve_frames(request: Request) -> Response:
        p = request.path_params
        return await _frames(request, p["study"], p["series"], p["sop"], p["frames"])

    # ---------------------------------------------------------------------- STOW-RS (10.5)
    @r.post("/studies")
    async def store_instances(request: Request) -> Response:
        return await _stow(request, None)

    @r.post("/studies/{study}")
    async def store_study_instances(request: Request, study: str) -> Response:
        return await _stow(request, study)

    # ---------------------------------------------------------------------- QIDO-RS (10.6)
    @r.get("/studies")
    def search_studies(request: Request) -> Response:
        return _search(request, "study")

    @r.get("/series")
    def search_series(request: Request) -> Response:
        return _search(request, "series")

    @r.get("/instances")
    def search_instances(request: Request) -> Response:
        return _search(request, "instance")

    @r.get("/studies/{study}/series")
    def search_study_series(request: Request, study: str) -> Response:
        return _search(request, "series", study=study)

    @r.get("/studies/{study}/instances")
    def search_study_instances(request: Request, study: str) -> Response:
        return _search(request, "instance", study=study)

    @r.get("/studies/{study}/series/{series}/instances")
    def search_series_instances(request: Request, study: str, series: str) -> Response:
        return _search(request, "instance", study=study, series=series)

    # ---------------------------------------------------------------------- WADO-RS (10.4)
    @r.get("/studies/{study}")
    def retrieve_study(request: Request, study: str) -> Response:
        return _retrieve(request, study)

    @r.get("/studies/{study}/series/{series}")
    def retrieve_series(request: Request, study: str, series: str) -> Response:
        return _retrieve(request, study, series)

    @r.get("/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
        return _retrieve(request, study, series, sop)

    @r.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}")
    def retrieve_bulk_data(
        request: Request, study: str, series: str, sop: str, tag: str
    ) -> Response:
        return _bulk_data(request, study, series, sop, tag)

    @r.get("/studies/{study}/metadata")
    def study_metadata(request: Request, study: str) -> Response:
        return _metadata(request, study)

    @r.get("/studies/{study}/series/{series}/metadata")
    def series_metadata(request: Request, study: str, series: str) -> Response:
        return _metadata(request, study, series)

    @r.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
    def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
        return _metadata(request, study, series, sop)

    return r


# ------------------------------------------------------------------------------- STOW-RS


async def _stow(request: Request, study: str | None) -> Response:
    mtype, params = parse_media_type(request.headers.get("content-type"))
    if mtype != "multipart/related":
        return http_error(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    part_type = params.get("type", DICOM).lower()
    if part_type not in (DICOM, DICOM_JSON, DICOM_XML):
        return http_error(415, f"parts of type {part_type} are not supported; use {DICOM}")
    boundary = params.get("boundary")
    if not boundary:
        return http_error(400, "multipart/related without a boundary parameter")

    intake = runtime(request).intake
    started = datetime.now(UTC)
    collection = auth.store_collection(request)
    ctx = intake.context(collection, expected_study=study)
    if part_type in METADATA_FORMS:
        form = METADATA_FORMS[part_type]
        body = MetadataAndBulkData(boundary, intake.sink, str(request.url), form)
        result = await intake.ingest(body.payloads(request.stream()), ctx)
        await submissions.record_stow(request, collection, started, result)
        if body.unreadable:
            return http_error(400, body.unreadable)
        return _stow_response(result, base_url(request), _warnings(request))
    reader = PartReader(
        boundary,
        intake.sink,
        accept=lambda ctype: parse_media_type(ctype)[0] in ("", DICOM),
    )
    seen = 0
    malformed: str | None = None

    async def payloads() -> AsyncIterator[bytes | str | Refusal]:
        nonlocal seen, malformed
        try:
            async for ctype, sink in reader.parts(request.stream()):
                seen += 1
                if sink is None:
                    yield Refusal(CANNOT_UNDERSTAND, f"part of type {ctype!r} is not {DICOM}")
                else:
                    yield sink.finish()  # type: ignore[attr-defined]
        except MultipartError as e:
            malformed = f"malformed multipart body after part {seen}: {e}"
        if malformed is None and (not reader.ended or reader.open_part):
            malformed = f"multipart body ended without its closing boundary after part {seen}"
        if malformed is not None and seen:
            yield Refusal(CANNOT_UNDERSTAND, malformed)

    result = await intake.ingest(payloads(), ctx)
    await submissions.record_stow(request, collection, started, result)
    if not seen:
        return http_error(400, malformed or "multipart body has no parts")
    return _stow_response(result, base_url(request), _warnings(request))


def _warnings(request: Request) -> bool:
    return runtime(request).settings.coercion_warnings


def _stow_response(result: BatchResult, base: str, warnings: bool) -> Response:
    """PS3.18 Annex I Store Instances Response: 200 all stored, 202 some or with warnings
    (Table 10.5.3-1), 409 none; with warnings, what de-identification changed is each stored
    item's WarningReason."""
    body: dict[str, dict] = {}
    stored = result.stored
    studies = {r.study_uid for r in stored}
    body["00081190"] = (
        {"vr": "UR", "Value": [f"{base}/studies/{studies.pop()}"]}
        if len(studies) == 1
        else {"vr": "UR"}
    )
    refused = result.refused
    if refused:
        body["00081198"] = {"vr": "SQ", "Value": [_failed_item(f) for f in refused]}
    if stored:
        items = [_stored_item(r, base, warnings) for r in stored]
        body["00081199"] = {"vr": "SQ", "Value": items}
    warned = warnings and any(r.warning for r in stored)
    status = 200 if not refused and not warned else (409 if not stored else 202)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


def _uid(value: str) -> dict:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _stored_item(r: InstanceRecord, base: str, warnings: bool) -> dict:
    url = f"{base}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
    item = {
        "00081150": _uid(r.sop_class_uid),
        "00081155": _uid(r.sop_uid),
        "00081190": {"vr": "UR", "Value": [url]},
    }
    if warnings and r.warning:
        item["00081196"] = {"vr": "US", "Value": [r.warning]}
    return item


def _failed_item(f: Refusal) -> dict:
    return {
        "00081150": _uid(f.sop_class_uid),
        "00081155": _uid(f.sop_uid),
        "00081197": {"vr": "US", "Value": [f.code]},
        "00090010": _CREATOR,
        "00091001": {"vr": "LT", "Value": [f.reason]},
    }


# ------------------------------------------------------------------------------- QIDO-RS


def _search(
    request: Request,
    level: qido.Level,
    study: str | None = None,
    series: str | None = None,
) -> Response:
    xml = _wants_xml(request)
    if not xml and not _accepts(request, DICOM_JSON, "application/json"):
        return http_error(406, f"QIDO-RS answers in {DICOM_JSON} or {XML_PARTS}")
    query = qido.parse_query(
        level,
        request.query_params.multi_items(),
        study=study,
        series=series,
        scope=auth.read_scope(request),
    )
    result = qido.search(runtime(request).pool, query, base_url(request))
    auth.record_access(
        request,
        [study] if study and result.items else (i["0020000D"]["Value"][0] for i in result.items),
    )
    warnings = list(result.warnings)
    if result.more:
        warnings.append("There are additional results that can be requested")
    headers = {"Warning": ", ".join(f'299 carina: "{w}"' for w in warnings)} if warnings else {}
    if not result.items:
        return Response(status_code=204, headers=headers)
    if xml:
        return _xml_response(iter(result.items), headers)
    return JSONResponse(result.items, media_type=DICOM_JSON, headers=headers)


XML_PARTS = f'multipart/related; type="{DICOM_XML}"'


def _wants_xml(request: Request) -> bool:
    """Whether to answer in PS3.19 XML parts (PS3.18 8.7.3.2): the first Accept item Carina
    can answer asks for multipart/related; type="application/dicom+xml"."""
    for item in (request.headers.get("accept") or "").split(","):
        mtype, params = parse_media_type(item.strip())
        if mtype == "multipart/related" and params.get("type", "").lower() == DICOM_XML:
            return True
        if mtype in ("*/*", "application/*", DICOM_JSON, "application/json"):
            return False
    return False


def _xml_response(items: Iterator[dict], headers: dict[str, str]) -> Response:
    """One NativeDicomModel document per dataset, as multipart/related parts, streamed."""
    boundary = new_boundary()

    def body() -> Iterator[bytes]:
        for item in items:
            doc = native_xml(item)
            yield part_head(boundary, DICOM_XML, len(doc)) + doc + b"\r\n"
        yield closing(boundary)

    return StreamingResponse(
        body(), media_type=f"{XML_PARTS}; boundary={boundary}", headers=headers
    )


# ------------------------------------------------------------------------------- WADO-RS


def _retrieve(
    request: Request, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    rt = runtime(request)
    scope = auth.read_scope(request)
    objects = index.instance_objects(rt.pool, study, series, sop, scope)
    auth.record_access(request, [study])
    acceptable = _dicom_accept(request)
    if not acceptable:
        return http_error(406, f'instances are served as multipart/related; type="{DICOM}"')
    # Each instance's syntaxes to try, in the client's order; checked for every instance before
    # the response starts, from the stored syntax alone (no object is read for it).
    plans: list[_Plan] = []
    for key, stored, size in objects:
        choices = transcode.producible(stored, acceptable)
        if not choices:
            return http_error(406, _unavailable(stored, acceptable))
        plans.append((key, stored, size, choices))
    version = index.version(rt.pool, study, series, sop, scope)
    cache = validators(version, DICOM, *acceptable)
    unchanged = not_modified(request, cache)
    if unchanged is not None:
        return unchanged
    boundary = new_boundary()
    store = rt.store

    def loader(key: str, stored: str, size: int, choices: list[str]) -> PartLoader | Fill:
        if choices[0] == stored:  # as stored: no decoding
            if size <= WHOLE_OBJECT_MAX:
                return Fill(
                    partial(store.read_into, key),
                    partial(store.read_cached_into, key),
                    partial(store.map_cached, key, size),
                )
            return lambda: store.iter_chunks(key)

        def transcoded() -> Loaded:
            try:
                data, ts = transcode.transcode(store.read(key), stored, choices)
            except Exception as e:  # after the 200: the response is cut (documented)
                log.warning("transcoding failed (%s); response cut", type(e).__name__)
                raise
            return Loaded(f"{DICOM}; transfer-syntax={ts}", data, len(data))

        return transcoded

    parts = [
        (f"{DICOM}; transfer-syntax={stored}", size, loader(key, stored, size, choices))
        for key, stored, size, choices in plans
    ]
    if all(choices[0] == stored for _, stored, _, choices in plans):
        # Every part as stored, so the length is known: no chunked framing (and no copy of
        # each part to frame it) on either side.
        cache = {**cache, "Content-Length": str(body_length(boundary, parts))}
    return StreamingResponse(
        write_parts(boundary, parts),
        media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
        headers=cache,
    )


# (object key, stored transfer syntax, size, transfer syntaxes to try in order)
_Plan = tuple[str, str, int, list[str]]


def _unavailable(stored: str, acceptable: list[str]) -> str:
    """Why an instance stored in stored cannot be sent in any of acceptable, in one sentence."""
    asked = ", ".join(acceptable)
    if not transcode.can_decode(stored):
        return (
            f"an instance is stored as {_ts_name(stored)}, which cannot be decoded here, so it "
            f"can only be sent as stored; asked for: {asked}"
        )
    offered = ", ".join(_ts_name(ts) for ts in transcode.targets())
    return (
        f"an instance is stored as {_ts_name(stored)}; it can be sent as stored or transcoded "
        f"to {offered} (lossless only); asked for: {asked}"
    )


def _ts_name(ts: str) -> str:
    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


# Metadata rows are sent to the client in pieces of about this size (fewer, larger writes;
# and gzip flushes once per piece, not once per instance).
METADATA_PIECE = 64 << 10
_BULK_URI = re.compile(r'("BulkDataURI":\s*")bulkdata/')
_SERIES_UID = re.compile(r'"0020000E":\s*\{[^}]*"Value":\s*\["([^"]+)"')
_SOP_UID = re.compile(r'"00080018":\s*\{[^}]*"Value":\s*\["([^"]+)"')


def _metadata(
    request: Request, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    xml = _wants_xml(request)
    if not xml and not _accepts(request, DICOM_JSON, "application/json"):
        return http_error(406, f"metadata is served as {DICOM_JSON} or {XML_PARTS}")
    pool, scope = runtime(request).pool, auth.read_scope(request)
    base = f"{base_url(request)}/studies/{study}"
    # The BulkDataURIs in the body are absolute, so the root the request came through counts.
    media = XML_PARTS if xml else DICOM_JSON
    cache = validators(index.version(pool, study, series, sop, scope), media, base)
    unchanged = not_modified(request, cache)
    if unchanged is not None:
        return unchanged
    rows = index.iter_metadata(pool, study, series, sop, scope=scope)
    auth.record_access(request, [study])
    if xml:
        items = (json.loads(_absolute_bulk_uris(t, base, series, sop)) for t in rows)
        return _xml_response(items, cache)

    def body() -> Iterator[bytes]:
        piece: list[str] = ["["]
        size = 0
        for n, text in enumerate(rows):
            text = _absolute_bulk_uris(text, base, series, sop)
            piece.append(text if n == 0 else "," + text)
            size += len(text)
            if size >= METADATA_PIECE:
                yield "".join(piece).encode()
                piece, size = [], 0
        piece.append("]")
        yield "".join(piece).encode()

    return StreamingResponse(body(), media_type=DICOM_JSON, headers=cache)


def _absolute_bulk_uris(text: str, study_url: str, series: str | None, sop: str | None) -> str:
    """Make the index's instance-relative BulkDataURIs ("bulkdata/7FE00010") absolute: the
    standard's own examples (PS3.18 B.10) and clients (dicomweb-client, OHIF) expect a URI that
    resolves on its own, and a metadata document has no single instance URL to resolve against."""
    if "bulkdata/" not in text:
        return text
    series = series or _top_level_uid(text, "0020000E", _SERIES_UID)
    sop = sop or _top_level_uid(text, "00080018", _SOP_UID)
    if not series or not sop:
        return text
    instance = f"{study_url}/series/{series}/instances/{sop}/"
    return _BULK_URI.sub(lambda m: m.group(1) + instance + "bulkdata/", text)


def _top_level_uid(text: str, tag: str, pattern: re.Pattern[str]) -> str | None:
    """The UID of a top-level attribute of a DICOM JSON text: by regex when the tag occurs
    once, else (it also occurs in a sequence item, e.g. ReferencedSeriesSequence) by parsing."""
    if text.count(f'"{tag}"') == 1:
        m = pattern.search(text)
        return m.group(1) if m else None
    value = json.loads(text).get(tag, {}).get("Value") or [None]
    return value[0]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ WADO-RS frames, bulk data


def _octet_accept(request: Request) -> str | None:
    """Negotiate uncompressed bulk data (PS3.18 8.7.3.3.1, Table 8.7.3-4): "multipart" for
    multipart/related; type="application/octet-stream" (also */*, multipart/*, or a type of
    */*), "single" for a bare application/octet-stream, None when neither is acceptable."""
    header = request.headers.get("accept") or "*/*"
    single = False
    for item in header.split(","):
        mtype, params = parse_media_type(item.strip())
        if mtype in ("*/*", "multipart/*"):
            return "multipart"
        if mtype == "multipart/related":
            ptype = params.get("type", OCTET).lower()
            ts = params.get("transfer-syntax", "*")
            if ptype in (OCTET, "application/*", "*/*") and ts in ("*", EXPLICIT_LE):
                return "multipart"
        elif mtype in (OCTET, "application/*"):
            single = True
    return "single" if single else None


# Where the bytes of a frame come from.
_BY_RANGE = "range"  # native pixel data, read by offset
_AS_STORED = "stored"  # a compressed frame, as stored
_DECODED = "decoded"  # a compressed frame, decoded to native pixels
_ENCODED = "encoded"  # a frame (decoded if compressed) encoded in another compressed syntax


@dataclass(frozen=True)
class _FrameForm:
    """How frames are sent: the parts' Content-Type, multipart or a single bare body, and
    where the bytes come from."""

    ctype: str
    multipart: bool
    source: str
    syntax: str  # the transfer syntax of the bytes sent


def _frame_form(request: Request, stored: str) -> _FrameForm | None:
    """The first acceptable form of the frames of an instance stored in stored, highest q
    first (PS3.18 8.7.3.3): native pixels as application/octet-stream (Table 8.7.3-4), or
    compressed frames as stored, in their own media type (Table 8.7.3-5); None if none fits."""

    def form(mtype: str, params: dict[str, str]) -> _FrameForm | None:
        multipart = mtype in ("*/*", "multipart/*", "multipart/related")
        if mtype == "multipart/related":
            mtype = params.get("type", OCTET).lower()
        found = _frame_ctype(mtype, params.get("transfer-syntax"), stored)
        return None if found is None else _FrameForm(found[0], multipart, *found[1:])

    forms = negotiate(request.headers.get("accept"), form)
    return forms[0] if forms else None


def _frame_ctype(mtype: str, ts: str | None, stored: str) -> tuple[str, str, str] | None:
    """(part Content-Type, source, transfer syntax sent) for one Accept item, or None if it
    cannot be served."""
    native_ctype = f"{OCTET}; transfer-syntax={EXPLICIT_LE}"
    if stored in retrieve.NATIVE_LITTLE_ENDIAN:
        if mtype in (OCTET, "application/*", "*/*", "multipart/*") and ts in (
            None,
            "*",
            EXPLICIT_LE,
        ):
            return native_ctype, _BY_RANGE, EXPLICIT_LE
        return _frame_encoding(mtype, ts, stored)
    own = retrieve.FRAME_MEDIA_TYPES.get(stored)
    if own is not None and ts in (None, "*", stored):
        if mtype in (own, "image/*", "*/*", "multipart/*"):
            return f"{own}; transfer-syntax={stored}", _AS_STORED, stored
        if mtype in (OCTET, "application/*") and ts is not None:
            # transfer-syntax=* (or the stored one) on octet-stream asks for the frames as
            # stored, as OHIF does; the parameter then names what the bytes are.
            return f"{OCTET}; transfer-syntax={stored}", _AS_STORED, stored
    decodable = own is not None and transcode.can_decode(stored)
    if decodable and mtype in (OCTET, "application/*") and ts in (None, EXPLICIT_LE):
        return native_ctype, _DECODED, EXPLICIT_LE
    return _frame_encoding(mtype, ts, stored) if decodable else None


def _frame_encoding(mtype: str, ts: str | None, stored: str) -> tuple[str, str, str] | None:
    """Frames re-encoded in a compressed media type the instance is not stored in (PS3.18
    8.7.3.3.2): in the transfer-syntax asked for, or with none (or "*") the media type's
    default (Table 8.7.3-5); only the lossless syntaxes an encoder is installed for."""
    target = COMPRESSED.get(mtype) if ts in (None, "*") else ts
    if target is None or target == stored or retrieve.FRAME_MEDIA_TYPES.get(target) != mtype:
        return None
    if target not in transcode.targets():
        return None
    return f"{mtype}; transfer-syntax={target}", _ENCODED, target


async def _frames(request: Request, study: str, series: str, sop: str, frame_list: str) -> Response:
    """Retrieve Frames (PS3.18 10.4, Frames resource): native frames as octet-streams,
    compressed ones as stored. Native frames already in memory are answered on the event
    loop; the rest is read and decoded in a worker thread."""
    try:
        numbers = retrieve.parse_frame_list(frame_list)
    except retrieve.InvalidRequest as e:
        return http_error(400, str(e))
    store = runtime(request).store
    scope = await auth.read_scope_async(request)
    # Audited as it is looked up (one statement): also a read answered 304 or refused 406.
    key, syntax, size, version, geometry = await index.instance_object_async(
        statements(request), study, series, sop, scope, auth.access_of(request)
    )
    form = _frame_form(request, syntax)
    if form is None:
        return http_error(406, _frames_unavailable(syntax))
    if not form.multipart and len(numbers) > 1:
        return http_error(406, "several frames need a multipart/related response")
    cache = validators(version, request.url.path, form.ctype, str(form.multipart))
    if (unchanged := not_modified(request, cache)) is not None:
        return unchanged
    if form.source != _BY_RANGE:
        return await run_in_threadpool(_coded_frames, store, key, numbers, form, cache)
    native = (store, key, syntax, size, (key, version.digest), geometry, numbers, form, cache)
    try:
        return _native_frames(*native, nowait=True)
    except retrieve.WouldBlock:
        return await run_in_threadpool(_native_frames, *native)


def _native_frames(
    store: ObjectStore,
    key: str,
    syntax: str,
    size: int,
    version: Hashable,
    geometry: tuple[str | None, ...],
    numbers: list[int],
    form: _FrameForm,
    cache: dict[str, str],
    nowait: bool = False,
) -> Response:
    """Native frames read by offset; with nowait, WouldBlock unless all is in memory."""
    obj = retrieve.StoredObject(store, key, nowait=nowait)
    try:
        layout = retrieve.cached_layout(obj, syntax, version, size, geometry)
        ranges = layout.ranges(numbers)
    except BaseException as e:
        obj.close()
        return _retrieve_error(e)
    mode = "multipart" if form.multipart else "single"
    return _octet_response(obj, [({}, r) for r in ranges], mode, cache)


def _coded_frames(
    store: ObjectStore, key: str, numbers: list[int], form: _FrameForm, cache: dict[str, str]
) -> Response:
    """Frames as stored compressed, decoded, or encoded in another syntax."""
    obj = retrieve.StoredObject(store, key)
    try:
        with obj:
            if form.source == _AS_STORED:
                frames = retrieve.encapsulated_frames(obj, numbers)
            elif form.source == _ENCODED:
                frames = retrieve.encoded_frames(obj, numbers, form.syntax)
            else:
                frames = retrieve.decoded_frames(obj, numbers)
    except BaseException as e:
        obj.close()
        return _retrieve_error(e)
    return _bytes_response(frames, form, cache)


def _frames_unavailable(stored: str) -> str:
    """Why no acceptable form exists, naming the forms that do."""
    encodings = ", ".join(
        f"{retrieve.FRAME_MEDIA_TYPES[ts]} ({_ts_name(ts)})"
        for ts in transcode.targets()
        if ts in retrieve.FRAME_MEDIA_TYPES and ts != stored
    )
    encoded = f"or re-encoded (grey images only) as {encodings}; lossy encodings are not made"
    if stored in retrieve.NATIVE_LITTLE_ENDIAN:
        return f'frames of this instance are served as multipart/related; type="{OCTET}", {encoded}'
    own = retrieve.FRAME_MEDIA_TYPES.get(stored)
    name = _ts_name(stored)
    if own is None:
        return f"frames of an instance stored as {name} cannot be served"
    if not transcode.can_decode(stored):
        return f"frames of an instance stored as {name} can only be served as stored, as {own}"
    return (
        f"the instance is stored as {name}; its frames are served as stored, as {own} (or "
        f"{OCTET} with transfer-syntax=*), decoded to {OCTET} (grey images only), {encoded}"
    )


def _bytes_response(bodies: list[bytes], form: _FrameForm, headers: dict[str, str]) -> Response:
    """Frames already in memory, as one part each (or one bare body)."""
    if not form.multipart:
        return Response(bodies[0], media_type=form.ctype, headers=headers)
    boundary = new_boundary()
    body = b"".join(part_head(boundary, form.ctype, len(f)) + f + b"\r\n" for f in bodies)
    mtype = form.ctype.split(";")[0]
    return Response(
        body + closing(boundary),
        media_type=f'multipart/related; type="{mtype}"; boundary={boundary}',
        headers=headers,
    )


def _bulk_data(request: Request, study: str, series: str, sop: str, tag: str) -> Response:
    """Retrieve Bulkdata (PS3.18 10.4, Bulkdata resource): one top-level element's value."""
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
        return http_error(404, "bulk data is addressed by an 8-digit hexadecimal tag")
    mode = _octet_accept(request)
    if mode is None:
        return http_error(406, f'bulk data is served as multipart/related; type="{OCTET}"')
    rt = runtime(request)
    key, syntax, _, version, _ = index.instance_object(
        rt.pool, study, series, sop, auth.read_scope(request), auth.access_of(request)
    )
    url = f"{base_url(request)}/studies/{study}/series/{series}/instances/{sop}"
    # The validators name the resource path (which frames, which element) and the form; the
    # part's Content-Location is absolute, so the root the request came through counts too.
    cache = validators(version, request.url.path, mode, url)
    if (unchanged := not_modified(request, cache)) is not None:
        return unchanged
    obj = retrieve.StoredObject(rt.store, key)
    try:
        r = retrieve.bulk_data_range(obj, syntax, int(tag, 16))
    except BaseException as e:
        obj.close()
        return _retrieve_error(e)
    # PS3.18 10.4.3.3.5: each part carries the Content-Location of its BulkDataURI.
    location = {"Content-Location": f"{url}/bulkdata/{tag}"}
    return _octet_response(obj, [(location, r)], mode, cache)


def _retrieve_error(e: BaseException) -> Response:
    """The HTTP answer to a frame or bulk data request the stored object cannot satisfy."""
    # The Retrieve transaction's statuses (PS3.2 Table N.7-92 lists 400, 404, 406): 400 for a
    # request in error, 406 when the resource cannot be given in an acceptable media type.
    if isinstance(e, retrieve.InvalidRequest):
        return http_error(400, str(e))
    if isinstance(e, retrieve.NotRetrievable):
        return http_error(406, str(e))
    raise e


def _octet_response(
    obj: retrieve.StoredObject,
    parts: list[tuple[dict[str, str], retrieve.ByteRange]],
    mode: str,
    cache: dict[str, str],
) -> Response:
    """Byte ranges of obj as one multipart/related part each (or one bare body): read here,
    straight into the body sent in one piece, when small (a frame or two), else streamed;
    with the validators in cache."""
    ctype = f"{OCTET}; transfer-syntax={EXPLICIT_LE}"
    if mode == "single":
        headers, r = parts[0]
        pieces: list[bytes | retrieve.ByteRange] = [r]
        media_type = OCTET
        headers = {**headers, "Content-Length": str(r.length), **cache}
    else:
        boundary = new_boundary()
        pieces = []
        for part_headers, r in parts:
            pieces += [part_head(boundary, ctype, r.length, part_headers), r, b"\r\n"]
        pieces.append(closing(boundary))
        media_type = f'multipart/related; type="{OCTET}"; boundary={boundary}'
        headers = dict(cache)
    if sum(r.length for _, r in parts) <= WHOLE_OBJECT_MAX:
        with obj:
            return Response(_assembled(obj, pieces), media_type=media_type, headers=headers)

    def body() -> Iterator[bytes]:
        with obj:
            for piece in pieces:
                if isinstance(piece, bytes):
                    yield piece
                else:
                    yield from obj.read(piece)

    return StreamingResponse(body(), media_type=media_type, headers=headers)


def _assembled(obj: retrieve.StoredObject, pieces: list[bytes | retrieve.ByteRange]) -> memoryview:
    """pieces in one buffer: bytes as they are, byte ranges of obj read straight into place
    (the buffer is left uninitialised: every byte of it is written)."""
    size = sum(len(p) if isinstance(p, bytes) else p.length for p in pieces)
    view = memoryview(np.empty(size, np.uint8))
    at = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            view[at : at + len(piece)] = piece
            at += len(piece)
        else:
            obj.read_into(piece.offset, view[at : at + piece.length])
            at += piece.length
    return view
