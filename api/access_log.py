"""Access logging that names what was asked without what it was asked about: the method, the
route template (/dicomweb/studies/{study}), the status and the time taken. Paths and query
strings can carry identifying values (an original StudyInstanceUID in a study-level STOW, a
patient's name typed into a search), so they are never logged."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("carina.access")


class AccessLog:
    """Pure ASGI middleware (streamed responses pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log.info(
                "%s %s %d %.1f ms",
                scope["method"],
                _route(scope),
                status,
                (time.perf_counter() - started) * 1000,
            )


def _route(scope: Scope) -> str:
    """The matched route's template, or a placeholder when nothing matched."""
    route: Any = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return f"{scope.get('root_path', '')}{path}" if path else "(no route)"
