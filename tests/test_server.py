"""``gemma-local serve`` driven by the official clients (openai, LangChain's ChatOpenAI).

One real uvicorn server per module, on 127.0.0.1 and a free port, on a thread
(:class:`core.server.BackgroundServer`), over a tiny random-weight Gemma 3
(transformers, float32 on the CPU). Every reply is compared with what the
same client's ``create()`` returns for the same options: the server adds
transport, never its own formatting. Tools and JSON come from the grammar, so
they validate even from a random model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import make_client
from pydantic import BaseModel, Field
from server_support import KEY, USER, assert_error_shape, auth, chunks_of

from core.cli import RATING_SCHEMA, WEATHER_TOOL
from core.media import Sources
from core.server import BackgroundServer

WEATHER_PARAMS = WEATHER_TOOL["function"]["parameters"]
RATING_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "rating", "schema": RATING_SCHEMA, "strict": True},
}


@pytest.fixture(scope="module")
def tf(gemma3_path: Path) -> Iterator[Any]:
    client = make_client("transformers", gemma3_path)
    client.load()
    yield client
    client.close()


@pytest.fixture(scope="module")
def server(tf: Any) -> Iterator[BackgroundServer]:
    with BackgroundServer(tf, api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def name(server: BackgroundServer) -> str:
    return str(server.app.state.settings.served_names[0])


@pytest.fixture(scope="module")
def oai(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        yield client


def direct_choices(tf: Any, **options: Any) -> list[dict[str, Any]]:
    return tf.create(USER, **options)["choices"]


# ------------------------------------------------------------------- models, health


def test_models_and_health(server, oai, name, gemma3_path) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids == [gemma3_path.name, str(gemma3_path)]  # the folder's name first
    assert ids[0] == name
    assert oai.models.retrieve(name).owned_by == "gemma-local"
    assert oai.models.retrieve(ids[1]).id == str(gemma3_path)  # an id with slashes
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == name and health["loaded"] is True
    assert health["requests"] == {"active": 0, "max_batch_size": 16, "max_queue": 256}


# ----------------------------------------------------- replies equal create()'s


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0, "max_tokens": 6},
        {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 6},
        {"temperature": 1.0, "seed": 3, "n": 3, "max_tokens": 4},
        {"temperature": 0, "max_tokens": 5, "logit_bias": {"300": 100}},
        {"temperature": 0.8, "seed": 1, "max_tokens": 5, "top_k": 5, "repetition_penalty": 1.3},
    ],
    ids=["greedy", "seeded", "n", "logit_bias", "top_k"],
)
def test_completion_equals_create(tf, oai, name, options) -> None:
    standard = {k: v for k, v in options.items() if k not in ("top_k", "repetition_penalty")}
    extra = {k: v for k, v in options.items() if k in ("top_k", "repetition_penalty")}
    raw = oai.chat.completions.with_raw_response.create(
        model=name, messages=USER, extra_body=extra, **standard
    )
    body = raw.http_response.json()
    assert body["object"] == "chat.completion" and body["model"] == name
    expected = tf.create(USER, **options)
    assert body["choices"] == expected["choices"]
    assert body["usage"] == expected["usage"]
    assert len(body["choices"]) == options.get("n", 1)
    if "logit_bias" in options:
        assert body["usage"]["completion_tokens"] == 5
        assert body["choices"][0]["message"]["content"] == tf.tokenizer.decode([300] * 5)


def test_stop_and_max_completion_tokens(tf, oai, name) -> None:
    greedy = direct_choices(tf, temperature=0, max_tokens=8)[0]["message"]["content"]
    stop = greedy[3:5]
    reply = oai.chat.completions.create(
        model=name, messages=USER, temperature=0, max_completion_tokens=8, stop=[stop]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == greedy[: greedy.index(stop)]
    assert (
        reply.choices[0].message.content
        == (direct_choices(tf, temperature=0, max_tokens=8, stop=[stop])[0]["message"]["content"])
    )


async def test_async_clients_concurrently(tf, server, name) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, max_retries=0
    ) as client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=name, messages=USER, temperature=1.0, seed=seed, max_tokens=5
                )
                for seed in range(6)
            )
        )
    for seed, reply in enumerate(replies):
        expected = direct_choices(tf, temperature=1.0, seed=seed, max_tokens=5)[0]
        assert reply.choices[0].message.content == expected["message"]["content"]


# ---------------------------------------------------------------------- streaming


def test_stream_equals_the_completion(tf, oai, name) -> None:
    options = {"temperature": 1.0, "seed": 11, "max_tokens": 8}
    stream = oai.chat.completions.create(
        model=name,
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        **options,
    )
    chunks = list(stream)
    expected = tf.create(USER, **options)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["choices"][0]["message"]["content"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == expected["choices"][0]["finish_reason"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == expected["usage"]
    assert {c.model for c in chunks} == {name} and len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("include_usage", [True, False, None])
def test_sse_bytes_are_openais(tf, server, name, include_usage) -> None:
    """``data: {compact json}\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` last; the usage chunk
    and ``"usage": null`` only with ``include_usage``; the chunks are create()'s."""
    options = {"temperature": 1.0, "seed": 5, "max_tokens": 6, "n": 2}
    body: dict[str, Any] = {"model": name, "messages": USER, "stream": True, **options}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth())
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    raw = response.content
    assert raw.startswith(b'data: {"id":"chatcmpl-') and raw.endswith(b"}\n\ndata: [DONE]\n\n")
    assert b'"object":"chat.completion.chunk"' in raw  # compact, as OpenAI writes it
    chunks = chunks_of(raw)
    expected = list(tf.create(USER, stream=True, **options))
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected[-1]["usage"]
        chunks = [{k: v for k, v in c.items() if k != "usage"} for c in chunks[:-1]]
    else:
        assert all("usage" not in c for c in chunks)
    expected = expected[:-1]  # create() always ends with its usage chunk
    assert [c["choices"] for c in chunks] == [c["choices"] for c in expected]
    assert {c["model"] for c in chunks} == {name}


# ----------------------------------------------------------- tools, structured output


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tool_calls(tf, oai, name, tool_choice) -> None:
    options = {
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "temperature": 1.0,
        "seed": 0,
        "max_tokens": 128,
    }
    reply = oai.chat.completions.create(model=name, messages=USER, **options)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    expected = direct_choices(tf, **options)[0]["message"]["tool_calls"][0]["function"]
    assert call.function.model_dump() == expected

    # streamed: the call's pieces add up to the same call
    stream = oai.chat.completions.create(model=name, messages=USER, stream=True, **options)
    names, arguments, finish = [], [], None
    for chunk in stream:
        for choice_delta in chunk.choices:
            for piece in choice_delta.delta.tool_calls or []:
                names.append(piece.function.name or "")
                arguments.append(piece.function.arguments or "")
            finish = choice_delta.finish_reason or finish
    assert "".join(names) == "get_weather" and finish == "tool_calls"
    assert "".join(arguments) == call.function.arguments


def test_tool_result_round_trip(tf, oai, name) -> None:
    options = {"tools": [WEATHER_TOOL], "temperature": 1.0, "seed": 0, "max_tokens": 128}
    first = oai.chat.completions.create(
        model=name, messages=USER, tool_choice="required", parallel_tool_calls=False, **options
    )
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    history = [
        *USER,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    following = oai.chat.completions.create(model=name, messages=history, max_tokens=4)
    # the call and its result are in the prompt (the tools themselves are not, this time)
    assert following.usage.prompt_tokens > len(tf.format_prompt(USER).ids) + 10
    assert following.choices[0].message.tool_calls is None


def test_structured_output(tf, oai, name) -> None:
    options = {"response_format": RATING_FORMAT, "temperature": 1.0, "seed": 4, "max_tokens": 64}
    reply = oai.chat.completions.create(model=name, messages=USER, **options)
    content = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), RATING_SCHEMA)
    assert content == direct_choices(tf, **options)[0]["message"]["content"]
    json_mode = oai.chat.completions.create(
        model=name,
        messages=USER,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
        logit_bias={"1": -100, "106": -100},
    )
    if json_mode.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_mode.choices[0].message.content or ""), dict)


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    recommended: bool


def test_openai_parse_with_a_pydantic_model(oai, name) -> None:
    """The SDK's ``parse()`` sends a strict json_schema and reads the reply into the model."""
    reply = oai.chat.completions.parse(
        model=name, messages=USER, response_format=Rating, temperature=1.0, seed=9, max_tokens=64
    )
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Rating) and 1 <= parsed.stars <= 5


# ---------------------------------------------------------------------- LangChain


@pytest.fixture(scope="module")
def chat_openai(server: BackgroundServer, name: str) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=name,
        base_url=f"{server.url}/v1",
        api_key=KEY,
        temperature=0,
        max_tokens=6,
        max_retries=0,
        stream_usage=True,  # the usage chunk (stream_options.include_usage)
    )


def test_langchain_invoke_and_stream(tf, chat_openai) -> None:
    expected = direct_choices(tf, temperature=0, max_tokens=6)[0]["message"]["content"]
    message = chat_openai.invoke("What is the weather in Paris?")
    assert message.content == expected
    assert message.usage_metadata["output_tokens"] == 6
    assert message.response_metadata["finish_reason"] == "length"
    pieces = list(chat_openai.stream("What is the weather in Paris?"))
    assert "".join(str(p.content) for p in pieces) == expected
    assert sum(p.usage_metadata["output_tokens"] for p in pieces if p.usage_metadata) == 6


async def test_langchain_async(tf, chat_openai) -> None:
    expected = direct_choices(tf, temperature=0, max_tokens=6)[0]["message"]["content"]
    replies = await asyncio.gather(*(chat_openai.ainvoke(USER[0]["content"]) for _ in range(3)))
    assert [r.content for r in replies] == [expected] * 3
    pieces = [p async for p in chat_openai.astream(USER[0]["content"])]
    assert "".join(str(p.content) for p in pieces) == expected


def test_langchain_bind_tools(chat_openai) -> None:
    from langchain_core.tools import tool

    @tool
    def get_weather(
        city: Literal["Paris", "Tokyo", "Lima"], unit: Literal["celsius", "fahrenheit"]
    ) -> str:
        """Current weather of a city."""
        return f"21 degrees {unit} in {city}"

    longer = chat_openai.model_copy(update={"max_tokens": 128, "temperature": 1.0})
    model = longer.bind(seed=0).bind_tools(
        [get_weather], tool_choice="any", parallel_tool_calls=False
    )
    message = model.invoke("What is the weather in Tokyo?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    assert get_weather.invoke(call["args"]).startswith("21 degrees")  # the args validate


def test_langchain_structured_output(chat_openai) -> None:
    longer = chat_openai.model_copy(update={"max_tokens": 64, "temperature": 1.0})
    rating = (
        longer.bind(seed=6)
        .with_structured_output(Rating, method="json_schema")
        .invoke("Rate the film Alien.")
    )
    assert isinstance(rating, Rating) and 1 <= rating.stars <= 5


# ------------------------------------------------------------ Gemma 4: reasoning_content

#: Gemma 4's <|channel> opens the thought at once, a small bias on <channel|> closes it
#: after a few tokens; then the grammar asks for the forced call.
THINK_BIAS = {"100": 20.0, "101": 0.2}
PING = {
    "type": "function",
    "function": {
        "name": "ping",
        "description": "Check the line.",
        "parameters": {"type": "object", "properties": {}},
    },
}


@pytest.fixture(scope="module")
def g4_server(gemma4_path: Path) -> Iterator[tuple[BackgroundServer, Any]]:
    client = make_client("transformers", gemma4_path)
    with BackgroundServer(client, served_names=["gemma-4-tiny"]) as running:
        yield running, client
    client.close()


def test_reasoning_content(g4_server) -> None:
    running, client = g4_server
    options: dict[str, Any] = {
        "temperature": 0,
        "max_tokens": 96,
        "logit_bias": THINK_BIAS,
        "tools": [PING],
        "tool_choice": {"type": "function", "function": {"name": "ping"}},
        "reasoning_effort": "high",
    }
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0) as oai:
        reply = oai.chat.completions.create(model="gemma-4-tiny", messages=USER, **options)
        message = reply.choices[0].message.model_dump()
        expected = client.create(USER, **options)["choices"][0]["message"]
        assert message["reasoning_content"] and expected["reasoning_content"]
        assert message["reasoning_content"] == expected["reasoning_content"]
        assert message["tool_calls"][0]["function"] == {"name": "ping", "arguments": "{}"}
        details = reply.usage.completion_tokens_details
        assert details is not None and details.reasoning_tokens > 0

        kinds = []
        thought = ""
        stream = oai.chat.completions.create(
            model="gemma-4-tiny", messages=USER, stream=True, **options
        )
        for chunk in stream:
            delta = chunk.choices[0].delta.model_dump() if chunk.choices else {}
            thought += delta.get("reasoning_content") or ""
            kinds += [k for k in ("reasoning_content", "tool_calls") if delta.get(k)]
        assert thought == expected["reasoning_content"]
        assert kinds[-1] == "tool_calls" and set(kinds) == {"reasoning_content", "tool_calls"}

        off = oai.chat.completions.create(
            model="gemma-4-tiny", messages=USER, **{**options, "reasoning_effort": "none"}
        )
        assert "reasoning_content" not in off.choices[0].message.model_dump()


# --------------------------------------------------------------------------- MLX


def test_mlx_backend(gemma3_path: Path) -> None:
    """The same server over the MLX client (its model thread): replies equal its create(),
    and closing a stream cancels the generation there too."""
    client = make_client("mlx", gemma3_path)
    sinks: list[Any] = []
    generate = client._generate

    def recording(prompts: Any, params: Any, sink: Any) -> None:
        if params.max_tokens == 2000:
            sinks.append(sink)
        generate(prompts, params, sink)

    client._generate = recording  # this test's own client
    try:
        with (
            BackgroundServer(client, served_names=["tiny-mlx"]) as running,
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0) as oai,
        ):
            options = {"temperature": 1.0, "seed": 8, "max_tokens": 6}
            reply = oai.chat.completions.create(model="tiny-mlx", messages=USER, **options)
            expected = client.create(USER, **options)["choices"][0]["message"]["content"]
            assert reply.choices[0].message.content == expected
            stream = oai.chat.completions.create(
                model="tiny-mlx", messages=USER, stream=True, **options
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
                expected
            )
            long = oai.chat.completions.create(
                model="tiny-mlx",
                messages=USER,
                stream=True,
                max_tokens=2000,
                logit_bias={"1": -100, "106": -100},
            )
            next(iter(long))
            long.close()
            [sink] = sinks
            deadline = time.monotonic() + 15
            while len(client._in_flight) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sink.cancelled and sink.rows[0].completion_tokens < 2000
            client._worker.submit(lambda: None).result(timeout=10)  # the thread is free again
            health = httpx.get(f"{running.url}/health").json()
            assert health["requests"]["active"] == 0
    finally:
        client.close()


# ------------------------------------------------------------------------- images


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def test_images_inline_only_by_default(gemma3_vision_path: Path, tmp_path: Path) -> None:
    """A data-URI image is read (the reply equals create()'s); a path, a file:// URL or an
    http(s) URL is refused with a 400 unless the server allows it (it would read the
    server's files, or fetch an address of the sender's choosing)."""
    import base64

    data = _png(3)
    (tmp_path / "p.png").write_bytes(data)
    uri = f"data:image/png;base64,{base64.b64encode(data).decode()}"

    def ask(url: str) -> list[dict[str, Any]]:
        part = {"type": "image_url", "image_url": {"url": url}}
        return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]

    options = {"temperature": 0, "max_tokens": 4}
    client = make_client("transformers", gemma3_vision_path)
    try:
        with (
            BackgroundServer(client, served_names=["vision"]) as strict,
            BackgroundServer(
                client, served_names=["vision"], media_sources=Sources(local_files=True)
            ) as lenient,
        ):
            url = f"{strict.url}/v1/chat/completions"
            reply = httpx.post(url, json={"model": "vision", "messages": ask(uri), **options})
            assert reply.status_code == 200, reply.text
            expected = client.create(ask(uri), **options)
            assert reply.json()["choices"] == expected["choices"]
            assert reply.json()["usage"]["prompt_tokens"] > 256  # the image's soft tokens
            refused = {
                str(tmp_path / "p.png"): "local files",
                (tmp_path / "p.png").as_uri(): "local files",
                "http://127.0.0.1:9/p.png": "URLs",
            }
            for source, what in refused.items():
                body = {"model": "vision", "messages": ask(source), **options}
                error = assert_error_shape(httpx.post(url, json=body), 400)
                assert f"does not read media from {what}" in error["message"]
            body = {"model": "vision", "messages": ask(str(tmp_path / "p.png")), **options}
            allowed = httpx.post(f"{lenient.url}/v1/chat/completions", json=body)
            assert allowed.status_code == 200 and allowed.json()["choices"] == expected["choices"]
    finally:
        client.close()
