"""The originals area: the identified original of each accepted instance, encrypted, kept
until its series is decided so that a curator can de-identify it again with another profile.

Each original is one file, named at random (nothing of the instance in the name), encrypted
with AES-256-GCM (NIST SP 800-38D: authenticated, a fresh random 96-bit nonce per file) under
a key derived per collection with HKDF-SHA256 (RFC 5869) from the originals master key, which
is not the pseudonym key: destroying it makes every kept original unreadable at once, while
the pseudonyms stay. The associated data binds a file to its collection, its de-identified
SOP Instance UID and its name, so a file altered, cut short, or moved to stand for another
instance fails authentication instead of decrypting to something else.

A C-STORE acknowledged on admission (curation/admission.py) has its original sealed first as
a pending original in the intake area, flushed before the status is sent and named for what
it will be (pending_name()); once its instance is indexed, adopt() renames it into place.

Intake writes the file from the process that holds the bytes (an intake worker; the listener
for a pending original), never in clear, and its row (table `originals`, migrations/017) in the
transaction that indexes the de-identified instance. keep()'s write is not fsynced before the
instance is acknowledged (a pending original's is, above): the original only serves a
reprocessing, and one lost in a crash makes that reprocessing refuse with a reason (a cut-short
file fails authentication), while the acknowledged de-identified instance is durable as before.

Purge: the decision that ends an original's use marks its row in the decision's own
transaction (release(), drop()); purge_due() then deletes the files, makes the deletions
durable, and deletes the rows. A crash in between leaves rows still due, which the next pass
of any series worker, or `carina fsck --repair`, finishes."""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from psycopg import Connection, Cursor
from psycopg_pool import ConnectionPool

from . import jobs
from .errors import ArchiveError

log = logging.getLogger(__name__)

# File layout: MAGIC, the key check, the nonce, then the AES-GCM ciphertext and its tag.
MAGIC = b"CARINAO1"
_CHECK = 8
_NONCE = 12
_TAG = 16
_HEADER = len(MAGIC) + _CHECK + _NONCE
# The most AES-GCM seals in one piece here (the library's limit, 2**31 - 1 bytes, less the
# associated data): a larger original is not kept, and its series cannot be reprocessed.
MAX_SIZE = 2**31 - 1 - 4096
# Files purged per round trip of purge_due().
_BATCH = 500
# Files younger than this may belong to an instance whose index transaction is in flight.
ORPHAN_GRACE_SECONDS = 3600


class OriginalUnreadable(ArchiveError):
    """A kept original is missing, or cannot be decrypted (another key, altered, damaged)."""


def path(root: Path, name: str) -> Path:
    """Where the original of that name lives in the area at root (256 sub-directories, never
    removed, so that a purge never races a write into the same directory)."""
    return root / name[:2] / name


