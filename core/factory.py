"""Factories: pick a backend for this machine, or build the transformers client of the original design."""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import Any

from .base import BaseGemmaChatCompletion

BACKENDS = ("auto", "transformers", "mlx", "vllm", "llamacpp")


class _DefaultModels(dict[str, str]):
    """The default model of each backend; llama.cpp has none (it loads a file the user has)."""

    def __missing__(self, backend: str) -> str:
        if backend == "llamacpp":
            raise ValueError(
                "backend 'llamacpp' has no default model: pass model_name, the path of a .gguf "
                "file (Gemma 2, 3 or 4 from llama.cpp, Ollama or the hub)"
            )
        raise KeyError(backend)


DEFAULT_MODELS = _DefaultModels(
    {
        "transformers": "google/gemma-3-12b-it",
        "mlx": "mlx-community/gemma-3-12b-it-4bit-DWQ",
        "vllm": "google/gemma-3-12b-it",
    }
)


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` means MLX on Apple Silicon when mlx-lm is installed, transformers otherwise.

    vLLM is never chosen by ``auto``: it is a serving engine (a process per GPU,
    minutes to start) that is asked for by name; so is llama.cpp (``llamacpp``,
    the fastest CPU path for a GGUF file), which needs its own extra.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if is_apple_silicon() and importlib.util.find_spec("mlx_lm") is not None:
        return "mlx"
    return "transformers"


def create_gemma_client(
    backend: str = "auto", model_name: str | None = None, **options: Any
) -> BaseGemmaChatCompletion:
    """A chat-completion client on the best (or the named) backend; loads nothing yet.

    ``options`` go to the backend's constructor (e.g. ``use_4bit_quantization``
    for transformers, ``max_kv_size`` for MLX, ``tensor_parallel_size`` for vLLM,
    ``n_threads`` for llama.cpp).
    """
    chosen = resolve_backend(backend)
    name = model_name if model_name is not None else DEFAULT_MODELS[chosen]
    if chosen == "llamacpp":
        from .llamacpp_backend import GemmaLlamaCppChatCompletion

        return GemmaLlamaCppChatCompletion(name, **options)
    if chosen == "vllm":
        from .vllm_backend import GemmaVLLMChatCompletion

        return GemmaVLLMChatCompletion(name, **options)
    if chosen == "mlx":
        from .mlx_backend import GemmaMLXChatCompletion

        return GemmaMLXChatCompletion(name, **options)
    from .transformers_backend import GemmaTransformersChatCompletion

    return GemmaTransformersChatCompletion(name, **options)


def create_gemma_transformers_client(
    model_name: str = "google/gemma-3-12b-it",
    use_4bit_quantization: bool = False,
    device_map: Any = "auto",
    trust_remote_code: bool = False,
    **options: Any,
) -> BaseGemmaChatCompletion:
    """The original design's factory: a :class:`GemmaTransformersChatCompletion`."""
    from .transformers_backend import GemmaTransformersChatCompletion

    return GemmaTransformersChatCompletion(
        model_name,
        use_4bit_quantization=use_4bit_quantization,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        **options,
    )
