"""The HTTP/1.1 protocol `carina serve` runs: uvicorn's httptools protocol, with a response's
head sent together with its first body bytes.

uvicorn writes the status line and headers to the socket as soon as the application starts
its response, and the body in a second write. On loopback, or any link where the two are not
merged before they leave, that is two sends, and a client reading the response wakes for
the head and again for the body. Here the head is held until the first body message (or the
end of the response, for one without a body, such as HEAD), then both go out in one
`writelines`. Interleaved runs of 2 clients fetching one 0.5 MB frame per request
(bench/wado.py's frame requests): 671 against 589 frames/s, mean of 6 runs each.

Only the hand-over of bytes to the transport changes: what is sent, and when the response
ends, are uvicorn's own (pyproject pins uvicorn to the minor version whose RequestResponseCycle
this relies on: one write for the head, writes and close for the body)."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _Held:
    """Stands in for the transport while uvicorn writes a response's head: keeps the bytes."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class _AfterHead:
    """Stands in for the transport while the first body message is sent: its first write goes
    out after the held head, as one writelines; a close sends the head first."""

    def __init__(self, transport: Any, head: bytes) -> None:
        self._transport = transport
        self._head: bytes | None = head

    def write(self, data: bytes) -> None:
        head, self._head = self._head, None
        if head is None:
            self._transport.write(data)
        else:
            self._transport.writelines([head, data])

    def flush(self) -> None:
        """Send the head if nothing has yet (a response without body bytes)."""
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Cycle(RequestResponseCycle):
    """uvicorn's request-response cycle, holding the head until the first body message."""

    _head: bytes | None = None

    async def send(self, message: Any) -> None:
        transport = self.transport
        if message["type"] == "http.response.start" and not self.response_started:
            held = _Held()
            self.transport = held  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            self._head = b"".join(held.data)
            return
        head, self._head = self._head, None
        if head is None:
            await super().send(message)
            return
        after = _AfterHead(transport, head)
        self.transport = after  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
            after.flush()


class Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests run in a _Cycle."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if type(self.cycle) is RequestResponseCycle:  # not after an upgrade (none is made)
            self.cycle.__class__ = _Cycle
