"""The OpenAI wire format: :class:`~core.stream.Delta` records in, ``chat.completion`` dicts out.

One place for the shapes every surface speaks (``create()``, ``create(stream=True)``,
``create_batch()``, their async twins, and a server)::

    Delta stream of a request (rows = conversations x n)
        ──Completion──▶ one ``chat.completion`` per conversation
            (``message.content`` / ``message.reasoning_content`` / ``message.tool_calls``,
            ``finish_reason``, ``usage`` with ``completion_tokens_details.reasoning_tokens``
            when the model thought)
        ──chunks / achunks──▶ ``chat.completion.chunk`` dicts: the role first, then
            ``delta.reasoning_content`` / ``delta.content`` / ``delta.tool_calls`` as they
            come, ``finish_reason`` on each choice's last chunk, and a final chunk with
            ``usage``.

``reasoning_content`` is the name vLLM, Ollama's OpenAI endpoint and DeepSeek use
for a thinking model's thought.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from .stream import Delta, fold_deltas


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage_dict(
    prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """OpenAI's ``usage``; ``completion_tokens_details`` only when the model thought."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def message_dict(reply: Delta) -> dict[str, Any]:
    """A folded row (:func:`~core.stream.fold_deltas`) as an assistant ``message``."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["content"] = reply.text or None
        message["tool_calls"] = [c.to_openai() for c in reply.tool_calls]
    return message


class Completion:
    """Folds deltas of ``conversations x n`` rows into ``chat.completion`` dicts."""

    def __init__(self, model: str, conversations: int, n: int) -> None:
        self.model = model
        self.n = n
        self.rows = conversations * n
        self.deltas: list[list[Delta]] = [[] for _ in range(self.rows)]

    def add(self, delta: Delta) -> None:
        self.deltas[delta.index].append(delta)

    def collect(self, deltas: Iterable[Delta]) -> list[dict[str, Any]]:
        for delta in deltas:
            self.add(delta)
        return self.result()

    async def acollect(self, deltas: AsyncIterator[Delta]) -> list[dict[str, Any]]:
        async for delta in deltas:
            self.add(delta)
        return self.result()

    def result(self) -> list[dict[str, Any]]:
        created = int(time.time())
        out = []
        for start in range(0, self.rows, self.n):
            choices = []
            prompt_tokens = completion_tokens = reasoning_tokens = 0
            for row in range(start, start + self.n):
                reply = fold_deltas(self.deltas[row])  # the sink always finishes rows
                prompt_tokens = reply.prompt_tokens
                completion_tokens += reply.completion_tokens
                reasoning_tokens += reply.reasoning_tokens
                choices.append(
                    {
                        "index": row - start,
                        "message": message_dict(reply),
                        "logprobs": None,
                        "finish_reason": reply.finish_reason,
                    }
                )
            out.append(
                {
                    "id": new_completion_id(),
                    "object": "chat.completion",
                    "created": created,
                    "model": self.model,
                    "choices": choices,
                    "usage": usage_dict(prompt_tokens, completion_tokens, reasoning_tokens),
                }
            )
        return out


class ChunkBuilder:
    """Turns deltas of one request into ``chat.completion.chunk`` dicts."""

    def __init__(self, model: str, n: int) -> None:
        self.id = new_completion_id()
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.started = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _choice(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict:
        return self.chunk(
            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
        )

    def on_delta(self, delta: Delta) -> list[dict[str, Any]]:
        out = []
        if not self.started:
            self.started = True
            out += [self._choice(i, {"role": "assistant", "content": ""}) for i in range(self.n)]
        # One delta may hold the end of a thought and the start of the answer:
        # the thought goes first.
        if delta.reasoning:
            out.append(self._choice(delta.index, {"reasoning_content": delta.reasoning}))
        if delta.text:
            out.append(self._choice(delta.index, {"content": delta.text}))
        if delta.tool_calls:
            calls = [{"index": c.index, **c.to_openai()} for c in delta.tool_calls]
            out.append(self._choice(delta.index, {"tool_calls": calls}))
        if delta.finish_reason is not None:
            self.prompt_tokens = delta.prompt_tokens
            self.completion_tokens += delta.completion_tokens
            self.reasoning_tokens += delta.reasoning_tokens
            out.append(self._choice(delta.index, {}, delta.finish_reason))
        return out

    def usage_chunk(self) -> dict[str, Any]:
        usage = usage_dict(self.prompt_tokens, self.completion_tokens, self.reasoning_tokens)
        return self.chunk([], usage=usage)


def chunks(deltas: Iterator[Delta], model: str, n: int) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` dicts of one request; closing this closes ``deltas``."""
    builder = ChunkBuilder(model, n)
    try:
        for delta in deltas:
            yield from builder.on_delta(delta)
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
    yield builder.usage_chunk()


async def achunks(
    deltas: AsyncIterator[Delta], model: str, n: int
) -> AsyncIterator[dict[str, Any]]:
    """Async :func:`chunks`."""
    builder = ChunkBuilder(model, n)
    try:
        async for delta in deltas:
            for chunk in builder.on_delta(delta):
                yield chunk
    finally:
        aclose = getattr(deltas, "aclose", None)
        if aclose is not None:
            await aclose()
    yield builder.usage_chunk()
