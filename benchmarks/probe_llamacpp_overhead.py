"""What gemma-local's llama.cpp backend adds per token, next to llama-cpp-python's own loop.

::

    python benchmarks/probe_llamacpp_overhead.py [--rounds 5] [--new-tokens 128]

Both run the same library (llama-cpp-python's ``libllama``) on the real Gemma 3
270M Q4_K_M GGUF, one thread, the bench prompt (``bench_cpu_peer.PROMPT``),
greedy, end ids biased away, alternating. Each ``llama_decode`` call is timed;
per generated token (after the first) the probe prints the time inside
``llama_decode`` and the time outside it: sampling, detokenising, the token
stream and the thread hop to the reader for gemma-local (``create(stream=True)``),
llama-cpp-python's Python sampling loop for ``Llama.generate``. Load on a shared
machine moves the decode time; the time outside it is what the binding adds.
Needs llama-cpp-python (built from source); not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_cpu_peer import END_IDS, PROMPT, real_model


class TimedApi:
    """A llama.cpp API whose ``llama_decode`` adds its time to ``spent``."""

    def __init__(self, api: Any, spent: list[float]) -> None:
        self.api, self.spent = api, spent

    def __getattr__(self, name: str) -> Any:
        function = getattr(self.api, name)
        if name != "llama_decode":
            return function

        def decode(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args)
            finally:
                self.spent[0] += time.perf_counter() - started

        return decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    from core import GemmaLlamaCppChatCompletion

    gguf, _ = real_model()
    n = args.new_tokens
    spent = [0.0]
    ours = GemmaLlamaCppChatCompletion(
        str(gguf), library="llama-cpp-python", n_threads=1, n_ctx=256
    ).load()
    ours.model.api = TimedApi(ours.model.api, spent)
    ids = list(ours.format_prompt(PROMPT).ids)
    peer = llama_cpp.Llama(
        str(gguf), n_ctx=256, n_batch=len(ids), n_threads=1, n_threads_batch=1, verbose=False
    )
    original = bindings.llama_decode

    def timed_decode(*a: Any) -> Any:  # llama-cpp-python looks it up on each call
        started = time.perf_counter()
        try:
            return original(*a)
        finally:
            spent[0] += time.perf_counter() - started

    bindings.llama_decode = timed_decode
    options = {"temperature": 0, "max_tokens": n, "logit_bias": {t: -100 for t in END_IDS}}

    def run_ours() -> tuple[float, float]:
        first = 0.0
        for chunk in ours.create(PROMPT, stream=True, **options):
            if not first and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first, spent[0] = time.perf_counter(), 0.0
        total = time.perf_counter() - first
        return (total - spent[0]) / (n - 1), spent[0] / (n - 1)

    def run_peer() -> tuple[float, float]:
        first = 0.0
        for count, _ in enumerate(peer.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if count == 1:
                first, spent[0] = time.perf_counter(), 0.0
            if count == n:
                break
        total = time.perf_counter() - first
        return (total - spent[0]) / (n - 1), spent[0] / (n - 1)

    rows: dict[str, list[tuple[float, float]]] = {
        "gemma-local llamacpp": [],
        "llama-cpp-python": [],
    }
    for _ in range(args.rounds):
        rows["gemma-local llamacpp"].append(run_ours())
        rows["llama-cpp-python"].append(run_peer())
    bindings.llama_decode = original
    print(f"llama-cpp-python {llama_cpp.__version__}, {n} tokens, {args.rounds} alternating rounds")
    for name, runs in rows.items():
        outside = [r[0] * 1e6 for r in runs]
        inside = [r[1] * 1e3 for r in runs]
        print(
            f"{name}: outside llama_decode {statistics.median(outside):.0f} us/token "
            f"{[round(x) for x in outside]}; in llama_decode {statistics.median(inside):.2f} "
            f"ms/token {[round(x, 1) for x in inside]}"
        )
    ours.close()
    peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
