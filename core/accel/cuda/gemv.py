"""Matrix-vector products for the CUDA fast path's decode step: one Triton op.

At batch 1 (and up to 16 rows) a decode step's projections read every weight
once and do almost no arithmetic, so they are bound by memory bandwidth and,
on small models, by the number of kernels. :func:`gemv` is one custom op
(``gemma_local::gemv``, one Triton launch) that ``torch.compile`` puts in
its graph and CUDA graphs capture, with two of the layer's neighbouring
operations folded in::

    gemv(x, w)                          x @ w.T
    gemv(x, w, norm_weight, eps)        rmsnorm(x) @ w.T      (Gemma's norm, (1 + w))
    gemv(x, w_gate_up, ..., act=True)   gelu_tanh(x @ gate.T) * (x @ up.T)

so that a Gemma layer's input norm lives in its q/k/v product and its MLP's
activation in the gate/up product, instead of kernels of their own.
:func:`gemv_residual` (``gemma_local::gemv_residual``) also takes the residual
add before it::

    gemv_residual(y, r, w, norm_weight, eps, act, post_weight, post_eps)
        h = r + post_norm(y); returns (rmsnorm(h) @ w.T  [or the activation], h)

so that the residual add + norm kernels between a layer's products (after the
o projection; after the down projection, into the next layer's q/k/v) go too.

``pdl=True`` (Hopper and later, :func:`pdl_available`) launches either form with
programmatic dependent launch (ops ``gemma_local::gemv_pdl`` and
``gemv_residual_pdl``), and :func:`residual_add` is the residual add + norm as a
kernel of such a chain: the fast path's one-row decode step runs on them.
:func:`residual_norm` is that kernel with the next product's norm as well, for the
steps of 2-16 rows, whose wide products (q/k/v, gate/up) are cuBLAS's or, where
:data:`TUNED` says so, the op's swapped form (``W @ x.T``, see :func:`preferred`).

The kernel lives in :mod:`core.accel.cuda._gemv_triton`, imported (and the op registered)
by :func:`available` or the first call; importing this module imports neither
torch nor triton. Block sizes come from :data:`TUNED` (measured on an H200 by
``benchmarks/probe_gemv.py``) or a heuristic. :func:`reference` is the same
product in plain torch.
"""

from __future__ import annotations

import functools
from typing import Any

from . import _triton_ops

#: Most rows (tokens) the op is meant for; more is a GEMM (cuBLAS does it well).
MAX_ROWS = 16

#: (form, N out, K, act) -> (BLOCK_N, BLOCK_K, num_warps, num_stages[, swap]), measured
#: on an H200 by ``benchmarks/probe_gemv.py`` (form: "gemv" at one row, "dot" at 2-16; log
#: ``benchmarks/runs/2026-11-26-probe-gemv-3-eviction.log``, the 12b's o and down at 16
#: rows and the 1b's ``--deep``: ``...-probe-gemv-8-deep.log``, ``-9-deep``; the swapped
#: gate/up forms ``--swap``: ``2026-12-01-probe-gemv-12-swap.log``); other shapes get a
#: heuristic. ``swap``: the dot form as ``W @ x.T`` (wgmma on Hopper).
TUNED: dict[tuple[str, int, int, bool], tuple[int, ...]] = {
    # gemma-3-12b: q/k/v, o, gate/up (+ activation), down
    ("gemv", 8192, 3840, False): (8, 1024, 4, 1),
    ("dot", 8192, 3840, False): (64, 128, 4, 5, True),  # 17.1 us (cuBLAS 17.8)
    ("gemv", 3840, 4096, False): (2, 4096, 4, 1),
    ("dot", 3840, 4096, False): (32, 512, 4, 4),  # 10.6 us (256-wide chunks: 11.0)
    ("gemv", 15360, 3840, True): (16, 256, 2, 2),  # probe-gemv-4-wide: 58.4 us
    ("dot", 15360, 3840, True): (128, 128, 4, 3, True),  # 56.9 us (cuBLAS + act 63.2)
    ("gemv", 3840, 15360, False): (16, 1024, 8, 1),
    ("dot", 3840, 15360, False): (32, 512, 4, 4),  # 30.9 us (256-wide chunks: 32.7)
    # gemma-3-1b
    ("gemv", 1536, 1152, False): (4, 2048, 8, 1),
    ("dot", 1536, 1152, False): (32, 256, 4, 4),
    ("gemv", 1152, 1024, False): (2, 2048, 4, 1),
    ("dot", 1152, 1024, False): (16, 512, 4, 4),  # 3.8 us (4.1)
    ("gemv", 6912, 1152, True): (8, 128, 4, 1),
    ("dot", 6912, 1152, True): (64, 64, 4, 5, True),  # 10.1 us (cuBLAS + act 12.3)
    ("gemv", 1152, 6912, False): (2, 2048, 8, 1),
    ("dot", 1152, 6912, False): (16, 512, 4, 4),  # 11.2 us (13.5; cuBLAS 9.9 runs it)
}


