"""Conditional GET for WADO-RS (RFC 9110 8.8, 13.1): ETag and Last-Modified validators of a
resource, and the 304 Not Modified answer when the client's copy is current."""

from __future__ import annotations

import hashlib
from datetime import UTC
from email.utils import format_datetime, parsedate_to_datetime

from fastapi import Request, Response

from carina.archive.index import Version


def validators(version: Version, *variant: str) -> dict[str, str]:
    """ETag and Last-Modified headers of a representation of the instances in version;
    variant names what else the bytes depend on (media type, transfer syntaxes, base URL)."""
    tag = hashlib.sha256("\n".join((version.digest, *variant)).encode()).hexdigest()[:32]
    return {
        # Weak (RFC 9110 8.8.3.1): a multipart body has a fresh boundary each time and JSON may
        # be gzipped, so equal validators promise the same content, not the same bytes.
        "ETag": f'W/"{tag}"',
        "Last-Modified": format_datetime(version.modified.astimezone(UTC), usegmt=True),
    }


def not_modified(request: Request, headers: dict[str, str]) -> Response | None:
    """A 304 answer if the request's preconditions say the client's copy is current, else None.
    If-None-Match, when present, decides alone (RFC 9110 13.2.2)."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        current = _opaque(headers["ETag"])
        tags = {_opaque(t) for t in if_none_match.split(",")}
        return _304(headers) if "*" in tags or current in tags else None
    if_modified_since = request.headers.get("if-modified-since")
    if if_modified_since is None:
        return None
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError):
        return None  # RFC 9110 13.1.3: an invalid date is ignored
    if since.tzinfo is None:
        return None
    modified = parsedate_to_datetime(headers["Last-Modified"])  # whole seconds, as sent
    return _304(headers) if modified <= since else None


def _opaque(tag: str) -> str:
    """An entity tag without its weakness indicator: If-None-Match compares weakly."""
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def _304(headers: dict[str, str]) -> Response:
    return Response(status_code=304, headers=headers)
