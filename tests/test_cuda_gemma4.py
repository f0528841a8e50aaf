"""Gemma 4 and Gemma 3n on a CUDA GPU through the transformers backend.

The CUDA fast path (core.accel.cuda) serves Gemma 1-3 only; Gemma 4 and 3n
take ``model.generate`` on the GPU. These tests load every tiny Gemma 4
checkpoint and the tiny Gemma 3n on ``cuda`` and check that the GPU gives the
CPU's answers: in float32 the greedy tokens, the thinking channel and a
grammar-forced tool call are the same; bf16 and bitsandbytes NF4 on the GPU
produce well-formed replies (their rounding differs from float32). They run
only where a CUDA device is present (the hardware they test).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _cuda, make_client

pytestmark = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")

CHECKPOINTS = {
    "gemma4_text": "gemma4_path",
    "gemma4_moe": "gemma4_moe_path",
    "gemma4": "gemma4_vision_path",
    "gemma3n": "gemma3n_path",
}
GEMMA4 = ("gemma4_text", "gemma4_moe", "gemma4")
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
#: Gemma 4's end ids cannot win: every reply runs to max_tokens.
NO_END = {1: -100.0, 106: -100.0, 50: -100.0}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}


def _path(request: pytest.FixtureRequest, arch: str) -> Path:
    return request.getfixturevalue(CHECKPOINTS[arch])


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[str, object, object]]:
    """(arch, CPU client, CUDA client), both float32."""
    arch = request.param
    path = _path(request, arch)
    cpu = make_client("transformers", path)
    gpu = make_client("transformers", path, device_map="cuda")
    yield arch, cpu, gpu
    cpu.close()
    gpu.close()


def test_model_is_on_the_gpu(pair) -> None:
    _, _, gpu = pair
    gpu.load()
    info = gpu.get_model_info()
    assert str(info["device"]).startswith("cuda"), info


def test_greedy_tokens_match_the_cpu(pair) -> None:
    _, cpu, gpu = pair
    options = {"temperature": 0.0, "max_tokens": 24, "logit_bias": NO_END}
    a = cpu.create(USER, **options)
    b = gpu.create(USER, **options)
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
    assert b["usage"] == a["usage"]
    assert b["choices"][0]["finish_reason"] == "length"


def test_streaming_on_the_gpu_equals_create(pair) -> None:
    _, _, gpu = pair
    options = {"temperature": 0.0, "max_tokens": 16, "logit_bias": NO_END}
    whole = gpu.create(USER, **options)["choices"][0]["message"]["content"]
    chunks = gpu.create(USER, stream=True, **options)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole


def test_thinking_matches_the_cpu(pair) -> None:
    arch, cpu, gpu = pair
    if arch not in GEMMA4:
        pytest.skip("Gemma 3n has no thinking channel (tested to raise in test_core_gemma4)")
    # <|channel> opens the thought at once; the reply then runs to max_tokens.
    options = {
        "temperature": 0.0,
        "max_tokens": 12,
        "thinking": True,
        "logit_bias": {**NO_END, 100: 30.0},
    }
    a = cpu.create(USER, **options)
    b = gpu.create(USER, **options)
    assert b["choices"][0]["message"] == a["choices"][0]["message"]
    assert b["usage"] == a["usage"]
    assert b["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_forced_tool_call_matches_the_cpu(pair) -> None:
    arch, cpu, gpu = pair
    options = {
        "temperature": 0.0,
        # Gemma 3n writes the call as JSON: its wrapper alone takes tens of tiny-vocabulary tokens
        "max_tokens": 40 if arch in GEMMA4 else 200,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        # close the string at once where the family delimits strings with a token
        "logit_bias": {52: 4.0} if arch in GEMMA4 else {},
    }
    a = cpu.create(USER, **options)
    b = gpu.create(USER, **options)
    calls = b["choices"][0]["message"]["tool_calls"]
    assert calls and calls[0]["function"]["name"] == "get_weather"
    assert isinstance(json.loads(calls[0]["function"]["arguments"])["city"], str)
    assert [c["function"] for c in calls] == [
        c["function"] for c in a["choices"][0]["message"]["tool_calls"]
    ]


@pytest.mark.parametrize("arch", GEMMA4)
@pytest.mark.parametrize("options", [{"torch_dtype": "bfloat16"}, {"use_4bit_quantization": True}])
def test_bf16_and_nf4_on_the_gpu(request: pytest.FixtureRequest, arch: str, options: dict) -> None:
    client = make_client("transformers", _path(request, arch), device_map="cuda", **options)
    try:
        reply = client.create(USER, temperature=0.0, max_tokens=8, logit_bias=NO_END)
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["completion_tokens"] == 8
        assert "<|" not in reply["choices"][0]["message"]["content"]
    finally:
        client.close()
