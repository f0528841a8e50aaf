"""Fast decoding for the transformers backend: a static KV cache, a compiled decode step
replayed as a CUDA graph, sampling on the device and tokens fetched in bursts.

``model.generate`` spends most of a decode step in Python (logits processors,
cache bookkeeping, a host sync per token), so at batch size 1 it runs far
below the memory-bandwidth limit of reading every weight once. This module
replaces that loop for Gemma 1/2/3 on CUDA and feeds the same
:class:`~core.stream.TokenSink` as the plain path::

    prompts ──left pad──▶ prefill (one compiled layer, run per layer) ──▶ first token ──▶ sink
        ──▶ decode steps: one CUDA-graph replay each (compiled forward over a static
            KV cache + sampling on the device; no host sync)
        ──▶ every BURST steps the new tokens are copied to pinned host memory while
            the next burst runs ──▶ sink.push(one token per row) per step

* **Cache.** One buffer per layer, preallocated for the request's bucket:
  ``cache_len`` = prompt + ``max_new_tokens`` rounded up to a power of two
  (>= 256). Sliding-window layers keep a ring of ``sliding_window`` slots when
  the bucket is longer than the window, so long chats cost what the window
  costs. Left padding and the window are handled by masks built on the device
  from one position counter, so one graph serves every step.
* **Compile once per bucket.** The decode step is ``torch.compile``-d a piece
  at a time (its inputs, one decoder layer that serves every layer, the
  logits: regional compilation, about 30 s where the whole step as one graph
  takes 1-2 minutes) and each (batch, cache_len, sampler) bucket is captured
  as a CUDA graph the first time it is used; later requests of that bucket
  only replay. Batches are bucketed too (:func:`batch_bucket`: powers of
  two, padding rows whose tokens are dropped), so 3 prompts reuse what 4 built.
* **No request waits for compilation.** A request whose bucket has no
  compiled code yet queues it on the engine's compiling thread
  (:class:`_Background`) and is handed back (:func:`generate` returns
  ``False``): the backend serves it with ``model.generate`` meanwhile, and
  the bucket's later requests take the fast path
  (``GEMMA_LOCAL_COMPILE_WAIT=1``: compile in the request, as before).
* **Same tokens.** The forward calls the model's own modules (norms, MLPs,
  rotary embedding, projections; bitsandbytes layers too) in the order the
  transformers implementation does; under greedy decoding the tokens equal
  the plain path's (``tests/test_fast_path.py`` checks Gemma 1, 2 and 3,
  batches with padding, sliding windows, penalties and biases).
* **Grammars.** A request constrained by a grammar (tools, a JSON
  ``response_format``: :class:`~core.constrained.GrammarMatchers`) runs the
  step as two graphs, the forward and the sampling, with the grammar's
  bitmask applied on the device between the bias and the sampler (the plain
  path's order). Each step's token is read back at once (no bursts), and the
  next step's forward is launched before the host waits for it, so the host
  feeds the token to the matchers and computes the next mask while the GPU
  runs that forward.
* **Stops.** The device does not know about stop strings or end ids: the
  sink does, as on the plain path. Tokens are checked a burst at a time and
  those generated after a row finished are ignored (at most one burst of
  extra work).

* **Kernels.** Each layer's q/k/v and gate/up weights are stacked into one
  matrix (the modules keep views of it, so memory does not grow). On CUDA the
  decode step runs three Triton ops of ours, each a ``torch.library`` op that
  inductor and CUDA graphs take, switched on after a self-check on the GPU:
  the matrix-vector products (:mod:`core.accel.cuda.gemv`: the input norm folded into the
  q/k/v product, the MLP's norm and ``gelu(gate) * up`` into the gate/up one,
  and where :func:`core.accel.cuda.gemv.folded` says it pays the residual add + post-norm
  before q/k/v too, each layer handing its output on as ``(x, y)``;
  at one row for every product, at 2-16 rows where :func:`core.accel.cuda.gemv.preferred`
  says it beats cuBLAS), q/k norms + RoPE + the KV-cache write in one launch
  (:mod:`core.accel.cuda.rope_store`), and flash-decoding attention
  (:mod:`core.accel.cuda.decode_attention`; SDPA picked cuDNN kernels that cost ~29 us a
  layer on an H200). The rest (residual adds and norms, the logits) is
  inductor's, with coordinate-descent tuning, but for two kernels of ours: at
  one row on a Hopper GPU the ops are launched with programmatic dependent
  launch (:func:`_use_pdl`), the residual add + norm between them a PDL kernel
  too: each is launched while the one before finishes (12b: 6.71 -> 6.38 ms a
  step); at 2-16 rows the residual add and norms in front of a wide product are
  one kernel a row (:func:`_settle_norm`; 12b x16: 8.04 -> 7.90 ms a step), the o
  and down products stream 512-wide chunks of K (7.90 -> 7.78 ms), and the q/k/v
  and gate/up products run as the op's swapped form (``W @ x.T``, wgmma; the
  activation in the gate/up one) where it was tuned faster than cuBLAS (12b x16
  at cache position 256: 7.76 -> 7.43 ms; ``GEMMA_LOCAL_SWAP=0`` keeps cuBLAS).
* **Prefill.** One decoder layer is compiled with dynamic shapes and called
  for every layer (regional compilation): one compile serves every layer and
  prompt length (dynamo specialises on batch 1 vs more, on padding, and on a
  prompt longer than a sliding window's ring, whose cache write is a scatter
  rather than a slice copy), in seconds where a whole-model compile takes
  minutes. With CUDA graphs, prompts
  of up to ``PREFILL_GRAPH_MAX`` tokens are left-padded to a multiple of
  ``PREFILL_STEP`` and that prefill is captured the first time its (batch,
  width, padding) comes to a bucket, then replayed: those 26-48 layer calls
  were host time (1b: 15-23 ms for 128 tokens, 3.3 ms replayed).

Entry points: :func:`supported` and :func:`generate` (the hook at the top of
``GemmaTransformersChatCompletion._generate``, through
:func:`core.accel.cuda_generate`), :func:`release` (drop the compiled graphs
and caches of a model; :func:`core.accel.cuda_release`), :func:`describe`.

Environment (read when a model is first used, except the first):

* ``GEMMA_LOCAL_FAST_PATH`` = ``auto`` (default: CUDA only), ``on`` (any
  device; the CPU runs the same loop eagerly) or ``off``.
* ``GEMMA_LOCAL_COMPILE=0``: CUDA graphs of the eager kernels, no
  ``torch.compile`` (no compile time, slower steps).
  ``GEMMA_LOCAL_COMPILE_MODE``: a ``torch.compile`` mode (never a cudagraph one);
  ``GEMMA_LOCAL_TUNE=0``: no coordinate-descent tuning.
* ``GEMMA_LOCAL_FUSE`` = ``auto`` (CUDA), ``1`` or ``0``: stacked projections.
* ``GEMMA_LOCAL_DECODE_SDPA=1``: SDPA in the decode step;
  ``GEMMA_LOCAL_DECODE_ATTENTION=0``: matmul + softmax instead of the Triton op;
  ``GEMMA_LOCAL_GEMV=0`` / ``GEMMA_LOCAL_ROPE_STORE=0``: inductor's kernels
  instead of the Triton products / the q/k norm + RoPE + cache-write op;
  ``GEMMA_LOCAL_FOLD_RESIDUAL`` = ``0`` / ``all``: the residual add never / always
  (before q/k/v and gate/up) folded into the next product;
  ``GEMMA_LOCAL_PDL=0``: plain launches at one row too;
  ``GEMMA_LOCAL_RESIDUAL_NORM=0``: inductor's add + norms at 2-16 rows;
  ``GEMMA_LOCAL_SWAP=0``: the 2-16-row q/k/v and gate/up products on cuBLAS
  (+ inductor's activation) instead of the gemv op's swapped form.
* ``GEMMA_LOCAL_COMPILE_PREFILL=0``: the prompt runs eagerly;
  ``GEMMA_LOCAL_PREFILL_GRAPHS=0``: no prefill graphs (nor their padding);
  ``GEMMA_LOCAL_REGIONAL=0``: the decode step compiles as one graph.

torch is imported lazily: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...params import SamplingParams
from ...stream import Prompt, TokenSink
from . import decode_attention, gemv, rope_store

if TYPE_CHECKING:
    from ...constrained import GrammarMatchers

logger = logging.getLogger("gemma_local")

#: Smallest KV-cache bucket (tokens); buckets are powers of two from here.
MIN_CACHE_LEN = 256
#: Decode steps run between two host reads of the generated tokens (and at most
#: the steps run for nothing after every row has stopped).
BURST = 4
#: Buckets (KV buffers + captured graphs) kept per model.
MAX_BUCKETS = 2
#: Prompts up to this many tokens (after padding) run as a CUDA graph of the prefill,
#: captured the first time their padded width comes to a bucket: their prefill is host
#: time (one compiled layer call and its launches per layer), longer ones GPU time.
PREFILL_GRAPH_MAX = 1024
#: Prompt widths are padded (on the left) to a multiple of this for those graphs.
PREFILL_STEP = 64
#: Prefill graphs kept per bucket.
MAX_PREFILL_GRAPHS = 8
#: Tokens a decode step up to which its Triton ops are launched with programmatic
#: dependent launch (:func:`_use_pdl`). At one row every product is the gemv op and the
#: whole layer is one chain of them; at 2-16 rows the wide products were cuBLAS GEMMs,
#: which break it, and PDL measured slower (12b x16 step 7.45 -> 7.66 ms, probe 15).
#: Since the swapped forms, the 12b's 16-row layer is ours end to end (not yet tried
#: with PDL: its add + norms kernel has no PDL form).
PDL_ROWS = 1
#: Model types whose decoder this module knows.
MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})

_ENGINE_ATTR = "_gemma_local_fast_path"
#: transformers' classes for ``gelu_pytorch_tanh`` (5.x, 4.x)
_GELU_TANH = frozenset({"GELUTanh", "PytorchGELUTanh"})
_SETTINGS = ("auto", "on", "off")

torch: Any = None  # imported by _import_torch()
F: Any = None


def _import_torch() -> Any:
    global torch, F
    if torch is None:
        import torch as torch_module
        import torch.nn.functional as functional

        torch, F = torch_module, functional
    return torch


def setting() -> str:
    """``GEMMA_LOCAL_FAST_PATH``: ``auto`` (CUDA only, the default), ``on`` or ``off``."""
    value = os.environ.get("GEMMA_LOCAL_FAST_PATH", "auto").strip().lower()
    value = {"1": "on", "true": "on", "0": "off", "false": "off", "": "auto"}.get(value, value)
    if value not in _SETTINGS:
        raise ValueError(f"GEMMA_LOCAL_FAST_PATH must be one of {_SETTINGS}, got {value!r}")
    return value


def supported(model: Any, params: SamplingParams | None = None) -> bool:
    """Whether :func:`generate` can serve ``model`` (else use ``model.generate``).

    True for Gemma 1/2/3 decoders (text-only prompts to the multimodal Gemma 3
    too) on one CUDA device with ``sdpa`` or ``eager`` attention, unless
    ``GEMMA_LOCAL_FAST_PATH`` says otherwise. Requests constrained by a
    grammar (tools, JSON output) are served too: :func:`generate` takes their
    matchers.
    """
    mode = setting()
    if mode == "off" or model is None:
        return False
    if mode == "auto" and _device_type(model) != "cuda":
        return False
    if model not in _KNOWN:
        _KNOWN[model] = _Layout.find(model) is not None or _own_forward().find(model) is not None
    return _KNOWN[model]


def _own_forward() -> Any:
    """:mod:`core.accel.cuda.own_forward` (the decoders this module has no forward for)."""
    from . import own_forward

    return own_forward.ModelLayout


#: model -> whether its layout is known (so the check costs nothing per request).
_KNOWN: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _device_type(model: Any) -> str | None:
    try:
        return str(next(model.parameters()).device.type)
    except (AttributeError, StopIteration, TypeError):
        return None


def generate(
    model: Any,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    sink: TokenSink,
    *,
    pad_id: int = 0,
    compile: bool | str | None = None,
    cuda_graphs: bool | None = None,
    grammar: GrammarMatchers | None = None,
) -> bool:
    """Generate for ``prompts`` (left-padded together) and push every step's tokens into
    ``sink``; ``False`` (nothing done) where the request's shape is still compiling.

    Runs on the thread that owns the model. ``sink.max_new_tokens`` bounds the
    steps; the loop ends early once ``sink.done`` (every row finished, or the
    reader went away). ``compile`` (default: on CUDA) may name a
    ``torch.compile`` backend; ``cuda_graphs`` defaults to CUDA. Both settings
    are fixed when a model is first seen (see :func:`release`). ``grammar``
    (one matcher per prompt) constrains every row's tokens; this loop feeds
    each sampled token to it.

    **No request waits for compilation.** With ``compile`` on, the first
    request of a bucket (batch, cache length) that has no compiled code yet
    starts compiling it on a thread of the engine's and returns ``False``: the
    caller serves it on the plain path (``model.generate``) meanwhile, and the
    bucket's requests take the fast path once it is ready. Nor for a CUDA graph
    capture: a request whose bucket has no graph of its decode step (or of its
    prompt width) yet runs those steps uncaptured, and the graphs are captured
    when the model thread is next idle (:func:`idle`, which the client's
    scheduler calls once no request runs).
    ``GEMMA_LOCAL_COMPILE_WAIT=1`` compiles and captures in the request instead
    (its first token waits, as benchmarks of the steady state want);
    :func:`settle` waits for the compiling thread.
    """
    _import_torch()
    engine = _engine(model, compile=compile, cuda_graphs=cuda_graphs)
    if not engine.ready_for(prompts, sink):
        return False
    device = engine.layout.device
    with torch.inference_mode():
        if device.type == "cuda":  # streams, events and graphs of the model's GPU
            with torch.cuda.device(device):
                engine.run(prompts, params, sink, pad_id, grammar)
        else:
            engine.run(prompts, params, sink, pad_id, grammar)
    return True


def settle(model: Any, timeout: float | None = None) -> bool:
    """Wait until no bucket of ``model`` is compiling in the background; whether none is."""
    engine = getattr(model, _ENGINE_ATTR, None)
    return True if engine is None else engine.background.settle(timeout)


def idle(model: Any) -> int:
    """Capture the CUDA graphs ``model``'s requests ran without, on the thread that owns it
    while no request runs (see :meth:`_Engine.idle`); how many it captured."""
    engine = getattr(model, _ENGINE_ATTR, None)
    if engine is None or not (engine.pending_steps or engine.pending_prefills):
        return 0
    device = engine.layout.device
    if device.type != "cuda":
        return 0
    with torch.inference_mode(), torch.cuda.device(device):
        return int(engine.idle())


def release(model: Any) -> None:
    """Drop the compiled graphs and KV buffers kept on ``model``."""
    engine = getattr(model, _ENGINE_ATTR, None)
    if engine is not None:
        engine.background.stop()
        engine.buckets.clear()
        delattr(model, _ENGINE_ATTR)


def describe(model: Any) -> dict[str, Any]:
    """What the fast path is doing for ``model`` (for benchmarks and logs)."""
    engine = getattr(model, _ENGINE_ATTR, None)
    if engine is None:
        return {"active": False}
    return engine.describe()


def batch_bucket(rows: int) -> int:
    """The batch a request of ``rows`` prompts runs at: a power of two up to 32, then a
    multiple of 16, so that a few compiled and captured shapes serve every batch size
    (the extra rows are padding; a decode step costs about the same for them)."""
    if rows <= 32:
        return 1 << max(0, rows - 1).bit_length()
    return -(-rows // 16) * 16


def cache_len(tokens: int) -> int:
    """The KV bucket for ``tokens`` positions: a power of two, at least MIN_CACHE_LEN."""
    return max(MIN_CACHE_LEN, 1 << max(0, tokens - 1).bit_length())


# --------------------------------------------------------------------- model


class _Layout:
    """The parts of a Gemma decoder the fast forward calls, found once per model."""

    def __init__(self, model: Any) -> None:
        config = model.config
        if getattr(config, "model_type", None) not in MODEL_TYPES:
            raise TypeError(f"not a Gemma decoder: {getattr(config, 'model_type', None)!r}")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "use_bidirectional_attention", False):
            raise TypeError("bidirectional attention")
        inner = model.model
        self.text_model = getattr(inner, "language_model", None) or inner
        self.layers = list(self.text_model.layers[: text.num_hidden_layers])
        self.embed = self.text_model.embed_tokens
        self.norm = self.text_model.norm
        self.rotary = self.text_model.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        impl = getattr(attn.config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise TypeError(f"attention implementation {impl!r}")
        # Gemma 2 soft-caps attention logits in eager attention only; transformers'
        # SDPA path has no soft-capping (5.17 ignores it, 5.24 refuses it): do the same.
        self.attn_softcap = (
            getattr(text, "attn_logit_softcapping", None) if impl == "eager" else None
        )
        self.final_softcap = getattr(text, "final_logit_softcapping", None)
        self.use_sdpa = impl == "sdpa"
        # SDPA in the decode step only on request: matmul + softmax is faster there.
        self.decode_sdpa = self.use_sdpa and os.environ.get("GEMMA_LOCAL_DECODE_SDPA") == "1"
        #: the fused Triton decode attention (:mod:`core.accel.cuda.decode_attention`), set on CUDA
        self.decode_kernel: Callable[..., Any] | None = None
        #: the Triton products (:mod:`core.accel.cuda.gemv`) and q/k norm + RoPE + cache write
        #: (:mod:`core.accel.cuda.rope_store`) of the decode step, set on CUDA (fused weights only)
        self.gemv: Callable[..., Any] | None = None
        #: its residual form (:func:`core.accel.cuda.gemv.gemv_residual`): the residual add + norm
        #: kernels between products folded into the next product
        self.gemv_residual: Callable[..., Any] | None = None
        #: which products take the residual form: "auto"
        #: (:func:`core.accel.cuda.gemv.folded`), "all"
        self.fold = "auto"
        self.rope_store: Callable[..., Any] | None = None
        #: whether the decode step's Triton ops are launched with programmatic dependent
        #: launch at one row (:func:`_use_pdl`)
        self.pdl = False
        #: the one-row step's residual add + norm between two of those ops, a kernel
        #: launched with PDL (:func:`core.accel.cuda.gemv.residual_add`), set with :attr:`pdl`
        self.residual_add: Callable[..., Any] | None = None
        #: the residual add + norm + next norm in front of a wide product at 2-16 rows
        #: (:func:`core.accel.cuda.gemv.residual_norm`), set with :attr:`gemv`
        self.residual_norm: Callable[..., Any] | None = None
        #: whether the 2-16-row q/k/v and gate/up products may run as the gemv op's
        #: swapped form (the activation in the gate/up one) where
        #: :func:`core.accel.cuda.gemv.preferred` says so
        self.swap = False
        self.heads = text.num_attention_heads
        self.kv_heads = text.num_key_value_heads
        self.head_dim = attn.head_dim
        self.rep = self.heads // self.kv_heads
        self.scaling = [float(layer.self_attn.scaling) for layer in self.layers]
        self.windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.layers]
        types = getattr(text, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.types = list(types[: len(self.layers)])
        self.rope_by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.qk_norm = hasattr(attn, "q_norm")
        self.sandwich = hasattr(self.layers[0], "pre_feedforward_layernorm")
        # the MLP activation the gemv op can apply itself (Gemma 2/3; Gemma 1 per its config)
        self.gelu_tanh = type(self.layers[0].mlp.act_fn).__name__ in _GELU_TANH
        self.vocab = int(self.lm_head.weight.shape[0])
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.fused = False
        self.qkv: list[Any] = []
        self.gate_up: list[Any] = []
        device_map = getattr(model, "hf_device_map", None)
        if device_map and len({str(d) for d in device_map.values()}) > 1:
            raise TypeError("model spread over several devices")
        if model.training:
            raise TypeError("model in training mode")

    def cache_shapes(self) -> list[tuple[int, int] | None]:
        """(KV heads, head dim) of each layer's cache (every layer has one, all alike)."""
        return [(self.kv_heads, self.head_dim)] * len(self.layers)

    def slot_counts(self, length: int) -> list[int]:
        """Each layer's cache slots in a bucket of ``length``: the bucket, or a sliding
        window's ring where the window is shorter."""
        return [length if w is None else min(length, w) for w in self.windows]

    @staticmethod
    def find(model: Any) -> _Layout | None:
        try:
            return _Layout(model)
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            logger.debug("fast path not available for %s: %s", type(model).__name__, exc)
            return None

    def fuse_projections(self) -> None:
        """Put q/k/v and gate/up weights of each layer into one tensor (one GEMV each).

        The modules keep working: their weights become contiguous views of the
        fused tensor, so memory does not grow. Only plain ``nn.Linear`` layers
        without bias are fused (not bitsandbytes ones).
        """
        linear = torch.nn.Linear

        def plain(*mods: Any) -> bool:
            return all(type(m) is linear and m.bias is None for m in mods)

        qkv, gate_up = [], []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (
                plain(attn.q_proj, attn.k_proj, attn.v_proj) and plain(mlp.gate_proj, mlp.up_proj)
            ):
                return
            qkv.append((attn.q_proj, attn.k_proj, attn.v_proj))
            gate_up.append((mlp.gate_proj, mlp.up_proj))
        with torch.no_grad():
            self.qkv = [_fuse(mods) for mods in qkv]
            self.gate_up = [_fuse(mods) for mods in gate_up]
        self.fused = True


