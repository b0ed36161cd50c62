"""Intake's worker processes under a STOW-RS request: a worker that dies refuses only the part
it was on, and the pool goes on with a new worker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from carina.curation.intake import (
    PROCESSING_FAILURE,
    WORKER_ENDED,
    BatchResult,
    InstanceRecord,
    IntakeContext,
    Refusal,
)
from carina.runtime import Runtime
from carina.settings import Settings
from tests.factory import Phi, ct_series, to_bytes


@pytest.fixture(scope="module")
def runtime(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """Carina's runtime in this process (one worker) on the module's database."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("carina"),
        database_url=database_url,
        secret_key="intake-workers",
        workers=1,
    )
    started = Runtime.start(settings)
    yield started
    started.close()


def _reader_of(fifo: Path) -> int:
    """The pid of the other process that has fifo open (the worker reading it)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            if any(os.readlink(fd.path) == str(fifo) for fd in fds):
                return int(entry.name)
        except OSError:
            continue  # gone, or not ours to read
    raise AssertionError("no worker has the part open")


def test_worker_killed_mid_request_refuses_only_its_part(runtime: Runtime) -> None:
    """A part whose worker dies is refused with a reason; the parts before and after it (one
    queued behind it on the same worker) are stored; the next request is served as usual."""
    intake = runtime.intake
    first, after, later = (to_bytes(ds) for ds in ct_series(Phi(), 3))
    # A spooled part that is a FIFO: the worker blocks reading it until the test kills it.
    fifo = intake.intake_dir / "part-fifo.dcm"
    os.mkfifo(fifo)
    killed: list[int] = []

    def kill_its_reader() -> None:
        with open(fifo, "wb"):  # returns once the worker has opened the FIFO
            pid = _reader_of(fifo)
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_its_reader, daemon=True)
    killer.start()

    async def payloads() -> AsyncIterator[bytes | str]:
        yield first
        yield str(fifo)
        yield after

    async def run(parts: AsyncIterator[bytes | str]) -> BatchResult:
        return await intake.ingest(parts, intake.context())

    try:
        result = asyncio.run(asyncio.wait_for(run(payloads()), 120))
    finally:
        fifo.unlink(missing_ok=True)
    killer.join(10)
    assert killed
    stored, refused, stored_after = result.outcomes
    assert isinstance(stored, InstanceRecord) and isinstance(stored_after, InstanceRecord)
    assert refused == Refusal(PROCESSING_FAILURE, WORKER_ENDED)

    async def next_request() -> AsyncIterator[bytes]:
        yield later

    [outcome] = asyncio.run(run(next_request())).outcomes
    assert isinstance(outcome, InstanceRecord)


def test_meanwhile_runs_before_waiting_for_a_busy_worker(runtime: Runtime, tmp_path: Path) -> None:
    """A C-STORE's own work (sealing its original) is done while every worker is busy, not
    after one is free; the instance is then processed as usual."""
    intake = runtime.intake
    ctx = IntakeContext("default", b"k" * 32, "basic", (), str(tmp_path))
    payload = to_bytes(ct_series(Phi(), 1)[0])
    taken = intake._thread_workers.take()  # the only worker (workers=1)
    assert taken is not None
    ran = threading.Event()
    outcomes: list[object] = []
    caller = threading.Thread(
        target=lambda: outcomes.append(intake.start_one(payload, ctx, meanwhile=ran.set))
    )
    caller.start()
    try:
        assert ran.wait(10), "meanwhile waited for the busy worker"
        assert not outcomes  # still waiting for the worker
    finally:
        intake._thread_workers.give_back(taken)
    caller.join(30)
    (outcome,) = outcomes
    assert isinstance(outcome, InstanceRecord)
    intake.discard(outcome)
