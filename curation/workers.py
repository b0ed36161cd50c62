"""Worker processes owned by one caller at a time, each over its own pipe.

A C-STORE waits for its instance to be processed before the sender may send the next one, so
the time of the hand-over counts in full. concurrent.futures' process pool hands each task
through two threads of the calling process (its queue manager and its queue feeder) and back
through the manager, each a GIL hand-over that a loaded machine turns into milliseconds. Here a
caller takes a worker, writes the task to its pipe and reads the answer: no other thread. A
worker that dies (killed, out of memory) fails the task it had and is started again, where a
broken process pool fails every later task until the server restarts."""

from __future__ import annotations

import logging
import multiprocessing
import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

# Seconds a worker gets to finish its task and exit when the pool closes.
STOP_TIMEOUT = 5.0


class WorkerDied(Exception):
    """The worker process ended before it answered."""


def _serve(conn: Connection, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    """The worker's loop: (function, args) in, its result (or exception) out, until None."""
    initializer(*initargs)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, args = task
        try:
            result = fn(*args)
        except Exception as e:  # returned to the caller, who raises it
            result = e
        conn.send(result)


class Worker:
    """One worker process and the pipe to it."""

    def __init__(
        self,
        context: multiprocessing.context.BaseContext,
        initializer: Callable[..., None],
        initargs: tuple[Any, ...],
    ) -> None:
        self._context = context
        self._initializer = initializer
        self._initargs = initargs
        self._start()

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(  # type: ignore[attr-defined]
            target=_serve,
            args=(child, self._initializer, self._initargs),
            name="carina-intake-worker",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._conn = parent

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the worker; WorkerDied (and a new worker) if it ended during the task.
        A worker found dead before the task is replaced first."""
        if not self._process.is_alive():
            log.error("intake worker %s had ended; starting another", self._process.pid)
            self._restart()
        try:
            self._conn.send((fn, args))
            result = self._conn.recv()
        except (EOFError, OSError) as e:
            log.error("intake worker %s ended during a task; starting another", self._process.pid)
            self._restart()
            raise WorkerDied from e
        if isinstance(result, Exception):
            raise result
        return result

    def _restart(self) -> None:
        self._conn.close()
        self._process.join(STOP_TIMEOUT)
        self._start()

    def close(self) -> None:
        """Let the worker finish and exit; kill it if it does not."""
        with suppress(OSError):
            self._conn.send(None)
        self._process.join(STOP_TIMEOUT)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


class WorkerPool:
    """size workers, each taken by one caller (thread) at a time, with the index of the
    shared-memory slot that goes with it."""

    def __init__(
        self,
        size: int,
        slots: list[int],
        context: multiprocessing.context.BaseContext,
        initializer: Callable[..., None],
        initargs: tuple[Any, ...],
    ) -> None:
        self._workers = [Worker(context, initializer, initargs) for _ in range(size)]
        self._free: queue.Queue[tuple[int, Worker]] = queue.Queue()
        for slot, worker in zip(slots, self._workers, strict=True):
            self._free.put((slot, worker))

    @contextmanager
    def worker(self) -> Iterator[tuple[int, Worker]]:
        """A free worker and its slot (waiting for one), given back afterwards."""
        taken = self._free.get()
        try:
            yield taken
        finally:
            self._free.put(taken)

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            worker.close()
