"""Errors that tell the user what to do, and errors inside generation reaching the caller."""

from __future__ import annotations

import importlib.util
import sys
import threading

import pytest
from conftest import BACKENDS, make_client
from test_core_support import USER, content, stream_text

import core.errors
from core import (
    GatedModelError,
    GemmaLocalError,
    GemmaTransformersChatCompletion,
    MissingDependencyError,
    ModelNotFoundError,
    OfflineError,
    OutOfMemoryError,
)
from core.errors import require, translate_load_error, translate_oom

# ------------------------------------------------------------ missing dependencies


def hide_modules(monkeypatch, *names: str) -> None:
    """Make ``core.errors.require`` believe ``names`` are not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(core.errors.importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("modules", "extra"),
    [
        (("torch",), "transformers"),
        (("accelerate",), "transformers"),
        (("mlx_lm",), "mlx"),
        (("bitsandbytes",), "quantization"),
        (("langchain_core",), "langchain"),
        (("llama_index.core",), "llama-index"),
        (("something_else",), "all"),
    ],
)
def test_require_names_the_pip_extra(monkeypatch, modules, extra) -> None:
    hide_modules(monkeypatch, *modules)
    with pytest.raises(
        MissingDependencyError, match=rf'pip install "gemma-local\[{extra}\]"'
    ) as info:
        require(*modules, "json", feature="This feature")
    assert isinstance(info.value, ImportError) and modules[0] in str(info.value)
    require("json", feature="nothing missing")


@pytest.mark.parametrize(
    ("backend", "hidden", "extra", "options"),
    [
        ("transformers", ("transformers",), "transformers", {}),
        ("transformers", ("torch",), "transformers", {}),
        ("transformers", ("bitsandbytes",), "quantization", {"use_4bit_quantization": True}),
        ("mlx", ("mlx_lm",), "mlx", {}),
        ("mlx", ("mlx",), "mlx", {}),
    ],
)
def test_missing_backend_dependency_is_reported_at_load(
    monkeypatch, gemma3_path, backend, hidden, extra, options
) -> None:
    client = make_client(backend, gemma3_path, **options)
    hide_modules(monkeypatch, *hidden)
    with pytest.raises(MissingDependencyError, match=rf'pip install "gemma-local\[{extra}\]"'):
        client.create(USER, temperature=0, max_tokens=1)
    assert not client.is_loaded
    monkeypatch.undo()  # installed again: the same client now loads
    if not options:
        assert client.create(USER, temperature=0, max_tokens=1)["usage"]["completion_tokens"] == 1
    client.close()


def test_mlx_that_cannot_load_its_library_is_explained(monkeypatch, gemma3_path) -> None:
    client = make_client("mlx", gemma3_path)
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # `import mlx.core` now fails
    with pytest.raises(MissingDependencyError, match=r"mlx\[cpu\]"):
        client.load()
    assert not client.is_loaded
    monkeypatch.undo()
    client.close()


# ------------------------------------------------------------------ model not found


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["/nonexistent/gemma/folder", "./no-such-model-dir"])
def test_missing_local_folder(backend, name) -> None:
    client = make_client(backend, name)
    with pytest.raises(ModelNotFoundError, match="no folder at that path") as info:
        client.create(USER, max_tokens=1)
    assert name in str(info.value) and "config.json" in str(info.value)
    assert info.value.__cause__ is not None
    assert not client.is_loaded
    client.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_hub_id_offline(monkeypatch, backend) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = make_client(backend, "gemma-local-test/definitely-not-a-model-123")
    with pytest.raises((ModelNotFoundError, OfflineError)) as info:
        client.load()
    text = str(info.value)
    assert "gemma-local-test/definitely-not-a-model-123" in text
    assert "local" in text and ("hub" in text or "Hugging Face" in text)
    assert isinstance(info.value, GemmaLocalError) and info.value.__cause__ is not None
    assert not client.is_loaded and client.get_model_info()["context_window"] is None
    client.close()


def named_error(name: str, message: str = "") -> Exception:
    return type(name, (Exception,), {})(message)


@pytest.mark.parametrize(
    ("error", "expected", "match"),
    [
        (named_error("GatedRepoError", "401"), GatedModelError, "hf auth login"),
        (
            OSError("Access to model is restricted. You must have access to it: gated repo"),
            GatedModelError,
            "licence",
        ),
        (named_error("RepositoryNotFoundError"), ModelNotFoundError, "Check the spelling"),
        (
            OSError("x is not a valid model identifier listed on hf"),
            ModelNotFoundError,
            "not found",
        ),
        (named_error("HFValidationError", "Repo id must be"), ModelNotFoundError, "no folder"),
        (named_error("LocalEntryNotFoundError"), OfflineError, "local cache"),
        (OSError("We couldn't connect to 'https://huggingface.co'"), OfflineError, "Connect once"),
        (named_error("OutOfMemoryError", "CUDA out of memory. Tried"), OutOfMemoryError, "4-bit"),
        (RuntimeError("[metal] out of memory"), OutOfMemoryError, "use_4bit_quantization"),
    ],
)
def test_translate_load_error(error, expected, match) -> None:
    better = translate_load_error(error, "org/model")
    assert isinstance(better, expected) and isinstance(better, GemmaLocalError)
    assert match in str(better)


def test_translate_load_error_follows_the_cause_chain() -> None:
    try:
        try:
            raise named_error("GatedRepoError")
        except Exception as inner:
            raise OSError("could not load") from inner
    except OSError as outer:
        assert isinstance(translate_load_error(outer, "org/model"), GatedModelError)
    assert translate_load_error(ValueError("something else"), "org/model") is None
    assert translate_oom(ValueError("something else"), "org/model") is None


def test_error_classes_keep_builtin_bases() -> None:
    assert issubclass(MissingDependencyError, ImportError)
    assert issubclass(ModelNotFoundError, OSError)
    assert issubclass(GatedModelError, PermissionError)
    assert issubclass(OfflineError, ConnectionError)
    assert issubclass(OutOfMemoryError, MemoryError)
    assert issubclass(core.ContextWindowExceededError, ValueError)
    assert issubclass(core.UnsupportedPlatformError, RuntimeError)


def test_transformers_quantisation_on_macos_is_refused(monkeypatch) -> None:
    import core.transformers_backend as tb

    monkeypatch.setattr(tb.sys, "platform", "darwin")
    with pytest.raises(core.UnsupportedPlatformError, match="MLX"):
        GemmaTransformersChatCompletion("x/y", use_4bit_quantization=True)


# ------------------------------------------------------- errors inside generation


@pytest.fixture(scope="module", params=BACKENDS)
def own_client(request, gemma3_path):
    """A client of its own: these tests patch its generation."""
    client = make_client(request.param, gemma3_path)
    client.load()
    yield client
    client.close()


def fail_after(monkeypatch, client, tokens: int, error: Exception) -> dict[str, int]:
    """Make the backend's real generation raise ``error`` after it pushed ``tokens`` tokens."""
    original = client._generate
    state = {"pushed": 0}

    def failing(prompts, params, sink):
        state["pushed"] = 0
        push, push_row = sink.push, sink.push_row

        def tick() -> None:
            if state["pushed"] == tokens:
                raise error
            state["pushed"] += 1

        def counted_push(ids):
            tick()
            push(ids)

        def counted_push_row(index, token):
            tick()
            push_row(index, token)

        sink.push, sink.push_row = counted_push, counted_push_row
        original(prompts, params, sink)

    monkeypatch.setattr(client, "_generate", failing)
    return state


