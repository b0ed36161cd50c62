"""Object storage for de-identified instances: a filesystem backend and an S3 backend."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import certifi
import numpy as np
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error, ServerError

from .errors import ArchiveError, NotFound, OutOfResources, StorageError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# preadv2's flag to read only what the page cache holds (Linux 4.14; None elsewhere).
RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
# Keys are made by Carina from UIDs; anything else is refused before touching a path.
_SAFE_KEY = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (``..``, absolute paths, odd characters)."""
    if not _SAFE_KEY.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise StorageError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    """What the archive needs from an object store."""

    def put_file(self, key: str, path: Path) -> None:
        """Move the finished file at path into the store under key (replacing any old one)."""

    # Whether a staged file becomes the stored object where it lies (renamed into place and
    # flushed there), so that writing it to disk early (start_writeback) spares its flush
    # the writing; False where it is copied elsewhere and removed (uploaded).
    stores_staged_in_place: bool

    def put_files(
        self, items: Sequence[tuple[str, Path]], flush_each: bool = False
    ) -> list[ArchiveError | None]:
        """Move many staged files in; when it returns, every item whose entry is None is
        durable. One error per failed item, in order (a failure never stops the others).
        flush_each: a batch nobody waits for, made durable file by file however large (a
        filesystem's store would otherwise flush the whole filesystem at once, which holds up
        every other flush meanwhile: those a C-STORE status waits for among them)."""

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream the object's bytes."""

    def read(self, key: str) -> bytes:
        """The whole object (for small objects only)."""

    def read_into(self, key: str, buffer: memoryview) -> None:
        """Fill buffer with the whole object; StorageError if it is not exactly that long."""

    def read_cached_into(self, key: str, buffer: memoryview) -> bool:
        """read_into from memory only, for an event loop that must not wait for a disk or the
        network: False (buffer partly filled) when some of the object is not in memory."""

    def map_cached(self, key: str, length: int) -> memoryview | None:
        """The whole object (length bytes, StorageError if it is not) as a read-only view of
        memory it already occupies, for an event loop to send without copying it first; None
        when some of it is not in memory."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    def exists(self, key: str) -> bool:
        """Whether the object is there."""

    def inventory(self) -> Iterator[tuple[str, int]]:
        """Every object's key and size (for consistency checks)."""


