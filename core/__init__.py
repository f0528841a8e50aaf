"""gemma-local core: Gemma chat models behind an OpenAI ChatCompletion-style API.

Importing ``core`` imports no torch, transformers, mlx, vllm or llama.cpp; those load
with the first model.
"""

from .base import BaseGemmaChatCompletion
from .constrained import ToolCall
from .errors import (
    ClientClosedError,
    ContextWindowExceededError,
    GatedModelError,
    GemmaLocalError,
    MissingDependencyError,
    ModelNotFoundError,
    OfflineError,
    OutOfMemoryError,
    QueueFullError,
    UnsupportedPlatformError,
)
from .factory import create_gemma_client, create_gemma_transformers_client, resolve_backend
from .llamacpp_backend import GemmaLlamaCppChatCompletion
from .messages import normalize_messages
from .mlx_backend import GemmaMLXChatCompletion
from .params import SamplingParams
from .stream import Delta, Prompt, fold_deltas
from .transformers_backend import GemmaTransformersChatCompletion
from .vllm_backend import GemmaVLLMChatCompletion

__version__ = "0.1.0"

__all__ = [
    "BaseGemmaChatCompletion",
    "ClientClosedError",
    "ContextWindowExceededError",
    "Delta",
    "GatedModelError",
    "GemmaLlamaCppChatCompletion",
    "GemmaLocalError",
    "GemmaMLXChatCompletion",
    "GemmaTransformersChatCompletion",
    "GemmaVLLMChatCompletion",
    "MissingDependencyError",
    "ModelNotFoundError",
    "OfflineError",
    "OutOfMemoryError",
    "Prompt",
    "QueueFullError",
    "SamplingParams",
    "ToolCall",
    "UnsupportedPlatformError",
    "create_gemma_client",
    "create_gemma_transformers_client",
    "fold_deltas",
    "normalize_messages",
    "resolve_backend",
]
