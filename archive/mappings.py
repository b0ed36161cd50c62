"""Pseudonym mappings: a collection's research IDs for given subjects, keyed by a digest.

The table is restricted: nothing here is reachable from an HTTP route. Rows carry the keyed
digest of the original PatientID, never the ID itself (the caller makes the digests)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool

from .errors import NotFound


@dataclass(frozen=True)
class Subject:
    """The research identity of one mapped subject."""

    research_id: str
    research_name: str | None = None


@dataclass(frozen=True)
class Mapping:
    """A collection's mapping as loaded: digest -> subject, and the key check it was made with."""

    version: int
    key_check: bytes | None
    subjects: dict[bytes, Subject]


def replace(
    pool: ConnectionPool, collection: str, key_check: bytes, subjects: dict[bytes, Subject]
) -> int:
    """Replace a collection's mapping in one transaction; return its new version.
    NotFound for an unknown collection."""
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "UPDATE collections SET mapping_version = mapping_version + 1,"
            " mapping_key_check = %s WHERE name = %s RETURNING mapping_version",
            (key_check, collection),
        )
        row = cur.fetchone()
        if row is None:
            raise NotFound(f"no collection {collection}")
        cur.execute("DELETE FROM pseudonym_mappings WHERE collection = %s", (collection,))
        with cur.copy(
            "COPY pseudonym_mappings (collection, subject_digest, research_id, research_name)"
            " FROM STDIN"
        ) as copy:
            for digest, subject in subjects.items():
                copy.write_row((collection, digest, subject.research_id, subject.research_name))
        return int(row[0])


def load(conninfo: str, collection: str) -> Mapping:
    """A collection's current mapping, read on a connection of its own (worker processes have
    no pool)."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        found = conn.execute(
            "SELECT mapping_version, mapping_key_check FROM collections WHERE name = %s",
            (collection,),
        ).fetchone()
        if found is None:
            raise NotFound(f"no collection {collection}")
        rows = conn.execute(
            "SELECT subject_digest, research_id, research_name FROM pseudonym_mappings"
            " WHERE collection = %s",
            (collection,),
        ).fetchall()
    return Mapping(
        version=int(found[0]),
        key_check=bytes(found[1]) if found[1] is not None else None,
        subjects={bytes(d): Subject(i, n) for d, i, n in rows},
    )
