"""Fused decode attention for the CUDA fast path: one Triton flash-decoding op.

A decode step has one query per row and head against a static KV cache, so
attention there is a read of K and V bound by memory bandwidth. Spelt out as
``matmul -> masked_fill -> softmax -> matmul`` it takes four kernels and reads
the scores back and forth; :func:`decode_attention` is one custom op
(``gemma_local::decode_attention``, two Triton launches: a split over the slot
axis, then a small combine) that ``torch.compile`` puts in the compiled graph
and that CUDA graphs capture::

    q [B, KV, R, D], keys/values [B, KV, S, D], allowed [B, 1, 1, S]
        ──▶ split kernel, grid (B * KV, nsplit): scores, soft-cap, mask,
            online softmax, p @ V in fp32 per share of the slots
        ──▶ combine kernel, grid (B * KV * R,) ──▶ out [B, KV, R, D]

The kernels live in :mod:`core.accel.cuda._decode_attention_triton`, imported (and the op
registered) by :func:`available` or the first call; importing this module
imports neither torch nor triton. Call :func:`available` before
``torch.compile`` traces a function that uses the op, so that the op is
registered outside the trace.

:func:`reference` is the plain-torch attention the fast path used before (and
what the tests compare with).
"""

from __future__ import annotations

import functools
from typing import Any

from . import _triton_ops

#: Head dims the kernel is compiled for, and the most query heads per KV head it takes.
HEAD_DIMS = (64, 128, 256)
MAX_R = 16


@functools.cache
def _op() -> Any:
    """The registered op (imports torch and triton and registers it the first time)."""
    from . import _decode_attention_triton as kernels

    return kernels.decode_attention_op


def available(device: Any) -> bool:
    """Whether :func:`decode_attention` runs on ``device``: CUDA, with triton importable
    and the op registered (registering it here when needed)."""
    return _triton_ops.available(device, _op)


def works(
    q_shape: tuple[int, int, int, int], dtype: Any, device: Any, *, pdl: bool = False
) -> bool:
    """Run the op once on small random inputs of this layout and compare with
    :func:`reference`: False (and a warning) where the kernel does not compile or
    disagrees on this GPU, so that the caller keeps its plain attention."""
    import torch

    def error() -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        _, heads, rows, dim = q_shape
        q = torch.randn(2, heads, rows, dim, generator=gen, device=device).to(dtype)
        keys = torch.randn(2, heads, 200, dim, generator=gen, device=device).to(dtype)
        values = torch.randn_like(keys)
        allowed = torch.ones(2, 1, 1, 200, dtype=torch.bool, device=device)
        allowed[1, ..., :37] = False
        limit = torch.tensor([150], device=device)
        allowed[..., 150:] = False
        got = decode_attention(q, keys, values, allowed, dim**-0.5, None, limit, pdl=pdl)
        got = got.float()
        want = reference(q.float(), keys.float(), values.float(), allowed, dim**-0.5)
        return float((got - want).abs().max().item())

    return _triton_ops.self_check("decode attention", error)


def supports(head_dim: int, rows: int) -> bool:
    """Whether the kernel takes this head dim and number of query heads per KV head."""
    return head_dim in HEAD_DIMS and 1 <= rows <= MAX_R


def decode_attention(
    q: Any,
    keys: Any,
    values: Any,
    allowed: Any,
    scale: float,
    softcap: float | None = None,
    limit: Any = None,
    *,
    pdl: bool = False,
) -> Any:
    """q [B, KV, R, D] (R = query heads per KV head, the query heads that share a KV head),
    keys/values [B, KV, S, D] (a KV cache, contiguous), allowed: bool, broadcastable from
    [B, 1, 1, S] (the fast path passes exactly a [B, 1, 1, S] tensor; True = attend).
    Returns [B, KV, R, D] in q's dtype:
    softmax(where(allowed, softcap(q k^T * scale), -inf)) v   with fp32 softmax/accumulation.
    softcap(s) = tanh(s / softcap) * softcap when softcap is given (Gemma 2), else s.

    ``limit`` (an integer tensor of one element, on the device) says that no slot
    at or past it is allowed, so the kernel does not read them: a cache filled
    up to the current step costs what it holds, not its size. It is read by the
    kernel, so one captured CUDA graph serves every step.

    R is 1..16 and D one of 64, 128, 256; any S (the tail tile is masked). A row
    with no allowed slot gives zeros. CUDA only (see :func:`available`); ``ValueError``
    on shapes or dtypes the kernel does not take. ``pdl``: both kernels launched with
    programmatic dependent launch (``gemma_local::decode_attention_pdl``; Hopper and
    later, see :func:`core.accel.cuda.gemv.pdl_available`).
    """
    op = _pdl_op() if pdl else _op()
    return op(q, keys, values, allowed, scale, softcap, limit)


@functools.cache
def _pdl_op() -> Any:
    from . import _decode_attention_triton as kernels

    return kernels.decode_attention_pdl_op


def reference(
    q: Any, keys: Any, values: Any, allowed: Any, scale: float, softcap: float | None = None
) -> Any:
    """The same attention in plain torch, what the fast path runs where the op does not
    (transformers' eager attention: scores in q's dtype, ``masked_fill`` with the
    dtype's minimum, fp32 softmax). ``allowed`` must broadcast to the scores."""
    import torch

    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, values)
