"""MLX batch of 8 against 8 sequential ``create()`` calls, the MLX rows of ``bench.py cpu`` alone.

    python benchmarks/probe_mlx.py [--repeats 5] [--variants seq,batch,plain]

The same small Gemma 3 (hidden 512, 4 layers, bf16), the same eight 128-token
prompts and 128 greedy tokens each as the bench's MLX section, without its
transformers rows. Variants, run interleaved (one of each per repeat, so drift
on a shared machine hits all alike):

- ``seq``: 8 sequential ``client.create()`` calls (the baseline);
- ``batch``: ``client.create_batch(8)`` as shipped (one MLX CPU stream per core);
- ``plain``: the batch as before the split step: the rows split into one
  ``BatchGenerator`` per stream, each stepping mlx-lm's own model call (the
  client's ``_split_decoder`` bypassed);
- ``one``: ``create_batch(8)`` on one stream (``cpu_streams=1``).

Each run also prints the CPU time other processes of this machine used during
it (``others``, in cores), and each repeat how many cores MLX got just before
and after it (:func:`parallel_cores`: on a shared virtual machine the second
core comes and goes while this machine looks idle). ``--wait-cores 1.8`` waits
for both cores before each repeat. Ratios are sequential time / batch time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import conversations, cpu_checkpoint


def _cpu_stat() -> tuple[float, float]:
    """(idle, total) CPU seconds of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[3] + fields[4]) / tick, sum(fields) / tick


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds of ``fn()`` and the cores other processes kept busy meanwhile."""
    idle0, total0 = _cpu_stat()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    idle1, total1 = _cpu_stat()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    mine = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    busy = (total1 - total0) - (idle1 - idle0)
    return wall, max(0.0, busy - mine) / wall


def parallel_cores(streams: list[Any]) -> float:
    """How many cores MLX gets now: a fixed matmul chain on one CPU stream, then on two at once.

    2.0 when both cores are free; on a shared (virtual) machine it can drop
    towards 1 while no process of this machine is busy.
    """
    import mlx.core as mx

    weight = mx.ones((4096, 512), mx.bfloat16)
    x = mx.ones((4, 512), mx.bfloat16)
    mx.eval(weight, x)

    def work(count: int) -> float:
        start = time.perf_counter()
        outs = []
        for stream in streams[:count]:
            with mx.stream(stream):
                outs += [x @ weight.T for _ in range(40)]
        mx.eval(outs)
        return time.perf_counter() - start

    work(2)
    return 2 * work(1) / work(2)


def wait_for_cores(streams: list[Any], wanted: float, patience: float) -> float:
    """Waits (up to ``patience`` seconds) until :func:`parallel_cores` reaches ``wanted``."""
    deadline = time.monotonic() + patience
    while True:
        cores = parallel_cores(streams)
        if cores >= wanted or time.monotonic() > deadline:
            return cores
        time.sleep(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="seq,batch,plain")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument(
        "--work", default=None, help="folder for the checkpoint (default: a temp dir)"
    )
    parser.add_argument(
        "--wait-cores",
        type=float,
        default=0.0,
        help="before each repeat, wait (up to --patience s) until MLX gets this many cores",
    )
    parser.add_argument("--patience", type=float, default=120.0)
    args = parser.parse_args()

    import mlx.core as mx

    from core import GemmaMLXChatCompletion

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gemma-probe-"))
    path = work / "gemma3-small"
    if not (path / "model.safetensors").exists():
        path = cpu_checkpoint(work)
    client = GemmaMLXChatCompletion(str(path)).load()
    one = GemmaMLXChatCompletion(str(path), cpu_streams=1).load()
    convos = conversations(client, 8, args.prompt_tokens)
    n = args.new_tokens

    def plain() -> Any:
        client._split_decoder = lambda streams: None  # type: ignore[method-assign]
        try:
            return client.create_batch(convos, temperature=0, max_tokens=n)
        finally:
            del client._split_decoder

    fns: dict[str, Callable[[], Any]] = {
        "seq": lambda: [client.create(c, temperature=0, max_tokens=n) for c in convos],
        "batch": lambda: client.create_batch(convos, temperature=0, max_tokens=n),
        "plain": plain,
        "one": lambda: one.create_batch(convos, temperature=0, max_tokens=n),
    }
    names = [v for v in args.variants.split(",") if v]
    outputs = {name: fns[name]() for name in names}  # warm-up (and compile)
    texts = {
        name: [
            c["message"]["content"]
            for o in (out if isinstance(out, list) else [out])
            for c in o["choices"]
        ]
        for name, out in outputs.items()
    }
    for name in names:
        if name != names[0]:
            print(f"{name}: same text as {names[0]}: {texts[name] == texts[names[0]]}")
    probe_streams = [mx.new_stream(mx.cpu) for _ in range(2)]
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        cores = wait_for_cores(probe_streams, args.wait_cores, args.patience)
        line = [f"cores {cores:.2f}"]
        for name in names:
            wall, others = timed(fns[name])
            times[name].append(wall)
            line.append(f"{name} {8 * n / wall:6.1f} tok/s (others {others:.2f})")
        if "seq" in times:
            line += [
                f"{name} {times['seq'][-1] / times[name][-1]:.2f}x"
                for name in names
                if name != "seq"
            ]
        line.append(f"cores after {parallel_cores(probe_streams):.2f}")
        print(f"[{rep + 1}] " + ", ".join(line), flush=True)
    print(f"load average: {os.getloadavg()}")
    for name in names:
        med = statistics.median(times[name])
        print(
            f"{name:6s} median {8 * n / med:6.1f} tok/s  "
            f"(min {8 * n / max(times[name]):.1f}, max {8 * n / min(times[name]):.1f})"
        )
    if "seq" in times:
        for name in names:
            if name == "seq":
                continue
            ratios = [s / b for s, b in zip(times["seq"], times[name], strict=True)]
            print(
                f"{name:6s} x sequential: median of pairs {statistics.median(ratios):.2f} "
                f"(min {min(ratios):.2f}, max {max(ratios):.2f}); "
                f"of medians {statistics.median(times['seq']) / statistics.median(times[name]):.2f}"
            )
    one.close()
    client.close()


if __name__ == "__main__":
    main()
