"""What ``ChatGemmaLocal.batch()`` costs over ``create_batch()``, on the CPU, GPU-paced.

    python benchmarks/probe_langchain_batch.py [--step-ms 7] [--tokens 256] [--rows 16]

A stand-in for the 12b x16 GPU request without a GPU: the real transformers
client (tokenizer, sink, detokenisation, worker thread, core stream) over a
backend that, per decode step, sleeps ``--step-ms`` with the GIL released (as
a CUDA sync does) and then pushes one random token per row. The two calls run
interleaved; the ratio is ``create_batch`` time / ``ChatGemmaLocal.batch`` time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-ms", type=float, default=7.0)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from core import GemmaTransformersChatCompletion

    torch.manual_seed(0)
    model = bench.gpu_model("tiny", torch.float32, device="cpu")
    tokenizer, path = bench.tokenizer_for("tiny", Path(tempfile.mkdtemp(prefix="gemma-probe-")))
    step = args.step_ms / 1000

    class Paced(GemmaTransformersChatCompletion):
        def _load_model_and_tokenizer(self) -> None:
            self.model, self.tokenizer = model, tokenizer
            self._context_window = 1 << 20

        def _generate(self, prompts: Any, params: Any, sink: Any) -> None:
            rng = random.Random(0)
            for _ in range(max(row.max_tokens for row in sink.rows)):
                time.sleep(step)
                sink.push([rng.randrange(300, 900) for _ in prompts])
                if sink.done:
                    return

    client = Paced(str(path), device_map=None).load()
    convos = bench.conversations(client, args.rows, 128)
    chat, messages = bench.langchain_inputs(client, convos, args.tokens)
    calls = {
        "create_batch": lambda: client.create_batch(convos, temperature=0, max_tokens=args.tokens),
        "ChatGemmaLocal.batch": lambda: chat.batch(messages),
    }
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(*times.values(), strict=True)]
    for name, values in times.items():
        print(f"{name:22s} median {statistics.median(values):.3f} s")
    print(
        f"ideal {step * args.tokens:.3f} s; create_batch / ChatGemmaLocal.batch: median of pairs "
        f"{statistics.median(ratios):.4f} (min {min(ratios):.4f}, max {max(ratios):.4f})"
    )
    client.close()


if __name__ == "__main__":
    main()
