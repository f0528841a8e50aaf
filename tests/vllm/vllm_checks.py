"""The vLLM backend on vLLM's real engine (CPU build), in the environment of its own.

Run by ``tests/test_vllm_backend.py::test_vllm_engine_checks`` with
``.gl/vllm/bin/python -m pytest tests/vllm/vllm_checks.py`` (the environment
comes from ``scripts/vllm_env.sh``: vLLM pins versions this project's ``.venv``
cannot share). The file name keeps the main suite from collecting it.

One engine for the whole session (starting one takes about a minute on
two cores): a tiny random-weight Gemma 3 in float32, checked against the
transformers backend in the same process under greedy decoding, with tools
and JSON under vLLM's structured outputs (our grammar, llguidance), streaming
(sync and async), concurrent requests from threads and from asyncio, and
``gemma-local serve``'s server over the vLLM client (the ``openai`` client). A
random model follows no prompt: every tool / JSON guarantee comes from the
grammar.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from core import ClientClosedError, GemmaTransformersChatCompletion, GemmaVLLMChatCompletion

MAX_MODEL_LEN = 2048  # the tiny checkpoint's context window (its tool prompts are ~1.1k tokens)
CONVERSATIONS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me about Paris in one sentence."},
    ],
    [{"role": "user", "content": "Count to ten, then stop."}],
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}, "seconds": {"type": "boolean"}},
            "required": ["zone"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="session")
def vllm_client(gemma3_path: Path) -> Iterator[GemmaVLLMChatCompletion]:
    client = GemmaVLLMChatCompletion(
        str(gemma3_path),
        dtype="float32",
        gpu_memory_utilization=0.05,  # on the CPU a share of the RAM, for the KV cache
        max_model_len=MAX_MODEL_LEN,
        engine_args={"enforce_eager": True},  # no torch.compile: starts in ~40 s, not minutes
    )
    client.load()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tf_reference(gemma3_path: Path) -> Iterator[GemmaTransformersChatCompletion]:
    client = GemmaTransformersChatCompletion(
        str(gemma3_path), device_map="cpu", torch_dtype="float32"
    )
    yield client
    client.close()


def _reply(completion: dict[str, Any]) -> tuple[Any, ...]:
    choice = completion["choices"][0]
    message = choice["message"]
    calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []
    ]
    return message["content"], calls, choice["finish_reason"], completion["usage"]


def _validate_calls(completion: dict[str, Any], tools: list[dict[str, Any]]) -> list[dict]:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls = completion["choices"][0]["message"]["tool_calls"]
    assert calls, completion
    for call in calls:
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, schemas[call["function"]["name"]])
    return calls


def test_engine_is_vllm_on_the_cpu_in_float32(vllm_client: GemmaVLLMChatCompletion) -> None:
    info = vllm_client.get_model_info()
    assert info["implementation"] == "vllm"
    assert info["loaded"] is True
    assert info["family"] == "gemma3"
    assert info["dtype"] == "float32"
    assert info["device"] == "cpu"
    assert info["context_window"] == MAX_MODEL_LEN


def test_greedy_text_and_usage_match_the_transformers_backend(
    vllm_client: GemmaVLLMChatCompletion, tf_reference: GemmaTransformersChatCompletion
) -> None:
    for messages in CONVERSATIONS:
        ours = vllm_client.create(messages, **GREEDY)
        reference = tf_reference.create(messages, **GREEDY)
        assert ours["choices"][0]["message"]["content"], ours
        assert _reply(ours) == _reply(reference), messages
        assert vllm_client.format_prompt(messages) == tf_reference.format_prompt(messages)


def test_max_tokens_and_stop_strings_are_the_sinks(
    vllm_client: GemmaVLLMChatCompletion, tf_reference: GemmaTransformersChatCompletion
) -> None:
    messages = CONVERSATIONS[0]
    cut = vllm_client.create(messages, temperature=0.0, max_tokens=5)
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 5
    full = vllm_client.create(messages, **GREEDY)["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    stopped = vllm_client.create(messages, stop=[stop], **GREEDY)
    content = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert content == full[: full.index(stop)]
    assert _reply(stopped) == _reply(tf_reference.create(messages, stop=[stop], **GREEDY))
    # the row the sink stopped was aborted in vLLM: the engine serves the next request at once
    assert vllm_client.create(messages, **GREEDY)["choices"][0]["message"]["content"] == full


def test_forced_tool_calls_are_valid_and_match_the_transformers_backend(
    vllm_client: GemmaVLLMChatCompletion, tf_reference: GemmaTransformersChatCompletion
) -> None:
    tools = [WEATHER, TIME]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        options = dict(
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=False,  # a random model would write calls until max_tokens
            temperature=0.0,
            max_tokens=120,
        )
        ours = vllm_client.create(CONVERSATIONS[2], **options)
        calls = _validate_calls(ours, tools)
        assert ours["choices"][0]["finish_reason"] == "tool_calls"
        assert ours["choices"][0]["message"]["content"] is None
        if isinstance(choice, dict):
            assert {c["function"]["name"] for c in calls} == {"get_time"}
        assert _reply(ours) == _reply(tf_reference.create(CONVERSATIONS[2], **options))


def test_sampled_tool_calls_are_always_valid(vllm_client: GemmaVLLMChatCompletion) -> None:
    tools = [WEATHER, TIME]
    for seed in range(4):
        completion = vllm_client.create(
            CONVERSATIONS[0],
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        _validate_calls(completion, tools)
        assert completion["choices"][0]["finish_reason"] == "tool_calls"
    same = [
        vllm_client.create(
            CONVERSATIONS[1],
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=7,
            max_tokens=120,
        )["choices"][0]["message"]["tool_calls"]
        for _ in range(2)
    ]
    assert [c["function"] for c in same[0]] == [c["function"] for c in same[1]]


def test_auto_tool_choice_ends_prose_with_end_of_turn(vllm_client: GemmaVLLMChatCompletion) -> None:
    """Under ``tool_choice="auto"`` a reply is prose or calls; the grammar sent to vLLM
    lets prose end with ``<end_of_turn>`` (vLLM's llguidance knows only ``<eos>``)."""
    completion = vllm_client.create(
        CONVERSATIONS[0], tools=[WEATHER], tool_choice="auto", temperature=0.0, max_tokens=40
    )
    choice = completion["choices"][0]
    if choice["message"].get("tool_calls"):
        _validate_calls(completion, [WEATHER])
    else:
        assert not choice["message"]["content"].startswith("{")
    # a grammar whose only allowed continuation is an end token ends the turn at once
    bias = {vllm_client.tokenizer.convert_tokens_to_ids("<end_of_turn>"): 100.0}
    ended = vllm_client.create(
        CONVERSATIONS[0],
        tools=[WEATHER],
        tool_choice="auto",
        logit_bias=bias,
        temperature=0.0,
        max_tokens=40,
    )
    assert ended["choices"][0]["finish_reason"] == "stop"
    assert ended["usage"]["completion_tokens"] == 1


def test_json_schema_and_json_object_replies_are_valid(
    vllm_client: GemmaVLLMChatCompletion, tf_reference: GemmaTransformersChatCompletion
) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        completion = vllm_client.create(
            CONVERSATIONS[1],
            response_format=schema_format,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        assert completion["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(completion["choices"][0]["message"]["content"]), PERSON)
    options = dict(response_format={"type": "json_object"}, temperature=0.0, max_tokens=120)
    ours = vllm_client.create(CONVERSATIONS[0], **options)
    reply = ours["choices"][0]
    if reply["finish_reason"] == "stop":
        assert isinstance(json.loads(reply["message"]["content"]), dict)
    assert _reply(ours) == _reply(tf_reference.create(CONVERSATIONS[0], **options))


def test_stream_chunks_add_up_to_the_completion(vllm_client: GemmaVLLMChatCompletion) -> None:
    messages = CONVERSATIONS[2]
    whole = vllm_client.create(messages, **GREEDY)
    chunks = list(vllm_client.create(messages, stream=True, **GREEDY))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) > 1

    async def astream() -> str:
        stream = await vllm_client.acreate(messages, stream=True, **GREEDY)
        return "".join(
            [c["choices"][0]["delta"].get("content") or "" async for c in stream if c["choices"]]
        )

    assert asyncio.run(astream()) == text


def test_a_stream_left_early_is_aborted(vllm_client: GemmaVLLMChatCompletion) -> None:
    messages = CONVERSATIONS[0]
    stream = vllm_client.create(messages, stream=True, temperature=0.0, max_tokens=400)
    for _ in range(3):
        next(stream)
    stream.close()  # cancels the request: the engine aborts its row
    again = vllm_client.create(messages, **GREEDY)
    assert again["choices"][0]["message"]["content"]


def test_concurrent_requests_from_threads_and_tasks_match_sequential_ones(
    vllm_client: GemmaVLLMChatCompletion,
) -> None:
    sequential = [vllm_client.create(m, **GREEDY) for m in CONVERSATIONS]
    results: list[Any] = [None] * (2 * len(CONVERSATIONS))
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results[i] = vllm_client.create(CONVERSATIONS[i % len(CONVERSATIONS)], **GREEDY)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for i, result in enumerate(results):
        assert _reply(result) == _reply(sequential[i % len(CONVERSATIONS)])

    async def gather() -> list[Any]:
        return await asyncio.gather(*(vllm_client.acreate(m, **GREEDY) for m in CONVERSATIONS))

    assert [_reply(r) for r in asyncio.run(gather())] == [_reply(r) for r in sequential]
    batch = vllm_client.create_batch(CONVERSATIONS, n=2, **GREEDY)
    for completion, single in zip(batch, sequential, strict=True):
        assert [c["message"]["content"] for c in completion["choices"]] == [
            single["choices"][0]["message"]["content"]
        ] * 2


def test_gemma_local_serve_over_vllm(vllm_client: GemmaVLLMChatCompletion) -> None:
    """The OpenAI-compatible server (``gemma-local serve --backend vllm``) over the same client,
    driven by the official ``openai`` client: plain, streamed, tools, and 6 concurrent streams."""
    import openai

    from core.server import BackgroundServer

    messages = CONVERSATIONS[2]
    expected = vllm_client.create(messages, **GREEDY)
    with BackgroundServer(vllm_client) as server:
        name = str(server.app.state.settings.served_names[0])
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as oai:
            reply = oai.chat.completions.create(model=name, messages=messages, **GREEDY)
            assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
            assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
            streamed = oai.chat.completions.create(
                model=name, messages=messages, stream=True, **GREEDY
            )
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            assert text == expected["choices"][0]["message"]["content"]
            called = oai.chat.completions.create(
                model=name,
                messages=messages,
                tools=[WEATHER],
                tool_choice="required",
                parallel_tool_calls=False,
                temperature=0.0,
                max_tokens=120,
            )
            call = called.choices[0].message.tool_calls[0]
            jsonschema.validate(
                json.loads(call.function.arguments), WEATHER["function"]["parameters"]
            )

        async def streams() -> list[str]:
            async with openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key="none", max_retries=0
            ) as aoai:

                async def one(m: list[dict[str, str]]) -> str:
                    stream = await aoai.chat.completions.create(
                        model=name, messages=m, stream=True, **GREEDY
                    )
                    return "".join(
                        [c.choices[0].delta.content or "" async for c in stream if c.choices]
                    )

                return await asyncio.gather(*(one(m) for m in CONVERSATIONS + CONVERSATIONS[:2]))

        texts = asyncio.run(streams())
    sequential = [vllm_client.create(m, **GREEDY) for m in CONVERSATIONS + CONVERSATIONS[:2]]
    assert texts == [c["choices"][0]["message"]["content"] for c in sequential]


# ---------------------------------------------------------------- Gemma 4 (its own engine)

PING = {
    "type": "function",
    "function": {
        "name": "ping",
        "description": "Check that the service is up.",
        "parameters": {
            "type": "object",
            "properties": {"host": {"enum": ["a", "b"]}, "count": {"type": "integer"}},
            "required": ["host"],
        },
    },
}


@pytest.fixture(scope="module")
def gemma4_clients(
    gemma4_path: Path,
) -> Iterator[tuple[GemmaVLLMChatCompletion, GemmaTransformersChatCompletion]]:
    ours = GemmaVLLMChatCompletion(
        str(gemma4_path),
        dtype="float32",
        gpu_memory_utilization=0.05,
        max_model_len=MAX_MODEL_LEN,
        engine_args={"enforce_eager": True},
    )
    reference = GemmaTransformersChatCompletion(
        str(gemma4_path), device_map="cpu", torch_dtype="float32"
    )
    ours.load()
    yield ours, reference
    ours.close()
    reference.close()


def _gemma4_bias(client: GemmaVLLMChatCompletion) -> dict[int, float]:
    """Open the thinking channel at once, close it after a few dozen (random) tokens."""
    start, end = client.tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>"])
    return {start: 20.0, end: 0.2}


def test_gemma4_thought_then_native_call_matches_the_transformers_backend(
    gemma4_clients: tuple[GemmaVLLMChatCompletion, GemmaTransformersChatCompletion],
) -> None:
    ours, reference = gemma4_clients
    messages = CONVERSATIONS[2]
    options: dict[str, Any] = dict(
        tools=[PING],
        tool_choice="required",
        parallel_tool_calls=False,
        thinking=True,
        temperature=0.0,
        max_tokens=160,
        logit_bias=_gemma4_bias(ours),
    )
    completion = ours.create(messages, **options)
    reply = completion["choices"][0]
    assert reply["finish_reason"] == "tool_calls"
    _validate_calls(completion, [PING])
    assert reply["message"]["reasoning_content"]
    for marker in ("<|channel>", "<channel|>", "<|tool_call>", '<|"|>'):
        assert marker not in reply["message"]["reasoning_content"]
    details = completion["usage"]["completion_tokens_details"]
    assert 0 < details["reasoning_tokens"] < completion["usage"]["completion_tokens"]
    expected = reference.create(messages, **options)
    assert (
        reply["message"]["reasoning_content"]
        == (expected["choices"][0]["message"]["reasoning_content"])
    )
    assert _reply(completion) == _reply(expected)
    assert ours.format_prompt(messages, tools=[PING], thinking=True) == reference.format_prompt(
        messages, tools=[PING], thinking=True
    )
    chunks = list(ours.create(messages, stream=True, **options))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert (
        "".join(d.get("reasoning_content") or "" for d in deltas)
        == (reply["message"]["reasoning_content"])
    )
    streamed = [c["function"]["name"] for d in deltas for c in d.get("tool_calls") or []]
    assert streamed == ["ping"]


def test_gemma4_thought_then_json_and_plain_text(
    gemma4_clients: tuple[GemmaVLLMChatCompletion, GemmaTransformersChatCompletion],
) -> None:
    ours, reference = gemma4_clients
    options: dict[str, Any] = dict(
        thinking=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        temperature=0.0,
        max_tokens=200,
        logit_bias=_gemma4_bias(ours),
    )
    completion = ours.create(CONVERSATIONS[1], **options)
    reply = completion["choices"][0]
    assert reply["finish_reason"] == "stop"
    assert reply["message"]["reasoning_content"]
    jsonschema.validate(json.loads(reply["message"]["content"]), PERSON)
    assert _reply(completion) == _reply(reference.create(CONVERSATIONS[1], **options))
    for messages in CONVERSATIONS[:2]:
        assert _reply(ours.create(messages, **GREEDY)) == _reply(
            reference.create(messages, **GREEDY)
        )


def test_close_cancels_requests_in_flight_and_the_client_loads_again(
    gemma4_clients: tuple[GemmaVLLMChatCompletion, GemmaTransformersChatCompletion],
) -> None:
    ours, _ = gemma4_clients
    messages = CONVERSATIONS[0]
    never_ends = {t: -100.0 for t in ours.tokenizer.convert_tokens_to_ids(["<turn|>", "<eos>"])}
    stream = ours.create(
        messages, stream=True, temperature=0.0, max_tokens=1500, logit_bias=never_ends
    )
    next(stream)
    waiting: list[BaseException] = []

    async def waits() -> None:
        try:
            await ours.acreate(messages, temperature=0.0, max_tokens=1500, logit_bias=never_ends)
        except BaseException as exc:  # what close() gives it
            waiting.append(exc)

    thread = threading.Thread(target=asyncio.run, args=(waits(),))
    thread.start()
    while not ours._in_flight or len(ours._in_flight) < 2:
        threading.Event().wait(0.05)
    ours.close()  # does not wait for 1500 tokens
    thread.join(timeout=60)
    with pytest.raises(ClientClosedError):
        for _ in stream:
            pass
    assert len(waiting) == 1 and isinstance(waiting[0], ClientClosedError), waiting
    assert ours.is_loaded is False
    again = ours.create(messages, **GREEDY)  # a new engine
    assert again["choices"][0]["message"]["content"]
