"""Core's replies as LlamaIndex responses, for :class:`~llama_index_gemma_local.GemmaLocal`.

From core's token stream (what ``GemmaLocal`` uses)::

    core.fold_deltas(row) ──▶ one Delta ──reply_response()──▶ ChatResponse      (chat)
    Delta, Delta, ... ──DeltaFolder.feed()──▶ ChatResponse per Delta, then one
        with the usage                                                    (stream_chat)

From OpenAI-style dicts (a server speaking core's format)::

    chat.completion ──completion_to_chat_response()──▶ ChatResponse
    chat.completion.chunk, ... ──StreamFolder.feed()──▶ streamed ChatResponses

``raw`` of every response is the OpenAI-style dict of what it carries (written
by :mod:`core.openai_format`); ``additional_kwargs`` hold the token counts
(:func:`usage_kwargs`) and, on the last, ``finish_reason``. The messages
themselves are built by :func:`~llama_index_gemma_local.messages.assistant_message`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse

from core import Delta
from core.openai_format import ChunkBuilder, Completion

from .messages import assistant_message


def usage_kwargs(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Token counts of an OpenAI ``usage`` record, for ``additional_kwargs``
    (``reasoning_tokens`` only when the model thought)."""
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    counts = {k: usage[k] for k in keys if usage and k in usage}
    details = (usage or {}).get("completion_tokens_details") or {}
    if details.get("reasoning_tokens"):
        counts["reasoning_tokens"] = details["reasoning_tokens"]
    return counts


def completion_to_chat_response(completion: Mapping[str, Any]) -> ChatResponse:
    """A ``chat.completion`` dict (one choice) as a ``ChatResponse``; ``raw`` is the dict.

    For OpenAI-style dicts from elsewhere (a server speaking core's format);
    ``GemmaLocal`` itself builds its responses from core's deltas
    (:func:`reply_response`).
    """
    choice = completion["choices"][0]
    message = choice["message"]
    details = (completion.get("usage") or {}).get("completion_tokens_details") or {}
    return ChatResponse(
        message=assistant_message(
            message.get("content"),
            message.get("tool_calls") or (),
            message.get("reasoning_content"),
            details.get("reasoning_tokens"),
        ),
        raw=completion,
        additional_kwargs={
            **usage_kwargs(completion.get("usage")),
            "finish_reason": choice["finish_reason"],
        },
    )


def chat_to_completion_response(response: ChatResponse) -> CompletionResponse:
    """The ``CompletionResponse`` of a chat response (nothing is mutated)."""
    return CompletionResponse(
        text=response.message.content or "",
        additional_kwargs=dict(response.additional_kwargs),
        raw=response.raw,
        delta=response.delta,
    )


