"""The MLX CPU split step: one batch's decode spread over several MLX CPU streams.

MLX runs each CPU stream's work on one core, so a batch on one stream leaves
the other cores idle. :class:`~core.mlx_backend.GemmaMLXChatCompletion`
prefills each row on one of several CPU streams (:func:`_cpu_streams`, one per
core by default: :func:`usable_cores`) and then decodes a Gemma 3 batch in one
``BatchGenerator`` whose model step is :func:`split_decode`'s
:class:`_SplitDecode`: each stream computes a share of every matmul's output
features and of the attention heads, giving mlx-lm's own logits bit for bit.
Where the step does not apply (other models, quantized Gemma 3)
:func:`split_decode` returns ``None`` and the backend decodes each stream's rows
in a generator of its own.

Reached through :mod:`core.accel`. Imports no mlx at import: every function
that needs it imports it when called, on the MLX thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


#: MLX CPU streams for split batches, made on the MLX thread when first needed and
#: then reused: each MLX stream has a scheduler thread of its own that lives as long
#: as the process, so a new one per request would pile them up.
_CPU_STREAMS: list[Any] = []


def _cpu_streams(count: int) -> list[Any]:
    import mlx.core as mx

    while len(_CPU_STREAMS) < count:
        _CPU_STREAMS.append(mx.new_stream(mx.cpu))
    return _CPU_STREAMS[:count]


class _Tokens:
    """Stands for the hidden states where mlx-lm's mask helper reads only their shape."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _on(stream: Any) -> Any:
    """``mx.stream(stream)``, or the current default stream for ``None``."""
    import mlx.core as mx

    return contextlib.nullcontext() if stream is None else mx.stream(stream)