def _fuse(mods: Sequence[Any]) -> Any:
    """One weight for ``mods`` (stacked by output rows); their weights become views of it."""
    fused = torch.cat([m.weight.detach() for m in mods])
    start = 0
    for m in mods:
        rows = m.weight.shape[0]
        m.weight.data = fused[start : start + rows]
        start += rows
    return fused


def _rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _position_embeddings(lay: _Layout, x: Any, positions: Any) -> dict[str, Any]:
    if lay.rope_by_type:
        return {t: lay.rotary(x, positions, t) for t in dict.fromkeys(lay.types)}
    shared = lay.rotary(x, positions)
    return {t: shared for t in dict.fromkeys(lay.types)}


@dataclass(frozen=True)
class _Weights:
    """What one layer's forward needs besides the layout: its module and stacked weights."""

    layer: Any
    qkv: Any  # None unless the projections are fused
    gate_up: Any
    scaling: float
    #: the decode step's layer input is ``r + pending(y)`` (see :func:`_decode_layer`):
    #: the previous layer's post-feedforward norm (Gemma 2/3; layer 0's own, y being
    #: zeros there), None for Gemma 1 (``r + y``)
    pending: Any

    @staticmethod
    def of(lay: _Layout, i: int) -> _Weights:
        fused = lay.fused
        return _Weights(
            lay.layers[i],
            lay.qkv[i] if fused else None,
            lay.gate_up[i] if fused else None,
            lay.scaling[i],
            _post_feedforward(lay, lay.layers[max(i - 1, 0)]),
        )


