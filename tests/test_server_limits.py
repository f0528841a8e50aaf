"""``gemma-local serve`` under bad input and load: errors, limits, disconnects.

A real uvicorn server per module (127.0.0.1, free port, a thread) over a tiny
Gemma 3. Every refusal is a 4xx in OpenAI's error shape, with ``create()``'s
own message for a bad option; 401 without the key, 404 for an unknown model,
413 over the body limit (before parsing), 429 at once when the client's queue
is full (its QueueFullError). Fuzzed bodies never get a 5xx and the server keeps serving; 100
concurrent streams all end with ``[DONE]``; a client that goes away cancels
its generation on the model thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import make_client
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from server_support import KEY, NO_END, USER, assert_error_shape, auth, chunks_of, sse_events

from core.server import BackgroundServer

LIMIT = 64 * 1024  # the test server's body limit


@pytest.fixture(scope="module")
def tf(gemma3_path: Path) -> Iterator[Any]:
    client = make_client("transformers", gemma3_path)
    client.load()
    yield client
    client.close()


@pytest.fixture(scope="module")
def server(tf: Any) -> Iterator[BackgroundServer]:
    with BackgroundServer(
        tf, api_key=KEY, served_names=["tiny", "tiny-alias"], max_body_size=LIMIT
    ) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as client:
        yield client


def post(http: httpx.Client, body: Any, **kwargs: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body, **kwargs)


def still_serving(http: httpx.Client) -> None:
    reply = post(http, {"model": "tiny", "messages": USER, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 2
    assert http.get("/health").json()["requests"]["active"] == 0


def wait_until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# --------------------------------------------------------------------- 400: create()'s


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 5},
        {"temperature": "hot"},
        {"top_p": 0},
        {"n": 0},
        {"n": 1.5},
        {"max_tokens": 0},
        {"seed": -1},
        {"stop": 123},
        {"stop": [""]},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {"5": 1000}},
        {"tools": [{"type": "nope"}]},
        {"tools": "get_weather"},
        {"tool_choice": "sometimes"},
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
        {"reasoning_effort": "max"},
        {"thinking": True},  # Gemma 3 does not think
        {"frobnicate": 1},
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": 7}]},
        {"messages": [{"role": "system", "content": "only a system turn"}]},
    ],
    ids=repr,
)
def test_bad_options_get_creates_message(tf, http, options) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 2, **options}
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as raised:
        tf.create(**{k: v for k, v in body.items() if k != "model"})
    error = assert_error_shape(post(http, body), 400)
    assert error["message"] == str(raised.value)
    assert error["type"] == "invalid_request_error"
    name = next(iter(options))
    if error["message"].startswith(name):
        assert error["param"] == name


def test_context_window_exceeded_is_400_before_streaming(tf, http) -> None:
    long = [{"role": "user", "content": "sea " * 3000}]  # past the 2048-token window
    for stream in (False, True):
        reply = post(http, {"model": "tiny", "messages": long, "stream": stream})
        error = assert_error_shape(reply, 400)
        assert error["code"] == "context_length_exceeded" and "context window" in error["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": USER}, "model is required"),
        ({"model": 7, "messages": USER}, "model must be a string"),
        ({"model": "tiny"}, "messages is required"),
        ({"model": "tiny", "messages": USER, "stream": "yes"}, "stream must be true or false"),
        (
            {"model": "tiny", "messages": USER, "stream_options": {"include_usage": True}},
            "stream_options is only allowed when stream is true",
        ),
        (
            {"model": "tiny", "messages": USER, "stream": True, "stream_options": {"x": 1}},
            "stream_options has unknown field(s) ['x']",
        ),
        (
            {"model": "tiny", "messages": USER, "max_tokens": 3, "max_completion_tokens": 4},
            "max_tokens=3 and max_completion_tokens=4 disagree",
        ),
        ({"model": "tiny", "messages": USER, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"model": "tiny", "messages": USER, "logprobs": True}, "logprobs is not supported"),
    ],
)
def test_server_fields(http, body, message) -> None:
    error = assert_error_shape(post(http, body), 400)
    assert message in error["message"]


def test_no_op_openai_options_are_accepted(http) -> None:
    body = {
        "model": "tiny-alias",
        "messages": USER,
        "max_completion_tokens": 2,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logprobs": False,
        "user": "someone",
    }
    reply = post(http, body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "tiny-alias"
    assert reply.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b'{"model": "tiny", "messages": [}',
        b"[1, 2]",
        b'"a string"',
        b"null",
        b"42",
        b'{"model": "tiny", "messages": [], "temperature": NaN}',
        b'{"model": "tiny", "temperature": Infinity}',
        b"\xff\xfe{}",
        b"[" * 30_000 + b"]" * 30_000,
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    ],
    ids=lambda raw: repr(raw[:40]),
)
def test_invalid_json(http, raw) -> None:
    reply = http.post("/v1/chat/completions", content=raw)
    error = assert_error_shape(reply, 400)
    assert "JSON" in error["message"] or "empty" in error["message"]


# -------------------------------------------------------------- 401 / 404 / 405 / 413


def test_api_key(server) -> None:
    url = f"{server.url}/v1/chat/completions"
    body = {"model": "tiny", "messages": USER, "max_tokens": 1}
    for headers in ({}, auth("sk-wrong"), {"Authorization": KEY}, {"Authorization": "Basic x"}):
        reply = httpx.post(url, json=body, headers=headers)
        error = assert_error_shape(reply, 401)
        assert error["code"] == "invalid_api_key"
        assert reply.headers["www-authenticate"] == "Bearer"
    assert_error_shape(httpx.get(f"{server.url}/v1/models"), 401)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # open, for probes


def test_unknown_model_route_and_method(server, http) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with client, pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert raised.value.code == "model_not_found"
    assert "'tiny', 'tiny-alias'" in raised.value.message
    error = assert_error_shape(http.get("/v1/engines"), 404)
    assert "no route GET /v1/engines" in error["message"]
    assert_error_shape(http.get("/v1/chat/completions"), 405)
    still_serving(http)


def test_body_limit(http) -> None:
    pad = " " * LIMIT
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 1}).encode()
    error = assert_error_shape(http.post("/v1/chat/completions", content=body + pad.encode()), 413)
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield body
        for _ in range(LIMIT // 1024 + 1):
            yield b" " * 1024

    assert_error_shape(http.post("/v1/chat/completions", content=chunked()), 413)
    # not even parsed: invalid JSON over the limit is a 413 too
    assert_error_shape(http.post("/v1/chat/completions", content=b"{" * (LIMIT + 1)), 413)
    exactly = body + b" " * (LIMIT - len(body))
    assert http.post("/v1/chat/completions", content=exactly).status_code == 200
    still_serving(http)


# ------------------------------------------------------------------------------- 429


def test_queue_full_is_429_at_once(gemma3_path) -> None:
    """One row decoding and one request waiting fill a client of max_batch_size=1,
    max_queue=1: a third request is a 429 in OpenAI's shape, at once, with the
    client's QueueFullError message; the waiting one is served once the row frees."""
    small_client = make_client("transformers", gemma3_path, max_batch_size=1, max_queue=1)
    with (
        small_client,
        BackgroundServer(small_client, served_names=["tiny"]) as small,
        httpx.Client(base_url=small.url, timeout=60) as http,
    ):
        health = http.get("/health").json()["requests"]
        assert health == {"active": 0, "max_batch_size": 1, "max_queue": 1}
        long = {"model": "tiny", "messages": USER, "max_tokens": 2000, "logit_bias": NO_END}
        with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as first:
            assert first.status_code == 200  # decoding: the batch's one row
            waiting: list[httpx.Response] = []
            second = threading.Thread(  # waits for the row behind the first
                target=lambda: waiting.append(post(http, {**long, "max_tokens": 8}))
            )
            second.start()
            wait_until(lambda: http.get("/health").json()["requests"]["active"] == 2)
            wait_until(lambda: len(small_client._in_flight) == 2)  # queued in the client
            started = time.perf_counter()
            client = openai.OpenAI(base_url=f"{small.url}/v1", api_key="x", max_retries=0)
            with client, pytest.raises(openai.RateLimitError) as raised:
                client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
            assert time.perf_counter() - started < 2.0  # answered at once, not queued
            assert raised.value.code == "rate_limit_exceeded"
            assert raised.value.type == "requests"
            assert raised.value.response.headers["retry-after"] == "1"
            assert "max_queue=1" in raised.value.message
            assert "request queue is full" in raised.value.message
            # streamed requests are refused the same way, before any event
            refused = http.post("/v1/chat/completions", json={**long, "stream": True})
            assert_error_shape(refused, 429)
        # the first stream is closed: the second gets the row, and the queue is free again
        second.join(60)
        assert waiting[0].status_code == 200
        assert waiting[0].json()["usage"]["completion_tokens"] == 8
        wait_until(lambda: http.get("/health").json()["requests"]["active"] == 0)
        reply = post(http, {"model": "tiny", "messages": USER, "max_tokens": 1})
        assert reply.status_code == 200


