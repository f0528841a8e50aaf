"""LangChain messages as OpenAI-style chat dicts, the form ``core`` takes.

:func:`convert_messages_to_dicts` is what ``ChatGemmaLocal`` sends to the core
client; it never modifies its input and raises ``TypeError`` / ``ValueError``
naming what it cannot send (unknown message classes and block types, media
outside user messages or held by a provider's file store, roles Gemma does
not know, invalid tool calls). Image and audio blocks, in every form
LangChain passes them (standard v1 and v0 blocks, OpenAI ``image_url`` /
``input_audio``), become the OpenAI parts core reads
(:func:`convert_media_block`); core decodes and checks the media itself.
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
#: Content block types that carry an image or audio: LangChain's standard v1 and v0
#: blocks (``image``, ``audio``), OpenAI Chat Completions (``image_url``, ``input_audio``)
#: and Responses (``input_image``) blocks.
MEDIA_BLOCK_TYPES = frozenset({"image", "image_url", "input_image", "audio", "input_audio"})
#: Data blocks LangChain knows that Gemma cannot read, and what to do instead.
UNREADABLE_BLOCKS: Mapping[str, str] = {
    "video": "send frames as images",
    "file": "extract its text (or render its pages as images) first",
    "text-plain": "send its text as a text block",
    "input_file": "extract its text (or render its pages as images) first",
}
#: Audio MIME types (parameters and case ignored) and the ``input_audio`` format each is:
#: the formats core decodes without ffmpeg (``core.media.AUDIO_FORMATS``).
AUDIO_MIME_TYPES: Mapping[str, str] = {
    "audio/wav": "wav",
    "audio/wave": "wav",
    "audio/x-wav": "wav",
    "audio/vnd.wave": "wav",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/ogg": "ogg",
    "audio/opus": "ogg",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mpeg3": "mp3",
    "audio/x-mpeg-3": "mp3",
}
#: Content blocks that record an AIMessage's own tool calls (Anthropic ``tool_use``,
#: LangChain's standard ``tool_call``, OpenAI Responses ``function_call``): the calls
#: are sent from ``AIMessage.tool_calls``, so these blocks are skipped.
_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "function_call"})
#: The MIME type written into a data URI when a block does not say one (core reads the
#: media from its bytes, not from the MIME type).
_UNKNOWN_MIME = "application/octet-stream"


def _where(kind: str, i: int, block_type: Any) -> str:
    return f"{kind} content block {i} ({block_type!r})"


def _detail(block: Mapping[str, Any]) -> Any:
    """An image block's ``detail``: its own key, or LangChain's ``extras["detail"]``."""
    if block.get("detail") is not None:
        return block["detail"]
    extras = block.get("extras")
    return extras.get("detail") if isinstance(extras, Mapping) else None


def _image_url_part(url: Any, detail: Any, where: str) -> dict[str, Any]:
    if not isinstance(url, str) or not url:
        raise ValueError(
            f"{where} has no image URL (got {type(url).__name__}); give a data: URI, an "
            "http(s):// or file:// URL, or a local path"
        )
    spec: dict[str, Any] = {"url": url}
    if detail is not None:
        spec["detail"] = detail
    return {"type": "image_url", "image_url": spec}


def _data_uri(data: Any, mime: Any, media: str, where: str) -> str:
    if not isinstance(data, str) or not data:
        raise ValueError(f"{where}: its base64 data must be a non-empty string, got {data!r:.40}")
    if mime is None:
        return f"data:{_UNKNOWN_MIME};base64,{data}"
    if not isinstance(mime, str) or not mime.lower().startswith(f"{media}/"):
        raise ValueError(f"{where}: mime_type {mime!r} is not an {media} type ('{media}/...')")
    return f"data:{mime};base64,{data}"


def _no_file_ids(where: str, key: str) -> ValueError:
    return ValueError(
        f"{where} refers to a provider's stored file ({key}); ChatGemmaLocal runs locally "
        "and cannot fetch it: pass the data as 'base64' (with 'mime_type') or a 'url' "
        "(data:, http(s)://, file:// or a local path)"
    )


def _image_block(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Any image block as an OpenAI ``image_url`` part (or core's own ``image`` part)."""
    block_type = block["type"]
    detail = _detail(block)
    if block_type == "image_url":
        spec = block.get("image_url")
        if isinstance(spec, Mapping):
            return _image_url_part(spec.get("url"), spec.get("detail", detail), where)
        return _image_url_part(spec, detail, where)
    if block_type == "input_image":
        if block.get("file_id") is not None:
            raise _no_file_ids(where, "file_id")
        return _image_url_part(block.get("image_url"), detail, where)
    source_type = block.get("source_type")
    if source_type is not None:  # LangChain v0: {"source_type": "url"|"base64"|"id", ...}
        if source_type == "url":
            return _image_url_part(block.get("url"), detail, where)
        if source_type == "base64":
            uri = _data_uri(block.get("data"), block.get("mime_type"), "image", where)
            return _image_url_part(uri, detail, where)
        if source_type == "id":
            raise _no_file_ids(where, "source_type 'id'")
        raise ValueError(
            f"{where} has source_type {source_type!r}; an image is given by 'url' or 'base64'"
        )
    if block.get("base64") is not None:
        uri = _data_uri(block["base64"], block.get("mime_type"), "image", where)
        return _image_url_part(uri, detail, where)
    if block.get("url") is not None:
        return _image_url_part(block["url"], detail, where)
    if block.get("file_id") is not None:
        raise _no_file_ids(where, "file_id")
    if block.get("image") is not None:  # core's own part: a PIL image, bytes or a path
        return {"type": "image", "image": block["image"]}
    raise ValueError(
        f"{where} has no image: give 'base64' (with 'mime_type'), 'url' (data:, http(s)://, "
        "file:// or a local path), or the OpenAI form {'type': 'image_url', 'image_url': "
        "{'url': ...}}"
    )


