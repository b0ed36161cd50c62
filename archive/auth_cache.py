"""Verified tokens and readable collections kept in memory, so that a read does not ask
PostgreSQL who its caller is on every request, and forgotten the moment a grant may change.

Migration 024 makes every change that can take a grant away (a token revoked, re-scoped or
deleted; a collection made restricted, renamed or dropped) notify channel CHANNEL when it
commits, whoever made it: this process, another `carina serve`, the CLI, SQL by hand. A
listener thread holds a connection of its own on that channel and empties the cache on each
notification. The cache answers only while the listener is connected: before it listens,
after its connection is lost and until it listens again, every lookup misses (so the caller
asks the database, as without a cache). A revocation thus takes effect as soon as PostgreSQL
delivers the notification to the listener, which it does when the revoking transaction
commits; entries also expire after TTL seconds, and a token past its expiry is never answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "carina_auth"
TTL = 60.0  # seconds an entry is trusted at most, notification or not
MAX_ENTRIES = 10_000  # per kind; past it the cache starts over (a flood of distinct tokens)
RETRY = 1.0  # seconds between attempts to listen again after the connection is lost
_POLL = 1.0  # seconds the listener waits for a notification before checking for stop

K = TypeVar("K")
V = TypeVar("V")


class AuthCache:
    """What the database said of tokens and grants, while nothing has changed since."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, object], tuple[float, object]] = {}
        # Counts clears: an answer read from the database while a clear happened may predate
        # the change that caused it, so it is not kept (see remember).
        self._generation = 0
        self._live = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AuthCache:
        """Start the listener thread; the cache answers once it listens."""
        self._thread = threading.Thread(target=self._listen, name="auth-cache", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (the cache answers nothing more) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def live(self) -> bool:
        """Whether the listener is connected, so that cached entries may be used."""
        return self._live

    def get(self, kind: str, key: object) -> object | None:
        """The entry kept for (kind, key), or None (unknown, expired, or not listening)."""
        if not self._live:
            return None
        found = self._entries.get((kind, key))
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def lookup(self, kind: str, key: K, load: Callable[[K], V]) -> V:
        """The entry for (kind, key), or what load(key) reads from the database, kept for
        next time unless a change was notified while it was read. load's exceptions pass
        through (nothing is kept of a refusal)."""
        found = self.get(kind, key)
        if found is not None:
            return found  # type: ignore[return-value]
        generation = self._generation
        value = load(key)
        self._remember(kind, key, value, generation)
        return value

    def _remember(self, kind: str, key: object, value: object, generation: int) -> None:
        with self._lock:
            if not self._live or generation != self._generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[(kind, key)] = (time.monotonic() + TTL, value)

    def clear(self, live: bool | None = None) -> None:
        """Forget every entry (and set whether the listener is connected)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
            if live is not None:
                self._live = live

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Listening from here on: every later change is notified.
                    self.clear(live=True)
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=_POLL, stop_after=1):
                            self.clear()
            except psycopg.Error as e:
                log.warning("auth cache listener: %s; tokens verified without it", type(e).__name__)
            finally:
                self.clear(live=False)
            self._stop.wait(RETRY)
