"""The FastAPI application: DICOMweb at /dicomweb, plus health; also runs the DICOM listener."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from carina import __version__
from carina.runtime import Runtime
from carina.settings import Settings

from . import dicomweb, errors

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """An app that starts its Runtime (database, store, intake workers) on start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await run_in_threadpool(Runtime.start, settings)
        app.state.runtime = runtime
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
        try:
            yield
        finally:
            if listener is not None:
                await run_in_threadpool(listener.stop)
            await run_in_threadpool(runtime.close)

    app = FastAPI(title="Carina", version=__version__, lifespan=lifespan)
    errors.install(app)
    app.include_router(dicomweb.router("/dicomweb"))

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app
