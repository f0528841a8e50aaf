"""Decode attention on one GPU: the fused Triton op against the matmul + softmax reference.

    python benchmarks/probe_attention.py            # three Gemma shapes, well under a minute
    python benchmarks/probe_attention.py --sweep    # also tile / split / warp settings of the kernel

For each shape (D=256, S=512 cache slots (``--slots``), the last 22% masked, bf16) it prints
the max abs error of the op against ``reference`` (and of ``reference`` itself
against fp32 math), then the time per call of

* ``reference compiled``: ``torch.compile(reference, dynamic=False)``,
* ``sdpa eager`` and ``flex_attention compiled``: the alternatives that lost,
* ``op eager``: the custom op called directly,
* ``op compiled``: ``torch.compile`` of a function calling the op,

each timed by capturing 26 calls (on 26 different K/V copies, so reads come from
HBM, not L2) in one CUDA graph and replaying it; TB/s is K+V bytes over time.
Every variant is wrapped: a failure prints its error and the rest go on.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.accel.cuda import decode_attention as da

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import graph_us

SHAPES = {  # name: (B, KV, R)
    "1b bs1": (1, 1, 4),
    "12b bs1": (1, 8, 2),
    "12b bs16": (16, 8, 2),
}
D, S, MASKED_FROM = 256, 512, 400
COPIES, REPLAYS = 26, 20


def make_inputs(torch: Any, batch: int, heads: int, rows: int) -> tuple[Any, list[Any], Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, heads, rows, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv = [
        (
            torch.randn(batch, heads, S, D, device="cuda", generator=gen, dtype=torch.bfloat16),
            torch.randn(batch, heads, S, D, device="cuda", generator=gen, dtype=torch.bfloat16),
        )
        for _ in range(COPIES)
    ]
    allowed = torch.ones(batch, 1, 1, S, dtype=torch.bool, device="cuda")
    allowed[..., MASKED_FROM:] = False
    return q, kv, allowed


def time_graph(fn: Callable[..., Any], q: Any, kv: list[Any], allowed: Any) -> float:
    """Microseconds per call of ``fn(q, k, v, allowed)``, from a graph of COPIES calls."""
    return graph_us(lambda i: fn(q, *kv[i], allowed), len(kv), REPLAYS)


def report(name: str, us: float, kv_bytes: int) -> None:
    print(f"  {name:<34} {us:8.2f} us/call  {kv_bytes / us / 1e6:6.2f} TB/s", flush=True)


def attempt(name: str, body: Callable[[], None]) -> None:
    try:
        body()
    except Exception as e:  # a probe: say what failed and go on
        print(f"  {name:<34} FAILED: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3)


def probe(torch: Any, label: str, shape: tuple[int, int, int], sweep: bool) -> None:
    batch, heads, rows = shape
    scale = D**-0.5
    q, kv, allowed = make_inputs(torch, batch, heads, rows)
    kv_bytes = 2 * batch * heads * S * D * 2
    print(f"{label}: B={batch} KV={heads} R={rows} D={D} S={S}, K+V {kv_bytes / 1e6:.1f} MB")

    def check() -> None:
        k, v = kv[0]
        out = da.decode_attention(q, k, v, allowed, scale)
        ref = da.reference(q, k, v, allowed, scale)
        exact = da.reference(q.float(), k.float(), v.float(), allowed, scale)
        print(
            f"  max abs err: op vs reference {(out.float() - ref.float()).abs().max():.2e},"
            f" op vs fp32 {(out.float() - exact).abs().max():.2e},"
            f" reference vs fp32 {(ref.float() - exact).abs().max():.2e}"
        )
        softcapped = da.decode_attention(q, k, v, allowed, scale, 50.0)
        ref = da.reference(q.float(), k.float(), v.float(), allowed, scale, 50.0)
        print(
            f"  max abs err with softcap 50: op vs fp32 {(softcapped.float() - ref).abs().max():.2e}"
        )

    def reference(q: Any, k: Any, v: Any, allowed: Any) -> Any:
        return da.reference(q, k, v, allowed, scale)

    def op(q: Any, k: Any, v: Any, allowed: Any) -> Any:
        return da.decode_attention(q, k, v, allowed, scale)

    attempt("check", check)

    def sdpa(q: Any, k: Any, v: Any, allowed: Any) -> Any:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale
        )

    def flex(q: Any, k: Any, v: Any, allowed: Any) -> Any:
        from torch.nn.attention.flex_attention import flex_attention

        ok = allowed[:, 0, 0, :]
        return flex_attention(
            q.reshape(batch, heads * rows, 1, D),
            k,
            v,
            score_mod=lambda score, b, h, qi, ki: torch.where(ok[b, ki], score, -float("inf")),
            enable_gqa=True,
            scale=scale,
        )

    variants: dict[str, Callable[..., Any]] = {
        "reference eager": reference,
        "reference compiled": torch.compile(reference, dynamic=False),
        "sdpa eager (cuDNN here)": sdpa,
        "flex_attention compiled": torch.compile(flex, dynamic=False),
        "op eager": op,
        "op compiled": torch.compile(op, dynamic=False, fullgraph=True),
    }
    for name, fn in variants.items():
        attempt(
            name,
            lambda name=name, fn=fn: report(name, time_graph(fn, q, kv, allowed), kv_bytes),
        )
    if sweep:
        from core.accel.cuda import _decode_attention_triton as kernels

        for block_s, nsplit, warps, stages in itertools.product(
            (32, 64, 128), (None, 1, 2, 4, 8, 16), (4, 8), (2, 3)
        ):
            if nsplit is not None and nsplit > -(-S // block_s):
                continue

            def raw(
                q: Any,
                k: Any,
                v: Any,
                allowed: Any,
                c: tuple[Any, ...] = (block_s, nsplit, warps, stages),
            ) -> Any:
                return kernels.launch(
                    q,
                    k,
                    v,
                    allowed,
                    scale,
                    None,
                    kernels._split_kernel,
                    kernels._combine_kernel,
                    block_s=c[0],
                    nsplit=c[1],
                    num_warps=c[2],
                    num_stages=c[3],
                )

            name = f"block_s={block_s} nsplit={nsplit} w={warps} st={stages}"
            attempt(
                name,
                lambda name=name, raw=raw: report(name, time_graph(raw, q, kv, allowed), kv_bytes),
            )


def main() -> None:
    global S, MASKED_FROM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel settings")
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="only these")
    parser.add_argument(
        "--slots", type=int, default=S, help=f"cache slots S (default {S}; the last 22%% masked)"
    )
    args = parser.parse_args()
    S, MASKED_FROM = args.slots, args.slots * 25 // 32
    import torch

    if not da.available("cuda"):
        sys.exit(
            "needs a CUDA GPU with triton (core.accel.cuda.decode_attention.available('cuda') is False)"
        )
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for label in args.shape or SHAPES:
        attempt(label, lambda label=label: probe(torch, label, SHAPES[label], args.sweep))


if __name__ == "__main__":
    main()
