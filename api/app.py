"""The FastAPI application: DICOMweb at /dicomweb, plus health; also runs the DICOM listener."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware

from carina import __version__
from carina.archive import db
from carina.archive.auth_cache import AuthCache
from carina.curation.lifecycle import Worker, start_workers, stop_workers
from carina.curation.ocr import OcrEnvironment
from carina.runtime import Runtime
from carina.settings import Settings

from . import (
    audit,
    auth,
    changes,
    curation,
    derived,
    dicomweb,
    errors,
    paths,
    rendered,
    series,
    shares,
    submissions,
    web,
    web_changes,
    web_reprocess,
)
from .access_log import AccessLog
from .oidc import OidcVerifier

log = logging.getLogger(__name__)

# JSON answers (QIDO, metadata) shorter than this are sent as they are.
GZIP_MINIMUM_SIZE = 1024
# DICOM objects and pixel data are dense already; compressing them costs CPU for nothing.
GZIP_EXCLUDED = (
    *DEFAULT_EXCLUDED_CONTENT_TYPES,
    "multipart/*",
    "application/dicom",
    "application/octet-stream",
)
# Response headers a browser viewer must be allowed to read (QIDO paging warnings, sizes,
# cache validators).
CORS_EXPOSED = [
    "Warning",
    "Content-Type",
    "Content-Length",
    "Content-Location",
    "Location",
    "ETag",
    "Last-Modified",
]


def create_app(settings: Settings) -> FastAPI:
    """An app that starts its Runtime (database, store, intake workers) on start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await run_in_threadpool(Runtime.start, settings)
        app.state.runtime = runtime
        # Single statements of requests that run on the event loop (frame retrieval).
        app.state.statements = await db.open_statement_pool(runtime.pool.conninfo)
        # Verified tokens and readable collections, forgotten on every change (migration 024).
        app.state.auth_cache = AuthCache(runtime.pool.conninfo).start()
        listener = None
        if settings.dimse_enabled:
            from .dimse import DimseListener

            listener = DimseListener(runtime)
            try:
                await run_in_threadpool(listener.start)
            except OSError as e:
                # HTTP still serves; `carina dimse` can run the listener on its own.
                log.error(
                    "DICOM listener not started on port %d: %s", settings.dimse_port, e.strerror
                )
                listener = None
        workers: list[Worker] = []
        if settings.serve_worker:
            ocr_env = OcrEnvironment(runtime.store, settings.tesseract)
            workers = start_workers(
                settings.series_workers,
                lambda: Worker(runtime.pool, originals=settings.originals_area, ocr_env=ocr_env),
            )
        # What start-up made (modules, routes, data dictionaries: ~200,000 objects) lives as
        # long as the process; the cycle collector's full passes (~46 ms each over all of it)
        # need not traverse it again.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await run_in_threadpool(stop_workers, workers)
            if listener is not None:
                await run_in_threadpool(listener.stop)
            await run_in_threadpool(app.state.auth_cache.stop)
            await app.state.statements.close()
            await run_in_threadpool(runtime.close)

    app = FastAPI(title="Carina", version=__version__, lifespan=lifespan)
    errors.install(app)
    app.add_middleware(
        GZipMiddleware,
        minimum_size=GZIP_MINIMUM_SIZE,
        compresslevel=6,
        exclude_content_types=GZIP_EXCLUDED,
    )
    if settings.cors_origins:
        # Added last, so outermost: preflights are answered before anything else runs.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=CORS_EXPOSED,
        )
    app.state.auth_failures = auth.FailureLimit(settings.auth_failure_limit)
    # Bearer JWTs of an OpenID Connect issuer, when one is configured (api/oidc.py).
    app.state.oidc = OidcVerifier(settings) if settings.oidc_issuer else None
    # Every data route refuses impossible path values, then knows who asks (anonymous, or a
    # verified Bearer token), before it runs.
    authenticated = [Depends(paths.check_path), Depends(auth.authenticate)]
    # PS3.18 roots a viewer can be pointed at: everything the caller may read, or one collection.
    for root in ("/dicomweb", "/collections/{collection}/dicomweb"):
        app.include_router(dicomweb.router(root), dependencies=authenticated)
        app.include_router(rendered.router(root), dependencies=authenticated)
    app.include_router(derived.router("/api"), dependencies=authenticated)
    app.include_router(series.router("/api"), dependencies=authenticated)
    app.include_router(curation.router("/api/curation"), dependencies=authenticated)
    app.include_router(changes.router("/api/curation"), dependencies=authenticated)
    app.include_router(shares.api_router("/api/shares"), dependencies=authenticated)
    app.include_router(submissions.router("/api/submissions"), dependencies=authenticated)
    app.include_router(audit.router("/api/audit"), dependencies=authenticated)
    # The curator's web page: its own login and session cookie, never the Bearer header (its
    # reprocess, redaction and edit forms first: web's /series/{uid}/{decision} would take
    # their paths).
    app.include_router(web_reprocess.router())
    app.include_router(web_changes.router())
    web.install(app)
    # A shared cohort: its latest version, or one version, which never changes.
    read_only = [*authenticated, Depends(auth.read_only)]
    for share_root in ("/shares/{share}", "/shares/{share}/versions/{version}"):
        app.include_router(dicomweb.router(f"{share_root}/dicomweb"), dependencies=read_only)
        app.include_router(rendered.router(f"{share_root}/dicomweb"), dependencies=read_only)
        app.include_router(shares.router(share_root), dependencies=read_only)

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    # Outermost (added last): every request is logged once, by route, never by its path.
    app.add_middleware(AccessLog)
    return app