class FilesystemStore:
    """Objects as files under a root directory; staging files must be on the same filesystem."""

    stores_staged_in_place = True

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        """Move one staged file into place, durably."""
        error = self.put_files([(key, path)])[0]
        if error is not None:
            raise error

    def put_files(
        self, items: Sequence[tuple[str, Path]], flush_each: bool = False
    ) -> list[ArchiveError | None]:
        """Rename each staged file into place, then make them all durable: a few files (any
        number with flush_each) with an fsync each and one of every directory whose entries
        changed, more with one filesystem sync (group commit)."""
        errors: list[ArchiveError | None] = []
        changed: set[Path] = set()
        for key, path in items:
            try:
                dest = self._path(key)
                with _os_errors():
                    changed.update(_make_dirs(dest.parent))
                    changed.add(dest.parent)
                    try:
                        os.replace(path, dest)
                    except OSError as e:
                        if e.errno != errno.EXDEV:
                            raise
                        _copy_synced(path, dest)  # staging on another filesystem
                        path.unlink()
                errors.append(None)
            except ArchiveError as e:
                errors.append(e)
        done = [key for (key, _), err in zip(items, errors, strict=True) if err is None]
        if done:
            try:
                with _os_errors():
                    if flush_each or len(done) <= _FSYNC_EACH_UP_TO:
                        for key in done:
                            _fsync_path(self._path(key))
                        for directory in sorted(changed, reverse=True):
                            _fsync_path(directory)
                    else:
                        _sync_filesystem(self.root)
            except ArchiveError as e:
                errors = [e if err is None else err for err in errors]
        return errors

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream the file in chunks."""
        path = self._path(key)
        with _os_errors():
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        return self._chunks(f, chunk_size)

    @staticmethod
    def _chunks(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
        with f, _os_errors():
            while chunk := f.read(chunk_size):
                yield chunk

    def read(self, key: str) -> bytes:
        """The whole file."""
        path = self._path(key)
        with _os_errors():
            return path.read_bytes()

    def read_into(self, key: str, buffer: memoryview) -> None:
        """Fill buffer with the whole file (read straight into it: no copy, no pathlib)."""
        self._read_into(key, buffer, 0)

    def read_cached_into(self, key: str, buffer: memoryview) -> bool:
        """read_into from the page cache only (preadv2's RWF_NOWAIT, Linux 4.14): False when
        some of the file would have to be read from the disk."""
        return RWF_NOWAIT is not None and self._read_into(key, buffer, RWF_NOWAIT)

    def map_cached(self, key: str, length: int) -> memoryview | None:
        """The file mapped into memory (mmap) when all its pages are in the page cache
        (mincore(2)); None when some are not (reading them would wait for the disk), on a
        system without mincore, or for an empty file. The mapping is unmapped once the view
        and every view made of it are gone. Stored files are replaced by rename and removed
        by unlink, never rewritten in place, so a mapping stays whole while it is sent."""
        if _MINCORE is None or length <= 0:
            return None
        with _os_errors():
            fd = os.open(f"{self.root}/{check_key(key)}", os.O_RDONLY)
            try:
                if os.fstat(fd).st_size != length:
                    raise StorageError("stored object is not as long as its index entry says")
                mapping = mmap.mmap(fd, length, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        view = memoryview(mapping)
        if _resident(view):
            return view
        view.release()
        mapping.close()
        return None

    def _read_into(self, key: str, buffer: memoryview, flags: int) -> bool:
        with _os_errors():
            fd = os.open(f"{self.root}/{check_key(key)}", os.O_RDONLY)
            try:
                if os.fstat(fd).st_size != len(buffer):
                    raise StorageError("stored object is not as long as its index entry says")
                done = 0
                while done < len(buffer):
                    try:
                        n = os.preadv(fd, [buffer[done:]], done, flags)
                    except BlockingIOError:  # RWF_NOWAIT: not all in the page cache
                        return False
                    except OSError as e:
                        if flags and e.errno == errno.EOPNOTSUPP:  # a filesystem without it
                            return False
                        raise
                    if not n:
                        raise StorageError("stored object is shorter than its index entry says")
                    done += n
                return True
            finally:
                os.close(fd)

    def delete(self, key: str) -> None:
        """Unlink the file if present."""
        path = self._path(key)
        with _os_errors():
            path.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        """Whether the file exists."""
        path = self._path(key)
        with _os_errors():
            return path.is_file()

    def inventory(self) -> Iterator[tuple[str, int]]:
        """Every file below the root, as (key, size); unfinished copies (.part) left out."""
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.name.endswith(".part"):
                yield path.relative_to(self.root).as_posix(), path.stat().st_size


@contextmanager
def _os_errors() -> Iterator[None]:
    """OS errors as the archive's errors: a missing object is NotFound, a full disk is
    OutOfResources, anything else StorageError (never a raw OSError to the caller)."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise NotFound("no such object") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfResources(f"object store full: {e.strerror}") from e
        raise StorageError(f"object store failed: {e.strerror}") from e


def _make_dirs(directory: Path) -> list[Path]:
    """Create directory and its missing parents; the directories that got a new entry (the
    parent of each one created), which must be synced too for it to survive a power loss
    (fsync of a file does not make its directory's entry durable, POSIX fsync(2))."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)  # another thread may have made it meanwhile
    return [created.parent for created in missing]


def _copy_synced(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)


_LIBC = ctypes.CDLL(None, use_errno=True)
# A few files (a C-STORE is a batch of one) are cheaper to fsync one by one than to flush the
# whole filesystem; a STOW batch is cheaper with one syncfs.
_FSYNC_EACH_UP_TO = 4


_SYNC_FILE_RANGE = getattr(_LIBC, "sync_file_range", None)
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    _SYNC_FILE_RANGE.restype = ctypes.c_int
# sync_file_range(2)'s SYNC_FILE_RANGE_WRITE: start writing out the dirty pages of the range
# (offset 0, length 0: the whole file), waiting for none of them.
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> bool:
    """Start writing the file's dirty pages to disk without waiting for them (Linux
    sync_file_range(2); elsewhere nothing): an fsync later finds them written or on their
    way, where it would otherwise write them all itself while its caller waits. Makes
    nothing durable, and its errors show at that fsync. Whether writing was started."""
    if _SYNC_FILE_RANGE is None:
        return False
    return bool(_SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0)


_MINCORE = getattr(_LIBC, "mincore", None)
if _MINCORE is not None:
    _MINCORE.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    _MINCORE.restype = ctypes.c_int
# mincore(2) sets the lowest bit of a page's byte when the page is resident; the others are
# reserved.
_RESIDENT_BIT = bytes(b & 1 for b in range(256))


def _resident(view: memoryview) -> bool:
    """Whether every page of a mapping (view of a whole mmap) is in memory."""
    assert _MINCORE is not None
    pages = -(-len(view) // mmap.PAGESIZE)
    vector = ctypes.create_string_buffer(pages)
    address = np.frombuffer(view, np.uint8).ctypes.data
    if _MINCORE(address, len(view), vector) != 0:
        return False
    return b"\0" not in vector.raw.translate(_RESIDENT_BIT)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_filesystem(path: Path) -> None:
    """Flush every file and directory of the filesystem holding path to disk: Linux syncfs(2)
    where the C library has it, else sync(2)."""
    syncfs = getattr(_LIBC, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


# Connect fails fast when the S3 server is down; reads may take long on big objects.
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 300.0
_POOL_SIZE = 32
# S3 error codes meaning "no space": MinIO's full disk and bucket quota, Ceph RGW's quota.
_FULL_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded"})


@contextmanager
def _s3_errors(operation: str, key: str | None = None) -> Iterator[None]:
    """minio, urllib3 and OS errors as the archive's errors; ours pass through unchanged."""
    what = f"S3 {operation}" + (f" of {key}" if key else "")
    try:
        yield
    except ArchiveError:
        raise
    except S3Error as e:
        if e.code == "NoSuchKey":
            raise NotFound(key or operation) from e
        if e.code in _FULL_CODES or (e.response is not None and e.response.status == 507):
            raise OutOfResources(f"{what}: storage full ({e.code})") from e
        raise StorageError(f"{what} failed: {e.code}") from e
    except ServerError as e:
        if e.status_code == 507:
            raise OutOfResources(f"{what}: storage full (HTTP 507)") from e
        raise StorageError(f"{what} failed: HTTP {e.status_code}") from e
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as e:
        raise StorageError(f"{what} failed: {type(e).__name__}") from e


