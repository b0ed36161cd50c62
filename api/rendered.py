"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3-4, 8.3.5): consumer images
(JPEG, PNG) of stored frames, for viewers and pages that cannot read DICOM."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from carina.archive import index, render, retrieve
from carina.archive.index import Version
from carina.archive.render import Rendering
from carina.archive.storage import ObjectStore

from . import auth
from .conditional import not_modified, validators
from .context import runtime
from .errors import http_error
from .multipart import Loaded, negotiate, new_boundary, write_parts

MULTIPART = "multipart/related"
# Images rendered lately, by (object key, content digest, frame, rendering), up to this many
# bytes in all: a viewer asks again for what it showed before. A rewritten object (redaction)
# has another digest, so it is never answered from here; study and series level images
# (several instances) are not kept.
RENDERED_CACHE_BYTES = 64 << 20
_images: LRUCache[tuple[object, ...], bytes] = LRUCache(RENDERED_CACHE_BYTES, getsizeof=len)
_images_lock = threading.Lock()
# (object key, frame number, content digest: None where the image is not to be kept)
_Target = tuple[str, int, str | None]


@dataclass(frozen=True)
class _Choice:
    """The negotiated answer: an image media type, alone or as parts of multipart/related."""

    media_type: str
    multipart: bool


def router(prefix: str) -> APIRouter:
    """The rendered and thumbnail routes of one DICOMweb root."""
    r = APIRouter(prefix=prefix)
    instance = "/studies/{study}/series/{series}/instances/{sop}"

    @r.get("/studies/{study}/rendered")
    def study_rendered(request: Request, study: str) -> Response:
        return _rendered(request, study)

    @r.get("/studies/{study}/series/{series}/rendered")
    def series_rendered(request: Request, study: str, series: str) -> Response:
        return _rendered(request, study, series)

    @r.get(instance + "/rendered")
    def instance_rendered(request: Request, study: str, series: str, sop: str) -> Response:
        return _rendered(request, study, series, sop)

    @r.get(instance + "/frames/{frames}/rendered")
    def frames_rendered(
        request: Request, study: str, series: str, sop: str, frames: str
    ) -> Response:
        return _rendered(request, study, series, sop, frames)

    @r.get("/studies/{study}/thumbnail")
    def study_thumbnail(request: Request, study: str) -> Response:
        return _thumbnail(request, study)

    @r.get("/studies/{study}/series/{series}/thumbnail")
    def series_thumbnail(request: Request, study: str, series: str) -> Response:
        return _thumbnail(request, study, series)

    @r.get(instance + "/thumbnail")
    def instance_thumbnail(request: Request, study: str, series: str, sop: str) -> Response:
        return _thumbnail(request, study, series, sop)

    @r.get(instance + "/frames/{frames}/thumbnail")
    def frame_thumbnail(
        request: Request, study: str, series: str, sop: str, frames: str
    ) -> Response:
        return _thumbnail(request, study, series, sop, frames)

    return r


def _negotiate(request: Request) -> _Choice | None:
    """The rendered media type to answer in (PS3.18 8.7.4): the `accept` query parameter if
    given (8.3.3.1), else the Accept header; highest q first; JPEG for wildcards and no header."""

    def choice(mtype: str, params: dict[str, str]) -> _Choice | None:
        multipart = mtype == MULTIPART
        if multipart:
            mtype = params.get("type", "").lower()
        if mtype in ("*/*", "image/*", "multipart/*"):
            mtype = render.JPEG
        return _Choice(mtype, multipart) if mtype in render.MEDIA_TYPES else None

    header = request.query_params.get("accept") or request.headers.get("accept")
    choices = negotiate(header, choice)
    return choices[0] if choices else None


def _not_acceptable() -> Response:
    types = " or ".join(render.MEDIA_TYPES)
    return http_error(406, f"rendered images are served as {types} (or multipart/related of them)")


def _rendered(
    request: Request,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    frame_list: str | None = None,
) -> Response:
    choice = _negotiate(request)
    if choice is None:
        return _not_acceptable()
    try:
        rendering = _rendering(request, choice.media_type)
        numbers = retrieve.parse_frame_list(frame_list) if frame_list else [1]
    except retrieve.InvalidRequest as e:
        return http_error(400, str(e))
    rt = runtime(request)
    scope = auth.read_scope(request)
    if sop is None:
        # Study or series: every instance's first frame as parts, or the first instance
        # alone (as Orthanc answers, and as dicomweb-client reads a single image).
        objects = index.instance_objects(rt.pool, study, series, sop, scope)
        version = index.version(rt.pool, study, series, sop, scope)
        targets: list[_Target] = [(key, 1, None) for key, _, _ in objects]
        if not choice.multipart:
            targets = targets[:1]
        auth.record_access(request, [study])
    else:
        assert series is not None  # the instance routes name their series
        # Audited as it is looked up (one statement): also a read answered 304 or 406.
        key, _, _, version, _ = index.instance_object(
            rt.pool, study, series, sop, scope, auth.access_of(request)
        )
        targets = [(key, n, version.digest) for n in numbers]
    cache = _validators(request, choice, version)
    if (unchanged := not_modified(request, cache)) is not None:
        return unchanged
    if len(targets) > 1 and not choice.multipart:
        return http_error(406, "several frames need a multipart/related response")
    return _answer(rt.store, targets, rendering, choice, frame_list is not None, cache)


