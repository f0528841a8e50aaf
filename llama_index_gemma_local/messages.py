"""LlamaIndex messages and tools <-> OpenAI-style dicts, for :class:`~llama_index_gemma_local.GemmaLocal`.

In (what core reads)::

    ChatMessage ──to_openai_message()──▶ {"role", "content", "tool_calls",
        "reasoning_content", "tool_call_id"}
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
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ContentBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection

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


def _block_texts(message: ChatMessage, role: str) -> list[str]:
    """The text of a message's ``TextBlock``s; tool-call and thinking blocks only in
    assistant turns."""
    texts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, (ToolCallBlock, ThinkingBlock)) and role == "assistant":
            continue  # mapped to tool_calls / reasoning_content by to_openai_message
        else:
            hint = (
                " (images are not supported yet)" if "image" in type(block).__name__.lower() else ""
            )
            raise TypeError(
                f"GemmaLocal supports only TextBlock content, got {type(block).__name__} "
                f"in a {role} message{hint} (assistant messages may also hold "
                "ToolCallBlock and ThinkingBlock)"
            )
    return texts


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


def to_openai_message(message: ChatMessage) -> dict[str, Any]:
    """One LlamaIndex ``ChatMessage`` as an OpenAI-style message dict.

    One ``TextBlock`` gives a string, several give a list of text parts (core
    joins them), none gives ``""``. An assistant message's tool calls
    (``ToolCallBlock``s, or OpenAI ``tool_calls`` in ``additional_kwargs``)
    become ``tool_calls`` (``content`` is then ``None`` when there is no
    text); its ``ThinkingBlock``s' text becomes ``reasoning_content`` (Gemma 4's
    template shows it where the model's own format keeps it; Gemma 1-3 ignore
    it). A ``tool`` message needs ``additional_kwargs["tool_call_id"]`` and
    becomes ``{"role": "tool", "tool_call_id", "content"}``. Core renders all
    of it into Gemma turns. The input is never mutated.

    Raises:
        TypeError: ``message`` is not a ``ChatMessage``, or holds a block other
            than ``TextBlock`` (and, in assistant messages, ``ToolCallBlock``
            and ``ThinkingBlock``).
        ValueError: a role other than system, user, assistant or tool; a tool
            message without ``tool_call_id``.
    """
    if not isinstance(message, ChatMessage):
        raise TypeError(f"expected a llama_index ChatMessage, got {type(message).__name__}")
    role = ROLES.get(message.role)
    if role is None:
        allowed = ", ".join(r.value for r in ROLES)
        raise ValueError(
            f"GemmaLocal does not support {message.role.value!r} messages; allowed roles: {allowed}"
        )
    texts = _block_texts(message, role)
    content: Any = texts[0] if len(texts) == 1 else [{"type": "text", "text": t} for t in texts]
    if not texts:
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
    return [to_openai_message(m) for m in messages]


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
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=[*thought, TextBlock(text=text or "")])
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