def _project(lay: _Layout, w: _Weights, h: Any) -> tuple[Any, Any, Any]:
    """q ``[B, H, Q, D]``, k and v ``[B, KV, Q, D]`` (normed where Gemma norms them)."""
    attn = w.layer.self_attn
    batch, length = h.shape[:2]
    dim = lay.head_dim
    if w.qkv is not None:
        q, k, v = F.linear(h, w.qkv).split(
            [lay.heads * dim, lay.kv_heads * dim, lay.kv_heads * dim], dim=-1
        )
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q = q.view(batch, length, -1, dim).transpose(1, 2)
    k = k.view(batch, length, -1, dim).transpose(1, 2)
    v = v.view(batch, length, -1, dim).transpose(1, 2)
    if lay.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def _attention(
    lay: _Layout, scaling: float, q: Any, k: Any, v: Any, allowed: Any, *, sdpa: bool | None = None
) -> Any:
    """softmax(q k^T) v with ``allowed`` (bool, broadcast to the scores) as the mask.

    ``allowed=None`` means plain causal (square, no padding): SDPA's flash kernels.
    ``sdpa=False`` spells the attention out as matmul + softmax, which is what
    the decode step uses: with one query per row, SDPA dispatches to kernels
    (cuDNN on an H200) that took about 29 us a layer against a few us here.
    """
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    if lay.use_sdpa if sdpa is None else sdpa and lay.use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    # transformers' eager_attention_forward, step by step (Gemma 2 soft-caps here).
    return decode_attention.reference(q, k, v, allowed, scaling, lay.attn_softcap)


def _layer_rest(
    lay: _Layout,
    w: _Weights,
    x: Any,
    attn_out: Any,
    stored: list[Any] | None = None,
    decode: bool = False,
) -> tuple[Any, Any]:
    """Output projection, residuals, norms and MLP (Gemma 1 vs 2/3 order), up to the
    MLP's output ``h``: returns ``(x, h)``, the layer's output being ``x +
    post_feedforward_layernorm(h)`` (Gemma 2/3; ``x + h`` for Gemma 1, see
    :func:`_settle`), which the decode step leaves to the next layer's first product.

    ``stored`` collects the MLP activations, for the compiled decode step to
    return: inductor then writes ``gelu(gate) * up`` once instead of
    recomputing it inside every output row of the down projection (12b shape
    on an H200: 50 -> 33 us a layer, ``benchmarks/probe.py gemv``).
    ``decode``: one token per row, the products may run as the gemv op
    (:func:`_product`; the gate/up one with the residual add, the MLP's norm and
    activation in it).
    """
    layer = w.layer
    shape = x.shape
    rows = shape[0] * shape[1]
    if decode and w.qkv is not None:
        h = _product(lay, "o", attn_out.view(rows, -1), layer.self_attn.o_proj.weight).view(shape)
    else:
        h = layer.self_attn.o_proj(attn_out)
    post = layer.post_attention_layernorm if lay.sandwich else None
    norm = layer.pre_feedforward_layernorm if lay.sandwich else layer.post_attention_layernorm
    mlp = layer.mlp
    if w.gate_up is None:
        x = _settle(post, x, h)
        h = mlp(norm(x))
    else:
        on_op = (
            decode
            and lay.gelu_tanh
            and (rows == 1 or lay.swap)
            and gemv.preferred("gate_up", rows, w.gate_up.shape)
        )
        op = lay.gemv if on_op else None
        if op is not None and _folds(lay, "gate_up", w.gate_up.shape):
            act, x = _product_after(lay, post, x, h, w.gate_up, norm, act=True)
        elif op is not None and rows == 1:
            x = _settle_step(lay, post, x, h)
            act = op(x.view(rows, -1), w.gate_up, norm.weight, norm.eps, True, **_pdl(lay, rows))
            act = act.view(*shape[:2], -1)
        else:
            x, normed = _settle_norm(lay, post, x, h, norm, decode)
            if op is not None:  # 2-16 rows: the op's product with the activation in it
                act = op(normed.view(rows, -1), w.gate_up, None, 1e-6, True)
                act = act.view(*shape[:2], -1)
            else:
                gate, up = F.linear(normed, w.gate_up).chunk(2, dim=-1)
                act = mlp.act_fn(gate) * up
        if stored is not None:
            stored.append(act)
        if decode:
            h = _product(lay, "down", act.view(rows, -1), mlp.down_proj.weight).view(shape)
        else:
            h = mlp.down_proj(act)
    return x, h


def _settle(post: Any, x: Any, h: Any) -> Any:
    """The residual stream after a block: ``x + post(h)`` (``x + h`` without a post-norm)."""
    return x + (h if post is None else post(h))


def _post_args(post: Any) -> tuple[Any, float]:
    """``(post_weight, post_eps)`` of a post-norm module for our kernels: ``(None,
    1e-6)`` without one (Gemma 1 adds y as it is)."""
    return (None, 1e-6) if post is None else (post.weight, post.eps)


def _settle_step(lay: _Layout, post: Any, x: Any, h: Any) -> Any:
    """:func:`_settle` between a decode step's Triton ops: at one row, the PDL chain's own
    kernel (:func:`core.accel.cuda.gemv.residual_add`) where the ops are launched with PDL, as
    inductor's kernel there would make the next op wait for it to finish before it may
    launch."""
    shape = x.shape
    rows = shape[0] * shape[1]
    if lay.residual_add is None or rows > PDL_ROWS:
        return _settle(post, x, h)
    post_weight, post_eps = _post_args(post)
    out = lay.residual_add(h.reshape(rows, -1), x.reshape(rows, -1), post_weight, post_eps)
    return out.view(shape)


def _settle_norm(
    lay: _Layout, post: Any, x: Any, h: Any, norm: Any, decode: bool = False
) -> tuple[Any, Any]:
    """``(x', norm(x'))`` for ``x' = x + post(h)`` (:func:`_settle`) in front of a cuBLAS
    product: in a decode step of 2 to ``gemv.MAX_ROWS`` rows, one kernel of ours
    (:func:`core.accel.cuda.gemv.residual_norm`) where it is on, else the modules (inductor fuses
    them into one reduction, slower there: 12b at 16 rows, H200, probe 18)."""
    shape = x.shape
    rows = shape[0] * shape[1]
    if not decode or lay.residual_norm is None or not 1 < rows <= gemv.MAX_ROWS:
        x = _settle(post, x, h)
        return x, norm(x)
    post_weight, post_eps = _post_args(post)
    x, normed = lay.residual_norm(
        h.reshape(rows, -1), x.reshape(rows, -1), post_weight, post_eps, norm.weight, norm.eps
    )
    return x.view(shape), normed.view(shape)


def _pdl(lay: _Layout, rows: int) -> dict[str, bool]:
    """The keyword that launches a decode step's Triton op with PDL, for ``rows`` tokens
    a step: ``{"pdl": True}`` up to :data:`PDL_ROWS` where :func:`_use_pdl` turned it on."""
    return {"pdl": True} if lay.pdl and rows <= PDL_ROWS else {}


def _folds(lay: _Layout, name: str, shape: tuple[int, int]) -> bool:
    """Whether the one-row ``name`` product takes the residual add + norm before it."""
    if lay.gemv_residual is None:
        return False
    return lay.fold == "all" or gemv.folded(name, shape)


def _product_after(
    lay: _Layout, post: Any, x: Any, h: Any, weight: Any, norm: Any, act: bool = False
) -> tuple[Any, Any]:
    """``(norm(x') @ weight.T, x')`` for ``x' = x + post(h)`` (:func:`_settle`), one row
    per token, as one gemv op: the residual add and both norms folded into the product."""
    shape = x.shape
    rows = shape[0] * shape[1]
    post_weight, post_eps = _post_args(post)
    assert lay.gemv_residual is not None
    out, x = lay.gemv_residual(
        h.reshape(rows, -1),
        x.reshape(rows, -1),
        weight,
        norm.weight,
        norm.eps,
        act,
        post_weight,
        post_eps,
        **_pdl(lay, rows),
    )
    return out.view(*shape[:2], -1), x.view(shape)


