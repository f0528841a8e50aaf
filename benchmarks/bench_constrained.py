"""Constrained decoding: grammar engines on a Gemma-sized vocabulary, and what it costs create().

Two parts (results and the reasoning behind the engine choice: CONSTRAINED.md):

1. ``engines``: the candidate grammar engines (llguidance, xgrammar,
   outlines-core) on a 262,144-token Gemma-layout tokenizer
   (``core.tiny.build_tokenizer``) and a nested JSON schema: tokenizer set-up
   time, schema compile time and the per-token cost of computing the
   next-token bitmask and accepting the sampled token, stepped along the
   tokens of a valid document; then llguidance on the grammars
   ``core.constrained`` builds, and the cost of applying a mask to a row of
   Gemma 3 12B's 262,208 logits (torch and MLX). An engine that is not installed is skipped
   and reported so (install the optional ones beside the venv, e.g.
   ``pip install --no-deps --target /tmp/bench_site xgrammar apache-tvm-ffi
   outlines-core`` and ``PYTHONPATH=/tmp/bench_site``: xgrammar's wheel
   requires torch, this keeps the project's torch pin untouched).
2. ``e2e``: the per-token decode cost of ``create()`` on tiny random-weight
   Gemma 3 checkpoints (vocabularies of 512 and 262,144), both backends,
   ``response_format`` (JSON schema) and ``tools`` (``tool_choice="required"``),
   each against an unconstrained request that reads the same prompt (the
   tool definitions / schema as a system message). Every run gets the same ``logit_bias``
   (end ids and every token containing a double quote pushed to -100), so
   each reply runs to ``max_tokens`` inside a free JSON string (in the
   ``tools_auto_prose`` mode ``{`` too, so the reply is prose), and the
   per-token cost is ``(t(N2) - t(N1)) / (N2 - N1)`` (prefill cancels out),
   the median of ``--repeat`` runs.

Usage::

    python benchmarks/bench_constrained.py            # both parts
    python benchmarks/bench_constrained.py engines    # or: e2e
    python benchmarks/bench_constrained.py --cache /tmp/gemma-local-bench --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VOCAB = 262_144
END_OF_TURN, EOS = 106, 1

#: A nested schema of the kind structured output and tool arguments use.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "roles", "address", "scores", "active"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace, Countess of Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "roles": ["admin", "dev"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10115"},
    "scores": [1.5, 98.25, -3.0, 42.0],
    "active": True,
}
LAYOUT: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def stats_us(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean_us": 1e6 * statistics.fmean(ordered),
        "p50_us": 1e6 * ordered[len(ordered) // 2],
        "p99_us": 1e6 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max_us": 1e6 * ordered[-1],
    }


def tokenizer_262k(cache: Path) -> Any:
    from transformers import AutoTokenizer

    from core.tiny import build_tokenizer

    path = cache / "tokenizer-262k"
    if not (path / "tokenizer.json").exists():
        build_tokenizer(path, vocab_size=VOCAB)
    return AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------- engines


def step_along(ids: list[int], mask: Callable[[], None], accept: Callable[[int], bool]) -> dict:
    mask_times, accept_times = [], []
    for token in ids:
        t0 = time.perf_counter()
        mask()
        t1 = time.perf_counter()
        ok = accept(token)
        t2 = time.perf_counter()
        if not ok:
            raise AssertionError(f"the engine rejected token {token} of a valid document")
        mask_times.append(t1 - t0)
        accept_times.append(t2 - t1)
    return {"tokens": len(ids), "mask": stats_us(mask_times), "accept": stats_us(accept_times)}


def bench_llguidance(tok: Any, ids: list[int]) -> dict:
    import llguidance
    from llguidance.hf import from_tokenizer
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    t0 = time.perf_counter()
    lltok = from_tokenizer(tok, n_vocab=len(tok), eos_token=[END_OF_TURN, EOS])
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=LAYOUT)
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    assert not matcher.is_error(), matcher.get_error()
    bitmask = allocate_token_bitmask(1, lltok.vocab_size)
    out = step_along(ids, lambda: fill_next_token_bitmask(matcher, bitmask), matcher.consume_token)
    fill_next_token_bitmask(matcher, bitmask)
    assert matcher.consume_token(END_OF_TURN) and matcher.is_stopped()
    return {"version": llguidance.__version__, "setup_s": setup, "compile_s": compile_s, **out}


def bench_xgrammar(tok: Any, ids: list[int]) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(
        tok, vocab_size=len(tok), stop_token_ids=[END_OF_TURN, EOS]
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
    )
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    out = step_along(ids, lambda: matcher.fill_next_token_bitmask(bitmask), matcher.accept_token)
    assert matcher.accept_token(END_OF_TURN) and matcher.is_terminated()
    return {"version": version("xgrammar"), "setup_s": setup, "compile_s": compile_s, **out}


def outlines_vocabulary(tok: Any) -> Any:
    """outlines-core's ``Vocabulary`` from a SentencePiece-layout (Gemma) tokenizer."""
    import outlines_core

    special = set(tok.all_special_ids)
    byte = re.compile(r"^<0x([0-9A-F]{2})>$")
    pieces: dict[bytes, list[int]] = {}
    for piece, token_id in tok.get_vocab().items():
        if token_id in special:
            continue
        match = byte.match(piece)
        key = bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()
        pieces.setdefault(key, []).append(token_id)
    return outlines_core.Vocabulary(END_OF_TURN, pieces)


