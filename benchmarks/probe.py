"""Kernel probe (GPU): where a decode step's time goes, piece by piece.

Not the benchmark (that is ``bench.py``): this times the building blocks the
fast path is made of, each captured in a CUDA graph and replayed, so that a
design choice rests on a number::

    python benchmarks/probe.py [gemv] [splitk] [model[:1b|:12b]]

* ``gemv``: batch-1 (and 16) matrix-vector products of the 1b and 12b
  shapes: cuBLAS (eager ``F.linear``) against inductor's coordinate-descent
  Triton reductions, and the MLP's down projection with ``gelu(gate) * up``
  computed inside the reduction (what inductor fuses) or stored first.
  Weights cycle through copies larger than L2, so every call reads HBM.
* ``splitk``: the batch-1 products written as an explicit two-stage
  (split-K) reduction for inductor, against one stage (it was 5x slower).
* decode attention has a probe of its own, ``probe_attention.py`` (the
  Triton op against matmul + softmax, SDPA and ``flex_attention``).
* ``model[:SHAPE[:NAME=VALUE,...[:BATCH]]]``: a shape through ``create()``: first
  call, TTFT, tok/s, the bare graph replay, and every kernel of one step (count
  and time), then ``create_batch()`` of BATCH prompts: tok/s, the prompts' cost
  (``max_tokens=1``), the graph replay from four cache positions and the kernels
  of a step at position 256 (``xBATCH``: the batch alone); ``NAME=VALUE`` set
  ``GEMMA_LOCAL_NAME`` for that model only, so that
  ``model:12b:GEMV=0,ROPE_STORE=0 model:12b`` is an A/B in one process.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that made them)
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

torch: Any = None
F: Any = None


def graph_us(fn: Any, calls: int, replays: int = 5) -> float:
    """Microseconds per call of ``fn(i)`` for i in range(calls): warmed up (compiled) on a
    side stream, captured once in a CUDA graph, replayed ``replays`` times."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays / calls


def compiled(fn: Any, **options: Any) -> Any:
    return torch.compile(fn, dynamic=False, options=options or None)


