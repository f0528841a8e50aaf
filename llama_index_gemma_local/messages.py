"""LlamaIndex messages and tools <-> OpenAI-style dicts, for :class:`~llama_index_gemma_local.GemmaLocal`.

In (what core reads)::

    ChatMessage ──to_openai_message()──▶ {"role", "content", "tool_calls",
        "reasoning_content", "tool_call_id"}
        (ImageBlock ──image_part()──▶ {"type": "image_url", ...},
         AudioBlock ──audio_part()──▶ {"type": "input_audio" | "audio", ...}: core
         decodes and checks the media)
    BaseTool ──to_openai_tool()──▶ {"type": "function", "function": {...}}
    LlamaIndex tool_choice ──resolve_tool_choice()──▶ OpenAI tool_choice

Out (what LlamaIndex reads)::

    text + OpenAI tool_calls + reasoning ──assistant_message()──▶ ChatMessage
        (ThinkingBlock, TextBlock, ToolCallBlocks; ``tool_calls`` in additional_kwargs)
    ChatMessage ──tool_selections()──▶ ToolSelection[]

Pure functions: nothing here loads a model, and no input is mutated. Bad
input raises ``TypeError`` (a type it does not know) or ``ValueError`` (a
role, tool name or tool message it cannot map), naming what is allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from io import IOBase
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ContentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.utils import resolve_binary

from core.media import AUDIO_FORMATS

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

#: LlamaIndex roles and the OpenAI-style role each maps to. Anything else
#: (function, developer, chatbot, model) is rejected.
ROLES: Mapping[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.TOOL: "tool",
}

#: ``tool_choice`` values that are modes, not tool names.
TOOL_CHOICE_MODES = ("none", "auto", "required")


# ------------------------------------------------------------------ messages in


#: Other spellings of the ``AudioBlock.format`` values core decodes (:data:`AUDIO_FORMATS`,
#: ``core.media``'s: what libsndfile reads without ffmpeg).
_AUDIO_ALIASES: Mapping[str, str] = {
    "wave": "wav",
    "x-wav": "wav",
    "vnd.wave": "wav",
    "x-flac": "flac",
    "oga": "ogg",
    "opus": "ogg",
    "mpeg": "mp3",
    "mpeg3": "mp3",
}
#: The MIME type written into a data URI when a block does not say one (core reads the
#: media from its bytes, not from the MIME type).
_UNKNOWN_MIME = "application/octet-stream"
#: What a user can do instead of a block Gemma cannot read, by block class name.
_INSTEAD: Mapping[str, str] = {
    "DocumentBlock": "extract its text into a TextBlock (or render its pages as ImageBlocks)",
    "VideoBlock": "send frames as ImageBlocks",
    "CachePoint": "leave it out: prompt caching is a hosted API's feature",
}
_ALLOWED_BLOCKS = (
    "TextBlock, ImageBlock and AudioBlock (assistant messages also ToolCallBlock and ThinkingBlock)"
)


def _base64_of(data: Any) -> str:
    """The base64 text of a block's inline data: bytes (LlamaIndex keeps them as base64
    after validation; raw bytes are encoded) or a file object (read from its start, its
    position restored)."""
    if isinstance(data, IOBase):
        position = data.tell()
        try:
            data.seek(0)
            raw = data.read()
        finally:
            data.seek(position)
        data = raw.encode() if isinstance(raw, str) else raw
    return resolve_binary(raw_bytes=bytes(data), as_base64=True).read().decode("ascii")


def image_part(block: ImageBlock, *, where: str = "ImageBlock") -> dict[str, Any]:
    """An ``ImageBlock`` as an OpenAI ``image_url`` part.

    Inline ``image`` data (bytes or a file object) becomes a ``data:`` URI (with
    ``image_mimetype``, else ``application/octet-stream``: core reads the format
    from the bytes); a ``path`` or ``url`` (``http(s)://``, ``file://``,
    ``data:``) is passed on for core to read, fetch or decode. ``detail`` is
    kept. The first of ``image``, ``path``, ``url`` that is set is used, as
    ``ImageBlock.resolve_image`` does. Nothing is decoded here; the block is
    not modified.

    Raises:
        ValueError: the block has neither image data, a path nor a URL.
    """
    if block.image is not None:
        data = _base64_of(block.image)
        if not data:
            raise ValueError(f"{where} holds no image data (0 bytes)")
        url = f"data:{block.image_mimetype or _UNKNOWN_MIME};base64,{data}"
    elif block.path is not None:
        url = str(block.path)
    elif block.url is not None:
        url = str(block.url)
    else:
        raise ValueError(f"{where} has no image: set its image (bytes), path or url")
    spec: dict[str, Any] = {"url": url}
    if block.detail is not None:
        spec["detail"] = block.detail
    return {"type": "image_url", "image_url": spec}


def _audio_format(fmt: str, where: str) -> str:
    name = fmt.strip().lower().rsplit("/", 1)[-1]  # "audio/wav" -> "wav"
    name = _AUDIO_ALIASES.get(name, name)
    if name not in AUDIO_FORMATS:
        raise ValueError(
            f"{where} has format {fmt!r}; Gemma's audio reader decodes "
            f"{', '.join(AUDIO_FORMATS)} (convert others, e.g. m4a or webm, with ffmpeg first)"
        )
    return name


def audio_part(block: AudioBlock, *, where: str = "AudioBlock") -> dict[str, Any]:
    """An ``AudioBlock`` as the OpenAI-style part core reads.

    Inline ``audio`` data becomes ``{"type": "input_audio", "input_audio":
    {"data": <base64>, "format": ...}}`` (without a ``format``, a ``data:`` URI
    in core's ``{"type": "audio", "audio": ...}`` part: core reads the format
    from the bytes); a ``path`` or ``url`` becomes ``{"type": "audio",
    "audio": <path or URL>}`` for core to read or fetch. Nothing is decoded
    here; the block is not modified.

    Raises:
        ValueError: no audio data, path or URL; a ``format`` core cannot decode
            (see :data:`AUDIO_FORMATS`).
    """
    fmt = _audio_format(block.format, where) if block.format else None
    if block.audio is not None:
        data = _base64_of(block.audio)
        if not data:
            raise ValueError(f"{where} holds no audio data (0 bytes)")
        if fmt is None:
            return {"type": "audio", "audio": f"data:{_UNKNOWN_MIME};base64,{data}"}
        return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
    if block.path is not None:
        return {"type": "audio", "audio": str(block.path)}
    if block.url is not None:
        return {"type": "audio", "audio": str(block.url)}
    raise ValueError(f"{where} has no audio: set its audio (bytes), path or url")


def _block_parts(message: ChatMessage, role: str, index: int | None) -> list[dict[str, Any]]:
    """A message's content parts in block order: ``TextBlock`` text, and in user messages
    ``ImageBlock`` / ``AudioBlock`` media; tool-call and thinking blocks are skipped in
    assistant turns (:func:`to_openai_message` reads them)."""
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(message.blocks):
        name = type(block).__name__
        of = "the message" if index is None else f"message {index}"
        where = f"{name} (block {i} of {of}, role {role!r})"
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, (ToolCallBlock, ThinkingBlock)) and role == "assistant":
            continue  # mapped to tool_calls / reasoning_content by to_openai_message
        elif isinstance(block, (ImageBlock, AudioBlock)):
            if role != "user":
                raise ValueError(
                    f"{where}: Gemma reads images and audio in user messages only (its chat "
                    "template has no place for them in other turns)"
                )
            parts.append(
                image_part(block, where=where)
                if isinstance(block, ImageBlock)
                else audio_part(block, where=where)
            )
        else:
            instead = f"; {_INSTEAD[name]}" if name in _INSTEAD else ""
            raise TypeError(
                f"GemmaLocal supports {_ALLOWED_BLOCKS}; got {name} (block {i} of {of}, role "
                f"{role!r}){instead}"
            )
    return parts


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _openai_call(call: Any) -> dict[str, Any]:
    """One ``additional_kwargs["tool_calls"]`` entry (a dict, or an OpenAI SDK object) as a dict."""
    if not isinstance(call, Mapping) and callable(getattr(call, "model_dump", None)):
        call = call.model_dump()
    if not isinstance(call, Mapping):
        raise TypeError(
            "an assistant message's additional_kwargs['tool_calls'] must hold OpenAI tool calls "
            f'{{"id", "type": "function", "function": {{"name", "arguments"}}}}, got {type(call).__name__}'
        )
    return dict(call)


def _tool_calls_of(message: ChatMessage) -> list[dict[str, Any]]:
    """An assistant message's tool calls in OpenAI form: its ``ToolCallBlock``s, else
    ``additional_kwargs["tool_calls"]`` (the OpenAI integration's form)."""
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        calls = []
        for block in blocks:
            call: dict[str, Any] = {"id": block.tool_call_id or "", "type": "function"}
            call["function"] = {
                "name": block.tool_name,
                "arguments": _arguments_text(block.tool_kwargs),
            }
            calls.append(call)
        return calls
    return [_openai_call(c) for c in message.additional_kwargs.get("tool_calls") or ()]


def to_openai_message(message: ChatMessage, *, index: int | None = None) -> dict[str, Any]:
    """One LlamaIndex ``ChatMessage`` as an OpenAI-style message dict.

    One ``TextBlock`` gives a string, several give a list of text parts (core
    joins them), none gives ``""``. A user message with ``ImageBlock`` /
    ``AudioBlock``s gives a list of text and media parts in block order
    (:func:`image_part`, :func:`audio_part`). An assistant message's tool calls
    (``ToolCallBlock``s, or OpenAI ``tool_calls`` in ``additional_kwargs``)
    become ``tool_calls`` (``content`` is then ``None`` when there is no
    text); its ``ThinkingBlock``s' text becomes ``reasoning_content`` (Gemma 4's
    template shows it where the model's own format keeps it; Gemma 1-3 ignore
    it). A ``tool`` message needs ``additional_kwargs["tool_call_id"]`` and
    becomes ``{"role": "tool", "tool_call_id", "content"}``. Core renders all
    of it into Gemma turns. ``index`` (the message's place in a conversation)
    is only named in errors. The input is never mutated.

    Raises:
        TypeError: ``message`` is not a ``ChatMessage``, or holds a block other
            than ``TextBlock``, ``ImageBlock`` and ``AudioBlock`` (and, in
            assistant messages, ``ToolCallBlock`` and ``ThinkingBlock``):
            ``DocumentBlock``, ``VideoBlock``, ``CachePoint``, ...
        ValueError: a role other than system, user, assistant or tool; a tool
            message without ``tool_call_id``; an image or audio block outside a
            user message, without data, or with an audio format core cannot
            decode.
    """
    if not isinstance(message, ChatMessage):
        raise TypeError(f"expected a llama_index ChatMessage, got {type(message).__name__}")
    role = ROLES.get(message.role)
    if role is None:
        allowed = ", ".join(r.value for r in ROLES)
        raise ValueError(
            f"GemmaLocal does not support {message.role.value!r} messages; allowed roles: {allowed}"
        )
    parts = _block_parts(message, role, index)
    texts = [p["text"] for p in parts if p["type"] == "text"]
    content: Any = parts
    if len(parts) == len(texts):  # text only: a string when there is one block
        content = texts[0] if len(texts) == 1 else parts
    if not parts:
        content = ""
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "tool":
        call_id = message.additional_kwargs.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(
                "a tool message needs additional_kwargs['tool_call_id'] (the id of the call it "
                f"answers), got {call_id!r}"
            )
        out["tool_call_id"] = call_id
    elif role == "assistant":
        calls = _tool_calls_of(message)
        if calls:
            out["tool_calls"] = calls
            if not texts:
                out["content"] = None
        thoughts = [b.content for b in message.blocks if isinstance(b, ThinkingBlock) and b.content]
        if thoughts:
            out["reasoning_content"] = "\n".join(thoughts)
    return out


def to_openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """A LlamaIndex conversation as OpenAI-style message dicts (see :func:`to_openai_message`)."""
    if isinstance(messages, (str, ChatMessage)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a sequence of ChatMessage, got {type(messages).__name__}"
        )
    return [to_openai_message(m, index=i) for i, m in enumerate(messages)]


# --------------------------------------------------------------------- tools in


def to_openai_tool(tool: BaseTool | Mapping[str, Any]) -> dict[str, Any]:
    """A LlamaIndex tool (``FunctionTool``, ``QueryEngineTool``, ...) as an OpenAI tool dict.

    An OpenAI dict (``{"type": "function", "function": {...}}``) passes through
    as is; core validates both the same way. The tool's name must already be a
    valid function name: LlamaIndex would otherwise rename it for the model
    (``"my tool"`` → ``"my_tool"``) and no call could find the tool again.

    Raises:
        TypeError: neither a LlamaIndex tool nor a dict.
        ValueError: a tool name with characters other than letters, digits, ``_``, ``-``.
    """
    if isinstance(tool, Mapping):
        return dict(tool)
    metadata = getattr(tool, "metadata", None)
    if metadata is None or not callable(getattr(metadata, "to_openai_tool", None)):
        raise TypeError(
            "tools must be LlamaIndex tools (e.g. FunctionTool.from_defaults(fn)) or OpenAI "
            f'{{"type": "function", "function": {{...}}}} dicts, got {type(tool).__name__}'
        )
    name = metadata.name
    if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]+", name):
        raise ValueError(
            f"tool name {name!r} is not a valid function name (letters, digits, '_' or '-'); "
            "rename the tool, e.g. FunctionTool.from_defaults(fn, name='my_tool')"
        )
    return dict(metadata.to_openai_tool(skip_length_check=True))


