"""API tokens: created once and shown once, kept only as a hash, expiring and revocable.

A token reads `carina_<id>_<secret>`: the id (12 hex digits) is public and names the token in
lists, revocations and the audit; the secret (256 random bits) is kept only as its SHA-256.
A hash without a salt or a slow KDF is enough for a secret of that entropy (a password would
need one); it is compared in constant time after the row is found by id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from .collections import is_unknown_collection
from .errors import ArchiveError

ROLES = ("admin", "curator", "submitter", "reader", "share")
PREFIX = "carina_"
_TOKEN = re.compile(r"carina_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_COLUMNS = "id, name, role, collection, share_id, created_at, expires_at, revoked_at"


class InvalidToken(ArchiveError):
    """A token that does not grant anything: malformed, unknown, expired or revoked."""


class TokenRefused(ArchiveError):
    """A token that cannot be created as asked (unknown role or collection, ...)."""


@dataclass(frozen=True)
class Token:
    """A token as stored (never its secret)."""

    id: str
    name: str
    role: str
    collection: str | None
    share_id: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime) -> str:
        """active, expired or revoked."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _check_scope(role: str, collection: str | None, share_id: str | None) -> None:
    """Refuse a role without the one scope it needs: admin none, share a share, the others a
    collection."""
    if role not in ROLES:
        raise TokenRefused(f"role must be one of {', '.join(ROLES)}")
    if role == "admin" and (collection or share_id):
        raise TokenRefused("an admin token has no collection or share")
    if role == "share" and (collection or not share_id):
        raise TokenRefused("a share (link) token needs --share and no collection")
    if role not in ("admin", "share") and (share_id or not collection):
        raise TokenRefused(f"a {role} needs --collection (and no share)")


def create(
    pool: ConnectionPool,
    role: str,
    *,
    collection: str | None = None,
    share_id: str | None = None,
    name: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, Token]:
    """Make a token; return it (to be shown once) and its stored record."""
    _check_scope(role, collection, share_id)
    if expires_at is not None and expires_at.tzinfo is None:
        raise TokenRefused("the expiry needs a time zone")
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    try:
        with pool.connection() as conn, conn.cursor(row_factory=class_row(Token)) as cur:
            cur.execute(
                "INSERT INTO api_tokens"
                " (id, name, role, collection, share_id, secret_hash, expires_at)"
                f" VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                (
                    token_id,
                    name or f"token-{token_id}",
                    role,
                    collection,
                    share_id,
                    _hash(secret),
                    expires_at,
                ),
            )
            row = cur.fetchone()
    except psycopg.errors.ForeignKeyViolation as e:
        if is_unknown_collection(e):
            raise TokenRefused(f"no collection {collection}") from None
        raise TokenRefused(f"no share {share_id}") from None
    assert row is not None
    return f"{PREFIX}{token_id}_{secret}", row


def verify(pool: ConnectionPool, token: str) -> Token:
    """The active token record of a presented token, or InvalidToken saying why."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        raise InvalidToken("malformed token")
    token_id, secret = m.groups()
    with pool.connection() as conn:
        row = conn.execute(
            f"SELECT {_COLUMNS}, secret_hash, now() FROM api_tokens WHERE id = %s", (token_id,)
        ).fetchone()
    # An unknown id and a wrong secret are one answer: neither says whether the id exists.
    if row is None or not hmac.compare_digest(bytes(row[8]), _hash(secret)):
        raise InvalidToken("unknown token")
    record, now = Token(*row[:8]), row[9]
    state = record.state(now)
    if state != "active":
        raise InvalidToken(f"token {state}")
    return record


def list_all(pool: ConnectionPool) -> list[Token]:
    """Every token, oldest first."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Token)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY created_at, id")
        return cur.fetchall()


def revoke(pool: ConnectionPool, token_id: str) -> Token:
    """Revoke a token by id (at once, for every process); TokenRefused if there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Token)) as cur:
        cur.execute(
            "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s"
            f" RETURNING {_COLUMNS}",
            (token_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise TokenRefused(f"no token {token_id}")
    return row