def folded(name: str, shape: tuple[int, int]) -> bool:
    """Whether the decode step runs its one-row ``name`` product (weight ``shape`` [N, K])
    in the residual form (:func:`gemv_residual`: the residual add + post-norm before it
    folded in) rather than after an add + norm kernel of inductor's.

    From ``probe_gemv.py --resid`` (``benchmarks/runs/2026-11-26-probe-gemv-5-resid.log``,
    ``-6-resid-wide``) and in-model A/Bs in one process (``probe.py model:SHAPE:
    FOLD_RESIDUAL=0`` against the default, probe 12), on an H200:

    * q/k/v of a narrow model (K <= 2048): folded. The 1b's step goes from 1.099 to
      1.075 ms (qkv 3.9 against 3.4 us, for an add + norm kernel of about 2 us);
    * q/k/v of the 12b (K = 3840): not folded. Alone it is 19.7 against 18.2 us, but
      in the step 6.783 against 6.711 ms: every program reads y, r and the post-norm
      weight and first sums y's squares, which costs more than the kernel it saves;
    * gate/up: never (12b 66.1 against 58.4 us, 1b 13.2 against 11.5).
    """
    return name == "qkv" and shape[1] <= 2048


def preferred(name: str, rows: int, shape: tuple[int, int]) -> bool:
    """Whether the fast path should run a decode step's ``name`` product (``qkv``, ``o``,
    ``gate_up``, ``down``) of ``rows`` tokens and weight ``shape`` [N, K] through the op
    rather than what inductor / cuBLAS make of it.

    From ``benchmarks/probe_gemv.py`` and ``probe.py model`` A/Bs on an H200
    (``benchmarks/runs/2026-11-26-probe-*``):

    * one row: every product. With the layer's norms and MLP activation folded in
      it takes the 1b from 686 to 856 tok/s (1.38 -> 1.10 ms a step, 104 launches
      fewer). On the 12b the op is on a par with the best of inductor's tuned
      reductions (us: q/k/v 18.4, o 9.4, gate/up 58.4, down 28.7), and it is the
      same kernel every time: inductor's coordinate-descent tuning does not pick
      the same configurations twice, and five compiles of the same step gave
      q/k/v 16.6-26.8 us, down 28.3-39.5 and gate/up 52-70 (127 to 148 tok/s);
    * 2-16 rows (the op's dot form): it wins the long reductions (12b down 30.8
      against cuBLAS's 34.9 us, o 10.6 against 12.9, with 512-wide chunks: probe-gemv
      8 and 9) where there are enough programs to fill the GPU (N >= 2048 for down;
      the 1b's down, N = 1152: cuBLAS 9.9 against 11.2); cuBLAS wins the wide
      products (q/k/v 17.7 against 30.1, gate/up 61.0 against 69.3, and further with
      the residual add folded in: 28.5 and 86.7; probe-gemv 10 and 11), but for the
      q/k/v and gate/up products in the swapped form (``W @ x.T``, wgmma; the
      activation in the gate/up one), where :data:`TUNED` has it: the 12b's gate/up
      56.9 us against 63.2 for cuBLAS and inductor's activation kernel, the 1b's 10.1
      against 12.3, the 12b's q/k/v 17.1 against 17.8 (probe-gemv 12, the products
      taken without the norm, which the residual_norm kernel before them applies).
    """
    n = shape[0]
    if rows == 1:
        return True
    if rows > MAX_ROWS:
        return False
    if name == "down":
        return n >= 2048
    if name == "o":
        return n >= 1024
    if name == "gate_up":
        return swapped(n // 2, shape[1], act=True)
    return swapped(n, shape[1], act=False) if name == "qkv" else False


def swapped(n_out: int, k: int, act: bool) -> bool:
    """Whether :data:`TUNED` runs the 2-16-row product of ``n_out`` outputs and ``K`` in the
    swapped form."""
    return TUNED.get(("dot", n_out, k, act), ())[4:] == (True,)


@functools.cache
def _kernels() -> Any:
    """The kernels module with its ops (imports torch and triton and registers the ops
    the first time)."""
    from . import _gemv_triton as kernels

    return kernels


def available(device: Any) -> bool:
    """Whether :func:`gemv` runs on ``device``: CUDA, with triton importable and the op
    registered (registering it here when needed)."""
    return _triton_ops.available(device, _kernels)


def works(dtype: Any, device: Any, *, pdl: bool = False) -> bool:
    """Run the op once in each form (the 2-16-row one both ways round, and the residual
    form and :func:`residual_norm`;
    with ``pdl``, the PDL forms and :func:`residual_add`) on small random inputs and
    compare with :func:`reference`: False (and a warning) where the kernel does not
    compile or disagrees on this GPU, so that the caller keeps its plain products."""
    import torch

    def error() -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        worst = 0.0
        for rows in (1, 3):
            x = torch.randn(rows, 320, generator=gen, device=device).to(dtype)
            r = torch.randn(rows, 320, generator=gen, device=device).to(dtype)
            w = (torch.randn(96, 320, generator=gen, device=device) * 0.05).to(dtype)
            norm = (torch.randn(320, generator=gen, device=device) * 0.1).to(dtype)
            for norm_weight, act in ((None, False), (norm, False), (norm, True)):
                got = gemv(x, w, norm_weight, 1e-6, act, pdl=pdl).float()
                want = reference(x, w, norm_weight, 1e-6, act).float()
                worst = max(worst, float((got - want).abs().max().item()))
            if rows > 1 and not pdl:  # the swapped dot form, which TUNED picks for some
                kernels = _kernels()
                for act in (False, True):
                    block = (64, 64, 4, 2, True)
                    got = kernels.launch(x, w, None, 1e-6, act, kernels._gemv_kernel, block=block)
                    want = reference(x, w, None, 1e-6, act)
                    worst = max(worst, float((got.float() - want.float()).abs().max().item()))
            for post in (None, norm.flip(0)):
                got_out, got_h = gemv_residual(x, r, w, norm, 1e-6, True, post, 1e-6, pdl=pdl)
                want_out, want_h = reference_residual(x, r, w, norm, 1e-6, True, post, 1e-6)
                pairs = [(got_out, want_out), (got_h, want_h)]
                if pdl:
                    pairs.append((residual_add(x, r, post, 1e-6), want_h))
                else:
                    norm_h, norm_n = residual_norm(x, r, post, 1e-6, norm, 1e-6)
                    pairs += [(norm_h, want_h), (norm_n, rms_norm(want_h, norm, 1e-6))]
                for a, b in pairs:
                    worst = max(worst, float((a.float() - b.float()).abs().max().item()))
        return worst

    return _triton_ops.self_check("gemv", error)


def gemv(
    x: Any,
    weight: Any,
    norm_weight: Any = None,
    eps: float = 1e-6,
    act: bool = False,
    *,
    pdl: bool = False,
) -> Any:
    """``x`` [M, K] (M tokens, best at 1..16) times ``weight`` [N, K] (``nn.Linear``'s
    layout) transposed: [M, N] in x's dtype, fp32 accumulation.

    ``norm_weight`` [K]: x goes through Gemma's RMSNorm first
    (``x * rsqrt(mean(x^2) + eps) * (1 + norm_weight)`` in fp32, rounded to the
    dtype). ``act``: ``weight`` is the gate and up projections stacked ([2F, K],
    gate first) and the result is ``gelu_tanh(gate) * up`` [M, F].

    CUDA only (see :func:`available`); ``ValueError`` on shapes or dtypes the
    kernel does not take. ``pdl``: launched with programmatic dependent launch
    (Hopper and later, see :func:`pdl_available`): the kernel is launched while the
    one before it finishes and waits for it only before it reads x; it lets the next
    kernel launch once its products are done (``gemma_local::gemv_pdl``).
    """
    op = _kernels().gemv_pdl_op if pdl else _kernels().gemv_op
    return op(x, weight, norm_weight, eps, act)


def gemv_residual(
    y: Any,
    residual: Any,
    weight: Any,
    norm_weight: Any = None,
    eps: float = 1e-6,
    act: bool = False,
    post_weight: Any = None,
    post_eps: float = 1e-6,
    *,
    pdl: bool = False,
) -> tuple[Any, Any]:
    """:func:`gemv` of ``h = residual + post_norm(y)``; returns ``(product, h)``.

    ``y`` and ``residual`` [M, K]: the previous product's output and the residual
    stream. ``post_weight`` [K]: y goes through Gemma's RMSNorm first (Gemma 2/3's
    post-attention / post-feedforward norm, ``post_eps``); None adds y as it is
    (Gemma 1). ``h`` is rounded to the dtype as the modules' add is; the product is
    that of :func:`gemv` with ``norm_weight``, ``eps`` and ``act`` on h. ``pdl`` as
    for :func:`gemv`.
    """
    op = _kernels().gemv_residual_pdl_op if pdl else _kernels().gemv_residual_op
    out, hidden = op(y, residual, weight, norm_weight, eps, act, post_weight, post_eps)
    return out, hidden


def residual_add(y: Any, residual: Any, post_weight: Any = None, post_eps: float = 1e-6) -> Any:
    """``residual + post_norm(y)`` (``residual + y`` without ``post_weight``) [M, K], as
    :func:`gemv_residual`'s h, in one kernel launched with PDL
    (``gemma_local::residual_add_pdl``): the residual add + norm between a chain of PDL
    products, where inductor's kernel would break the chain (it cannot be launched
    early). CUDA, Hopper and later."""
    return _kernels().residual_add_pdl_op(y, residual, post_weight, post_eps)


def residual_norm(
    y: Any, residual: Any, post_weight: Any, post_eps: float, norm_weight: Any, eps: float
) -> tuple[Any, Any]:
    """``(h, rmsnorm(h))`` for ``h = residual + post_norm(y)`` [M, K], in one kernel, a
    program a row (``gemma_local::residual_norm``): what stands between two wide
    products of a decode step at 2-16 rows (after the o projection, into gate/up; after
    the down projection, into the next layer's q/k/v). ``rmsnorm`` is Gemma's
    (``1 + norm_weight``, ``eps``), h and the normed h rounded as the modules round them.

    Inductor fuses the same into one reduction kernel per layer boundary, which takes
    longer for want of parallelism (12b at 16 rows, H200, probe 18: 5.4 and 3.2 us a
    layer). CUDA (see :func:`available`)."""
    return _kernels().residual_norm_op(y, residual, post_weight, post_eps, norm_weight, eps)


def pdl_available(device: Any) -> bool:
    """Whether the ``pdl=True`` forms run on ``device``: :func:`available`, a GPU of
    compute capability 9 or more (programmatic dependent launch) and a triton that
    has it."""
    return available(device) and _triton_ops.pdl_available(device)


def reference(
    x: Any, weight: Any, norm_weight: Any = None, eps: float = 1e-6, act: bool = False
) -> Any:
    """The same product in plain torch (the modules' own arithmetic)."""
    import torch.nn.functional as F

    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    out = F.linear(x, weight)
    if act:
        gate, up = out.chunk(2, dim=-1)
        out = F.gelu(gate, approximate="tanh") * up
    return out


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """Gemma's RMSNorm as its modules compute it (fp32, ``(1 + weight)``, back to x's dtype)."""
    import torch

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def reference_residual(
    y: Any,
    residual: Any,
    weight: Any,
    norm_weight: Any = None,
    eps: float = 1e-6,
    act: bool = False,
    post_weight: Any = None,
    post_eps: float = 1e-6,
) -> tuple[Any, Any]:
    """:func:`gemv_residual` in plain torch: ``(reference(h, ...), h)``."""
    hidden = residual + (y if post_weight is None else rms_norm(y, post_weight, post_eps))
    return reference(hidden, weight, norm_weight, eps, act), hidden
