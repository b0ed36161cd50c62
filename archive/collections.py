"""Collections: what a set of instances is called, who may see it, and how it is de-identified."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from .errors import ArchiveError, NotFound

Visibility = Literal["public", "restricted"]
DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_COLUMNS = (
    "name, visibility, description, license, citation, deid_profile, deid_options, created_at,"
    " mapping_version, deid_lines, rules"
)


class InvalidCollection(ArchiveError):
    """A collection name or setting that cannot be used."""


class CollectionExists(ArchiveError):
    """A collection of that name exists already."""


@dataclass(frozen=True)
class Collection:
    """One collection as stored."""

    name: str
    visibility: str
    description: str
    license: str
    citation: str
    deid_profile: str
    deid_options: list[str]
    created_at: datetime
    rules: dict[str, Any] = field(default_factory=dict)  # curation rule overrides (rule_settings)
    mapping_version: int = 0  # of its pseudonym mapping (archive/mappings.py); 0: none
    deid_lines: list[str] = field(default_factory=list)  # its own recipe lines, in order

    @property
    def options(self) -> tuple[str, ...]:
        """The de-identification options as the intake takes them."""
        return tuple(self.deid_options)

    @property
    def recipe_lines(self) -> tuple[str, ...]:
        """The collection's own de-identification recipe lines as the intake takes them."""
        return tuple(self.deid_lines)


def check_name(name: str) -> str:
    """A valid collection name (it appears in URLs and object keys) or InvalidCollection."""
    if not _NAME.fullmatch(name):
        raise InvalidCollection(
            "a collection name has 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def create(
    pool: ConnectionPool,
    name: str,
    *,
    visibility: Visibility = "restricted",
    deid_profile: str = "basic",
    deid_options: tuple[str, ...] = (),
    description: str = "",
    license: str = "",
    citation: str = "",
) -> Collection:
    """Create a collection; CollectionExists if the name is taken."""
    check_name(name)
    if visibility not in ("public", "restricted"):
        raise InvalidCollection("visibility is public or restricted")
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Collection)) as cur:
        cur.execute(
            "INSERT INTO collections (name, visibility, description, license, citation,"
            " deid_profile, deid_options) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (name) DO NOTHING RETURNING {_COLUMNS}",
            (
                name,
                visibility,
                description,
                license,
                citation,
                deid_profile,
                Jsonb(list(deid_options)),
            ),
        )
        row = cur.fetchone()
    if row is None:
        raise CollectionExists(f"collection {name} exists already")
    return row


def ensure_default(
    pool: ConnectionPool, deid_profile: str, deid_options: tuple[str, ...]
) -> Collection:
    """The `default` collection (STOW to /dicomweb), de-identified as the settings say."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Collection)) as cur:
        cur.execute(
            "INSERT INTO collections (name, deid_profile, deid_options) VALUES (%s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET deid_profile = EXCLUDED.deid_profile,"
            f" deid_options = EXCLUDED.deid_options RETURNING {_COLUMNS}",
            (DEFAULT, deid_profile, Jsonb(list(deid_options))),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def get(pool: ConnectionPool, name: str) -> Collection:
    """The collection of that name, or NotFound."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Collection)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM collections WHERE name = %s", (name,))
        row = cur.fetchone()
    if row is None:
        raise NotFound(f"no collection {name}")
    return row


def set_deid_lines(pool: ConnectionPool, name: str, lines: list[str]) -> None:
    """Replace a collection's own recipe lines (validated by the caller); NotFound if unknown."""
    with pool.connection() as conn:
        cur = conn.execute(
            "UPDATE collections SET deid_lines = %s WHERE name = %s", (Jsonb(lines), name)
        )
    if cur.rowcount == 0:
        raise NotFound(f"no collection {name}")


def list_all(pool: ConnectionPool) -> list[Collection]:
    """Every collection, by name."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Collection)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM collections ORDER BY name")
        return cur.fetchall()


def set_rules(pool: ConnectionPool, name: str, rules: dict[str, Any]) -> None:
    """Store a collection's rule overrides (checked by the caller); NotFound if unknown."""
    with pool.connection() as conn:
        cur = conn.execute(
            "UPDATE collections SET rules = %s WHERE name = %s", (Jsonb(rules), name)
        )
    if cur.rowcount == 0:
        raise NotFound(f"no collection {name}")


def is_unknown_collection(error: psycopg.Error) -> bool:
    """Whether a database error is a reference to a collection that does not exist."""
    return isinstance(error, psycopg.errors.ForeignKeyViolation) and "collection" in str(
        error.diag.constraint_name or ""
    )
