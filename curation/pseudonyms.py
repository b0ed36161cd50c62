"""Keyed pseudonyms: patient IDs and names, per-patient date offsets, and remapped UIDs.

Everything is derived from one collection key with HMAC-SHA256, so the same original always
maps to the same value (re-sending is idempotent, references stay consistent) and nobody
without the key can map back."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

# Dates move back by 1..MAX_SHIFT_DAYS days, the same for every date of one patient.
MAX_SHIFT_DAYS = 3650


class Pseudonymizer:
    """Deterministic, keyed replacement values for one collection."""

    def __init__(self, key: bytes, id_prefix: str = "") -> None:
        self._key = key
        self._id_prefix = id_prefix
        # PS3.5 B.2 / ITU-T X.667: a 2.25 UID is a UUID as an integer. Name-based (version 5)
        # UUIDs in a namespace that only this key knows.
        self._namespace = uuid.UUID(bytes=self._digest(b"uid-namespace")[:16])
        self._uids: dict[str, str] = {}

    def _digest(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The `2.25.` UID that replaces original."""
        original = original.strip().rstrip("\x00")
        new = self._uids.get(original)
        if new is None:
            new = f"2.25.{uuid.uuid5(self._namespace, original).int}"
            if len(self._uids) > 100_000:
                self._uids.clear()
            self._uids[original] = new
        return new

    def patient_id(self, original: str) -> str:
        """The research ID that replaces an original PatientID (at most 64 characters)."""
        code = base64.b32encode(self._digest(b"pid:" + original.encode())[:10]).decode()
        return (self._id_prefix + code)[:64]

    def patient_name(self, original_id: str) -> str:
        """The PatientName of a pseudonymised patient: the research ID, as TCIA does."""
        return self.patient_id(original_id)

    def date_offset(self, original_id: str) -> int:
        """Days every date of this patient moves back; keeps intervals between dates."""
        n = int.from_bytes(self._digest(b"date:" + original_id.encode())[:4], "big")
        return 1 + n % MAX_SHIFT_DAYS


def collection_key(master_key: bytes, collection: str) -> bytes:
    """The key of one collection, derived from the master key (different collections differ)."""
    return hmac.new(master_key, b"collection:" + collection.encode(), hashlib.sha256).digest()
