"""LangChain messages as OpenAI-style chat dicts, the form ``core`` takes.

:func:`convert_messages_to_dicts` is what ``ChatGemmaLocal`` sends to the core
client; it never modifies its input and raises ``TypeError`` / ``ValueError``
naming what it cannot send (unknown message classes, images, roles Gemma
does not know, invalid tool calls).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

#: ``ChatMessage.role`` values Gemma understands, and the OpenAI role each maps to.
CHAT_MESSAGE_ROLES: Mapping[str, str] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "model": "assistant",
}
_IMAGE_BLOCKS = frozenset({"image", "image_url", "input_image"})
#: Content blocks that record an AIMessage's own tool calls (Anthropic ``tool_use``,
#: LangChain's standard ``tool_call``, OpenAI Responses ``function_call``): the calls
#: are sent from ``AIMessage.tool_calls``, so these blocks are skipped.
_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "function_call"})


def _convert_content(
    content: str | list[Any], kind: str, *, skip: frozenset[str] = frozenset()
) -> str | list[dict[str, str]]:
    """A message's content as a string or a new list of OpenAI text parts.

    Blocks whose type is in ``skip`` are left out.
    """
    if isinstance(content, str):
        return content
    parts: list[dict[str, str]] = []
    for i, block in enumerate(content):
        if isinstance(block, str):
            parts.append({"type": "text", "text": block})
            continue
        block_type = block.get("type") if isinstance(block, Mapping) else None
        if block_type in skip:
            continue
        if block_type == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif block_type in _IMAGE_BLOCKS:
            raise TypeError(
                f"{kind} content block {i} is an image ({block_type!r}); ChatGemmaLocal "
                "does not accept images yet, only text"
            )
        else:
            found = repr(block_type) if block_type is not None else type(block).__name__
            raise TypeError(
                f"{kind} content block {i} has type {found}; ChatGemmaLocal accepts only "
                "strings and {'type': 'text', 'text': ...} blocks"
            )
    return parts


#: How the error of a tool call that ``max_tokens`` cut off starts (see ``_cut_call``).
CUT_OFF_CALL_ERROR = "the reply was cut off by max_tokens="


def _invalid_calls(message: AIMessage) -> list[Any]:
    """The message's invalid tool calls, less those ChatGemmaLocal recorded for a reply
    ``max_tokens`` cut off (the model never finished them: they are left out of the
    history, so an agent loop goes on with the complete calls)."""
    return [
        c
        for c in message.invalid_tool_calls
        if not str(c.get("error") or "").startswith(CUT_OFF_CALL_ERROR)
    ]


def _openai_tool_calls(message: AIMessage) -> list[dict[str, Any]]:
    """An AIMessage's tool calls in OpenAI form (``arguments`` as a JSON string)."""
    invalid = _invalid_calls(message)
    if invalid:
        bad = invalid[0]
        raise ValueError(
            f"{type(message).__name__} carries an invalid tool call ({bad.get('name')!r}, "
            f"arguments {bad.get('args')!r}) whose arguments are not a JSON object; Gemma "
            "can only be shown well-formed calls: fix or drop it from the history"
        )
    calls = []
    for call in message.tool_calls:
        if not call.get("id"):
            raise ValueError(
                f"{type(message).__name__} has a tool call to {call['name']!r} without an id; "
                "the ToolMessage answering it needs that id"
            )
        calls.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": json.dumps(call["args"], ensure_ascii=False),
                },
            }
        )
    return calls


def convert_message_to_dict(message: BaseMessage) -> dict[str, Any]:
    """One LangChain message as an OpenAI-style chat message dict.

    ``SystemMessage`` → system, ``HumanMessage`` → user, ``AIMessage`` →
    assistant, ``ToolMessage`` → ``{"role": "tool", "tool_call_id", "content"}``,
    ``ChatMessage`` by its role (see :data:`CHAT_MESSAGE_ROLES`). Content stays
    a string, or becomes a new list of text parts. An ``AIMessage`` with
    ``tool_calls`` also gets OpenAI ``tool_calls`` (``{"id", "type":
    "function", "function": {"name", "arguments": "<JSON>"}}``), its content
    ``None`` when it has no text, and its own call blocks (``tool_use``, ...)
    left out of the content. A call that ``max_tokens`` cut off (recorded by
    ChatGemmaLocal in ``invalid_tool_calls``) is left out: the model never
    finished it. ``name`` and a ToolMessage's ``status`` are dropped
    (Gemma's chat template has no speaker names; an error result says so in its
    content). The message is never modified.

    Raises:
        TypeError: for any other message class (``FunctionMessage``, ...) and
            for non-text content blocks (images).
        ValueError: for a ``ChatMessage`` role Gemma does not know, and for an
            ``AIMessage`` carrying ``invalid_tool_calls`` or a call without id.
    """
    kind = type(message).__name__
    if isinstance(message, ChatMessage):
        role = CHAT_MESSAGE_ROLES.get(message.role)
        if role is None:
            raise ValueError(
                f"ChatMessage has role {message.role!r}; ChatGemmaLocal knows the roles "
                f"{', '.join(sorted(CHAT_MESSAGE_ROLES))} (send tool results as ToolMessage)"
            )
    elif isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, ToolMessage):
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id,
            "content": _convert_content(message.content, kind),
        }
    elif isinstance(message, AIMessage):
        if not (message.tool_calls or _invalid_calls(message)):
            return {"role": "assistant", "content": _convert_content(message.content, kind)}
        calls = _openai_tool_calls(message)
        content = _convert_content(message.content, kind, skip=_CALL_BLOCKS)
        return {"role": "assistant", "content": content or None, "tool_calls": calls}
    else:
        raise TypeError(
            f"ChatGemmaLocal cannot send a {kind} to Gemma; supported messages are "
            "SystemMessage, HumanMessage, AIMessage, ToolMessage and ChatMessage with a "
            "known role"
        )
    return {"role": role, "content": _convert_content(message.content, kind)}


def convert_messages_to_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """A conversation as a new list of OpenAI-style dicts (see :func:`convert_message_to_dict`)."""
    return [convert_message_to_dict(m) for m in messages]