@lru_cache(maxsize=256)
def collection_key(master_key: bytes, collection: str) -> bytes:
    """The collection's AES-256 key, derived from the originals master key (HKDF-SHA256)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"carina originals v1\x00" + collection.encode(),
    )
    return hkdf.derive(master_key)


def _key_check(key: bytes) -> bytes:
    """A short value that tells "another key" apart from "altered" without revealing the key."""
    return hmac.new(key, b"carina originals key check", hashlib.sha256).digest()[:_CHECK]


@dataclass(frozen=True)
class Sealer:
    """The originals of one collection: what an intake worker needs to keep and read them
    (small and picklable)."""

    root: str
    collection: str
    key: bytes

    def path(self, name: str) -> Path:
        """Where the file of that name lives."""
        return path(Path(self.root), name)

    def _aad(self, sop_uid: str, name: str) -> bytes:
        return b"\x00".join((MAGIC, self.collection.encode(), sop_uid.encode(), name.encode()))

    def keep(self, sop_uid: str, original: bytes | bytearray | str) -> str | None:
        """Encrypt the original (its bytes, or the path of a file holding them) into a new file
        for the de-identified instance sop_uid; the file's name (None: too large to keep)."""
        name = secrets.token_hex(16)
        fd = self._seal(self.path(name), name, sop_uid, original)
        if fd is None:
            return None
        os.close(fd)
        return name

    def pending_path(self, directory: Path, sop_uid: str) -> Path:
        """A new path in directory (of the intake area) for the pending original of the
        de-identified instance sop_uid: named pending_name(), its name in the originals area
        drawn as keep() draws it."""
        return directory / pending_name(secrets.token_hex(16), sop_uid)

    def write_pending(self, path: Path, original: bytes | bytearray) -> bool:
        """Encrypt the original into path (pending_path()) as keep() does: a pending original,
        which adopt() later moves to where keep() would have put it. Durable when this
        returns (the file and its directory flushed); False: too large to keep, nothing
        written."""
        name, sop_uid = parse_pending_name(path.name)
        fd = self._seal(path, name, sop_uid, original)
        if fd is None:
            return False
        try:
            os.fsync(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        sync_dirs([path.parent])
        return True

    def _seal(
        self, path: Path, name: str, sop_uid: str, original: bytes | bytearray | str
    ) -> int | None:
        """Write the sealed original to a new file at path; its descriptor, still open (None:
        too large to keep, nothing written)."""
        size = os.path.getsize(original) if isinstance(original, str) else len(original)
        if size > MAX_SIZE:
            log.warning("original of instance %s not kept: %d bytes", sop_uid, size)
            return None
        data = Path(original).read_bytes() if isinstance(original, str) else original
        nonce = os.urandom(_NONCE)
        # AESGCM reads any buffer: a bytearray is encrypted where it is, not copied first.
        sealed = AESGCM(self.key).encrypt(nonce, data, self._aad(sop_uid, name))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:  # the first file of its directory (once per directory)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, [MAGIC + _key_check(self.key) + nonce, memoryview(sealed)])
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd

    def read(self, name: str, sop_uid: str) -> bytes:
        """The original kept under name for sop_uid, decrypted and authenticated;
        OriginalUnreadable saying why when it cannot be."""
        return self.read_file(self.path(name), name, sop_uid)

    def read_pending(self, path: Path) -> bytes:
        """A pending original (write_pending()), decrypted and authenticated."""
        name, sop_uid = parse_pending_name(path.name)
        return self.read_file(path, name, sop_uid)

    def read_file(self, path: Path, name: str, sop_uid: str) -> bytes:
        """The original sealed in the file at path under name for sop_uid."""
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise OriginalUnreadable(f"the original of instance {sop_uid} is missing") from None
        if len(blob) < _HEADER + _TAG or not blob.startswith(MAGIC):
            raise OriginalUnreadable(f"the original of instance {sop_uid} is damaged")
        if not hmac.compare_digest(blob[len(MAGIC) : len(MAGIC) + _CHECK], _key_check(self.key)):
            raise OriginalUnreadable(
                f"the original of instance {sop_uid} was encrypted with another originals key "
                "(CARINA_ORIGINALS_KEY or the data directory's originals.key)"
            )
        nonce = blob[len(MAGIC) + _CHECK : _HEADER]
        try:
            return AESGCM(self.key).decrypt(nonce, blob[_HEADER:], self._aad(sop_uid, name))
        except InvalidTag:
            raise OriginalUnreadable(
                f"the original of instance {sop_uid} fails authentication: altered, damaged, "
                "or not this instance's"
            ) from None

    def adopt(self, pending: Path) -> str:
        """Move a pending original to where keep() puts originals; its name there."""
        name, _ = parse_pending_name(pending.name)
        target = self.path(name)
        try:
            os.replace(pending, target)
        except FileNotFoundError:
            if not pending.exists():
                raise
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(pending, target)
        except OSError as e:  # the originals area is on another file system
            if e.errno != errno.EXDEV:
                raise
            target.parent.mkdir(mode=0o700, exist_ok=True)
            shutil.copyfile(pending, target)
            pending.unlink()
        return name


def pending_name(name: str, sop_uid: str) -> str:
    """The file name of a pending original: its name in the originals area and the
    de-identified SOP Instance UID its seal is bound to (nothing identified)."""
    return f"{name}-{sop_uid}"


def parse_pending_name(file_name: str) -> tuple[str, str]:
    """(name, de-identified SOP Instance UID) of a pending original's file name."""
    name, _, sop_uid = file_name.partition("-")
    return name, sop_uid


@dataclass(frozen=True)
class Area:
    """The originals area of a deployment: its directory, master key and retention."""

    root: Path
    master_key: bytes
    # Days the originals of a published series are kept; 0: purged at once.
    retention_days: float = 0.0

    def sealer(self, collection: str) -> Sealer:
        """The collection's sealer (its own derived key)."""
        return Sealer(str(self.root), collection, collection_key(self.master_key, collection))


class KeptRecord(Protocol):
    """What the index transaction needs of an instance whose original was kept."""

    collection: str
    sop_uid: str
    series_uid: str
    original: str | None


def record(cur: Cursor, records: Iterable[KeptRecord]) -> None:
    """Index the originals kept for these instances (in the transaction that indexes them).
    A re-sent instance adds a row: the newest one is its original, older ones go with it."""
    rows = [(r.original, r.sop_uid, r.series_uid, r.collection) for r in records if r.original]
    if rows:
        cur.executemany(
            "INSERT INTO originals (name, sop_uid, series_uid, collection)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
            rows,
        )


@dataclass(frozen=True)
class Kept:
    """The newest original kept for one instance."""

    name: str
    sop_uid: str
    collection: str


def of_series(conn: Connection, series_uid: str) -> list[Kept]:
    """The newest original of each instance of a series that has one and is not to be purged at
    once (a published series' are, for their retention period), in SOP Instance UID order."""
    rows = conn.execute(
        "SELECT DISTINCT ON (o.sop_uid) o.name, o.sop_uid, o.collection FROM originals o"
        " JOIN instances i ON i.sop_uid = o.sop_uid AND i.series_uid = o.series_uid"
        " WHERE o.series_uid = %s AND o.purge_after IS DISTINCT FROM '-infinity'"
        " ORDER BY o.sop_uid, o.stored_at DESC, o.name",
        (series_uid,),
    ).fetchall()
    return [Kept(*r) for r in rows]


def _wake(conn: Connection | Cursor) -> None:
    """Wake idle series workers (they purge what is due after each pass), at commit."""
    conn.execute("SELECT pg_notify(%s, '')", (jobs.CHANNEL,))


def release(conn: Connection, series_uid: str) -> None:
    """The series was published: its originals are due once the retention period has passed
    (in the deciding transaction, whose writes may be pipelined: no answer is read)."""
    conn.execute(
        "WITH marked AS (UPDATE originals SET purge_after = now()"
        " WHERE series_uid = %s AND purge_after IS NULL RETURNING 1)"
        # Wake idle series workers (they purge what is due after each pass), at commit.
        " SELECT pg_notify(%s, '') WHERE EXISTS (SELECT 1 FROM marked)",
        (series_uid, jobs.CHANNEL),
    )


def drop(
    cur: Cursor | Connection, series_uids: Sequence[str] = (), sop_uids: Sequence[str] = ()
) -> int:
    """These series were rejected, or their instances erased: their originals are due at once,
    whatever the retention (in the caller's transaction). The count marked."""
    done = cur.execute(
        "UPDATE originals SET purge_after = '-infinity'"
        " WHERE (series_uid = ANY(%s) OR sop_uid = ANY(%s))"
        " AND purge_after IS DISTINCT FROM '-infinity'",
        (list(series_uids), list(sop_uids)),
    )
    count = done.rowcount
    if count:
        _wake(cur)
    return count


def hold(conn: Connection, series_uid: str) -> None:
    """The series is undecided or held again (reprocessed, or re-evaluated and held): its
    originals of a published past, still in their retention period, are kept again."""
    conn.execute(
        "UPDATE originals SET purge_after = NULL WHERE series_uid = %s"
        " AND purge_after > '-infinity'",
        (series_uid,),
    )


def purge_due(pool: ConnectionPool, area: Area) -> int:
    """Delete the files of every original due for purging, durably, then their rows; the
    count. Safe to run again after a crash, and from several processes at once."""
    purged = 0
    while True:
        with pool.connection() as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM originals"
                    " WHERE purge_after <= now() - %s * interval '1 day' ORDER BY name LIMIT %s",
                    (area.retention_days, _BATCH),
                )
            ]
        if not names:
            break
        dirs = set()
        for name in names:
            file = path(area.root, name)
            file.unlink(missing_ok=True)
            dirs.add(file.parent)
        sync_dirs(dirs)  # the deletions survive a crash before the rows go
        with pool.connection() as conn:
            conn.execute("DELETE FROM originals WHERE name = ANY(%s)", (names,))
        purged += len(names)
    if purged:
        log.info("purged %d originals", purged)
    return purged


