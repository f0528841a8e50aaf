"""LangChain integration of gemma-local: :class:`ChatGemmaLocal`, a local Gemma chat model.

Importing this package imports langchain-core and ``core`` but no torch,
transformers or mlx; those load with the first model.
"""

from core.errors import require

require("langchain_core", feature="langchain_gemma_local")

from .chat_models import (  # noqa: E402 - the dependency check above must run first
    ChatGemmaLocal,
    convert_message_to_dict,
    convert_messages_to_dicts,
)

__all__ = ["ChatGemmaLocal", "convert_message_to_dict", "convert_messages_to_dicts"]