def _thumbnail(
    request: Request,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    frame: str | None = None,
) -> Response:
    """One small image standing for the resource (PS3.18 10.4.3.3.4): the middle instance of
    the first series (the middle of a stack is more telling than its first slice)."""
    choice = _negotiate(request)
    if choice is None:
        return _not_acceptable()
    try:
        rendering = _rendering(request, choice.media_type, thumbnail=True)
        numbers = retrieve.parse_frame_list(frame) if frame else [1]
    except retrieve.InvalidRequest as e:
        return http_error(400, str(e))
    if len(numbers) > 1:
        return http_error(400, "a thumbnail is of one frame")
    rt = runtime(request)
    scope = auth.read_scope(request)
    cache = _validators(request, choice, index.version(rt.pool, study, series, sop, scope))
    if (unchanged := not_modified(request, cache)) is not None:
        return unchanged
    if series is None:
        series = index.first_series(rt.pool, study, scope)
    objects = index.instance_objects(rt.pool, study, series, sop, scope)
    key = objects[len(objects) // 2][0]
    auth.record_access(request, [study])
    return _answer(rt.store, [(key, numbers[0], None)], rendering, choice, True, cache)


def _validators(request: Request, choice: _Choice, version: Version) -> dict[str, str]:
    """ETag and Last-Modified of a rendered resource: besides the instances in scope (version),
    the image depends on the resource path (frames, thumbnail or not), the rendering parameters
    in the query and the negotiated media type."""
    return validators(
        version, choice.media_type, str(choice.multipart), request.url.path, request.url.query
    )


def _rendering(request: Request, media_type: str, thumbnail: bool = False) -> Rendering:
    """The rendering the query parameters ask for (PS3.18 8.3.5.1); InvalidRequest if a value
    is malformed. Thumbnails take only `viewport` (8.3.5.2) and fit in THUMBNAIL_SIZE."""
    q = request.query_params
    # PS3.18 8.3.5.1.1, 8.3.5.1.5: burned-in annotations and ICC profiles are not rendered;
    # asking for them is refused rather than answered with an image that lacks them.
    if q.get("annotation"):
        raise retrieve.InvalidRequest(
            f"annotation={q['annotation']!r} is not supported: images are rendered without "
            "burned-in annotation"
        )
    if q.get("iccprofile", "no").lower() != "no":
        raise retrieve.InvalidRequest(
            f"iccprofile={q['iccprofile']!r} is not supported: rendered images carry no ICC "
            "profile (iccprofile=no)"
        )
    viewport = render.parse_viewport(q["viewport"]) if "viewport" in q else None
    if thumbnail:
        return Rendering(media_type, viewport=viewport).fitted(render.THUMBNAIL_SIZE)
    window = render.parse_window(q["window"]) if "window" in q else None
    quality = render.parse_quality(q["quality"]) if "quality" in q else render.DEFAULT_QUALITY
    return Rendering(media_type, window, viewport, quality)


def _answer(
    store: ObjectStore,
    targets: list[_Target],
    rendering: Rendering,
    choice: _Choice,
    check_frames: bool,
    headers: dict[str, str],
) -> Response:
    """The rendered targets (object key, frame, digest): one image, or one part each. One image
    is rendered before the status goes out, so every error gets its own status; for parts,
    the frame numbers are checked first (check_frames) and each part is rendered as sent."""
    try:
        if not choice.multipart:
            [target] = targets
            image = _render(store, target, rendering)
            return Response(image, media_type=choice.media_type, headers=headers)
        if check_frames:
            with retrieve.StoredObject(store, targets[0][0]) as obj:
                render.check_frames(obj.file, [n for _, n, _ in targets])
    except retrieve.InvalidRequest as e:
        return http_error(400, str(e))
    except retrieve.NotRetrievable as e:
        return http_error(406, str(e))

    def loader(target: _Target) -> Callable[[], Loaded]:
        def load() -> Loaded:
            data = _render(store, target, rendering)
            return Loaded(choice.media_type, data, len(data))

        return load

    boundary = new_boundary()
    parts = [(choice.media_type, None, loader(t)) for t in targets]
    return StreamingResponse(
        write_parts(boundary, parts),
        media_type=f'{MULTIPART}; type="{choice.media_type}"; boundary={boundary}',
        headers=headers,
    )


def _render(store: ObjectStore, target: _Target, rendering: Rendering) -> bytes:
    """The image of one target: from the cache when it was rendered so lately."""
    key, frame, digest = target
    kept = None if digest is None else (key, digest, frame, rendering)
    if kept is not None:
        with _images_lock:
            found = _images.get(kept)
        if found is not None:
            return found
    with retrieve.StoredObject(store, key) as obj:
        image = render.render(obj.file, frame, rendering)
    if kept is not None and len(image) <= RENDERED_CACHE_BYTES // 64:
        with _images_lock:
            _images[kept] = image
    return image