def bench_outlines_core(tok: Any, ids: list[int]) -> dict:
    import numpy as np
    import outlines_core

    t0 = time.perf_counter()
    vocabulary = outlines_vocabulary(tok)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA), " ?")
    index = outlines_core.Index(regex, vocabulary)
    guide = outlines_core.Guide(index)
    compile_s = time.perf_counter() - t0
    bitmask = np.zeros((1, (len(tok) + 31) // 32), dtype=np.int32)

    def mask() -> None:
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def accept(token: int) -> bool:
        guide.advance(token)
        return True

    out = step_along(ids, mask, accept)
    assert guide.is_finished()
    return {
        "version": version("outlines_core"),
        "setup_s": setup,
        "compile_s": compile_s,
        **out,
    }


def bench_our_grammars(tok: Any) -> dict:
    """llguidance on the grammars ``core.constrained`` builds, one reply each (ids + end)."""
    from core import SamplingParams
    from core.constrained import (
        GrammarMatchers,
        format_call,
        grammar_for,
        grammar_tokenizer,
    )

    lltok = grammar_tokenizer(tok, [END_OF_TURN, EOS])
    tool = {"type": "function", "function": {"name": "save_person", "parameters": SCHEMA}}
    prose = (
        "The sea is calm tonight. The tide is full, the moon lies fair upon the straits; "
        "on the French coast the light gleams and is gone; the cliffs of England stand, "
        "glimmering and vast, out in the tranquil bay."
    )
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "response_format json_schema": (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": SCHEMA},
                }
            },
            json.dumps(DOCUMENT, ensure_ascii=False),
        ),
        "tools auto, prose reply": ({"tools": [tool]}, prose),
        "tools auto, call reply": ({"tools": [tool]}, format_call("save_person", DOCUMENT)),
        "tools required, 2 parallel calls": (
            {"tools": [tool], "tool_choice": "required"},
            format_call("save_person", DOCUMENT) + "\n" + format_call("save_person", DOCUMENT),
        ),
    }
    out = {}
    for name, (options, text) in cases.items():
        grammar = grammar_for(SamplingParams.build(**options))
        assert grammar is not None
        t0 = time.perf_counter()
        matchers = GrammarMatchers(lltok, grammar, 1)
        compile_s = time.perf_counter() - t0
        ids = [*tok.encode(text, add_special_tokens=False), END_OF_TURN]

        def mask(matchers: GrammarMatchers = matchers) -> None:
            matchers.fill_row(0)

        def accept(token: int, matchers: GrammarMatchers = matchers) -> bool:
            matchers.advance(0, token)
            return True

        result = step_along(ids, mask, accept)
        assert matchers.matchers[0].is_stopped()
        out[name] = {"compile_s": compile_s, **result}
    return out


