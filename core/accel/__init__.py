"""The accelerator wing: the backends' fast paths, behind the few calls they make.

Each backend's token primitive (:mod:`core.transformers_backend`,
:mod:`core.mlx_backend`) works everywhere on its own; this package holds what
makes it fast on one kind of hardware. The backends call only the functions
below, and each import of a module in the wing happens inside them, so
importing ``core`` or ``core.accel`` imports no torch, triton or mlx.

**CUDA: the fast decode path** (:mod:`core.accel.cuda`). :func:`cuda_generate`
serves a transformers request with a static KV cache, a compiled decode step
replayed as a CUDA graph, sampling on the device and tokens fetched in bursts
(:mod:`core.accel.cuda.fast_path`), the decode step running three Triton ops of
ours, each a ``torch.library`` op switched on after a self-check on the GPU:
the matrix-vector products (:mod:`core.accel.cuda.gemv`), q/k norms + RoPE +
the KV-cache write (:mod:`core.accel.cuda.rope_store`) and flash-decoding
attention (:mod:`core.accel.cuda.decode_attention`); their kernels are the
``_*_triton`` modules, imported with torch and triton on first use. It applies
to Gemma 1/2/3 decoders on one CUDA device with ``sdpa`` or ``eager``
attention, for requests without a grammar (tools, JSON output) and without a
seed (seeded sampling keeps ``generate`` and its own ``torch.Generator``);
everything else returns ``False`` and takes ``model.generate``. Under greedy
decoding its tokens are the plain path's. Environment (the full list is
:mod:`core.accel.cuda.fast_path`'s):

* ``GEMMA_LOCAL_FAST_PATH`` = ``auto`` (default: CUDA only), ``on`` (any
  device; the CPU runs the same loop eagerly) or ``off``;
* ``GEMMA_LOCAL_COMPILE=0``: CUDA graphs of the eager kernels, no ``torch.compile``;
* ``GEMMA_LOCAL_DECODE_ATTENTION=0`` / ``GEMMA_LOCAL_GEMV=0`` /
  ``GEMMA_LOCAL_ROPE_STORE=0``: the decode step without that Triton op;
  ``GEMMA_LOCAL_PDL=0``: no programmatic dependent launch at one row;
  ``GEMMA_LOCAL_SWAP=0``: the 2-16-row q/k/v and gate/up products on cuBLAS
  instead of the gemv op's swapped form.

:func:`cuda_release` drops the compiled graphs and KV buffers a model keeps.

**MLX on the CPU: the split step** (:mod:`core.accel.mlx_split`). On a CPU
device (``mlx[cpu]`` on Linux, or ``mx.cpu`` as the default device) MLX runs
each stream on one core, so the MLX backend spreads a batch of two or more
rows over :func:`mlx_cpu_streams` (``cpu_streams`` on the client; by default
one per core, :func:`usable_cores`, at most one per row), and a Gemma 3 batch
whose projections are plain unquantized linear layers decodes with
:func:`mlx_split_step`: each stream computes a share of every matmul and of
the attention heads, giving mlx-lm's own logits bit for bit. Elsewhere (the
GPU, other models, quantized weights) :func:`mlx_split_step` returns ``None``
or the backend never asks.

**MLX on the CPU: products through numpy's BLAS** (:mod:`core.accel.mlx_blas`).
Unless the client was given ``cpu_streams``, a CPU device's float32 model has its
``nn.Linear`` products (and its tied output layer) computed by numpy's BLAS, which
``mlx[cpu]``'s own kernels trail by 5x at one row and 20x at 16
(:func:`mlx_cpu_blas`); the batch then runs on one stream. Its all-greedy batch steps
leave out mlx-lm's ``logsumexp`` over the vocabulary, whose exponentials are MLX's
scalar kernel there (:func:`mlx_greedy_steps`, :mod:`core.accel.mlx_greedy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..constrained import GrammarMatchers
    from ..params import SamplingParams
    from ..stream import Prompt, TokenSink

__all__ = [
    "cuda_batch",
    "cuda_generate",
    "cuda_release",
    "mlx_cpu_blas",
    "mlx_cpu_streams",
    "mlx_split_step",
    "usable_cores",
]


# ------------------------------------------------------------------- transformers


def cuda_generate(
    model: Any,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    sink: TokenSink,
    *,
    pad_id: int,
    grammar: GrammarMatchers | None = None,
) -> bool:
    """Serve the request on the fast decode path if it applies; ``False`` (nothing done) if not.

    Runs on the thread that owns ``model`` and pushes every step's tokens into
    ``sink``, as ``model.generate`` would (see
    :func:`core.accel.cuda.fast_path.supported` for when it applies);
    ``grammar`` (tools, JSON output) constrains the rows and is fed their tokens.
    """
    from .cuda import fast_path

    if not fast_path.supported(model, params):
        return False
    # False where the request's shape is still compiling (in the background): plain path
    return fast_path.generate(model, prompts, params, sink, pad_id=pad_id, grammar=grammar)


def cuda_batch(model: Any, grammar_for: Any, *, rows: int, prefixes: Any = None) -> Any | None:
    """The fast path's continuous batch of ``rows`` rows for ``model`` (a scheduler engine,
    :mod:`core.accel.cuda.slots`), or ``None`` where the fast path does not apply."""
    from .cuda import fast_path

    if not fast_path.supported(model):
        return None
    from .cuda import slots

    return slots.SlotBatch(
        model, grammar_for, rows=rows, slots=slots.slot_count(model), prefixes=prefixes
    )


def cuda_idle(model: Any) -> int:
    """Capture the CUDA graphs ``model``'s fast-path requests ran without (its thread, while
    no request runs: a first request of a shape waits for no capture); how many."""
    from .cuda import fast_path

    return fast_path.idle(model)


def cuda_release(model: Any) -> None:
    """Drop the compiled graphs and KV buffers the fast path keeps on ``model`` (if any)."""
    from .cuda import fast_path

    fast_path.release(model)


# ------------------------------------------------------------------------- MLX


def mlx_cpu_blas(model: Any) -> bool:
    """On a CPU device, ``model``'s float32 matrix products through numpy's BLAS (see
    :mod:`core.accel.mlx_blas`); whether it applied."""
    from . import mlx_blas

    return mlx_blas.use_blas(model)


def mlx_logit_rows(count: int) -> Any:
    """A context in which output layers on numpy's BLAS also give calls of up to ``count``
    positions their logits (speculative decoding; see :func:`core.accel.mlx_blas.logit_rows`)."""
    from . import mlx_blas

    return mlx_blas.logit_rows(count)


def mlx_greedy_steps(generator: Any) -> bool:
    """An mlx-lm ``BatchGenerator`` whose all-greedy steps take the argmax of the logits
    without normalising them first (see :mod:`core.accel.mlx_greedy`); whether it applied."""
    from . import mlx_greedy

    return mlx_greedy.skip_normalising(generator)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    from . import mlx_split

    return mlx_split.usable_cores()


def mlx_cpu_streams(count: int) -> list[Any]:
    """``count`` MLX CPU streams, made on the MLX thread when first needed and then reused."""
    from . import mlx_split

    return mlx_split._cpu_streams(count)


def mlx_split_step(model: Any, streams: Sequence[Any]) -> Any:
    """A batch decode step over ``streams`` for mlx-lm's ``BatchGenerator``, or ``None``.

    ``None`` where it does not apply (see :func:`core.accel.mlx_split.split_decode`).
    """
    from . import mlx_split

    return mlx_split.split_decode(model, streams)
