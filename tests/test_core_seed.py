"""``seed=`` samples with a generator of the request's own and leaves the process's RNGs alone.

Seeding must neither read nor change Python's ``random``, numpy's or torch's
global state (transformers' ``set_seed`` resets all three) nor MLX's global
key: a caller's own random sequence is the same with or without seeded
requests in between, and a seeded reply is the same whatever the global state.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_core_support import USER, content

SAMPLED = {"temperature": 1.0, "max_tokens": 12}


def global_states(client) -> list:
    """numpy's and torch's state, and for MLX the global key of the MLX thread.

    MLX keeps its global key per thread; every MLX request runs on the one MLX
    thread, so that is where a global seed would land.
    """
    states = [np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()]
    if client.implementation == "mlx":
        import mlx.core as mx

        states.append(client._worker.call(lambda: np.array(mx.random.state[0]).tolist()))
    return states


def reseed_globals(client, seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if client.implementation == "mlx":
        import mlx.core as mx

        client._worker.call(lambda: mx.random.seed(seed))


def test_seeded_requests_leave_the_global_random_state_alone(client) -> None:
    client.load()
    random.seed(1234)
    expected = [random.random() for _ in range(3)]
    random.seed(1234)
    got = [random.random()]
    before = global_states(client)
    client.create(USER, seed=5, **SAMPLED)
    list(client.create(USER, seed=5, stream=True, **SAMPLED))
    client.create_batch([USER, USER], seed=5, **SAMPLED)
    assert global_states(client) == before
    got += [random.random() for _ in range(2)]
    assert got == expected


def test_a_seeded_reply_does_not_depend_on_the_global_random_state(client) -> None:
    replies = set()
    for global_seed in (1, 2):
        reseed_globals(client, global_seed)
        replies.add(content(client.create(USER, seed=9, **SAMPLED)))
    assert len(replies) == 1


def test_seeds_are_reproducible_and_different_seeds_differ(client) -> None:
    first = {s: content(client.create(USER, seed=s, **SAMPLED)) for s in range(4)}
    client.create(USER, **SAMPLED)  # unseeded sampling in between
    assert {s: content(client.create(USER, seed=s, **SAMPLED)) for s in range(4)} == first
    assert len(set(first.values())) >= 3


def test_a_seeded_batch_is_reproducible(client) -> None:
    prompts = [USER, [{"role": "user", "content": "Name a colour."}]]
    runs = [client.create_batch(prompts, seed=3, **SAMPLED) for _ in range(2)]
    assert [content(r) for r in runs[0]] == [content(r) for r in runs[1]]


def test_seeded_sampling_under_a_grammar_obeys_it(client) -> None:
    """The grammar mask runs before the seeded draw, so every drawn token is allowed."""
    options = {"temperature": 1.0, "max_tokens": 60, "response_format": {"type": "json_object"}}
    outs = [client.create(USER, seed=4, **options) for _ in range(2)]
    assert content(outs[0]) == content(outs[1])
    for seed in (4, 5, 6):
        out = client.create(USER, seed=seed, **options)
        if out["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(content(out)), dict)
        else:  # cut off by max_tokens: still a prefix of a JSON object
            assert content(out).lstrip().startswith("{")


@pytest.mark.parametrize("options", [{"top_k": 3}, {"top_p": 0.5}, {"temperature": 0.3}])
def test_seeded_truncation_options_are_reproducible(client, options) -> None:
    merged = {**SAMPLED, **options, "seed": 21}
    assert content(client.create(USER, **merged)) == content(client.create(USER, **merged))
