"""Continuous batching: one scheduler per client merges independent requests into one batch.

Every request of a client (``create`` from any thread, ``acreate`` from any
event loop, ``create_batch``, the adapters) becomes a :class:`Request` of one
or more rows. The scheduler runs on the client's model thread, one
:meth:`Scheduler._tick` at a time, each tick a job of its own on the
:class:`~core.worker.ModelWorker` (so loads, ``format_prompt`` and
``close()``'s unload run between two steps, never during one):

1. rows that finished (end token, stop string, ``max_tokens``) or whose
   request was cancelled (its reader went away, ``close()``) leave the batch;
2. waiting requests join while the batch has room (``max_batch_size`` rows; a
   request of more rows than that runs once the batch is empty): each row's
   prompt is prefilled on its own and its first token sampled;
3. one decode step gives every row of the batch its next token.

What a row needs of its own stays its own: sampling options, seed, logit
bias, repetition penalty, grammar (tools / JSON), stops and ``max_tokens``
live in its request, and the backend's :class:`Engine` applies them per row.

A backend that cannot step a batch row by row (a subclass of the original
design, or a request the backend prefers to run whole, such as the CUDA fast
path of a lone request) gets ``None`` from :meth:`Engine` and its requests run
whole through ``_generate`` in their turn.

The queue is bounded: a request that finds ``max_queue`` requests already
waiting for a row (and no free row) fails at once with
:class:`~core.errors.QueueFullError`.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .constrained import GrammarMatchers
from .errors import QueueFullError
from .params import SamplingParams
from .stream import Prompt, TokenSink
from .worker import Cancel, Emit, ModelWorker, finish_job

logger = logging.getLogger("gemma_local")

#: Default most rows decoded together, and most requests waiting for a row.
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_QUEUE = 256


def check_limits(max_batch_size: Any, max_queue: Any) -> tuple[int, int]:
    """``(max_batch_size, max_queue)``, ``None`` meaning the default; a clear error otherwise."""
    size = DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size
    queue = DEFAULT_MAX_QUEUE if max_queue is None else max_queue
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"max_batch_size must be a positive integer (rows decoded together) or None "
            f"(default {DEFAULT_MAX_BATCH_SIZE}), got {max_batch_size!r}"
        )
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        raise ValueError(
            f"max_queue must be a non-negative integer (requests waiting for a row) or None "
            f"(default {DEFAULT_MAX_QUEUE}), got {max_queue!r}"
        )
    return size, queue


@dataclass(eq=False)
class Row:
    """One row of a request in the running batch: its prompt and where its tokens go."""

    request: Request
    index: int  # the row's index in its request's sink
    prompt: Prompt
    #: The engine's own per-row state (cache slot, processors, random generator...).
    state: Any = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def max_tokens(self) -> int:
        return self.request.sink.rows[self.index].max_tokens

    @property
    def grammar(self) -> GrammarMatchers | None:
        return self.request.grammar

    @property
    def finished(self) -> bool:
        return self.request.cancel.is_set() or (
            self.request.sink.rows[self.index].finish_reason is not None
        )


@dataclass(eq=False)
class Request:
    """A request being served: its rows' prompts, options, sink, grammar and reader."""

    prompts: list[Prompt]
    params: SamplingParams
    sink: TokenSink
    grammar: GrammarMatchers | None
    emit: Emit
    cancel: Cancel
    rows: list[Row] = field(default_factory=list)
    #: Backend-owned state shared by the request's rows (a seeded random generator).
    state: Any = None

    def __post_init__(self) -> None:
        self.rows = [Row(self, i, p) for i, p in enumerate(self.prompts)]

    def push(self, row: Row, token: int, *, feed_grammar: bool) -> None:
        """``row``'s next token: into the sink, and the grammar (``feed_grammar``)."""
        live = not row.finished
        self.sink.push_row(row.index, token)
        if self.grammar is not None and feed_grammar:
            if live:
                self.grammar.advance(row.index, token)
            if row.finished:
                self.grammar.retire(row.index)