NO_BYTES = {"temperature": 0, "max_tokens": 16}


async def test_exception_in_generation_reaches_every_caller(monkeypatch, own_client) -> None:
    reference = own_client.create(USER, **NO_BYTES)
    thread_count = threading.active_count()
    state = fail_after(monkeypatch, own_client, 3, RuntimeError("boom mid-generation"))
    with pytest.raises(RuntimeError, match="boom mid-generation"):
        own_client.create(USER, **NO_BYTES)
    assert state["pushed"] == 3

    chunks = []
    with pytest.raises(RuntimeError, match="boom mid-generation"):
        for chunk in own_client.create(USER, stream=True, **NO_BYTES):
            chunks.append(chunk)
    assert chunks and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content(reference).startswith(stream_text(chunks))

    with pytest.raises(RuntimeError, match="boom mid-generation"):
        await own_client.acreate(USER, **NO_BYTES)
    with pytest.raises(RuntimeError, match="boom mid-generation"):
        async for _ in await own_client.acreate(USER, stream=True, **NO_BYTES):
            pass
    with pytest.raises(RuntimeError, match="boom mid-generation"):
        own_client.create_batch([USER, USER], **NO_BYTES)

    monkeypatch.undo()
    again = own_client.create(USER, **NO_BYTES)
    assert again["choices"] == reference["choices"] and again["usage"] == reference["usage"]
    assert threading.active_count() == thread_count


def test_out_of_memory_in_generation_gets_advice(monkeypatch, own_client) -> None:
    fail_after(
        monkeypatch, own_client, 1, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
    )
    with pytest.raises(OutOfMemoryError, match="ran out of memory") as info:
        own_client.create(USER, **NO_BYTES)
    assert isinstance(info.value.__cause__, RuntimeError)
    monkeypatch.undo()
    assert own_client.create(USER, temperature=0, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_failing_load_leaves_client_unloaded_and_retryable(
    monkeypatch, own_client, gemma3_path
) -> None:
    client = make_client(own_client.implementation, gemma3_path)
    calls = {"n": 0}
    original = client._load_model_and_tokenizer

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk hiccup")
        original()

    monkeypatch.setattr(client, "_load_model_and_tokenizer", flaky)
    with pytest.raises(RuntimeError, match="disk hiccup"):
        client.create(USER, max_tokens=1)
    assert not client.is_loaded and client.model is None and client.tokenizer is None
    assert client.create(USER, temperature=0, max_tokens=1)["usage"]["completion_tokens"] == 1
    client.close()
