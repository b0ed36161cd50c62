"""Curator web sessions: an opaque id held by the browser, standing for a verified API token.

The browser never holds the token itself after login: its cookie carries a random session id
(256 bits), and only that id's SHA-256 is stored, so a read of the table gives no usable
session. Each session names its token, and every use re-checks the token, so revoking or
expiring a token ends its sessions at once. A session also keeps the CSRF token its pages
embed in their forms (a synchronizer token, as OWASP's CSRF cheat sheet describes).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from psycopg_pool import ConnectionPool

from .tokens import InvalidToken, Token

LIFETIME = timedelta(hours=12)  # a working day; the token's own expiry still applies
_TOKEN_COLUMNS = (
    "t.id, t.name, t.role, t.collection, t.share_id, t.created_at, t.expires_at, t.revoked_at"
)


@dataclass(frozen=True)
class Session:
    """A live session: the token it acts for and the CSRF token its forms must carry."""

    token: Token
    csrf: str


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def create(pool: ConnectionPool, token: Token) -> tuple[str, Session]:
    """Open a session for a verified token: (the id for the cookie, the session)."""
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO curator_sessions (id_hash, token_id, csrf, expires_at)"
            " VALUES (%s, %s, %s, now() + %s)",
            (_hash(session_id), token.id, csrf, LIFETIME),
        )
        # Expired sessions go as new ones come: the table holds only live ones and a few.
        conn.execute("DELETE FROM curator_sessions WHERE expires_at < now()")
    return session_id, Session(token, csrf)


def lookup(pool: ConnectionPool, session_id: str) -> Session:
    """The live session of an id, its token still active; InvalidToken saying why not."""
    with pool.connection() as conn:
        row = conn.execute(
            f"SELECT {_TOKEN_COLUMNS}, s.csrf, now() FROM curator_sessions s"
            " JOIN api_tokens t ON t.id = s.token_id"
            " WHERE s.id_hash = %s AND s.expires_at > now()",
            (_hash(session_id),),
        ).fetchone()
    if row is None:
        raise InvalidToken("no such session, or it has expired")
    token = Token(*row[:8])
    state = token.state(row[9])
    if state != "active":
        raise InvalidToken(f"the session's token is {state}")
    return Session(token, row[8])


def end(pool: ConnectionPool, session_id: str) -> None:
    """Close a session (logout); closing one that is gone is not an error."""
    with pool.connection() as conn:
        conn.execute("DELETE FROM curator_sessions WHERE id_hash = %s", (_hash(session_id),))
