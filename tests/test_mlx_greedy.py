"""MLX batches on a CPU device: greedy steps without ``logsumexp``, joining rows' first
tokens in one pass (core.accel.mlx_greedy, core.mlx_batch).

mlx-lm's ``BatchGenerator`` normalises every step's logits over the vocabulary
before sampling, which ``mlx[cpu]`` computes with a scalar exponential (a
quarter of a 16-row step of the real 270M). While every row is greedy the step
takes the argmax of the logits instead: the same tokens as mlx-lm's step, and
mlx-lm's own step as soon as one row samples. Rows that join the running batch
together run their last prompt token as one batch (their caches merged as
``BatchGenerator`` merges them, then taken back out): replies equal one-by-one
calls, also past the sliding window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_client
from test_core_mlx_batch import small_gemma3
from test_core_support import PROMPTS

mx = pytest.importorskip("mlx.core")

from core import mlx_batch  # noqa: E402
from core.accel import mlx_greedy  # noqa: E402

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.DeviceType.cpu, reason="the greedy step is for CPU devices"
)

GREEDY = {"temperature": 0, "max_tokens": 12}
#: Longer than the tiny Gemma 3's 512-token sliding window: its rotating cache wraps.
LONG = [{"role": "user", "content": " ".join(f"word{i}" for i in range(300))}]
PROMPT_IDS = [[2, 5, 9, 14, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4], [2, 40, 41]]


def tiny_model():
    """A random float32 Gemma 3 (mlx-lm's own) with a short sliding window."""
    return small_gemma3(4, 2, dtype=mx.float32)


def run(model, greedy_steps: bool, samplers=None, seed: int = 0) -> tuple[list, list]:
    """Every row's tokens and the logsumexp of its logprobs at each step, from a fresh
    generator."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, stop_tokens=None, completion_batch_size=4)
    if greedy_steps:
        assert mlx_greedy.skip_normalising(generator)
        assert type(generator._generation_batch).__name__ == "GreedyBatch"
    uids = generator.insert(PROMPT_IDS, [14, 9, 14], samplers=samplers)
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    norms: dict[int, list[float]] = {uid: [] for uid in uids}
    mx.random.seed(seed)
    while responses := generator.next_generated():
        for response in responses:
            tokens[response.uid].append(response.token)
            norms[response.uid].append(mx.logsumexp(response.logprobs).item())
    generator.close()
    return [tokens[uid] for uid in uids], [norms[uid] for uid in uids]


def test_greedy_steps_give_mlx_lms_tokens_without_normalising() -> None:
    with mx.stream(mx.new_stream(mx.cpu)):  # MLX streams are the thread's own
        model = tiny_model()
        ours, our_norms = run(model, True)
        theirs, their_norms = run(model, False)
    assert ours == theirs
    assert [len(t) for t in ours] == [14, 9, 14]  # a row leaving mid-way
    assert all(abs(n) < 1e-4 for row in their_norms for n in row)  # mlx-lm's: log-probabilities
    # ours: the logits, never normalised (but the first step's, mlx-lm's prompt batch)
    assert all(abs(n) > 1e-2 for row in our_norms for n in row[2:])


def test_a_sampled_row_takes_mlx_lms_own_step() -> None:
    from mlx_lm.sample_utils import make_sampler

    with mx.stream(mx.new_stream(mx.cpu)):
        model = tiny_model()
        samplers = [None, make_sampler(temp=1.0, top_p=0.9), None]
        ours, our_norms = run(model, True, samplers, seed=7)
        theirs, _ = run(model, False, samplers, seed=7)
    assert ours == theirs
    # normalised while the sampled row (the shortest) is in the batch, not after it left
    assert all(abs(n) < 1e-4 for row in our_norms for n in row[:9])
    assert all(abs(n) > 1e-2 for n in our_norms[0][11:])


def test_a_generator_it_was_not_written_for_is_left_alone() -> None:
    class Other:
        _generation_batch = object()

    assert not mlx_greedy.skip_normalising(Other())
    assert not mlx_greedy.skip_normalising(object())


def test_rows_joining_together_take_one_pass_and_answer_as_alone(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged: list[int] = []
    mergeable = mlx_batch._mergeable

    def spy(caches):
        ok = mergeable(caches)
        if ok:
            merged.append(len(caches))
        return ok

    monkeypatch.setattr(mlx_batch, "_mergeable", spy)
    client = make_client("mlx", gemma3_path)
    try:
        conversations = [*PROMPTS, LONG]
        singles = [client.create(m, **GREEDY) for m in conversations]
        batch = client.create_batch(conversations, **GREEDY)
        assert merged and max(merged) == len(conversations)
        assert [b["choices"] for b in batch] == [s["choices"] for s in singles]
        assert [b["usage"] for b in batch] == [s["usage"] for s in singles]
        assert batch[-1]["usage"]["prompt_tokens"] > 512  # past the sliding window
        # and the caches taken back out keep decoding: a second batch, a row leaving early
        again = client.create_batch(conversations, **{**GREEDY, "stop": ["\n"]})
        alone = [client.create(m, **{**GREEDY, "stop": ["\n"]}) for m in conversations]
        assert [b["choices"] for b in again] == [s["choices"] for s in alone]
    finally:
        client.close()
