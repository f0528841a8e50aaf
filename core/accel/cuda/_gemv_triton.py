"""Triton kernels behind :mod:`core.accel.cuda.gemv` (imported lazily by it).

Importing this module imports torch and triton and registers the custom ops
``gemma_local::gemv``, ``gemv_residual``, their PDL twins, ``residual_add_pdl``
and ``residual_norm``; :mod:`core.accel.cuda.gemv` does so on first use, never at
``import core``.

One kernel, ``_gemv_kernel``, grid ``(cdiv(N_out, BLOCK_N), cdiv(M, BLOCK_M))``:
each program owns ``BLOCK_N`` output features of ``BLOCK_M`` rows and streams
its rows of the weight ``[N, K]`` (``nn.Linear`` layout) in ``BLOCK_K``
chunks, once. Two ways to multiply, chosen by ``BLOCK_M``:

* ``BLOCK_M == 1`` (one token): ``w * x`` accumulated elementwise into a
  ``[BLOCK_N, BLOCK_K]`` fp32 tile and summed once at the end (a reduction;
  ``tl.dot`` needs 16 rows);
* ``BLOCK_M == 16`` (a batch of up to 16 tokens): ``tl.dot`` of the x tile
  with the transposed weight tile, fp32 accumulation; with ``SWAP`` the same
  products the other way round, ``W_tile @ x_tile.T`` (``BLOCK_N >= 64``): the weight
  is the MMA's M side, which on Hopper takes wgmma (an M of at least 64 a
  warpgroup) where 16 rows of x take ``mma.sync``. The 12b's gate/up product with
  the activation runs 56.9 us that way against 69.6 the other way and 63.2 for
  cuBLAS + inductor's activation kernel (probe-gemv 12 and 12a).

Optional prologue and epilogue, each worth a launch (and an HBM round trip)
per layer in the decode step:

* ``NORM``: Gemma's RMSNorm of x (``x * rsqrt(mean(x^2) + eps) * (1 + w)``),
  computed by every program from x itself, in the same pass as the product:
  ``(x * (1 + w)) @ W.T`` scaled per row by ``rsqrt(mean(x^2) + eps)`` at the
  end (a pass over x before the product cost more than the norm kernel it saves);
  the normed x is not rounded to the dtype first, as in inductor's fused norms;
* ``ACT``: the weight stacks gate and up projections (``[2F, K]``, gate
  first); a program takes the same ``BLOCK_N`` features of both and writes
  ``gelu_tanh(gate) * up`` ``[M, F]``: the MLP's activation, never the
  ``[M, 2F]`` projections;
* ``RESID``: x is the previous product's output ``y`` and the input is the
  residual stream's next value ``h = r + post_norm(y)`` (Gemma 2/3's post-norm,
  ``POST``; Gemma 1 adds ``y`` as it is), computed by every program from y and
  r as it streams them; the programs of the first column of output blocks also
  write ``h`` (the residual the layer goes on with). ``post_norm`` needs the
  row's ``mean(y^2)`` before anything else: a first pass over y (one load of a
  row from L2 at one row). This replaces the decode step's residual add + norm
  kernels, two a layer.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._triton_ops import op_pair, sm_count

OP_NAME = "gemma_local::gemv"
RESIDUAL_OP_NAME = "gemma_local::gemv_residual"

#: Rows a program takes in the ``tl.dot`` form (its minimum).
DOT_ROWS = 16


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp2 overflows to inf).
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _round(x, like_ptr):
    """``x`` rounded to the element type of ``like_ptr`` and back to fp32."""
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _mma(x, w, SWAP: tl.constexpr, IEEE: tl.constexpr):
    """The dot form's product of an x tile [BM, BK] and a weight tile [BN, BK]: ``x @ w.T``
    [BM, BN], or with ``SWAP`` ``w @ x.T`` [BN, BM]; exact fp32 products for fp32 inputs
    (not TF32)."""
    # constexpr branches (Triton compiles only the taken side)
    if SWAP:
        a, b = w, tl.trans(x)
    else:
        a, b = x, tl.trans(w)
    if IEEE:  # noqa: SIM108
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    norm_ptr,
    r_ptr,
    post_ptr,
    h_ptr,
    M,
    K,
    N_OUT,
    UP,
    sx_m,
    sw_n,
    so_m,
    sr_m,
    sh_m,
    eps,
    post_eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    ACT: tl.constexpr,
    RESID: tl.constexpr,
    POST: tl.constexpr,
    PRE_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr = False,
    SWAP: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N_OUT
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sx_m  # [BM, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * sw_n  # [BN, 1]
    u_rows = w_ptr + (offs_n + UP).to(tl.int64)[:, None] * sw_n  # the up rows (ACT)
    if PDL:
        # Programmatic dependent launch: this kernel was launched while the one before
        # it finishes (it let us, as we let the next one once our products are done);
        # x is that kernel's output: wait for it.
        tl.extra.cuda.gdc_wait()

    # NORM: rmsnorm(x) @ w.T = inv_rms(x) * ((x * (1 + norm_w)) @ w.T), inv_rms a scalar per
    # row: the squares are summed in the same pass as the product (no pass over x
    # before the weights start streaming) and the rows scaled at the end.
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    if RESID:
        r_rows = r_ptr + offs_m.to(tl.int64)[:, None] * sr_m
        h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * sh_m
        first = (tl.zeros([1], dtype=tl.int32) + pid_n) == 0
        h_ok = m_ok[:, None] & first[None, :]  # one column of programs writes h
        inv_rms_y = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
        if POST:  # mean(y^2) per row first: the post-norm scales y before the add
            y_squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            for p0 in range(0, K, PRE_K):
                ps = p0 + tl.arange(0, PRE_K)
                yp = tl.load(
                    x_rows + ps[None, :],
                    mask=m_ok[:, None] & (ps < K)[None, :],
                    other=0.0,
                    eviction_policy="evict_last",
                ).to(tl.float32)
                y_squares += tl.sum(yp * yp, 1)
            inv_rms_y = (1.0 / tl.sqrt(y_squares / K + post_eps))[:, None]
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    elif SWAP:  # out.T: [BLOCK_N, BLOCK_M]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        # x before the weights: loading the weights first made the kernel up to 47% slower
        # (12b down 29.4 -> 43.2 us; scratch A/B on an H200)
        if EVEN_K:
            k_ok = offs_k < BLOCK_K  # constant-true; keeps one code path
            xk = tl.load(
                x_rows + ks[None, :], mask=m_ok[:, None], other=0.0, eviction_policy="evict_last"
            )
        else:
            k_ok = ks < K
            xk = tl.load(
                x_rows + ks[None, :],
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
                eviction_policy="evict_last",
            )
        # The weights stream through once: evict them first, keep x (read by every program).
        w_ok = n_ok[:, None] & k_ok[None, :]
        if EVEN_N and EVEN_K:
            wk = tl.load(w_rows + ks[None, :], eviction_policy="evict_first")
        else:
            wk = tl.load(w_rows + ks[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
        if ACT:
            if EVEN_N and EVEN_K:
                uk = tl.load(u_rows + ks[None, :], eviction_policy="evict_first")
            else:
                uk = tl.load(
                    u_rows + ks[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first"
                )
        if RESID:
            # h = r + post_norm(y), rounded where the modules round: the norm's output
            # and the sum (the residual stream is kept in the dtype)
            xf = xk.to(tl.float32)
            if POST:
                post = tl.load(post_ptr + ks, mask=k_ok, other=0.0, eviction_policy="evict_last")
                xf = _round(xf * inv_rms_y * (1.0 + post.to(tl.float32))[None, :], x_ptr)
            rk = tl.load(
                r_rows + ks[None, :],
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
                eviction_policy="evict_last",
            )
            xk = (rk.to(tl.float32) + xf).to(rk.dtype)
            tl.store(h_rows + ks[None, :], xk, mask=h_ok & k_ok[None, :])
        if NORM:
            xf = xk.to(tl.float32)
            squares += tl.sum(xf * xf, 1)
            scale = tl.load(norm_ptr + ks, mask=k_ok, other=0.0, eviction_policy="evict_last")
            scale = 1.0 + scale.to(tl.float32)
            xk = (xf * scale[None, :]).to(wk.dtype)
        if BLOCK_M == 1:
            xf = xk.to(tl.float32)  # [1, BK]
            acc += wk.to(tl.float32) * xf
            if ACT:
                acc_up += uk.to(tl.float32) * xf
        else:
            acc += _mma(xk, wk, SWAP, IEEE)
            if ACT:
                acc_up += _mma(xk, uk, SWAP, IEEE)

    if PDL:
        # every program past its weights: the next kernel may launch (launching it
        # at the start instead filled the SMs with waiting programs: 12b 6.62 against
        # 6.50 ms a step, probe 14)
        tl.extra.cuda.gdc_launch_dependents()
    if BLOCK_M == 1:
        out = tl.sum(acc, 1)[None, :]  # [1, BN]
        up = tl.sum(acc_up, 1)[None, :]  # zeros unless ACT (and then dead code)
    elif SWAP:
        out = tl.trans(acc)
        up = tl.trans(acc_up)
    else:
        out = acc
        up = acc_up
    if NORM:
        inv_rms = (1.0 / tl.sqrt(squares / K + eps))[:, None]  # [BM, 1]
        out = out * inv_rms
        up = up * inv_rms
    if ACT:
        # the projections are rounded to the dtype as nn.Linear's outputs are, then
        # gelu_tanh(gate) (rounded, as the activation module's output) times up
        gate = _round(out, out_ptr)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = _round(0.5 * gate * (1.0 + _tanh(inner)), out_ptr)
        out = act * _round(up, out_ptr)
    tl.store(
        out_ptr + offs_m.to(tl.int64)[:, None] * so_m + offs_n[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _residual_kernel(
    y_ptr,
    r_ptr,
    post_ptr,
    h_ptr,
    norm_ptr,
    n_ptr,
    K,
    sy_m,
    sr_m,
    sh_m,
    sn_m,
    post_eps,
    eps,
    BLOCK_K: tl.constexpr,
    POST: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row: ``h = r + post_norm(y)`` (``r + y`` without ``POST``), rounded as the
    ``RESID`` form rounds it: the residual add + norm between two products, as a kernel
    of its own (the chain of PDL launches has no inductor kernel in it). ``NORM``: also
    ``n = rmsnorm(h)``, the next product's input, rounded as the norm module rounds it."""
    row = tl.program_id(0).to(tl.int64)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    ks = tl.arange(0, BLOCK_K)
    ok = ks < K
    y = tl.load(y_ptr + row * sy_m + ks, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * sr_m + ks, mask=ok, other=0.0)
    if POST:
        post = tl.load(post_ptr + ks, mask=ok, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(y * y, 0) / K + post_eps)
        y = _round(y * inv_rms * (1.0 + post), y_ptr)
    h = (r.to(tl.float32) + y).to(r.dtype)
    tl.store(h_ptr + row * sh_m + ks, h, mask=ok)
    if NORM:
        hf = h.to(tl.float32)
        scale = tl.load(norm_ptr + ks, mask=ok, other=0.0).to(tl.float32)
        inv_rms_h = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / K + eps)
        tl.store(n_ptr + row * sn_m + ks, (hf * inv_rms_h * (1.0 + scale)).to(r.dtype), mask=ok)


