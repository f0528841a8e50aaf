"""Gemma 4 on the fast path (core.accel.cuda.own_forward) against ``model.generate``.

The fast path runs Gemma 4's own text model over its static cache; these tests
check every part Gemma 4 adds through greedy equality with the plain path, in
float32: per-layer embeddings, KV-shared layers and the double-wide MLP
(``gemma4_text``, like E2B/E4B), ``attention_k_eq_v`` and mixture-of-experts
blocks (``gemma4_moe``, like 26B-A4B), the multimodal wrapper's text path
(``gemma4``), proportional RoPE and the 2x-wide global head on every
checkpoint's full-attention layers, the final soft-cap, sliding windows
shorter than the generation (ring buffers), left-padded batches, penalties,
biases, tools, JSON output and the thinking channel through the client. On
the CPU the loop runs eagerly; where CUDA is present the same checks run with
the decode step captured as a CUDA graph (and once compiled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_fast_path import WEATHER, fast, greedy, load, plain, prompts_of, same

from core.accel.cuda import fast_path, own_forward

torch = pytest.importorskip("torch")

ARCHS = ("gemma4_path", "gemma4_moe_path", "gemma4_vision_path")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture"),
    ),
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def on(model: Any, device: str) -> Any:
    return model if device == "cpu" else model.to(device)


def check_engine(model: Any, device: str) -> None:
    """The own-forward engine served the requests, captured on CUDA where it can be (a
    float32 mixture-of-experts model cannot: transformers' grouped_mm fallback reads the
    host), and nothing fell back."""
    info = fast_path.describe(model)
    assert info["active"] and info["forward"] == "own", info
    assert not info["fallbacks"], info["fallbacks"]
    capturable = own_forward.ModelLayout(model).capturable
    assert info["cuda_graphs"] == (device == "cuda" and capturable), info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_plain_path(arch: str, device: str, request: Any) -> None:
    model = on(load(request.getfixturevalue(arch)), device)
    single = prompts_of(9)
    assert fast(model, single, greedy(24)).tokens == plain(model, single, 24)
    batch = prompts_of(9, 14, 3, seed=1)
    assert fast(model, batch, greedy(40)).tokens == plain(model, batch, 40)
    check_engine(model, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gemma4_path", "gemma4_moe_path"])
def test_sliding_window_shorter_than_prompt_and_generation(
    arch: str, device: str, request: Any
) -> None:
    """A window of 8: prompts longer than it fill the ring from its last slots, and the
    decode steps wrap it many times."""
    model = on(load(request.getfixturevalue(arch), sliding_window=8), device)
    batch = prompts_of(13, 5, seed=2)
    assert fast(model, batch, greedy(30)).tokens == plain(model, batch, 30)
    check_engine(model, device)


def test_repetition_penalty_and_logit_bias_equal_plain_path(gemma4_path: Path) -> None:
    model = load(gemma4_path)
    batch = prompts_of(6, 11, seed=3)
    bias = {7: 3.0, 11: -2.0}
    params = greedy(20, repetition_penalty=1.3, logit_bias=bias)
    processor = {"repetition_penalty": 1.3, "sequence_bias": {(7,): 3.0, (11,): -2.0}}
    assert fast(model, batch, params).tokens == plain(model, batch, 20, **processor)


def test_eager_experts_run_uncaptured(gemma4_moe_path: Path) -> None:
    """transformers' eager experts read a value back to the host each layer: such a model
    is served, but its steps are never captured (the capture would fail)."""
    model = load(gemma4_moe_path, experts_implementation="eager")
    assert not own_forward.ModelLayout(model).capturable
    assert own_forward.ModelLayout(load(gemma4_moe_path)).capturable
    single = prompts_of(7)
    assert fast(model, single, greedy(12)).tokens == plain(model, single, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_step_traces_in_one_graph(arch: str, request: Any) -> None:
    """What GEMMA_LOCAL_OWN_COMPILE compiles: the model's own decode step (our cache, masks
    and positions around it) traces with no graph break (dynamo only here)."""
    model = load(request.getfixturevalue(arch))
    layout = own_forward.ModelLayout(model)
    bucket = fast_path._Bucket(layout, 2, 256)
    bucket.step.fill_(5)
    args = (layout, bucket.keys, bucket.values, bucket.tok, bucket.step, bucket.pad)
    compiled = torch.compile(own_forward.decode, backend="eager", fullgraph=True)
    with torch.inference_mode():
        expected = own_forward.decode(*args)[0]
        got = compiled(*args)[0]
    assert torch.equal(expected, got)


@pytest.mark.parametrize("arch", ["gemma4_path", "gemma4_moe_path"])
def test_bitsandbytes_nf4_equals_plain_path(arch: str, request: Any) -> None:
    """The model's own modules include bitsandbytes' 4-bit layers: an NF4 Gemma 4 (bf16
    compute) gives generate's greedy tokens on the fast path too."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(request.getfixturevalue(arch)), quantization_config=config, device_map="cpu"
    ).eval()
    batch = prompts_of(7, 3, seed=8)
    assert fast(model, batch, greedy(10)).tokens == plain(model, batch, 10)
    check_engine(model, "cpu")


