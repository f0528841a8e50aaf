"""Client lifecycle: lazy imports, cheap constructors, model info, close/reuse, context window,
quantised checkpoints (bitsandbytes NF4, MLX 4-bit) and the factories."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import BACKENDS, make_client
from test_core_support import END_OF_TURN, EOS, USER, content

import core
from core import (
    ClientClosedError,
    ContextWindowExceededError,
    GemmaMLXChatCompletion,
    GemmaTransformersChatCompletion,
    create_gemma_client,
    create_gemma_transformers_client,
    resolve_backend,
)

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "mlx", "mlx.core", "mlx_lm")


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# ------------------------------------------------------------------ lazy imports


def test_import_core_imports_no_heavy_library() -> None:
    out = run_python(
        "import sys, json, core, core.base, core.stream, core.worker, core.params, core.messages,"
        " core.errors, core.factory, core.transformers_backend, core.mlx_backend,"
        " core.accel, core.accel.cuda.fast_path, core.accel.mlx_split;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert json.loads(out) == []


@pytest.mark.parametrize("cls", ["GemmaTransformersChatCompletion", "GemmaMLXChatCompletion"])
def test_model_info_before_load_loads_no_weights(gemma3_path, cls) -> None:
    out = run_python(
        "import sys, json, core;"
        f"c = core.{cls}({str(gemma3_path)!r});"
        "info = c.get_model_info();"
        f"print(json.dumps([info, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    info, heavy = json.loads(out)
    assert heavy == []
    assert info["loaded"] is False and info["parameters"] is None
    assert info["context_window"] == 2048 and info["model_type"] == "gemma3_text"


def test_factory_constructs_without_loading() -> None:
    out = run_python(
        "import sys, json, core;"
        "c = core.create_gemma_client('auto');"
        "m = core.create_gemma_client('mlx');"
        f"print(json.dumps([c.is_loaded, m.is_loaded, [x for x in {HEAVY!r} if x in sys.modules]]))"
    )
    assert json.loads(out) == [False, False, []]


# -------------------------------------------------------------------- model info


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_info_before_load(gemma3_path, backend) -> None:
    client = make_client(backend, gemma3_path)
    info = client.get_model_info()
    assert info["model_name"] == str(gemma3_path)
    assert info["implementation"] == backend
    assert info["loaded"] is False and not client.is_loaded
    assert info["context_window"] == 2048
    assert info["model_type"] == "gemma3_text"
    assert info["quantization"] is None
    assert info["parameters"] is None and info["device"] is None
    assert "not loaded" in repr(client)
    client.close()
    assert not client.is_loaded


def test_model_info_after_load(client, tf_client) -> None:
    client.load()
    info = client.get_model_info()
    assert info["loaded"] is True and "loaded" in repr(client)
    assert info["dtype"] == "float32"
    assert info["context_window"] == 2048 and info["model_type"] == "gemma3_text"
    assert info["quantization"] is None
    expected = sum(p.numel() for p in tf_client.load().model.parameters())
    assert info["parameters"] == expected  # same weights on both backends
    assert "cpu" in str(info["device"]).lower()


def test_clear_cache_is_harmless(client, gemma3_path) -> None:
    before = content(client.create(USER, temperature=0, max_tokens=6))
    client.clear_cache()
    client.clear_cache()
    assert content(client.create(USER, temperature=0, max_tokens=6)) == before
    fresh = make_client(client.implementation, gemma3_path)
    fresh.clear_cache()  # never started: nothing to do, nothing loaded
    assert not fresh.is_loaded
    fresh.close()


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gemma-local:")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_releases_and_the_client_can_be_used_again(gemma3_path, backend) -> None:
    fresh = make_client(backend, gemma3_path)
    first = fresh.create(USER, temperature=0, max_tokens=6)
    assert fresh.is_loaded and fresh.model is not None
    threads = len(worker_threads())
    # transformers: the client's own model thread is joined on close. MLX: every
    # MLX client shares one thread that lives as long as the process (see
    # GemmaMLXChatCompletion._new_worker), so close() leaves it running.
    after_close = threads - 1 if backend == "transformers" else threads
    fresh.close()
    assert not fresh.is_loaded and fresh.model is None and fresh.tokenizer is None
    assert len(worker_threads()) == after_close
    assert fresh.get_model_info()["loaded"] is False
    again = fresh.create(USER, temperature=0, max_tokens=6)
    assert content(again) == content(first) and again["usage"] == first["usage"]
    fresh.close()
    fresh.close()  # twice is fine
    assert len(worker_threads()) == after_close


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_manager_closes(gemma3_path, backend) -> None:
    with make_client(backend, gemma3_path) as fresh:
        assert fresh.create(USER, temperature=0, max_tokens=2)["usage"]["completion_tokens"] == 2
        assert fresh.is_loaded
        threads = len(worker_threads())
    expected = threads - 1 if backend == "transformers" else threads  # MLX: shared thread
    assert not fresh.is_loaded and len(worker_threads()) == expected
    with make_client(backend, gemma3_path) as never_used:
        pass
    assert not never_used.is_loaded


ENDLESS = {"temperature": 0, "max_tokens": 2000, "logit_bias": {EOS: -100, END_OF_TURN: -100}}


def close_soon(client) -> float:
    """Close ``client`` from another thread; how long close() took."""
    took: list[float] = []

    def closer() -> None:
        started = time.perf_counter()
        client.close()
        took.append(time.perf_counter() - started)

    thread = threading.Thread(target=closer)
    thread.start()
    thread.join(30)
    assert took, "close() did not return"
    return took[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_cancels_a_stream_being_read(gemma3_path, backend) -> None:
    fresh = make_client(backend, gemma3_path)
    stream = fresh.create(USER, stream=True, **ENDLESS)
    for _ in zip(range(4), stream, strict=False):  # role chunk and three tokens
        pass
    assert close_soon(fresh) < 2.0
    with pytest.raises(ClientClosedError, match="close\\(\\) was called"):
        for _ in stream:  # whatever was still buffered is not delivered
            pytest.fail("the stream delivered a chunk after close()")
    assert not fresh.is_loaded
    again = fresh.create(USER, temperature=0, max_tokens=3)  # usable again: loads anew
    assert again["usage"]["completion_tokens"] == 3
    fresh.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_cancels_running_and_queued_requests(gemma3_path, backend) -> None:
    fresh = make_client(backend, gemma3_path).load()
    pushed = threading.Event()
    generate = fresh._generate

    def signalled(prompts, params, sink):
        push_row, push = sink.push_row, sink.push

        def row(index, token):
            pushed.set()
            push_row(index, token)

        def rows(tokens):
            pushed.set()
            push(tokens)

        sink.push_row, sink.push = row, rows
        generate(prompts, params, sink)

    fresh._generate = signalled
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(fresh.create, USER, **ENDLESS)
        assert pushed.wait(30)
        queued = pool.submit(fresh.create, USER, **ENDLESS)
        while len(fresh._in_flight) < 2:  # the second request waits for the model thread
            time.sleep(0.01)
        assert close_soon(fresh) < 2.0
        for future in (running, queued):
            with pytest.raises(ClientClosedError):
                future.result(5)
    assert content(fresh.create(USER, temperature=0, max_tokens=4))
    fresh.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_close_cancels_async_requests(gemma3_path, backend) -> None:
    fresh = make_client(backend, gemma3_path)
    await fresh.acreate(USER, temperature=0, max_tokens=1)
    stream = await fresh.acreate(USER, stream=True, **ENDLESS)
    for _ in range(3):  # the stream is generating
        await stream.__anext__()
    request = asyncio.ensure_future(fresh.acreate(USER, **ENDLESS))
    while len(fresh._in_flight) < 2:  # the request waits for the model thread
        await asyncio.sleep(0.01)
    closer = asyncio.get_running_loop().run_in_executor(None, close_soon, fresh)
    with pytest.raises(ClientClosedError):
        async for _ in stream:
            pass
    with pytest.raises(ClientClosedError):
        await request
    assert await closer < 2.0
    out = await fresh.acreate(USER, temperature=0, max_tokens=2)
    assert out["usage"]["completion_tokens"] == 2
    fresh.close()


def test_transformers_defaults_load_on_this_machine(gemma3_path) -> None:
    """device_map="auto", torch_dtype="auto": bf16 where the CPU has bf16 instructions."""
    from core.transformers_backend import cpu_supports_bf16

    client = GemmaTransformersChatCompletion(str(gemma3_path))
    try:
        out = client.create(USER, temperature=0, max_tokens=3, logit_bias=NO_END)
        assert out["usage"]["completion_tokens"] == 3
        info = client.get_model_info()
        assert info["device_map"] == "auto" and info["trust_remote_code"] is False
        assert info["dtype"] == ("bfloat16" if cpu_supports_bf16() else "float32")
    finally:
        client.close()


# ---------------------------------------------------------------- context window


@pytest.fixture(scope="module")
def small_path(tmp_path_factory) -> Path:
    from core.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("small-context") / "gemma3-ctx64", max_position_embeddings=64
    )


@pytest.fixture(scope="module", params=BACKENDS)
def small_client(request, small_path):
    client = make_client(request.param, small_path)
    yield client
    client.close()


LONG = [{"role": "user", "content": "hello world " * 40}]
NO_END = {EOS: -100, END_OF_TURN: -100}


def test_context_window_is_read_from_config(small_client) -> None:
    assert small_client.get_model_info()["context_window"] == 64


def test_prompt_longer_than_context_raises_and_client_stays_usable(small_client) -> None:
    with pytest.raises(ContextWindowExceededError, match=r"context window of 64 tokens") as info:
        small_client.create(LONG, temperature=0, max_tokens=4)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ContextWindowExceededError):
        list(small_client.create(LONG, temperature=0, max_tokens=4, stream=True))
    with pytest.raises(ContextWindowExceededError):
        small_client.create_batch([USER, LONG], temperature=0, max_tokens=4)
    with pytest.raises(ContextWindowExceededError):
        small_client.format_prompt(LONG)
    out = small_client.create(USER, temperature=0, max_tokens=4)
    assert out["usage"]["completion_tokens"] == 4


async def test_prompt_longer_than_context_raises_async(small_client) -> None:
    with pytest.raises(ContextWindowExceededError):
        await small_client.acreate(LONG, temperature=0, max_tokens=4)
    out = await small_client.acreate(USER, temperature=0, max_tokens=3)
    assert out["usage"]["completion_tokens"] == 3


def test_max_tokens_is_clipped_to_the_window(small_client) -> None:
    prompt_tokens = len(small_client.format_prompt(USER).ids)
    out = small_client.create(USER, temperature=0, max_tokens=1000, logit_bias=NO_END)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == prompt_tokens
    assert out["usage"]["total_tokens"] == 64
    chunks = list(
        small_client.create(USER, temperature=0, max_tokens=1000, logit_bias=NO_END, stream=True)
    )
    assert chunks[-1]["usage"]["total_tokens"] == 64
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_prompt_filling_the_window_but_one_token(small_client) -> None:
    base = len(small_client.format_prompt([{"role": "user", "content": ""}]).ids)
    word = small_client.tokenizer.encode(" a", add_special_tokens=False)
    assert len(word) == 1
    messages = [{"role": "user", "content": " a" * (63 - base)}]
    assert len(small_client.format_prompt(messages).ids) == 63
    out = small_client.create(messages, temperature=0, max_tokens=10, logit_bias=NO_END)
    assert out["usage"] == {"prompt_tokens": 63, "completion_tokens": 1, "total_tokens": 64}
    assert out["choices"][0]["finish_reason"] == "length"
    with pytest.raises(ContextWindowExceededError):
        small_client.create([{"role": "user", "content": " a" * (64 - base)}], max_tokens=1)


# ------------------------------------------------------------ quantised weights


def test_bitsandbytes_nf4_on_cpu(gemma3_path) -> None:
    pytest.importorskip("bitsandbytes")
    import torch
    from bitsandbytes.nn import Linear4bit

    client = GemmaTransformersChatCompletion(
        str(gemma3_path), use_4bit_quantization=True, device_map="cpu"
    )
    try:
        assert "nf4" in client.get_model_info()["quantization"]
        out = client.create(USER, temperature=0, max_tokens=4, logit_bias=NO_END)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 4
        info = client.get_model_info()
        assert (
            info["loaded"] and "nf4" in info["quantization"] and "bfloat16" in info["quantization"]
        )
        layers = [m for n, m in client.model.named_modules() if n.endswith(("_proj", "q_proj"))]
        assert layers and all(isinstance(m, Linear4bit) for m in layers)
        assert {m.weight.quant_type for m in layers} == {"nf4"}
        assert {m.compute_dtype for m in layers} == {torch.bfloat16}
    finally:
        client.close()


def test_mlx_4bit_conversion(mlx_4bit_path, gemma3_path) -> None:
    client = GemmaMLXChatCompletion(str(mlx_4bit_path))
    try:
        assert client.get_model_info()["quantization"] == "mlx 4-bit (group size 64)"
        out = client.create(USER, temperature=0, max_tokens=5, logit_bias=NO_END)
        assert out["usage"]["completion_tokens"] == 5
        assert out["choices"][0]["finish_reason"] == "length"
        info = client.get_model_info()
        assert info["loaded"] and info["quantization"].startswith("mlx 4-bit")
        float_client = GemmaMLXChatCompletion(str(gemma3_path)).load()
        assert info["parameters"] == float_client.get_model_info()["parameters"]
        float_client.close()
        assert client.format_prompt(USER) == make_client("mlx", gemma3_path).format_prompt(USER)
    finally:
        client.close()


# ----------------------------------------------------------------- constructors


@pytest.mark.parametrize(
    "options",
    [
        {"torch_dtype": "float64"},
        {"bnb_4bit_compute_dtype": "int8"},
        {"use_4bit_quantization": True, "use_8bit_quantization": True},
        {"device_map": 3},
    ],
)
def test_transformers_constructor_validates(options) -> None:
    with pytest.raises(ValueError):
        GemmaTransformersChatCompletion("some/model", **options)


@pytest.mark.parametrize(
    "options", [{"max_kv_size": 0}, {"max_kv_size": "x"}, {"prefill_step_size": 0}]
)
def test_mlx_constructor_validates(options) -> None:
    with pytest.raises(ValueError):
        GemmaMLXChatCompletion("some/model", **options)


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_model_name_must_be_a_string(name) -> None:
    with pytest.raises(ValueError, match="model_name"):
        GemmaTransformersChatCompletion(name)


# --------------------------------------------------------------------- factory


@pytest.mark.skipif(sys.platform == "darwin", reason="auto picks MLX on Apple Silicon")
def test_auto_backend_is_transformers_on_linux() -> None:
    assert resolve_backend("auto") == "transformers"
    client = create_gemma_client("auto")
    assert isinstance(client, GemmaTransformersChatCompletion)
    assert client.model_name == "google/gemma-3-12b-it" and not client.is_loaded


def test_auto_backend_is_mlx_on_apple_silicon(monkeypatch) -> None:
    monkeypatch.setattr(core.factory, "is_apple_silicon", lambda: True)
    assert resolve_backend("auto") == "mlx"
    assert isinstance(create_gemma_client(), GemmaMLXChatCompletion)


def test_named_backends_and_options(gemma3_path) -> None:
    mlx = create_gemma_client("mlx", max_kv_size=128)
    assert isinstance(mlx, GemmaMLXChatCompletion)
    assert mlx.model_name == "mlx-community/gemma-3-12b-it-4bit-DWQ" and mlx.max_kv_size == 128
    tf = create_gemma_client("transformers", str(gemma3_path), device_map="cpu")
    assert isinstance(tf, GemmaTransformersChatCompletion)
    assert tf.model_name == str(gemma3_path) and tf.device_map == "cpu"
    assert not mlx.is_loaded and not tf.is_loaded


@pytest.mark.parametrize("backend", ["torch", "MLX", "", "llama.cpp"])
def test_bad_backend_raises(backend) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        create_gemma_client(backend)


def test_create_gemma_transformers_client_defaults() -> None:
    client = create_gemma_transformers_client()
    assert isinstance(client, GemmaTransformersChatCompletion)
    assert client.model_name == "google/gemma-3-12b-it"
    assert client.trust_remote_code is False
    assert client.use_4bit_quantization is False
    assert client.device_map == "auto"
    assert not client.is_loaded
    custom = create_gemma_transformers_client("x/y", True, "cpu", torch_dtype="bfloat16")
    assert (custom.model_name, custom.use_4bit_quantization, custom.device_map) == (
        "x/y",
        True,
        "cpu",
    )
    assert custom.torch_dtype == "bfloat16"
