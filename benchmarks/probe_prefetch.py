"""L2 prefetch probe (GPU): can the 16-row decode step's idle-HBM windows load the next
product's weights ahead of it?

At 16 rows a 12b decode layer is ten kernels; between the big products (q/k/v,
gate/up: cuBLAS; o, down: the gemv op) run small ones (the residual add + norms,
rope/store, attention's fixed cost, the MLP activation) during which HBM is mostly
idle: about 0.8 ms of a 7.8 ms step. This probe rebuilds that layer chain from the
fast path's own ops over 48 layers of distinct 12b-shaped random weights and a
16 x 512 KV cache filled to ``--position``, captures one step (no lm_head) as a
CUDA graph, and times it with a small kernel in front of a window that asks the
TMA unit (``cp.async.bulk.prefetch.L2``, fire and forget) to pull the first MB of
the next product's weight into L2::

    python benchmarks/probe_prefetch.py [--position 256] [--mb 8,16,32] [--lines]

``--lines`` asks per 128-byte line (``prefetch.global.L2::evict_last``) instead.
Variants print the step time and the difference to the chain without prefetch
(``base``); ``empty`` is the prefetch kernel with next to nothing to fetch (its
launch cost). Not the benchmark (``bench.py``), a design probe. On an H200 no
variant beat the chain (RESULTS.md at commit cd0f55c, "Run 20 and the L2 prefetch probe"; git history keeps the run diary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from core.accel.cuda import decode_attention, gemv, rope_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import graph_us

HIDDEN, HEADS, KV, D, INTER, LAYERS, ROWS, SLOTS = 3840, 16, 8, 256, 15360, 48, 16, 512
CHUNK = 64 * 1024  # bytes one bulk prefetch asks for


#: One bulk prefetch (TMA) per lane, without and with an L2 evict_last policy.
BULK_ASM = "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;"
BULK_EVICT_LAST_ASM = (
    "{ .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
    "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }"
)


@triton.jit
def _prefetch_kernel(
    ptr, chunks, ASM: tl.constexpr, CHUNK_BYTES: tl.constexpr, BLOCK: tl.constexpr
):
    """Each lane asks for one CHUNK_BYTES piece of ``ptr`` (bytes) to be brought into L2."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.minimum(offs, chunks - 1)  # spare lanes repeat the last chunk
    addr = (ptr + offs.to(tl.int64) * CHUNK_BYTES).to(tl.int64)
    size = tl.full([BLOCK], CHUNK_BYTES, tl.int32)
    tl.inline_asm_elementwise(ASM, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_lines_kernel(ptr, lines, PER: tl.constexpr, BLOCK: tl.constexpr):
    """Each lane asks for PER 128-byte lines of ``ptr`` (bytes), one ``prefetch`` each."""
    for i in range(PER):
        offs = (tl.program_id(0) * PER + i) * BLOCK + tl.arange(0, BLOCK)
        offs = tl.minimum(offs, lines - 1)
        addr = (ptr + offs.to(tl.int64) * 128).to(tl.int64)
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
            "=r,l",
            [addr],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


def prefetch(weight: torch.Tensor, mb: float, hint: bool, lines: bool) -> None:
    nbytes = min(int(mb * 2**20), weight.numel() * weight.element_size())
    data = weight.view(torch.uint8)
    if lines:
        count = max(1, nbytes // 128)
        per, block = 8, 128
        grid = (triton.cdiv(count, per * block),)
        _prefetch_lines_kernel[grid](data, count, PER=per, BLOCK=block, num_warps=4)
        return
    chunks = max(1, nbytes // CHUNK)  # "empty": one chunk, the cost of the launch
    block = 32
    _prefetch_kernel[(triton.cdiv(chunks, block),)](
        data,
        chunks,
        ASM=BULK_EVICT_LAST_ASM if hint else BULK_ASM,
        CHUNK_BYTES=CHUNK,
        BLOCK=block,
        num_warps=1,
    )


class Layer:
    def __init__(self, gen: torch.Generator) -> None:
        def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
            return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

        self.qkv = rand((HEADS + 2 * KV) * D, HIDDEN)
        self.o = rand(HIDDEN, HEADS * D)
        self.gate_up = rand(2 * INTER, HIDDEN)
        self.down = rand(HIDDEN, INTER)
        self.norms = [rand(HIDDEN, scale=0.1) for _ in range(4)]
        self.qk_norm = [rand(D, scale=0.1) for _ in range(2)]
        self.keys = rand(ROWS, KV, SLOTS, D, scale=1.0)
        self.values = rand(ROWS, KV, SLOTS, D, scale=1.0)


@torch.compile(dynamic=False)
def act(gu: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up``, one inductor kernel as in the model."""
    return F.gelu(gu[:, :INTER], approximate="tanh") * gu[:, INTER:]


def make_step(
    layers: list[Layer], plan: dict[str, float], hint: bool, lines: bool, position: int
) -> Any:
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.randn(ROWS, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
    cos = torch.randn(ROWS, D, device="cuda", generator=gen).to(torch.bfloat16)
    sin = torch.randn(ROWS, D, device="cuda", generator=gen).to(torch.bfloat16)
    slot = torch.tensor([position], device="cuda")
    limit = torch.tensor([position + 1], device="cuda")
    allowed = torch.ones(ROWS, 1, 1, SLOTS, dtype=torch.bool, device="cuda")

    def step() -> torch.Tensor:
        x, y = x0, torch.zeros_like(x0)
        for w in layers:
            if "qkv" in plan:
                prefetch(w.qkv, plan["qkv"], hint, lines)
            x, h = gemv.residual_norm(y, x, w.norms[3], 1e-6, w.norms[0], 1e-6)
            qkv = F.linear(h, w.qkv)
            if "o" in plan:
                prefetch(w.o, plan["o"], hint, lines)
            q = rope_store.rope_store(
                qkv, cos, sin, w.keys, w.values, slot, HEADS, *w.qk_norm, 1e-6
            )
            out = decode_attention.decode_attention(
                q, w.keys, w.values, allowed, D**-0.5, None, limit
            )
            y = gemv.gemv(out.reshape(ROWS, -1), w.o)
            if "gate_up" in plan:
                prefetch(w.gate_up, plan["gate_up"], hint, lines)
            x, h = gemv.residual_norm(y, x, w.norms[1], 1e-6, w.norms[2], 1e-6)
            a = act(F.linear(h, w.gate_up))
            if "down" in plan:
                prefetch(w.down, plan["down"], hint, lines)
            y = gemv.gemv(a, w.down)
        return x + y

    return step


def time_step(step: Any, replays: int = 30) -> float:
    """Milliseconds per replay of one captured ``step`` (:func:`probe.graph_us`)."""
    return graph_us(lambda _: step(), 1, replays) / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--position", type=int, default=256)
    parser.add_argument("--mb", default="8,16,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--lines", action="store_true", help="per-line prefetch.global.L2 instead of bulk"
    )
    args = parser.parse_args()
    sizes = [float(s) for s in args.mb.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        layers = [Layer(gen) for _ in range(LAYERS)]
        variants: list[tuple[str, dict[str, float], bool]] = [("base", {}, False)]
        variants.append(("empty x4", {"qkv": 0, "o": 0, "gate_up": 0, "down": 0}, False))
        for mb in sizes:
            for name in ("qkv", "o", "gate_up", "down"):
                variants.append((f"{name} {mb:g} MB", {name: mb}, False))
            variants.append(
                (f"all {mb:g} MB", dict.fromkeys(("qkv", "o", "gate_up", "down"), mb), False)
            )
            variants.append(
                (
                    f"all {mb:g} MB evict_last",
                    dict.fromkeys(("qkv", "o", "gate_up", "down"), mb),
                    True,
                )
            )
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for label, plan, hint in variants:
                try:
                    ms = time_step(make_step(layers, plan, hint, args.lines, args.position))
                except Exception as exc:  # a variant that does not build: say so, go on
                    print(f"{label}: failed: {type(exc).__name__}: {str(exc)[-600:]}", flush=True)
                    continue
                results.setdefault(label, []).append(ms)
                base = min(results["base"]) if "base" in results else ms
                print(f"{label:28s} {ms:.3f} ms/step  ({(ms - base) * 1000:+.0f} us)", flush=True)
        print("\nbest of rounds:")
        base = min(results["base"])
        for label, times in results.items():
            best = min(times)
            print(f"{label:28s} {best:.3f} ms  {(best - base) * 1000:+6.0f} us  {base / best:.3f}x")


if __name__ == "__main__":
    main()
