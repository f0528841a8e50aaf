"""Triton kernels behind :mod:`core.accel.cuda.decode_attention` (imported lazily by it).

Importing this module imports torch and triton and registers the custom ops
``gemma_local::decode_attention`` and ``decode_attention_pdl``;
:mod:`core.accel.cuda.decode_attention` does so on first use, never at ``import core``.

Flash decoding in two launches:

1. ``_split_kernel``, grid ``(B * KV, nsplit)``: each program takes one KV head
   of one row and a contiguous share of the slots (``split_len``, a multiple of
   ``BLOCK_S``). It loads the R query heads that share the KV head (padded to
   ``BLOCK_R`` >= 16 rows so that ``tl.dot`` applies), streams its slots in
   ``BLOCK_S`` tiles (scores in fp32, soft-cap, mask, online softmax in base 2,
   ``p @ V`` accumulated in fp32) and writes the unnormalised partial
   ``(acc, max, sum)``. With one split it normalises and writes the output
   itself and the second launch is skipped.
2. ``_combine_kernel``, grid ``(B * KV * R,)``: merges one query row's
   partials, ``CHUNK`` splits at a time, and writes the output.

A row whose slots are all masked comes out as zeros (not NaN).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._triton_ops import op_pair, sm_count
from .decode_attention import HEAD_DIMS, MAX_R  # query heads are padded to a 16-row tl.dot

OP_NAME = "gemma_local::decode_attention"

#: Fewest slots a split streams (a tile); the split count never makes them shorter.
#: Tuned on an H200 (``benchmarks/probe_attention.py --sweep``): 64 slots, 4 warps,
#: 2 stages and the split plan below were best or within noise of it for Gemma
#: 1b/12b at batch 1 and 16 (S=512); one split per row is 3-7x slower at batch 1.
BLOCK_S = 64
#: Target programs of the split kernel, per SM.
PROGRAMS_PER_SM = 2
#: Splits the combine kernel merges per step.
CHUNK = 16


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` in fp32; exact fp32 products for fp32 inputs (not TF32)."""
    # A constexpr branch (Triton compiles only the taken side), hence no ternary.
    if IEEE:  # noqa: SIM108
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    allowed_ptr,
    limit_ptr,
    out_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    KV,
    R,
    S,
    split_len,
    nsplit,
    sq_b,
    sq_h,
    sq_r,
    sq_d,
    sk_b,
    sk_h,
    sk_s,
    sk_d,
    sv_b,
    sv_h,
    sv_s,
    sv_d,
    sa_b,
    sa_h,
    sa_r,
    sa_s,
    so_b,
    so_h,
    so_r,
    so_d,
    scale,
    softcap,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    ROW_MASK: tl.constexpr,
    SINGLE: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    if PDL:  # launched early: wait for q and the cache write
        tl.extra.cuda.gdc_wait()
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // KV).to(tl.int64)
    h = (pid_bh % KV).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BLOCK_S)
    row_ok = offs_r < R

    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
        mask=row_ok[:, None],
        other=0.0,
    )
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    a_base = allowed_ptr + b * sa_b + h * sa_h

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)

    if HAS_LIMIT:
        # Only the first ``limit`` slots can be attended (read on the device, so one
        # captured graph serves every step): the splits share those, whole tiles each.
        limit = tl.minimum(tl.load(limit_ptr).to(tl.int32), S)
        split_len = tl.cdiv(tl.cdiv(limit, BLOCK_S), nsplit) * BLOCK_S
    else:
        limit = S
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, limit)
    for start in range(lo, hi, BLOCK_S):
        offs_s = start + offs_t
        in_range = offs_s < hi
        k = tl.load(
            k_base + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d,
            mask=in_range[:, None],
            other=0.0,
        )
        v = tl.load(  # issued with K's load: both tiles in flight at once
            v_base + offs_s[:, None] * sv_s + offs_d[None, :] * sv_d,
            mask=in_range[:, None],
            other=0.0,
        )
        # The .to(fp32) casts: inductor may pass the float scalars as fp64 constants.
        s = (_dot(q, tl.trans(k), IEEE) * scale).to(tl.float32)
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf).
            x = (s / softcap).to(tl.float32)
            s = (softcap * (1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0))).to(tl.float32)
        s = s * LOG2E
        if ROW_MASK:
            ok = tl.load(
                a_base + offs_r[:, None] * sa_r + offs_s[None, :] * sa_s,
                mask=row_ok[:, None] & in_range[None, :],
                other=0,
            )
            ok = (ok != 0) & in_range[None, :]
        else:
            ok1 = tl.load(a_base + offs_s * sa_s, mask=in_range, other=0)
            ok = ((ok1 != 0) & in_range)[None, :]
        s = tl.where(ok, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    if PDL:  # past the cache: the combine (or the next op) may launch
        tl.extra.cuda.gdc_launch_dependents()
    if SINGLE:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * so_b + h * so_h + offs_r[:, None] * so_r + offs_d[None, :] * so_d,
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        part = (pid_bh * R + offs_r).to(tl.int64) * nsplit + pid_s
        tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(max_ptr + part, m_i, mask=row_ok)
        tl.store(sum_ptr + part, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(
    out_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    nsplit,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D)
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(0, nsplit, CHUNK):
        idx = start + offs_c
        ok = idx < nsplit
        part = row * nsplit + idx
        m = tl.load(max_ptr + part, mask=ok, other=float("-inf"))
        sums = tl.load(sum_ptr + part, mask=ok, other=0.0)
        a = tl.load(acc_ptr + part[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, tl.max(m, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        w = tl.exp2(m - m_use)
        l_i = l_i * alpha + tl.sum(w * sums, 0)
        acc = acc * alpha + tl.sum(a * w[:, None], 0)
        m_i = m_new
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(out_ptr + row * D + offs_d, o.to(out_ptr.dtype.element_ty))


def plan(
    batch_heads: int, slots: int, sms: int, block_s: int = BLOCK_S, want: int | None = None
) -> tuple[int, int]:
    """``(nsplit, split_len)``: ``want`` splits (default: about ``PROGRAMS_PER_SM``
    programs per SM), whole tiles each, none empty."""
    tiles = triton.cdiv(slots, block_s)
    if want is None:
        want = triton.cdiv(PROGRAMS_PER_SM * sms, batch_heads)
    per_split = triton.cdiv(tiles, max(1, min(want, tiles)))
    return triton.cdiv(tiles, per_split), per_split * block_s


def check(q: Any, keys: Any, values: Any, allowed: Any) -> None:
    """Raise ``ValueError`` naming what is wrong with the arguments."""
    if q.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError(
            f"q, keys and values must be 4-d ([B, KV, R, D] and [B, KV, S, D]); "
            f"got {tuple(q.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    batch, heads, rows, dim = q.shape
    if tuple(keys.shape) != tuple(values.shape) or tuple(keys.shape[:2]) != (batch, heads):
        raise ValueError(
            f"keys and values must be [B, KV, S, D] = [{batch}, {heads}, S, {dim}]; "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.shape[3] != dim or dim not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS} and match q; got {dim}")
    if not 1 <= rows <= MAX_R:
        raise ValueError(f"query heads per KV head must be 1..{MAX_R}; got {rows}")
    if q.dtype != keys.dtype or q.dtype != values.dtype:
        raise ValueError(f"q, keys and values must share a dtype; got {q.dtype}, {keys.dtype}")
    if allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool tensor; got {allowed.dtype}")
    if keys.shape[2] < 1:
        raise ValueError("the KV cache has no slots")


def launch(
    q: Any,
    keys: Any,
    values: Any,
    allowed: Any,
    scale: float,
    softcap: float | None,
    split_kernel: Any,
    combine_kernel: Any,
    limit: Any = None,
    *,
    block_s: int = BLOCK_S,
    nsplit: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    pdl: bool = False,
) -> Any:
    """Run the two kernels (``split_kernel``/``combine_kernel``: the JIT functions,
    wrapped by ``wrap_triton`` in the op, or interpreted ones in the tests).

    ``nsplit`` (default: :func:`plan`), ``block_s``, ``num_warps`` and ``num_stages``
    are for tuning. ``pdl``: both kernels launched with programmatic dependent launch.
    """
    check(q, keys, values, allowed)
    batch, heads, rows, dim = q.shape
    slots = keys.shape[2]
    allowed = allowed.expand(batch, heads, rows, slots)
    # the interpreter (no SMs): plan as for an H100/H200
    sms = sm_count(q.device.type, q.device.index) or 132
    nsplit, split_len = plan(batch * heads, slots, sms, block_s, nsplit)
    out = torch.empty((batch, heads, rows, dim), dtype=q.dtype, device=q.device)
    single = nsplit == 1
    parts = 1 if single else batch * heads * rows * nsplit
    acc = torch.empty((parts, dim), dtype=torch.float32, device=q.device)
    maxes = torch.empty((parts,), dtype=torch.float32, device=q.device)
    sums = torch.empty((parts,), dtype=torch.float32, device=q.device)
    split_kernel[(batch * heads, nsplit)](
        q,
        keys,
        values,
        allowed,
        allowed if limit is None else limit,
        out,
        acc,
        maxes,
        sums,
        heads,
        rows,
        slots,
        split_len,
        nsplit,
        *q.stride(),
        *keys.stride(),
        *values.stride(),
        *allowed.stride(),
        *out.stride(),
        float(scale),
        1.0 if softcap is None else float(softcap),
        D=dim,
        BLOCK_R=max(16, triton.next_power_of_2(rows)),
        BLOCK_S=block_s,
        HAS_SOFTCAP=softcap is not None,
        HAS_LIMIT=limit is not None,
        ROW_MASK=allowed.stride(2) != 0,
        SINGLE=single,
        IEEE=q.dtype == torch.float32,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    if not single:
        combine_kernel[(batch * heads * rows,)](
            out,
            acc,
            maxes,
            sums,
            nsplit,
            D=dim,
            CHUNK=min(CHUNK, triton.next_power_of_2(nsplit)),
            PDL=pdl,
            num_warps=4,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out


def _decode_attention(pdl: bool) -> Any:
    def decode_attention(
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor,
        scale: float,
        softcap: float | None = None,
        limit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The custom op (the ``triton_op``'s own fake implementation: it traces it)."""
        split, combine = (_split_kernel, _combine_kernel)
        if not pdl:
            split, combine = wrap_triton(split), wrap_triton(combine)
        return launch(q, keys, values, allowed, scale, softcap, split, combine, limit, pdl=pdl)

    return decode_attention


#: The kernels launched with programmatic dependent launch (:func:`op_pair`).
PDL_OP_NAME = "gemma_local::decode_attention_pdl"

decode_attention_op, decode_attention_pdl_op = op_pair(OP_NAME, PDL_OP_NAME, _decode_attention)
