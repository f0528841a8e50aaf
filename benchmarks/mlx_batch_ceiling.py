"""How far raw mlx-lm batching scales on this machine (the ceiling for create_batch on MLX).

    python benchmarks/mlx_batch_ceiling.py

8 prompts of 128 tokens, 128 new tokens each, on the CPU benchmark's small
Gemma 3: 8 sequential ``generate_step`` loops vs one ``mlx_lm.batch_generate``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench import cpu_checkpoint


def main() -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import batch_generate, generate_step

    model, tokenizer = load(str(cpu_checkpoint(Path("/tmp/gemma-local-bench"))))
    prompts = [[2] + [100 + (i * 7 + j) % 300 for j in range(127)] for i in range(8)]
    for _ in range(2):
        started = time.perf_counter()
        tokens = sum(1 for p in prompts for _ in generate_step(mx.array(p), model, max_tokens=128))
        sequential = tokens / (time.perf_counter() - started)
        started = time.perf_counter()
        result = batch_generate(model, tokenizer, prompts, max_tokens=128, return_token_ids=True)
        batched = sum(len(t) for t in result.token_ids) / (time.perf_counter() - started)
        print(
            f"sequential {sequential:.1f} tok/s, batch_generate {batched:.1f} tok/s, "
            f"{batched / sequential:.2f}x"
        )


if __name__ == "__main__":
    main()