def test_gemma3_models_keep_their_forward(gemma3_path: Path) -> None:
    model = load(gemma3_path)
    fast(model, prompts_of(4), greedy(3))
    assert fast_path.describe(model)["forward"] == "gemma"


def test_float32_experts_on_cuda_are_not_captured(gemma4_moe_path: Path) -> None:
    """transformers runs grouped_mm experts in float32 through a fallback that reads the
    offsets on the host: such a model's steps are never captured on CUDA (an H100 refused
    it); in bfloat16 (and on the CPU) they are."""
    model = load(gemma4_moe_path)
    assert own_forward.ModelLayout(model).capturable  # the CPU: nothing is captured anyway
    if not torch.cuda.is_available():
        return
    assert not own_forward.ModelLayout(model.cuda()).capturable
    assert own_forward.ModelLayout(model.to(torch.bfloat16)).capturable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_bf16_experts_captured_equal_uncaptured(gemma4_moe_path: Path) -> None:
    """A bf16 mixture-of-experts model's decode step is one CUDA graph, and its replays give
    the uncaptured loop's tokens (the same kernels): the first request of its bucket runs
    uncaptured, the graphs are captured when the model is idle, the second replays them
    (the same padded prompt width: bf16 tokens depend on the left padding)."""
    model = load(gemma4_moe_path).to("cuda", torch.bfloat16)
    batch = prompts_of(9, 5, seed=6)
    uncaptured = fast(model, batch, greedy(20)).tokens  # fast() gives it its idle moment
    assert fast_path.describe(model)["prefill_graphs"] == 1
    assert fast(model, batch, greedy(20)).tokens == uncaptured
    check_engine(model, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.compile + graphs")
def test_compiled_step_equals_plain_path(gemma4_path: Path) -> None:
    model = load(gemma4_path).cuda()
    single = prompts_of(9)
    assert fast(model, single, greedy(16), compile=True).tokens == plain(model, single, 16)
    info = fast_path.describe(model)
    assert info["compile"] and not info["fallbacks"], info


# ------------------------------------------------------------ through the client


def client_of(path: Path, monkeypatch: pytest.MonkeyPatch, fast_on: bool, device: str) -> Any:
    from core import GemmaTransformersChatCompletion

    monkeypatch.setenv("GEMMA_LOCAL_FAST_PATH", "on" if fast_on else "off")
    client = GemmaTransformersChatCompletion(str(path), device_map=device, torch_dtype="float32")
    client.load()
    return client


FORCED = {"type": "function", "function": {"name": "get_weather"}}
NO_END = {1: -100.0, 106: -100.0, 50: -100.0}
REQUESTS = {
    "plain": {"max_tokens": 16, "logit_bias": NO_END},
    "stop": {"max_tokens": 16, "stop": ["a"]},
    "thinking": {"max_tokens": 12, "thinking": True, "logit_bias": {**NO_END, 100: 30.0}},
    "forced-tool": {
        "max_tokens": 60,
        "tools": [WEATHER],
        "tool_choice": FORCED,
        "logit_bias": {52: 4.0},
    },
    "json-schema": {
        "max_tokens": 40,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {
                    "type": "object",
                    "properties": {"ok": {"type": "boolean"}},
                    "required": ["ok"],
                },
            },
        },
    },
}


@pytest.mark.parametrize("device", DEVICES)
def test_client_replies_equal_plain_path(
    gemma4_vision_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """create / create_batch / streaming on the fast path give the plain path's replies:
    text, tool calls, the thinking channel, finish reasons and usage."""
    plain_client = client_of(gemma4_vision_path, monkeypatch, False, device)
    expected = {
        name: same(plain_client.create(USER, temperature=0, **options))
        for name, options in REQUESTS.items()
    }
    batch = [USER, [{"role": "user", "content": "Hello there, who are you?"}]]
    expected_batch = [
        same(c) for c in plain_client.create_batch(batch, temperature=0, max_tokens=10)
    ]
    plain_client.close()
    client = client_of(gemma4_vision_path, monkeypatch, True, device)
    try:
        for name, options in REQUESTS.items():
            assert same(client.create(USER, temperature=0, **options)) == expected[name], name
        got = [same(c) for c in client.create_batch(batch, temperature=0, max_tokens=10)]
        assert got == expected_batch
        chunks = list(client.create(USER, stream=True, temperature=0, **REQUESTS["plain"]))
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text == expected["plain"]["choices"][0]["message"]["content"]
        check_engine(client.model, device)
        call = expected["forced-tool"]["choices"][0]["message"]["tool_calls"][0]
        assert call["name"] == "get_weather" and "city" in json.loads(call["arguments"])
        reasoning = expected["thinking"]["usage"]["completion_tokens_details"]["reasoning_tokens"]
        assert reasoning > 0
    finally:
        client.close()
