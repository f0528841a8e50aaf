"""The one thread that owns a model.

Every client owns a :class:`ModelWorker`: loading, every generation and cache
clearing run on it, one job at a time. That gives MLX the single thread its
thread-local streams need, lets many caller threads (and an event loop) share
one client safely, and gives each generation a clear owner: the consumer side
(:func:`stream_job` / :func:`astream_job`) cancels and waits for its job when
it stops reading, and the job's exception is re-raised in the caller.

Each stream job's cancel flag is a :class:`Cancel`. A client keeps the flags
of its queued and running jobs in an :class:`InFlight` set, so that
``close()`` can cancel every one of them with an error (:meth:`InFlight.cancel_all`):
the job stops at its next step, and its reader gets that error at its next
read, even with items still buffered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")
Emit = Callable[[Any], None]


class _Done:
    """Marks the end of a job's output."""


_DONE = _Done()


class Cancel(threading.Event):
    """A job's cancel flag; :attr:`error` is what its reader gets when someone else cancelled it.

    Set with no error when the reader itself went away (it is not listening);
    :meth:`cancel` with an error when another party (``close()``) ended the job.
    """

    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None

    def cancel(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.set()


class InFlight:
    """The cancel flags of one client's queued and running stream jobs.

    A job is added and submitted in one step (:meth:`submit`), and
    :meth:`cancel_all` cancels and submits its follow-up in one step, so every
    job is either cancelled or queued after that follow-up (``close()``'s
    unload), never left running in between.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: set[Cancel] = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._flags)

    def submit(
        self,
        worker: ModelWorker,
        fn: Callable[[], None],
        flag: Cancel,
        check: Callable[[int], None] | None = None,
    ) -> None:
        """Track ``flag`` and run ``fn`` on ``worker``.

        ``check(n)``, with ``n`` the jobs in flight before this one, may refuse
        the job by raising (a full queue); it runs under the lock, so two jobs
        never both take the last place.
        """
        if worker.on_worker():  # runs inline: not under the lock
            with self._lock:
                if check is not None:
                    check(len(self._flags))
                self._flags.add(flag)
            worker.submit(fn)
            return
        with self._lock:
            if check is not None:
                check(len(self._flags))
            self._flags.add(flag)
            worker.submit(fn)

    def discard(self, flag: Cancel) -> None:
        with self._lock:
            self._flags.discard(flag)

    def cancel_all(
        self, make_error: Callable[[], BaseException], then: Callable[[], T]
    ) -> T:
        """Cancel every job submitted so far, each with its own ``make_error()``, then call ``then``.

        No job is submitted in between; returns what ``then`` returns.
        """
        with self._lock:
            flags, self._flags = self._flags, set()
            for flag in flags:
                flag.cancel(make_error())
            return then()


class ModelWorker:
    """A lazily started daemon thread running submitted jobs in order.

    A ``persistent`` worker (see :func:`shared_worker`) keeps its thread for
    the life of the process: :meth:`close` leaves it running.
    """

    def __init__(self, name: str, *, persistent: bool = False) -> None:
        self._name = name
        self._persistent = persistent
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the worker; its result or exception lands in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, never swallowed
                future.set_exception(exc)

        if self.on_worker():  # a job asking for more work runs it inline
            job()
            return future
        with self._lock:
            if not self.alive:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._jobs.put(job)
        return future

    def post(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` behind every job submitted so far, even from the worker itself.

        The scheduler's steps re-post themselves this way, so jobs submitted
        meanwhile (a load, ``close()``'s unload) run between two steps.
        """
        with self._lock:
            if not self.alive:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._jobs.put(fn)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and wait for it."""
        return self.submit(fn).result()

    def close(self, timeout: float | None = None, *, force: bool = False) -> None:
        """Finish queued jobs, then stop and join the thread (a persistent one only if forced)."""
        if self._persistent and not force:
            return
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._jobs.put(None)
        if thread is not threading.current_thread():
            thread.join(timeout)


_SHARED: dict[str, ModelWorker] = {}
_SHARED_LOCK = threading.Lock()


def shared_worker(name: str) -> ModelWorker:
    """The process-wide persistent worker called ``name`` (created on first use)."""
    with _SHARED_LOCK:
        worker = _SHARED.get(name)
        if worker is None:
            worker = _SHARED[name] = ModelWorker(name, persistent=True)
        return worker


class HandedOff:
    """What a stream job's body returns when its request lives on elsewhere (the scheduler),
    which ends it later with :func:`finish_job`."""


HANDED_OFF = HandedOff()


def finish_job(emit: Emit, cancel: Cancel, error: BaseException | None = None) -> None:
    """End a stream job: its ``error`` (if it was not cancelled), the cancel error, the end."""
    if error is not None and cancel.error is None:
        emit(error)
    if cancel.error is not None:  # cancelled by close(): the reader learns why
        emit(cancel.error)
    emit(_DONE)


def _run_emitting(body: Callable[[Emit, Cancel], Any], emit: Emit, cancel: Cancel) -> None:
    error: BaseException | None = None
    try:
        # a job cancelled while queued never starts
        if cancel.error is None and body(emit, cancel) is HANDED_OFF:
            return
    except BaseException as exc:
        error = exc
    finish_job(emit, cancel, error)


def _checked(item: Any, cancel: Cancel) -> Any:
    """``item``, or raise the job's error (its own, or the one it was cancelled with)."""
    if cancel.error is not None:
        raise cancel.error
    if isinstance(item, BaseException):
        raise item
    return item


def stream_job(
    worker: ModelWorker,
    body: Callable[[Emit, Cancel], Any],
    in_flight: InFlight | None = None,
    check: Callable[[int], None] | None = None,
) -> Generator[Any, None, None]:
    """Run ``body(emit, cancel)`` on the worker and yield what it emits.

    Leaving the loop early (``break``, an exception, garbage collection) sets
    ``cancel`` and waits until the job has returned, so no generation outlives
    its reader. An exception raised by ``body`` is re-raised here. With
    ``in_flight``, the job's flag is in that set from submission to its end,
    and a :meth:`InFlight.cancel_all` ends the job and raises its error here
    at the next read.
    """
    out: queue.SimpleQueue[Any] = queue.SimpleQueue()
    cancel = Cancel()
    def job() -> None:
        _run_emitting(body, out.put, cancel)

    if in_flight is None:
        worker.submit(job)
    else:
        in_flight.submit(worker, job, cancel, check)
    finished = False
    try:
        while (item := out.get()) is not _DONE:
            yield _checked(item, cancel)
        finished = True
    finally:
        if in_flight is not None:
            in_flight.discard(cancel)
        if not finished:
            cancel.set()
            while out.get() is not _DONE:
                pass


async def astream_job(
    worker: ModelWorker,
    body: Callable[[Emit, Cancel], Any],
    in_flight: InFlight | None = None,
    check: Callable[[int], None] | None = None,
) -> AsyncGenerator[Any, None]:
    """The async twin of :func:`stream_job`: the event loop never blocks.

    The worker hands items to the loop with ``call_soon_threadsafe``; a reader
    that stops early (or is cancelled) sets ``cancel`` and awaits the job's end.
    """
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[Any] = asyncio.Queue()
    cancel = Cancel()

    def emit(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancel.set()

    def job() -> None:
        _run_emitting(body, emit, cancel)

    if in_flight is None:
        worker.submit(job)
    else:
        in_flight.submit(worker, job, cancel, check)
    finished = False
    try:
        while (item := await out.get()) is not _DONE:
            yield _checked(item, cancel)
        finished = True
    finally:
        if in_flight is not None:
            in_flight.discard(cancel)
        if not finished:
            cancel.set()
            while await out.get() is not _DONE:
                pass
