"""`carina serve`'s HTTP protocol (api/http_protocol.py), on a real uvicorn server on loopback:
a response's head leaves with its first body bytes, and responses of every shape still arrive
whole on a kept-alive connection."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from carina.api.http_protocol import Protocol

BODY = b"x" * 300_000
release = threading.Event()  # the slow route sends its body once this is set


async def app(scope: dict, receive: Any, send: Any) -> None:
    """A few response shapes, by path."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/boom":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("after the head")
    if path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/chunks":  # no Content-Length: chunked
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-length", str(len(BODY)).encode()), (b"x-route", path.encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if path == "/slow":
        await asyncio.to_thread(release.wait, 10)
    await send({"type": "http.response.body", "body": BODY[:1000], "more_body": True})
    await send({"type": "http.response.body", "body": BODY[1000:]})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=Protocol, lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def test_the_head_is_not_sent_before_the_first_body_bytes(port: int) -> None:
    release.clear()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):  # uvicorn alone sends the head here
            conn.recv(65536)
        release.set()
        conn.settimeout(10)
        got = b""
        while True:
            head, end, body = got.partition(b"\r\n\r\n")
            if end and len(body) >= len(BODY):
                break
            chunk = conn.recv(1 << 20)
            assert chunk, "connection closed early"
            got += chunk
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-route: /slow" in head
    assert body == BODY


def test_responses_of_every_shape_arrive_whole_on_one_connection(port: int) -> None:
    release.set()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for method, path, status, body in [
            ("GET", "/plain", 200, BODY),
            ("HEAD", "/plain", 200, b""),  # a head without body bytes is still sent
            ("GET", "/empty", 204, b""),
            ("GET", "/chunks", 200, b"one,two,three"),
            ("GET", "/plain", 200, BODY),
        ]:
            conn.request(method, path)
            response = conn.getresponse()
            assert (response.status, response.read()) == (status, body), (method, path)
            if path == "/plain":
                assert response.getheader("content-length") == str(len(BODY))
                assert response.getheader("x-route") == "/plain"
            if path == "/chunks":
                assert response.getheader("transfer-encoding") == "chunked"
        conn.request("GET", "/plain", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.read() == BODY
        assert response.getheader("connection") == "close"
    finally:
        conn.close()


def test_an_application_failing_after_its_head_closes_the_connection(port: int) -> None:
    # The head was held: the client sees the connection closed, not a 200 cut short.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/boom")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse().read()
    finally:
        conn.close()
    # and the server goes on answering
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/plain")
        assert conn.getresponse().read() == BODY
    finally:
        conn.close()
