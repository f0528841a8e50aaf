"""Core deltas as LangChain values, and the stream plumbing around them.

Token usage, a tool call ``max_tokens`` cut off (an ``invalid_tool_calls``
entry), the ``timeout`` deadline over a delta stream, and putting the cut-off
call back into a result summed from chunks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing

from langchain_core.messages import AIMessage
from langchain_core.messages.ai import OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import InvalidToolCall, invalid_tool_call
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from core import Delta, SamplingParams

from .messages import CUT_OFF_CALL_ERROR


def _usage(delta: Delta) -> UsageMetadata:
    """Token counts of a row's last delta; thinking tokens (included in ``output_tokens``)
    as ``output_token_details["reasoning"]`` when the model thought."""
    usage = UsageMetadata(
        input_tokens=delta.prompt_tokens,
        output_tokens=delta.completion_tokens,
        total_tokens=delta.prompt_tokens + delta.completion_tokens,
    )
    if delta.reasoning_tokens:
        usage["output_token_details"] = OutputTokenDetails(reasoning=delta.reasoning_tokens)
    return usage


#: How a call being written starts: Gemma 4's ``call:NAME{`` and Gemma 1-3's
#: ``{"name": "NAME"`` (its JSON string).
_CALL_NAME = (
    re.compile(r"call:([A-Za-z0-9_.\-]+)\{"),
    re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")'),
)


def _cut_call_name(params: SamplingParams, partial: str) -> str | None:
    """The tool a call cut short was calling: the forced one, the only one, or the name
    the partial text already spells (if it is a bound tool's); else ``None``."""
    names = [t.name for t in params.tools]
    if params.tool_choice_name is not None:
        return params.tool_choice_name
    if len(names) == 1:
        return names[0]
    for pattern in _CALL_NAME:
        match = pattern.match(partial)
        if match is None:
            continue
        name = match.group(1)
        if name.startswith('"'):
            try:
                name = json.loads(name)
            except ValueError:
                continue
        if name in names:
            return str(name)
    return None


def _cut_call(delta: Delta, params: SamplingParams) -> InvalidToolCall | None:
    """The tool call ``max_tokens`` cut off in this (last) delta, as an invalid tool call."""
    if delta.partial_call is None:
        return None
    return invalid_tool_call(
        name=_cut_call_name(params, delta.partial_call),
        args=delta.partial_call or None,
        id=None,
        error=(
            f"{CUT_OFF_CALL_ERROR}{params.max_tokens} after "
            f"{delta.completion_tokens} tokens before the tool call was complete; "
            "raise max_tokens"
        ),
    )


def _timeout_error(timeout: float) -> TimeoutError:
    return TimeoutError(
        f"generation took longer than timeout={timeout}s and was stopped; raise the "
        "timeout, lower max_tokens, or pass timeout=None"
    )


def _until_deadline(deltas: Iterator[Delta], timeout: float | None, cold: bool) -> Iterator[Delta]:
    """Pass deltas through; stop the generation once ``timeout`` seconds have passed.

    ``cold``: the model was not loaded when the call began, so the clock starts
    at the first delta (loading does not count).
    """
    deadline = None if timeout is None or cold else time.monotonic() + timeout
    with closing(deltas):  # type: ignore[type-var]
        for delta in deltas:
            if timeout is not None:
                if deadline is None:
                    deadline = time.monotonic() + timeout
                elif delta.finish_reason is None and time.monotonic() > deadline:
                    raise _timeout_error(timeout)
            yield delta


async def _auntil_deadline(
    deltas: AsyncIterator[Delta], timeout: float | None, cold: bool
) -> AsyncIterator[Delta]:
    """Async :func:`_until_deadline`."""
    deadline = None if timeout is None or cold else time.monotonic() + timeout
    async with aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            if timeout is not None:
                if deadline is None:
                    deadline = time.monotonic() + timeout
                elif delta.finish_reason is None and time.monotonic() > deadline:
                    raise _timeout_error(timeout)
            yield delta


def _keep_last(
    chunks: Iterator[ChatGenerationChunk], last: list[ChatGenerationChunk]
) -> Iterator[ChatGenerationChunk]:
    """Pass chunks through, keeping the latest in ``last``."""
    for chunk in chunks:
        last[:] = [chunk]
        yield chunk


async def _akeep_last(
    chunks: AsyncIterator[ChatGenerationChunk], last: list[ChatGenerationChunk]
) -> AsyncIterator[ChatGenerationChunk]:
    """Async :func:`_keep_last`."""
    async for chunk in chunks:
        last[:] = [chunk]
        yield chunk


def _with_cut_call(result: ChatResult, last: list[ChatGenerationChunk]) -> ChatResult:
    """``result`` (summed from chunks) with the last chunk's cut-off call put back.

    Adding ``AIMessageChunk``s re-derives ``invalid_tool_calls`` from the
    ``tool_call_chunks`` and so drops the one the last chunk carries.
    """
    cut = getattr(last[0].message, "invalid_tool_calls", None) if last else None
    message = result.generations[0].message if result.generations else None
    if cut and isinstance(message, AIMessage):
        message.invalid_tool_calls = [*message.invalid_tool_calls, *cut]
    return result
