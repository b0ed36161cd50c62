"""Object storage for de-identified instances: a filesystem backend and an S3 backend."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .errors import NotFound, OutOfResources, StorageError

CHUNK = 1 << 20
# Keys are made by Carina from UIDs; anything else is refused before touching a path.
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (``..``, absolute paths, odd characters)."""
    if not _SAFE_KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise StorageError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    """What the archive needs from an object store."""

    def put_file(self, key: str, path: Path) -> None:
        """Move the finished file at path into the store under key (replacing any old one)."""

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream the object's bytes."""

    def read(self, key: str) -> bytes:
        """The whole object (for small objects only)."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    def exists(self, key: str) -> bool:
        """Whether the object is there."""


class FilesystemStore:
    """Objects as files under a root directory; staging files must be on the same filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        """Rename the (already fsynced) staged file into place, then sync its directory."""
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(path, dest)
            except OSError as e:
                if e.errno != 18:  # EXDEV: staging on another filesystem
                    raise
                shutil.move(path, dest)
            fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfResources(f"object store full: {e.strerror}") from e
            raise StorageError(f"cannot store object: {e.strerror}") from e

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream the file in chunks."""
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError as e:
            raise NotFound(key) from e
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def read(self, key: str) -> bytes:
        """The whole file."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise NotFound(key) from e

    def delete(self, key: str) -> None:
        """Unlink the file if present."""
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return self._path(key).is_file()
