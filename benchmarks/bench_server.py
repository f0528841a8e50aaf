"""What ``gemma-local serve`` adds on top of ``create()``, on the tiny Gemma 3 (CPU).

    python benchmarks/bench_server.py [--requests 50] [--max-tokens 8]

For each OpenMP wait policy (torch's default, and PASSIVE as ``gemma-local
serve`` sets it), a fresh process (the policy is read when torch loads) builds
the tiny random-weight checkpoint once, loads it with the transformers
backend and measures, greedy with a fixed number of tokens:

* direct ``create()``, one after another (ms per request);
* the same through the server with the ``openai`` client: JSON and streamed;
* the same requests made all at once (``AsyncOpenAI`` + ``asyncio.gather``),
  against the sum of the direct calls: the model runs requests one at a time,
  so the two should match; a much larger total means the event loop starved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def measure(model: str, requests: int, max_tokens: int) -> dict[str, float]:
    import openai

    from core import GemmaTransformersChatCompletion
    from core.server import BackgroundServer

    options = {"temperature": 0, "max_tokens": max_tokens, "logit_bias": {1: -100, 106: -100}}
    wire = {**options, "logit_bias": {"1": -100, "106": -100}}
    with GemmaTransformersChatCompletion(model, device_map="cpu", torch_dtype="float32") as client:
        client.load()
        for _ in range(3):
            client.create(USER, **options)
        started = time.perf_counter()
        for _ in range(requests):
            client.create(USER, **options)
        direct = time.perf_counter() - started
        with (
            BackgroundServer(client, served_names=["tiny"]) as server,
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="x") as oai,
        ):
            for _ in range(3):
                oai.chat.completions.create(model="tiny", messages=USER, **wire)
            started = time.perf_counter()
            for _ in range(requests):
                oai.chat.completions.create(model="tiny", messages=USER, **wire)
            http = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(requests):
                stream = oai.chat.completions.create(
                    model="tiny", messages=USER, stream=True, **wire
                )
                for _chunk in stream:
                    pass
            streamed = time.perf_counter() - started

            async def together() -> float:
                async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x") as aoai:
                    began = time.perf_counter()
                    await asyncio.gather(
                        *(
                            aoai.chat.completions.create(model="tiny", messages=USER, **wire)
                            for _ in range(requests)
                        )
                    )
                    return time.perf_counter() - began

            concurrent = asyncio.run(together())
    return {
        "direct_ms": direct / requests * 1000,
        "http_json_ms": http / requests * 1000,
        "http_stream_ms": streamed / requests * 1000,
        "direct_total_s": direct,
        "concurrent_total_s": concurrent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.requests, args.max_tokens)))
        return
    from core.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny-gemma3"
        build_tiny_checkpoint(model, "gemma3_text", dtype="float32")
        print(
            f"{args.requests} requests of {args.max_tokens} tokens, tiny Gemma 3, transformers CPU"
        )
        print(
            "| OMP_WAIT_POLICY | direct create | HTTP JSON | HTTP stream | "
            f"{args.requests} at once over HTTP | sum of direct |"
        )
        print("|---|---|---|---|---|---|")
        for policy in (None, "PASSIVE"):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
            env.pop("OMP_WAIT_POLICY", None)
            if policy is not None:
                env["OMP_WAIT_POLICY"] = policy
            argv = [sys.executable, __file__, "--child", str(model)]
            argv += ["--requests", str(args.requests), "--max-tokens", str(args.max_tokens)]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {policy or '(torch default)'} | {r['direct_ms']:.1f} ms | "
                f"{r['http_json_ms']:.1f} ms | {r['http_stream_ms']:.1f} ms | "
                f"{r['concurrent_total_s']:.2f} s | {r['direct_total_s']:.2f} s |"
            )


if __name__ == "__main__":
    main()