def _audio_format(mime: Any, where: str) -> str:
    base = mime.split(";", 1)[0].strip().lower() if isinstance(mime, str) else None
    fmt = AUDIO_MIME_TYPES.get(base) if base else None
    if fmt is None:
        raise ValueError(
            f"{where}: mime_type {mime!r} is not an audio format Gemma's audio reader decodes; "
            f"use one of {', '.join(sorted(AUDIO_MIME_TYPES))} (convert others, e.g. m4a or "
            "webm, with ffmpeg first)"
        )
    return fmt


def _audio_from_base64(data: Any, mime: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, str) or not data:
        raise ValueError(f"{where}: its base64 data must be a non-empty string, got {data!r:.40}")
    if mime is None:  # no type given: core reads the format from the bytes
        return {"type": "audio", "audio": f"data:{_UNKNOWN_MIME};base64,{data}"}
    return {
        "type": "input_audio",
        "input_audio": {"data": data, "format": _audio_format(mime, where)},
    }


def _audio_url(url: Any, where: str) -> dict[str, Any]:
    if not isinstance(url, str) or not url:
        raise ValueError(
            f"{where} has no audio URL (got {type(url).__name__}); give a data: URI, an "
            "http(s):// or file:// URL, or a local path"
        )
    return {"type": "audio", "audio": url}


