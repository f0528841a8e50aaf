"""Triton kernels behind :mod:`core.decode_attention` (imported lazily by it).

Importing this module imports torch and triton and registers the custom ops
``gemma_local::decode_attention`` and ``decode_attention_pdl``; :mod:`core.decode_attention` does so on
first use, never at ``import core``.

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

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._rope_store_triton import check as check_rope
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
def _roped(ptr, mask, w_ptr, s_w, offs_d, c, sn, eps, D: tl.constexpr, NORM: tl.constexpr):
    """Heads of D lanes at ``ptr`` (a [D] or [N, D] block of them) normed (``NORM``, Gemma's
    RMSNorm with the weight at ``w_ptr``, rounded to the dtype as the module returns it)
    and rotated, in fp32: ``x * cos + rotate_half(x) * sin`` (``core.rope_store``'s math),
    ``rotate_half`` read as the partner lane ``(d + D/2) % D`` with its sign."""
    HALF: tl.constexpr = D // 2
    partner = (offs_d + HALF) % D
    x = tl.load(ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(ptr + partner, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(w_ptr + offs_d * s_w).to(tl.float32)
        wp = tl.load(w_ptr + partner * s_w).to(tl.float32)
        # The .to(fp32): inductor may pass the float scalar eps as an fp64 constant.
        mean = tl.sum(x * x, axis=-1, keep_dims=True) * (1.0 / D)  # exact: D is 2^n
        rstd = tl.rsqrt((mean + eps).to(tl.float32))
        dtype = ptr.dtype.element_ty
        x = (x * rstd * (1.0 + w)).to(dtype).to(tl.float32)
        xp = (xp * rstd * (1.0 + wp)).to(dtype).to(tl.float32)
    return x * c - tl.where(offs_d < HALF, sn, -sn) * xp


@triton.jit
def _scores(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``q . k`` products to the kernel's scores: scaled, soft-capped, in base 2."""
    LOG2E: tl.constexpr = 1.4426950408889634
    # The .to(fp32) casts: inductor may pass the float scalars as fp64 constants.
    s = (s * scale).to(tl.float32)
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf).
        x = (s / softcap).to(tl.float32)
        s = (softcap * (1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0))).to(tl.float32)
    return s * LOG2E


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
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    qw_ptr,
    kw_ptr,
    slot_ptr,
    KV,
    R,
    S,
    split_len,
    nsplit,
    H,
    s_qkv,
    sc_b,
    sc_d,
    ss_b,
    ss_d,
    s_qw,
    s_kw,
    eps,
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
    ROPE: tl.constexpr = False,
    QK_NORM: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
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

    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    if ROPE:
        # q, and this step's k and v, from the stacked projection [q heads | k | v]: the
        # R query heads of KV head h are heads h * R + r. Every program computes them
        # (a few hundred bytes from L2); the one whose slots hold ``slot`` stores k and v.
        dtype = k_ptr.dtype.element_ty
        c = tl.load(cos_ptr + b * sc_b + offs_d * sc_d).to(tl.float32)
        sn = tl.load(sin_ptr + b * ss_b + offs_d * ss_d).to(tl.float32)
        row = qkv_ptr + b * s_qkv
        heads = h * R + offs_r
        q = _roped(
            row + heads[:, None] * D, row_ok[:, None], qw_ptr, s_qw, offs_d, c, sn, eps, D, QK_NORM
        )
        q = q.to(dtype)
        k_new = _roped(row + (H + h) * D, offs_d < D, kw_ptr, s_kw, offs_d, c, sn, eps, D, QK_NORM)
        k_new = k_new.to(dtype)
        v_new = tl.load(row + (H + KV + h) * D + offs_d)
        slot = tl.load(slot_ptr).to(tl.int64)
    else:
        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
            mask=row_ok[:, None],
            other=0.0,
        )
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
        s = _scores(_dot(q, tl.trans(k), IEEE), scale, softcap, HAS_SOFTCAP)
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
        if ROPE:  # the cache's copy of this step's slot is stale: it is added below
            ok = ok & (offs_s != slot)[None, :]
        s = tl.where(ok, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    if ROPE:
        # This step's token, from registers, in the program whose share holds its slot
        # (the tiles stay as loaded: selecting the new row into them cost the kernel
        # its pipelined loads, 2.2x the time).
        at_r = offs_r * 0 + slot
        if ROW_MASK:
            in_cache = row_ok & (at_r >= 0) & (at_r < S)
            ok_new = tl.load(a_base + offs_r * sa_r + at_r * sa_s, mask=in_cache, other=0) != 0
        else:
            ok_new = tl.load(a_base + at_r * sa_s, mask=(at_r >= 0) & (at_r < S), other=0) != 0
        ok_new = ok_new & (at_r >= lo) & (at_r < hi)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1)
        s_new = tl.where(ok_new, _scores(s_new, scale, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p_new = tl.exp2(s_new - m_use)
        l_i = l_i * alpha + p_new
        p_v = p_new.to(v_new.dtype).to(tl.float32)  # rounded as p is for the tiles' dot
        acc = acc * alpha[:, None] + p_v[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
        # The program whose share holds the slot writes it (the first one if no share
        # does: a slot past the limit is written, not read; outside 0..S-1, nothing).
        at = offs_d * 0 + slot
        first = (offs_d * 0 + pid_s) == 0
        own = ((at >= lo) & (at < hi)) | ((at >= limit) & first)
        own = own & (at >= 0) & (at < S)
        tl.store(k_base + slot * sk_s + offs_d * sk_d, k_new, mask=own)
        tl.store(v_base + slot * sv_s + offs_d * sv_d, v_new, mask=own)
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


class Rope(NamedTuple):
    """What :func:`core.rope_store.rope_store` takes besides the cache: given to
    :func:`launch` instead of q, the split kernel norms and rotates q and this step's k
    from the stacked projection itself and writes k and v at ``slot``."""

    qkv: Any
    cos: Any
    sin: Any
    slot: Any
    heads: int
    q_norm_weight: Any = None
    k_norm_weight: Any = None
    eps: float = 1e-6


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
    rope: Rope | None = None,
    block_s: int = BLOCK_S,
    nsplit: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    pdl: bool = False,
) -> Any:
    """Run the two kernels (``split_kernel``/``combine_kernel``: the JIT functions,
    wrapped by ``wrap_triton`` in the op, or interpreted ones in the tests).

    With ``rope`` (and ``q=None``): q comes from ``rope.qkv`` and the step's k and v are
    written to the cache (:class:`Rope`), the rope/store op's launch folded into this one.

    ``nsplit`` (default: :func:`plan`), ``block_s``, ``num_warps`` and ``num_stages``
    are for tuning. ``pdl``: both kernels launched with programmatic dependent launch.
    """
    if rope is not None:
        check_rope(rope.qkv, rope.cos, rope.sin, keys, values, rope.slot, rope.heads,
                   rope.q_norm_weight, rope.k_norm_weight)  # fmt: skip
        batch, kv, _, dim = keys.shape
        q = torch.empty((batch, kv, rope.heads // kv, dim), dtype=keys.dtype, device="meta")
    check(q, keys, values, allowed)
    batch, heads, rows, dim = q.shape
    slots = keys.shape[2]
    allowed = allowed.expand(batch, heads, rows, slots)
    # the interpreter (no SMs): plan as for an H100/H200
    sms = sm_count(keys.device.type, keys.device.index) or 132
    nsplit, split_len = plan(batch * heads, slots, sms, block_s, nsplit)
    out = torch.empty((batch, heads, rows, dim), dtype=q.dtype, device=keys.device)
    single = nsplit == 1
    parts = 1 if single else batch * heads * rows * nsplit
    acc = torch.empty((parts, dim), dtype=torch.float32, device=keys.device)
    maxes = torch.empty((parts,), dtype=torch.float32, device=keys.device)
    sums = torch.empty((parts,), dtype=torch.float32, device=keys.device)
    if rope is None:
        q_arg, q_strides = q, q.stride()
        qkv, cos, sin, q_w, k_w, slot = (q,) * 6  # placeholders the kernel never reads
        rope_args = (0,) * 8 + (1e-6,)
    else:
        q_arg, q_strides = rope.qkv, (0, 0, 0, 0)
        qkv, slot = rope.qkv, rope.slot
        cos, sin = rope.cos.reshape(batch, dim), rope.sin.reshape(batch, dim)
        norm = rope.q_norm_weight is not None
        q_w = rope.q_norm_weight if norm else qkv
        k_w = rope.k_norm_weight if norm else qkv
        rope_args = (rope.heads, qkv.stride(0), *cos.stride(), *sin.stride(),
                     q_w.stride(0), k_w.stride(0), float(rope.eps))  # fmt: skip
    split_kernel[(batch * heads, nsplit)](
        q_arg,
        keys,
        values,
        allowed,
        allowed if limit is None else limit,
        out,
        acc,
        maxes,
        sums,
        qkv,
        cos,
        sin,
        q_w,
        k_w,
        slot,
        heads,
        rows,
        slots,
        split_len,
        nsplit,
        *rope_args,
        *q_strides,
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
        ROPE=rope is not None,
        QK_NORM=rope is not None and rope.q_norm_weight is not None,
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


ROPE_OP_NAME = "gemma_local::rope_decode_attention"
ROPE_PDL_OP_NAME = "gemma_local::rope_decode_attention_pdl"


def _rope_decode_attention(pdl: bool) -> Any:
    def rope_decode_attention(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slot: torch.Tensor,
        heads: int,
        q_norm_weight: torch.Tensor | None,
        k_norm_weight: torch.Tensor | None,
        eps: float,
        allowed: torch.Tensor,
        scale: float,
        softcap: float | None = None,
        limit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rope/store op and decode attention as one op (writes k and v at ``slot``)."""
        split, combine = (_split_kernel, _combine_kernel)
        if not pdl:
            split, combine = wrap_triton(split), wrap_triton(combine)
        rope = Rope(qkv, cos, sin, slot, heads, q_norm_weight, k_norm_weight, eps)
        return launch(
            None, keys, values, allowed, scale, softcap, split, combine, limit, rope=rope, pdl=pdl
        )

    return rope_decode_attention


rope_decode_attention_op, rope_decode_attention_pdl_op = op_pair(
    ROPE_OP_NAME, ROPE_PDL_OP_NAME, _rope_decode_attention, mutates_args={"keys", "values"}
)
