"""Continuous batching on the fast path (core.accel.cuda.slots): requests in the rows of
one static KV cache, each joining at the next cache index with its prompt right-aligned.

The fast path normally runs on CUDA only; with ``GEMMA_LOCAL_FAST_PATH=on`` the
same engine runs eagerly on the CPU, which is how these tests check its logic
(the CUDA graphs of each batch width are checked where a GPU is present).
Every reply is compared with the plain path's (``model.generate``, the same
checkpoint, float32, greedy): concurrent requests, rows of different options,
a request joining mid-batch, rows reused after others left, and a request too
long for the cache slots (served whole).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import make_client
from test_core_support import END_OF_TURN, EOS, PROMPTS, USER

torch = pytest.importorskip("torch")

from core.accel.cuda import slots  # noqa: E402

GREEDY = {"temperature": 0, "max_tokens": 16}
FORCED = {"type": "function", "function": {"name": "note"}}
# (50: Gemma 4's <|tool_response>, an end id of its generation config)
ENDLESS = {
    "temperature": 0,
    "max_tokens": 200,
    "logit_bias": {EOS: -100, END_OF_TURN: -100, 50: -100},
}
SIXTEEN = [
    [{"role": "user", "content": " ".join(["tell me about the sea"] * (1 + i % 4)) + f" {i}"}]
    for i in range(16)
]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def same(result: dict) -> tuple:
    choices = [dict(c, message=dict(c["message"])) for c in result["choices"]]
    for choice in choices:
        if choice["message"].get("tool_calls"):
            choice["message"]["tool_calls"] = [
                c["function"] for c in choice["message"]["tool_calls"]
            ]
    return choices, result["usage"]


def _with_fast_path(fn: Any, **env: str) -> Any:
    old = {k: os.environ.get(k) for k in ("GEMMA_LOCAL_FAST_PATH", *env)}
    os.environ.update(GEMMA_LOCAL_FAST_PATH="on", **env)
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def slot_client(path: Path, device: str, compile: str | None = None, **env: str) -> Any:
    """A transformers client whose batch engine is the fast path's (made while it applies);
    ``compile`` (a ``torch.compile`` backend) compiles its engine on the CPU too."""
    from core.accel.cuda import fast_path

    client = make_client("transformers", path, device_map=device)
    if compile:
        client.load()
        fast_path._engine(client.model, compile=compile, cuda_graphs=device == "cuda")
    _with_fast_path(lambda: client.create(USER, temperature=0, max_tokens=2), **env)
    engine = client._worker.call(lambda: client._scheduler._engine)
    assert isinstance(engine, slots.SlotBatch)
    # on CUDA the first request ran on the plain path while the batch's step compiled
    assert fast_path.settle(client.model, timeout=900)
    return client


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODES = [
    pytest.param((device, mode), id=f"{device}-{mode}", marks=[NO_CUDA] if device == "cuda" else [])
    for device in ("cpu", "cuda")
    for mode in ("pipelined", "stepwise")
]


@pytest.fixture(scope="module", params=["gemma3_path", "gemma4_vision_path"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    """Gemma 3 (the fast path's own forward) and Gemma 4 (the model's own text model,
    core.accel.cuda.own_forward: per-layer embeddings, KV-shared layers)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=MODES)
def fast(request: pytest.FixtureRequest, checkpoint: Path) -> Iterator[Any]:
    """The fast path's batch; ``pipelined``: when every row is greedy the next step is
    launched before the host reads a step's tokens (``stepwise``: one step at a time)."""
    device, mode = request.param
    client = slot_client(checkpoint, device)
    engine = client._worker.call(lambda: client._scheduler._engine)
    engine.pipeline = mode == "pipelined"
    yield client
    client.close()


@pytest.fixture(scope="module")
def plain(checkpoint: Path) -> Iterator[Any]:
    """The plain path: ``model.generate`` / the DynamicCache batch, the fast path off."""
    os.environ.pop("GEMMA_LOCAL_FAST_PATH", None)
    client = make_client("transformers", checkpoint)
    yield client
    client.close()


def widest(client: Any) -> dict[str, int]:
    """Counts the engine's steps and the most rows one step held."""
    state = {"steps": 0, "widest": 0}
    engine = client._worker.call(lambda: client._scheduler._engine)
    step = engine.step

    def counted() -> Any:
        state["steps"] += 1
        state["widest"] = max(state["widest"], sum(r is not None for r in engine.held))
        return step()

    engine.step = counted
    return state


def test_sixteen_threads_get_the_plain_paths_replies(fast: Any, plain: Any) -> None:
    expected = [plain.create(m, **GREEDY) for m in SIXTEEN]
    steps = widest(fast)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda m: fast.create(m, **GREEDY), SIXTEEN))
    for a, b in zip(expected, together, strict=True):
        assert same(b) == same(a)
    assert steps["widest"] > 1  # they shared the batch


