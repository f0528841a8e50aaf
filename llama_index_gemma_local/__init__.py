"""LlamaIndex adapter of gemma-local: :class:`GemmaLocal`, a local Gemma as a LlamaIndex ``LLM``.

Importing this package imports llama-index-core and gemma-local's ``core``, but
no torch, transformers or mlx: those load with the first model.
"""

from .base import (
    GemmaLocal,
    StreamFolder,
    chat_to_completion_response,
    completion_to_chat_response,
    to_openai_message,
    to_openai_messages,
)

__all__ = [
    "GemmaLocal",
    "StreamFolder",
    "chat_to_completion_response",
    "completion_to_chat_response",
    "to_openai_message",
    "to_openai_messages",
]