@functools.cache
def config(rows: int, n_out: int, k: int, act: bool, sms: int) -> tuple[int, ...]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for one product (see :func:`launch`),
    with a fifth element ``True`` where the 2-16-row form runs swapped (``SWAP``); the
    residual form takes its product's (its sweeps, probe-gemv 5 and 6, found the same
    best blocks for q/k/v)."""
    from .gemv import TUNED

    if not sms:  # the interpreter: the fewest, largest programs
        return 64, 256, 4, 1
    key = ("dot" if rows > 1 else "gemv", n_out, k, act)
    if key in TUNED:
        return TUNED[key]
    # Untuned shapes: enough programs to fill every SM a few times over.
    if rows > 1:
        block_n = 32 if n_out >= 32 * 4 * sms else 16
        return block_n, 256, 4, 3
    block_n = 8
    while block_n > 1 and triton.cdiv(n_out, block_n) < 4 * sms:
        block_n //= 2
    return block_n, 512, 4, 1


def check(x: Any, weight: Any, norm_weight: Any, act: bool) -> None:
    """Raise ``ValueError`` naming what is wrong with the arguments."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"x must be [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but weight has K={weight.shape[1]}")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(
            f"x and weight must share a dtype of bfloat16, float16 or float32; "
            f"got {x.dtype} and {weight.dtype}"
        )
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous along K")
    if act and weight.shape[0] % 2:
        raise ValueError(
            f"act=True needs stacked gate and up rows (even N); got N={weight.shape[0]}"
        )
    if norm_weight is not None and tuple(norm_weight.shape) != (x.shape[1],):
        raise ValueError(
            f"norm_weight must be [K] = [{x.shape[1]}]; got {tuple(norm_weight.shape)}"
        )


