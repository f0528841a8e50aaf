"""Apple MLX backend through mlx-lm (Metal on Apple Silicon, ``mlx[cpu]`` on Linux).

MLX streams are thread-local, so loading and every generation run on the
client's one model thread (see :mod:`core.worker`). The token primitive loops
over ``mlx_lm.generate.generate_step`` (what ``mlx_lm.stream_generate`` is
built on) with ``make_sampler`` / ``make_logits_processors`` and pushes each
token into the sink; stop strings, end ids and counts are the sink's work,
since mlx-lm has no stop strings. A seeded sampled request draws from a
chain of MLX keys of its own (:func:`make_request_sampler`), never from
``mx.random``'s global state. Constrained requests (tools, JSON output)
add one grammar logits processor per row
(:func:`~core.constrained.mlx_grammar_processor`), in ``generate_step`` and
per row in ``BatchGenerator``.

Batches run in mlx-lm's ``BatchGenerator``. On a CPU device a batch is spread
over several MLX CPU streams (``cpu_streams``): MLX runs each stream's work on
one core, so one stream leaves the other cores idle. Each row's prompt is
prefilled into its own cache, one row per stream per evaluation so that the
streams run side by side. A Gemma 3 batch then decodes in one
``BatchGenerator`` from those caches (mlx-lm's ``insert(caches=...)``) whose
model step, :class:`_SplitDecode`, gives each stream a share of every matmul's
output features and of the attention heads (and fuses the elementwise work
with ``mx.compile``): the same results bit for bit, with more rows per matmul
call than one generator per stream would give each. Other models (and
quantized Gemma 3) decode each stream's rows in a ``BatchGenerator`` of its
own.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Callable, Sequence
from itertools import pairwise, zip_longest
from pathlib import Path
from typing import Any

from .base import BaseGemmaChatCompletion, read_model_config
from .errors import MissingDependencyError, UnsupportedPlatformError, require
from .params import SamplingParams
from .stream import Prompt, TokenSink
from .worker import ModelWorker, shared_worker


def _import_mlx() -> Any:
    if sys.platform == "darwin" and platform.machine() != "arm64":
        raise UnsupportedPlatformError(
            "MLX needs Apple Silicon; on an Intel Mac use the transformers backend"
        )
    require("mlx", "mlx_lm", feature="The MLX backend")
    try:
        import mlx.core as mx
    except (ImportError, OSError) as exc:  # plain `mlx` on Linux ships no libmlx.so
        raise MissingDependencyError(
            f"MLX is installed but cannot load ({exc}). On Linux MLX runs on the CPU build: "
            'pip install "gemma-local[mlx]" (which installs mlx[cpu])'
        ) from exc
    return mx


#: Model types whose mlx-lm implementation cannot run a padded batch (see ``_batchable``).
UNBATCHABLE_MODEL_TYPES = frozenset({"gemma2"})


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


def quantization_from_config(config: dict[str, Any] | None) -> str | None:
    q = (config or {}).get("quantization") or (config or {}).get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    return f"mlx {q['bits']}-bit (group size {q.get('group_size', 64)})"


def make_request_sampler(params: SamplingParams) -> Callable[[Any], Any]:
    """mlx-lm's sampler for ``params``; a seeded sampled request gets a key chain of its own.

    Unseeded requests use ``make_sampler`` (``mx.random``'s global key). A
    seed starts a key of the request's own (``mx.random.key(seed)``) that is
    split at every step, and each step draws with its half; the filters are
    mlx-lm's, in ``make_sampler``'s order (top-p, then top-k), so the same
    tokens stay allowed. The global MLX random state is neither read nor
    changed.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p, categorical_sampling, make_sampler

    top_p = params.top_p if params.top_p < 1.0 else 0.0
    if params.greedy:
        return make_sampler(temp=0.0)

    def filtered(logprobs: Any) -> Any:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        # mlx-lm raises for a k >= the vocabulary, inside a compiled function whose
        # failure leaves mx.random's state unusable for every later request; such a
        # k keeps every token anyway.
        if 0 < params.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, params.top_k)
        return logprobs

    if params.seed is None:
        return lambda logprobs: categorical_sampling(filtered(logprobs), params.temperature)
    key = mx.random.key(params.seed)
    scale = 1.0 / params.temperature

    def sampler(logprobs: Any) -> Any:
        nonlocal key
        key, draw = mx.random.split(key)
        return mx.random.categorical(filtered(logprobs) * scale, key=draw)

    return sampler


