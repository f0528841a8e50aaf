"""GEMV probe (GPU): the Triton op of :mod:`core.accel.cuda.gemv` against what inductor and
cuBLAS do for the same piece of a decode step, and the block-size sweep behind
``core.accel.cuda.gemv.TUNED``::

    python benchmarks/probe_gemv.py [--shapes 1b,12b] [--rows 1,16] [--quick] [--seconds 400]
        [--only 12b:o,12b:down] [--deep] [--swap]

For each product of a Gemma layer (1b and 12b shapes: q/k/v with the input norm,
o, gate/up with the pre-MLP norm and the activation, down), at 1 and 16 rows:

* ``inductor``: the same math compiled as the fast path compiles it
  (coordinate-descent tuning; the norm fused into the reduction, the activation
  a kernel of its own), ``cuBLAS``: eager ``F.linear`` of the plain product;
* ``ours``: the op at every block configuration of the sweep (``--quick``: the
  current :func:`core.accel.cuda._gemv_triton.config` only), the best printed with TB/s.

``--swap``: the 2-16-row sweep of the swapped dot form (``W @ x.T``), the products
taken as the 16-row decode step takes them (no norm: the residual_norm kernel hands over
the normed x); ``inductor`` is then cuBLAS and, for gate/up, inductor's activation
kernel after it (``probe-gemv-12`` printed that a second time as ``cuBLAS + act``).

Each call reads a different copy of the weights (copies larger than L2), captured in
a CUDA graph and replayed (``probe.graph_us``). Ends with the best configurations
as a ``TUNED`` literal.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that made them)
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench
from probe import graph_us

#: name -> (N, K, norm, act); N counts gate and up together for the act products
SHAPES = {
    "1b": {
        "qkv": (1536, 1152, True, False),
        "o": (1152, 1024, False, False),
        "gate_up": (13824, 1152, True, True),
        "down": (1152, 6912, False, False),
    },
    "12b": {
        "qkv": (8192, 3840, True, False),
        "o": (3840, 4096, False, False),
        "gate_up": (30720, 3840, True, True),
        "down": (3840, 15360, False, False),
    },
}

GEMV_GRID = {
    "block_n": (1, 2, 4, 8, 16),
    "block_k": (256, 512, 1024, 2048),
    "warps": (4, 8, 16),
    "stages": (1,),
}
#: ``--wide``: many rows a program, short chunks, and pipelined loops too
WIDE_GRID = {
    "block_n": (8, 16, 32, 64),
    "block_k": (32, 64, 128, 256),
    "warps": (2, 4, 8),
    "stages": (1, 2, 3),
}
DOT_GRID = {
    "block_n": (16, 32, 64, 128),
    "block_k": (128, 256),
    "warps": (4,),
    "stages": (3, 4),
}
#: ``--deep``: the 2-16-row sweep with more bytes in flight a program (longer chunks,
#: deeper pipelines, more warps)
DEEP_GRID = {
    "block_n": (16, 32, 64),
    "block_k": (256, 512, 1024),
    "warps": (4, 8),
    "stages": (2, 3, 4, 5, 6),
}
#: ``--swap``: the swapped dot form (W @ x.T: BLOCK_N is wgmma's M, at least 64)
SWAP_GRID = {
    "block_n": (64, 128),
    "block_k": (64, 128, 256),
    "warps": (4, 8),
    "stages": (2, 3, 4, 5),
    "swap": (True,),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1b,12b")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--quick", action="store_true", help="only the current configs")
    parser.add_argument("--wide", action="store_true", help="the one-row sweep over WIDE_GRID")
    parser.add_argument("--deep", action="store_true", help="the 2-16-row sweep over DEEP_GRID")
    parser.add_argument("--swap", action="store_true", help="the 2-16-row swapped form's sweep")
    parser.add_argument("--only", default="", help="e.g. 12b:gate_up,12b:qkv")
    parser.add_argument("--seconds", type=float, default=400.0, help="stop sweeping after")
    parser.add_argument(
        "--resid",
        action="store_true",
        help="the products with a norm (q/k/v, gate/up) in the residual form "
        "(core.accel.cuda.gemv.gemv_residual: the residual add + post-norm folded in)",
    )
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from core.accel.cuda import _gemv_triton as kernels
    from core.accel.cuda import gemv as ops

    assert ops.available("cuda")
    deadline = time.monotonic() + args.seconds
    tune = {"coordinate_descent_tuning": True}
    dtype = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best: dict[tuple[str, int, int, bool], tuple[tuple[int, int, int, int], float]] = {}

    def rmsnorm(x: Any, w: Any) -> Any:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + w.float())).to(x.dtype)

    def model_math(x: Any, w: Any, nw: Any, norm: bool, act: bool) -> Any:
        h = rmsnorm(x, nw) if norm else x
        out = F.linear(h, w)
        if act:
            gate, up = out.chunk(2, dim=-1)
            out = F.gelu(gate, approximate="tanh") * up
        return out

    for shape in args.shapes.split(","):
        for name, (n, k, norm, act) in SHAPES[shape].items():
            if args.only and f"{shape}:{name}" not in args.only.split(","):
                continue
            resid = args.resid and norm
            if args.resid and not norm:
                continue
            nbytes = n * k * 2
            copies = max(2, min(64, (1 << 30) // nbytes))
            ws = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
            nw = torch.randn(k, device="cuda", dtype=dtype) * 0.1
            for rows in (int(r) for r in args.rows.split(",")):
                if args.swap and rows == 1:
                    continue
                norm = SHAPES[shape][name][2] and not args.swap  # the step's normed x
                x = torch.randn(rows, k, device="cuda", dtype=dtype)
                r = torch.randn(rows, k, device="cuda", dtype=dtype)
                extra = {"residual": r, "post_weight": nw.flip(0)} if resid else {}
                label = f"{shape} {name:8s}{' resid' if resid else ''} rows {rows:<2d}"
                results = []
                compiled = torch.compile(
                    lambda x, w: model_math(x, w, nw, norm, act), dynamic=False, options=tune
                )
                for what, fn in (
                    ("inductor", lambda i: compiled(x, ws[i % copies])),
                    ("cuBLAS", lambda i: F.linear(x, ws[i % copies])),
                ):
                    us = graph_us(fn, copies * 2)
                    results.append(f"{what} {us:6.1f} us {nbytes / us / 1e6:4.2f} TB/s")
                want = model_math(x.float(), ws[0].float(), nw.float(), norm, act)
                got = ops.gemv(x, ws[0], nw if norm else None, 1e-6, act).float()
                error = ((got - want).abs().max() / want.abs().max()).item()
                current = kernels.config(rows, n // 2 if act else n, k, act, sms)
                configs = [current]
                if not args.quick:
                    grid = (WIDE_GRID if args.wide else GEMV_GRID) if rows == 1 else DOT_GRID
                    grid = DEEP_GRID if args.deep and rows > 1 else grid
                    grid = SWAP_GRID if args.swap else grid
                    configs += [c for c in itertools.product(*grid.values()) if c != current]
                timed = []
                for config in configs:
                    if time.monotonic() > deadline and timed:
                        break
                    try:
                        us = graph_us(
                            lambda i: kernels.launch(
                                x,
                                ws[i % copies],
                                nw if norm else None,
                                1e-6,
                                act,
                                kernels._gemv_kernel,
                                block=config,
                                **extra,
                            ),
                            copies * 2,
                        )
                        timed.append((us, config))
                    except Exception as exc:  # e.g. out of shared memory / registers
                        bench.log(f"{label} {config} failed: {type(exc).__name__}: {exc}"[:200])
                timed.sort()
                us0 = next(us for us, c in timed if c == current) if timed else float("nan")
                us, config = timed[0]
                results.append(f"ours(current {current}) {us0:6.1f} us")
                results.append(f"ours best {config} {us:6.1f} us {nbytes / us / 1e6:4.2f} TB/s")
                results.append(f"rel.err {error:.1e}")
                bench.log(f"{label} " + " | ".join(results))
                if len(timed) > 1:
                    top = ", ".join(f"{c}={u:.1f}" for u, c in timed[:5])
                    bench.log(f"{label} top: {top}")
                form = "dot" if rows > 1 else "gemv"
                best[(form, n // 2 if act else n, k, act)] = (config, us)
            ws.clear()
            torch.cuda.empty_cache()
    bench.log("TUNED = {")
    for key, (config, us) in best.items():
        bench.log(f"    {key!r}: {config!r},  # {us:.1f} us")
    bench.log("}")


if __name__ == "__main__":
    main()
