"""The object store backends behave the same: FilesystemStore in tmp_path and S3Store against a
real SeaweedFS S3 server on loopback; and Carina serves STOW/WADO-RS with its objects in S3."""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from carina.archive import storage
from carina.archive.errors import NotFound, StorageError
from carina.archive.storage import CHUNK, FilesystemStore, ObjectStore, S3Store
from tests.conftest import Server, free_port, wait_for_series
from tests.factory import Phi, ct_series
from tests.pagecache import dirty_pages, evict, in_memory_filesystem, require_page_flags
from tests.s3server import S3Server, start_weed

# More than one multipart part for the minio client (5 MiB parts) and many read chunks;
# not a multiple of either, so the last part and the last chunk are short.
BIG = 12 * 1024 * 1024 + 12345

BAD_KEYS = [
    "..",
    ".",
    "../escape.dcm",
    "a/../../escape.dcm",
    "a/./b.dcm",
    "/etc/passwd",
    "/abs/key.dcm",
    "a//b.dcm",
    "a/",
    "",
    "a b.dcm",
    "a\\b.dcm",
    "a?b.dcm",
    "a%2F..%2Fb",
    "é.dcm",
    "a\x00b",
    "C:x.dcm",
    "a/b.dcm\n",
]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS (`weed mini`) on loopback for this module. Not starting is an error, not a skip."""
    server = start_weed(tmp_path_factory.mktemp("weed"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_s3_store(s3_server: S3Server) -> S3Store:
    """One bucket for the behaviour tests (each test uses its own key prefix)."""
    return S3Store(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket="carina-behaviour",
    )


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Each backend in turn."""
    if request.param == "filesystem":
        return FilesystemStore(tmp_path / "objects")
    return request.getfixturevalue("shared_s3_store")  # type: ignore[no-any-return]


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own (the S3 bucket is shared within the module)."""
    return f"1.2.826.0.1.{secrets.randbelow(10**9)}"


@pytest.fixture
def stage(tmp_path: Path) -> Callable[[bytes], Path]:
    """Write bytes to a staging file as intake would, on the store's filesystem."""
    staging = tmp_path / "staging"
    staging.mkdir()

    def write(data: bytes) -> Path:
        path = staging / f"{secrets.token_hex(8)}.dcm"
        path.write_bytes(data)
        return path

    return write


def random_bytes(n: int) -> bytes:
    """n bytes that no other test writes."""
    return secrets.token_bytes(n)