# ------------------------------------------------------------------------ disconnects


@pytest.fixture
def sinks(tf, monkeypatch) -> list[Any]:
    """The token sink of every generation the client runs from now on."""
    seen: list[Any] = []
    generate = tf._generate

    def recording(prompts, params, sink):
        seen.append(sink)
        return generate(prompts, params, sink)

    monkeypatch.setattr(tf, "_generate", recording)
    return seen


def _cancelled_early(tf: Any, sink: Any, max_tokens: int) -> None:
    wait_until(lambda: len(tf._in_flight) == 0)
    assert sink.cancelled and sink.done
    assert sink.rows[0].finish_reason is None  # it never ran to its end
    assert sink.rows[0].completion_tokens < max_tokens
    tf._worker.submit(lambda: None).result(timeout=5)  # the model thread is free


def test_closing_a_stream_cancels_its_generation(tf, server, http, sinks) -> None:
    body = {"model": "tiny", "messages": USER, "stream": True, "max_tokens": 2000}
    body["logit_bias"] = NO_END
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        while not next(lines).startswith("data: "):
            pass
    # the response is closed: the connection is gone mid-stream
    [sink] = sinks
    _cancelled_early(tf, sink, 2000)
    still_serving(http)


async def test_async_client_breaking_out_cancels(tf, server, sinks) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=USER,
            stream=True,
            max_tokens=2000,
            logit_bias=NO_END,
        )
        async for _ in stream:
            break
        await stream.close()
    [sink] = sinks
    await asyncio.to_thread(_cancelled_early, tf, sink, 2000)


