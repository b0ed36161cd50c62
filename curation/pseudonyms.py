"""Keyed pseudonyms: patient IDs and names, per-patient date offsets, and remapped UIDs.

Everything is derived from one collection key with HMAC-SHA256, so the same original always
maps to the same value (re-sending is idempotent, references stay consistent) and nobody
without the key can map back."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping

from carina.archive import mappings
from carina.archive.mappings import Subject

from .errors import InstanceRefused

# Dates move back by 1..MAX_SHIFT_DAYS days, the same for every date of one patient.
MAX_SHIFT_DAYS = 3650


class Pseudonymizer:
    """Deterministic, keyed replacement values for one collection."""

    def __init__(
        self, key: bytes, id_prefix: str = "", subjects: Mapping[bytes, Subject] | None = None
    ) -> None:
        self._key = key
        self._id_prefix = id_prefix
        # A submitter's mapping file: subject digest -> research identity (archive/mappings.py).
        self._subjects = subjects or {}
        # PS3.5 B.2 / ITU-T X.667: a 2.25 UID is a UUID as an integer. Name-based (version 5)
        # UUIDs in a namespace that only this key knows.
        self._namespace = uuid.UUID(bytes=self._digest(b"uid-namespace")[:16])
        self._uids: dict[str, str] = {}
        self._kept: frozenset[str] = frozenset()

    def keeping(self, uids: Iterable[str]) -> Pseudonymizer:
        """This pseudonymizer, but leaving uids as they are (UIDs Carina already wrote)."""
        other = copy.copy(self)
        other._kept = frozenset(uids)
        return other

    def _digest(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The `2.25.` UID that replaces original."""
        original = original.strip().rstrip("\x00")
        if original in self._kept:
            return original
        new = self._uids.get(original)
        if new is None:
            new = f"2.25.{uuid.uuid5(self._namespace, original).int}"
            if len(self._uids) > 100_000:
                self._uids.clear()
            self._uids[original] = new
        return new

    def subject_digest(self, original_id: str) -> bytes:
        """The keyed digest that stands for an original PatientID in a pseudonym mapping."""
        return self._digest(b"subject:" + original_id.strip().encode())

    def forgotten_research_id(self, research_id: str) -> bytes:
        """The keyed digest an erasure records for a research PatientID it forgot: intake
        recognises a later instance of the subject by it, and it reveals nothing."""
        return self._digest(b"forgotten:" + research_id.encode())

    def forgotten_original(self, subject_digest: bytes) -> bytes:
        """The keyed digest an erasure records for a forgotten original PatientID, from its
        subject_digest (which a mapping holds, or intake computes from the original)."""
        return self._digest(b"original:" + subject_digest)

    def key_check(self) -> bytes:
        """A value that says which key made a mapping's digests, and reveals nothing of it."""
        return self._digest(b"mapping-key-check")

    def patient_id(self, original: str) -> str:
        """The research ID that replaces an original PatientID (at most 64 characters): the
        submitter's mapping where it names the patient, else a keyed code."""
        subject = self._subjects.get(self.subject_digest(original)) if self._subjects else None
        if subject is not None:
            return subject.research_id
        code = base64.b32encode(self._digest(b"pid:" + original.encode())[:10]).decode()
        return (self._id_prefix + code)[:64]

    def patient_name(self, original_id: str) -> str:
        """The PatientName of a pseudonymised patient: the mapping's research name, else the
        research ID, as TCIA does."""
        subject = self._subjects.get(self.subject_digest(original_id)) if self._subjects else None
        if subject is not None and subject.research_name:
            return subject.research_name
        return self.patient_id(original_id)

    def date_offset(self, original_id: str) -> int:
        """Days every date of this patient moves back; keeps intervals between dates."""
        n = int.from_bytes(self._digest(b"date:" + original_id.encode())[:4], "big")
        return 1 + n % MAX_SHIFT_DAYS


def collection_key(master_key: bytes, collection: str) -> bytes:
    """The key of one collection, derived from the master key (different collections differ)."""
    return hmac.new(master_key, b"collection:" + collection.encode(), hashlib.sha256).digest()


def mapped_pseudonymizer(key: bytes, conninfo: str, collection: str) -> Pseudonymizer:
    """The Pseudonymizer of a collection that has a pseudonym mapping, read from the database.
    A mapping made with another key would silently leave every mapped patient unmapped, so it
    refuses the instance instead (PS3.4 0x0110 processing failure)."""
    mapping = mappings.load(conninfo, collection)
    pseudo = Pseudonymizer(key, subjects=mapping.subjects)
    if mapping.subjects and mapping.key_check != pseudo.key_check():
        raise InstanceRefused(
            0x0110, "the collection's pseudonym mapping was loaded with another secret key"
        )
    return pseudo
