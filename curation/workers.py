"""Intake worker processes, each over its own pipe: taken by one caller (thread) at a time
(WorkerPool, for C-STORE), or fed by an event loop (LoopWorkerPool, for STOW-RS).

A C-STORE waits for its instance to be processed before the sender may send the next one, so
the time of the hand-over counts in full. concurrent.futures' process pool hands each task
through two threads of the calling process (its queue manager and its queue feeder) and back
through the manager, each a GIL hand-over that a loaded machine turns into milliseconds. Here a
caller takes a worker, writes the task to its pipe and reads the answer: no other thread. A
worker that dies (killed, out of memory) fails the task it had and is started again, where a
broken process pool fails every later task until the server restarts. On an event loop the
answers are read by the loop itself when a worker's pipe turns readable: no thread either."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

# Seconds a worker gets to finish its task and exit when the pool closes.
STOP_TIMEOUT = 5.0


class WorkerDied(Exception):
    """The worker process ended before it answered."""


@dataclass(frozen=True)
class Interim:
    """A message a task sent with tell() before its result (a C-STORE's admission)."""

    value: Any


# Worker side: the pipe of this worker process, for tell().
_CONN: list[Connection] = []


def tell(value: Any) -> None:
    """From a task running in a worker: send value to the caller now, as an Interim; the
    task's result follows as usual."""
    _CONN[0].send(Interim(value))


def _serve(conn: Connection, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    """The worker's loop: (function, args) in, its result (or exception) out, until None; a
    task may send Interim messages before its result (tell())."""
    _CONN[:] = [conn]
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

    def call(
        self, fn: Callable[..., Any], *args: Any, meanwhile: Callable[[], None] | None = None
    ) -> Any:
        """fn(*args) in the worker; WorkerDied (and a new worker) if it ended during the task.
        A worker found dead before the task is replaced first. If the task sends an Interim
        message (tell()), that is returned, and receive() gives what follows. meanwhile, if
        given, is called once the task is sent, before its first message is read: work of
        the caller's own that goes on while the worker works (it must not raise, or the
        task's messages would be left unread)."""
        if not self._process.is_alive():
            log.error("intake worker %s had ended; starting another", self._process.pid)
            self._restart()
        try:
            self._conn.send((fn, args))
        except OSError as e:
            self._ended()
            raise WorkerDied from e
        if meanwhile is not None:
            meanwhile()
        return self.receive()

    def receive(self) -> Any:
        """The next message of the task being run: an Interim, or its result (raised if it is
        an exception); WorkerDied (and a new worker) if it ended first."""
        try:
            result = self._conn.recv()
        except (EOFError, OSError) as e:
            self._ended()
            raise WorkerDied from e
        if isinstance(result, Exception):
            raise result
        return result

    def _ended(self) -> None:
        log.error("intake worker %s ended during a task; starting another", self._process.pid)
        self._restart()

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
        taken = self.take()
        assert taken is not None
        try:
            yield taken
        finally:
            self.give_back(taken)

    def take(self, wait: bool = True) -> tuple[int, Worker] | None:
        """A free worker and its slot, waiting for one (None if none is free and not wait);
        the caller gives it back."""
        try:
            return self._free.get(block=wait)
        except queue.Empty:
            return None

    def give_back(self, taken: tuple[int, Worker]) -> None:
        """A worker (and slot) taken is free again: its task is over."""
        self._free.put(taken)

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            worker.close()


@dataclass
class _Task:
    """A task sent to a worker of a LoopWorkerPool, until its answer arrives."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    lease: tuple[int, int]  # (worker index, slot) it holds
    future: asyncio.Future[Any]


class LoopWorkerPool:
    """size workers fed from one asyncio event loop, each with depth shared-memory slots: a
    caller takes a free slot (waiting for one), fills it and submits its task, which goes to
    the slot's worker at once; a worker holds up to depth tasks, so it starts the next as soon
    as it has answered one. The loop reads the answers when a worker's pipe turns readable.
    A worker that dies fails the task it was running with WorkerDied; the tasks queued behind
    it go to its replacement."""

    def __init__(
        self,
        size: int,
        slots: list[int],
        context: multiprocessing.context.BaseContext,
        initializer: Callable[..., None],
        initargs: tuple[Any, ...],
        depth: int = 2,
    ) -> None:
        if len(slots) != size * depth:
            raise ValueError(f"{size} workers of depth {depth} need {size * depth} slots")
        self._workers = [Worker(context, initializer, initargs) for _ in range(size)]
        self._tasks: list[deque[_Task]] = [deque() for _ in range(size)]
        # Round robin over the workers first, so the first tasks spread over all of them.
        self._leases = [(w, slots[d * size + w]) for d in range(depth) for w in range(size)]
        self._free: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for lease in self._leases:
            self._free.put_nowait(lease)
        self._loop: asyncio.AbstractEventLoop | None = None

    def call_blocking(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(*args) once in every worker, waiting for each (before the pool serves a loop)."""
        if self._loop is not None:
            raise RuntimeError("the pool already serves an event loop")
        return [worker.call(fn, *args) for worker in self._workers]

    async def take(self) -> tuple[int, int]:
        """A free (worker, slot) lease, waiting for one; submit() gives it back."""
        self._watch()
        return await self._free.get()

    def submit(self, lease: tuple[int, int], fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Send fn(*args) to the lease's worker; the future has its result (or exception, or
        WorkerDied). The lease is free again once the worker has answered."""
        task = _Task(fn, args, lease, asyncio.get_running_loop().create_future())
        pending = self._tasks[lease[0]]
        pending.append(task)
        try:
            self._workers[lease[0]]._conn.send((fn, args))
        except OSError:  # it had died: what it was running fails, the rest (this) goes on
            pending.pop()
            self._died(lease[0])
            self._resend(lease[0], task)
        return task.future

    def _watch(self) -> None:
        """Read the workers' answers on the running loop (a new loop: the old one is gone)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:  # one loop at a time: what the old one waited for is lost
            held = {task.lease for pending in self._tasks for task in pending}
            free = [lease for lease in self._leases if lease not in held]
            self._free = asyncio.Queue()
            for lease in free:
                self._free.put_nowait(lease)
        self._loop = loop
        for i in range(len(self._workers)):
            self._add_reader(i)

    def _add_reader(self, i: int) -> None:
        """Have the loop call _readable when worker i's pipe turns readable. uvloop (libuv)
        makes a watched descriptor non-blocking; the pipe is put back to blocking, so that an
        answer longer than the pipe holds is read whole once its first bytes are there (the
        worker is writing the rest) rather than failing half-read with EAGAIN."""
        assert self._loop is not None
        fd = self._workers[i]._conn.fileno()
        self._loop.add_reader(fd, self._readable, i)
        os.set_blocking(fd, True)

    def _readable(self, i: int) -> None:
        """One answer of worker i (the loop calls again while more are waiting: polling the
        pipe here would cost more than the call)."""
        try:
            result = self._workers[i]._conn.recv()
        except (EOFError, OSError):
            self._died(i)
            return
        task = self._tasks[i].popleft()
        self._free.put_nowait(task.lease)
        if task.future.done():  # the caller gave up waiting
            return
        if isinstance(result, BaseException):
            task.future.set_exception(result)
        else:
            task.future.set_result(result)

    def _died(self, i: int) -> None:
        """Worker i ended: fail the task it was running, start another, resend the rest."""
        worker = self._workers[i]
        log.error("intake worker %s ended; starting another", worker._process.pid)
        if self._loop is not None:
            self._loop.remove_reader(worker._conn.fileno())
        pending = self._tasks[i]
        queued = list(pending)[1:]
        if pending:
            task = pending.popleft()
            self._free.put_nowait(task.lease)
            if not task.future.done():
                task.future.set_exception(WorkerDied())
        pending.clear()
        worker._restart()
        if self._loop is not None:
            self._add_reader(i)
        for task in queued:
            self._resend(i, task)

    def _resend(self, i: int, task: _Task) -> None:
        self._tasks[i].append(task)
        try:
            self._workers[i]._conn.send((task.fn, task.args))
        except OSError:  # the replacement died at once: give up on this task
            self._tasks[i].pop()
            self._free.put_nowait(task.lease)
            if not task.future.done():
                task.future.set_exception(WorkerDied())

    def close(self) -> None:
        """Stop every worker (from any thread; the loop stops reading their pipes first)."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            fds = [worker._conn.fileno() for worker in self._workers]
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                for fd in fds:
                    loop.remove_reader(fd)
            else:

                async def unwatch() -> None:
                    for fd in fds:
                        loop.remove_reader(fd)

                with suppress(Exception):
                    asyncio.run_coroutine_threadsafe(unwatch(), loop).result(STOP_TIMEOUT)
        for worker in self._workers:
            worker.close()