class Engine(Protocol):
    """A backend's batch: rows join (prefilled), step together and leave, on the model thread."""

    #: Whether the engine feeds each row's token to its grammar itself.
    feeds_grammar: bool

    def add(self, rows: Sequence[Row]) -> list[tuple[Row, int]]:
        """Prefill ``rows`` and add them to the batch; the first tokens already known."""
        ...

    def step(self) -> list[tuple[Row, int]]:
        """One decode step: the next token of each row that has one."""
        ...

    def remove(self, rows: Sequence[Row]) -> None:
        """Drop ``rows`` from the batch (finished or cancelled)."""
        ...

    def close(self) -> None:
        """Free the batch's state."""
        ...


class Scheduler:
    """One client's continuous batcher (see the module docstring).

    ``make_engine()`` builds the backend's :class:`Engine` for the loaded model
    (``None``: requests run whole); ``run_whole(request)`` serves one request
    through the backend's ``_generate``; ``wants_whole(request, alone)`` says
    whether a request should rather run whole (``alone``: it would decode
    alone; the CUDA fast path).
    ``on_error(exc)`` turns a backend error into the one its readers get.
    ``on_idle()`` runs on the model thread when a tick leaves nothing running or
    waiting (the CUDA fast path captures the graphs its requests ran without
    there); a request that arrives meanwhile is taken at the next tick.
    """

    def __init__(
        self,
        worker: ModelWorker,
        make_engine: Callable[[], Engine | None],
        run_whole: Callable[[Request], None],
        wants_whole: Callable[[Request, bool], bool],
        on_error: Callable[[BaseException], BaseException],
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._worker = worker
        self._make_engine = make_engine
        self._run_whole = run_whole
        self._wants_whole = wants_whole
        self._on_error = on_error
        self._on_idle = on_idle
        self._lock = threading.Lock()
        self._joined = 0  # requests in the batch and its rows, as of the last tick
        self._batch_rows = 0
        # Model thread only:
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._engine: Engine | None = None
        self._engine_made = False
        self._posted = False

    # ---------------------------------------------------------- any thread

    def check_room(self, in_flight: int) -> None:
        """Raise :class:`QueueFullError` if a new request would find the queue full.

        ``in_flight``: the client's requests made and not yet ended. Those in the
        batch do not wait; a request that finds a free row in the batch does not
        count against ``max_queue`` either.
        """
        with self._lock:
            waiting = in_flight - self._joined
            free = max(0, self.max_batch_size - self._batch_rows)
        if waiting >= self.max_queue + free:
            raise QueueFullError(
                f"the request queue is full: {waiting} requests are waiting for a row of the "
                f"batch (max_queue={self.max_queue}, max_batch_size={self.max_batch_size}); "
                "retry later, or create the client with a larger max_queue or max_batch_size"
            )

    def _count_rows(self) -> None:
        """Publish the batch's size (model thread), for :meth:`check_room`."""
        rows = sum(len(r.rows) for r in self._active)
        with self._lock:
            self._joined, self._batch_rows = len(self._active), rows

    # ---------------------------------------------------------- model thread

    @property
    def active_rows(self) -> int:
        return sum(1 for r in self._active for row in r.rows if row.state is not None)

    def admit(self, request: Request) -> None:
        """Queue ``request`` for the next tick (model thread)."""
        self._waiting.append(request)
        self._post()

    def _post(self) -> None:
        if not self._posted:
            self._posted = True
            self._worker.post(self._tick)

    def _tick(self) -> None:
        self._posted = False
        try:
            self._leave()
            self._join()
            self._step()
            self._leave()
        except Exception as exc:  # a bug of ours: end every request with it, never hang them
            logger.exception("the batch scheduler failed; ending its requests")
            self.reset(self._on_error(exc))
        self._count_rows()
        if self._active or self._waiting:
            self._post()
        elif self._on_idle is not None:
            try:
                self._on_idle()
            except Exception:  # an optimisation of later requests: never this one's failure
                logger.exception("the model thread's idle work failed")

    def _engine_now(self) -> Engine | None:
        if not self._engine_made:
            self._engine_made = True
            try:
                self._engine = self._make_engine()
            except Exception:  # requests still run, one at a time through the backend
                logger.exception("could not build the batch engine; requests run one at a time")
                self._engine = None
        return self._engine

    def _join(self) -> None:
        """Waiting requests join while the batch has room; those that join in one tick are
        prefilled in one :meth:`Engine.add` (an engine may spread their prefills, as MLX
        does over its CPU streams)."""
        rows = sum(len(r.rows) for r in self._active)
        joining: list[Request] = []
        while self._waiting:
            request = self._waiting[0]
            if request.cancel.is_set():
                self._waiting.popleft()
                self._finish(request)
                continue
            if rows and rows + len(request.rows) > self.max_batch_size:
                break
            self._waiting.popleft()
            engine = self._engine_now()
            alone = not rows and not self._waiting
            if engine is None or self._wants_whole(request, alone):
                if joining:  # those before it join first, in arrival order
                    self._add(engine, joining)
                    joining = []
                self._whole(request)
                rows = sum(len(r.rows) for r in self._active)
                continue
            joining.append(request)
            rows += len(request.rows)
        if joining:
            self._add(self._engine_now(), joining)

    def _add(self, engine: Engine | None, requests: list[Request]) -> None:
        """Prefill ``requests`` into the batch and push the first tokens the engine knows."""
        assert engine is not None
        try:
            first = engine.add([row for request in requests for row in request.rows])
        except Exception as exc:
            # A failed prefill may have left the batch half-merged: every request in it ends.
            error = self._on_error(exc)
            for request in [*self._active, *requests]:
                self._finish(request, error)
            self._active = []
            self._reset_engine()
            return
        self._active.extend(requests)
        for row, token in first:
            row.request.push(row, token, feed_grammar=not engine.feeds_grammar)

    def _whole(self, request: Request) -> None:
        try:
            self._run_whole(request)
        except Exception as exc:
            self._finish(request, self._on_error(exc))
            return
        self._finish(request)

    def _step(self) -> None:
        engine = self._engine
        if engine is None or not self._active:
            return
        try:
            tokens = engine.step()
        except Exception as exc:
            error = self._on_error(exc)
            for request in self._active:
                self._finish(request, error)
            self._active = []
            self._reset_engine()
            return
        for row, token in tokens:
            row.request.push(row, token, feed_grammar=not engine.feeds_grammar)

    def _leave(self) -> None:
        engine = self._engine
        if engine is None:
            return
        gone = [
            row for r in self._active for row in r.rows if row.state is not None and row.finished
        ]
        if gone:
            engine.remove(gone)
        still = []
        for request in self._active:
            if all(row.state is None for row in request.rows):
                self._finish(request)
            else:
                still.append(request)
        self._active = still

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        if error is None and not request.cancel.is_set():
            request.sink.close()
        finish_job(request.emit, request.cancel, error)

    def _reset_engine(self) -> None:
        if self._engine is not None:
            try:
                self._engine.close()
            finally:
                self._engine = None
                self._engine_made = False

    def reset(self, error: BaseException) -> None:
        """End every request with ``error`` (unless cancelled already) and drop the engine.

        Runs on the model thread before the model is released (``close()``).
        """
        for request in [*self._active, *self._waiting]:
            self._finish(request, None if request.cancel.is_set() else error)
        self._active, self._waiting = [], collections.deque()
        self._count_rows()
        for_engine = self._engine
        self._engine, self._engine_made = None, False
        if for_engine is not None:
            for_engine.close()