def test_a_waiting_request_whose_client_left_is_cancelled(tf, server, http, sinks) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 2000, "logit_bias": NO_END}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=0.3)
    wait_until(lambda: len(sinks) == 1)
    _cancelled_early(tf, sinks[0], 2000)
    still_serving(http)


def test_stopping_the_server_ends_open_streams(tf, sinks) -> None:
    """An open stream ends at its next chunk with a 503 error event and [DONE]; the
    server stops at once (not after its graceful timeout) and the generation is cancelled."""
    body = {"model": "tiny", "messages": USER, "stream": True, "max_tokens": 2000}
    body["logit_bias"] = NO_END
    running = BackgroundServer(tf, served_names=["tiny"]).start()
    try:
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
            started = time.perf_counter()
            stopper = threading.Thread(target=running.close)
            stopper.start()
            events = [line.removeprefix("data: ") for line in lines if line]
        stopper.join(30)
        assert time.perf_counter() - started < 2.0
    finally:
        running.close()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "service_unavailable"
    _cancelled_early(tf, sinks[0], 2000)


# ------------------------------------------------------------------------ load


async def test_100_concurrent_streams(tf, server) -> None:
    """100 streams at once: every one 200, every event well-formed, each ending in [DONE]."""

    async def one(client: httpx.AsyncClient, seed: int) -> tuple[int, list[dict[str, Any]]]:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Request {seed}: tell me a story."}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 4,
            "temperature": 1.0,
            "seed": seed,
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            raw = await reply.aread()
        return reply.status_code, chunks_of(raw)

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    started = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=server.url, headers=auth(), timeout=120, limits=limits
    ) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(one(client, seed) for seed in range(100))), timeout=120
        )
        health = (await client.get("/health")).json()
    elapsed = time.perf_counter() - started
    assert [status for status, _ in results] == [200] * 100
    for _, chunks in results:
        assert chunks[-1]["usage"]["completion_tokens"] <= 4
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({chunks[0]["id"] for _, chunks in results}) == 100
    assert health["requests"]["active"] == 0
    print(f"100 concurrent streams of <= 4 tokens: {elapsed:.1f}s")