def check_residual(x: Any, residual: Any, post_weight: Any) -> None:
    """Raise ``ValueError`` naming what is wrong with the residual form's extra arguments."""
    if tuple(residual.shape) != tuple(x.shape) or residual.dtype != x.dtype:
        raise ValueError(
            f"residual must be [M, K] = {list(x.shape)} in {x.dtype}; "
            f"got {list(residual.shape)} in {residual.dtype}"
        )
    if residual.stride(1) != 1:
        raise ValueError("residual must be contiguous along K")
    if post_weight is not None and tuple(post_weight.shape) != (x.shape[1],):
        raise ValueError(
            f"post_weight must be [K] = [{x.shape[1]}]; got {tuple(post_weight.shape)}"
        )


def launch(
    x: Any,
    weight: Any,
    norm_weight: Any,
    eps: float,
    act: bool,
    kernel: Any,
    *,
    residual: Any = None,
    post_weight: Any = None,
    post_eps: float = 1e-6,
    block: tuple[int, ...] | None = None,
    pdl: bool = False,
) -> Any:
    """Run the kernel (``kernel``: the JIT function, wrapped by ``wrap_triton`` in the op,
    or the interpreted one in the tests). ``block`` = ``(BLOCK_N, BLOCK_K, num_warps,
    num_stages[, swap])`` overrides :func:`config` (for tuning); ``swap`` (2-16 rows,
    ``BLOCK_N`` >= 64) runs the dot form as ``W @ x.T``.

    With ``residual`` (the ``RESID`` form, x being the previous product's output):
    returns ``(out, h)``, ``h = residual + post_norm(x)`` the input the product took.

    ``pdl``: launched with programmatic dependent launch (Hopper and later)."""
    check(x, weight, norm_weight, act)
    if residual is not None:
        check_residual(x, residual, post_weight)
    rows, k = x.shape
    n_out = weight.shape[0] // 2 if act else weight.shape[0]
    sms = sm_count(x.device.type, x.device.index)
    block_n, block_k, warps, stages, *swapped = block or config(rows, n_out, k, act, sms)
    block_m = 1 if rows == 1 else DOT_ROWS
    swap = block_m > 1 and any(swapped)
    if block_m > 1:
        block_n = max(block_n, 64 if swap else 16)  # tl.dot's minimum; wgmma's M
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    hidden = out if residual is None else torch.empty_like(residual)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(rows, block_m))
    kernel[grid](
        x,
        weight,
        out,
        x if norm_weight is None else norm_weight,
        x if residual is None else residual,
        x if post_weight is None else post_weight,
        hidden,
        rows,
        k,
        n_out,
        n_out if act else 0,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        hidden.stride(0),
        float(eps),
        float(post_eps),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        NORM=norm_weight is not None,
        ACT=act,
        RESID=residual is not None,
        POST=residual is not None and post_weight is not None,
        # the first pass over y: a row at once at one row (L2-resident), in tiles at 16
        PRE_K=max(16, min(triton.next_power_of_2(k), 8192 // block_m)),
        EVEN_K=k % block_k == 0,
        EVEN_N=n_out % block_n == 0,
        IEEE=x.dtype == torch.float32,
        PDL=pdl,
        SWAP=swap,
        num_warps=warps,
        num_stages=stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out if residual is None else (out, hidden)


def launch_residual(
    y: Any,
    residual: Any,
    post_weight: Any,
    post_eps: float,
    kernel: Any,
    *,
    norm_weight: Any = None,
    eps: float = 1e-6,
    pdl: bool = False,
) -> Any:
    """``h = residual + post_norm(y)`` [M, K] by ``_residual_kernel`` (``kernel``: the JIT
    function, or the interpreted one in the tests), a program a row. With
    ``norm_weight``: ``(h, rmsnorm(h))``, the norm Gemma's (``1 + norm_weight``, ``eps``)."""
    check_residual(y, residual, post_weight)
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"y must be [M, K], contiguous along K; got {tuple(y.shape)}")
    rows, k = y.shape
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must be [K] = [{k}]; got {tuple(norm_weight.shape)}")
    hidden = torch.empty_like(residual)
    normed = hidden if norm_weight is None else torch.empty_like(residual)
    block_k = max(16, triton.next_power_of_2(k))
    kernel[(rows,)](
        y,
        residual,
        y if post_weight is None else post_weight,
        hidden,
        y if norm_weight is None else norm_weight,
        normed,
        k,
        y.stride(0),
        residual.stride(0),
        hidden.stride(0),
        normed.stride(0),
        float(post_eps),
        float(eps),
        BLOCK_K=block_k,
        POST=post_weight is not None,
        NORM=norm_weight is not None,
        PDL=pdl,
        num_warps=max(1, min(8, block_k // 512)),
        **({"launch_pdl": True} if pdl else {}),
    )
    return hidden if norm_weight is None else (hidden, normed)


def _gemv(pdl: bool) -> Any:
    def gemv(
        x: torch.Tensor,
        weight: torch.Tensor,
        norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
        act: bool = False,
    ) -> torch.Tensor:
        """The custom op (the ``triton_op``'s own fake implementation: it traces it)."""
        kernel = _gemv_kernel if pdl else wrap_triton(_gemv_kernel)
        return launch(x, weight, norm_weight, eps, act, kernel, pdl=pdl)

    return gemv


def _gemv_residual(pdl: bool) -> Any:
    def gemv_residual(
        y: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
        act: bool = False,
        post_weight: torch.Tensor | None = None,
        post_eps: float = 1e-6,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual form as a second op (its own schema: two outputs)."""
        out, hidden = launch(
            y,
            weight,
            norm_weight,
            eps,
            act,
            _gemv_kernel if pdl else wrap_triton(_gemv_kernel),
            residual=residual,
            post_weight=post_weight,
            post_eps=post_eps,
            pdl=pdl,
        )
        return out, hidden

    return gemv_residual


PDL_OP_NAME = "gemma_local::gemv_pdl"
PDL_RESIDUAL_OP_NAME = "gemma_local::gemv_residual_pdl"
PDL_ADD_OP_NAME = "gemma_local::residual_add_pdl"

gemv_op, gemv_pdl_op = op_pair(OP_NAME, PDL_OP_NAME, _gemv)
gemv_residual_op, gemv_residual_pdl_op = op_pair(
    RESIDUAL_OP_NAME, PDL_RESIDUAL_OP_NAME, _gemv_residual
)


RESIDUAL_NORM_OP_NAME = "gemma_local::residual_norm"


@torch.library.triton_op(RESIDUAL_NORM_OP_NAME, mutates_args=())
def residual_norm_op(
    y: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor | None,
    post_eps: float,
    norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, rmsnorm(h))``, ``h = residual + post_norm(y)``: the residual add and both
    norms in front of a cuBLAS product (the decode step at 2-16 rows)."""
    out: tuple[torch.Tensor, torch.Tensor] = launch_residual(
        y,
        residual,
        post_weight,
        post_eps,
        wrap_triton(_residual_kernel),
        norm_weight=norm_weight,
        eps=eps,
    )
    return out


# At one row the residual add + norm kernel is the PDL chain's (without it, inductor's
# kernel does the same); at 2-16 rows, with the next norm, it is residual_norm_op.
@torch.library.custom_op(PDL_ADD_OP_NAME, mutates_args=())
def residual_add_pdl_op(
    y: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor | None = None,
    post_eps: float = 1e-6,
) -> torch.Tensor:
    """``residual + post_norm(y)`` launched with PDL."""
    hidden: torch.Tensor = launch_residual(
        y, residual, post_weight, post_eps, _residual_kernel, pdl=True
    )
    return hidden


@residual_add_pdl_op.register_fake
def _residual_add_pdl_fake(
    y: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor | None = None,
    post_eps: float = 1e-6,
) -> torch.Tensor:
    return torch.empty_like(residual)
