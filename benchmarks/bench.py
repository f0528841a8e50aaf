"""Decode speed: gemma-local against the raw backends, side by side in one process.

GPU (random weights of the real Gemma 3 and Gemma 4 shapes, built on the
device; nothing is downloaded)::

    python benchmarks/bench.py gpu --shapes 1b,12b [--nf4] [--check]
    python benchmarks/bench.py gpu --shapes 31b --batches 1 --skip-static --cold-start

shapes (:data:`SHAPES`): Gemma 3 ``1b`` and ``12b``; Gemma 4 ``31b`` (dense,
K=V global attention), ``26b-a4b`` (128 experts, top 8, beside a dense MLP) and
``e4b`` (per-layer embeddings, the last 18 layers KV-shared), text only, loaded
as ``Gemma4ForConditionalGeneration`` like the real checkpoints; ``tiny`` and
``tiny4`` (a Gemma 4 with MoE, per-layer embeddings and KV sharing) for
``--dry-run``, which runs the same code on the CPU in seconds. The "limit" of a
shape is the copy bandwidth over the weight bytes one bs1 step reads
(:func:`read_bytes`: a MoE layer's routed experts only, one row of the per-layer
embeddings).

rows per shape, at batch size 1 and 16: ours (``client.create`` /
``client.create_batch``: the fast path), raw ``model.generate`` (dynamic
cache) and raw ``generate(cache_implementation="static")`` (transformers
compiles the forward itself), plus 16 (or ``--seq-calls``) sequential
``create`` calls; with ``--nf4`` the 12b shape again in bitsandbytes NF4;
with ``--check`` a float32 greedy-equality check of the fast path against
``model.generate`` (left-padded batch, sliding window shorter than the text);
with ``--cold-start``, before anything else runs on a shape, the very first
``create()`` of a fresh client (compilation and graph capture included): its
time to first token and total time against raw ``generate``'s first call
(``x raw first call``).

CPU (a small Gemma 3: hidden 512, 4 layers, about 16M parameters)::

    python benchmarks/bench.py cpu

rows: ours vs raw ``model.generate`` (transformers), ours vs raw
``mlx_lm.stream_generate`` (MLX), batch of 8 vs 8 sequential calls (MLX: also
raw ``mlx_lm.batch_generate`` and ours kept on one stream, ``cpu_streams=1``,
on the same bf16 model in the same interleaved runs), and the
LangChain layer (``ChatGemmaLocal`` vs ``ChatHuggingFace`` over a
``HuggingFacePipeline`` on the same model).

Every run prints a table (tok/s, time to first token, peak memory, ratios) and
writes ``<out>/results-<device>.md`` and ``.json``; ``--update`` puts the table
into ``benchmarks/RESULTS.md`` between its markers. Greedy decoding
throughout; the end-of-turn / end-of-text rows of the random embeddings are
zeroed (Gemma 4: ``<|tool_response>`` too) so that every run generates exactly
``--new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import string
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The steady state: a request whose bucket is not compiled yet compiles it in the request
# (not in the background on the plain path); the cold-start row sets it to 0 for its request.
os.environ.setdefault("GEMMA_LOCAL_COMPILE_WAIT", "1")

#: Gemma 3's end ids (``<eos>``, ``<end_of_turn>``); Gemma 4's add ``<|tool_response>``
#: (:data:`EOS4`). Their rows of the random embeddings are zeroed (see :func:`gpu_model`).
EOS = (1, 106)
EOS4 = (1, 106, 50)

#: The real shapes: config.json of google/gemma-3-1b-it, the text tower of gemma-3-12b-it,
#: and the text towers of gemma-4-31B-it, gemma-4-26B-A4B-it and gemma-4-E4B-it (loaded,
#: like the real Gemma 4 checkpoints, as ``Gemma4ForConditionalGeneration``, here without
#: the vision / audio towers). Every Gemma 4 shape has 5 sliding layers to 1 full, RoPE
#: theta 1e4 on sliding layers and proportional RoPE (a quarter of the dims, theta 1e6) on
#: full ones, final logit soft-capping 30 (see :func:`gemma4_text_config`).
SHAPES: dict[str, dict[str, Any]] = {
    # --dry-run only: the same code path on the CPU in seconds.
    "tiny": dict(
        arch="gemma3",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=32,
    ),
    "1b": dict(
        arch="gemma3_text",
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
    ),
    "12b": dict(
        arch="gemma3",
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        sliding_window=1024,
    ),
    # --dry-run only: a Gemma 4 with every part of the real ones at once (K=V global
    # attention with fewer, wider global heads; MoE beside the dense MLP; per-layer
    # embeddings; the last 2 layers KV-shared), 6 layers (sliding, sliding, full) x 2.
    "tiny4": dict(
        arch="gemma4",
        pattern=3,
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=32,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=1024,
        num_kv_shared_layers=2,
    ),
    "31b": dict(
        arch="gemma4",
        vocab_size=262144,
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=60,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        sliding_window=1024,
        hidden_size_per_layer_input=0,
    ),
    "26b-a4b": dict(
        arch="gemma4",
        vocab_size=262144,
        hidden_size=2816,
        intermediate_size=2112,  # the dense MLP beside the experts
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        sliding_window=1024,
        enable_moe_block=True,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
        hidden_size_per_layer_input=0,
    ),
    "e4b": dict(
        arch="gemma4",
        vocab_size=262144,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        sliding_window=512,
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262144,
        num_kv_shared_layers=18,
    ),
}
#: The shapes ``--dry-run`` may build (small enough for the CPU).
DRY_RUN_SHAPES = ("tiny", "tiny4")


def is_gemma4_shape(shape: str) -> bool:
    return str(SHAPES[shape]["arch"]).startswith("gemma4")


def shape_end_ids(shape: str) -> tuple[int, ...]:
    return EOS4 if is_gemma4_shape(shape) else EOS


@dataclass
class Row:
    section: str
    name: str
    batch: int
    tok_s: float | None = None
    ttft_ms: float | None = None
    peak_gb: float | None = None
    first_call_s: float | None = None
    tokens: int | None = None
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)


def log(*parts: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------- the client


def bench_client(model: Any, tokenizer: Any, name: str, *, record: bool = False) -> Any:
    """The real transformers client over an in-memory model (no from_pretrained).

    ``_generate`` starts with the fast-path hook (what core's backend does);
    ``record`` keeps the token ids each row accepted, for equality checks.
    """
    from core import GemmaTransformersChatCompletion
    from core.accel.cuda import fast_path

    class BenchClient(GemmaTransformersChatCompletion):
        last_tokens: list[list[int]]

        def _load_model_and_tokenizer(self) -> None:
            self.model, self.tokenizer = model, tokenizer
            text = model.config.get_text_config()
            self._context_window = getattr(text, "max_position_embeddings", None)

        def _recording_generate(self, prompts: Any, params: Any, sink: Any) -> None:
            if record:
                self.last_tokens = tokens = [[] for _ in prompts]
                push = sink.push

                def recording_push(step: Any) -> None:
                    for i, (row, t) in enumerate(zip(sink.rows, step, strict=True)):
                        if row.finish_reason is None:
                            tokens[i].append(int(t))
                    push(step)

                sink.push = recording_push
            pad = self.tokenizer.pad_token_id
            pad = 0 if pad is None else int(pad)
            if fast_path.supported(self.model, params) and (params.greedy or params.seed is None):
                grammar = self._grammar_matchers(params, len(prompts))
                if fast_path.generate(
                    self.model, prompts, params, sink, pad_id=pad, grammar=grammar
                ):
                    return None
            return super()._generate(prompts, params, sink)

    if record:  # a _generate of its own: requests run whole (no continuous batch)
        BenchClient._generate = BenchClient._recording_generate  # type: ignore[method-assign]
    return BenchClient(name, device_map=None).load()


def conversations(client: Any, count: int, prompt_tokens: int, seed: int = 0) -> list[Any]:
    """``count`` different one-turn conversations whose rendered prompt is ``prompt_tokens`` long."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    out = []
    for _ in range(count):
        text = ""
        for _ in range(prompt_tokens * 8):
            convo = [{"role": "user", "content": text or "a"}]
            n = len(client.format_prompt(convo).ids)
            if n == prompt_tokens:
                break
            if n > prompt_tokens:
                text = text[:-2]
            text += rng.choice(letters) if rng.random() < 0.8 else " "
        else:
            raise RuntimeError(f"could not build a {prompt_tokens}-token prompt")
        out.append(convo)
    return out


def prompt_ids(client: Any, convos: list[Any]) -> list[list[int]]:
    return [list(client.format_prompt(c).ids) for c in convos]


# ------------------------------------------------------------------- timing


class Clock:
    """Wall time around a call, with the device synchronised on both sides."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


def first_token_seconds(client: Any, convo: Any) -> float:
    """Time to the first token: ``create(max_tokens=1)`` (prompt, prefill, one sampled
    token and its text), what the raw rows measure with ``generate(max_new_tokens=1)``.

    Not the first streamed chunk: with random weights the first token's text is
    often empty or held back (a byte token), so the first chunk arrives a burst later
    or more, by chance.
    """
    start = time.perf_counter()
    client.create(convo, temperature=0, max_tokens=1)
    return time.perf_counter() - start


def langchain_inputs(client: Any, convos: list[Any], n: int) -> tuple[Any, list[Any]]:
    """A greedy ``ChatGemmaLocal`` over ``client`` and the conversations as LangChain messages."""
    from langchain_core.messages import HumanMessage

    from langchain_gemma_local import ChatGemmaLocal

    chat = ChatGemmaLocal(client=client, temperature=0, max_tokens=n)
    return chat, [[HumanMessage(c[0]["content"])] for c in convos]


def chat_huggingface(model: Any, tokenizer: Any, model_id: str, n: int) -> Any:
    """The peer: ``ChatHuggingFace`` over a greedy ``HuggingFacePipeline`` on the same model."""
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
    from transformers import pipeline

    pipe = pipeline(
        "text-generation",
        model=model,
        tokenizer=tokenizer,
        max_new_tokens=n,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        return_full_text=False,
    )
    return ChatHuggingFace(
        llm=HuggingFacePipeline(pipeline=pipe, model_id=model_id),
        tokenizer=tokenizer,
        model_id=model_id,
    )


def completion_tokens(results: list[dict[str, Any]]) -> int:
    return sum(r["usage"]["completion_tokens"] for r in results)


# --------------------------------------------------------------------- GPU


def gemma4_text_config(spec: dict[str, Any], layer_types: list[str]) -> Any:
    """The ``Gemma4TextConfig`` of a Gemma 4 shape: ``spec`` (its dims, without ``arch``)
    plus what every real Gemma 4 has, as :mod:`core.tiny` builds it.

    Only keyword arguments that transformers 5.17 and 5.24 both take: ``global_head_dim``
    and ``num_global_key_value_heads`` go into ``per_layer_config`` in both (which
    5.24's ``config.head_dim`` then refuses to summarise; read it per layer).
    """
    from transformers import Gemma4TextConfig

    dims = dict(spec)
    dims.setdefault("vocab_size_per_layer_input", dims["vocab_size"])
    return Gemma4TextConfig(
        **dims,
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1_000_000.0,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        final_logit_softcapping=30.0,
        max_position_embeddings=32768,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        attention_bias=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
    )


def gpu_model(
    shape: str,
    dtype: Any,
    layers: int | None = None,
    window: int | None = None,
    device: str = "cuda",
    pattern: int = 6,
) -> Any:
    """Random weights of a real shape, initialised directly on the GPU.

    ``pattern``: every ``pattern``-th layer is a full-attention one (a shape's own
    ``pattern`` wins). The norms get random weights and the end ids' embedding rows
    (:func:`shape_end_ids`) are zeroed: with the tied ``lm_head`` their logits are 0, never
    the argmax, so every greedy run generates exactly the tokens it asks for.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma3Config,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    pattern = spec.pop("pattern", pattern)
    if layers is not None:
        spec["num_hidden_layers"] = layers
    if window is not None:
        spec["sliding_window"] = window
    n = spec["num_hidden_layers"]
    layer_types = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
    ]
    gemma4 = is_gemma4_shape(shape)
    stop = list(shape_end_ids(shape))
    config: Any
    if gemma4:
        from transformers import Gemma4Config

        from core.tiny import special_token_ids
        from core.tiny.configs import gemma4_media_token_fields

        ids = special_token_ids(arch, spec["vocab_size"])
        # Gemma4ForConditionalGeneration (what the real checkpoints load as) without
        # the vision and audio towers: text only, the decoder and its layout the real ones.
        config = Gemma4Config(
            text_config=gemma4_text_config(spec, layer_types),
            vision_config=None,
            audio_config=None,
            **gemma4_media_token_fields(ids),
            tie_word_embeddings=True,
        )
    else:
        text = Gemma3TextConfig(
            **spec,
            query_pre_attn_scalar=256,
            layer_types=layer_types,
            max_position_embeddings=32768,
            hidden_activation="gelu_pytorch_tanh",
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
            tie_word_embeddings=True,
        )
        config = text
        if arch == "gemma3":  # loads as Gemma3ForConditionalGeneration, like the real 12b
            vocab = spec["vocab_size"]
            config = Gemma3Config(
                text_config=text,
                vision_config=SiglipVisionConfig(
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=64,
                    patch_size=16,
                    vision_use_head=False,
                ),
                mm_tokens_per_image=4,
                boi_token_index=vocab - 3,
                eoi_token_index=vocab - 2,
                image_token_index=vocab - 1,
                tie_word_embeddings=True,
            )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 2
    with torch.no_grad():
        gen = torch.Generator(device=device).manual_seed(0)
        # Gemma 1-3 scale by (1 + weight), initialised 0; Gemma 4 by weight, initialised 1.
        base = 1.0 if gemma4 else 0.0
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and "vision" not in name:
                noise = torch.randn(param.shape, generator=gen, device=device) * 0.5
                param.copy_(base + noise)
        embed = model.get_input_embeddings().weight
        embed[stop] = 0  # never the argmax: every run generates exactly n tokens
    return model


def end_ids(model: Any) -> list[int]:
    """The model's end ids (its generation config's, as :func:`gpu_model` set them)."""
    ids = model.generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids)


