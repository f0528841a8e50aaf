"""Soak: thousands of mixed requests through one client; memory, threads and errors.

    python benchmarks/soak.py [--requests 10000] [--backend transformers|mlx]
        [--max-tokens 4] [--model PATH] [--max-rss-growth-mb 150] [--time-limit S]

Not part of the test suite (pytest does not collect ``benchmarks/``). One client on
a tiny random-weight Gemma 3 checkpoint (built by :mod:`core.tiny` in a temporary
folder unless ``--model`` names one) serves ``--requests`` requests drawn, with a
fixed seed, from this mix:

- ``create``: a plain ``create()`` (sometimes ``n=2``, a stop string, a seed, a
  logit bias);
- ``stream``: ``create(stream=True)`` read to the end;
- ``cancel``: a stream of up to 64 tokens abandoned after its first chunks
  (``close()`` on the iterator: generation must stop and the thread be freed);
- ``async``: ``acreate()`` on one long-lived event loop, every other one a stream
  read to the end;
- ``async_cancel``: an async stream abandoned after its first chunks (``aclose()``);
- ``tools``: ``tools`` with ``tool_choice`` ``"auto"``, ``"required"`` or a named tool;
- ``json``: ``response_format`` ``json_object`` or a ``json_schema``;
- ``bad``: one of a list of invalid requests, each of which must raise
  ``ValueError`` / ``TypeError``.

Every reply is checked for shape (choices, ``finish_reason``, usage; a stream's
usage chunk last). Prints RSS (``VmRSS`` from ``/proc/self/status``, else
``ru_maxrss``), Python threads (``threading.active_count()``) and OS threads (the
``Threads`` line) after the load, at ten checkpoints and after ``close()``;
requests/s; outcomes by kind and errors by type. RSS growth is measured from the
first checkpoint (10% of the requests: caches, the allocator and the grammar
compiler have warmed up by then) to the end.

Exits 1 if any request raised anything but the expected ``ValueError`` /
``TypeError`` of a bad input (or a bad input was accepted, or a reply was
malformed), if RSS grew by more than ``--max-rss-growth-mb``, or if threads leak:
more Python or OS threads at the end than at the first checkpoint, or more Python
threads after ``close()`` than before the client existed (not counting the
one-per-process threads of :data:`PROCESS_THREADS`). ``--time-limit`` stops
early (reported, not a failure) for slow machines.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import resource
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

USER = [{"role": "user", "content": "Write a short poem about the sea. 🌊"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time."}},
]
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["name"],
        },
    },
}
#: (what is wrong, messages, options): each must raise ValueError or TypeError.
BAD: list[tuple[str, Any, dict[str, Any]]] = [
    ("empty messages", [], {}),
    ("bad role", [{"role": "bot", "content": "x"}], {}),
    ("content int", [{"role": "user", "content": 5}], {}),
    ("image part", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], {}),
    ("bare string part", [{"role": "user", "content": ["hi"]}], {}),
    ("lone surrogate", [{"role": "user", "content": "bad \udc80 x"}], {}),
    ("ends on assistant", [*USER, {"role": "assistant", "content": "x"}], {}),
    ("tool result first", [{"role": "tool", "tool_call_id": "c", "content": "1"}], {}),
    ("temperature", USER, {"temperature": 3.0}),
    ("top_p", USER, {"top_p": 0}),
    ("max_tokens", USER, {"max_tokens": 0}),
    ("n", USER, {"n": 99}),
    ("seed", USER, {"seed": -1}),
    ("stop", USER, {"stop": [""]}),
    ("logit_bias", USER, {"logit_bias": {"1": 500}}),
    ("logit_bias id", USER, {"logit_bias": {10**7: 1.0}}),
    ("unknown option", USER, {"frobnicate": True}),
    ("stream='no'", USER, {"stream": "no"}),
    ("tool name", USER, {"tools": [{"type": "function", "function": {"name": "a b"}}]}),
    ("tool_choice", USER, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}),
    ("tools + json", USER, {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}),
    ("response_format", USER, {"response_format": {"type": "xml"}}),
    ("model", USER, {"model": "someone/else"}),
    ("oversized prompt", [{"role": "user", "content": "word " * 3000}], {}),
]
MIX = [
    ("create", 30),
    ("stream", 15),
    ("cancel", 12),
    ("async", 10),
    ("async_cancel", 5),
    ("tools", 10),
    ("json", 8),
    ("bad", 10),
]


#: Threads that are one per process by design, so they outlive ``close()``: tqdm's
#: monitor (from the weights' loading progress bar; it ends by itself) and the MLX
#: backend's one model thread (:meth:`core.GemmaMLXChatCompletion._new_worker`).
PROCESS_THREADS = frozenset({"tqdm_monitor", "gemma-local:mlx"})


class Malformed(Exception):
    """A reply that is not a well-formed completion or chunk stream."""


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def os_threads() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def check_completion(out: Any, n: int = 1) -> None:
    if not isinstance(out, dict) or out.get("object") != "chat.completion":
        raise Malformed(f"not a chat.completion: {out!r}")
    if len(out["choices"]) != n:
        raise Malformed(f"{len(out['choices'])} choices, expected {n}")
    for choice in out["choices"]:
        if choice["finish_reason"] not in ("stop", "length", "tool_calls"):
            raise Malformed(f"finish_reason {choice['finish_reason']!r}")
    usage = out["usage"]
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        raise Malformed(f"usage does not add up: {usage}")


def check_chunks(chunks: list[dict[str, Any]]) -> None:
    if not chunks or "usage" not in chunks[-1]:
        raise Malformed("the stream did not end with a usage chunk")
    if not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks[:-1]):
        raise Malformed("no choice finished")


class Soak:
    def __init__(self, client: Any, max_tokens: int, seed: int) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.loop = asyncio.new_event_loop()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.bad_kinds: Counter[str] = Counter()
        self.unexpected: list[str] = []

    # ---------------------------------------------------------------- requests

    def create(self) -> None:
        options: dict[str, Any] = {"max_tokens": self.max_tokens}
        pick = self.rng.random()
        if pick < 0.15:
            options["n"] = 2
        elif pick < 0.3:
            options["stop"] = ["\n", "e"]
        elif pick < 0.45:
            options["seed"] = self.rng.randrange(2**31)
        elif pick < 0.6:
            options["logit_bias"] = {str(self.rng.randrange(512)): 5.0}
        elif pick < 0.75:
            options["temperature"] = 0
        check_completion(self.client.create(USER, **options), options.get("n", 1))

    def stream(self) -> None:
        check_chunks(list(self.client.create(USER, max_tokens=self.max_tokens, stream=True)))

    def cancel(self) -> None:
        chunks = self.client.create(USER, max_tokens=64, temperature=1.0, stream=True)
        for _ in range(self.rng.randint(1, 3)):
            if next(chunks, None) is None:
                break
        chunks.close()

    def async_(self) -> None:
        async def run() -> None:
            if self.rng.random() < 0.5:
                check_completion(await self.client.acreate(USER, max_tokens=self.max_tokens))
            else:
                chunks = await self.client.acreate(USER, max_tokens=self.max_tokens, stream=True)
                check_chunks([c async for c in chunks])

        self.loop.run_until_complete(run())

    def async_cancel(self) -> None:
        async def run() -> None:
            chunks = await self.client.acreate(USER, max_tokens=64, temperature=1.0, stream=True)
            try:
                for _ in range(self.rng.randint(1, 3)):
                    await chunks.__anext__()
            except StopAsyncIteration:
                pass
            await chunks.aclose()

        self.loop.run_until_complete(run())

    def tools(self) -> None:
        choice = self.rng.choice(
            ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]
        )
        messages = HISTORY if self.rng.random() < 0.3 else USER
        out = self.client.create(
            messages, max_tokens=self.max_tokens * 4, tools=TOOLS, tool_choice=choice
        )
        check_completion(out)

    def json(self) -> None:
        fmt = SCHEMA if self.rng.random() < 0.5 else {"type": "json_object"}
        check_completion(
            self.client.create(USER, max_tokens=self.max_tokens * 4, response_format=fmt)
        )

    def bad(self) -> None:
        name, messages, options = self.rng.choice(BAD)
        options = {"max_tokens": self.max_tokens, **options}
        try:
            out = self.client.create(messages, **options)
            if options.get("stream") is True:
                list(out)
        except (ValueError, TypeError) as exc:
            self.bad_kinds[f"{name}: {type(exc).__name__}"] += 1
            raise
        raise Malformed(f"bad input {name!r} was accepted")

    # ------------------------------------------------------------------- loop

    def one(self, kind: str) -> None:
        run: Callable[[], None] = getattr(self, "async_" if kind == "async" else kind)
        try:
            run()
        except (ValueError, TypeError) as exc:
            if kind != "bad":
                self.fail(kind, exc)
                return
            self.outcomes[(kind, type(exc).__name__)] += 1
        except Exception as exc:  # the soak's point: count every other failure
            self.fail(kind, exc)
        else:
            self.outcomes[(kind, "ok")] += 1

    def fail(self, kind: str, exc: BaseException) -> None:
        self.outcomes[(kind, f"UNEXPECTED {type(exc).__name__}")] += 1
        if len(self.unexpected) < 5:
            self.unexpected.append(f"{kind}: {''.join(traceback.format_exception(exc))}")


def build_model(root: Path) -> Path:
    from core.tiny import build_tiny_checkpoint

    path = root / "gemma3_text-float32"
    build_tiny_checkpoint(path, "gemma3_text", dtype="float32")
    return path


def make_client(backend: str, path: Path) -> Any:
    if backend == "transformers":
        from core import GemmaTransformersChatCompletion

        return GemmaTransformersChatCompletion(str(path), device_map="cpu", torch_dtype="float32")
    from core import GemmaMLXChatCompletion

    return GemmaMLXChatCompletion(str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--backend", choices=("transformers", "mlx"), default="transformers")
    parser.add_argument("--max-tokens", type=int, default=4, help="per reply (cancelled: 64)")
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: a tiny one)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=150.0)
    parser.add_argument("--time-limit", type=float, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    args = parser.parse_args()
    # Cut-off constrained replies (most of them, at a few tokens) each log a warning.
    logging.getLogger("gemma_local").setLevel(logging.ERROR)

    threads_before = threading.active_count()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_model(Path(tmp))
        client = make_client(args.backend, path)
        started = time.perf_counter()
        client.load()
        print(f"{args.backend}: {path} loaded in {time.perf_counter() - started:.1f}s")
        soak = Soak(client, args.max_tokens, args.seed)
        kinds = [k for k, _ in MIX]
        weights = [w for _, w in MIX]
        rows: list[tuple[str, int, float, float, int, int]] = []

        def checkpoint(label: str, done: int, elapsed: float) -> None:
            rows.append((label, done, elapsed, rss_mb(), threading.active_count(), os_threads()))
            label_, done_, el, rss, py, osn = rows[-1]
            rate = done_ / el if el else 0.0
            print(
                f"{label_:>10} {done_:>7} reqs {el:8.1f}s {rate:7.1f} req/s "
                f"RSS {rss:8.1f} MB  threads py {py:3d} os {osn:3d}",
                flush=True,
            )

        checkpoint("loaded", 0, 0.0)
        every = max(1, args.requests // 10)
        started = time.perf_counter()
        done = 0
        for done in range(1, args.requests + 1):
            soak.one(soak.rng.choices(kinds, weights)[0])
            elapsed = time.perf_counter() - started
            if done % every == 0 or done == args.requests:
                checkpoint(f"{100 * done // args.requests}%", done, elapsed)
            if args.time_limit is not None and elapsed > args.time_limit:
                checkpoint("time limit", done, elapsed)
                break
        elapsed = time.perf_counter() - started
        soak.loop.close()
        client.close()
        checkpoint("closed", done, elapsed)
        names_after_close = sorted(t.name for t in threading.enumerate())
        threads_after_close = len([n for n in names_after_close if n not in PROCESS_THREADS])

    print(f"\n{done} requests in {elapsed:.1f}s: {done / elapsed:.1f} req/s")
    print("outcomes:")
    for (kind, outcome), count in sorted(soak.outcomes.items()):
        print(f"  {kind:>13} {outcome:<28} {count:6d}")
    print("bad inputs (name: error):")
    for name, count in sorted(soak.bad_kinds.items()):
        print(f"  {name:<40} {count:5d}")

    failures = []
    if soak.unexpected:
        failures.append(f"{sum(c for (_, o), c in soak.outcomes.items() if o.startswith('UNEX'))} "
                        "unexpected failures")
        for text in soak.unexpected:
            print("\n" + text)
    warm = rows[1] if len(rows) > 3 else rows[0]
    last = rows[-2]  # the last checkpoint before close()
    growth = last[3] - warm[3]
    print(f"RSS {warm[3]:.1f} MB at {warm[0]} -> {last[3]:.1f} MB at {last[0]}: {growth:+.1f} MB "
          f"(bound {args.max_rss_growth_mb:.0f} MB)")
    if growth > args.max_rss_growth_mb:
        failures.append(f"RSS grew {growth:.1f} MB")
    if last[4] > warm[4] or last[5] > warm[5]:
        failures.append(f"threads grew: py {warm[4]} -> {last[4]}, os {warm[5]} -> {last[5]}")
    print(f"Python threads after close(): {names_after_close}")
    if threads_after_close > threads_before:
        failures.append(f"{threads_after_close - threads_before} Python threads outlived close()")
    if done < args.requests:
        print(f"stopped by --time-limit after {done} of {args.requests} requests")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
