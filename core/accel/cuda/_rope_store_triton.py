"""Triton kernel behind :mod:`core.accel.cuda.rope_store` (imported lazily by it).

Importing this module imports torch and triton and registers the custom ops
``gemma_local::rope_store`` and ``rope_store_pdl``; :mod:`core.accel.cuda.rope_store` does
so on first use, never at ``import core``.

One launch, grid ``(B, H + KV)``: each program takes one head of one row.
Programs ``h < H`` take query head ``h``; the others take KV head ``h - H``.
In the stacked projection ``[q heads | k heads | v heads]`` the head a program
norms and rotates starts at ``h * D`` either way, and the v head of KV head
``h - H`` at ``(h + KV) * D``. A head is loaded as its two halves (``D / 2``
lanes each), which is all ``rotate_half`` needs::

    out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2]
    out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]

The math is fp32; the normed head is rounded to the dtype before RoPE (as
transformers' ``Gemma3RMSNorm`` hands it on) and the result once at the end.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._triton_ops import op_pair
from .rope_store import HEAD_DIMS

OP_NAME = "gemma_local::rope_store"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _head(x_ptr, w_ptr, s_w, c1, c2, s1, s2, eps, D: tl.constexpr, NORM: tl.constexpr):
    """The head at ``x_ptr`` normed (if ``NORM``, with the weight at ``w_ptr``) and
    rotated by the halves of cos/sin: its two halves, in fp32."""
    HALF: tl.constexpr = D // 2
    lo = tl.arange(0, HALF)
    x1 = tl.load(x_ptr + lo).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + lo).to(tl.float32)
    if NORM:
        w1 = tl.load(w_ptr + lo * s_w).to(tl.float32)
        w2 = tl.load(w_ptr + (lo + HALF) * s_w).to(tl.float32)
        mean = (tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) * (1.0 / D)  # exact: D is 2^n
        # The .to(fp32): inductor may pass the float scalar eps as an fp64 constant.
        rstd = tl.rsqrt((mean + eps).to(tl.float32))
        # Rounded to the dtype, as the norm module returns it (a no-op in fp32).
        dtype = x_ptr.dtype.element_ty
        x1 = (x1 * rstd * (1.0 + w1)).to(dtype).to(tl.float32)
        x2 = (x2 * rstd * (1.0 + w2)).to(dtype).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rope_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    qw_ptr,
    kw_ptr,
    slot_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    H,
    KV,
    S,
    s_qkv,
    sc_b,
    sc_d,
    ss_b,
    ss_d,
    s_qw,
    s_kw,
    sq_b,
    sq_h,
    sq_d,
    sk_b,
    sk_h,
    sk_s,
    sk_d,
    sv_b,
    sv_h,
    sv_s,
    sv_d,
    eps,
    D: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    HALF: tl.constexpr = D // 2
    if PDL:  # launched early: let the next kernel launch, wait for the q/k/v product
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)  # a query head below H, else KV head h - H
    lo = tl.arange(0, HALF)
    hi = lo + HALF
    c1 = tl.load(cos_ptr + b * sc_b + lo * sc_d).to(tl.float32)
    c2 = tl.load(cos_ptr + b * sc_b + hi * sc_d).to(tl.float32)
    s1 = tl.load(sin_ptr + b * ss_b + lo * ss_d).to(tl.float32)
    s2 = tl.load(sin_ptr + b * ss_b + hi * ss_d).to(tl.float32)
    head = qkv_ptr + b * s_qkv + h * D
    if h < H:
        o1, o2 = _head(head, qw_ptr, s_qw, c1, c2, s1, s2, eps, D, NORM)
        out = q_ptr + b * sq_b + h * sq_h
        tl.store(out + lo * sq_d, o1.to(q_ptr.dtype.element_ty))
        tl.store(out + hi * sq_d, o2.to(q_ptr.dtype.element_ty))
    else:
        kv = h - H
        # Read on the device, so one captured graph serves every step. The kernel
        # cannot raise, so a slot outside the cache writes nothing; the mask is a
        # block (lo - lo + slot) because the interpreter takes no scalar one.
        slot = tl.load(slot_ptr).to(tl.int64)
        at = lo - lo + slot
        ok = (at >= 0) & (at < S)
        o1, o2 = _head(head, kw_ptr, s_kw, c1, c2, s1, s2, eps, D, NORM)
        out = k_ptr + b * sk_b + kv * sk_h + slot * sk_s
        tl.store(out + lo * sk_d, o1.to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(out + hi * sk_d, o2.to(k_ptr.dtype.element_ty), mask=ok)
        v = head + KV * D  # copied as it is, no round trip through fp32
        out = v_ptr + b * sv_b + kv * sv_h + slot * sv_s
        tl.store(out + lo * sv_d, tl.load(v + lo), mask=ok)
        tl.store(out + hi * sv_d, tl.load(v + hi), mask=ok)


def check(
    qkv: Any,
    cos: Any,
    sin: Any,
    keys: Any,
    values: Any,
    slot: Any,
    heads: int,
    q_norm_weight: Any,
    k_norm_weight: Any,
) -> None:
    """Raise ``ValueError`` naming what is wrong with the arguments."""
    if keys.dim() != 4 or tuple(keys.shape) != tuple(values.shape):
        raise ValueError(
            f"keys and values must be [B, KV, S, D] caches of one shape; "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    batch, kv, slots, dim = keys.shape
    if dim not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}; got {dim}")
    if slots < 1:
        raise ValueError("the KV cache has no slots")
    if heads < 1 or heads % kv:
        raise ValueError(f"heads must be a positive multiple of the KV heads ({kv}); got {heads}")
    width = (heads + 2 * kv) * dim
    if tuple(qkv.shape) != (batch, width):
        raise ValueError(
            f"qkv must be [B, (heads + 2 * KV) * D] = [{batch}, {width}]; got {tuple(qkv.shape)}"
        )
    if qkv.stride(1) != 1:
        raise ValueError("qkv's last dim must be contiguous (stride 1)")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) not in ((batch, dim), (batch, 1, dim)):
            raise ValueError(
                f"{name} must be [B, D] or [B, 1, D] = [{batch}, 1, {dim}]; got {tuple(t.shape)}"
            )
    if qkv.dtype not in DTYPES:
        raise ValueError(f"qkv must be one of {DTYPES}; got {qkv.dtype}")
    if any(t.dtype != qkv.dtype for t in (cos, sin, keys, values)):
        raise ValueError(
            f"qkv, cos, sin, keys and values must share a dtype; got {qkv.dtype}, "
            f"{cos.dtype}, {sin.dtype}, {keys.dtype}, {values.dtype}"
        )
    if slot.numel() != 1 or slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot must be an int64 (or int32) tensor of one element; "
            f"got {slot.dtype} of shape {tuple(slot.shape)}"
        )
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError(
            "give both q_norm_weight and k_norm_weight (Gemma 3) or neither (Gemma 1 and 2)"
        )
    weights = [w for w in (q_norm_weight, k_norm_weight) if w is not None]
    for name, w in zip(("q_norm_weight", "k_norm_weight"), weights, strict=False):
        if tuple(w.shape) != (dim,) or w.dtype not in DTYPES:
            raise ValueError(
                f"{name} must be a [D] = [{dim}] tensor of one of {DTYPES}; "
                f"got {w.dtype} of shape {tuple(w.shape)}"
            )
    devices = {str(t.device) for t in (qkv, cos, sin, keys, values, slot, *weights)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(devices)}")


def launch(
    qkv: Any,
    cos: Any,
    sin: Any,
    keys: Any,
    values: Any,
    slot: Any,
    heads: int,
    q_norm_weight: Any,
    k_norm_weight: Any,
    eps: float,
    kernel: Any,
    *,
    num_warps: int | None = None,
    pdl: bool = False,
) -> Any:
    """Run the kernel (``kernel``: the JIT function, wrapped by ``wrap_triton`` in the
    op, or an interpreted one in the tests) and return q [B, KV, R, D].

    ``num_warps`` (default: 1 up to D = 128, then one per 128 lanes, at most 4) is
    for tuning. ``pdl``: launched with programmatic dependent launch.
    """
    check(qkv, cos, sin, keys, values, slot, heads, q_norm_weight, k_norm_weight)
    batch, kv, slots, dim = keys.shape
    cos, sin = cos.reshape(batch, dim), sin.reshape(batch, dim)
    q = torch.empty((batch, kv, heads // kv, dim), dtype=qkv.dtype, device=qkv.device)
    norm = q_norm_weight is not None
    q_weight = q_norm_weight if norm else qkv  # a placeholder the kernel never reads
    k_weight = k_norm_weight if norm else qkv
    kernel[(batch, heads + kv)](
        qkv,
        cos,
        sin,
        q_weight,
        k_weight,
        slot,
        q,
        keys,
        values,
        heads,
        kv,
        slots,
        qkv.stride(0),
        *cos.stride(),
        *sin.stride(),
        q_weight.stride(0),
        k_weight.stride(0),
        *q.view(batch, heads, dim).stride(),
        *keys.stride(),
        *values.stride(),
        float(eps),
        D=dim,
        NORM=norm,
        PDL=pdl,
        num_warps=num_warps or max(1, min(4, dim // 128)),
        **({"launch_pdl": True} if pdl else {}),
    )
    return q


def _rope_store(pdl: bool) -> Any:
    def rope_store(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slot: torch.Tensor,
        heads: int,
        q_norm_weight: torch.Tensor | None = None,
        k_norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
    ) -> torch.Tensor:
        """The custom op (the ``triton_op``'s own fake implementation: it traces it)."""
        return launch(
            qkv,
            cos,
            sin,
            keys,
            values,
            slot,
            heads,
            q_norm_weight,
            k_norm_weight,
            eps,
            _rope_store_kernel if pdl else wrap_triton(_rope_store_kernel),
            pdl=pdl,
        )

    return rope_store


#: The kernel launched with programmatic dependent launch (:func:`op_pair`).
PDL_OP_NAME = "gemma_local::rope_store_pdl"

rope_store_op, rope_store_pdl_op = op_pair(
    OP_NAME, PDL_OP_NAME, _rope_store, mutates_args={"keys", "values"}
)