def read_bytes(model: Any) -> int:
    """Weight bytes one decode step at batch size 1 reads: what bounds its speed.

    Everything, once (the tied embedding is read whole by ``lm_head``), except: of a MoE
    layer's experts only the ``top_k_experts`` a token is routed to; of the per-layer
    embedding table (Gemma 4 E models, ``embed_tokens_per_layer``) one row.
    """
    text = model.config.get_text_config()
    experts = getattr(text, "num_experts", None) or 0
    active = getattr(text, "top_k_experts", None) or 0
    total = 0
    for name, p in model.named_parameters():  # each once: the tied lm_head is embed_tokens
        size = p.numel() * p.element_size()
        if "embed_tokens_per_layer" in name:
            size = p.shape[-1] * p.element_size()
        elif experts and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            size = size * active // experts
        total += size
    return total


def tokenizer_for(shape: str, work: Path) -> Any:
    from transformers import AutoTokenizer

    from core.tiny import build_tokenizer

    spec = SHAPES[shape]
    path = work / f"tokenizer-{shape}"
    build_tokenizer(path, arch=spec["arch"], vocab_size=spec["vocab_size"])
    return AutoTokenizer.from_pretrained(str(path)), path


def measure_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write), the decode ceiling."""
    import torch

    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    return 2 * 2 * 1024**3 / seconds


def weight_bytes(model: Any) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def raw_generate(
    model: Any, ids: list[list[int]], n: int, *, static: bool = False, **extra: Any
) -> Any:
    """Greedy ``model.generate`` of ``n`` new tokens for ``ids`` (no padding); ``extra``:
    more ``generate`` options (e.g. ``stopping_criteria``)."""
    import torch

    inputs = torch.tensor(ids, device=model.device)
    options: dict[str, Any] = dict(
        max_new_tokens=n,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=end_ids(model),
        pad_token_id=0,
    )
    if static:
        options["cache_implementation"] = "static"
    options.update(extra)
    with torch.inference_mode():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **options)
    return out[:, inputs.shape[1] :].tolist()


class GpuBench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.rows: list[Row] = []
        self.checks: list[str] = []
        self.device = "cpu" if args.dry_run else "cuda"
        self.clock = Clock(torch.cuda.synchronize if self.device == "cuda" else lambda: None)
        self.profiled: set[str] = set()
        self.work = Path(tempfile.mkdtemp(prefix="gemma-bench-"))

    def peak(self) -> float | None:
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 1e9

    def reset_peak(self) -> None:
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def empty_cache(self) -> None:
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def row(self, section: str, name: str, batch: int, fn: Callable[[], Row]) -> Row:
        log(f"{section} | {name} | bs{batch} ...")
        try:
            self.reset_peak()
            result = fn()
        except Exception as exc:
            traceback.print_exc()
            result = Row(section, name, batch, note=f"failed: {type(exc).__name__}: {exc}"[:300])
        result.section, result.name, result.batch = section, name, batch
        if (
            result.peak_gb is None
            and not result.note.startswith("failed")
            and self.device == "cuda"
        ):
            result.peak_gb = self.peak()
        log(f"   -> {asdict(result)}")
        self.rows.append(result)
        return result

    # ------------------------------------------------------------ raw rows

    def raw_row(self, model: Any, ids: list[list[int]], n: int, static: bool, section: str) -> Row:
        timed: list[float] = []
        # static: the first call compiles (reported); dynamic: a short warm-up is enough
        first, out = self.clock(lambda: raw_generate(model, ids, n if static else 8, static=static))
        for _ in range(self.args.repeats):
            seconds, out = self.clock(lambda: raw_generate(model, ids, n, static=static))
            timed.append(seconds)
        tokens = sum(len(r) for r in out)
        peak = self.peak()
        ttft = median(
            [self.clock(lambda: raw_generate(model, ids, 1, static=static))[0] for _ in range(3)]
        )
        note = "" if tokens == n * len(ids) else f"generated {tokens} tokens"
        return Row(
            section,
            "",
            len(ids),
            tok_s=tokens / median(timed),
            ttft_ms=ttft * 1000,
            peak_gb=peak,
            first_call_s=first if static else None,
            tokens=tokens,
            note=note,
        )

    # ----------------------------------------------------------- our rows

    def ours_row(self, client: Any, convos: list[Any], n: int, section: str) -> Row:
        def call() -> list[dict[str, Any]]:
            if len(convos) == 1:
                return [client.create(convos[0], temperature=0, max_tokens=n)]
            return client.create_batch(convos, temperature=0, max_tokens=n)

        first, out = self.clock(call)
        timed = []
        for _ in range(self.args.repeats):
            seconds, out = self.clock(call)
            timed.append(seconds)
        tokens = completion_tokens(out)
        peak = self.peak()
        ttft = median([first_token_seconds(client, convos[0]) for _ in range(3)])
        from core.accel.cuda import fast_path

        info = fast_path.describe(client.model)
        note = "" if info.get("active") else "plain path (fast path not active)"
        try:
            replay = graph_step_ms(client.model, len(convos))
        except Exception as exc:
            traceback.print_exc()
            replay, note = None, f"graph timing failed: {exc}"[:100]
        if replay is not None:
            note += f"graph replay alone: {replay:.3f} ms/step ({len(convos) * 1000 / replay:,.0f} tok/s)"
        if self.args.profile and len(convos) == 1 and section not in self.profiled:
            self.profiled.add(section)
            try:
                profile_steps(client.model, 1)
            except Exception:
                traceback.print_exc()
        if info.get("fallbacks"):
            note += " fallbacks: " + "; ".join(info["fallbacks"])[:200]
        if tokens != n * len(convos):
            note += f" generated {tokens} tokens"
        return Row(
            section,
            "",
            len(convos),
            tok_s=tokens / median(timed),
            ttft_ms=ttft * 1000,
            peak_gb=peak,
            first_call_s=first,
            tokens=tokens,
            note=note.strip(),
        )

    def langchain_row(self, client: Any, convos: list[Any], n: int, section: str) -> Row:
        """``ChatGemmaLocal.invoke()`` (one prompt) or ``.batch()`` over the same client."""
        chat, messages = langchain_inputs(client, convos, n)

        def call() -> list[Any]:
            if len(messages) == 1:
                return [chat.invoke(messages[0])]
            return chat.batch(messages)

        call()  # warm-up
        timed = []
        for _ in range(self.args.repeats):
            seconds, out = self.clock(call)
            timed.append(seconds)
        tokens = sum(m.usage_metadata["output_tokens"] for m in out)
        note = "" if tokens == n * len(convos) else f"generated {tokens} tokens"
        return Row(section, "", len(convos), tok_s=tokens / median(timed), tokens=tokens, note=note)

    def huggingface_row(self, model: Any, client: Any, convos: list[Any], n: int) -> Row:
        """The peer on one prompt (its pipeline returns text only: greedy with the end ids
        zeroed runs to ``n`` tokens, which our rows' usage confirms). No warm-up call:
        the raw rows before it ran ``generate`` on this model."""
        from langchain_core.messages import HumanMessage

        hf = chat_huggingface(model, client.tokenizer, client.model_name, n)
        messages = [HumanMessage(convos[0][0]["content"])]
        timed = [self.clock(lambda: hf.invoke(messages))[0] for _ in range(self.args.repeats)]
        return Row("", "", 1, tok_s=n / median(timed), tokens=n)

    def sequential_row(self, client: Any, convos: list[Any], n: int, section: str) -> Row:
        seconds, outs = self.clock(
            lambda: [client.create(c, temperature=0, max_tokens=n) for c in convos]
        )
        tokens = completion_tokens(outs)
        return Row(section, "", 1, tok_s=tokens / seconds, tokens=tokens)

    # ------------------------------------------------------- equality

    def equality(self, label: str, client: Any, model: Any, convos: list[Any], n: int) -> None:
        """Greedy tokens of the fast path (through create_batch) against model.generate."""
        ids = prompt_ids(client, convos)
        width = max(len(i) for i in ids)
        padded = [[0] * (width - len(i)) + i for i in ids]
        import torch

        inputs = torch.tensor(padded, device=model.device)
        mask = torch.tensor(
            [[0] * (width - len(i)) + [1] * len(i) for i in ids], device=model.device
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=inputs,
                attention_mask=mask,
                max_new_tokens=n,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=end_ids(model),
                pad_token_id=0,
            )
        expected = out[:, width:].tolist()
        if len(convos) == 1:
            client.create(convos[0], temperature=0, max_tokens=n)
        else:
            client.create_batch(convos, temperature=0, max_tokens=n)
        got = client.last_tokens
        same = sum(g == e for g, e in zip(got, expected, strict=True))
        prefixes = []
        for g, e in zip(got, expected, strict=True):
            k = 0
            while k < min(len(g), len(e)) and g[k] == e[k]:
                k += 1
            prefixes.append(k)
        from core.accel.cuda import fast_path

        ops = fast_path.describe(model)
        line = (
            f"{label}: {same}/{len(got)} rows identical over {n} greedy tokens "
            f"(prompt lengths {sorted({len(i) for i in ids})}); "
            f"tokens before the first difference per row: {prefixes}; decode step: "
            f"attention {ops.get('decode_attention')}, Triton products "
            f"{ops.get('triton_products')}, rope/store {ops.get('rope_store')}, "
            f"PDL at one row {ops.get('pdl')}"
        )
        log(line)
        self.checks.append(line)

    def check_fp32(self) -> None:
        """float32 (no TF32), 1b widths, 4 layers, sliding window 64 < prompt + generation."""
        torch = self.torch
        shape = "tiny" if self.args.dry_run else "1b"
        model = gpu_model(shape, torch.float32, layers=4, window=64, device=self.device, pattern=4)
        tokenizer, path = tokenizer_for(shape, self.work)
        client = bench_client(model, tokenizer, str(path), record=True)
        convos = conversations(client, 4, 100, seed=7)
        convos[1] = conversations(client, 1, 37, seed=8)[0]
        convos[2] = conversations(client, 1, 71, seed=9)[0]
        self.equality(
            "float32 check, 1b widths x 4 layers, window 64, bs1", client, model, convos[:1], 96
        )
        self.equality("float32 check, same, bs4 left-padded", client, model, convos, 96)
        client.close()
        del client, model
        gc.collect()
        self.empty_cache()

    # ------------------------------------------------------------ one shape

    def prefix_row(self, section: str, client: Any) -> None:
        """``--prefix-tokens``: turn 5 of a chat whose system prompt makes a shared prefix of
        that many tokens, time to first token with the client's prompt cache against
        without it (``benchmarks/bench_prefix.py``'s measurement, its median of --repeats)."""
        from bench_prefix import measure

        def run() -> Row:
            got = measure(client, section, self.args.prefix_tokens, self.args.repeats)
            row = Row(
                section,
                "",
                1,
                ttft_ms=got["TTFT with reuse (ms)"],
                tokens=got["turn 5 prompt tokens"],
                note=f"without reuse: {got['TTFT without (ms)']:.1f} ms",
            )
            row.ratios["x faster than without reuse"] = got["speed-up"]
            return row

        label = f"ours: turn 5, ~{self.args.prefix_tokens}-token shared prefix, prompt cache"
        self.row(section, label, 1, run)

    def shape(self, shape: str, nf4: bool) -> None:
        torch, args = self.torch, self.args
        if args.prefix_tokens:  # turn 5's prompt and its reply fit the batch's cache slots
            os.environ.setdefault("GEMMA_LOCAL_SLOT_TOKENS", "8192")
        n, p = args.new_tokens, args.prompt_tokens
        log(f"=== {shape}: building random weights on the GPU")
        model = gpu_model(shape, torch.bfloat16, device=self.device)
        tokenizer, path = tokenizer_for(shape, self.work)
        model.config.save_pretrained(path)  # the client checks the folder is a model's
        client = bench_client(model, tokenizer, str(path), record=args.record)
        convos = conversations(client, 16, p)  # the tokenizer only: the model is untouched
        ids = prompt_ids(client, convos)
        gb, read = weight_bytes(model), read_bytes(model)
        limit = self.bandwidth / read
        reads = "" if read == gb else f", {read / 1e9:.2f} GB read per token"
        section = f"{shape} bf16 ({gb / 1e9:.1f} GB{reads}, limit {limit:.0f} tok/s at bs1)"
        self.limits[section] = limit
        if args.cold_start:
            self.cold_start(shape, model, tokenizer, path, convos[0], ids[:1], n)
        if args.batches:
            self.run_shape_rows(section, client, model, convos, ids, n, shape)
        if args.constrained_batches:
            self.constrained_rows(section, client, convos, n)
        if args.concurrent:
            self.concurrent_rows(section, client, convos, n)
        if args.prefix_tokens:
            self.prefix_row(section, client)
        self.write()
        if nf4:
            client.close()
            from core.accel.cuda import fast_path

            fast_path.release(model)
            log("=== quantising to NF4 (bitsandbytes, double quant, bf16 compute)")
            quantize_nf4(model, self.device)
            gc.collect()
            self.empty_cache()
            gb = weight_bytes(model)
            section = (
                f"{shape} NF4 ({gb / 1e9:.1f} GB, limit {self.bandwidth / gb:.0f} tok/s at bs1)"
            )
            self.limits[section] = self.bandwidth / gb
            client = bench_client(model, tokenizer, str(path), record=args.record)
            self.run_shape_rows(section, client, model, convos, ids, n, shape, nf4=True)
        client.close()
        del client, model
        gc.collect()
        self.empty_cache()

    def cold_start(
        self,
        shape: str,
        model: Any,
        tokenizer: Any,
        path: Path,
        convo: Any,
        ids: list[list[int]],
        n: int,
    ) -> None:
        """``--cold-start``: the first request on a model nothing has run yet, against the
        first calls of raw ``model.generate``.

        Ours first: a fresh client, its ``load()``, then its very first ``create(stream=True)``
        of ``n`` tokens (compilation and graph capture included): time to the first chunk
        with text (with random weights a first token without text, e.g. a byte, delays it
        by a token or so) and to the end. Then raw ``generate``: its first call
        (``max_new_tokens=1``: its time to first token) and the next one, of ``n`` tokens.
        Raw runs second (``--cold-first raw``: first), so whatever process-wide warm-up ours
        paid for (CUDA kernels loaded on first use) raw does not: the ratios are conservative
        (run each order in a process of its own for a fair pair). Ratios are times:
        ``x raw first call`` = ours' time to first token / raw's first call's.
        """
        section = f"{shape} bf16: cold start (the first request on a fresh model)"
        sync = self.clock.sync
        measured: dict[str, float] = {}

        def ours() -> Row:
            from core.accel.cuda import fast_path

            start = time.perf_counter()
            client = bench_client(model, tokenizer, str(path))
            loaded = time.perf_counter() - start
            wait = os.environ.get("GEMMA_LOCAL_COMPILE_WAIT")
            os.environ["GEMMA_LOCAL_COMPILE_WAIT"] = "0"  # as a user's first request runs
            try:
                sync()
                start = time.perf_counter()
                ttft, tokens = None, 0
                for chunk in client.create(convo, temperature=0, max_tokens=n, stream=True):
                    if ttft is None and any(
                        c.get("delta", {}).get("content") for c in chunk.get("choices", ())
                    ):
                        ttft = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                sync()
                total = time.perf_counter() - start
                fast_path.settle(model)  # the background compile, before the next rows
                ready = time.perf_counter() - start
            finally:
                if wait is None:
                    os.environ.pop("GEMMA_LOCAL_COMPILE_WAIT", None)
                else:
                    os.environ["GEMMA_LOCAL_COMPILE_WAIT"] = wait
                client.close()
            if ttft is None:
                raise RuntimeError("the first request streamed no text")
            measured.update(ours_ttft=ttft, ours_total=total)
            note = (
                f"load() {loaded:.2f} s (not in the times); compiled code ready after {ready:.1f} s"
            )
            if tokens != n:
                note += f"; generated {tokens} tokens"
            return Row(
                section,
                "",
                1,
                tok_s=tokens / total,
                ttft_ms=ttft * 1000,
                first_call_s=total,
                tokens=tokens,
                note=note,
            )

        def raw() -> Row:
            ttft, _ = self.clock(lambda: raw_generate(model, ids, 1))
            total, out = self.clock(lambda: raw_generate(model, ids, n))
            tokens = sum(len(r) for r in out)
            measured.update(raw_ttft=ttft, raw_total=total)
            return Row(
                section,
                "",
                1,
                tok_s=tokens / total,
                ttft_ms=ttft * 1000,
                first_call_s=total,
                tokens=tokens,
                note="TTFT: the first call (max_new_tokens=1); first call s: the next call, "
                f"{n} tokens (a dynamic cache compiles nothing)",
            )

        if self.args.cold_first == "raw":  # raw pays the process's CUDA warm-up instead
            self.row(section, "raw generate: first calls (first in the process)", 1, raw)
            first = self.row(section, "ours: first create() of a fresh client (after raw)", 1, ours)
        else:
            first = self.row(section, "ours: first create() of a fresh client (stream)", 1, ours)
            self.row(section, "raw generate: first calls (after ours)", 1, raw)
        if {"ours_ttft", "raw_ttft"} <= measured.keys():
            first.ratios["x raw first call"] = measured["ours_ttft"] / measured["raw_ttft"]
        if {"ours_total", "raw_total"} <= measured.keys():
            first.ratios["total x raw"] = measured["ours_total"] / measured["raw_total"]

    def run_shape_rows(
        self,
        section: str,
        client: Any,
        model: Any,
        convos: list[Any],
        ids: list[list[int]],
        n: int,
        shape: str,
        nf4: bool = False,
    ) -> None:
        args = self.args
        raw_n = args.nf4_raw_tokens if nf4 else n
        ours_only = shape in args.ours_only
        for batch in args.nf4_batches if nf4 else args.batches:
            b_ids, b_convos = ids[:batch], convos[:batch]
            raw = Row(section, "", batch)
            if not ours_only:
                raw = self.row(
                    section,
                    "raw generate (dynamic cache)" + (f", {raw_n} tokens" if raw_n != n else ""),
                    batch,
                    lambda b_ids=b_ids: self.raw_row(model, b_ids, raw_n, False, section),
                )
            static = None
            if not nf4 and not args.skip_static and not ours_only:
                static = self.row(
                    section,
                    "raw generate (static cache + compile)",
                    batch,
                    lambda b_ids=b_ids: self.raw_row(model, b_ids, n, True, section),
                )
            if args.raw_only:  # the raw rows of a shape, in a call of their own
                continue
            ours = self.row(
                section,
                "ours: create()" if batch == 1 else "ours: create_batch()",
                batch,
                lambda b_convos=b_convos: self.ours_row(client, b_convos, n, section),
            )
            if ours.tok_s and raw.tok_s:
                ours.ratios["x raw"] = ours.tok_s / raw.tok_s
            if ours.tok_s and static is not None and static.tok_s:
                ours.ratios["x static+compile"] = ours.tok_s / static.tok_s
            if ours.tok_s and self.limits.get(section) and batch == 1:
                ours.ratios["of limit"] = ours.tok_s / self.limits[section]
            chat = self.row(
                section,
                "ours: ChatGemmaLocal.invoke()" if batch == 1 else "ours: ChatGemmaLocal.batch()",
                batch,
                lambda b_convos=b_convos: self.langchain_row(client, b_convos, n, section),
            )
            if chat.tok_s and ours.tok_s:
                key = "x create()" if batch == 1 else "x create_batch()"
                chat.ratios[key] = chat.tok_s / ours.tok_s
            if batch == 1 and not ours_only and not nf4:
                peer = self.row(
                    section,
                    "ChatHuggingFace(HuggingFacePipeline)",
                    1,
                    lambda b_convos=b_convos: self.huggingface_row(model, client, b_convos, n),
                )
                if chat.tok_s and peer.tok_s:
                    chat.ratios["x ChatHuggingFace"] = chat.tok_s / peer.tok_s
            if batch == 1:
                self.bs1[section] = ours
            elif section in self.bs1:
                seq_calls = args.seq_calls.get(shape, 16) if not nf4 else 2
                seq = self.row(
                    section,
                    f"ours: {seq_calls} sequential create()",
                    1,
                    lambda seq_calls=seq_calls: self.sequential_row(
                        client, convos[:seq_calls], n, section
                    ),
                )
                if seq.tok_s:
                    for row in (ours, chat):
                        if row.tok_s:
                            row.ratios["x sequential"] = row.tok_s / seq.tok_s
            if args.record and not nf4:
                self.equality(f"{section} bs{batch}", client, model, b_convos, n)

    def constrained_rows(self, section: str, client: Any, convos: list[Any], n: int) -> None:
        """Tools and JSON output against the same request unconstrained, per decoded token.

        Every request gets the same ``logit_bias`` (the end ids and every token with a
        double quote at -100), so a constrained reply runs to ``max_tokens`` inside a free
        JSON string and an unconstrained one to ``max_tokens`` too. The per-token time is
        ``(t(n) - t(n1)) / (n - n1)`` (the prefill, which differs by the tool prompt,
        cancels out), the median of ``--repeats`` pairs; tok/s = rows / per-token time.
        """
        from bench_constrained import e2e_modes, ids_with

        bias = dict.fromkeys([*end_ids(client.model), *ids_with(client.tokenizer, '"')], -100.0)
        constrained = e2e_modes()  # bench_constrained's schema and tool: a free JSON string
        modes: dict[str, dict[str, Any]] = {
            "unconstrained": {},
            "tools (tool_choice=required)": constrained["tools"],
            "JSON schema response_format": constrained["json_schema"],
        }
        n1 = max(8, n // 8)
        for batch in self.args.constrained_batches:
            rows = convos[:batch]

            def timed(tokens: int, request: dict[str, Any], rows: list[Any] = rows) -> float:
                options = {"temperature": 0, "max_tokens": tokens, "logit_bias": bias, **request}
                seconds, out = self.clock(
                    lambda: (
                        client.create_batch(rows, **options)
                        if len(rows) > 1
                        else [client.create(rows[0], **options)]
                    )
                )
                used = completion_tokens(out)
                assert used == tokens * len(rows), f"{used} of {tokens * len(rows)} tokens"
                return seconds

            base = None
            for mode, request in modes.items():

                def measure(request: dict[str, Any] = request, rows: list[Any] = rows) -> Row:
                    timed(n, request)  # warm-up: graphs of this bucket and sampler
                    per_token = median(
                        [
                            (timed(n, request) - timed(n1, request)) / (n - n1)
                            for _ in range(self.args.repeats)
                        ]
                    )
                    return Row(section, "", len(rows), tok_s=len(rows) / per_token)

                row = self.row(section, f"ours, per token: {mode}", batch, measure)
                if base is None:
                    base = row
                elif row.tok_s and base.tok_s:
                    row.ratios["x unconstrained"] = row.tok_s / base.tok_s

    def concurrent_rows(self, section: str, client: Any, convos: list[Any], n: int) -> None:
        """``--concurrent K``: K threads each calling ``create()`` at once (the continuous
        batch) against the same K calls one after another; the p50 time to first token
        (``max_tokens=1``) of a request arriving while K - 1 others decode against an idle
        one."""
        from concurrent.futures import ThreadPoolExecutor

        k = self.args.concurrent
        rows = convos[:k]

        def call(convo: Any, tokens: int = n) -> dict[str, Any]:
            return client.create(convo, temperature=0, max_tokens=tokens)

        def concurrently() -> list[dict[str, Any]]:
            with ThreadPoolExecutor(k) as pool:
                return list(pool.map(call, rows))

        def sequentially() -> list[dict[str, Any]]:
            return [call(c) for c in rows]

        call(rows[0])  # warm-up: the one-row step
        concurrently()  # warm-up: the wider steps
        out: dict[str, Row] = {}
        for name, fn in (("sequential", sequentially), ("concurrent", concurrently)):

            def measure(fn: Callable[[], list[dict[str, Any]]] = fn) -> Row:
                seconds, results = self.clock(fn)
                tokens = completion_tokens(results)
                return Row(section, "", k, tok_s=tokens / seconds, tokens=tokens)

            label = f"ours: {k} {name} create() calls" + (
                " (threads)" if name == "concurrent" else ""
            )
            out[name] = self.row(section, label, k if name == "concurrent" else 1, measure)
        if out["concurrent"].tok_s and out["sequential"].tok_s:
            out["concurrent"].ratios["x sequential"] = (
                out["concurrent"].tok_s / out["sequential"].tok_s
            )

        def ttft(loaded: bool) -> Row:
            streams = []
            if loaded:
                for convo in rows[1:]:
                    stream = client.create(convo, temperature=0, max_tokens=n, stream=True)
                    next(stream)
                    streams.append(stream)
            try:
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    call(rows[0], 1)
                    times.append(time.perf_counter() - start)
            finally:
                for stream in streams:
                    stream.close()
            return Row(section, "", k if loaded else 1, ttft_ms=median(times) * 1000)

        idle = self.row(section, "ours: time to first token, idle", 1, lambda: ttft(False))
        busy = self.row(
            section, f"ours: time to first token, {k - 1} others decoding", k, lambda: ttft(True)
        )
        if idle.ttft_ms and busy.ttft_ms:
            busy.ratios["x idle"] = busy.ttft_ms / idle.ttft_ms

    def variants(self) -> None:
        """1b at bs1: the fast path without fused projections, and without compile (graphs only)."""
        torch = self.torch
        from core.accel.cuda import fast_path

        shape = "tiny" if self.args.dry_run else "1b"
        model = gpu_model(shape, torch.bfloat16, device=self.device)
        tokenizer, path = tokenizer_for(shape, self.work)
        model.config.save_pretrained(path)
        client = bench_client(model, tokenizer, str(path))
        convos = conversations(client, 1, self.args.prompt_tokens)
        section = "1b bf16: fast-path variants"
        for name, env in [
            ("ours, CUDA graphs of eager kernels (no torch.compile)", {"GEMMA_LOCAL_COMPILE": "0"}),
            ("ours, compiled without coordinate-descent tuning", {"GEMMA_LOCAL_TUNE": "0"}),
        ]:
            fast_path.release(model)
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                self.row(
                    section,
                    name,
                    1,
                    lambda client=client: self.ours_row(
                        client, convos, self.args.new_tokens, section
                    ),
                )
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        client.close()
        del client, model
        gc.collect()
        self.empty_cache()

    def run(self) -> None:
        args = self.args
        self.limits: dict[str, float] = {}
        self.bs1: dict[str, Row] = {}
        self.bandwidth = measure_bandwidth() if self.device == "cuda" else 1e11
        log(f"copy bandwidth {self.bandwidth / 1e12:.2f} TB/s")
        if args.check:
            try:
                self.check_fp32()
            except Exception as exc:
                traceback.print_exc()
                self.checks.append(f"float32 check failed: {type(exc).__name__}: {exc}")
        for shape in args.shapes:
            self.shape(
                shape, nf4=args.nf4 and shape in ("12b", "tiny", "tiny4", "e4b", "31b", "26b-a4b")
            )
            self.write()
        if args.variants:
            self.variants()
        self.write()

    def write(self) -> None:
        torch = self.torch
        import transformers

        if self.device != "cuda":
            write_results(self.args, "dry-run", "CPU dry run", self.rows, self.checks)
            return
        machine = (
            f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), "
            f"copy bandwidth measured {self.bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}"
        )
        write_results(self.args, "gpu", machine, self.rows, self.checks)


def graph_step_ms(model: Any, batch: int, position: int = 8) -> float | None:
    """GPU time of one captured decode step, replayed back to back (no host work between),
    from cache index ``position`` on (attention reads grow with it)."""
    import torch

    from core.accel.cuda import fast_path

    engine = getattr(model, fast_path._ENGINE_ATTR, None)
    if engine is None or not torch.cuda.is_available():
        return None
    buckets = [b for (bs, _), b in engine.buckets.items() if bs == batch and b.graphs]
    if not buckets:
        return None
    bucket = buckets[-1]
    graph = next(iter(bucket.graphs.values()))
    with torch.inference_mode():
        position = min(position, bucket.length - 20)
        bucket.step.fill_(position)  # after the request: any start inside the bucket will do
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        steps = min(100, bucket.length - position - 4)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / steps


def profile_steps(
    model: Any, batch: int, steps: int = 10, top: int = 14, position: int = 8
) -> None:
    """Kernel time of the compiled decode step (run without the graph) from cache index
    ``position`` on, top kernels first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.accel.cuda import fast_path

    engine = getattr(model, fast_path._ENGINE_ATTR)
    bucket = next(b for (bs, _), b in reversed(engine.buckets.items()) if bs == batch and b.graphs)
    how = next(iter(bucket.graphs))
    with torch.inference_mode():
        bucket.step.fill_(min(position, bucket.length - steps - 2))
        engine._step(bucket, how)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine._step(bucket, how)
            torch.cuda.synchronize()
    log_kernels(prof, "profile:", "per step", steps, top)


def log_kernels(prof: Any, label: str, unit: str, calls: int, top: int) -> None:
    """The GPU kernels a ``torch.profiler`` run recorded, per one of its ``calls``: their
    total time and launches, then the ``top`` kernels by time."""
    import torch

    events = prof.key_averages()
    attr = (
        "self_device_time_total"
        if hasattr(events[0], "self_device_time_total")
        else "self_cuda_time_total"
    )
    cuda = torch.autograd.DeviceType.CUDA  # not the CPU-side records of the same launches
    kernels = [e for e in events if e.device_type == cuda and getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in kernels) / calls / 1000
    count = sum(e.count for e in kernels) / calls
    log(f"{label} {total:.3f} ms of kernels {unit}, {count:.0f} kernel launches {unit}")
    for e in sorted(kernels, key=lambda e: -getattr(e, attr))[:top]:
        log(f"   {getattr(e, attr) / calls / 1000:8.4f} ms  x{e.count / calls:5.1f}  {e.key[:110]}")


def quantize_nf4(model: Any, device: str = "cuda") -> None:
    """Replace the decoder's nn.Linear layers by bitsandbytes NF4 ones (double quant, bf16 compute).

    What ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16))`` builds, without a checkpoint on disk;
    ``lm_head`` stays in bf16 as there.
    """
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    for module_name, module in list(model.named_modules()):
        if "vision" in module_name:
            continue
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data.contiguous(),
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
            )
            setattr(module, name, layer.to(device))
            del child


# --------------------------------------------------------------------- CPU


def cpu_checkpoint(work: Path) -> Path:
    """The small Gemma 3 (hidden 512, 4 layers, ~16M parameters), end ids zeroed."""
    from safetensors.torch import load_file, save_file

    from core.tiny import build_tiny_checkpoint

    path = work / "gemma3-small"
    build_tiny_checkpoint(
        path,
        "gemma3_text",
        dtype="bfloat16",
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    )
    file = path / "model.safetensors"
    weights = load_file(str(file))
    for name, value in weights.items():
        if name.endswith("embed_tokens.weight"):
            value[list(EOS)] = 0
    save_file(weights, str(file), metadata={"format": "pt"})
    return path


class CpuBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.checks: list[str] = []
        self.clock = Clock(lambda: None)
        self.work = Path(tempfile.mkdtemp(prefix="gemma-bench-"))
        #: median CPU seconds of each function of the last :meth:`pairs`
        self.cpu: dict[str, float] = {}

    def timed(self, fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
        fn()  # warm-up
        results = [self.clock(fn) for _ in range(repeats)]
        return median([s for s, _ in results]), results[-1][1]

    def add(self, section: str, name: str, batch: int, fn: Callable[[], Row]) -> Row:
        log(f"{section} | {name} | bs{batch} ...")
        try:
            row = fn()
        except Exception as exc:
            traceback.print_exc()
            row = Row(section, name, batch, note=f"failed: {type(exc).__name__}: {exc}"[:300])
        row.section, row.name, row.batch = section, name, batch
        log(f"   -> {asdict(row)}")
        self.rows.append(row)
        return row

    def pairs(self, fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
        """Median seconds of each function, runs interleaved so drift hits all alike.

        Also sets :attr:`cpu`: the median CPU time of each (``time.process_time``, every
        thread of the process), which a VM's stolen time does not inflate: on these
        2-core machines the second core comes and goes, and single interleaved pairs of
        wall times swing by 10-25% where their CPU times agree within a few percent."""
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                started = time.process_time()
                times[k].append(self.clock(fn)[0])
                cpu[k].append(time.process_time() - started)
        self.cpu = {k: median(v) for k, v in cpu.items()}
        return {k: median(v) for k, v in times.items()}

    def run(self) -> None:
        import torch

        args = self.args
        n, p, reps = args.new_tokens, args.prompt_tokens, args.repeats
        torch.manual_seed(0)
        path = cpu_checkpoint(self.work)
        from core import GemmaTransformersChatCompletion
        from core.accel.cuda import fast_path

        client = GemmaTransformersChatCompletion(str(path), device_map="cpu").load()
        model = client.model
        params = model.num_parameters()
        section = (
            f"transformers, small Gemma 3 ({params / 1e6:.1f}M params, hidden 512, 4 layers), "
            f"{str(model.dtype).replace('torch.', '')}"
        )
        convos = conversations(client, 8, p)
        ids = prompt_ids(client, convos)

        def ours1() -> Any:
            return client.create(convos[0], temperature=0, max_tokens=n)

        def raw1() -> Any:
            return raw_generate(model, ids[:1], n)

        t = self.pairs({"ours": ours1, "raw": raw1}, reps)
        cpu = self.cpu
        tokens = ours1()["usage"]["completion_tokens"]
        raw_tokens = len(raw1()[0])
        self.add(
            section,
            "raw generate",
            1,
            lambda: Row(section, "", 1, tok_s=raw_tokens / t["raw"], tokens=raw_tokens),
        )
        ours = self.add(
            section,
            "ours: create()",
            1,
            lambda: Row(section, "", 1, tok_s=tokens / t["ours"], tokens=tokens),
        )
        ours.ratios["x raw"] = t["raw"] / t["ours"] * tokens / raw_tokens
        ours.ratios["x raw in CPU time"] = cpu["raw"] / cpu["ours"] * tokens / raw_tokens
        ours.ttft_ms = 1000 * median([first_token_seconds(client, convos[0]) for _ in range(5)])
        self.rows[-2].ttft_ms = 1000 * median(
            [self.clock(lambda: raw_generate(model, ids[:1], 1))[0] for _ in range(5)]
        )

        os.environ["GEMMA_LOCAL_FAST_PATH"] = "on"
        try:
            fast_t = self.pairs({"fast": ours1}, reps)["fast"]
            row = self.add(
                section,
                "ours, fast path forced on (eager loop, no compile/graphs)",
                1,
                lambda: Row(section, "", 1, tok_s=tokens / fast_t, tokens=tokens),
            )
            row.ratios["x raw"] = t["raw"] / fast_t
            row.note = "informative: the fast path is CUDA-only by default"
        finally:
            os.environ.pop("GEMMA_LOCAL_FAST_PATH", None)
            fast_path.release(model)

        chat, messages = langchain_inputs(client, convos, n)
        b8 = self.pairs(
            {
                "batch": lambda: client.create_batch(convos, temperature=0, max_tokens=n),
                "seq": lambda: [client.create(c, temperature=0, max_tokens=n) for c in convos],
                "raw8": lambda: raw_generate(model, ids, n),
                "chat": lambda: chat.batch(messages),
            },
            max(1, reps // 2),
        )
        total = 8 * n
        raw8 = self.add(
            section,
            "raw generate",
            8,
            lambda: Row(section, "", 8, tok_s=total / b8["raw8"], tokens=total),
        )
        seq = self.add(
            section,
            "ours: 8 sequential create()",
            1,
            lambda: Row(section, "", 1, tok_s=total / b8["seq"], tokens=total),
        )
        batch = self.add(
            section,
            "ours: create_batch(8)",
            8,
            lambda: Row(section, "", 8, tok_s=total / b8["batch"], tokens=total),
        )
        batch.ratios["x sequential"] = b8["seq"] / b8["batch"]
        batch.ratios["x raw"] = b8["raw8"] / b8["batch"]
        self.chat_batch_row(section, chat, messages, b8, total)
        del raw8, seq

        fp32 = GemmaTransformersChatCompletion(
            str(path), device_map="cpu", torch_dtype="float32"
        ).load()
        t32 = self.pairs(
            {
                "ours": lambda: fp32.create(convos[0], temperature=0, max_tokens=n),
                "raw": lambda: raw_generate(fp32.model, ids[:1], n),
            },
            reps,
        )
        section32 = section.rsplit(",", 1)[0] + ", float32"
        self.add(
            section32,
            "raw generate",
            1,
            lambda: Row(section32, "", 1, tok_s=n / t32["raw"], tokens=n),
        )
        r = self.add(
            section32,
            "ours: create()",
            1,
            lambda: Row(section32, "", 1, tok_s=n / t32["ours"], tokens=n),
        )
        r.ratios["x raw"] = t32["raw"] / t32["ours"]
        r.ratios["x raw in CPU time"] = self.cpu["raw"] / self.cpu["ours"]
        fp32.close()

        self.langchain(client, model, path, convos[0], n)
        client.close()
        self.mlx(path, convos, n)
        self.write()

    def chat_batch_row(
        self, section: str, chat: Any, messages: list[Any], t: dict[str, float], total: int
    ) -> None:
        """The ``ChatGemmaLocal.batch()`` row of a batch section (``t``: :meth:`pairs`' times)."""
        tokens = sum(m.usage_metadata["output_tokens"] for m in chat.batch(messages))
        row = self.add(
            section,
            f"ours: ChatGemmaLocal.batch({len(messages)})",
            len(messages),
            lambda: Row(section, "", len(messages), tok_s=tokens / t["chat"], tokens=tokens),
        )
        row.ratios["x sequential"] = t["seq"] / t["chat"] * tokens / total
        row.ratios["x create_batch()"] = t["batch"] / t["chat"] * tokens / total

    def langchain(self, client: Any, model: Any, path: Path, convo: Any, n: int) -> None:
        section = "LangChain layer (transformers, same model and prompt)"
        reps = self.args.repeats
        try:
            ours, (messages,) = langchain_inputs(client, [convo], n)
        except ImportError as exc:
            self.rows.append(Row(section, "LangChain", 1, note=f"skipped: {exc}"))
            return
        fns: dict[str, Callable[[], Any]] = {"ours": lambda: ours.invoke(messages)}
        notes = {}
        try:
            hf = chat_huggingface(model, client.tokenizer, str(path), n)
            fns["hf"] = lambda: hf.invoke(messages)
        except Exception as exc:
            notes["hf"] = f"skipped: {type(exc).__name__}: {exc}"
        t = self.pairs(fns, reps)
        cpu = self.cpu
        counts = {"ours": fns["ours"]().usage_metadata["output_tokens"]}
        if "hf" in fns:
            # The pipeline returns text only; greedy with the end ids zeroed always runs
            # to max_new_tokens (ChatGemmaLocal's usage confirms the same count).
            counts["hf"] = n
        for key, name in (
            ("hf", "ChatHuggingFace(HuggingFacePipeline)"),
            ("ours", "ChatGemmaLocal"),
        ):
            if key in t:
                row = self.add(
                    section,
                    name,
                    1,
                    lambda key=key: Row(
                        section, "", 1, tok_s=counts[key] / t[key], tokens=counts[key]
                    ),
                )
                if key == "ours" and "hf" in t:
                    row.ratios["x ChatHuggingFace"] = (counts["ours"] / t["ours"]) / (
                        counts["hf"] / t["hf"]
                    )
                    row.ratios["x ChatHuggingFace in CPU time"] = (counts["ours"] / cpu["ours"]) / (
                        counts["hf"] / cpu["hf"]
                    )
            else:
                self.rows.append(Row(section, name, 1, note=notes.get(key, "")))

    def mlx(self, path: Path, convos: list[Any], n: int) -> None:
        section = "MLX (mlx[cpu]), same checkpoint (bf16)"
        reps = self.args.repeats
        try:
            from mlx_lm import batch_generate, load, stream_generate
            from mlx_lm.sample_utils import make_sampler

            from core import GemmaMLXChatCompletion
            from core.accel import usable_cores
        except Exception as exc:
            self.rows.append(Row(section, "MLX", 1, note=f"skipped: {type(exc).__name__}: {exc}"))
            return
        client = GemmaMLXChatCompletion(str(path)).load()
        ids = prompt_ids(client, convos)
        model, wrapper = load(str(path))
        sampler = make_sampler(temp=0.0)

        def raw() -> int:
            count = 0
            for _ in stream_generate(model, wrapper, ids[0], max_tokens=n, sampler=sampler):
                count += 1
            return count

        def ours() -> Any:
            return client.create(convos[0], temperature=0, max_tokens=n)

        t = self.pairs({"ours": ours, "raw": raw}, reps)
        cpu = self.cpu
        raw_tokens = raw()
        tokens = ours()["usage"]["completion_tokens"]
        raw_row = self.add(
            section,
            "raw mlx_lm.stream_generate",
            1,
            lambda: Row(section, "", 1, tok_s=raw_tokens / t["raw"], tokens=raw_tokens),
        )

        def raw_first() -> float:
            start = time.perf_counter()
            steps = stream_generate(model, wrapper, ids[0], max_tokens=n, sampler=sampler)
            next(steps)
            elapsed = time.perf_counter() - start
            for _ in steps:
                pass
            return elapsed

        raw_row.ttft_ms = 1000 * median([raw_first() for _ in range(3)])
        row = self.add(
            section,
            "ours: create()",
            1,
            lambda: Row(section, "", 1, tok_s=tokens / t["ours"], tokens=tokens),
        )
        row.ratios["x raw"] = (tokens / t["ours"]) / (raw_tokens / t["raw"])
        row.ratios["x raw in CPU time"] = (tokens / cpu["ours"]) / (raw_tokens / cpu["raw"])
        row.ttft_ms = 1000 * median([first_token_seconds(client, convos[0]) for _ in range(3)])
        one_stream = GemmaMLXChatCompletion(str(path), cpu_streams=1).load()

        def raw_batch() -> int:
            result = batch_generate(
                model, wrapper, ids, max_tokens=n, sampler=sampler, return_token_ids=True
            )
            return sum(len(t) for t in result.token_ids)

        chat, messages = langchain_inputs(client, convos, n)
        # Interleaved repeats (the machine may be shared): each is ~1 minute on 2 cores.
        b = self.pairs(
            {
                "batch": lambda: client.create_batch(convos, temperature=0, max_tokens=n),
                "seq": lambda: [client.create(c, temperature=0, max_tokens=n) for c in convos],
                "raw8": raw_batch,
                "one": lambda: one_stream.create_batch(convos, temperature=0, max_tokens=n),
                "chat": lambda: chat.batch(messages),
            },
            max(1, reps // 3),
        )
        total = 8 * n
        raw8_tokens = raw_batch()
        self.add(
            section,
            "ours: 8 sequential create()",
            1,
            lambda: Row(section, "", 1, tok_s=total / b["seq"], tokens=total),
        )
        raw8 = self.add(
            section,
            "raw mlx_lm.batch_generate(8)",
            8,
            lambda: Row(section, "", 8, tok_s=raw8_tokens / b["raw8"], tokens=raw8_tokens),
        )
        raw8.ratios["x sequential"] = b["seq"] / b["raw8"] * raw8_tokens / total
        row = self.add(
            section,
            "ours: create_batch(8), cpu_streams=1",
            8,
            lambda: Row(section, "", 8, tok_s=total / b["one"], tokens=total),
        )
        row.ratios["x sequential"] = b["seq"] / b["one"]
        row.ratios["x raw"] = b["raw8"] / b["one"] * total / raw8_tokens
        row.note = "the whole batch on one MLX stream (one core)"
        row = self.add(
            section,
            "ours: create_batch(8)",
            8,
            lambda: Row(section, "", 8, tok_s=total / b["batch"], tokens=total),
        )
        row.ratios["x sequential"] = b["seq"] / b["batch"]
        row.ratios["x raw"] = b["raw8"] / b["batch"] * total / raw8_tokens
        row.note = f"default cpu_streams: {usable_cores()} streams (one per core)"
        self.chat_batch_row(section, chat, messages, b, total)
        one_stream.close()
        client.close()

    def write(self) -> None:
        import torch
        import transformers

        cpu = platform.processor() or platform.machine()
        try:
            name = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            name = cpu
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
        try:
            import mlx.core as mx
            import mlx_lm

            versions += f", mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}"
        except Exception:
            pass
        machine = f"{name}, {os.cpu_count()} cores; {versions}, Python {platform.python_version()}"
        write_results(self.args, "cpu", machine, self.rows, self.checks)


# ------------------------------------------------------------------ output


def fmt(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += [
                "",
                f"**{section}**",
                "",
                "| run | batch | tok/s | TTFT ms | peak GB | first call s | ratios | note |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
            ]
        ratios = ", ".join(f"{v:.2f} {k}" for k, v in row.ratios.items())
        lines.append(
            f"| {row.name} | {row.batch} | {fmt(row.tok_s, 1)} | {fmt(row.ttft_ms, 1)} | "
            f"{fmt(row.peak_gb, 2)} | {fmt(row.first_call_s, 1)} | {ratios} | {row.note} |"
        )
    return "\n".join(lines)


def write_results(
    args: argparse.Namespace, device: str, machine: str, rows: list[Row], checks: list[str]
) -> None:
    command = "python " + " ".join(
        [
            str(
                Path(sys.argv[0]).relative_to(ROOT)
                if Path(sys.argv[0]).is_absolute()
                else sys.argv[0]
            ),
            *sys.argv[1:],
        ]
    )
    body = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Machine: {machine}",
            "",
            f"Workload: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy; "
            f"tok/s = generated tokens / wall time of the call (median of {args.repeats}).",
            table(rows),
        ]
        + (["", "Checks:", "", *[f"- {c}" for c in checks]] if checks else [])
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-{device}.md").write_text(body + "\n")
    (out / f"results-{device}.json").write_text(
        json.dumps(
            {"machine": machine, "rows": [asdict(r) for r in rows], "checks": checks}, indent=1
        )
    )
    print("\n" + body, flush=True)
    if args.update:
        update_results(Path(args.update), device, body)


def update_results(file: Path, device: str, body: str) -> None:
    start, end = f"<!-- bench:{device} -->", f"<!-- /bench:{device} -->"
    text = file.read_text() if file.exists() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    file.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("device", choices=["gpu", "cpu"])
    parser.add_argument(
        "--shapes",
        default="1b,12b",
        help=f"GPU shapes, comma separated ({', '.join(SHAPES)})",
    )
    parser.add_argument("--batches", default="1,16", help="GPU batch sizes")
    parser.add_argument("--nf4", action="store_true", help="also the 12b shape in bitsandbytes NF4")
    parser.add_argument(
        "--nf4-raw-tokens", type=int, default=64, help="new tokens of the slow raw NF4 rows"
    )
    parser.add_argument("--check", action="store_true", help="float32 greedy-equality check first")
    parser.add_argument(
        "--record", action="store_true", help="compare bf16 greedy tokens with generate"
    )
    parser.add_argument(
        "--variants", action="store_true", help="1b fast-path variants (no fusion, no compile)"
    )
    parser.add_argument(
        "--skip-static", action="store_true", help="leave out the static+compile rows"
    )
    parser.add_argument("--seq-calls", default="1b=16,12b=4", help="sequential calls per shape")
    parser.add_argument("--ours-only", default="", help="shapes measured without the raw rows")
    parser.add_argument("--raw-only", action="store_true", help="only the raw rows")
    parser.add_argument("--nf4-batches", default="1,16", help="NF4 batch sizes")
    parser.add_argument(
        "--concurrent", type=int, default=0, help="threads of the continuous-batching rows"
    )
    parser.add_argument(
        "--prefix-tokens",
        type=int,
        default=0,
        help="the multi-turn prefix-reuse row: turn 5 with a shared prefix of this many tokens",
    )
    parser.add_argument(
        "--constrained",
        default="",
        help="batch sizes of the tools / JSON rows against unconstrained (e.g. 1,16)",
    )
    parser.add_argument("--profile", action="store_true", help="kernel profile of one bs1 step")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "gemma-local-bench"),
        help="folder for results-<device>.md/.json and logs",
    )
    parser.add_argument("--update", default=None, help="RESULTS.md to update in place")
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="per shape, first: the first create() on the fresh model against generate's first call",
    )
    parser.add_argument(
        "--cold-first",
        choices=["ours", "raw"],
        default="ours",
        help="which of the cold-start rows runs first (and pays the process's CUDA warm-up): "
        "one process each for a fair pair",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"gpu: on the CPU, shapes {', '.join(DRY_RUN_SHAPES)} only (default tiny)",
    )
    args = parser.parse_args()
    if args.dry_run and args.shapes == parser.get_default("shapes"):
        args.shapes = "tiny"
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if args.device == "gpu" and args.dry_run:
        big = [s for s in args.shapes if s not in DRY_RUN_SHAPES]
        if big:
            parser.error(f"--dry-run runs {', '.join(DRY_RUN_SHAPES)} only, not {big}")
    args.batches = [int(b) for b in args.batches.split(",") if b]  # "": NF4 rows only
    args.nf4_batches = [int(b) for b in args.nf4_batches.split(",")]
    args.constrained_batches = [int(b) for b in args.constrained.split(",") if b]
    args.ours_only = [s for s in args.ours_only.split(",") if s]
    args.seq_calls = {
        k: int(v) for k, v in (kv.split("=") for kv in args.seq_calls.split(",") if kv)
    }
    if args.new_tokens is None:
        args.new_tokens = 256 if args.device == "gpu" else 128
    if args.repeats is None:
        args.repeats = 2 if args.device == "gpu" else 5
    bench = GpuBench(args) if args.device == "gpu" else CpuBench(args)
    bench.run()


if __name__ == "__main__":
    main()