def _attention(queries: Any, keys: Any, values: Any, mask: Any) -> Any:
    """mlx-lm's CPU attention for one new token, the query heads of a key/value head grouped.

    The CPU fallback of ``mx.fast.scaled_dot_product_attention`` (queries
    already scaled), except that the query heads sharing a key/value head are
    the rows of one matmul, where the fallback runs one matrix-vector product
    per query head: every score is the same dot product, every output the
    same sum. Returns ``(rows, heads * head_dim)``.
    """
    import mlx.core as mx

    B, n_heads, _, head_dim = queries.shape
    n_kv_heads = keys.shape[1]
    queries = queries.reshape(B, n_kv_heads, n_heads // n_kv_heads, head_dim)
    scores = queries @ keys.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    scores = mx.softmax(scores, axis=-1, precise=True)
    return (scores @ values).reshape(B, -1)


def _head_shares(n_heads: int, n_kv: int, count: int) -> list[tuple[int, ...]]:
    """How ``count`` streams share the attention heads: one tuple per stream that attends.

    Each tuple holds three ranges as ``(start, stop)`` pairs: the query heads
    the stream attends with, the key/value heads it computes, and those it
    reads. The query heads split evenly when ``count`` divides them and each
    share reads whole key/value groups or part of one group; each key/value
    head is computed by the stream that reads it, or all by the first stream
    when two streams read one. Otherwise one share, all on the first stream.
    """
    rep = n_heads // n_kv
    if count > 1 and n_heads % count == 0:
        per = n_heads // count
        reads = []
        for j in range(count):
            q0, q1 = j * per, (j + 1) * per
            r0, r1 = q0 // rep, (q1 - 1) // rep + 1
            if r1 - r0 != 1 and (q0 % rep or q1 % rep):
                break
            reads.append((q0, q1, r0, r1))
        else:
            if n_kv % count == 0:  # whole groups: each key/value head read by one stream
                return [(q0, q1, r0, r1, r0, r1) for q0, q1, r0, r1 in reads]
            return [
                (q0, q1, 0 if j == 0 else n_kv, n_kv, r0, r1)
                for j, (q0, q1, r0, r1) in enumerate(reads)
            ]
    return [(0, n_heads, 0, n_kv, 0, n_kv)]


def _row_views(weight: Any, cuts: Sequence[int]) -> list[Any]:
    """Transposed views of ``weight[a:b]`` for consecutive ``cuts`` (``None`` where empty)."""
    return [weight[a:b].T if b > a else None for a, b in pairwise(cuts)]


def _even_cuts(rows: int, count: int) -> list[int]:
    """``count`` near-equal shares of ``rows``, cut at multiples of 16 (the GEMM's block)."""
    return [min(rows, round(rows * j / count / 16) * 16) for j in range(count)] + [rows]


class _SplitDecode:
    """Gemma 3's one-token batch step spread over MLX CPU streams, with the same results.

    MLX runs each CPU stream on one core with a generic bf16 GEMM whose cost
    per call is largely converting the weight's blocks, so one matmul of 8
    rows costs far less than two of 4. Instead of giving each stream half the
    rows (and each the whole model), this step keeps the batch whole and gives
    each stream a share of every matmul's output features (a view of the
    weight's rows): every output is the same dot product, computed once, with
    twice the rows per call. Each stream also takes a share of the attention
    heads (queries, their key/value heads, norms, RoPE, attention) where the
    heads split evenly. Each stream computes the (small) norms and residuals
    itself, on its own copy of the hidden states, so the streams only wait
    for each other's matmul shares; the cache update runs on the first
    stream, whose ``BatchGenerator`` steps this model. One stream is the same
    step unsplit.

    What mlx-lm's ``Model.__call__`` computes for one new token per row, op
    for op in the same dtypes (so the same bits), in fewer, larger CPU
    operations: ``mx.compile`` fuses the elementwise chains (norms, RoPE,
    GELU, residuals) between the matmuls, hidden states stay ``(rows,
    hidden)``, and attention multiplies the query heads of each key/value head
    in one matmul (:func:`_attention`). Each layer's cache update and
    attention, whose shapes grow every step, stay uncompiled. Anything else (a
    prompt of several tokens, caches without per-row offsets, quantized
    caches) goes to the model unchanged. Made per set of streams: a compiled
    function keeps the stream it was traced on.
    """

    def __init__(self, model: Any, text: Any, streams: Sequence[Any]) -> None:
        import mlx.core as mx

        self.model = model
        self._text = text
        inner = text.model
        self._layers = inner.layers
        self._pattern = inner.sliding_window_pattern
        self._window = inner.window_size
        self._streams = list(streams)
        attn = self._layers[0].self_attn
        self._heads = _head_shares(attn.n_heads, attn.n_kv_heads, len(self._streams))
        q_cuts = [0] + [share[1] * attn.head_dim for share in self._heads]
        kv_cuts = [0] + [share[3] * attn.head_dim for share in self._heads]
        # Each stream's rows of each weight, as transposed views (no copies).
        self._parts: dict[int, list[Any]] = {}
        for layer in self._layers:
            attn, mlp = layer.self_attn, layer.mlp
            self._parts[id(attn.q_proj)] = _row_views(attn.q_proj.weight, q_cuts)
            self._parts[id(attn.k_proj)] = _row_views(attn.k_proj.weight, kv_cuts)
            self._parts[id(attn.v_proj)] = _row_views(attn.v_proj.weight, kv_cuts)
            for module in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                cuts = _even_cuts(module.weight.shape[0], len(self._streams))
                self._parts[id(module)] = _row_views(module.weight, cuts)
        head = inner.embed_tokens if text.tie_word_embeddings else text.lm_head
        self._head = _row_views(head.weight, _even_cuts(head.weight.shape[0], len(self._streams)))
        mx.eval([v for views in self._parts.values() for v in views if v is not None], self._head)
        # One of each compiled piece per stream (each stream keeps its own copy of
        # the hidden states, so that it never waits for the norms of another).
        count = len(self._streams)
        self._first = [mx.compile(self._first_step) for _ in range(count)]
        self._qkv = [
            [mx.compile(self._qkv_step(layer, share)) for layer in self._layers]
            for share in self._heads
        ]
        self._gelu = [mx.compile(self._gelu_step) for _ in range(count)]
        self._middle = [
            [mx.compile(self._middle_step(layer)) for layer in self._layers] for _ in range(count)
        ]
        self._out = [
            [mx.compile(self._out_step(i)) for i in range(len(self._layers))] for _ in range(count)
        ]

    def __getattr__(self, name: str) -> Any:  # make_cache, layers, ... of the model
        if name == "model":  # not set yet
            raise AttributeError(name)
        return getattr(self.model, name)

    # ------------------------------------------------------------ compiled pieces

    def _first_step(self, inputs: Any) -> tuple[Any, Any]:
        import mlx.core as mx

        inner = self._text.model
        h = inner.embed_tokens(inputs.reshape(-1))
        h = h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
        return h, self._layers[0].input_layernorm(h)

    @staticmethod
    def _qkv_step(layer: Any, share: tuple[int, ...]) -> Callable[..., tuple[Any, ...]]:
        import mlx.core as mx

        attn = layer.self_attn

        def step(offset: Any, queries: Any, *keys_values: Any) -> tuple[Any, ...]:
            B = queries.shape[0]
            queries = queries.reshape(B, share[1] - share[0], 1, attn.head_dim)
            queries = attn.rope(attn.q_norm(queries), offset=offset)
            queries = mx.array(attn.scale, queries.dtype) * queries  # the attention's first op
            if not keys_values:  # another stream computes the key/value heads
                return (queries,)
            keys, values = (
                x.reshape(B, share[3] - share[2], 1, attn.head_dim) for x in keys_values
            )
            return queries, attn.rope(attn.k_norm(keys), offset=offset), values

        return step

    @staticmethod
    def _gelu_step(gate: Any, up: Any) -> Any:
        import mlx.nn as nn

        return nn.gelu_approx(gate) * up

    @staticmethod
    def _middle_step(layer: Any) -> Callable[..., tuple[Any, Any]]:
        import mlx.core as mx
        from mlx_lm.models.gemma3_text import clip_residual

        def step(h: Any, *parts: Any) -> tuple[Any, Any]:
            out = parts[0] if len(parts) == 1 else mx.concatenate(parts, -1)
            h = clip_residual(h, layer.post_attention_layernorm(out))
            return h, layer.pre_feedforward_layernorm(h)

        return step

    def _out_step(self, i: int) -> Callable[..., tuple[Any, Any]]:
        import mlx.core as mx
        from mlx_lm.models.gemma3_text import clip_residual

        layer = self._layers[i]
        last = i + 1 == len(self._layers)
        norm = self._text.model.norm if last else self._layers[i + 1].input_layernorm

        def step(h: Any, *parts: Any) -> tuple[Any, Any]:
            out = parts[0] if len(parts) == 1 else mx.concatenate(parts, -1)
            h = clip_residual(h, layer.post_feedforward_layernorm(out))
            return h, norm(h)

        return step

    # ------------------------------------------------------------------- the step

    def __call__(self, inputs: Any, cache: Any = None, input_embeddings: Any = None) -> Any:
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        def unchanged() -> Any:
            return self.model(inputs, cache=cache, input_embeddings=input_embeddings)

        if (
            cache is None
            or input_embeddings is not None
            or inputs.ndim != 2
            or inputs.shape[1] != 1
            or not all(isinstance(getattr(c, "offset", None), mx.array) for c in cache)
            or any(hasattr(c, "bits") for c in cache)  # quantized: mlx-lm's own attention
        ):
            return unchanged()
        streams, first = self._streams, self._streams[0]
        tokens = _Tokens(inputs.shape)  # the masks read only the token count
        with _on(first):
            masks = [create_attention_mask(tokens, cache[self._pattern - 1])]
            if self._pattern > 1:
                masks.append(create_attention_mask(tokens, cache[0], window_size=self._window))
        if not all(m is None or (isinstance(m, mx.array) and m.dtype == mx.bool_) for m in masks):
            return unchanged()
        hidden, normed = [], []
        for j, stream in enumerate(streams):
            with _on(stream):
                h, n = self._first[j](inputs)
                hidden.append(h)
                normed.append(n)
        for i, layer in enumerate(self._layers):
            attn, mlp = layer.self_attn, layer.mlp
            heads = []
            for j in range(len(self._heads)):
                with _on(streams[j]):
                    q, k, v = (
                        self._parts[id(m)][j] for m in (attn.q_proj, attn.k_proj, attn.v_proj)
                    )
                    x = normed[j]
                    kv = () if k is None else (x @ k, x @ v)
                    heads.append(self._qkv[j][i](cache[i].offset, x @ q, *kv))
            with _on(first):
                # The new keys and values, from the streams that computed them.
                new = [part[1:] for part in heads if len(part) == 3]
                keys = new[0][0] if len(new) == 1 else mx.concatenate([k for k, _ in new], 1)
                values = new[0][1] if len(new) == 1 else mx.concatenate([v for _, v in new], 1)
                keys, values = cache[i].update_and_fetch(keys, values)
            mask = masks[0 if i % self._pattern == self._pattern - 1 else -1]
            attended = []
            for j, share in enumerate(self._heads):
                with _on(streams[j]):
                    lo, hi = share[4], share[5]
                    attended.append(_attention(heads[j][0], keys[:, lo:hi], values[:, lo:hi], mask))
            parts = self._split_matmul(attn.o_proj, attended)
            gated = []
            for j, stream in enumerate(streams):
                with _on(stream):
                    hidden[j], x = self._middle[j][i](hidden[j], *parts)
                    gate, up = self._parts[id(mlp.gate_proj)][j], self._parts[id(mlp.up_proj)][j]
                    gated.append(self._gelu[j](x @ gate, x @ up))
            parts = self._split_matmul(mlp.down_proj, gated)
            for j, stream in enumerate(streams):
                with _on(stream):
                    hidden[j], normed[j] = self._out[j][i](hidden[j], *parts)
        logits = []
        for j, stream in enumerate(streams):
            with _on(stream):
                logits.append(normed[j] @ self._head[j])
        with _on(first):
            return (logits[0] if len(logits) == 1 else mx.concatenate(logits, -1))[:, None, :]

    def _split_matmul(self, module: Any, inputs: list[Any]) -> list[Any]:
        """Each stream's share of ``concatenate(inputs) @ module.weight.T``."""
        import mlx.core as mx

        outs = []
        for j, stream in enumerate(self._streams):
            with _on(stream):
                x = inputs[0] if len(inputs) == 1 else mx.concatenate(inputs, -1)
                outs.append(x @ self._parts[id(module)][j])
        return outs


def split_decode(model: Any, streams: Sequence[Any]) -> Any:
    """A batch step over ``streams`` (:class:`_SplitDecode`), or ``None`` where it does not apply.

    It applies to Gemma 3 whose projections are plain ``nn.Linear`` layers
    without bias (not quantized) and whose output layer is such a layer or the
    tied embedding.
    """
    import mlx.nn as nn
    from mlx_lm.models import gemma3_text

    text = getattr(model, "language_model", model)
    if not isinstance(text, gemma3_text.Model):
        return None
    head = text.model.embed_tokens if text.tie_word_embeddings else text.lm_head
    modules = [head] + [
        m
        for layer in text.model.layers
        for m in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        )
    ]
    if not all(type(m) is nn.Linear and "bias" not in m for m in modules[1:]):
        return None
    if type(head) not in (nn.Linear, nn.Embedding) or "bias" in head:
        return None
    return _SplitDecode(model, text, streams)
