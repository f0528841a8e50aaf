"""OpenAI-style messages in, Gemma-ready turns out: the one place that normalises them.

Input: a non-empty sequence of ``{"role": "system"|"user"|"assistant",
"content": str | [{"type": "text", "text": str}, ...]}`` mappings, plus the
OpenAI tool-calling shapes: ``{"role": "assistant", "content": None | str,
"tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]}``
and ``{"role": "tool", "tool_call_id": str, "content": ...}``.

Output: a new list of ``{"role", "content": str}`` dicts that every Gemma chat
template accepts: leading system messages merged into one (or folded into the
first user turn for templates that reject a system role, exactly the way the
Gemma 3 template folds it), consecutive turns of one role merged, and the
conversation checked to alternate and to end on a user turn. An assistant's
tool calls become the exact call text the model is asked to write, and tool
results become ```` ```tool_output ```` blocks in a user turn (consecutive
results merge into one turn), see :mod:`core.constrained`. The caller's list
and dicts are never mutated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .constrained import render_tool_calls, render_tool_output

ROLES = ("system", "user", "assistant", "tool")
TURN_SEPARATOR = "\n\n"


def content_to_text(content: Any, *, where: str = "content") -> str:
    """Flatten a message's content (a string or a list of text parts) to a string."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise ValueError(
                    f"{where}[{i}] must be a text part {{'type': 'text', 'text': ...}}, "
                    f"got {type(part).__name__}"
                )
            kind = part.get("type")
            if kind != "text":
                raise ValueError(
                    f"{where}[{i}] has type {kind!r}; only 'text' content parts are supported "
                    "(images are not supported yet)"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}[{i}]['text'] must be a string, got {text!r}")
            texts.append(text)
        return "\n".join(texts)
    raise ValueError(
        f"{where} must be a string or a list of text parts, got {type(content).__name__}"
    )


def _message_text(message: Mapping[str, Any], role: str, i: int) -> str:
    """A message's text as its Gemma turn reads it."""
    where = f"messages[{i}]"
    content = message.get("content")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(
                f"{where} has role 'tool' but no 'tool_call_id' (the id of the call it answers)"
            )
        if content is None:
            raise ValueError(f"{where} (tool) has no content")
        return render_tool_output(content_to_text(content, where=f"{where}['content']"))
    calls = message.get("tool_calls") if role == "assistant" else None
    if content is None and not calls:
        raise ValueError(f"{where} ({role}) has no content")
    text = "" if content is None else content_to_text(content, where=f"{where}['content']")
    if calls:
        call_text = render_tool_calls(calls, f"{where}['tool_calls']")
        text = f"{text}{TURN_SEPARATOR}{call_text}" if text else call_text
    return text


def normalize_messages(
    messages: Any, *, system_role: bool = True, instructions: str | None = None
) -> list[dict[str, str]]:
    """Validate and normalise OpenAI-style chat messages for a Gemma chat template.

    Args:
        messages: the conversation, oldest first.
        system_role: whether the chat template accepts a leading ``system``
            message (Gemma 3 folds it itself). When ``False`` (Gemma 1 and 2
            templates raise on it), the system text is folded into the first
            user turn as ``"<system>\\n\\n<user>"``, as Gemma 3's template does.
        instructions: system text added after the caller's system messages
            (the tool definitions or the JSON schema of a constrained request,
            see :func:`core.constrained.system_instructions`).

    Raises:
        ValueError: naming the offending message and what is allowed.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            "messages must be a list of {'role': ..., 'content': ...} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages must not be empty")

    system_parts: list[str] = []
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; allowed roles: {', '.join(ROLES)}")
        text = _message_text(message, role, i)
        if role == "tool":
            role = "user"  # a tool's result is the next thing the model reads
        if role == "system":
            if turns:
                raise ValueError(
                    f"messages[{i}] is a system message after the conversation started; "
                    "Gemma accepts system instructions only at the start"
                )
            system_parts.append(text)
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + TURN_SEPARATOR + text}
        else:
            turns.append({"role": role, "content": text})

    if not turns:
        raise ValueError("messages hold only system messages; add a user message")
    if turns[0]["role"] != "user":
        raise ValueError(
            "the conversation must start with a user message (after any system message), "
            f"got {turns[0]['role']!r} first"
        )
    if turns[-1]["role"] != "user":
        raise ValueError(
            f"the conversation must end with a user message, got {turns[-1]['role']!r} last"
        )

    if instructions:
        system_parts.append(instructions)
    if system_parts:
        system = TURN_SEPARATOR.join(system_parts)
        if system_role:
            return [{"role": "system", "content": system}, *turns]
        first = {"role": "user", "content": system + TURN_SEPARATOR + turns[0]["content"]}
        return [first, *turns[1:]]
    return turns
