"""Chain probe (GPU): a decode step's products back to back, as the fast path runs them,
with and without the two things that act on the gaps between kernels::

    python benchmarks/probe_pdl.py [--shapes 1b,12b] [--layers 48] [--replays 20]

For every layer of the shape (distinct weights, so every product reads HBM):
q/k/v with the input norm, o (on the first heads' q as its input), gate/up with
the pre-MLP norm and the activation, down; captured in one CUDA graph and
replayed. Four variants:

* ``plain``: the residual add + post-norm as torch ops between the products
  (what inductor makes two kernels of);
* ``fold``: the residual add + post-norm folded into the next product
  (``core.accel.cuda.gemv.gemv_residual``'s kernel);
* ``+pdl``: each product launched with programmatic dependent launch: it starts
  while the previous one drains, streams its first weight tiles and waits
  (``griddepcontrol.wait``) only before it reads the previous output.

Prints ms per step and us per layer; the attention and rope/store kernels are
not in the chain.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that made them)
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: name -> (hidden, q width, qkv width, intermediate)
SHAPES = {"1b": (1152, 1024, 1536, 6912), "12b": (3840, 4096, 8192, 15360)}


def main() -> None:
    import torch

    from core.accel.cuda import _gemv_triton as kernels
    from core.accel.cuda import gemv

    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1b,12b")
    parser.add_argument("--layers", type=int, default=0, help="default: the shape's own")
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    kernel = kernels._gemv_kernel
    for shape in args.shapes.split(","):
        hidden, q_width, qkv_width, inter = SHAPES[shape]
        layers = args.layers or {"1b": 26, "12b": 48}[shape]
        gen = torch.Generator(device=dev).manual_seed(0)

        def weight(n: int, k: int) -> Any:
            return (torch.randn(n, k, generator=gen, device=dev) * k**-0.5).to(dt)

        def norm() -> Any:
            return (0.1 * torch.randn(hidden, generator=gen, device=dev)).to(dt)

        ws = [
            dict(
                qkv=weight(qkv_width, hidden),
                o=weight(hidden, q_width),
                gate_up=weight(2 * inter, hidden),
                down=weight(hidden, inter),
                n_in=norm(),
                n_post_attn=norm(),
                n_pre_ff=norm(),
                n_post_ff=norm(),
            )
            for _ in range(layers)
        ]
        x0 = torch.randn(1, hidden, generator=gen, device=dev).to(dt)

        def step(fold: bool, pdl: bool) -> Any:
            def g(x: Any, w: Any, nw: Any = None, act: bool = False, **kw: Any) -> Any:
                return kernels.launch(x, w, nw, 1e-6, act, kernel, pdl=pdl, **kw)

            x, y = x0, torch.zeros_like(x0)
            for i, w in enumerate(ws):
                post_ff = ws[i - 1]["n_post_ff"] if i else w["n_post_ff"]
                if fold:
                    qkv, x = g(y, w["qkv"], w["n_in"], residual=x, post_weight=post_ff)
                else:
                    x = x + gemv.rms_norm(y, post_ff, 1e-6)
                    qkv = g(x, w["qkv"], w["n_in"])
                o = g(qkv[:, :q_width], w["o"])
                if fold:
                    a, x = g(
                        o,
                        w["gate_up"],
                        w["n_pre_ff"],
                        True,
                        residual=x,
                        post_weight=w["n_post_attn"],
                    )
                else:
                    x = x + gemv.rms_norm(o, w["n_post_attn"], 1e-6)
                    a = g(x, w["gate_up"], w["n_pre_ff"], True)
                y = g(a, w["down"])
            return x, y

        results = {}
        for fold in (False, True):
            for pdl in (False, True):
                name = ("fold" if fold else "plain") + ("+pdl" if pdl else "")
                try:
                    for _ in range(2):
                        want = step(fold, pdl)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        got = step(fold, pdl)
                    graph.replay()
                    torch.cuda.synchronize()
                    same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
                    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                    start.record()
                    for _ in range(args.replays):
                        graph.replay()
                    end.record()
                    torch.cuda.synchronize()
                    ms = start.elapsed_time(end) / args.replays
                    results[name] = ms
                    print(
                        f"{shape} {name:10s} {ms:.3f} ms/step  {1000 * ms / layers:.1f} us/layer"
                        f"  (graph output = eager: {same})",
                        flush=True,
                    )
                    del graph
                except Exception as exc:
                    print(f"{shape} {name}: failed: {type(exc).__name__}: {exc}", flush=True)
        if "plain" in results:
            base = results["plain"]
            print(
                f"{shape}: " + ", ".join(f"{k} {base / v:.3f}x" for k, v in results.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