def gemv() -> None:
    shapes = {
        "1b qkv": (1152, 1536),
        "1b o": (1024, 1152),
        "1b gate_up": (1152, 13824),
        "1b down": (6912, 1152),
        "1b lm_head": (1152, 262144),
        "12b qkv": (3840, 8192),
        "12b o": (4096, 3840),
        "12b gate_up": (3840, 30720),
        "12b down": (15360, 3840),
        "12b lm_head": (3840, 262208),
    }
    tune = {"coordinate_descent_tuning": True}
    for name, (k, n) in shapes.items():
        nbytes = k * n * 2
        copies = max(2, min(64, (1 << 30) // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for batch in (1, 16):
            x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
            variants: dict[str, Any] = {
                "cuBLAS": lambda i: F.linear(x, ws[i % copies]),
                "inductor+tune": compiled(lambda x, w: F.linear(x, w), **tune),
            }
            results = []
            for label, f in variants.items():
                try:
                    call = f if label == "cuBLAS" else (lambda i, f=f: f(x, ws[i % copies]))
                    us = graph_us(call, copies * 2)
                    results.append(f"{label} {us:7.1f} us {nbytes / us / 1e6:5.2f} TB/s")
                except Exception as exc:
                    results.append(f"{label} failed: {type(exc).__name__}: {str(exc)[:80]}")
            bench.log(f"gemv {name:12s} bs{batch:<3d} " + " | ".join(results))
        if name.endswith("down"):
            # the MLP tail: down(gelu(gate) * up), gate/up computed by the layer's previous GEMV
            for batch in (1, 16):
                gu = torch.randn(batch, 2 * k, device="cuda", dtype=torch.bfloat16)

                def fused(gu: Any, w: Any) -> Any:
                    g, u = gu.chunk(2, dim=-1)
                    return F.linear(F.gelu(g, approximate="tanh") * u, w)

                def stored(gu: Any, w: Any) -> Any:
                    g, u = gu.chunk(2, dim=-1)
                    act = F.gelu(g, approximate="tanh") * u
                    return F.linear(act, w), act  # an output: inductor must store it

                def eager(gu: Any, w: Any) -> Any:
                    g, u = gu.chunk(2, dim=-1)
                    return F.linear(F.gelu(g, approximate="tanh") * u, w)

                results = []
                for label, f in {
                    "eager(cuBLAS)": eager,
                    "act inlined+tune": compiled(fused, **tune),
                    "act stored+tune": compiled(stored, **tune),
                    "act inlined, no tune": compiled(fused),
                }.items():
                    try:
                        us = graph_us(lambda i, f=f: f(gu, ws[i % copies]), copies * 2)
                        results.append(f"{label} {us:6.1f} us {nbytes / us / 1e6:5.2f} TB/s")
                    except Exception as exc:
                        results.append(f"{label} failed: {type(exc).__name__}: {str(exc)[:80]}")
                bench.log(f"mlp-tail {name:9s} bs{batch:<3d} " + " | ".join(results))
        ws.clear()
        torch.cuda.empty_cache()


def splitk() -> None:
    """Batch-1 GEMVs written as an explicit two-stage (split-K) reduction, against one stage."""
    shapes = {
        "1b gate_up": (1152, 13824),
        "1b down": (6912, 1152),
        "12b qkv": (3840, 8192),
        "12b o": (4096, 3840),
        "12b down": (15360, 3840),
    }
    tune = {"coordinate_descent_tuning": True}
    for name, (k, n) in shapes.items():
        nbytes = k * n * 2
        copies = max(2, min(64, (1 << 30) // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        results = []
        for splits in (1, 2, 4, 8, 16):
            if k % splits:
                continue

            def gemv(x: Any, w: Any, splits: int = splits) -> Any:
                if splits == 1:
                    return F.linear(x, w)
                part = (x.view(1, 1, splits, -1) * w.view(1, n, splits, -1)).sum(
                    -1, dtype=torch.float32
                )
                return part.sum(-1).to(x.dtype)

            try:
                f = compiled(gemv, **tune)
                us = graph_us(lambda i, f=f: f(x, ws[i % copies]), copies * 2)
                results.append(f"split {splits}: {us:5.1f} us {nbytes / us / 1e6:4.2f} TB/s")
            except Exception as exc:
                results.append(f"split {splits} failed: {type(exc).__name__}: {str(exc)[:80]}")
        bench.log(f"splitk {name:11s} " + " | ".join(results))
        ws.clear()
        torch.cuda.empty_cache()


def model(shape: str = "1b", settings: str = "", batch: str = "1") -> None:
    """``batch`` ``N``: one prompt, then N; ``xN``: N only."""
    pairs = [kv.split("=", 1) for kv in settings.split(",") if kv]
    saved = {f"GEMMA_LOCAL_{k}": os.environ.get(f"GEMMA_LOCAL_{k}") for k, _ in pairs}
    os.environ.update({f"GEMMA_LOCAL_{k}": v for k, v in pairs})
    try:
        # Settings read while tracing must not meet a cached compile: dynamo's (reset)
        # and inductor's graph caches, whose keys hold our ops' names, not what their
        # Python launchers decide (probe 20 got the first setting's attention plan for
        # both).
        torch._dynamo.reset()
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
        _model(f"{shape} {settings}".strip(), shape, int(batch.lstrip("x")), batch[0] != "x")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.cuda.empty_cache()


def _model(label: str, shape: str, batch: int, single: bool = True) -> None:
    work = Path(bench.tempfile.mkdtemp())
    m = bench.gpu_model(shape, torch.bfloat16)
    tokenizer, path = bench.tokenizer_for(shape, work)
    client = bench.bench_client(m, tokenizer, str(path))
    convos = bench.conversations(client, max(batch, 1), 128)
    if single:
        _single(label, m, client, convos[0])
    if batch > 1:
        _batch(label, m, client, convos)
    client.close()


def _single(label: str, m: Any, client: Any, convo: Any) -> None:
    from core.accel.cuda import fast_path

    start = time.perf_counter()
    client.create(convo, temperature=0, max_tokens=256)
    bench.log(f"{label}: first call {time.perf_counter() - start:.1f} s; {fast_path.describe(m)}")
    for _ in range(3):
        start = time.perf_counter()
        out = client.create(convo, temperature=0, max_tokens=256)
        seconds = time.perf_counter() - start
        bench.log(f"{label}: {out['usage']['completion_tokens'] / seconds:.1f} tok/s")
    ttft = []
    for _ in range(5):  # the prompt and one token: what a first token costs, whatever its text
        start = time.perf_counter()
        client.create(convo, temperature=0, max_tokens=1)
        ttft.append((time.perf_counter() - start) * 1000)
    bench.log(f"{label}: prompt + first token ms {', '.join(f'{t:.1f}' for t in ttft)}")
    bench.log(f"{label}: graph replay {bench.graph_step_ms(m, 1):.3f} ms/step")
    bench.profile_steps(m, 1, top=60)


def _batch(label: str, m: Any, client: Any, convos: list[Any]) -> None:
    from core.accel.cuda import fast_path

    batch = len(convos)
    start = time.perf_counter()
    client.create_batch(convos, temperature=0, max_tokens=256)  # compile and capture
    bench.log(
        f"{label}: batch {batch} first call {time.perf_counter() - start:.1f} s; {fast_path.describe(m)}"
    )
    for _ in range(2):
        start = time.perf_counter()
        outs = client.create_batch(convos, temperature=0, max_tokens=256)
        seconds = time.perf_counter() - start
        rate = bench.completion_tokens(outs) / seconds
        bench.log(f"{label}: batch {batch}: {rate:.1f} tok/s")
    prefill = []
    for _ in range(3):  # the prompts and one token each: the batch's prefill
        start = time.perf_counter()
        client.create_batch(convos, temperature=0, max_tokens=1)
        prefill.append((time.perf_counter() - start) * 1000)
    bench.log(
        f"{label}: batch {batch}: prompts + first tokens ms {', '.join(f'{t:.1f}' for t in prefill)}"
    )
    _profile_call(
        f"{label}: batch {batch} prompts + first tokens",
        lambda: client.create_batch(convos, temperature=0, max_tokens=1),
    )
    for position in (8, 136, 256, 376):
        replay = bench.graph_step_ms(m, batch, position)
        bench.log(f"{label}: batch {batch} graph replay from {position}: {replay:.3f} ms/step")
    bench.profile_steps(m, batch, top=40, position=256)


def _profile_call(label: str, fn: Any, top: int = 25) -> None:
    """One call of ``fn`` under the profiler: its wall time, the GPU's kernel time and the
    top kernels (what the host adds is the difference)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000
    bench.log_kernels(prof, f"{label}: {wall:.1f} ms wall (profiled),", "in the call", 1, top)


def main() -> None:
    global torch, F
    import torch as t
    import torch.nn.functional as f

    torch, F = t, f
    parts = sys.argv[1:] or ["gemv", "model"]
    for part in parts:
        try:
            if part.startswith("model"):
                model(*part.split(":")[1:])
            else:
                {"gemv": gemv, "splitk": splitk}[part]()
        except Exception:
            traceback.print_exc()


if __name__ == "__main__":
    main()
