"""CPU: ``create()`` against raw ``generate`` on the bench's small model, with noise controls.

    python benchmarks/probe_cpu_overhead.py [--repeats 15]

The transformers rows of ``bench.py cpu`` alone (the small Gemma 3, bf16, a 128-token
prompt, 128 greedy tokens), run interleaved, one of each per repeat:

- ``raw``: ``model.generate`` as the bench calls it;
- ``raw + criterion``: the same with a stopping criterion that reads each step's
  tokens and returns a fresh ``False`` tensor, which is what the plain path adds to
  ``generate`` (it hands the tokens to the sink from such a criterion);
- ``raw + no-op criterion``: a criterion that does nothing, a noise control. It can
  only cost what ``raw + criterion`` costs or less, so the spread between those two
  shows how far the machine moves a median by itself;
- ``ours``: ``client.create()`` (model thread, sink, incremental detokenizing, the
  consumer reading the deltas).

Prints the median wall and CPU time (``time.process_time``: every thread of the
process) of each, its ratio to ``raw``, and the range of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from core import GemmaTransformersChatCompletion

    torch.manual_seed(0)
    path = bench.cpu_checkpoint(Path(tempfile.mkdtemp()))
    client = GemmaTransformersChatCompletion(str(path), device_map="cpu").load()
    model = client.model
    convos = bench.conversations(client, 1, 128)
    ids = bench.prompt_ids(client, convos)
    n = 128
    false = torch.tensor([False])

    class Reads(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            input_ids[:, -1].tolist()
            return torch.tensor([False], dtype=torch.bool, device=input_ids.device)

    class NoOp(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return false

    def raw(criterion: type[StoppingCriteria] | None = None) -> Callable[[], Any]:
        extra = (
            {} if criterion is None else {"stopping_criteria": StoppingCriteriaList([criterion()])}
        )
        return lambda: bench.raw_generate(model, ids, n, **extra)

    variants: dict[str, Callable[[], Any]] = {
        "raw": raw(),
        "raw + criterion": raw(Reads),
        "raw + no-op criterion": raw(NoOp),
        "ours": lambda: client.create(convos[0], temperature=0, max_tokens=n),
    }
    for fn in variants.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for key, fn in variants.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - started)
            cpu[key].append(time.process_time() - cpu_started)
    bench.log(
        f"{args.repeats} interleaved repeats, {n} tokens, {model.dtype}, {torch.get_num_threads()} threads"
    )
    for key in variants:
        pairs = [r / t for r, t in zip(wall["raw"], wall[key], strict=True)]
        bench.log(
            f"{key:22s} wall {statistics.median(wall[key]) * 1000:7.1f} ms "
            f"x raw {statistics.median(wall['raw']) / statistics.median(wall[key]):.3f} "
            f"(pairs {min(pairs):.3f}-{max(pairs):.3f}) | CPU {statistics.median(cpu[key]) * 1000:7.1f} ms "
            f"x raw {statistics.median(cpu['raw']) / statistics.median(cpu[key]):.3f}"
        )
    client.close()


if __name__ == "__main__":
    main()
