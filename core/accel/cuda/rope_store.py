"""Fused q/k norm, RoPE and KV-cache write for the CUDA fast path: one Triton op.

After the fused q/k/v projection of a decode step (one token per row), Gemma
norms each q and k head (Gemma 3 only), rotates q and k by the position's
RoPE and writes k and v into the static KV cache at the step's slot. Spelt
out that is three inductor kernels a layer; :func:`rope_store` is one custom
op (``gemma_local::rope_store``, one Triton launch) that ``torch.compile``
puts in the compiled graph and that CUDA graphs capture::

    qkv [B, (H + 2 KV) * D], cos/sin [B, D], slot (on the device)
        ──▶ kernel, grid (B, H + KV):
              program (b, h <  H): norm + rope q head h      ──▶ q [B, KV, R, D]
              program (b, h >= H): norm + rope k head h - H  ──▶ keys[b, h - H, slot]
                                   copy v head h - H         ──▶ values[b, h - H, slot]

The kernel lives in :mod:`core.accel.cuda._rope_store_triton`, imported (and the op
registered) by :func:`available` or the first call; importing this module
imports neither torch nor triton. Call :func:`available` before
``torch.compile`` traces a function that uses the op, so that the op is
registered outside the trace.

:func:`reference` is the same computation in plain torch (the fallback, and
what the tests compare with).
"""

from __future__ import annotations

import functools
from typing import Any

from . import _triton_ops

#: Head dims the kernel is compiled for (a power of two: each half of a head is one block).
HEAD_DIMS = (64, 128, 256, 512)


@functools.cache
def _op() -> Any:
    """The registered op (imports torch and triton and registers it the first time)."""
    from . import _rope_store_triton as kernels

    return kernels.rope_store_op


def available(device: Any) -> bool:
    """Whether :func:`rope_store` runs on ``device``: CUDA, with triton importable
    and the op registered (registering it here when needed)."""
    return _triton_ops.available(device, _op)


def works(
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: Any,
    device: Any,
    norm: bool = True,
    *,
    pdl: bool = False,
) -> bool:
    """Run the op once on small random inputs of this layout and compare q and the
    whole caches with :func:`reference`: False (and a warning) where the kernel
    does not compile or disagrees on this GPU, so that the caller keeps the
    plain-torch path."""
    import torch

    def error() -> float:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> Any:
            return torch.randn(*shape, generator=gen, device=device).to(dtype)

        qkv = randn(2, (heads + 2 * kv_heads) * head_dim)
        cos, sin = randn(2, 1, head_dim), randn(2, 1, head_dim)
        keys, values = randn(2, kv_heads, 8, head_dim), randn(2, kv_heads, 8, head_dim)
        weights = (randn(head_dim), randn(head_dim)) if norm else (None, None)
        slot = torch.tensor([5], device=device)
        want_k, want_v = keys.clone(), values.clone()
        got = rope_store(qkv, cos, sin, keys, values, slot, heads, *weights, pdl=pdl)
        want = reference(qkv, cos, sin, want_k, want_v, slot, heads, *weights)
        return max(
            float((a.float() - b.float()).abs().max().item())
            for a, b in ((got, want), (keys, want_k), (values, want_v))
        )

    return _triton_ops.self_check("rope/store", error)


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head dim."""
    return head_dim in HEAD_DIMS


def rope_store(
    qkv: Any,
    cos: Any,
    sin: Any,
    keys: Any,
    values: Any,
    slot: Any,
    heads: int,
    q_norm_weight: Any = None,
    k_norm_weight: Any = None,
    eps: float = 1e-6,
    *,
    pdl: bool = False,
) -> Any:
    """Norm (Gemma 3) and rotate one token's q and k per row, store k and v in the cache.

    ``qkv`` [B, (H + 2 KV) * D]: the q, k and v projections of one token per row,
    stacked in that order along the last dim (last-dim stride 1). ``cos``/``sin``
    [B, D] or [B, 1, D] (the rotary embedding at each row's position).
    ``keys``/``values`` [B, KV, S, D]: the cache; row b's k and v are written at
    ``[b, :, slot]``, nothing else is touched. ``slot``: an integer tensor of one
    element, on the device, read by the kernel (so one captured CUDA graph serves
    every step); a slot outside 0..S-1 writes nothing (the kernel cannot raise).
    qkv, cos, sin, keys and values share one dtype (bf16, fp16 or fp32).

    With ``q_norm_weight``/``k_norm_weight`` ([D] each; both or neither) each
    head is first normed the Gemma way, per head over D, in fp32 and rounded to
    the dtype: ``x * rsqrt(mean(x**2) + eps) * (1 + w)``. RoPE is then
    ``x * cos + rotate_half(x) * sin`` in fp32, rounded once.

    Returns q [B, KV, R, D] (R = H // KV; query head h is ``[h // R, h % R]``) in
    qkv's dtype. D one of :data:`HEAD_DIMS`. CUDA only (see :func:`available`);
    ``ValueError`` on shapes or dtypes the kernel does not take. ``pdl``: launched with
    programmatic dependent launch (``gemma_local::rope_store_pdl``; Hopper and later,
    see :func:`core.accel.cuda.gemv.pdl_available`).
    """
    op = _pdl_op() if pdl else _op()
    return op(qkv, cos, sin, keys, values, slot, heads, q_norm_weight, k_norm_weight, eps)


@functools.cache
def _pdl_op() -> Any:
    from . import _rope_store_triton as kernels

    return kernels.rope_store_pdl_op


def reference(
    qkv: Any,
    cos: Any,
    sin: Any,
    keys: Any,
    values: Any,
    slot: Any,
    heads: int,
    q_norm_weight: Any = None,
    k_norm_weight: Any = None,
    eps: float = 1e-6,
) -> Any:
    """:func:`rope_store` in plain torch (same arguments, same result, same cache writes)."""
    import torch

    batch, kv, dim = qkv.shape[0], keys.shape[1], keys.shape[3]
    q, k, v = qkv.reshape(batch, heads + 2 * kv, dim).split([heads, kv, kv], dim=1)
    if q_norm_weight is not None:
        q, k = _rms_norm(q, q_norm_weight, eps), _rms_norm(k, k_norm_weight, eps)
    cos = cos.reshape(batch, 1, dim).float()
    sin = sin.reshape(batch, 1, dim).float()

    def rope(x: Any) -> Any:
        x = x.float()
        rotated = torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), dim=-1)
        return (x * cos + rotated * sin).to(qkv.dtype)

    index = slot.reshape(1)
    keys.index_copy_(2, index, rope(k).unsqueeze(2))
    values.index_copy_(2, index, v.unsqueeze(2))
    return rope(q).reshape(batch, kv, heads // kv, dim)


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """Gemma's RMSNorm over the last dim (transformers' ``Gemma3RMSNorm``)."""
    import torch

    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)