def _logits(lay: _Layout, x: Any) -> Any:
    """float32 logits ``[B, V]`` of the last position of ``x``."""
    logits = lay.lm_head(lay.norm(x[:, -1:, :]))[:, -1, :]
    if lay.final_softcap is not None:
        logits = torch.tanh(logits / lay.final_softcap) * lay.final_softcap
    return logits.float()


def _prefill_forward(
    lay: _Layout,
    keys: list[Any],
    values: list[Any],
    ids: Any,
    mask: Any,
    padded: bool = True,
    layer_fn: Callable[..., Any] | None = None,
) -> Any:
    """Run the (left-padded) prompts, fill the cache from slot 0, return the last logits.

    Without padding, layers whose window does not bind use SDPA's plain causal
    attention (flash kernels), as transformers does. ``layer_fn`` (default
    :func:`_prefill_layer`) runs each layer: the compiled engine passes one
    compiled layer that serves every layer (regional compilation).
    """
    if layer_fn is None:
        layer_fn = _prefill_layer
    x = lay.embed(ids)
    rope = _position_embeddings(lay, x, prompt_positions(mask))
    masks = prompt_masks(mask, lay.windows, padded, lay.use_sdpa)
    for i in range(len(lay.layers)):
        cos, sin = rope[lay.types[i]]
        x = layer_fn(
            lay, _Weights.of(lay, i), x, keys[i], values[i], cos, sin, masks[lay.windows[i]]
        )
    return _logits(lay, x)


def prompt_positions(mask: Any) -> Any:
    """Each position's index among its row's tokens (padding: 1) for left-padded prompts."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def prompt_masks(
    mask: Any, windows: Sequence[int | None], padded: bool, sdpa: bool
) -> dict[int | None, Any]:
    """Boolean attention masks ``[B, 1, W, W]`` (True: attend) of left-padded prompts
    (``mask`` ``[B, W]``, 1 = token), one per sliding window (``None``: full attention).

    Without padding, a window that does not bind gets ``None`` under SDPA: its own causal
    attention (flash kernels), as transformers runs it.
    """
    width = mask.shape[1]
    q_idx = torch.arange(width, device=mask.device)[:, None]
    k_idx = torch.arange(width, device=mask.device)[None, :]
    real = mask.bool()[:, None, None, :]  # [B, 1, 1, W]: keys that are not padding
    causal = (k_idx <= q_idx) & real
    diagonal = k_idx == q_idx  # padded queries attend to themselves: no NaN rows
    masks: dict[int | None, Any] = {}
    for window in dict.fromkeys(windows):
        if not padded and sdpa and (window is None or width <= window):
            masks[window] = None
            continue
        allowed = causal if window is None else causal & (k_idx > q_idx - window)
        masks[window] = allowed | diagonal
    return masks


def extension_mask(start: int, length: int, held: int, window: int | None, device: Any) -> Any:
    """Which keys the new tokens ``start..length`` of a prompt attend (prompt-prefix reuse):
    ``[1, 1, length - start, held]``, the keys being the prompt's last ``held`` positions; a
    key not after its query and, with a sliding ``window``, within it."""
    queries = torch.arange(start, length, device=device)[:, None]
    at = torch.arange(length - held, length, device=device)[None, :]
    allowed = at <= queries
    if window is not None:
        allowed = allowed & (at > queries - window)
    return allowed[None, None]


def slot_mask(step: Any, pad: Any, slots: int) -> Any:
    """Which of a ring's ``slots`` each row attends at cache index ``step`` ``[1]``:
    ``[B, 1, 1, slots]``, a slot's position being neither left padding (``pad`` ``[B]``)
    nor in the future (a ring shorter than ``step`` holds its last ``slots`` positions)."""
    held = step - torch.remainder(step - torch.arange(slots, device=step.device), slots)
    return (held[None, :] >= pad[:, None])[:, None, None, :]


def _prefill_layer(
    lay: _Layout,
    w: _Weights,
    x: Any,
    keys: Any,
    values: Any,
    cos: Any,
    sin: Any,
    allowed: Any,
) -> Any:
    """One layer over the whole prompt; writes its keys and values into the cache from slot 0."""
    batch, width = x.shape[:2]
    h = w.layer.input_layernorm(x)
    q, k, v = _project(lay, w, h)
    q, k = _rope(q, k, cos, sin)
    slots = keys.shape[2]
    if width <= slots:  # slots 0..width-1: a strided copy (index_copy_ a scatter, ~6x slower)
        keys[:, :, :width].copy_(k)
        values[:, :, :width].copy_(v)
    else:  # a sliding window's ring shorter than the prompt keeps the last slots' worth
        index = torch.arange(width - slots, width, device=x.device) % slots
        keys.index_copy_(2, index, k[:, :, width - slots :])
        values.index_copy_(2, index, v[:, :, width - slots :])
    if lay.rep > 1:
        k = k.repeat_interleave(lay.rep, dim=1)
        v = v.repeat_interleave(lay.rep, dim=1)
    out = _attention(lay, w.scaling, q, k, v, allowed)
    x, h = _layer_rest(lay, w, x, out.transpose(1, 2).reshape(batch, width, -1))
    return _settle(_post_feedforward(lay, w.layer), x, h)


def _extend_layer(
    lay: _Layout,
    w: _Weights,
    x: Any,
    past_k: Any,
    past_v: Any,
    cos: Any,
    sin: Any,
    allowed: Any,
) -> tuple[Any, Any, Any]:
    """One layer over a prompt's new tokens ``x`` after the stored keys and values of its
    prefix (prompt-prefix reuse): the layer's output and the whole prompt's keys and values."""
    batch, width = x.shape[:2]
    h = w.layer.input_layernorm(x)
    q, k, v = _project(lay, w, h)
    q, k = _rope(q, k, cos, sin)
    keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    k, v = keys, values
    if lay.rep > 1:
        k = k.repeat_interleave(lay.rep, dim=1)
        v = v.repeat_interleave(lay.rep, dim=1)
    out = _attention(lay, w.scaling, q, k, v, allowed)
    x, h = _layer_rest(lay, w, x, out.transpose(1, 2).reshape(batch, width, -1))
    return _settle(_post_feedforward(lay, w.layer), x, h), keys, values


def _post_feedforward(lay: _Layout, layer: Any) -> Any:
    return layer.post_feedforward_layernorm if lay.sandwich else None


def _decode_forward(
    lay: _Layout,
    keys: list[Any],
    values: list[Any],
    tok: Any,
    step: Any,
    pad: Any,
    parts: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | None = None,
) -> tuple[Any, list[Any]]:
    """One token per row at cache index ``step``; returns float32 logits ``[B, V]``.

    ``tok`` ``[B, 1]``, ``step`` ``[1]`` (the cache index being written),
    ``pad`` ``[B]`` (left padding per row). Each layer's buffer is a ring of
    its slot count (the whole bucket, or the sliding window); a slot is
    attended when the position it holds is not padding and not in the future.
    Also returns the MLP activations (see :func:`_layer_rest`), for nobody.

    ``parts`` (default: :func:`_decode_inputs`, :func:`_decode_layer`,
    :func:`_decode_logits`) are the three pieces of the step; the regional engine
    passes each one compiled (one compiled layer serves every layer).
    """
    if parts is None:
        parts = (_decode_inputs, _decode_layer, _decode_logits)
    inputs_fn, layer_fn, logits_fn = parts
    slot_counts = tuple(dict.fromkeys(int(k.shape[2]) for k in keys))
    x, y, rope, allowed, limits, slot_of = inputs_fn(lay, slot_counts, tok, step, pad)
    stored: list[Any] = []
    for i in range(len(lay.layers)):
        n = int(keys[i].shape[2])
        cos, sin = rope[lay.types[i]]
        x, y, acts = layer_fn(
            lay,
            _Weights.of(lay, i),
            x,
            y,
            keys[i],
            values[i],
            cos,
            sin,
            allowed[n],
            limits[n],
            slot_of[n],
        )
        stored.extend(acts)
    return logits_fn(lay, x, y), stored


def _decode_inputs(
    lay: _Layout, slot_counts: tuple[int, ...], tok: Any, step: Any, pad: Any
) -> tuple[Any, Any, dict[str, Any], dict[int, Any], dict[int, Any], dict[int, Any]]:
    """The embedded tokens and zeros (the first layer's pending ``y``, see
    :func:`_decode_layer`), RoPE per layer type and, per cache size: the mask of the
    slots that may be attended, how many slots are written, and the slot to write."""
    x = lay.embed(tok)
    positions = (step - pad)[:, None]
    rope = _position_embeddings(lay, x, positions)
    allowed, limits, slot_of = {}, {}, {}
    for slots in slot_counts:
        allowed[slots] = slot_mask(step, pad, slots)
        limits[slots] = torch.clamp(step + 1, max=slots)  # slots written so far
        slot_of[slots] = torch.remainder(step, slots)
    return x, torch.zeros_like(x), rope, allowed, limits, slot_of


def _decode_layer(
    lay: _Layout,
    w: _Weights,
    x: Any,
    y: Any,
    keys: Any,
    values: Any,
    cos: Any,
    sin: Any,
    allowed: Any,
    limit: Any,
    slot: Any,
) -> tuple[Any, Any, list[Any]]:
    """One layer for one token per row; writes its key and value at ``slot``.

    The layer's input is ``x + w.pending(y)`` (:func:`_settle`), and its output is
    returned the same way, ``(x, y, activations)``: the residual add + norm that
    ends a Gemma layer is left to the next layer's first product, where the gemv
    op folds it in (:func:`_product_after`); elsewhere it is the first thing the
    next layer computes (one kernel with the input norm, not two).
    """
    batch = x.shape[0]
    if lay.rope_store is not None and w.qkv is not None:
        # the Triton ops: the q/k/v product with the input norm (and the residual add
        # before it, where the op takes it), then one kernel for q/k norms, RoPE and the
        # cache write
        attn, norm = w.layer.self_attn, w.layer.input_layernorm
        on_op = (
            lay.gemv is not None
            and (batch == 1 or lay.swap)
            and gemv.preferred("qkv", batch, w.qkv.shape)
        )
        if on_op and _folds(lay, "qkv", w.qkv.shape):
            qkv, x = _product_after(lay, w.pending, x, y, w.qkv, norm)
            qkv = qkv.view(batch, -1)
        elif on_op and batch == 1:
            x = _settle_step(lay, w.pending, x, y)
            qkv = _product(lay, "qkv", x.view(batch, -1), w.qkv, norm)
        else:  # the add + norms (our kernel at 2-16 rows), then the op or cuBLAS
            x, normed = _settle_norm(lay, w.pending, x, y, norm, decode=True)
            normed = normed.view(batch, -1)
            qkv = lay.gemv(normed, w.qkv) if lay.gemv and on_op else F.linear(normed, w.qkv)
        norms = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if lay.qk_norm else ()
        q = lay.rope_store(qkv, cos, sin, keys, values, slot, lay.heads, *norms, **_pdl(lay, batch))
    else:
        x = _settle(w.pending, x, y)
        h = w.layer.input_layernorm(x)
        q, k, v = _project(lay, w, h)
        q, k = _rope(q, k, cos, sin)
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        # The query heads that share a KV head become rows of one attention call.
        q = q.reshape(batch, lay.kv_heads, lay.rep, lay.head_dim)
    if lay.decode_kernel is not None:
        out = lay.decode_kernel(
            q, keys, values, allowed, w.scaling, lay.attn_softcap, limit, **_pdl(lay, batch)
        )
    else:
        out = _attention(lay, w.scaling, q, keys, values, allowed, sdpa=lay.decode_sdpa)
    stored: list[Any] = []
    x, y = _layer_rest(lay, w, x, out.reshape(batch, 1, -1), stored, decode=True)
    return x, y, stored


def _decode_logits(lay: _Layout, x: Any, y: Any) -> Any:
    """:func:`_logits` of the last layer's output ``x + post_feedforward_layernorm(y)``."""
    return _logits(lay, _settle(_post_feedforward(lay, lay.layers[-1]), x, y))