# ------------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "model",
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stop",
    "seed",
    "logit_bias",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "thinking",
    "repetition_penalty",
    "stream",
    "stream_options",
    "frequency_penalty",
    "logprobs",
    "user",
    "unknown_field",
]
media_urls = st.sampled_from(
    [
        "data:image/png;base64,iVBORw0KGgo=",
        "data:image/png;base64,%%%",
        "data:,",
        "/etc/passwd",
        "file:///etc/passwd",
        "http://127.0.0.1:9/x.png",
        "ftp://x",
        "",
    ]
) | st.text(max_size=20)
content_parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "image", "audio", "video"])},
    optional={
        "text": json_values,
        "image_url": json_values | st.fixed_dictionaries({"url": media_urls}),
        "input_audio": json_values
        | st.fixed_dictionaries({"data": st.text(max_size=12), "format": st.text(max_size=5)}),
        "image": json_values | media_urls,
    },
)
message_values = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "x"])
        | json_values
    },
    optional={
        "content": json_values | st.text(max_size=30) | st.lists(content_parts, max_size=3),
        "tool_calls": json_values,
    },
)


def check_answer(reply: httpx.Response) -> None:
    assert reply.status_code < 500, reply.text
    if reply.status_code == 200:
        if reply.headers["content-type"].startswith("text/event-stream"):
            assert sse_events(reply.content)[-1] == "[DONE]"
        else:
            assert reply.json()["object"] == "chat.completion"
    else:
        assert_error_shape(reply)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    field=st.sampled_from(FIELDS),
    value=json_values,
    drop=st.sets(st.sampled_from(["model", "messages", "max_tokens"]), max_size=2),
)
def test_fuzzed_fields(http, field, value, drop) -> None:
    """One field of a valid body replaced by any JSON value (or fields left out): a 4xx,
    or a valid reply; never a 5xx or a hang."""
    # a valid long generation is not what this looks for
    if field in ("max_tokens", "max_completion_tokens", "n"):
        assume(not (isinstance(value, int) and not isinstance(value, bool) and value > 4))
    body = {"model": "tiny", "messages": USER, "max_tokens": 2}
    body[field] = value
    for name in drop:
        body.pop(name, None)
    if "max_tokens" not in body and field != "max_completion_tokens":
        body["max_completion_tokens"] = 2
    check_answer(post(http, body))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(message_values, max_size=4) | json_values)
def test_fuzzed_messages(http, messages) -> None:
    check_answer(post(http, {"model": "tiny", "messages": messages, "max_tokens": 2}))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzzed_bytes(http, raw) -> None:
    check_answer(http.post("/v1/chat/completions", content=raw))


def test_still_serving_after_the_fuzz(http) -> None:
    still_serving(http)
    assert threading.active_count() < 50  # no thread left behind per request