def _write_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    """Write buffers to fd in order, in one system call when the kernel takes them whole."""
    while buffers:
        written = os.writev(fd, buffers)
        if not written:
            raise OSError(errno.EIO, "nothing written")
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers = buffers[1:]
        if buffers and written:
            buffers = [memoryview(buffers[0])[written:], *buffers[1:]]


def sync_dirs(dirs: Iterable[Path]) -> None:
    """fsync each directory that exists (its entries survive a crash)."""
    for d in dirs:
        try:
            fd = os.open(d, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Check:
    """What `carina fsck` found in the originals area: names, never content."""

    kept: int = 0
    due: int = 0  # rows due for purging (an interrupted purge, or no worker running)
    missing: list[str] = field(default_factory=list)  # rows whose file is gone
    orphans: list[str] = field(default_factory=list)  # files no row names
    unowned: int = 0  # rows whose instance is gone, not marked for purging
    repaired: int = 0

    @property
    def problems(self) -> int:
        """Everything found that is not as it should be."""
        return self.due + len(self.missing) + len(self.orphans) + self.unowned


def check(pool: ConnectionPool, area: Area, *, repair: bool = False) -> Check:
    """Compare the originals table with the area; with repair, finish due purges, mark rows
    of instances no longer held, remove rows without a file and files without a row."""
    found = Check()
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT name, purge_after <= now() - %s * interval '1 day',"
            " NOT EXISTS (SELECT 1 FROM instances i WHERE i.sop_uid = o.sop_uid)"
            " AND purge_after IS NULL FROM originals o",
            (area.retention_days,),
        ).fetchall()
    names = {r[0] for r in rows}
    found.kept = len(rows)
    found.due = sum(1 for r in rows if r[1])
    found.unowned = sum(1 for r in rows if r[2])
    found.missing = sorted(r[0] for r in rows if not r[1] and not path(area.root, r[0]).exists())
    cutoff = time.time() - ORPHAN_GRACE_SECONDS
    if area.root.is_dir():
        found.orphans = sorted(
            p.name
            for p in area.root.glob("*/*")
            if p.is_file() and p.name not in names and p.stat().st_mtime < cutoff
        )
    if not repair:
        return found
    with pool.connection() as conn, conn.transaction():
        conn.execute(
            "UPDATE originals o SET purge_after = '-infinity' WHERE purge_after IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.sop_uid = o.sop_uid)"
        )
        conn.execute("DELETE FROM originals WHERE name = ANY(%s)", (found.missing,))
    for name in found.orphans:
        path(area.root, name).unlink(missing_ok=True)
    found.repaired = purge_due(pool, area) + len(found.missing) + len(found.orphans)
    return found