def _product(lay: _Layout, name: str, x: Any, weight: Any, norm: Any = None) -> Any:
    """``norm(x) @ weight.T`` for a decode step's 2-d ``x``: the gemv op where
    :func:`core.accel.cuda.gemv.preferred` says it is faster, else the norm module and
    ``F.linear``."""
    if lay.gemv is not None and gemv.preferred(name, x.shape[0], weight.shape):
        if norm is None:
            return lay.gemv(x, weight, **_pdl(lay, x.shape[0]))
        return lay.gemv(x, weight, norm.weight, norm.eps, **_pdl(lay, x.shape[0]))
    return F.linear(x if norm is None else norm(x), weight)


# ------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class _Sampler:
    """What the sampling code does (one captured graph each); values live in tensors."""

    greedy: bool
    top_k: int = 0
    top_p: bool = False
    penalty: bool = False
    bias: bool = False
    #: a grammar's bitmask (``_Bucket.allowed``) masks the logits
    masked: bool = False

    @staticmethod
    def of(params: SamplingParams, masked: bool = False) -> _Sampler:
        penalty = params.repetition_penalty is not None and params.repetition_penalty != 1.0
        bias = bool(params.logit_bias)
        if params.greedy:
            return _Sampler(True, penalty=penalty, bias=bias, masked=masked)
        return _Sampler(False, params.top_k, params.top_p < 1.0, penalty, bias, masked)


def _sample(logits: Any, b: _Bucket, how: _Sampler) -> Any:
    """Next token per row, on the device, in transformers' order of processors.

    Repetition penalty, logit bias, the grammar's mask (disallowed ids get the
    dtype's lowest value, as :class:`~core.constrained.TorchGrammarMask` gives
    them), then (sampling) temperature, top-k, top-p and a draw by the
    exponential-race trick (argmax of p / Exp(1)), which needs no host sync.
    """
    if how.penalty:
        penalized = torch.where(logits < 0, logits * b.penalty, logits / b.penalty)
        logits = torch.where(b.seen, penalized, logits)
    if how.bias:
        logits = logits + b.bias
    if how.masked:
        logits = b.bits.mask(logits, b.allowed)
    if how.greedy:
        return logits.argmax(dim=-1)
    logits = logits / b.temperature
    index = None
    if how.top_k:
        logits, index = logits.topk(min(how.top_k, logits.shape[-1]), dim=-1)
    elif how.top_p:
        logits, index = logits.sort(dim=-1, descending=True)
    if how.top_p:
        probs = logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        logits = logits.masked_fill(before >= b.top_p, float("-inf"))
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_().clamp_min_(1e-20)
    choice = (probs / race).argmax(dim=-1)
    return choice if index is None else index.gather(-1, choice[:, None])[:, 0]


