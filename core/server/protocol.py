"""Request bodies in, ``create()`` arguments out; chunks out as server-sent events.

A ``POST /v1/chat/completions`` body is read up to the size limit (before any
parsing), parsed as one JSON object, and split into what the server itself
reads (``model``, ``stream``, ``stream_options``) and everything else, which
goes to :meth:`~core.base.BaseGemmaChatCompletion.acreate` unchanged, so an
option is checked, and refused with the same message, exactly as ``create()``
does it. The only renaming is OpenAI's newer ``max_completion_tokens`` (sent
by LangChain's ``ChatOpenAI``) to ``max_tokens``; OpenAI options that have no
local meaning are accepted at their no-op value only.

Streamed chunks (:func:`core.openai_format.achunks`) go out as OpenAI writes
them: ``data: {json}\\n\\n`` per chunk, with ``"usage": null`` on each one and
the usage chunk last only when ``stream_options.include_usage`` is set, then
``data: [DONE]\\n\\n``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import APIError

#: OpenAI options gemma-local does not implement, accepted at their no-op value.
NO_OP_OPTIONS: Mapping[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
}
NO_OP_HINTS = {
    "frequency_penalty": "use repetition_penalty instead",
    "presence_penalty": "use repetition_penalty instead",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
}

#: Above this size a body is parsed on a worker thread, not on the event loop.
PARSE_IN_THREAD_BYTES = 1 << 20


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(gemma-local serve --max-body-size)",
        code="request_too_large",
    )


def check_length_header(value: str | None, limit: int) -> None:
    """413 at once when ``Content-Length`` announces more than ``limit`` bytes."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        raise APIError(400, f"Content-Length must be an integer, got {value!r}") from None
    if length > limit:
        raise too_large(limit)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object with model and messages")
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, invalid UTF-8, NaN / Infinity
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions body, split into what the server reads and ``create()``'s options."""

    model: str
    messages: Any
    stream: bool
    include_usage: bool
    options: dict[str, Any]


def chat_request(body: Mapping[str, Any]) -> ChatRequest:
    """Split ``body``; the options are left for ``create()`` to check (see the module doc)."""
    options = dict(body)
    model = options.pop("model", None)
    if model is None:
        raise APIError(
            400,
            "model is required: the name of the served model (GET /v1/models lists it)",
            param="model",
        )
    if not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {_json_type(model)}", param="model")
    if "messages" not in options:
        raise APIError(400, "messages is required: a list of chat messages", param="messages")
    messages = options.pop("messages")
    stream = options.pop("stream", None)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    include_usage = _include_usage(options.pop("stream_options", None), bool(stream))
    if "max_completion_tokens" in options:
        value = options.pop("max_completion_tokens")
        given = options.get("max_tokens")
        if value is not None and given is not None and given != value:
            raise APIError(
                400,
                f"max_tokens={given!r} and max_completion_tokens={value!r} disagree; pass one",
                param="max_completion_tokens",
            )
        if value is not None:
            options["max_tokens"] = value
    for name, allowed in NO_OP_OPTIONS.items():
        if name not in options:
            continue
        value = options.pop(name)
        if value is None or any(value == a and type(value) is type(a) for a in allowed):
            continue
        shown = ", ".join("null" if a is None else json.dumps(a) for a in allowed)
        raise APIError(
            400,
            f"{name} is not supported by gemma-local ({NO_OP_HINTS[name]}); "
            f"allowed: {shown}, got {value!r}",
            param=name,
        )
    return ChatRequest(model, messages, bool(stream), include_usage, options)


def _include_usage(stream_options: Any, stream: bool) -> bool:
    if stream_options is None:
        return False
    if not stream:
        raise APIError(
            400,
            "stream_options is only allowed when stream is true",
            param="stream_options",
        )
    if not isinstance(stream_options, dict):
        raise APIError(
            400,
            f"stream_options must be an object, got {_json_type(stream_options)}",
            param="stream_options",
        )
    unknown = sorted(set(stream_options) - {"include_usage"})
    if unknown:
        raise APIError(
            400,
            f"stream_options has unknown field(s) {unknown}; allowed: include_usage",
            param="stream_options",
        )
    include = stream_options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise APIError(
            400,
            f"stream_options.include_usage must be true or false, got {include!r}",
            param="stream_options",
        )
    return bool(include)


def sse_event(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event, as OpenAI writes it (compact JSON)."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def is_usage_chunk(chunk: Mapping[str, Any]) -> bool:
    """The last chunk of :func:`~core.openai_format.achunks`: no choices, the usage."""
    return not chunk.get("choices") and "usage" in chunk


def wire_chunk(chunk: dict[str, Any], model: str, include_usage: bool) -> dict[str, Any] | None:
    """``chunk`` as sent for a request that named ``model`` (``None``: not sent)."""
    if is_usage_chunk(chunk):
        if not include_usage:
            return None
    elif include_usage:
        chunk["usage"] = None  # OpenAI: every chunk has the key, only the last a value
    chunk["model"] = model
    return chunk
