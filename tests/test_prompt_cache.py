"""Prompt-prefix reuse (issue 21): a prompt that extends an earlier one on the same client is
prefilled from where that one ends, on the transformers batch (a copy of the stored
``DynamicCache``) and on the fast path's batch (the stored keys and values, the new tokens
run over them). Every reply equals the same client's reply without reuse (greedy, float32).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import make_client
from test_fast_path_batch import slot_client

from core.accel.cuda import fast_path

pytest.importorskip("torch")

SYSTEM = {"role": "system", "content": "You are a terse assistant. " * 12}
GREEDY = {"temperature": 0, "max_tokens": 12}


def turns(client: Any, opening: str, count: int = 4) -> list[dict]:
    """``count`` turns of one chat: each prompt is the last one, its reply and a new question."""
    messages = [SYSTEM, {"role": "user", "content": opening}]
    replies = []
    for i in range(count):
        reply = client.create(messages, **GREEDY)
        replies.append(reply)
        text = reply["choices"][0]["message"]["content"] or ""
        messages = [
            *messages,
            {"role": "assistant", "content": text},
            {"role": "user", "content": f"and then {i}?"},
        ]
    return replies


def outcome(reply: dict) -> tuple:
    return reply["choices"][0]["message"], reply["choices"][0]["finish_reason"], reply["usage"]


@pytest.fixture(scope="module")
def no_reuse(request: pytest.FixtureRequest) -> Any:
    """``get(backend, path_fixture)``: a client of that backend and checkpoint that keeps no
    prompts (made once per module, closed at its end)."""
    made: dict[tuple[str, str], Any] = {}

    def get(backend: str, path: str) -> Any:
        if (backend, path) not in made:
            checkpoint = request.getfixturevalue(path)
            made[backend, path] = make_client(backend, checkpoint, prompt_cache_tokens=0)
        return made[backend, path]

    yield get
    for client in made.values():
        client.close()


ENGINES = ["dynamic-cache", "fast-path", "fast-path-compiled", "mlx"]
GEMMA4 = ["dynamic-cache", "fast-path", "mlx"]


@pytest.fixture(scope="module", params=[*ENGINES, *(f"{engine}-gemma4" for engine in GEMMA4)])
def pair(request: pytest.FixtureRequest) -> Any:
    """(a client that reuses prompts, the same backend without reuse); ``fast-path-compiled``:
    the new tokens run through the engine's compiled layer (dynamo, the eager backend);
    ``-gemma4``: Gemma 4 (per-layer embeddings, KV-shared layers, a sliding window; the fast
    path runs the model's own text model), whose generation prompt ends with an empty
    thought channel that the next turn does not repeat: the prompt is kept without it."""
    gemma4 = request.param.endswith("-gemma4")
    engine = request.param.removesuffix("-gemma4")
    path_name = "gemma4_path" if gemma4 else "gemma3_path"
    path = request.getfixturevalue(path_name)
    if engine == "fast-path":
        client = slot_client(path, "cpu")
    elif engine == "fast-path-compiled":
        client = slot_client(path, "cpu", compile="eager")
        built = fast_path._engine(client.model, compile=None, cuda_graphs=None)
        assert built.extend_layer is not fast_path._extend_layer
    else:
        client = make_client("mlx" if engine == "mlx" else "transformers", path)
    plain = request.getfixturevalue("no_reuse")
    yield client, plain("mlx" if engine == "mlx" else "transformers", path_name)
    client.close()


def test_later_turns_reuse_the_earlier_prompt_and_answer_the_same(pair: Any) -> None:
    reuse, no_reuse = pair
    before = reuse.prompt_cache.hits
    got = turns(reuse, "Tell me about tides.")
    expected = turns(no_reuse, "Tell me about tides.")
    assert [outcome(r) for r in got] == [outcome(r) for r in expected]
    assert reuse.prompt_cache.hits - before >= 3  # turns 2, 3 and 4 started from turn 1..3
    info = fast_path.describe(reuse.model)
    assert not info.get("fallbacks"), info
    assert no_reuse.prompt_cache.hits == 0 and len(no_reuse.prompt_cache) == 0


def test_concurrent_conversations_reuse_their_own_prefixes(pair: Any) -> None:
    reuse, no_reuse = pair
    openings = ["Waves?", "Why is the sea salty?", "Name a fish.", "What is a reef?"]
    expected = [turns(no_reuse, o, 3) for o in openings]
    with ThreadPoolExecutor(len(openings)) as pool:
        got = list(pool.map(lambda o: turns(reuse, o, 3), openings))
    for a, b in zip(expected, got, strict=True):
        assert [outcome(r) for r in b] == [outcome(r) for r in a]


def test_close_and_clear_cache_drop_the_stored_prompts(gemma3_path: Path) -> None:
    client = make_client("transformers", gemma3_path, prompt_cache_tokens=4096)
    try:
        turns(client, "Hi there", 2)
        assert len(client.prompt_cache) >= 1 and client.prompt_cache.hits >= 1
        client.clear_cache()
        assert len(client.prompt_cache) == 0
        turns(client, "Hi there", 1)
        assert len(client.prompt_cache) == 1
    finally:
        client.close()
    assert len(client.prompt_cache) == 0


def test_the_budget_bounds_what_is_kept(gemma3_path: Path) -> None:
    client = make_client("transformers", gemma3_path, prompt_cache_tokens=400)
    try:
        for opening in ("one", "two", "three", "four", "five"):
            turns(client, opening, 1)
            assert client.prompt_cache.tokens <= 400
    finally:
        client.close()


@pytest.mark.parametrize("value", [-1, 1.5, "lots", True])
def test_a_bad_budget_is_refused_before_loading(gemma3_path: Path, value: Any) -> None:
    with pytest.raises(ValueError, match="prompt_cache_tokens must be an integer >= 0"):
        make_client("transformers", gemma3_path, prompt_cache_tokens=value)