class StreamFolder:
    """Folds ``chat.completion.chunk`` dicts into streamed ``ChatResponse`` records.

    For OpenAI-style chunks from elsewhere (a server speaking core's format);
    ``GemmaLocal`` itself streams from core's deltas (:class:`DeltaFolder`).
    One response per chunk that carries text, reasoning or tool calls
    (``message`` holds the thought, text and calls so far, ``delta`` the new
    text, ``additional_kwargs["thinking_delta"]`` the new reasoning, ``raw``
    the chunk) and a last one, with an empty ``delta``, for the final usage
    chunk: its ``additional_kwargs`` hold the token counts and
    ``finish_reason``. Tool call deltas are accumulated by ``index`` as OpenAI
    clients do (core sends each call whole, once complete).
    """

    def __init__(self) -> None:
        self.text = ""
        self.reasoning = ""
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def feed(self, chunk: Mapping[str, Any]) -> ChatResponse | None:
        choices = chunk.get("choices") or []
        if not choices:  # the usage chunk: always core's last
            return self._response(
                "",
                chunk,
                {**usage_kwargs(chunk.get("usage")), "finish_reason": self.finish_reason},
            )
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        calls = delta.get("tool_calls") or ()
        for part in calls:
            self._add_call(part)
        text = delta.get("content") or ""
        thought = delta.get("reasoning_content") or ""
        if not text and not calls and not thought:  # the role and finish chunks carry nothing
            return None
        self.text += text
        self.reasoning += thought
        return self._response(text, chunk, {"thinking_delta": thought} if thought else {})

    def _add_call(self, part: Mapping[str, Any]) -> None:
        slot = self.tool_calls.setdefault(
            int(part.get("index") or 0),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        slot["id"] += part.get("id") or ""
        function = part.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def _response(self, delta: str, chunk: Any, extra: dict[str, Any]) -> ChatResponse:
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        tokens = extra.get("reasoning_tokens")
        return ChatResponse(
            message=assistant_message(self.text, calls, self.reasoning, tokens),
            delta=delta,
            raw=chunk,
            additional_kwargs=extra,
        )


def reply_response(reply: Delta, model: str) -> ChatResponse:
    """A whole reply (the row's deltas folded by :func:`core.fold_deltas`) as a ``ChatResponse``.

    ``raw`` is the ``chat.completion`` core's :meth:`create` would return for it
    (written by :mod:`core.openai_format`); ``additional_kwargs`` hold the token
    counts and ``finish_reason``.
    """
    if reply.finish_reason is None:
        raise ValueError("reply_response needs a finished reply (core.fold_deltas of a row)")
    completion = Completion(model, 1, 1).collect([reply])[0]
    return ChatResponse(
        message=assistant_message(
            reply.text,
            [c.to_openai() for c in reply.tool_calls],
            reply.reasoning,
            reply.reasoning_tokens,
        ),
        raw=completion,
        additional_kwargs={
            **usage_kwargs(completion["usage"]),
            "finish_reason": reply.finish_reason,
        },
    )


class DeltaFolder:
    """Turns one row's :class:`~core.Delta` stream into streamed ``ChatResponse`` records.

    One response per delta that carries text, reasoning or tool calls:
    ``message`` holds the thought (a ``ThinkingBlock``), the text and the calls
    so far, ``delta`` the new text, ``additional_kwargs["thinking_delta"]``
    the new reasoning (only when there is some), ``raw`` the delta as one
    ``chat.completion.chunk``. Then a last one, with an empty ``delta``, once
    the row has finished: ``raw`` is the usage chunk and ``additional_kwargs``
    hold the token counts and ``finish_reason`` (what
    ``stream_structured_predict`` and token counters look for). Core sends
    each tool call whole, once complete. Shared by the sync and async streams
    so both behave the same.
    """

    def __init__(self, model: str) -> None:
        self.text = ""
        self.reasoning = ""
        self.reasoning_tokens = 0
        self.tool_calls: list[dict[str, Any]] = []
        self._chunks = ChunkBuilder(model, 1)

    def feed(self, delta: Delta) -> list[ChatResponse]:
        """The responses of one delta (none, one, or two for a row's last delta)."""
        chunk = self._chunk(delta)  # always: the builder counts the row's tokens
        self.text += delta.text
        self.reasoning += delta.reasoning
        self.reasoning_tokens = delta.reasoning_tokens
        self.tool_calls += [c.to_openai() for c in delta.tool_calls]
        out = []
        if delta.text or delta.reasoning or delta.tool_calls:
            extra = {"thinking_delta": delta.reasoning} if delta.reasoning else {}
            out.append(self._response(delta.text, chunk, extra))
        if delta.finish_reason is not None:
            usage = self._chunks.usage_chunk()
            extra = {**usage_kwargs(usage["usage"]), "finish_reason": delta.finish_reason}
            out.append(self._response("", usage, extra))
        return out

    def _chunk(self, delta: Delta) -> dict[str, Any]:
        """The delta as one ``chat.completion.chunk`` (core's chunks for it, merged)."""
        merged: dict[str, Any] = {}
        finish = None
        for part in self._chunks.on_delta(delta):
            choice = part["choices"][0]
            merged.update(choice["delta"])
            finish = choice["finish_reason"] or finish
        choice = {"index": 0, "delta": merged, "logprobs": None, "finish_reason": finish}
        return self._chunks.chunk([choice])

    def _response(self, delta: str, raw: dict[str, Any], extra: dict[str, Any]) -> ChatResponse:
        return ChatResponse(
            message=assistant_message(
                self.text, self.tool_calls, self.reasoning, self.reasoning_tokens
            ),
            delta=delta,
            raw=raw,
            additional_kwargs=extra,
        )
