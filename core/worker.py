"""The one thread that owns a model.

Every client owns a :class:`ModelWorker`: loading, every generation and cache
clearing run on it, one job at a time. That gives MLX the single thread its
thread-local streams need, lets many caller threads (and an event loop) share
one client safely, and gives each generation a clear owner: the consumer side
(:func:`stream_job` / :func:`astream_job`) cancels and waits for its job when
it stops reading, and the job's exception is re-raised in the caller.
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


def _run_emitting(
    body: Callable[[Emit, threading.Event], None], emit: Emit, cancel: threading.Event
) -> None:
    try:
        body(emit, cancel)
    except BaseException as exc:
        emit(exc)
    finally:
        emit(_DONE)


def stream_job(
    worker: ModelWorker, body: Callable[[Emit, threading.Event], None]
) -> Generator[Any, None, None]:
    """Run ``body(emit, cancel)`` on the worker and yield what it emits.

    Leaving the loop early (``break``, an exception, garbage collection) sets
    ``cancel`` and waits until the job has returned, so no generation outlives
    its reader. An exception raised by ``body`` is re-raised here.
    """
    out: queue.SimpleQueue[Any] = queue.SimpleQueue()
    cancel = threading.Event()
    worker.submit(lambda: _run_emitting(body, out.put, cancel))
    finished = False
    try:
        while (item := out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
        finished = True
    finally:
        if not finished:
            cancel.set()
            while out.get() is not _DONE:
                pass


async def astream_job(
    worker: ModelWorker, body: Callable[[Emit, threading.Event], None]
) -> AsyncGenerator[Any, None]:
    """The async twin of :func:`stream_job`: the event loop never blocks.

    The worker hands items to the loop with ``call_soon_threadsafe``; a reader
    that stops early (or is cancelled) sets ``cancel`` and awaits the job's end.
    """
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancel.set()

    worker.submit(lambda: _run_emitting(body, emit, cancel))
    finished = False
    try:
        while (item := await out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
        finished = True
    finally:
        if not finished:
            cancel.set()
            while await out.get() is not _DONE:
                pass