class _Bits:
    """Where each vocabulary id sits in an llguidance bitmask: bit ``id % 32`` of int32 word
    ``id // 32`` of its row (1 = allowed), as index tensors on the device."""

    def __init__(self, vocab: int, device: Any) -> None:
        ids = torch.arange(vocab, device=device)
        self.words = -(-vocab // 32)
        self.word = ids // 32
        self.bit = (ids % 32).to(torch.int32)

    def mask(self, logits: Any, allowed: Any) -> Any:
        """``logits`` ``[rows, vocab]`` with every id ``allowed`` ``[rows, words]`` forbids at
        the dtype's lowest value (what :class:`~core.constrained.TorchGrammarMask` gives them)."""
        bits = allowed.index_select(1, self.word).bitwise_right_shift(self.bit) & 1
        return torch.where(bits.bool(), logits, torch.finfo(logits.dtype).min)


# ------------------------------------------------------------------- buckets


class _Bucket:
    """Static buffers of one (batch, cache_len) shape and the graphs captured on them."""

    def __init__(
        self, lay: _Layout, batch: int, length: int, parent: _Bucket | None = None
    ) -> None:
        dev, dtype = lay.device, lay.dtype
        self.batch, self.length = batch, length
        self.keys: list[Any]
        self.values: list[Any]
        self.tok: Any
        self.step: Any
        self.pad: Any
        if parent is not None:  # the first ``batch`` rows of ``parent``: views, one step counter
            self.keys = [None if k is None else k[:batch] for k in parent.keys]
            self.values = [None if v is None else v[:batch] for v in parent.values]
            self.tok, self.step, self.pad = parent.tok[:batch], parent.step, parent.pad[:batch]
        else:
            # a layer without a cache of its own (Gemma 4's KV-shared layers) gets None
            self.keys = [
                None
                if shape is None
                else torch.zeros(batch, shape[0], slots, shape[1], dtype=dtype, device=dev)
                for shape, slots in zip(lay.cache_shapes(), lay.slot_counts(length), strict=True)
            ]
            self.values = [None if k is None else torch.zeros_like(k) for k in self.keys]
            self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
            self.step = torch.zeros(1, dtype=torch.long, device=dev)
            self.pad = torch.zeros(batch, dtype=torch.long, device=dev)
        # step-major, so that a burst of steps is one contiguous block to copy
        self.history = torch.zeros(length + 1, batch, dtype=torch.long, device=dev)
        self.temperature = torch.ones(1, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(1, dtype=torch.float32, device=dev)
        self.penalty = torch.ones(1, dtype=torch.float32, device=dev)
        self.seen: Any = None
        self.bias: Any = None
        #: a grammar's bitmask, int32 (batch, vocab / 32), and how to read it
        self.allowed: Any = None
        self.bits: Any = None  # _Bits, made with the first grammar
        self.vocab = lay.vocab
        self.graphs: dict[_Sampler, Any] = {}
        #: masked samplers: (forward graph, sampling graph, the forward graph's logits)
        self.split_graphs: dict[_Sampler, tuple[Any, Any, Any]] = {}
        #: the last split forward's float32 logits ``[batch, vocab]``
        self.logits: Any = None
        self.pool: Any = None
        #: (width, padded) -> (graph, ids, mask, logits) of captured prefills
        self.prefills: OrderedDict[tuple[int, bool], tuple[Any, Any, Any, Any]] = OrderedDict()
        self.prefill_pool: Any = None

    def configure(self, params: SamplingParams, how: _Sampler) -> None:
        self.temperature.fill_(params.temperature if params.temperature > 0 else 1.0)
        self.top_p.fill_(params.top_p)
        self.penalty.fill_(params.repetition_penalty or 1.0)
        if how.penalty and self.seen is None:
            self.seen = torch.zeros(
                self.batch, self.vocab, dtype=torch.bool, device=self.tok.device
            )
        if how.masked and self.allowed is None:
            self.bits = _Bits(self.vocab, self.tok.device)
            self.allowed = torch.full(
                (self.batch, self.bits.words), -1, dtype=torch.int32, device=self.tok.device
            )
        if how.masked:
            self.allowed.fill_(-1)
        if how.bias:
            if self.bias is None:
                self.bias = torch.zeros(self.vocab, dtype=torch.float32, device=self.tok.device)
            self.bias.zero_()
            pairs = [(t, v) for t, v in params.logit_bias if t < self.vocab]
            if pairs:
                ids = torch.tensor([t for t, _ in pairs], device=self.tok.device)
                self.bias[ids] = torch.tensor([v for _, v in pairs], device=self.tok.device)


@dataclass
class _Caches:
    """Per-layer key and value buffers outside a bucket (a prompt prefilled on its own)."""

    keys: list[Any]
    values: list[Any]

    @staticmethod
    def of(lay: Any, rows: int, slots: int) -> _Caches:
        """``slots`` slots for every layer that keeps a cache (None for the others)."""
        keys = [
            None
            if shape is None
            else torch.empty(rows, shape[0], slots, shape[1], dtype=lay.dtype, device=lay.device)
            for shape in lay.cache_shapes()
        ]
        return _Caches(keys, [None if k is None else torch.empty_like(k) for k in keys])


class _Engine:
    """Per-model state: the layout, the compiled step and the buckets."""

    def __init__(self, model: Any, layout: _Layout, compile: bool | str, cuda_graphs: bool) -> None:
        self.layout = layout
        self.compile = compile
        self.use_graphs = cuda_graphs
        self.buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()
        self.fallbacks: list[str] = []
        #: prompts padded to PREFILL_STEP widths and run as CUDA graphs (with graphs on)
        self.prefill_graphs = cuda_graphs and _flag("GEMMA_LOCAL_PREFILL_GRAPHS", True)
        #: the decode step's forward uncompiled, and as it runs (compiled where it compiles)
        self.eager_forward: Callable[..., Any] = _decode_forward
        self.forward: Callable[..., Any] = _decode_forward
        self.prefill_layer: Callable[..., Any] = _prefill_layer
        #: a prompt's new tokens over its stored prefix (:func:`_extend_layer`; compiled with
        #: the prefill: eagerly, 48 layers of small kernels cost the 12b ~120 ms of host time)
        self.extend_layer: Callable[..., Any] = _extend_layer
        #: seconds spent compiling (first decode step, first prompt), for the benchmark
        self.compile_seconds: dict[str, float] = {}
        #: compiles buckets on a thread of its own while their requests take the plain path
        self.background = _Background(self)
        #: graphs a request ran without, captured when the model thread is idle (:meth:`idle`):
        #: (bucket key, sampler, split) decode steps and (bucket key, width, padded) prefills
        self.pending_steps: set[tuple[tuple[int, int], _Sampler, bool]] = set()
        self.pending_prefills: set[tuple[tuple[int, int], int, bool]] = set()
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            # e.g. "max-autotune-no-cudagraphs"; never a cudagraph mode: we capture ourselves.
            mode = os.environ.get("GEMMA_LOCAL_COMPILE_MODE") or None
            options = None
            if backend == "inductor" and mode is None and _flag("GEMMA_LOCAL_TUNE", True):
                # Batch-1 matrix-vector products become tuned Triton reductions (with the
                # norms fused in) instead of cuBLAS GEMMs: the gpt-fast recipe.
                options = {"coordinate_descent_tuning": True}

            def compiled(fn: Callable[..., Any], **kwargs: Any) -> Any:
                return torch.compile(
                    fn, backend=backend, mode=mode if backend == "inductor" else None, **kwargs
                )

            if _flag("GEMMA_LOCAL_REGIONAL", True):
                # One compiled layer for every layer (plus the step's inputs and the
                # logits): seconds to compile where the whole step takes minutes.
                parts = tuple(
                    compiled(fn, options=options, dynamic=False)
                    for fn in (_decode_inputs, _decode_layer, _decode_logits)
                )
                self.forward = functools.partial(_decode_forward, parts=parts)
            else:
                self.forward = compiled(_decode_forward, options=options, dynamic=None)
            if _flag("GEMMA_LOCAL_COMPILE_PREFILL", True):
                # Eager, a prompt's ~30 small kernels a layer cost more host time than GPU
                # time. One compiled layer (dynamic shapes) serves every layer and prompt
                # length: regional compilation, seconds instead of a whole-model compile.
                self.prefill_layer = compiled(_prefill_layer, dynamic=True)
                self.extend_layer = compiled(_extend_layer, dynamic=True)

    def shape_of(
        self, prompts: Sequence[Prompt], sink: TokenSink
    ) -> tuple[int, bool, tuple[int, int]]:
        """(prompt width, whether its prefill is graphed, its bucket's (batch, cache length))."""
        width = max(len(p.ids) for p in prompts)
        graphed = self.prefill_graphs and width <= PREFILL_GRAPH_MAX
        if graphed:  # a few widths, so that a graph serves many prompt lengths
            width = -(-width // PREFILL_STEP) * PREFILL_STEP
        steps = max(sink.max_new_tokens - 1, 0)  # the first token comes from the prefill
        return width, graphed, (batch_bucket(len(prompts)), cache_len(width + steps))

    def ready_for(self, prompts: Sequence[Prompt], sink: TokenSink) -> bool:
        """Whether the request's bucket has its compiled code (else it starts compiling in
        the background, unless ``GEMMA_LOCAL_COMPILE_WAIT=1``)."""
        width, _, key = self.shape_of(prompts, sink)
        return self.ready(key, width)

    def ready(self, key: tuple[int, int], width: int) -> bool:
        """Whether a request of bucket ``key`` (prompt ``width``) may run now without waiting
        for a compile; if not, the bucket is queued to compile in the background."""
        if not self.compiles() or _flag("GEMMA_LOCAL_COMPILE_WAIT", False):
            return True
        return self.background.ready(key, width)

    def extend(self, stored: _Caches, start: int, ids: Sequence[int]) -> tuple[Any, _Caches]:
        """Run ``ids[start:]`` over the stored keys and values of ``ids[:start]`` (prompt-prefix
        reuse; one row): the last logits and the whole prompt's caches."""
        lay = self.layout
        length = len(ids)
        prompt = torch.tensor([list(ids[start:])], device=lay.device)
        x = lay.embed(prompt)
        rope = _position_embeddings(lay, x, torch.arange(start, length, device=lay.device)[None])
        keys, values, masks = [], [], {}
        for i in range(len(lay.layers)):
            past_k, past_v = stored.keys[i], stored.values[i]
            window = lay.windows[i]
            held = int(past_k.shape[2]) + len(prompt[0])
            if (window, held) not in masks:
                masks[(window, held)] = extension_mask(start, length, held, window, lay.device)
            cos, sin = rope[lay.types[i]]
            args = (lay, _Weights.of(lay, i), x, past_k, past_v, cos, sin, masks[(window, held)])
            x, k, v = self._extend_layer(*args)
            keys.append(k)
            values.append(v)
        return _logits(lay, x), _Caches(keys, values)

    def _extend_layer(self, *args: Any) -> Any:
        """:attr:`extend_layer` (compiled where the engine compiles; eager if that fails)."""
        if self.extend_layer is _extend_layer:
            return _extend_layer(*args)
        try:
            with _RecompileRoom():
                return self.extend_layer(*args)
        except Exception as exc:  # a model the compiler cannot take: run it eagerly
            self._fall_back(f"compiling the prefix extension failed ({type(exc).__name__}: {exc})")
            self.extend_layer = _extend_layer
            return _extend_layer(*args)

    def compiles(self) -> bool:
        """Whether some part of the step is compiled (so a new bucket has code to build)."""
        return self.forward is not self.eager_forward or self.prefill_layer is not _prefill_layer

    def warm(self, key: tuple[int, int], width: int) -> None:
        """Compile bucket ``key``'s code: run a prompt of ``width`` (padded and not) and two
        decode steps on buffers of its own, on a stream of its own (the background thread)."""
        batch, length = key
        device = self.layout.device
        cuda = device.type == "cuda"
        started = time.perf_counter()
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if cuda:
                stack.enter_context(torch.cuda.device(device))
                stream = torch.cuda.Stream(device)
                stack.enter_context(torch.cuda.stream(stream))
            b = _Bucket(self.layout, batch, length)
            ids = torch.zeros(batch, max(width, 2), dtype=torch.long, device=device)
            for padded in (False, True):
                mask = torch.ones_like(ids)
                if padded:
                    mask[:, 0] = 0
                self._prefill(b, ids, mask, padded)
            b.step.fill_(width)
            for _ in range(2):
                self._forward(b)
                b.step.add_(1)
            if self.extend_layer is not _extend_layer:  # prompt-prefix reuse (one row)
                stored = _Caches.of(self.layout, 1, width)
                for k in stored.keys + stored.values:
                    k.zero_()
                self.extend(stored, width, [0] * (width + 2))
            if cuda:
                stream.synchronize()
        seconds = round(time.perf_counter() - started, 1)
        self.compile_seconds[f"background, batch {batch}, {length} slots"] = seconds
        logger.info("fast path: batch %d, %d slots compiled in %.1f s", batch, length, seconds)

    def describe(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "active": True,
            "forward": "gemma",
            "compile": self.compile,
            "cuda_graphs": self.use_graphs,
            "fused_projections": lay.fused,
            "decode_attention": "triton" if lay.decode_kernel else "matmul",
            "triton_products": lay.gemv is not None,
            "folded_residuals": lay.gemv_residual is not None,
            "rope_store": lay.rope_store is not None,
            "pdl": lay.pdl,
            "residual_norm": lay.residual_norm is not None,
            "compiled_prefill": self.prefill_layer is not _prefill_layer,
            "prefill_graphs": sum(len(b.prefills) for b in self.buckets.values()),
            "compile_seconds": dict(self.compile_seconds),
            "buckets": [list(key) for key in self.buckets],
            "compiled_buckets": sorted(list(key) for key in self.background.done),
            "fallbacks": list(self.fallbacks),
        }

    # -------------------------------------------------------------- buckets

    def bucket(self, batch: int, length: int) -> _Bucket:
        key = (batch, length)
        b = self.buckets.pop(key, None)
        if b is None:
            while len(self.buckets) >= MAX_BUCKETS:
                self.buckets.popitem(last=False)
            b = _Bucket(self.layout, batch, length)
        self.buckets[key] = b
        return b

    def _step(self, b: _Bucket, how: _Sampler) -> None:
        logits, _ = self._forward(b)
        self._sample_step(b, how, logits)

    def _sample_step(self, b: _Bucket, how: _Sampler, logits: Any) -> None:
        nxt = _sample(logits, b, how)
        b.tok.copy_(nxt[:, None])
        b.history.index_copy_(0, b.step + 1, nxt[None, :])
        if how.penalty:
            b.seen.scatter_(1, nxt[:, None], True)
        b.step.add_(1)

    def _forward(self, b: _Bucket) -> Any:
        args = (self.layout, b.keys, b.values, b.tok, b.step, b.pad)
        if self.forward is self.eager_forward:
            return self.eager_forward(*args)
        try:
            with _RecompileRoom():
                return self.forward(*args)
        except Exception as exc:  # a model the compiler cannot take: run it eagerly
            self._fall_back(f"torch.compile failed ({type(exc).__name__}: {exc}); running eagerly")
            self.forward = self.eager_forward
            return self.eager_forward(*args)

    def _prefill(self, b: _Bucket | _Caches, ids: Any, mask: Any, padded: bool) -> Any:
        args = (self.layout, b.keys, b.values, ids, mask, padded)
        if self.prefill_layer is _prefill_layer:
            return _prefill_forward(*args)
        # dynamo specialises on batch 1 vs more and on padding: time each first use
        kind = f"prefill, batch {'1' if ids.shape[0] == 1 else 'n'}{', padded' if padded else ''}"
        started = time.perf_counter() if kind not in self.compile_seconds else None
        try:
            with _RecompileRoom():
                logits = _prefill_forward(*args, layer_fn=self.prefill_layer)
            if started is not None:
                self.compile_seconds[kind] = round(time.perf_counter() - started, 1)
            return logits
        except Exception as exc:  # a model the compiler cannot take: run it eagerly
            self._fall_back(f"compiling the prefill failed ({type(exc).__name__}: {exc})")
            self.prefill_layer = _prefill_layer
            return _prefill_forward(*args)

    def _prefill_graphed(self, b: _Bucket, ids: Any, mask: Any, padded: bool) -> Any:
        """:meth:`_prefill` as a CUDA graph replay: the first time a (width, padding)
        comes to this bucket the prompt runs as usual and the graph is captured after
        it (host time, about one more prefill's launches), then it is replayed with the
        inputs copied into its buffers."""
        key = (int(ids.shape[1]), padded)
        entry = b.prefills.get(key)
        if entry is None:
            if not self.use_graphs:
                return self._prefill(b, ids, mask, padded)
            if not self.capture_now():
                self.pending_prefills.add(((b.batch, b.length), key[0], padded))
                return self._prefill(b, ids, mask, padded)
            return self._capture_prefill(b, ids, mask, padded)
        b.prefills.move_to_end(key)
        graph, static_ids, static_mask, logits = entry
        static_ids.copy_(ids)
        static_mask.copy_(mask)
        graph.replay()
        return logits

    def _capture_prefill(self, b: _Bucket, ids: Any, mask: Any, padded: bool) -> Any:
        """Run the prompt on a side stream (the capture's warm-up; its logits are the
        answer), then capture the same prefill on buffers of its own."""
        device = self.layout.device
        static_ids, static_mask = ids.clone(), mask.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            logits = self._prefill(b, static_ids, static_mask, padded)
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            if b.prefill_pool is None:
                b.prefill_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=b.prefill_pool, capture_error_mode="thread_local"):
                out = self._prefill(b, static_ids, static_mask, padded)
        except Exception as exc:
            torch.cuda.synchronize(device)
            message = f"CUDA graph capture of the prefill failed ({type(exc).__name__}: {exc})"
            self._fall_back(message)
            self.prefill_graphs = False
            return logits
        while len(b.prefills) >= MAX_PREFILL_GRAPHS:
            b.prefills.popitem(last=False)
        b.prefills[(int(ids.shape[1]), padded)] = (graph, static_ids, static_mask, out)
        logger.debug("fast path: prefill graph for batch %d, width %d", b.batch, ids.shape[1])
        return logits

    def _fall_back(self, message: str) -> None:
        logger.warning("fast path: %s", message)
        self.fallbacks.append(message)

    def capture_now(self) -> bool:
        """Whether a graph a request lacks is captured in the request (before its prompt is
        read: ``GEMMA_LOCAL_COMPILE_WAIT=1``, for benchmarks of the steady state) rather
        than when the model thread is next idle (:meth:`idle`; the request runs its steps
        uncaptured meanwhile, so its first token waits for no capture)."""
        return _flag("GEMMA_LOCAL_COMPILE_WAIT", False)

    def stepper(self, b: _Bucket, how: _Sampler) -> Callable[[], None]:
        """A callable that runs one decode step (a graph replay where possible; a missing
        graph is captured now or when the model thread is idle: :meth:`capture_now`)."""
        if self.use_graphs:
            graph = b.graphs.get(how)
            if graph is None and self.capture_now():
                graph = self._capture(b, how)
            elif graph is None:
                self.pending_steps.add(((b.batch, b.length), how, False))
            if graph is not None:
                return graph.replay
        return lambda: self._step(b, how)

    def split_stepper(
        self, b: _Bucket, how: _Sampler, capture: bool | None = None
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """A decode step as two callables, the forward and the sampling (graph replays where
        possible), for a masked sampler: the grammar's mask is loaded between them.
        ``capture``: capture a missing graph now (default :meth:`capture_now`)."""
        if self.use_graphs:
            graphs = b.split_graphs.get(how)
            if graphs is None and (self.capture_now() if capture is None else capture):
                graphs = self._capture(b, how, split=True)
            elif graphs is None:
                self.pending_steps.add(((b.batch, b.length), how, True))
            if graphs is not None:
                forward_graph, sample_graph, logits = graphs

                def replay() -> None:
                    forward_graph.replay()
                    b.logits = logits

                return replay, sample_graph.replay

        def forward() -> None:
            b.logits = self._forward(b)[0]

        return forward, lambda: self._sample_step(b, how, b.logits)

    def _capture(self, b: _Bucket, how: _Sampler, split: bool = False) -> Any:
        """Warm up (compiling if needed) and capture one step; before the prompt is read."""
        device = self.layout.device
        started = time.perf_counter()
        first = self.compile and not any(bucket.graphs for bucket in self.buckets.values())
        logger.info(
            "fast path: %s the decode step for batch %d, %d cache slots (once per shape)%s",
            "compiling and capturing" if self.compile else "capturing",
            b.batch,
            b.length,
            "; the first compile takes a minute or two" if first else "",
        )
        rng = torch.cuda.get_rng_state(device)
        b.step.zero_()  # warm-up and capture write slots 0..3, before the prompt is read
        b.pad.zero_()
        b.tok.zero_()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._step(b, how)
            torch.cuda.current_stream(device).wait_stream(side)
            if b.pool is None:
                b.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=b.pool, capture_error_mode="thread_local"):
                if split:
                    logits, _ = self._forward(b)
                else:
                    self._step(b, how)
            if split:  # the sampling reads the forward graph's logits
                sampling = torch.cuda.CUDAGraph()
                with torch.cuda.graph(sampling, pool=b.pool, capture_error_mode="thread_local"):
                    self._sample_step(b, how, logits)
                graph = (graph, sampling, logits)
        except Exception as exc:
            torch.cuda.synchronize(device)
            self._fall_back(f"CUDA graph capture failed ({type(exc).__name__}: {exc})")
            self.use_graphs = False
            return None
        finally:
            torch.cuda.set_rng_state(rng, device)
        if split:
            b.split_graphs[how] = graph
        else:
            b.graphs[how] = graph
        seconds = round(time.perf_counter() - started, 1)
        self.compile_seconds[f"decode step, batch {b.batch}, {b.length} slots"] = seconds
        logger.info("fast path: decode step ready in %.1f s", seconds)
        return graph

    def idle(self) -> int:
        """Capture the graphs requests ran without (the model thread is idle); how many.

        A bucket's decode step is captured before a prompt is read (its warm-up and
        capture write cache slots 0-3), so a request that finds none runs its steps
        uncaptured and the capture waits for a moment when no request is running.
        """
        done = 0
        steps, self.pending_steps = self.pending_steps, set()
        prefills, self.pending_prefills = self.pending_prefills, set()
        for key, how, split in sorted(steps, key=lambda p: (p[0], p[2])):
            b = self.buckets.get(key)
            if b is None or not self.use_graphs:
                continue
            if how not in (b.split_graphs if split else b.graphs):
                done += self._capture(b, how, split) is not None
        for key, width, padded in sorted(prefills):
            b = self.buckets.get(key)
            if b is None or not self.use_graphs or (width, padded) in b.prefills:
                continue
            ids = torch.zeros(b.batch, width, dtype=torch.long, device=self.layout.device)
            mask = torch.ones_like(ids)
            if padded:
                mask[:, 0] = 0
            self._capture_prefill(b, ids, mask, padded)
            done += (width, padded) in b.prefills
        return done

    # -------------------------------------------------------------- request

    def run(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        sink: TokenSink,
        pad_id: int,
        grammar: GrammarMatchers | None = None,
    ) -> None:
        lay = self.layout
        device = lay.device
        batch = len(prompts)
        width, graphed, key = self.shape_of(prompts, sink)
        steps = sink.max_new_tokens - 1  # the first token comes from the prefill
        b = self.bucket(*key)
        how = _Sampler.of(params, masked=grammar is not None)
        b.configure(params, how)
        # may compile and capture (first use of this bucket); one token needs no step
        step: Any = None
        if steps > 0:
            step = self.split_stepper(b, how) if how.masked else self.stepper(b, how)

        # Rows past the prompts fill the bucket: all padding, their tokens are dropped.
        pads = [width - len(p.ids) for p in prompts] + [width] * (b.batch - batch)
        rows = [list(p.ids) for p in prompts] + [[] for _ in range(b.batch - batch)]
        ids = torch.tensor([[pad_id] * n + row for n, row in zip(pads, rows, strict=True)])
        mask = torch.tensor([[0] * n + [1] * (width - n) for n in pads])
        ids, mask = ids.to(device), mask.to(device)
        b.pad.copy_(torch.tensor(pads))
        if graphed:
            logits = self._prefill_graphed(b, ids, mask, padded=any(pads))
        else:
            logits = self._prefill(b, ids, mask, padded=any(pads))
        if how.penalty:  # the prompt's tokens, not its padding
            b.seen.zero_()
            b.seen.scatter_(1, torch.where(mask.bool(), ids, ids[:, -1:]), True)
        masks = _MaskLoader(b, grammar) if grammar is not None else None
        if masks is not None:
            masks.load()
        first = _sample(logits, b, how)
        if how.penalty:
            b.seen.scatter_(1, first[:, None], True)
        b.tok.copy_(first[:, None])
        b.step.fill_(width)
        tokens = first.tolist()[:batch]
        if masks is not None:
            masks.push(sink, tokens)
        else:
            sink.push(tokens)
        if step is None or sink.done:
            return
        if masks is not None:
            forward, sample = step
            self._decode_masked(b, forward, sample, steps, sink, masks)
        else:
            self._decode(b, step, width, steps, sink, batch)

    def _decode_masked(
        self,
        b: _Bucket,
        forward: Callable[[], None],
        sample: Callable[[], None],
        steps: int,
        sink: TokenSink,
        masks: _MaskLoader,
    ) -> None:
        """Decode ``steps`` constrained steps: each step's mask is computed on the host while
        the step's forward runs; the token is read back before the next mask."""
        cuda = self.layout.device.type == "cuda"
        host = torch.empty(b.batch, dtype=torch.long, device="cpu", pin_memory=cuda)
        event = torch.cuda.Event() if cuda else None
        forward()
        for i in range(steps):
            masks.load()  # the grammar has seen every token so far; the forward is running
            sample()
            host.copy_(b.tok[:, 0], non_blocking=cuda)
            if event is not None:
                event.record()
            if i + 1 < steps:
                forward()  # the next step's input is already on the device
            if event is not None:
                event.synchronize()
            masks.push(sink, host.tolist()[: masks.rows])
            if sink.done:
                return

    def _decode(
        self,
        b: _Bucket,
        step: Callable[[], None],
        width: int,
        steps: int,
        sink: TokenSink,
        rows: int,
    ) -> None:
        """Run ``steps`` decode steps in bursts; read each burst while the next one runs."""
        cuda = self.layout.device.type == "cuda"
        host = torch.empty((2, BURST, b.batch), dtype=torch.long, device="cpu", pin_memory=cuda)
        events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else []
        launched = 0
        pending: tuple[int, int] | None = None
        slot = 0
        while True:
            current = None
            if launched < steps:
                count = min(BURST, steps - launched)
                for _ in range(count):
                    step()
                start = width + 1 + launched
                host[slot, :count].copy_(b.history[start : start + count], non_blocking=cuda)
                if cuda:
                    events[slot].record()
                current, launched, slot = (slot, count), launched + count, slot ^ 1
            if pending is not None:
                done_slot, count = pending
                if cuda:
                    events[done_slot].synchronize()
                for tokens in host[done_slot, :count].tolist():
                    sink.push(tokens[:rows])
                    if sink.done:
                        return
            if current is None:
                return
            pending = current


class _Background:
    """Compiles an engine's buckets on a thread of its own (see :func:`generate`).

    :meth:`ready` answers at once: ``True`` for a bucket whose compiled code is
    built, else ``False`` after queueing it. The thread warms one bucket at a
    time (:meth:`_Engine.warm`: a prefill and two decode steps on buffers of its
    own, on a CUDA stream of its own, which is when ``torch.compile`` compiles)
    and ends when the queue is empty. It is not a daemon: a process that exits
    mid-compile waits for the bucket being compiled (a compile cannot be
    interrupted); :meth:`stop` (``release``, the client's ``close``) drops the rest.
    """

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        #: buckets whose compiled code is built (or whose compile failed: the engine fell back)
        self.done: set[tuple[int, int]] = set()
        self.queue: list[tuple[tuple[int, int], int]] = []
        self.current: tuple[int, int] | None = None
        self.thread: threading.Thread | None = None
        self.stopped = False
        self.lock = threading.Condition()

    def ready(self, key: tuple[int, int], width: int) -> bool:
        with self.lock:
            if key in self.done:
                return True
            if self.stopped:
                return False
            if key != self.current and all(k != key for k, _ in self.queue):
                self.queue.append((key, width))
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._work, name="gemma-local-compile", daemon=False
                )
                self.thread.start()
        return False

    def _work(self) -> None:
        while True:
            with self.lock:
                if self.stopped or not self.queue:
                    self.thread = None
                    self.lock.notify_all()
                    return
                key, width = self.queue.pop(0)
                self.current = key
            try:
                self.engine.warm(key, width)
            except Exception as exc:  # the request path compiles it (or falls back) itself
                self.engine._fall_back(
                    f"compiling batch {key[0]}, {key[1]} slots in the background failed "
                    f"({type(exc).__name__}: {exc})"
                )
            with self.lock:
                self.done.add(key)
                self.current = None

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the thread has nothing left to compile; whether it has not."""
        with self.lock:
            return self.lock.wait_for(lambda: self.thread is None, timeout)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.queue.clear()


class _MaskLoader:
    """Feeds a request's sampled tokens to its grammar and loads the next mask onto the device."""

    def __init__(self, b: _Bucket, grammar: GrammarMatchers) -> None:
        cuda = b.tok.device.type == "cuda"
        self.b, self.grammar = b, grammar
        self.rows = len(grammar.matchers)
        # padding rows and ids past the tokenizer's vocabulary: all / never allowed
        self.host = torch.full(tuple(b.allowed.shape), -1, dtype=torch.int32, pin_memory=cuda)
        self.words = min(grammar.bitmask.shape[1], self.host.shape[1])
        self.host[: self.rows, self.words :] = 0
        self.free = False  # every row retired (prose, or finished): the mask is all ones

    def load(self) -> None:
        """Copy every row's mask for the next token to the device (after the queued work)."""
        if self.free:
            return
        if all(self.grammar.retired):
            self.host.fill_(-1)
            self.free = True
        else:
            bitmask = torch.from_numpy(self.grammar.fill())
            self.host[: self.rows, : self.words].copy_(bitmask[:, : self.words])
        self.b.allowed.copy_(self.host, non_blocking=self.b.tok.device.type == "cuda")

    def push(self, sink: TokenSink, tokens: list[int]) -> None:
        """``tokens`` into the sink, then each row that was live into its matcher."""
        live = [not done for done in sink.finished()]
        sink.push(tokens)
        for row, (token, done) in enumerate(zip(tokens, sink.finished(), strict=True)):
            if live[row]:
                self.grammar.advance(row, token)
            if done:
                self.grammar.retire(row)


def _flag(name: str, default: bool) -> bool:
    """An on/off switch from the environment (``1``/``on``/``true``, ``0``/``off``/``false``).

    ``GEMMA_LOCAL_REGIONAL=0``: the whole decode step compiles as one graph (30 s
    against 100 s to compile on the 12b; 1.7% faster there, 2% slower on the 1b).
    ``GEMMA_LOCAL_DECODE_ATTENTION=0``: decode attention stays matmul + softmax.
    """
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "on", "true"):
        return True
    if value in ("0", "off", "false"):
        return False
    return default


