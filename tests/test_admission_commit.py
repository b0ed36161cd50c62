"""Early admission's committer (curation/admission.py) in this process: instances acknowledged
on admission are committed in batches, but a sender waiting for its own (an association's
release) does not wait out the batching window."""

from __future__ import annotations

import mmap
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
from pydicom.uid import CTImageStorage

from carina.archive import collections, originals
from carina.curation import admission
from carina.curation.admission import Admitted
from carina.curation.intake import PROCESSING_FAILURE, Refusal
from carina.curation.pseudonyms import Pseudonymizer, collection_key
from carina.runtime import Runtime
from carina.settings import Settings
from tests.conftest import indexed
from tests.factory import Phi, ct_instance, ct_series, to_bytes
from tests.pagecache import dirty_pages, require_page_flags

SECRET = "admission-commit"
DEIDENTIFIED = Pseudonymizer(collection_key(SECRET.encode(), "default"))


@pytest.fixture(scope="module")
def runtime(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """Carina's runtime in this process (early admission on, its default)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("carina"),
        database_url=database_url,
        secret_key=SECRET,
        workers=1,
    )
    started = Runtime.start(settings)
    assert started.admitter is not None
    yield started
    started.close()


def test_a_waiting_sender_is_committed_without_waiting_out_the_batching_window(
    runtime: Runtime, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window far longer than the wait below: only a committer that stops batching for a
    # waiting sender commits within it.
    monkeypatch.setattr(admission, "COMMIT_WINDOW", 120.0)
    admitter = runtime.admitter
    assert admitter is not None
    group = admitter.open("default", None)
    sent = ct_series(Phi(), 3, rows=16, columns=16)
    base = runtime.intake.context()
    for ds in sent:
        ctx = replace(base, sop_class=CTImageStorage, sop_instance=str(ds.SOPInstanceUID))
        assert isinstance(admitter.admit(to_bytes(ds), ctx, group, warnings=True), Admitted)
    sops = [DEIDENTIFIED.uid(ds.SOPInstanceUID) for ds in sent]

    started = time.monotonic()
    assert group.wait(30.0)
    assert time.monotonic() - started < 30.0
    assert indexed(database_url, sops) == 3
    group.close()
    admitter.tidy(group)


def test_an_admitted_instance_is_on_its_way_to_disk_before_its_batch_is_committed(
    runtime: Runtime, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The committer flushes a batch file by file: the worker has already started writing
    # its staged file (a filesystem store's), so that flush finds it written.
    require_page_flags(runtime.intake.staging_dir)
    monkeypatch.setattr(admission, "COMMIT_WINDOW", 120.0)  # the batch waits meanwhile
    admitter = runtime.admitter
    assert admitter is not None
    group = admitter.open("default", None)
    before = set(runtime.intake.staging_dir.glob("*.dcm"))
    ds = ct_instance(Phi(), 1, rows=512, columns=512)
    ctx = replace(
        runtime.intake.context(), sop_class=CTImageStorage, sop_instance=str(ds.SOPInstanceUID)
    )
    assert isinstance(admitter.admit(to_bytes(ds), ctx, group, warnings=True), Admitted)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        staged = sorted(set(runtime.intake.staging_dir.glob("*.dcm")) - before)
        if staged:
            dirty, pages = dirty_pages(staged[0])
            if pages * mmap.PAGESIZE > 512 * 512 * 2 and dirty == 0:  # whole, and written out
                break
        time.sleep(0.01)
    else:
        pytest.fail("the staged file still waits to be written out, by the batch's flush")
    assert group.wait(30.0)
    assert indexed(database_url, [DEIDENTIFIED.uid(ds.SOPInstanceUID)]) == 1
    group.close()
    admitter.tidy(group)


def test_with_uids_retained_the_pending_original_becomes_the_kept_one(
    runtime: Runtime, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PS3.15 Retain UIDs Option: the de-identified instance keeps its SOP Instance UID, which
    # the pending original is named and sealed for, so that it is adopted as it is, not
    # deleted while the worker seals and writes a second copy.
    collections.create(runtime.pool, "KEEPUIDS", deid_options=("retain_uids",))
    monkeypatch.setattr(admission, "COMMIT_WINDOW", 120.0)  # pending until the wait below
    admitter = runtime.admitter
    assert admitter is not None
    group = admitter.open("KEEPUIDS", None)
    ds = ct_instance(Phi(), 1, rows=16, columns=16)
    sop = str(ds.SOPInstanceUID)
    ctx = replace(runtime.intake.context("KEEPUIDS"), sop_class=CTImageStorage, sop_instance=sop)
    admitted = admitter.admit(to_bytes(ds), ctx, group, warnings=True)
    assert isinstance(admitted, Admitted) and admitted.sop_uid == sop
    assert admitted.series_uid == str(ds.SeriesInstanceUID)
    [pending] = [p for p in group.directory.iterdir() if p.name.endswith(sop)]
    name, sealed_for = originals.parse_pending_name(pending.name)
    assert sealed_for == sop
    assert group.wait(30.0)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT name FROM originals WHERE sop_uid = %s", (sop,)).fetchall()
    assert rows == [(name,)]  # the pending original, adopted: no second copy
    assert runtime.intake.originals is not None
    assert originals.path(runtime.intake.originals.root, name).is_file()
    group.close()
    admitter.tidy(group)


def test_an_original_that_cannot_be_kept_refuses_its_instance_and_nothing_of_it_is_indexed(
    runtime: Runtime, database_url: str
) -> None:
    admitter = runtime.admitter
    assert admitter is not None
    broken = admitter.open("default", None)
    # The sender's directory of the intake area became a file: no pending original can be
    # written there, while the worker parses and checks the instance as usual.
    shutil.rmtree(broken.directory)
    broken.directory.write_bytes(b"")
    lost, kept = ct_series(Phi(), 2, rows=16, columns=16)
    base = runtime.intake.context()
    ctx = replace(base, sop_class=CTImageStorage, sop_instance=str(lost.SOPInstanceUID))
    refused = admitter.admit(to_bytes(lost), ctx, broken, warnings=True)
    assert isinstance(refused, Refusal)
    assert refused.code == PROCESSING_FAILURE
    assert broken.wait(0)  # nothing of it outstanding

    # One worker and one finisher: the next sender's instance is finished after it.
    group = admitter.open("default", None)
    ctx = replace(base, sop_class=CTImageStorage, sop_instance=str(kept.SOPInstanceUID))
    assert isinstance(admitter.admit(to_bytes(kept), ctx, group, warnings=True), Admitted)
    assert group.wait(30.0)
    assert indexed(database_url, [DEIDENTIFIED.uid(kept.SOPInstanceUID)]) == 1
    assert indexed(database_url, [DEIDENTIFIED.uid(lost.SOPInstanceUID)]) == 0
    assert list(runtime.intake.staging_dir.iterdir()) == []
    broken.directory.unlink()
    for g in (broken, group):
        g.close()
    admitter.tidy(group)