class S3Store:
    """Objects in one bucket of an S3 API (AWS S3, MinIO, SeaweedFS) through the minio client."""

    stores_staged_in_place = False

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
    ) -> None:
        """Connect to endpoint (``host:port``) and create the bucket when it is missing."""
        self.endpoint = endpoint
        self.bucket = bucket
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
            maxsize=_POOL_SIZE,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key or None,
                secret_key=secret_key or None,
                secure=secure,
                region=region,
                http_client=http,
            )
        except ValueError as e:  # minio validates the endpoint and credentials up front
            raise StorageError(f"invalid S3 settings for {endpoint!r}: {e}") from e
        self._ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    def _ensure_bucket(self) -> None:
        """Create the bucket unless it exists (tolerating a concurrent creator)."""
        try:
            with _s3_errors("bucket check"):
                if self._client.bucket_exists(self.bucket):
                    return
            with _s3_errors("bucket creation"):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as e:
                    # Another Carina process may have created it between the check and here.
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                    if not self._client.bucket_exists(self.bucket):
                        raise
        except ValueError as e:  # minio checks bucket names (and region) before any request
            raise StorageError(f"S3 bucket {self.bucket!r} refused: {e}") from e

    def put_file(self, key: str, path: Path) -> None:
        """Upload the finished staged file (multipart when large), then remove the local copy."""
        key = check_key(key)
        with _s3_errors("upload", key):
            self._client.fput_object(self.bucket, key, str(path))
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            # The object is safely stored; a leftover staging file is not worth failing for.
            log.warning("stored %s but could not remove staging file: %s", key, e.strerror)

    def put_files(
        self, items: Sequence[tuple[str, Path]], flush_each: bool = False
    ) -> list[ArchiveError | None]:
        """Upload each staged file; an upload that returned is durable on the S3 side."""
        errors: list[ArchiveError | None] = []
        for key, path in items:
            try:
                self.put_file(key, path)
                errors.append(None)
            except ArchiveError as e:
                errors.append(e)
        return errors

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream the object; the GET starts on first iteration and its connection is always
        released, also when the caller stops early."""
        return self._stream(check_key(key), chunk_size)

    def _stream(self, key: str, chunk_size: int) -> Iterator[bytes]:
        """GET the object and yield its body; close and release the connection however it ends."""
        with _s3_errors("download", key):
            response = self._client.get_object(self.bucket, key)
        try:
            with _s3_errors("download", key):
                yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def read(self, key: str) -> bytes:
        """The whole object."""
        return b"".join(self.iter_chunks(key))

    def read_into(self, key: str, buffer: memoryview) -> None:
        """Fill buffer with the whole object, as it is downloaded."""
        done = 0
        for chunk in self.iter_chunks(key):
            if done + len(chunk) > len(buffer):
                raise StorageError("stored object is longer than its index entry says")
            buffer[done : done + len(chunk)] = chunk
            done += len(chunk)
        if done != len(buffer):
            raise StorageError("stored object is shorter than its index entry says")

    def read_cached_into(self, key: str, buffer: memoryview) -> bool:
        """Nothing of a bucket is in local memory: always False."""
        return False

    def map_cached(self, key: str, length: int) -> memoryview | None:
        """Nothing of a bucket is in local memory: always None."""
        return None

    def delete(self, key: str) -> None:
        """Remove the object; S3 answers a missing key with success too."""
        key = check_key(key)
        try:
            with _s3_errors("delete", key):
                self._client.remove_object(self.bucket, key)
        except NotFound:
            pass

    def exists(self, key: str) -> bool:
        """Whether the object is there (a HEAD request)."""
        key = check_key(key)
        try:
            with _s3_errors("stat", key):
                self._client.stat_object(self.bucket, key)
        except NotFound:
            return False
        return True

    def inventory(self) -> Iterator[tuple[str, int]]:
        """Every object in the bucket, as (key, size)."""
        with _s3_errors("listing"):
            for obj in self._client.list_objects(self.bucket, recursive=True):
                yield str(obj.object_name), int(obj.size or 0)
