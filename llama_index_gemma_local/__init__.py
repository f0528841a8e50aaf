"""LlamaIndex adapter of gemma-local: :class:`GemmaLocal`, a local Gemma as a LlamaIndex
``FunctionCallingLLM`` (tools and structured output constrained by core).

Importing this package imports llama-index-core and gemma-local's ``core``, but
no torch, transformers or mlx: those load with the first model.
"""

from .base import (
    DeltaFolder,
    GemmaLocal,
    StreamFolder,
    assistant_message,
    chat_to_completion_response,
    completion_to_chat_response,
    json_schema_format,
    reply_response,
    resolve_tool_choice,
    to_openai_message,
    to_openai_messages,
    to_openai_tool,
    tool_selections,
)

__all__ = [
    "DeltaFolder",
    "GemmaLocal",
    "StreamFolder",
    "assistant_message",
    "chat_to_completion_response",
    "completion_to_chat_response",
    "json_schema_format",
    "reply_response",
    "resolve_tool_choice",
    "to_openai_message",
    "to_openai_messages",
    "to_openai_tool",
    "tool_selections",
]
