"""MLX on a CPU device: the matrix products through numpy's BLAS.

``mlx[cpu]`` on Linux multiplies matrices with kernels of its own whose cost
grows with the rows: on the 2-core VM this project is measured on, the real
Gemma 3 270M's output layer (262,144 x 640, float32) takes 81 ms for one row,
324 ms for 4 and 1,287 ms for 16, where numpy's BLAS (OpenBLAS in numpy's
wheels; Accelerate on macOS) takes 16, 53 and 61 ms. So a lone request
decodes at a fifth of the memory's speed and a batch of 16 gains nothing.

:func:`use_blas` gives a loaded mlx-lm model's plain float32 ``nn.Linear``
layers, and its tied output layer (``embed_tokens.as_linear``), products by numpy
over a view of their weights (no copy, read at each call); everything else
(attention, norms, the caches, sampling) stays MLX's. The parameters keep their
names and arrays, so the model saves, loads and shares its weights (the
multimodal tower's language model, :mod:`core.mlx_media`) as before. Real
Gemma 3 270M, greedy, 32 tokens: 4.1 -> 18.0 tok/s, time to first token 3.4 ->
0.47 s, the same tokens.

It applies on a CPU device only (on Apple Silicon MLX runs on the GPU), to
float32 weights (numpy has no bfloat16) that are not quantized (the output layer
over a prompt's positions, whose logits mlx-lm discards but the last, stays MLX's
lazy product: never computed when unused), and not where
the client was given ``cpu_streams`` (MLX's own kernels split over CPU streams,
:mod:`core.accel.mlx_split`); ``GEMMA_LOCAL_MLX_BLAS=0`` turns it off. Speculative
decoding reads the logits of a few positions at once: :func:`logit_rows` gives those
to numpy too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

_MARK = "_gemma_local_blas"
#: Per thread: the most positions whose logits a call wants (see :func:`logit_rows`).
_ROWS = threading.local()


@contextlib.contextmanager
def logit_rows(count: int) -> Iterator[None]:
    """Within it (this thread), output layers give calls of up to ``count`` positions their
    logits by numpy too: speculative decoding reads every position of a checked draft, which
    MLX's product would compute at a cost that grows with the rows. Longer calls (a prompt,
    whose logits mlx-lm discards but the last) keep MLX's lazy product."""
    before = getattr(_ROWS, "count", 1)
    _ROWS.count = count
    try:
        yield
    finally:
        _ROWS.count = before


def enabled() -> bool:
    """``GEMMA_LOCAL_MLX_BLAS`` (default on): ``0`` / ``off`` / ``false`` turn it off."""
    value = os.environ.get("GEMMA_LOCAL_MLX_BLAS", "").strip().lower()
    return value not in ("0", "off", "false")


def use_blas(model: Any) -> bool:
    """Put ``model``'s float32 products on numpy's BLAS (see the module); whether any were.

    Runs on the MLX thread that loaded ``model``, once.
    """
    import mlx.core as mx

    if not enabled() or mx.default_device().type != mx.DeviceType.cpu:
        return False
    if getattr(model, _MARK, False):
        return True
    count = _patch(model)
    setattr(model, _MARK, count > 0)
    return count > 0


def _patch(module: Any) -> int:
    """Swap each plain float32 ``nn.Linear`` under ``module`` (and each tied output
    embedding) for its BLAS form; returns how many were swapped."""
    import mlx.core as mx
    import mlx.nn as nn

    def swapped(child: Any) -> Any:
        """``child``'s BLAS form, or None."""
        if type(child) is nn.Linear and child.weight.dtype == mx.float32:
            return _blas_linear(child)
        if type(child) is nn.Embedding and child.weight.dtype == mx.float32:
            # the tied output layer (``embed_tokens.as_linear``); the lookup stays MLX's
            return _blas_embedding(child)
        return None

    count = 0
    for name, child in list(module.children().items()):
        items = list(enumerate(child)) if isinstance(child, list) else [(None, child)]
        for index, item in items:
            if not isinstance(item, nn.Module):
                continue
            new = swapped(item)
            if new is None:
                count += _patch(item)
                continue
            if index is None:
                setattr(module, name, new)
            else:  # children() gives copies of the lists: change the module's own
                module[name][index] = new
            count += 1
    return count


def _host(x: Any) -> Any:
    """``x`` evaluated and seen as a numpy array (no copy for a contiguous CPU array)."""
    import mlx.core as mx
    import numpy as np

    mx.eval(x)
    return np.asarray(x)


def _product(x: Any, weight: Any) -> Any:
    """``x @ weight.T`` by numpy. The weight is read at each call (a view: no copy), as a
    model may replace it between calls (mlx-lm's Gemma 3n clips its AltUp coefficients on
    every forward pass)."""
    import mlx.core as mx

    host = _host(x)
    y = host.reshape(-1, host.shape[-1]) @ _host(weight).T
    return mx.array(y).reshape(*x.shape[:-1], int(weight.shape[0]))


def _make_classes() -> tuple[type, type]:
    import mlx.nn as nn

    class BlasLinear(nn.Module):
        """``nn.Linear`` whose product is numpy's (the same ``weight`` / ``bias``)."""

        def __init__(self, linear: Any) -> None:
            super().__init__()
            self.weight = linear.weight
            if "bias" in linear:
                self.bias = linear.bias

        def __call__(self, x: Any) -> Any:
            y = _product(x, self.weight)
            return y + self.bias if "bias" in self else y

    class BlasEmbedding(nn.Module):
        """``nn.Embedding`` whose ``as_linear`` (a tied output layer) is numpy's."""

        def __init__(self, embedding: Any) -> None:
            super().__init__()
            self.weight = embedding.weight

        def __call__(self, x: Any) -> Any:
            return self.weight[x]

        def as_linear(self, x: Any) -> Any:
            if x.ndim > 2 and x.shape[-2] > getattr(_ROWS, "count", 1):
                # a prompt's positions (mlx-lm discards their logits but the last): MLX's
                # lazy product, never computed when unused; numpy would compute them all
                return x @ self.weight.T
            return _product(x, self.weight)

    return BlasLinear, BlasEmbedding


def _blas_linear(linear: Any) -> Any:
    return _classes()[0](linear)


def _blas_embedding(embedding: Any) -> Any:
    return _classes()[1](embedding)


@functools.cache
def _classes() -> tuple[type, type]:
    """The two module classes, made on first use (mlx is imported lazily)."""
    return _make_classes()