def bench_bridges(width: int = 262_208, repeat: int = 300) -> dict:
    """Applying a 262,144-token bitmask to a row of ``width`` logits (Gemma 3 12B's), per backend."""
    import numpy as np

    from core.constrained import TorchGrammarMask, mlx_grammar_processor

    rng = np.random.default_rng(0)
    bitmask = rng.integers(-(2**31), 2**31 - 1, size=(1, VOCAB // 32), dtype=np.int32)

    class Fixed:  # the matchers' side, with a fixed mask
        retired = (False,)

        def fill(self) -> Any:
            return bitmask

        def fill_row(self, row: int) -> Any:
            return bitmask

        def advance(self, row: int, token: int) -> None:
            pass

    def timed(step: Callable[[], Any]) -> dict[str, float]:
        step()
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
        return stats_us(samples)

    out: dict[str, Any] = {}
    import torch

    scores = torch.randn(1, width)
    torch_mask = TorchGrammarMask(Fixed())  # type: ignore[arg-type]
    out["torch (cpu, float32)"] = timed(lambda: torch_mask(None, scores))
    try:
        import mlx.core as mx
    except ImportError as exc:
        out["mlx"] = {"skipped": f"not installed ({exc})"}
        return out
    logits = mx.random.normal((1, width)).astype(mx.bfloat16)
    tokens = mx.array([1, 2])
    process = mlx_grammar_processor(Fixed(), 0)  # type: ignore[arg-type]
    out[f"mlx ({mx.default_device()}, bfloat16)"] = timed(lambda: mx.eval(process(tokens, logits)))
    return out


ENGINES = {
    "llguidance": bench_llguidance,
    "xgrammar": bench_xgrammar,
    "outlines-core": bench_outlines_core,
}


def run_engines(cache: Path) -> dict:
    tok = tokenizer_262k(cache)
    text = json.dumps(DOCUMENT, ensure_ascii=False)
    ids = tok.encode(text, add_special_tokens=False)
    results: dict[str, Any] = {"vocab": len(tok), "document_tokens": len(ids)}
    for name, bench in ENGINES.items():
        try:
            results[name] = bench(tok, ids)
        except ImportError as exc:
            results[name] = {"skipped": f"not installed ({exc})"}
        print(f"  {name}: {json.dumps(results[name])}", flush=True)
    results["bridges"] = bench_bridges()
    for name, result in results["bridges"].items():
        print(f"  applying the mask, {name}: {json.dumps(result)}", flush=True)
    results["ours"] = bench_our_grammars(tok)
    for name, result in results["ours"].items():
        print(f"  llguidance, our grammar, {name}: {json.dumps(result)}", flush=True)
    return results


# ------------------------------------------------------------------------- e2e


def ids_with(tok: Any, chars: str) -> list[int]:
    """Every token id whose text contains one of ``chars``."""
    return [i for i in range(len(tok)) if any(c in tok.decode([i]) for c in chars)]


def e2e_modes() -> dict[str, dict[str, Any]]:
    free = {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
        "additionalProperties": False,
    }
    note = {"type": "function", "function": {"name": "note", "parameters": free}}
    return {
        "json_schema": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": free}}
        },
        "tools": {"tools": [note], "tool_choice": "required"},
        # "{" is pushed down too (below): the reply is prose, freed after its first token.
        "tools_auto_prose": {"tools": [note]},
    }


def timed_create(client: Any, messages: Any, max_tokens: int, request: dict[str, Any]) -> float:
    """Seconds for one ``create()`` that must run to ``max_tokens``."""
    t0 = time.perf_counter()
    out = client.create(messages, max_tokens=max_tokens, **request)
    elapsed = time.perf_counter() - t0
    used = out["usage"]["completion_tokens"]
    assert used == max_tokens, f"stopped after {used} of {max_tokens} tokens"
    return elapsed


def per_token_ms(
    client: Any, messages: Any, request: dict[str, Any], n1: int, n2: int, repeat: int
) -> float:
    runs = []
    for _ in range(repeat):
        short = timed_create(client, messages, n1, request)
        long = timed_create(client, messages, n2, request)
        runs.append((long - short) / (n2 - n1))
    return 1e3 * statistics.median(runs)


def run_e2e(cache: Path, repeat: int, n1: int, n2: int, backends: list[str], device: str) -> dict:
    """Constrained vs unconstrained on the *same* prompt.

    The constrained request's prompt carries the tool definitions or the
    schema; the baseline is an unconstrained request whose system message is
    that same text, so both read identical token ids and only the grammar
    differs.
    """
    from core import GemmaMLXChatCompletion, GemmaTransformersChatCompletion, SamplingParams
    from core.constrained import system_instructions
    from core.tiny import build_tiny_checkpoint

    messages = [{"role": "user", "content": "Write a note about the sea."}]
    results: dict[str, Any] = {}
    for vocab in (512, VOCAB):
        path = cache / f"gemma3_text-v{vocab}"
        if not (path / "config.json").exists():
            build_tiny_checkpoint(path, "gemma3_text", vocab_size=vocab)
        for backend in backends:
            if backend == "transformers":
                dtype = "float32" if device == "cpu" else "bfloat16"
                client: Any = GemmaTransformersChatCompletion(
                    str(path), device_map=device, torch_dtype=dtype
                )
            else:
                client = GemmaMLXChatCompletion(str(path))
            client.load()
            row: dict[str, Any] = {}
            for mode, options in e2e_modes().items():
                chars = '"{' if mode == "tools_auto_prose" else '"'
                bias = dict.fromkeys([END_OF_TURN, EOS, *ids_with(client.tokenizer, chars)], -100.0)
                sampling = {"temperature": 1.0, "seed": 0, "logit_bias": bias}
                system = system_instructions(SamplingParams.build(**options))
                baseline = [{"role": "system", "content": system}, *messages]
                same = (
                    client.format_prompt(baseline).ids
                    == client.format_prompt(messages, **options).ids
                )
                assert same, "the baseline must read the same prompt"
                # The first constrained request builds llguidance's tokenizer.
                first = timed_create(client, messages, n1, {**sampling, **options})
                plain = per_token_ms(client, baseline, sampling, n1, n2, repeat)
                constrained = per_token_ms(
                    client, messages, {**sampling, **options}, n1, n2, repeat
                )
                row[mode] = {
                    "prompt_tokens": len(client.format_prompt(baseline).ids),
                    "first_request_s": first,
                    "unconstrained_ms_per_token": plain,
                    "constrained_ms_per_token": constrained,
                    "overhead_us_per_token": 1e3 * (constrained - plain),
                    "overhead_percent": 100 * (constrained - plain) / plain,
                }
            name = "cpu" if backend == "mlx" else device
            results[f"{backend}/{name}/vocab{vocab}"] = row
            print(f"  {backend} vocab {vocab}: {json.dumps(row)}", flush=True)
            client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", help="engines and/or e2e (default: both)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/gemma-local-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n1", type=int, default=16)
    parser.add_argument("--n2", type=int, default=144)
    parser.add_argument("--backends", default="transformers,mlx", help="e2e: comma-separated")
    parser.add_argument("--device", default="cpu", help="e2e: transformers device_map (cpu, cuda)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.parts = args.parts or ["engines", "e2e"]
    if set(args.parts) - {"engines", "e2e"}:
        parser.error(f"parts are 'engines' and 'e2e', got {args.parts}")
    args.cache.mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {gpu}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "python": sys.version.split()[0],
    }
    print(report["machine"], flush=True)
    if "engines" in args.parts:
        print("engines (262k-token Gemma-layout tokenizer, nested JSON schema):", flush=True)
        report["engines"] = run_engines(args.cache)
    if "e2e" in args.parts:
        print(f"create() per-token cost (tiny Gemma 3, N={args.n1}->{args.n2}):", flush=True)
        backends = [b for b in args.backends.split(",") if b]
        report["e2e"] = run_e2e(args.cache, args.repeat, args.n1, args.n2, backends, args.device)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
