"""MLX on a CPU device with the matrix products on numpy's BLAS (core.accel.mlx_blas).

The products of a float32 model's plain ``nn.Linear`` layers and its tied output
layer are numpy's; the logits stay MLX's own to float32 rounding, replies through
the client are the same, a weight the model replaces between calls is read anew,
and it stays off where it does not apply (``cpu_streams`` given, the switch off,
bfloat16 weights).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_client

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from core.accel import mlx_blas  # noqa: E402

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.DeviceType.cpu, reason="the BLAS products are for CPU devices"
)

USER = [{"role": "user", "content": "Write a short poem about the sea."}]
GREEDY = {"temperature": 0, "max_tokens": 16}


def blas_modules(model: object) -> int:
    return sum(type(m).__name__ in ("BlasLinear", "BlasEmbedding") for m in model.modules())


@pytest.fixture(scope="module")
def pair(gemma3_path: Path):
    """(a client on numpy's BLAS, the same checkpoint on MLX's own kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GEMMA_LOCAL_MLX_BLAS", "0")
        own = make_client("mlx", gemma3_path)
        own.load()
    blas = make_client("mlx", gemma3_path)
    blas.load()
    yield blas, own
    blas.close()
    own.close()


def test_the_products_run_on_blas_and_give_mlxs_logits(pair) -> None:
    blas, own = pair
    assert blas._blas and not own._blas
    # 7 projections a layer + the tied output layer (the embedding's lookup stays MLX's)
    layers = len(blas.model.model.layers)
    assert blas_modules(blas.model) == layers * 7 + 1 and blas_modules(own.model) == 0
    import numpy as np

    ids = [[2, 105, 50, 60, 70, 80, 90, 106]]

    def logits(client: object) -> object:  # on the client's MLX thread (its streams)
        return client._worker.call(lambda: np.array(client.model(mx.array(ids))))

    got, expected = logits(blas), logits(own)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_replies_equal_mlxs_own_kernels(pair) -> None:
    blas, own = pair
    conversations = [USER, [{"role": "user", "content": "Hello! How are you?"}]]
    for conversation in conversations:
        a = blas.create(conversation, **GREEDY)["choices"][0]["message"]
        b = own.create(conversation, **GREEDY)["choices"][0]["message"]
        assert a == b
    batch = blas.create_batch(conversations, **GREEDY)
    alone = [blas.create(c, **GREEDY) for c in conversations]
    assert [r["choices"] for r in batch] == [r["choices"] for r in alone]


def test_a_replaced_weight_is_read_at_the_next_call() -> None:
    """mlx-lm's Gemma 3n replaces its AltUp coefficient weights on every forward pass: the
    product reads the weight the module holds at each call."""
    import mlx.core as mx

    with mx.stream(mx.new_stream(mx.cpu)):  # MLX streams are the thread's own
        holder = nn.Sequential(nn.Linear(8, 4, bias=True))
        mx.eval(holder.parameters())
        assert mlx_blas._patch(holder) == 1
        layer = holder.layers[0]
        assert type(layer).__name__ == "BlasLinear"
        x = mx.ones((2, 8))
        assert mx.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-5).item()
        layer.weight = mx.zeros((4, 8))
        assert mx.array_equal(layer(x), mx.broadcast_to(layer.bias, (2, 4))).item()


def test_a_prompts_output_products_stay_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The output layer over a prompt's positions (whose logits mlx-lm discards but the
    last) is MLX's lazy product, computed only if used; one position a row (decode steps,
    a batch's rows) is numpy's."""
    import mlx.core as mx

    calls: list[object] = []
    product = mlx_blas._product
    monkeypatch.setattr(mlx_blas, "_product", lambda x, w: calls.append(x) or product(x, w))
    with mx.stream(mx.new_stream(mx.cpu)):
        holder = nn.Sequential(nn.Embedding(32, 8))
        mx.eval(holder.parameters())
        assert mlx_blas._patch(holder) == 1
        embedding = holder.layers[0]
        x = mx.random.normal((3, 5, 8))
        expected = x @ embedding.weight.T
        assert mx.allclose(embedding.as_linear(x), expected, atol=1e-5).item()
        assert not calls  # the prompt's positions: MLX's lazy product
        step = embedding.as_linear(x[:, -1:])  # one position a row: numpy's
        assert len(calls) == 1
        assert mx.allclose(step, expected[:, -1:], atol=1e-5).item()
        assert mx.array_equal(embedding(mx.array([3])), embedding.weight[3:4]).item()
        with mlx_blas.logit_rows(5):  # a checked draft's positions: numpy's too
            assert mx.allclose(embedding.as_linear(x), expected, atol=1e-5).item()
            assert len(calls) == 2
            embedding.as_linear(mx.random.normal((1, 6, 8)))  # longer: MLX's lazy product
            assert len(calls) == 2
        embedding.as_linear(x)
        assert len(calls) == 2  # the context ended


def test_off_where_it_does_not_apply(gemma3_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    streams = make_client("mlx", gemma3_path, cpu_streams=2)  # MLX's own kernels, split
    try:
        streams.load()
        assert not streams._blas and blas_modules(streams.model) == 0
    finally:
        streams.close()
    with mx.stream(mx.new_stream(mx.cpu)):
        bf16 = nn.Sequential(nn.Linear(8, 4))
        bf16.set_dtype(mx.bfloat16)
        assert mlx_blas._patch(bf16) == 0  # numpy has no bfloat16
    monkeypatch.setenv("GEMMA_LOCAL_MLX_BLAS", "0")
    assert not mlx_blas.enabled()
    monkeypatch.setenv("GEMMA_LOCAL_MLX_BLAS", "1")
    assert mlx_blas.enabled()
