"""OpenAI-style messages in, Gemma-ready turns out: the one place that normalises them.

Input: a non-empty sequence of ``{"role": "system"|"developer"|"user"|"assistant",
"content": str | [{"type": "text", "text": str}, ...]}`` mappings (``developer``
is OpenAI's newer name for ``system`` and is treated as one), plus the OpenAI
tool-calling shapes: ``{"role": "assistant", "content": None | str,
"tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]}``
and ``{"role": "tool", "tool_call_id": str, "content": ...}``, which must
follow the assistant message whose call it answers (other tool results of
that message may come between) and name one of its call ids (a call
without an id matches any). Every string
must be valid Unicode (no lone surrogates, which no tokenizer can encode):
:func:`check_text` says where one is, before anything loads.

Output: a new list of ``{"role", "content": str}`` dicts that every Gemma chat
template accepts: leading system messages merged into one (or folded into the
first user turn for templates that reject a system role, exactly the way the
Gemma 3 template folds it), consecutive turns of one role merged, and the
conversation checked to alternate and to end on a user turn. An assistant's
tool calls become the exact call text the model is asked to write, and tool
results become ```` ```tool_output ```` blocks in a user turn (consecutive
results merge into one turn), see :mod:`core.constrained`. The caller's list
and dicts are never mutated.

A user message may also hold image and audio parts (:mod:`core.media`); its
turn's content is then a list of text parts and decoded media parts in order
(:func:`user_content`), which the chat template writes as its media
placeholders. Text-only turns stay strings, rendered exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .constrained import render_tool_calls, render_tool_output
from .media import MEDIA_PART_TYPES, is_media_part, is_resolved, parse_part, resolved_part

ROLES = ("system", "developer", "user", "assistant", "tool")
#: Roles that are read as another: ``developer`` is OpenAI's newer name for ``system``.
ROLE_ALIASES = {"developer": "system"}
TURN_SEPARATOR = "\n\n"


def check_text(value: Any, where: str) -> None:
    """Raise ``ValueError`` if a string anywhere in ``value`` is not valid Unicode.

    Walks strings, mappings (keys and values) and lists/tuples. A lone UTF-16
    surrogate (``"\\udc80"``, e.g. from ``bytes.decode(errors="surrogateescape")``)
    cannot be encoded as UTF-8, so a tokenizer would fail on it after the
    model loaded; this names where it is instead, before any load.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{where} holds a lone surrogate {value[exc.start]!r} at index {exc.start}; "
                "text must be valid Unicode (encodable as UTF-8): decode bytes with "
                "errors='replace' or remove the character"
            ) from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_text(key, f"{where} key {key!r}")
            check_text(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_text(item, f"{where}[{i}]")


def content_to_text(content: Any, *, where: str = "content") -> str:
    """Flatten a message's content (a string or a list of text parts) to a string.

    Parts are ``{"type": "text", "text": str}`` dicts, as OpenAI's API takes
    them; a bare string inside the list is refused (OpenAI refuses it too).
    """
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping):
                hint = (
                    f" (write {{'type': 'text', 'text': {part!r}}})"
                    if isinstance(part, str)
                    else ""
                )
                raise ValueError(
                    f"{where}[{i}] must be a text part {{'type': 'text', 'text': ...}}, "
                    f"got {type(part).__name__}{hint}"
                )
            kind = part.get("type")
            if kind in MEDIA_PART_TYPES:
                raise ValueError(
                    f"{where}[{i}] has type {kind!r}; images and audio are allowed in user "
                    "messages only (this message takes 'text' parts)"
                )
            if kind != "text":
                raise ValueError(
                    f"{where}[{i}] has type {kind!r}; content parts are 'text', and in user "
                    f"messages also {', '.join(map(repr, MEDIA_PART_TYPES))}"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}[{i}]['text'] must be a string, got {text!r}")
            texts.append(text)
        return "\n".join(texts)
    raise ValueError(
        f"{where} must be a string or a list of text parts, got {type(content).__name__}"
    )


#: A turn's content as the chat template reads it: a string, or (with media) a
#: list of ``{"type": "text", "text"}`` and decoded ``{"type": "image"|"audio", ...}`` parts.
Content = str | list[dict[str, Any]]