def test_rows_of_different_options_share_the_slots(fast: Any, plain: Any) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "note",
            "parameters": {
                "type": "object",
                "properties": {"mood": {"type": "string", "enum": ["calm", "stormy"]}},
                "required": ["mood"],
            },
        },
    }
    requests = [
        (PROMPTS[0], GREEDY),
        (PROMPTS[1], {"temperature": 0, "max_tokens": 5}),
        (PROMPTS[2], {"temperature": 0, "max_tokens": 24, "logit_bias": {EOS: -100}}),
        (PROMPTS[0], {"temperature": 0, "max_tokens": 20, "repetition_penalty": 1.3}),
        (PROMPTS[1], {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7, "max_tokens": 12}),
        (PROMPTS[2], {"temperature": 0, "max_tokens": 30, "stop": ["e"]}),
        (PROMPTS[0], {"temperature": 0, "max_tokens": 120, "tools": [tool], "tool_choice": FORCED}),
        (PROMPTS[1], {"temperature": 0, "max_tokens": 10, "n": 2}),
    ]
    expected = [plain.create(m, **o) for m, o in requests]
    if fast.model.device.type == "cuda":
        # a seed fixes the draws of one device's generator: the seeded row is the same
        # client's reply to it alone (the plain client runs on the CPU)
        expected[4] = fast.create(requests[4][0], **requests[4][1])
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: fast.create(r[0], **r[1]), requests))
    for a, b in zip(expected, together, strict=True):
        assert same(b) == same(a)
    assert together[6]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_request_joining_mid_batch_gets_the_plain_reply(fast: Any, plain: Any) -> None:
    expected = plain.create(PROMPTS[2], **GREEDY)
    long = fast.create(USER, stream=True, **ENDLESS)
    for _ in range(6):
        next(long)
    steps = widest(fast)
    try:
        joined = fast.create(PROMPTS[2], **GREEDY)
        assert next(long)["choices"][0]["finish_reason"] is None
    finally:
        long.close()
    assert same(joined) == same(expected)
    assert steps["widest"] == 2


def test_rows_are_reused_after_others_leave(fast: Any, plain: Any) -> None:
    """Waves of requests through rows that earlier requests held (their old keys and
    values stay in the ring below the new row's pad and are never read)."""
    prompts = SIXTEEN[:6]
    expected = [plain.create(m, temperature=0, max_tokens=4 + 3 * i) for i, m in enumerate(prompts)]
    gate = threading.Barrier(2)

    def wave(offset: int) -> list[dict]:
        gate.wait(10)
        order = prompts[offset:] + prompts[:offset]
        sizes = [4 + 3 * ((i + offset) % 6) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            return list(
                pool.map(
                    lambda a: fast.create(a[0], temperature=0, max_tokens=a[1]),
                    zip(order, sizes, strict=True),
                )
            )

    with ThreadPoolExecutor(2) as outer:
        first, second = outer.submit(wave, 0), outer.submit(wave, 3)
        results = first.result(120), second.result(120)
    for offset, got in zip((0, 3), results, strict=True):
        for i, reply in enumerate(got):
            assert same(reply) == same(expected[(i + offset) % 6])


def test_a_request_too_long_for_the_slots_runs_whole(checkpoint: Path, plain: Any) -> None:
    client = slot_client(checkpoint, "cpu", GEMMA_LOCAL_SLOT_TOKENS="64")
    try:
        engine = client._worker.call(lambda: client._scheduler._engine)
        assert engine.slots == 64
        short = client.create(PROMPTS[1], temperature=0, max_tokens=8)
        assert same(short) == same(plain.create(PROMPTS[1], temperature=0, max_tokens=8))
        long = _with_fast_path(lambda: client.create(USER, temperature=0, max_tokens=80))
        assert same(long) == same(plain.create(USER, temperature=0, max_tokens=80))
    finally:
        client.close()


def test_slot_tokens_setting_is_checked(monkeypatch: pytest.MonkeyPatch, gemma3_path: Path) -> None:
    class Config:
        def get_text_config(self) -> Any:
            return self

        max_position_embeddings = 1000

    model = type("M", (), {"config": Config()})()
    monkeypatch.setenv("GEMMA_LOCAL_SLOT_TOKENS", "lots")
    with pytest.raises(ValueError, match="GEMMA_LOCAL_SLOT_TOKENS must be an integer >= 16"):
        slots.slot_count(model)
    monkeypatch.setenv("GEMMA_LOCAL_SLOT_TOKENS", "2048")
    assert slots.slot_count(model) == 1000  # at most the context window
    monkeypatch.delenv("GEMMA_LOCAL_SLOT_TOKENS")
    assert slots.slot_count(model) == 1000


def test_what_runs_whole_beside_the_slots(fast: Any) -> None:
    """A batch of rows that finds the client idle takes the fast path's own bucket; one
    arriving beside others joins the slots; a row too long for them always runs whole."""
    from core.params import SamplingParams
    from core.scheduler import Request
    from core.stream import Prompt

    def request(rows: int, max_tokens: int = 16) -> Request:
        prompts = [Prompt("", (2, 3, 4)) for _ in range(rows)]
        sink = type("Sink", (), {"rows": [type("R", (), {"max_tokens": max_tokens})()] * rows})()
        return Request(prompts, SamplingParams.build(max_tokens=max_tokens), sink, None, None, None)

    assert fast._runs_whole(request(2), alone=True)
    assert not fast._runs_whole(request(2), alone=False)
    assert not fast._runs_whole(request(1), alone=True)
    assert fast._runs_whole(request(1, max_tokens=10**6), alone=False)