def _use_triton_products(lay: _Layout) -> None:
    """Switch on the gemv and rope/store ops where they run (and ran right) on the model's
    GPU; ``GEMMA_LOCAL_GEMV=0`` / ``GEMMA_LOCAL_ROPE_STORE=0`` keep inductor's kernels
    (``GEMMA_LOCAL_RESIDUAL_NORM=0``: inductor's add + norms at 2-16 rows;
    ``GEMMA_LOCAL_SWAP=0``: the 2-16-row q/k/v and gate/up products on cuBLAS).
    ``GEMMA_LOCAL_FOLD_RESIDUAL``: ``0`` no residual form, ``all`` before q/k/v and
    gate/up, default where :func:`core.accel.cuda.gemv.folded` says it pays."""
    device, dtype = lay.device, lay.dtype
    with torch.cuda.device(device):  # triton launches on the current device
        if (
            _flag("GEMMA_LOCAL_GEMV", True)
            and gemv.available(device)  # registers the op first
            and gemv.works(dtype, device)
        ):
            lay.gemv = gemv.gemv
            lay.swap = _flag("GEMMA_LOCAL_SWAP", True)
            if _flag("GEMMA_LOCAL_RESIDUAL_NORM", True):
                lay.residual_norm = gemv.residual_norm
            fold = os.environ.get("GEMMA_LOCAL_FOLD_RESIDUAL", "").strip().lower()
            if fold not in ("0", "off", "false"):
                lay.gemv_residual = gemv.gemv_residual
                lay.fold = "all" if fold == "all" else "auto"
        if (
            _flag("GEMMA_LOCAL_ROPE_STORE", True)
            and rope_store.supports(lay.head_dim)
            and rope_store.available(device)
            and rope_store.works(lay.heads, lay.kv_heads, lay.head_dim, dtype, device, lay.qk_norm)
        ):
            lay.rope_store = rope_store.rope_store


