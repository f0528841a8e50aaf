"""Errors that tell the user what to do, and the translation of backend errors into them."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator


class GemmaLocalError(Exception):
    """Base class of every error gemma-local raises on its own account."""


class MissingDependencyError(GemmaLocalError, ImportError):
    """An optional backend is not installed."""


class ModelNotFoundError(GemmaLocalError, OSError):
    """Neither a local folder nor a model id the hub knows."""


class GatedModelError(GemmaLocalError, PermissionError):
    """The model's licence has to be accepted before it can be downloaded."""


class OfflineError(GemmaLocalError, ConnectionError):
    """The model is not in the local cache and the hub cannot be reached."""


class OutOfMemoryError(GemmaLocalError, MemoryError):
    """The model or the request does not fit in memory."""


class UnsupportedPlatformError(GemmaLocalError, RuntimeError):
    """The requested backend or quantisation cannot run on this machine."""


class ContextWindowExceededError(GemmaLocalError, ValueError):
    """The prompt does not leave room for a single new token."""


class ClientClosedError(GemmaLocalError, RuntimeError):
    """``close()`` cancelled this request (queued or generating); the client itself stays usable."""


class QueueFullError(GemmaLocalError, RuntimeError):
    """The client's request queue is full (its ``max_queue`` requests wait for a row already).

    Raised at once by the call that would have queued; retry later, or raise
    ``max_queue`` / ``max_batch_size`` on the client. The HTTP server answers 429.
    """


class TiedWeightsError(GemmaLocalError, RuntimeError):
    """Weights the model's config ties (``lm_head`` to the embeddings) came back untied from a load.

    Such a model would answer with a randomly initialised output layer, so the
    load fails instead.
    """


EXTRAS = {
    "torch": "transformers",
    "transformers": "transformers",
    "accelerate": "transformers",
    "bitsandbytes": "quantization",
    "mlx": "mlx",
    "mlx_lm": "mlx",
    "mlx_vlm": "mlx-media",
    "langchain_core": "langchain",
    "llama_index": "llama-index",
    "fastapi": "server",
    "PIL": "media",
    "soundfile": "media",
    "numpy": "media",
    "scipy": "media",
    "uvicorn": "server",
}


def require(*modules: str, feature: str) -> None:
    """Raise :class:`MissingDependencyError` naming the pip extra if a module is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extra = EXTRAS.get(missing[0].split(".")[0], "all")
        raise MissingDependencyError(
            f"{feature} needs {', '.join(missing)}, which is not installed. "
            f'Install it with: pip install "gemma-local[{extra}]"'
        )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def translate_load_error(exc: BaseException, model_name: str) -> BaseException | None:
    """Map what transformers / huggingface_hub / torch / mlx raise while loading to our errors.

    Returns ``None`` when the error is not one we can explain better.
    """
    for err in _chain(exc):
        names = _names(err)
        text = str(err)
        if "GatedRepoError" in names or "gated repo" in text.lower():
            return GatedModelError(
                f"{model_name} is a gated model. Accept its licence on "
                f"https://huggingface.co/{model_name}, then log in with `hf auth login` "
                "or set the HF_TOKEN environment variable."
            )
        if "HFValidationError" in names:  # e.g. "/no/such/folder": no folder, no valid hub id
            return ModelNotFoundError(
                f"model {model_name!r} was not found: there is no folder at that path and it "
                "is not a valid Hugging Face hub id (like google/gemma-3-1b-it). Check the "
                "path, or pass the path of a folder holding config.json, the weights and the "
                "tokenizer."
            )
        if "RepositoryNotFoundError" in names or "is not a valid model identifier" in text:
            return ModelNotFoundError(
                f"model {model_name!r} was not found: it is neither a local folder nor a "
                "model id on the Hugging Face hub. Check the spelling, or pass the path of a "
                "folder holding config.json, the weights and the tokenizer."
            )
        if (
            "LocalEntryNotFoundError" in names
            or "OfflineModeIsEnabled" in names
            or "ConnectError" in names
            or "couldn't connect to" in text
            or "Cannot find the requested files in the disk cache" in text
        ):
            return OfflineError(
                f"{model_name} is not in the local cache and the Hugging Face hub cannot be "
                "reached. Connect once to download it, or pass the path of a local folder "
                "holding the model (config.json, weights, tokenizer)."
            )
    return translate_oom(exc, model_name)


def translate_oom(exc: BaseException, model_name: str) -> OutOfMemoryError | None:
    """An :class:`OutOfMemoryError` with advice if ``exc`` is an out-of-memory error."""
    for err in _chain(exc):
        text = str(err)
        if "OutOfMemoryError" in _names(err) or "out of memory" in text.lower():
            first = text.splitlines()[0] if text else type(err).__name__
            return OutOfMemoryError(
                f"{model_name} ran out of memory ({first}). Try use_4bit_quantization=True "
                "(transformers) or a 4-bit MLX checkpoint, a smaller Gemma, or a shorter "
                "prompt / max_tokens / batch."
            )
    return None
