"""curation/workers: intake worker processes over their pipes, taken by one caller at a time or
fed from an event loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator

import pytest
import uvloop

from carina.curation.workers import LoopWorkerPool, WorkerDied, WorkerPool


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    """Two workers (slots 5 and 6) of the start method intake uses."""
    p = WorkerPool(2, [5, 6], multiprocessing.get_context("forkserver"), time.sleep, (0,))
    yield p
    p.close()


def test_each_caller_gets_its_own_worker_and_slot(pool: WorkerPool) -> None:
    with pool.worker() as (slot_a, a), pool.worker() as (slot_b, b):
        assert {slot_a, slot_b} == {5, 6}
        pids = {a.call(os.getpid), b.call(os.getpid)}
    assert len(pids) == 2 and os.getpid() not in pids


def test_an_exception_in_the_worker_is_raised_in_the_caller(pool: WorkerPool) -> None:
    with pool.worker() as (_, worker):
        with pytest.raises(ValueError):
            worker.call(int, "not a number")
        assert worker.call(int, "12") == 12  # and the worker goes on


def test_a_killed_worker_is_replaced(pool: WorkerPool) -> None:
    with pool.worker() as (_, worker):
        first = worker.call(os.getpid)
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        second = worker.call(os.getpid)  # found dead before the task: replaced first
        assert second != first
        # Dying during a task fails that task only.
        with pytest.raises(WorkerDied):
            worker.call(os.kill, second, signal.SIGKILL)
        assert worker.call(os.getpid) not in (first, second)


def test_meanwhile_runs_while_the_worker_works(pool: WorkerPool) -> None:
    ran: list[float] = []
    with pool.worker() as (_, worker):
        start = time.monotonic()
        worker.call(time.sleep, 0.5, meanwhile=lambda: ran.append(time.monotonic()))
        took = time.monotonic() - start
    assert took >= 0.5 and len(ran) == 1
    assert ran[0] - start < 0.25  # once the task was sent, not after its answer


def test_take_without_waiting_when_every_worker_is_taken(pool: WorkerPool) -> None:
    first, second = pool.take(), pool.take()
    assert first is not None and second is not None
    assert pool.take(wait=False) is None
    pool.give_back(first)
    assert pool.take(wait=False) == first
    pool.give_back(first)
    pool.give_back(second)


@pytest.fixture
def loop_pool() -> Iterator[LoopWorkerPool]:
    """One worker holding two tasks at a time (slots 3 and 4), fed from an event loop."""
    p = LoopWorkerPool(1, [3, 4], multiprocessing.get_context("forkserver"), time.sleep, (0,))
    yield p
    p.close()


def test_loop_pool_leases_every_slot_of_its_workers(loop_pool: LoopWorkerPool) -> None:
    async def run() -> tuple[set[int], int]:
        a, b = await loop_pool.take(), await loop_pool.take()
        pids = await asyncio.gather(loop_pool.submit(a, os.getpid), loop_pool.submit(b, os.getpid))
        return {a[1], b[1]}, len(set(pids))

    assert asyncio.run(run()) == ({3, 4}, 1)


def test_loop_pool_raises_the_workers_exception_and_goes_on(loop_pool: LoopWorkerPool) -> None:
    async def run() -> int:
        with pytest.raises(ValueError):
            await loop_pool.submit(await loop_pool.take(), int, "not a number")
        return await loop_pool.submit(await loop_pool.take(), int, "12")

    assert asyncio.run(run()) == 12


def test_loop_pool_reads_answers_longer_than_a_pipe_holds_on_uvloop(
    loop_pool: LoopWorkerPool,
) -> None:
    """uvicorn runs on uvloop, which makes the pipes it watches non-blocking: an answer of
    megabytes (a SEG's DICOM JSON) arrives in pieces and must still be read whole."""

    async def run() -> list[int]:
        leases = [await loop_pool.take(), await loop_pool.take()]
        answers = [loop_pool.submit(lease, bytes, 4_000_000) for lease in leases]
        return [len(a) for a in await asyncio.gather(*answers)]

    assert uvloop.run(run()) == [4_000_000, 4_000_000]


def test_loop_pool_worker_killed_fails_only_its_task(loop_pool: LoopWorkerPool) -> None:
    """The task the worker was on fails with WorkerDied; the one queued behind it runs in the
    worker started in its place, and so do later ones."""

    async def run() -> tuple[int, int, int]:
        first = await loop_pool.submit(await loop_pool.take(), os.getpid)
        running = loop_pool.submit(await loop_pool.take(), time.sleep, 30)
        queued = loop_pool.submit(await loop_pool.take(), os.getpid)
        await asyncio.sleep(0.3)  # the worker is asleep in the first task
        os.kill(first, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            await asyncio.wait_for(running, 10)
        second = await asyncio.wait_for(queued, 10)
        third = await loop_pool.submit(await loop_pool.take(), os.getpid)
        return first, second, third

    first, second, third = asyncio.run(run())
    assert second != first and third == second