def _use_pdl(lay: _Layout) -> None:
    """Launch the one-row decode step's Triton ops with programmatic dependent launch
    (:func:`_pdl`), where the GPU has it (Hopper and later) and every op runs right that
    way; ``GEMMA_LOCAL_PDL=0`` keeps plain launches.

    Each op is then launched while the one before it finishes and waits
    (``griddepcontrol.wait``) for it before it reads its output; a product lets the
    next op launch once its own products are done. The launch gap between two of a
    layer's nine kernels overlaps the end of the first. The residual add + norm
    between two products becomes a kernel of the chain (:func:`core.accel.cuda.gemv.residual_add`):
    inductor's would have to finish before the next op may launch.

    On an H200 (probes 14 and 15, ``benchmarks/probe.py model:12b:PDL=0 model:12b``
    in one process): the 12b's step 6.71 -> 6.38 ms, 147 -> 155 tok/s; the 1b's 1.073
    -> 1.056 ms. Letting the next kernel launch at the start instead of after the
    products filled the SMs with programs that wait (6.62 ms); prefetching the next
    product's first weight lines into L2 before the wait cost time at every size tried.
    """
    device, dtype = lay.device, lay.dtype
    if lay.gemv is None or not _flag("GEMMA_LOCAL_PDL", True):
        return
    with torch.cuda.device(device):
        if not gemv.pdl_available(device) or not gemv.works(dtype, device, pdl=True):
            return
        if lay.rope_store is not None and not rope_store.works(
            lay.heads, lay.kv_heads, lay.head_dim, dtype, device, lay.qk_norm, pdl=True
        ):
            return
        shape = (1, lay.kv_heads, lay.rep, lay.head_dim)
        if lay.decode_kernel is not None and not decode_attention.works(
            shape, dtype, device, pdl=True
        ):
            return
    lay.pdl = True
    lay.residual_add = gemv.residual_add


class _RecompileRoom:
    """Raise dynamo's recompile limit while our step compiles (shapes differ per bucket)."""

    def __enter__(self) -> None:
        config = torch._dynamo.config
        self.name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        self.old = getattr(config, self.name)
        setattr(config, self.name, max(self.old, 64))

    def __exit__(self, *exc: object) -> None:
        setattr(torch._dynamo.config, self.name, self.old)


def _engine(model: Any, *, compile: bool | str | None, cuda_graphs: bool | None) -> _Engine:
    engine = getattr(model, _ENGINE_ATTR, None)
    if engine is not None:
        return engine
    _import_torch()
    found = _Layout.find(model)
    if found is None:  # Gemma 4: the model's own modules (own_forward)
        from . import own_forward

        engine = own_forward.engine(model, compile=compile, cuda_graphs=cuda_graphs)
        setattr(model, _ENGINE_ATTR, engine)
        return engine
    layout = found
    cuda = layout.device.type == "cuda"
    if compile is None:
        compile = cuda and _flag("GEMMA_LOCAL_COMPILE", True)
    if cuda_graphs is None:
        cuda_graphs = cuda
    fuse = os.environ.get("GEMMA_LOCAL_FUSE", "auto").strip().lower()
    if fuse in ("1", "on", "true") or (cuda and fuse in ("auto", "")):
        layout.fuse_projections()
    if cuda and compile and not layout.decode_sdpa and _flag("GEMMA_LOCAL_DECODE_ATTENTION", True):
        shape = (1, layout.kv_heads, layout.rep, layout.head_dim)
        with torch.cuda.device(layout.device):  # triton launches on the current device
            if (
                decode_attention.supports(layout.head_dim, layout.rep)
                and decode_attention.available(layout.device)  # registers the op first
                and decode_attention.works(shape, layout.dtype, layout.device)
            ):
                layout.decode_kernel = decode_attention.decode_attention
    if cuda and compile and layout.fused:
        _use_triton_products(layout)
        _use_pdl(layout)
    engine = _Engine(model, layout, compile, bool(cuda_graphs))
    setattr(model, _ENGINE_ATTR, engine)
    return engine