def test_put_file_then_read_returns_same_bytes(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    data = random_bytes(BIG)
    store.put_file(f"{prefix}/1.2.3/4.5.6.dcm", stage(data))
    assert store.read(f"{prefix}/1.2.3/4.5.6.dcm") == data


def test_read_into_fills_a_buffer_of_the_stored_length_and_refuses_another(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    data = random_bytes(BIG)
    store.put_file(f"{prefix}/1.2.3/4.5.6.dcm", stage(data))
    buffer = bytearray(BIG + 2)
    store.read_into(f"{prefix}/1.2.3/4.5.6.dcm", memoryview(buffer)[1:-1])
    assert buffer == b"\0" + data + b"\0"
    for wrong in (BIG - 1, BIG + 1):
        with pytest.raises(StorageError):
            store.read_into(f"{prefix}/1.2.3/4.5.6.dcm", memoryview(bytearray(wrong)))
    with pytest.raises(NotFound):
        store.read_into(f"{prefix}/never/stored.dcm", memoryview(bytearray(BIG)))


def test_read_cached_into_reads_only_what_is_in_memory(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    """For the event loop: a file in the page cache is read; a bucket, or a file that would
    have to come from the disk, is not (False), and read_into still reads it."""
    data = random_bytes(BIG)
    key = f"{prefix}/1.2.3/4.5.6.dcm"
    store.put_file(key, stage(data))
    buffer = bytearray(BIG)
    if not isinstance(store, FilesystemStore):
        assert not store.read_cached_into(key, memoryview(buffer))
        return
    assert store.read_cached_into(key, memoryview(buffer))  # just written: in the page cache
    assert buffer == data
    with pytest.raises(StorageError):
        store.read_cached_into(key, memoryview(bytearray(BIG + 1)))
    if in_memory_filesystem(store.root):
        pytest.skip("this filesystem keeps every page in memory (tmpfs)")
    evict(store.root / key)
    assert not store.read_cached_into(key, memoryview(bytearray(BIG)))
    store.read_into(key, memoryview(buffer))
    assert buffer == data


def test_map_cached_maps_only_what_is_in_memory(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    """For the event loop to send without copying: a file all in the page cache is mapped,
    its bytes read from the mapping; a bucket, or a file some of whose pages would have to
    come from the disk, is not (None)."""
    data = random_bytes(BIG)
    key = f"{prefix}/1.2.3/4.5.6.dcm"
    store.put_file(key, stage(data))
    if not isinstance(store, FilesystemStore):
        assert store.map_cached(key, BIG) is None
        return
    view = store.map_cached(key, BIG)  # just written: in the page cache
    assert view is not None and view.readonly and view == data
    with pytest.raises(StorageError):
        store.map_cached(key, BIG + 1)
    with pytest.raises(NotFound):
        store.map_cached(f"{prefix}/never/stored.dcm", BIG)
    # The mapping outlives the file's name (as a retrieve that overlaps an erasure does).
    store.delete(key)
    assert view == data
    view.release()
    store.put_file(key, stage(data))
    if in_memory_filesystem(store.root):
        pytest.skip("this filesystem keeps every page in memory (tmpfs)")
    evict(store.root / key)
    assert store.map_cached(key, BIG) is None
    store.read_into(key, memoryview(bytearray(BIG)))  # back in memory
    assert store.map_cached(key, BIG) == data


def test_put_file_then_iter_chunks_streams_same_bytes_in_bounded_chunks(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    data = random_bytes(BIG)
    key = f"{prefix}/1.2.3/4.5.6.dcm"
    store.put_file(key, stage(data))

    chunks = list(store.iter_chunks(key))
    assert b"".join(chunks) == data
    assert len(chunks) >= BIG // CHUNK
    assert all(0 < len(c) <= CHUNK for c in chunks)

    odd = 64 * 1024 + 1
    small = list(store.iter_chunks(key, chunk_size=odd))
    assert b"".join(small) == data
    assert all(0 < len(c) <= odd for c in small)


def test_iter_chunks_stopped_early_leaves_store_usable(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    data = random_bytes(BIG)
    key = f"{prefix}/1.2.3/4.5.6.dcm"
    store.put_file(key, stage(data))
    for _ in range(20):  # more than the S3 connection pool holds, if connections leaked
        stream = store.iter_chunks(key)
        assert next(stream) == data[:CHUNK]
        stream.close()  # type: ignore[attr-defined]
    assert store.read(key) == data


def test_put_file_removes_staged_file(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    staged = stage(b"DICM" * 100)
    store.put_file(f"{prefix}/a.dcm", staged)
    assert not staged.exists()
    assert store.exists(f"{prefix}/a.dcm")


def test_put_file_overwrite_replaces_object(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    key = f"{prefix}/1.2.3/4.5.6.dcm"
    store.put_file(key, stage(random_bytes(BIG)))
    newer = random_bytes(1000)
    store.put_file(key, stage(newer))
    assert store.read(key) == newer
    assert b"".join(store.iter_chunks(key)) == newer


def test_delete_then_exists_is_false_and_read_raises_not_found(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    key = f"{prefix}/1.2.3/4.5.6.dcm"
    store.put_file(key, stage(b"x" * 10))
    assert store.exists(key)
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(NotFound):
        store.read(key)
    with pytest.raises(NotFound):
        list(store.iter_chunks(key))


def test_delete_of_missing_key_is_fine(store: ObjectStore, prefix: str) -> None:
    store.delete(f"{prefix}/never/stored.dcm")
    assert not store.exists(f"{prefix}/never/stored.dcm")


def test_read_of_missing_key_raises_not_found(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(NotFound):
        store.read(f"{prefix}/never/stored.dcm")
    with pytest.raises(NotFound):
        list(store.iter_chunks(f"{prefix}/never/stored.dcm"))


def test_read_of_key_prefix_raises_not_found(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str, request: pytest.FixtureRequest
) -> None:
    """A study or series prefix is not an object (SeaweedFS keeps it as a directory)."""
    store.put_file(f"{prefix}/1.2.3/4.5.6.dcm", stage(b"x"))
    assert not store.exists(f"{prefix}/1.2.3")
    with pytest.raises(NotFound):
        store.read(f"{prefix}/1.2.3")


class _Tripwire:
    """Stands in for a backend's way to the outside (root path, S3 client): any use fails."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"object store I/O attempted ({name})")

    def __truediv__(self, other: object) -> object:
        raise AssertionError("object store path built")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_key_raises_storage_error_before_any_io(
    store: ObjectStore, stage: Callable[[bytes], Path], key: str
) -> None:
    armed = copy.copy(store)
    if isinstance(armed, FilesystemStore):
        armed.root = _Tripwire()  # type: ignore[assignment]
    else:
        armed._client = _Tripwire()  # type: ignore[attr-defined]
    staged = stage(b"x")
    with pytest.raises(StorageError):
        armed.put_file(key, staged)
    assert staged.exists()
    with pytest.raises(StorageError):
        armed.read(key)
    with pytest.raises(StorageError):
        list(armed.iter_chunks(key))
    with pytest.raises(StorageError):
        armed.delete(key)
    with pytest.raises(StorageError):
        armed.exists(key)


def test_weed_refuses_anonymous_and_wrongly_signed_requests(s3_server: S3Server) -> None:
    """The fixture's S3 really checks credentials, so S3Store's signing is exercised."""
    s3_server.client().make_bucket("carina-auth-check")
    for client in (
        Minio(s3_server.endpoint, secure=False),
        Minio(
            s3_server.endpoint, access_key=s3_server.access_key, secret_key="wrong", secure=False
        ),
    ):
        with pytest.raises(S3Error) as e:
            next(iter(client.list_objects("carina-auth-check")))
        assert e.value.code in ("AccessDenied", "SignatureDoesNotMatch")


def test_s3store_creates_missing_bucket_and_refuses_bad_credentials(
    s3_server: S3Server,
) -> None:
    bucket = "carina-created-" + secrets.token_hex(3)
    assert not s3_server.client().bucket_exists(bucket)
    S3Store(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=bucket,
    )
    assert s3_server.client().bucket_exists(bucket)
    # Opening it again (another Carina process) is fine.
    S3Store(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=bucket,
    )
    with pytest.raises(StorageError):
        S3Store(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key="wrong",
            bucket=bucket,
        )


def test_s3store_reports_unreachable_endpoint_as_storage_error() -> None:
    """After minio's retries (about 6 s of backoff) a refused connection is a StorageError."""
    with pytest.raises(StorageError):
        S3Store(
            endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b", bucket="carina"
        )


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "127.0.0.1:9000/path"])
def test_s3store_refuses_malformed_endpoint_as_storage_error(endpoint: str) -> None:
    with pytest.raises(StorageError):
        S3Store(endpoint=endpoint, access_key="a", secret_key="b", bucket="carina")


def test_s3store_refuses_invalid_bucket_name_as_storage_error(s3_server: S3Server) -> None:
    with pytest.raises(StorageError):
        S3Store(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket="No_Such..Bucket",
        )


@pytest.mark.slow
def test_stow_and_wado_through_carina_keep_objects_in_s3_not_on_disk(
    s3_server: S3Server, server_factory: Callable[..., Server]
) -> None:
    bucket = "carina-e2e"
    server = server_factory(
        CARINA_STORAGE="s3",
        CARINA_S3_ENDPOINT=s3_server.endpoint,
        CARINA_S3_ACCESS_KEY=s3_server.access_key,
        CARINA_S3_SECRET_KEY=s3_server.secret_key,
        CARINA_S3_BUCKET=bucket,
    )
    client = server.client()
    sent = ct_series(Phi(), 3)
    client.store_instances(sent)
    wait_for_series(server.database_url)

    series = client.search_for_series()
    assert len(series) == 1
    study_uid = series[0]["0020000D"]["Value"][0]
    series_uid = series[0]["0020000E"]["Value"][0]
    got = client.retrieve_series(study_uid, series_uid)
    assert len(got) == len(sent)
    by_number = {int(ds.InstanceNumber): ds for ds in got}
    for original in sent:
        assert by_number[int(original.InstanceNumber)].PixelData == original.PixelData

    in_bucket = {o.object_name for o in s3_server.client().list_objects(bucket, recursive=True)}
    assert in_bucket == {f"{study_uid}/{series_uid}/{ds.SOPInstanceUID}.dcm" for ds in got}
    on_disk = [p for p in (server.data_dir / "objects").rglob("*") if p.is_file()]
    assert on_disk == []


def test_inventory_lists_every_object_with_its_size(
    store: ObjectStore, stage: Callable[[bytes], Path], prefix: str
) -> None:
    store.put_file(f"{prefix}/a/1.dcm", stage(b"x" * 10))
    store.put_file(f"{prefix}/b/2.dcm", stage(b"y" * 20))
    listed = {k: n for k, n in store.inventory() if k.startswith(prefix + "/")}
    assert listed == {f"{prefix}/a/1.dcm": 10, f"{prefix}/b/2.dcm": 20}


def test_filesystem_put_syncs_every_directory_that_got_a_new_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsync of a file does not make its name durable: each directory that got a new entry is
    # synced too (the real fsync runs; the test only notes what it was given).
    synced: list[Path] = []
    real_fsync = storage._fsync_path

    def noting(path: Path) -> None:
        synced.append(path)
        real_fsync(path)

    monkeypatch.setattr(storage, "_fsync_path", noting)
    root = tmp_path / "objects"
    store = FilesystemStore(root)
    staged = tmp_path / "staged"
    staged.write_bytes(b"first")
    store.put_file("1.2.3/4.5.6/7.dcm", staged)  # a new study: root, study and series changed
    assert sorted(synced) == sorted(
        [root / "1.2.3/4.5.6/7.dcm", root / "1.2.3/4.5.6", root / "1.2.3", root]
    )
    synced.clear()
    staged.write_bytes(b"second")
    store.put_file("1.2.3/4.5.6/8.dcm", staged)  # same series: only its directory changed
    assert sorted(synced) == sorted([root / "1.2.3/4.5.6/8.dcm", root / "1.2.3/4.5.6"])


@pytest.mark.parametrize("flush_each", [False, True])
def test_filesystem_batch_flushes_the_whole_filesystem_unless_flush_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_each: bool
) -> None:
    # A large batch is made durable with one syncfs; a batch nobody waits for (flush_each: an
    # early-admitted C-STORE batch) file by file, so as not to hold up other flushes. The real
    # flushes run; the test only notes which.
    synced: list[Path] = []
    whole: list[Path] = []
    real_fsync, real_sync = storage._fsync_path, storage._sync_filesystem
    monkeypatch.setattr(storage, "_fsync_path", lambda p: (synced.append(p), real_fsync(p)))
    monkeypatch.setattr(storage, "_sync_filesystem", lambda p: (whole.append(p), real_sync(p)))
    store = FilesystemStore(tmp_path / "objects")
    items = []
    for n in range(storage._FSYNC_EACH_UP_TO + 3):
        staged = tmp_path / f"staged-{n}"
        staged.write_bytes(f"instance {n}".encode())
        items.append((f"1.2.3/4.5.6/{n}.dcm", staged))
    assert store.put_files(items, flush_each=flush_each) == [None] * len(items)
    if flush_each:
        assert whole == []
        assert {store._path(key) for key, _ in items} <= set(synced)
    else:
        assert whole == [tmp_path / "objects"] and synced == []
    assert [store.read(key) for key, _ in items] == [
        f"instance {n}".encode() for n in range(len(items))
    ]


def test_start_writeback_sends_a_written_file_to_disk_without_waiting(tmp_path: Path) -> None:
    require_page_flags(tmp_path)
    left, started = tmp_path / "left.dcm", tmp_path / "started.dcm"
    for path in (left, started):
        path.write_bytes(random_bytes(4 * 1024 * 1024))
    dirty, pages = dirty_pages(left)
    assert dirty == pages  # written, and waiting for writeback or an fsync
    fd = os.open(started, os.O_WRONLY)
    try:
        assert storage.start_writeback(fd)
    finally:
        os.close(fd)
    # Every page is on its way to the disk (under writeback) or there: none waits any more.
    assert dirty_pages(started)[0] == 0
    assert dirty_pages(left)[0] == pages


def test_only_a_store_that_keeps_staged_files_wants_them_written_early(
    store: ObjectStore,
) -> None:
    # A staged file becomes the filesystem store's object (its flush finds it written);
    # an S3 store uploads it and removes it: writing it to disk there is wasted.
    assert store.stores_staged_in_place is isinstance(store, FilesystemStore)
