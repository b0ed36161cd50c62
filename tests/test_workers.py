"""curation/workers: intake worker processes taken by one caller at a time, over their pipes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator

import pytest

from carina.curation.workers import WorkerDied, WorkerPool


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
