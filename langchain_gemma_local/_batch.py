"""One batched generation shared by the per-input calls of ``batch()`` / ``abatch()``.

``ChatGemmaLocal.batch`` starts one generation over every input
(:class:`_BatchRows` / :class:`_AsyncBatchRows`) and gives each input's own
``invoke`` a :class:`_Claim` on its row through the ``_CLAIM`` context
variable; the call reads that row instead of starting a generation.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core import Delta, SamplingParams

if TYPE_CHECKING:
    from .chat_models import ChatGemmaLocal


class _BatchRows:
    """One batched generation, read row by row by the calls it serves.

    Whichever reader finds its row empty pulls the next delta from the shared
    stream (under a lock) and files it under its row, so readers never wait
    for each other and need no extra thread. The stream starts on the first
    read: loading errors then reach every row's own call.
    """

    def __init__(self, start: Callable[[], Iterator[Delta]], rows: int) -> None:
        self._start = start
        self._deltas: Iterator[Delta] | None = None
        self._buffers: list[deque[Delta]] = [deque() for _ in range(rows)]
        self._lock = threading.Lock()
        self._ended = False
        self._error: BaseException | None = None

    def row(self, index: int) -> Iterator[Delta]:
        while True:
            with self._lock:
                delta = self._next(index)
            yield delta
            if delta.finish_reason is not None:
                return

    def _next(self, index: int) -> Delta:
        buffer = self._buffers[index]
        while not buffer:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise RuntimeError("the batched generation ended before this row finished")
            try:
                if self._deltas is None:
                    self._deltas = self._start()
                delta = next(self._deltas)
            except StopIteration:
                self._ended = True
                continue
            except BaseException as exc:
                self._error = exc
                raise
            self._buffers[delta.index].append(delta)
        return buffer.popleft()

    def close(self) -> None:
        """Stop the generation if rows are still running and wait for it (core joins it)."""
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()


class _AsyncBatchRows:
    """:class:`_BatchRows` for ``abatch``, over ``client.astream_deltas``."""

    def __init__(self, start: Callable[[], AsyncIterator[Delta]], rows: int) -> None:
        self._start = start
        self._deltas: AsyncIterator[Delta] | None = None
        self._buffers: list[deque[Delta]] = [deque() for _ in range(rows)]
        self._lock = asyncio.Lock()
        self._ended = False
        self._error: BaseException | None = None

    async def row(self, index: int) -> AsyncIterator[Delta]:
        while True:
            async with self._lock:
                delta = await self._next(index)
            yield delta
            if delta.finish_reason is not None:
                return

    async def _next(self, index: int) -> Delta:
        buffer = self._buffers[index]
        while not buffer:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise RuntimeError("the batched generation ended before this row finished")
            try:
                if self._deltas is None:
                    self._deltas = self._start()
                delta = await anext(self._deltas)
            except StopAsyncIteration:
                self._ended = True
                continue
            except asyncio.CancelledError:
                self._error = RuntimeError("the batched generation was cancelled")
                raise
            except BaseException as exc:
                self._error = exc
                raise
            self._buffers[delta.index].append(delta)
        return buffer.popleft()

    async def aclose(self) -> None:
        aclose = getattr(self._deltas, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class _Claim:
    """Row ``index`` of a running batch, reserved for the call that asks for exactly it."""

    model: ChatGemmaLocal
    conversation: list[dict[str, Any]]
    params: SamplingParams
    rows: _BatchRows | _AsyncBatchRows
    index: int
    taken: bool = False

    def take(self, model: ChatGemmaLocal, conversation: Any, params: SamplingParams) -> bool:
        if self.taken or model is not self.model:
            return False
        if conversation != self.conversation or params != self.params:
            return False  # not the request this row was generated for: generate afresh
        self.taken = True
        return True


@dataclass(frozen=True)
class _BatchPlan:
    """The inputs of one ``batch()`` group that join the batched generation."""

    conversations: list[list[dict[str, Any]]]
    params: SamplingParams
    slots: list[int | None]  # per input: its row, or None to run (and fail) on its own

    def claims(
        self, model: ChatGemmaLocal, rows: _BatchRows | _AsyncBatchRows
    ) -> list[_Claim | None]:
        return [
            None
            if slot is None
            else _Claim(model, self.conversations[slot], self.params, rows, slot)
            for slot in self.slots
        ]


_CLAIM: contextvars.ContextVar[_Claim | None] = contextvars.ContextVar(
    "gemma_local_batch_claim", default=None
)