def user_content(content: Any, *, where: str = "content") -> Content:
    """A user message's content: its text as :func:`content_to_text` gives it when it holds
    no media; else a list of parts where each run of text parts is one text part
    (joined with ``"\n"``, as the text-only case) and each media part is decoded
    (:func:`core.media.parse_part`; already decoded parts pass as they are)."""
    if isinstance(content, (str, bytes)) or not isinstance(content, Sequence):
        return content_to_text(content, where=where)
    if not any(is_media_part(p) for p in content):
        return content_to_text(content, where=where)
    parts: list[dict[str, Any]] = []
    run: list[Any] = []

    def flush() -> None:
        if run:
            parts.append({"type": "text", "text": content_to_text(run, where=where)})
            run.clear()

    for i, part in enumerate(content):
        if is_media_part(part):
            flush()
            media = part if is_resolved(part) else resolved_part(parse_part(part, f"{where}[{i}]"))
            parts.append(dict(media))
        else:
            run.append(part)
    flush()
    return parts


def join_content(first: Content, second: Content, separator: str = TURN_SEPARATOR) -> Content:
    """Two turns' contents as one: strings joined with ``separator``; with media, the part
    lists concatenated, the text that meets at the seam joined with ``separator``."""
    if isinstance(first, str) and isinstance(second, str):
        return first + separator + second
    a = [{"type": "text", "text": first}] if isinstance(first, str) else list(first)
    b = [{"type": "text", "text": second}] if isinstance(second, str) else list(second)
    if a and b and a[-1].get("type") == "text" and b[0].get("type") == "text":
        seam = {"type": "text", "text": a[-1]["text"] + separator + b[0]["text"]}
        return [*a[:-1], seam, *b[1:]]
    return [*a, *b]


def _message_text(message: Mapping[str, Any], role: str, i: int) -> Content:
    """A message's text (with media: its parts) as its Gemma turn reads it."""
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
    if role == "user":
        return user_content(content, where=f"{where}['content']")
    text = "" if content is None else content_to_text(content, where=f"{where}['content']")
    if calls:
        call_text = render_tool_calls(calls, f"{where}['tool_calls']")
        text = f"{text}{TURN_SEPARATOR}{call_text}" if text else call_text
    return text


def _call_ids(message: Mapping[str, Any]) -> list[str | None] | None:
    """The ids of an assistant message's tool calls (``None`` for one without), if it has calls."""
    calls = message.get("tool_calls")
    if not calls:
        return None
    ids: list[str | None] = []
    for call in calls:  # already checked to be a list of call mappings
        call_id = call.get("id")
        ids.append(call_id if isinstance(call_id, str) and call_id else None)
    return ids


def _check_tool_result(
    message: Mapping[str, Any], open_calls: list[str | None] | None, i: int
) -> None:
    """A tool result must answer a call of the assistant message just before it."""
    call_id = message["tool_call_id"]  # checked by _message_text
    if open_calls is None:
        raise ValueError(
            f"messages[{i}] is a tool result (tool_call_id {call_id!r}) with no assistant tool "
            "call before it; a 'tool' message must follow the assistant message whose "
            "'tool_calls' it answers (other tool results of that message may come between)"
        )
    if call_id not in open_calls and None not in open_calls:
        raise ValueError(
            f"messages[{i}] has tool_call_id {call_id!r}, which matches no call of the "
            f"preceding assistant message; its call ids are {open_calls}"
        )


def normalize_messages(
    messages: Any, *, system_role: bool = True, instructions: str | None = None
) -> list[dict[str, Any]]:
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
    turns: list[dict[str, Any]] = []
    # The call ids of the assistant message that tool results may answer now
    # (None: no such message right before; an id-less call matches any id).
    open_calls: list[str | None] | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        given = message.get("role")
        if not isinstance(given, str) or given not in ROLES:
            raise ValueError(f"messages[{i}] has role {given!r}; allowed roles: {', '.join(ROLES)}")
        check_text(message, f"messages[{i}]")
        role: str = ROLE_ALIASES.get(given, given)
        text = _message_text(message, role, i)
        if role == "tool":
            _check_tool_result(message, open_calls, i)
            role = "user"  # a tool's result is the next thing the model reads
        else:
            open_calls = _call_ids(message) if role == "assistant" else None
        if role == "system":
            if turns:
                raise ValueError(
                    f"messages[{i}] is a system message after the conversation started; "
                    "Gemma accepts system instructions only at the start"
                )
            system_parts.append(str(text))  # a system message's text: never a part list
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": join_content(turns[-1]["content"], text)}
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
        first = {"role": "user", "content": join_content(system, turns[0]["content"])}
        return [first, *turns[1:]]
    return turns