def _audio_block(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Any audio block as an OpenAI ``input_audio`` part (or core's ``audio`` part for URLs)."""
    if block["type"] == "input_audio":
        spec = block.get("input_audio")
        if not isinstance(spec, Mapping):
            raise ValueError(
                f"{where} must be {{'type': 'input_audio', 'input_audio': {{'data': <base64>, "
                f"'format': 'wav'|...}}}}, got input_audio={spec!r:.60}"
            )
        return {"type": "input_audio", "input_audio": dict(spec)}
    source_type = block.get("source_type")
    if source_type is not None:  # LangChain v0
        if source_type == "base64":
            return _audio_from_base64(block.get("data"), block.get("mime_type"), where)
        if source_type == "url":
            return _audio_url(block.get("url"), where)
        if source_type == "id":
            raise _no_file_ids(where, "source_type 'id'")
        raise ValueError(
            f"{where} has source_type {source_type!r}; audio is given by 'base64' or 'url'"
        )
    if block.get("base64") is not None:
        return _audio_from_base64(block["base64"], block.get("mime_type"), where)
    if block.get("url") is not None:
        return _audio_url(block["url"], where)
    if block.get("file_id") is not None:
        raise _no_file_ids(where, "file_id")
    if block.get("audio") is not None:  # core's own part: {"type": "audio", "audio": ...}
        return {k: v for k, v in block.items() if k in ("type", "audio", "sampling_rate")}
    raise ValueError(
        f"{where} has no audio: give 'base64' with 'mime_type' (e.g. 'audio/wav'), 'url', or "
        "the OpenAI form {'type': 'input_audio', 'input_audio': {'data': ..., 'format': ...}}"
    )


def convert_media_block(
    block: Mapping[str, Any], *, where: str = "content block"
) -> dict[str, Any]:
    """One LangChain image or audio content block as the OpenAI-style part core reads.

    * ``{"type": "image", "base64", "mime_type"}`` (v1) and ``{"type": "image",
      "source_type": "base64", "data", "mime_type"}`` (v0) → ``image_url`` with a
      ``data:`` URI;
    * ``{"type": "image", "url"}`` (v1), ``source_type: "url"`` (v0) and the
      Responses ``{"type": "input_image", "image_url"}`` → ``image_url`` with
      that URL;
    * ``{"type": "image_url", "image_url": {"url", "detail"}}`` → a copy;
    * ``{"type": "audio", "base64", "mime_type"}`` (v1, and v0 ``source_type:
      "base64"``) → ``input_audio`` (its ``format`` from the MIME type,
      :data:`AUDIO_MIME_TYPES`);
    * ``{"type": "audio", "url"}`` (v1, v0 ``source_type: "url"``) →
      ``{"type": "audio", "audio": url}``;
    * ``{"type": "input_audio", "input_audio": {"data", "format"}}`` → a copy.

    A URL may be a ``data:`` URI, an ``http(s)://`` URL (core fetches it, with a
    timeout and a size limit), a ``file://`` URL or a local path. An image's
    ``detail`` (its own key or ``extras["detail"]``) is kept. Base64 without a
    ``mime_type`` is sent as ``application/octet-stream``: core reads the format
    from the bytes. Core's own Python parts (``{"type": "image", "image": PIL
    image | bytes | path}``, ``{"type": "audio", "audio": ...}``) pass on.
    Nothing is decoded here (core decodes and checks the media); the block is
    not modified.

    Raises:
        ValueError: a ``file_id`` / v0 ``source_type: "id"`` block (a provider's
            file store: nothing local can read it), a block with no data, an
            image block whose ``mime_type`` is not ``image/...``, an audio MIME
            type core cannot decode (see :data:`AUDIO_MIME_TYPES`).
        TypeError: ``block`` is not one of :data:`MEDIA_BLOCK_TYPES`.
    """
    block_type = block.get("type") if isinstance(block, Mapping) else None
    if block_type not in MEDIA_BLOCK_TYPES:
        found = repr(block_type) if block_type is not None else type(block).__name__
        raise TypeError(
            f"{where} has type {found}; image and audio blocks are of the types "
            f"{', '.join(map(repr, sorted(MEDIA_BLOCK_TYPES)))}"
        )
    if block_type in ("audio", "input_audio"):
        return _audio_block(block, where)
    return _image_block(block, where)


def _convert_content(
    content: str | list[Any], kind: str, role: str, *, skip: frozenset[str] = frozenset()
) -> str | list[dict[str, Any]]:
    """A message's content as a string or a new list of OpenAI parts.

    Image and audio blocks become parts (see :func:`convert_media_block`) in
    user messages; elsewhere they are refused (Gemma's chat templates read
    media in user turns only). Blocks whose type is in ``skip`` are left out.
    """
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        if isinstance(block, str):
            parts.append({"type": "text", "text": block})
            continue
        block_type = block.get("type") if isinstance(block, Mapping) else None
        if block_type in skip:
            continue
        if block_type == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif block_type in MEDIA_BLOCK_TYPES:
            where = _where(kind, i, block_type)
            if role != "user":
                raise ValueError(
                    f"{where} is media in a message with role {role!r}; Gemma reads images "
                    "and audio in user messages (HumanMessage) only: its chat template has no "
                    "place for them in other turns"
                )
            parts.append(convert_media_block(block, where=where))
        elif isinstance(block_type, str) and block_type in UNREADABLE_BLOCKS:
            raise TypeError(
                f"{_where(kind, i, block_type)}: Gemma cannot read {block_type} blocks "
                f"({UNREADABLE_BLOCKS[block_type]}); ChatGemmaLocal accepts text, image and "
                "audio blocks"
            )
        else:
            found = repr(block_type) if block_type is not None else type(block).__name__
            raise TypeError(
                f"{kind} content block {i} has type {found}; ChatGemmaLocal accepts strings, "
                "{'type': 'text', 'text': ...} blocks and, in user messages, image and audio "
                f"blocks ({', '.join(map(repr, sorted(MEDIA_BLOCK_TYPES)))})"
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
    a string, or becomes a new list of text parts and, in user messages, image
    and audio parts (:func:`convert_media_block`). An ``AIMessage`` with
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
            for content blocks other than text, image and audio (``file``,
            ``video``, ``reasoning``, ...).
        ValueError: for a ``ChatMessage`` role Gemma does not know, an
            ``AIMessage`` carrying ``invalid_tool_calls`` or a call without id,
            an image or audio block outside a user message, and a media block
            :func:`convert_media_block` refuses (``file_id``, no data, a MIME
            type core cannot read).
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
            "content": _convert_content(message.content, kind, "tool"),
        }
    elif isinstance(message, AIMessage):
        if not (message.tool_calls or _invalid_calls(message)):
            return {
                "role": "assistant",
                "content": _convert_content(message.content, kind, "assistant"),
            }
        calls = _openai_tool_calls(message)
        content = _convert_content(message.content, kind, "assistant", skip=_CALL_BLOCKS)
        return {"role": "assistant", "content": content or None, "tool_calls": calls}
    else:
        raise TypeError(
            f"ChatGemmaLocal cannot send a {kind} to Gemma; supported messages are "
            "SystemMessage, HumanMessage, AIMessage, ToolMessage and ChatMessage with a "
            "known role"
        )
    return {"role": role, "content": _convert_content(message.content, kind, role)}


def convert_messages_to_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """A conversation as a new list of OpenAI-style dicts (see :func:`convert_message_to_dict`)."""
    return [convert_message_to_dict(m) for m in messages]