class GemmaMLXChatCompletion(BaseGemmaChatCompletion):
    """Gemma through Apple MLX (mlx-lm).

    Args:
        model_name: an MLX checkpoint on the hub (e.g. the default 4-bit DWQ
            Gemma 3 12B), a Hugging Face checkpoint (converted on load) or a
            local folder, e.g. one written by ``mlx_lm.convert``, or a GGUF file
            (``path/to/model.gguf``, Gemma 2/3/4 from llama.cpp or Ollama). MLX
            cannot read GGUF: the first load converts it once (transformers
            dequantises it to float32) into a Hugging Face folder cached in
            ``$GEMMA_LOCAL_CACHE/gguf/`` (default ``~/.cache/gemma-local/gguf/``;
            see :mod:`core.gguf`), which later loads reuse. Converting needs
            ``gemma-local[gguf]``.
        trust_remote_code: passed to the tokenizer loader; Gemma needs none.
        adapter_path: optional LoRA adapters to apply.
        max_kv_size: cap the KV cache (rotating cache) for long generations.
        prefill_step_size: prompt tokens processed per step.
        cpu_streams: on a CPU device (``mlx[cpu]`` on Linux, or ``mx.cpu`` as
            the default device), how many MLX streams a batch is split across.
            MLX runs each stream on one core, so ``None`` (the default) uses
            one stream per core this process may use, at most one per row;
            ``1`` keeps a batch on one stream. Unused on the GPU, where one
            stream already fills the device.
    """

    implementation = "mlx"
    supports_constraints = True

    def __init__(
        self,
        model_name: str = "mlx-community/gemma-3-12b-it-4bit-DWQ",
        *,
        trust_remote_code: bool = False,
        adapter_path: str | None = None,
        max_kv_size: int | None = None,
        prefill_step_size: int = 2048,
        cpu_streams: int | None = None,
    ) -> None:
        super().__init__(model_name)
        from .gguf import check_model_path

        #: A local GGUF file, loaded through its converted folder (``None``: folder or hub id).
        self._gguf = check_model_path(model_name)
        if max_kv_size is not None and (not isinstance(max_kv_size, int) or max_kv_size < 1):
            raise ValueError(f"max_kv_size must be a positive integer or None, got {max_kv_size!r}")
        if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
            raise ValueError(
                f"prefill_step_size must be a positive integer, got {prefill_step_size!r}"
            )
        if cpu_streams is not None and (
            isinstance(cpu_streams, bool) or not isinstance(cpu_streams, int) or cpu_streams < 1
        ):
            raise ValueError(
                f"cpu_streams must be a positive integer or None (one per core), got {cpu_streams!r}"
            )
        self.trust_remote_code = trust_remote_code
        self.adapter_path = adapter_path
        self.max_kv_size = max_kv_size
        self.prefill_step_size = prefill_step_size
        self.cpu_streams = cpu_streams
        self._wrapper: Any = None
        self._config: dict[str, Any] | None = None
        #: The batch step for each set of CPU streams (see :meth:`_split_decoder`),
        #: kept across requests so that each is traced and compiled once.
        self._decoders: dict[tuple[Any, ...], Any] = {}

    def _new_worker(self) -> ModelWorker:
        """One MLX thread for the whole process, shared by every MLX client.

        MLX streams are thread-local, and MLX (0.32) aborts the process at
        exit ("terminate called without an active exception") when a thread
        that ran MLX work has ended before it. So every MLX model lives on the
        same thread, which is never stopped; requests to different MLX models
        queue on it (they share the one device anyway).
        """
        return shared_worker("gemma-local:mlx")

    def _load_model_and_tokenizer(self) -> None:
        _import_mlx()
        from mlx_lm import load

        path = self.model_name
        if self._gguf is not None:
            from .gguf import converted_folder

            path = str(converted_folder(self._gguf))
        model, wrapper, config = load(
            path,
            tokenizer_config={"trust_remote_code": self.trust_remote_code},
            adapter_path=self.adapter_path,
            return_config=True,
            trust_remote_code=self.trust_remote_code,
        )
        self.model = model
        self._wrapper = wrapper
        self.tokenizer = wrapper._tokenizer
        self._config = config
        text = config.get("text_config") or {}
        self._context_window = text.get("max_position_embeddings") or config.get(
            "max_position_embeddings"
        )

    def _eos_token_ids(self) -> set[int]:
        return {int(t) for t in getattr(self._wrapper, "eos_token_ids", ()) or ()}

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, wired_limit
        from mlx_lm.sample_utils import make_logits_processors

        params = params.in_float32()
        sampler = make_request_sampler(params)
        from .constrained import mlx_grammar_processor

        shared = make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
        )
        grammar = self._grammar_matchers(params, len(prompts))

        def processors(row: int) -> list[Any]:
            if grammar is None:
                return shared
            return [*shared, mlx_grammar_processor(grammar, row)]

        if len(prompts) > 1 and self._batchable():
            self._generate_batch(prompts, sampler, processors, sink)
            return
        with wired_limit(self.model):
            for index, prompt in enumerate(prompts):  # one prompt, or a model that cannot batch
                if sink.done:
                    return
                steps = generate_step(
                    mx.array(prompt.ids),
                    self.model,
                    max_tokens=sink.rows[index].max_tokens,
                    sampler=sampler,
                    logits_processors=processors(index),
                    max_kv_size=self.max_kv_size,
                    prefill_step_size=self.prefill_step_size,
                )
                try:
                    for token, _ in steps:
                        sink.push_row(index, token)
                        if sink.finished()[index]:
                            break
                finally:
                    steps.close()

    def _batchable(self) -> bool:
        """Whether mlx-lm can run this model on a padded batch.

        mlx-lm's Gemma 2 attention (soft-capped, grouped-query) adds the 4-D
        batch mask to 5-D scores and fails to reshape ("Cannot reshape
        array"), so Gemma 2 rows run one after another.
        """
        config = self._config or {}
        model_type = (config.get("text_config") or {}).get("model_type") or config.get("model_type")
        return model_type not in UNBATCHABLE_MODEL_TYPES

    def _stream_groups(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """The rows of a batch for each MLX stream: one group unless the device is the CPU.

        Rows are dealt out longest first, so each group gets a similar share of
        the prompt tokens and each prefill wave (see :meth:`_prefill_rows`)
        holds prompts of similar length.
        """
        import mlx.core as mx

        rows = list(range(len(prompts)))
        wanted = self.cpu_streams if self.cpu_streams is not None else usable_cores()
        count = min(wanted, len(rows))
        if (
            count < 2
            or mx.default_device().type != mx.DeviceType.cpu
            or any(len(p.ids) < 2 for p in prompts)
        ):
            return [rows]
        rows.sort(key=lambda i: -len(prompts[i].ids))
        return [rows[k::count] for k in range(count)]

    def _generate_batch(
        self,
        prompts: Sequence[Prompt],
        sampler: Any,
        processors: Callable[[int], list[Any]],
        sink: TokenSink,
    ) -> None:
        """Several prompts in batches of mlx-lm's ``BatchGenerator`` (per-row processors).

        On a CPU device the rows are prefilled on the CPU streams (see
        :meth:`_stream_groups` and :meth:`_prefill_rows`), then decode in one
        generator whose step spreads over all the streams (:meth:`_split_decoder`)
        or, where that step does not apply, in one generator per stream, stepped
        in turn so that each stream computes its next step while the tokens of
        the others are read. Elsewhere one generator on one stream.
        """
        from mlx_lm.generate import BatchGenerator

        groups = self._stream_groups(prompts)
        streams = _cpu_streams(len(groups)) if len(groups) > 1 else [None]
        caches = self._prefill_rows(prompts, groups, streams, sink) if len(groups) > 1 else None
        if sink.done:
            return
        decoder = self._split_decoder(streams)
        plan = (
            [(list(range(len(prompts))), streams[0], decoder)]  # one batch on all the streams
            if decoder is not None
            else [
                (group, stream, self.model) for group, stream in zip(groups, streams, strict=True)
            ]
        )
        generators: list[tuple[Any, dict[int, int]]] = []
        try:
            for group, stream, model in plan:
                generator = BatchGenerator(
                    model,
                    stop_tokens=[[t] for t in sorted(self._eos_ids)],
                    sampler=sampler,
                    completion_batch_size=len(group),
                    prefill_batch_size=len(group),
                    prefill_step_size=self.prefill_step_size,
                    max_kv_size=self.max_kv_size,
                    stream=stream,
                )
                generators.append((generator, {}))
                if caches is None:
                    uids = generator.insert(
                        [list(prompts[i].ids) for i in group],
                        [sink.rows[i].max_tokens for i in group],
                        logits_processors=[processors(i) for i in group],
                    )
                else:  # prefilled: the last prompt token is the first step's input
                    uids = generator.insert(
                        [[prompts[i].ids[-1]] for i in group],
                        [sink.rows[i].max_tokens for i in group],
                        caches=[caches[i] for i in group],
                        all_tokens=[list(prompts[i].ids[:-1]) for i in group],
                        logits_processors=[processors(i) for i in group],
                    )
                generators[-1][1].update(zip(uids, group, strict=True))
            live = list(generators)
            while live and not sink.done:
                for entry in list(live):
                    generator, row_of = entry
                    responses = generator.next_generated()
                    if not responses:
                        live.remove(entry)
                        continue
                    finished = []
                    for response in responses:
                        index = row_of[response.uid]
                        sink.push_row(index, response.token)
                        if (
                            sink.rows[index].finish_reason is not None
                            and response.finish_reason is None
                        ):
                            finished.append(response.uid)  # a stop string: free its slot
                    if finished:
                        generator.remove(finished)
        finally:
            for generator, _ in generators:
                generator.close()

    def _split_decoder(self, streams: Sequence[Any]) -> Any:
        """On a CPU device, :func:`split_decode` over ``streams`` (made once); else ``None``."""
        import mlx.core as mx

        if mx.default_device().type != mx.DeviceType.cpu:
            return None
        key = tuple(streams)
        if key not in self._decoders:
            self._decoders[key] = split_decode(self.model, streams)
        return self._decoders[key]

    def _prefill_rows(
        self,
        prompts: Sequence[Prompt],
        groups: Sequence[Sequence[int]],
        streams: Sequence[Any],
        sink: TokenSink,
    ) -> list[Any]:
        """Each row's prompt but its last token in a cache of its own, on its group's stream.

        One row of each group per evaluation: an evaluation of many rows on
        several streams is scheduled mostly one stream after the other (MLX
        walks the graph with a bounded breadth), one row per stream runs them
        side by side.
        """
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        caches = [make_prompt_cache(self.model, self.max_kv_size) for _ in prompts]
        step = self.prefill_step_size
        for wave in zip_longest(*groups):
            rows = [(i, s) for i, s in zip(wave, streams, strict=True) if i is not None]
            for start in range(0, max(len(prompts[i].ids) - 1 for i, _ in rows), step):
                for i, stream in rows:
                    chunk = list(prompts[i].ids[start : min(start + step, len(prompts[i].ids) - 1)])
                    if chunk:
                        with mx.stream(stream):
                            self.model(mx.array(chunk)[None], cache=caches[i])
                mx.eval([c.state for i, _ in rows for c in caches[i]])
                if sink.done:
                    return caches
        return caches

    def _release(self) -> None:
        self._decoders.clear()
        self._wrapper = None
        self._config = None
        self._context_window = None

    def _clear_accelerator_cache(self) -> None:
        if "mlx.core" in sys.modules:
            import mlx.core as mx

            mx.clear_cache()

    def _describe(self) -> dict[str, Any]:
        config = self._config or read_model_config(self.model_name) or {}
        info: dict[str, Any] = {
            "quantization": quantization_from_config(config),
            "model_type": config.get("model_type"),
        }
        if self.model is None:
            return info
        import mlx.core as mx
        from mlx.utils import tree_flatten

        params = dict(tree_flatten(self.model.parameters()))
        bits = (config.get("quantization") or {}).get("bits")
        total = 0
        for name, value in params.items():
            stem = name.rsplit(".", 1)[0]
            quantized = bool(bits) and f"{stem}.scales" in params
            if quantized and name.endswith((".scales", ".biases")):
                continue  # quantisation metadata, not parameters
            packed = quantized and name.endswith(".weight")
            total += value.size * 32 // bits if packed else value.size
        dtypes = {
            str(v.dtype).replace("mlx.core.", "") for k, v in params.items() if k.endswith("weight")
        }
        info.update(
            parameters=int(total),
            dtype=",".join(sorted(dtypes)),
            device=str(mx.default_device()),
            architecture=type(self.model).__name__,
        )
        if Path(self.model_name).is_dir():
            info["path"] = str(Path(self.model_name).resolve())
        return info