def resolve_tool_choice(tool_choice: Any, tool_required: bool = False) -> Any:
    """LlamaIndex's ``tool_choice`` as OpenAI's.

    ``None`` is ``"required"`` when ``tool_required`` else ``"auto"``; a bare
    tool name (``FunctionAgent(initial_tool_choice="add")``) becomes
    ``{"type": "function", "function": {"name": "add"}}``; modes and dicts pass.
    """
    if tool_choice is None:
        return "required" if tool_required else "auto"
    if isinstance(tool_choice, str) and tool_choice not in TOOL_CHOICE_MODES:
        return {"type": "function", "function": {"name": tool_choice}}
    return tool_choice


# ----------------------------------------------------------------- responses out


# ---------------------------------------------------------------- messages out


def _tool_kwargs(arguments: str) -> dict[str, Any] | str:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # not complete yet (a stream that is still arriving)
    return value if isinstance(value, dict) else arguments


def assistant_message(
    text: str | None,
    tool_calls: Sequence[Mapping[str, Any]],
    reasoning: str | None = None,
    reasoning_tokens: int | None = None,
) -> ChatMessage:
    """The assistant ``ChatMessage`` of a reply: its thought, text and tool calls.

    A thought (``reasoning``, Gemma 4's thinking channel) comes first, as a
    ``ThinkingBlock`` with ``num_tokens=reasoning_tokens`` (as LlamaIndex's
    Ollama integration puts it), followed by the text block. Tool calls are
    carried twice, as LlamaIndex's OpenAI integration does: as
    ``ToolCallBlock``s (what llama-index-core's agents and memory read; their
    ``tool_kwargs`` are the parsed arguments) and as the OpenAI ``tool_calls``
    dicts in ``additional_kwargs`` (what OpenAI-style code reads).
    """
    thought: list[ContentBlock] = []
    if reasoning:
        thought.append(ThinkingBlock(content=reasoning, num_tokens=reasoning_tokens or None))
    if not tool_calls:
        if not thought:
            return ChatMessage(role=MessageRole.ASSISTANT, content=text or "")
        return ChatMessage(
            role=MessageRole.ASSISTANT, blocks=[*thought, TextBlock(text=text or "")]
        )
    blocks: list[ContentBlock] = [*thought, *([TextBlock(text=text)] if text else [])]
    for call in tool_calls:
        function = call.get("function") or {}
        blocks.append(
            ToolCallBlock(
                tool_call_id=call.get("id") or None,
                tool_name=function.get("name") or "",
                tool_kwargs=_tool_kwargs(function.get("arguments") or "{}"),
            )
        )
    return ChatMessage(
        role=MessageRole.ASSISTANT,
        blocks=blocks,
        additional_kwargs={"tool_calls": [dict(c) for c in tool_calls]},
    )


def tool_selections(message: ChatMessage) -> list[ToolSelection]:
    """The tool calls a message carries, as LlamaIndex ``ToolSelection``s (in order).

    Reads ``ToolCallBlock``s, or else OpenAI ``tool_calls`` in
    ``additional_kwargs``; arguments that are JSON text are parsed.
    """
    selections = []
    for call in _tool_calls_of(message):
        function = call.get("function") or {}
        arguments = function.get("arguments")
        kwargs = _tool_kwargs(arguments) if isinstance(arguments, str) else arguments
        selections.append(
            ToolSelection(
                tool_id=call.get("id") or "",
                tool_name=function.get("name") or "",
                tool_kwargs=kwargs if isinstance(kwargs, dict) else {},
            )
        )
    return selections
