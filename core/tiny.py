"""Tiny random-weight Gemma checkpoints, built offline.

Tests (and anyone without access to the model hub) use these to exercise the
real loading code: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``,
``mlx_lm.load``, ``mlx_lm.convert`` and bitsandbytes 4-bit loading.  Nothing here
downloads anything.

The checkpoints mimic the real Gemma releases where it matters to a loader:

* the tokenizer is a Gemma-style BPE (``GemmaTokenizer``: spaces become ``▁``,
  byte fallback, the same normalizer / decoder as the real ``tokenizer.json``)
  with the special tokens at Gemma's real ids (``<pad>`` 0, ``<eos>`` 1,
  ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4, ``<start_of_turn>`` 105,
  ``<end_of_turn>`` 106), a post-processor that prepends ``<bos>``, and the
  real chat template.  Characters outside a small alphabet (CJK, emoji) are
  encoded one token per UTF-8 byte, so streaming detokenizers see split
  multi-byte characters;
* ``config.json`` comes from the real transformers config classes, plus the
  keys the hub checkpoints carry and mlx-lm reads but transformers 5 no longer
  writes (see :func:`_patch_config_json`);
* ``generation_config.json`` stops on ``[<eos>, <end_of_turn>]`` like Gemma 3.

Gemma 4 (:data:`GEMMA4_ARCHS`) and Gemma 3n follow their own releases:

* ``gemma4_text``: dense and E-like (gemma-4-E2B/E4B): per-layer embeddings,
  the last two of four layers KV-shared with a double-wide MLP, a global
  (full-attention) head dim twice the sliding one, proportional RoPE;
  ``gemma4_moe``: ``model_type`` ``gemma4_text`` with ``enable_moe_block`` (32
  experts, top 4) and ``attention_k_eq_v`` with one global KV head (like
  26B-A4B / 31B); ``gemma4``: the multimodal ``Gemma4ForConditionalGeneration``
  (a one-layer vision tower, no audio tower, no processor yet) used for text;
* the Gemma 4 tokenizer has every control token at its real id
  (:data:`GEMMA4_SPECIAL_TOKENS`), the media tokens at the last ids,
  ``add_bos_token`` false and left padding, and the real Gemma 4 template;
  generation stops on ``[<eos>, <turn|>, <|tool_response>]``;
* ``gemma3n`` is laid out like the real (multimodal) Gemma 3n checkpoints but
  holds text weights only: mlx-lm loads it, transformers loads it with
  ``Gemma3nForCausalLM`` (``AutoModelForCausalLM`` builds the full model,
  whose vision tower needs ``timm``).  Gemma 3 tokenizer, template and stop ids;
* their ``config.json`` writes every field mlx-lm reads, because mlx-lm's
  defaults are those of the real models (see :func:`_patch_gemma4_text`).

Heavy libraries (torch, transformers, tokenizers) are imported lazily, inside
the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

#: Gemma 1/2/3 checkpoints (Gemma 3 tokenizer and token ids).
GEMMA3_ARCHS = ("gemma3_text", "gemma3", "gemma2", "gemma")
#: Gemma 4 checkpoints (Gemma 4 tokenizer, control tokens and template):
#: ``gemma4_text`` dense E-like, ``gemma4_moe`` (model_type ``gemma4_text`` with
#: ``enable_moe_block``) and the multimodal ``gemma4``.
GEMMA4_ARCHS = ("gemma4_text", "gemma4_moe", "gemma4")
ARCHS = (*GEMMA3_ARCHS, *GEMMA4_ARCHS, "gemma3n")

#: Special tokens at the ids they have in the real Gemma tokenizers.
SPECIAL_TOKENS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
}
#: Image tokens of the multimodal ("gemma3") checkpoint; they take the last
#: three ids of the vocabulary (the real ones sit near the end too).
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
#: Stop tokens written to generation_config.json (``<eos>``, ``<end_of_turn>``).
EOS_TOKEN_IDS = (1, 106)

#: Gemma 4's control tokens at their real ids (all special).
GEMMA4_SPECIAL_TOKENS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
}
#: Gemma 4's media tokens, in the order of their real ids (255999, 256000,
#: 258880-258884); they take the last ids of the tiny vocabulary.
GEMMA4_MEDIA_TOKENS = (
    "<|image>",
    "<|audio>",
    "<|image|>",
    "<|audio|>",
    "<image|>",
    "<audio|>",
    "<|video|>",
)
#: The named special tokens of the real Gemma 4 tokenizer_config.json
#: (``tokenizer.image_token``, ``.soc_token`` ...; Gemma4Processor reads some).
GEMMA4_NAMED_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
#: Gemma 4's stop tokens: ``<eos>``, ``<turn|>`` and ``<|tool_response>`` (the
#: model writes it after a tool call and waits for the result).
GEMMA4_EOS_TOKEN_IDS = (1, 106, 50)

#: Vision tower of the multimodal checkpoint: 64 px images in 16 px patches
#: (4 x 4 patches), average-pooled 2 x 2 into MM_TOKENS_PER_IMAGE soft tokens.
IMAGE_SIZE = 64
PATCH_SIZE = 16
MM_TOKENS_PER_IMAGE = 4

_NAMED = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
_TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_templates"
_TEMPLATE_FILES = {
    "gemma3_text": "gemma3_chat_template.jinja",
    "gemma3": "gemma3_chat_template.jinja",
    "gemma2": "gemma2_chat_template.jinja",
    "gemma": "gemma2_chat_template.jinja",
    "gemma4_text": "gemma4_chat_template.jinja",
    "gemma4_moe": "gemma4_chat_template.jinja",
    "gemma4": "gemma4_chat_template.jinja",
    # Gemma 3n uses the Gemma 3 template and token ids.
    "gemma3n": "gemma3_chat_template.jinja",
}
_DTYPES = ("float32", "bfloat16", "float16")
#: Default model dimensions per arch (build_tiny_checkpoint's keyword arguments).
_GEMMA3_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)
_DIMS = {
    **dict.fromkeys(GEMMA3_ARCHS, _GEMMA3_DIMS),
    # E-like: 4 layers (sliding, full, sliding, full), the last 2 KV-shared.
    "gemma4_text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
    "gemma4": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
    # 26B-A4B-like: 3 layers (sliding, sliding, full), MoE block in every layer.
    "gemma4_moe": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # E-like Gemma 3n: 4 layers (sliding, full, sliding, full), the last 2 KV-shared.
    "gemma3n": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
}
# Gemma 4 specifics (see _make_gemma4_config).  The real models: head_dim 256,
# global_head_dim 512, per-layer input 256, sliding window 512 (E) / 1024.
_GEMMA4_GLOBAL_HEAD_DIM = {"gemma4_text": 64, "gemma4": 64, "gemma4_moe": 32}
_GEMMA4_SLIDING_WINDOW = 512
_GEMMA4_SOFTCAP = 30.0
_GEMMA4_PER_LAYER_INPUT = 64  # E models' hidden_size_per_layer_input (bnb needs %64)
_GEMMA4_KV_SHARED = 2
# 32 experts (real: 128, top 8): the fewest for which bitsandbytes' CPU 4-bit
# kernel can pack router.proj (it needs out_features % 32 == 0).
_GEMMA4_NUM_EXPERTS = 32
_GEMMA4_TOP_K = 4
_GEMMA4_MOE_INTERMEDIATE = 64  # expert width (real 704); MLX 4-bit needs %64
_GEMMA4_GLOBAL_KV_HEADS = 1
_GEMMA4_VISION_POSITIONS = 64  # patch positions per side (real: 10240)
# Gemma 3: every 2nd layer global (the real models use 6; with 2 tiny layers
# that would make every layer local).
_SLIDING_WINDOW_PATTERN = 2
_GEMMA3_SLIDING_WINDOW = 512
_GEMMA2_SLIDING_WINDOW = 4096  # mlx-lm's gemma2 has no sliding window at all
_ROPE_GLOBAL = 1_000_000.0
_ROPE_LOCAL = 10_000.0
# Default init std per arch.  Gemma 1 has no post-attention / post-MLP norms,
# so with std 0.02 the (scaled) token embedding dominates the residual stream
# and greedy decoding just repeats the last prompt token; 0.2 gives varied output.
_INIT_STD = {
    "gemma3_text": 0.02,
    "gemma3": 0.02,
    "gemma2": 0.02,
    "gemma": 0.2,
    "gemma4_text": 0.02,
    "gemma4_moe": 0.02,
    "gemma4": 0.02,
    "gemma3n": 0.05,  # 0.02 decodes greedily into one repeated token
}
# Gemma 2 has no q/k RMSNorm (Gemma 3 does): with std 0.02 its attention is
# nearly uniform and greedy decoding repeats one token.  Scaling q_proj and
# k_proj gives sharp attention (and large enough scores to exercise the
# attn_logit_softcapping of 50).
_QK_GAIN = {"gemma2": 10.0}

# Plain text for training the tiny BPE.  Only _ALPHABET gets single-character
# tokens; everything else (CJK, emoji) goes through byte fallback.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog was not amused.
Hello world! How are you today? I am fine, thank you. And you?
Once upon a time there was a small model that lived on a laptop.
It could not remember much, but it tried very hard to answer every question.
Write a short poem about the sea. The sea is wide and the sea is deep.
What is the capital of France? The capital of France is Paris.
Please summarize the following text in one sentence.
Translate to French: good morning, my friend. Bonjour, mon ami.
Un café, s'il vous plaît. C'est un peu naïve, mais très élégant.
Where is the station? Go straight ahead and then turn left at the corner.
def main():
    print("hello, world")
    return 0

for i in range(10):
    total = total + i * 2
The numbers are 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 and 1,000,000.
User: can you help me with my homework? Model: of course, what is the problem?
Thinking step by step, the answer is that the model generates one token at a time.
Streaming output shows each new token as soon as it has been generated.
The conversation continues with another question and another answer.
"""
_ALPHABET = [chr(c) for c in range(32, 127)] + ["\n", "\t", "▁"] + list("éèêàçïîôüñöäß")


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def chat_template(arch: str) -> str:
    """The real Gemma chat template for ``arch`` (the packaged copy)."""
    _check_arch(arch)
    return (_TEMPLATE_DIR / _TEMPLATE_FILES[arch]).read_text(encoding="utf-8")


def is_gemma4(arch: str) -> bool:
    """Whether ``arch`` uses the Gemma 4 tokenizer, template and stop ids."""
    return arch in GEMMA4_ARCHS


def eos_token_ids(arch: str) -> tuple[int, ...]:
    """The ``eos_token_id`` list of the checkpoint's generation_config.json."""
    _check_arch(arch)
    return GEMMA4_EOS_TOKEN_IDS if is_gemma4(arch) else EOS_TOKEN_IDS


def special_token_ids(arch: str = "gemma3_text", vocab_size: int = 512) -> dict[str, int]:
    """Token string -> id for every special token of the tiny tokenizer."""
    _check_arch(arch)
    if is_gemma4(arch):
        ids = dict(GEMMA4_SPECIAL_TOKENS)
        for i, tok in enumerate(GEMMA4_MEDIA_TOKENS):
            ids[tok] = vocab_size - len(GEMMA4_MEDIA_TOKENS) + i
        return ids
    ids = dict(SPECIAL_TOKENS)
    if arch == "gemma3":
        for i, tok in enumerate(IMAGE_TOKENS):
            ids[tok] = vocab_size - len(IMAGE_TOKENS) + i
    return ids


# --------------------------------------------------------------------------
# tokenizer


def _train_pieces(n_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train a tiny BPE on _CORPUS; return (pieces in id order, merges)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=n_pieces,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=_ALPHABET,
        limit_alphabet=len(_ALPHABET),
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 2, trainer)
    model = json.loads(tok.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].__getitem__)[:n_pieces]
    kept = set(pieces)
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:
            merges.append((a, b))
    return pieces, merges


def _make_tokenizer(arch: str, vocab_size: int):
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    specials = special_token_ids(arch, vocab_size)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_pieces = vocab_size - len(specials) - len(byte_tokens)
    if n_pieces < len(_ALPHABET):
        raise ValueError(
            f"vocab_size={vocab_size} is too small for arch {arch!r}: need at least "
            f"{len(specials) + len(byte_tokens) + len(_ALPHABET)}"
        )
    pieces, merges = _train_pieces(n_pieces)
    # If the corpus supports fewer merges, pad like the real Gemma vocabulary
    # does, with <unusedN> placeholders (never produced by encoding).
    pieces += [f"<unused{i}>" for i in range(n_pieces - len(pieces))]

    by_id = {i: t for t, i in specials.items()}
    normal = iter(pieces + byte_tokens)
    vocab = {by_id[i] if i in by_id else next(normal): i for i in range(vocab_size)}
    if len(vocab) != vocab_size:
        raise AssertionError("duplicate token in the tiny vocabulary")

    kwargs: dict = {}
    if is_gemma4(arch):
        # As the real Gemma 4 tokenizer: no BOS added (the template writes it),
        # left padding, the control tokens named.
        kwargs["extra_special_tokens"] = dict(GEMMA4_NAMED_TOKENS)
        kwargs["padding_side"] = "left"
    elif arch == "gemma3":
        # Named like the real Gemma 3 tokenizer_config.json, so that
        # tokenizer.boi_token / .eoi_token / .image_token(_id) exist (the
        # Gemma3Processor needs them).
        kwargs["extra_special_tokens"] = dict(
            zip(("boi_token", "eoi_token", "image_token"), IMAGE_TOKENS, strict=True)
        )
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=not is_gemma4(arch),
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    # Every special token as a special added token at its vocabulary id (as in
    # the real tokenizer.json): never split, skipped by skip_special_tokens.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.chat_template = chat_template(arch)
    if len(tok) != vocab_size:
        raise AssertionError(f"tiny tokenizer has {len(tok)} tokens, expected {vocab_size}")
    return tok


def build_tokenizer(path, *, arch: str = "gemma3_text", vocab_size: int = 512) -> None:
    """Save a small Gemma-style tokenizer into ``path``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with the chat
    template in it, as the original hub checkpoints have it),
    ``chat_template.jinja`` (where transformers 5 puts it) and
    ``special_tokens_map.json``.  The vocabulary has exactly ``vocab_size``
    entries, so it matches the embedding size.

    For the Gemma 4 archs (:data:`GEMMA4_ARCHS`) it is a Gemma 4 tokenizer:
    every control token of :data:`GEMMA4_SPECIAL_TOKENS` at its real id, the
    media tokens at the last ids, ``add_bos_token`` false (the Gemma 4
    template writes ``<bos>``), left padding and the Gemma 4 chat template.
    """
    _check_arch(arch)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _make_tokenizer(arch, vocab_size)
    tok.save_pretrained(str(path))

    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["chat_template"] = chat_template(arch)
    # Explicit, as in the real tokenizer_config.json; transformers 5 rebuilds
    # the "<bos> $A" post-processor from these flags.
    cfg["add_bos_token"] = not is_gemma4(arch)
    cfg["add_eos_token"] = False
    if is_gemma4(arch):
        cfg["padding_side"] = "left"
        # The real file lists <|video|> here (it has no named slot).
        cfg["extra_special_tokens"] = ["<|video|>"]
        cfg.update(GEMMA4_NAMED_TOKENS)
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # transformers 5 no longer writes it; older loaders still read it.
    stm: dict[str, str | list[str]] = {f"{t[1:-1]}_token": t for t in _NAMED}
    stm["additional_special_tokens"] = [
        t for t in special_token_ids(arch, vocab_size) if t not in _NAMED
    ]
    (path / "special_tokens_map.json").write_text(
        json.dumps(stm, indent=2) + "\n", encoding="utf-8"
    )


def _save_processor(path: Path, tokenizer) -> None:
    """Image processor + Gemma3Processor for the multimodal checkpoint."""
    # The PIL backend: the default Gemma3ImageProcessor needs torchvision.
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    processor.save_pretrained(str(path))


# --------------------------------------------------------------------------
# model


def _sliding_window_pattern(num_layers: int) -> int:
    # mlx-lm indexes the cache list with sliding_window_pattern - 1, so the
    # pattern may not exceed the number of layers (1 layer -> 1 global layer).
    return min(_SLIDING_WINDOW_PATTERN, num_layers)


def _layer_types(n: int, pattern: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _make_config(arch: str, vocab_size: int, **dims):
    from transformers import (
        Gemma2Config,
        Gemma3Config,
        Gemma3TextConfig,
        GemmaConfig,
        SiglipVisionConfig,
    )

    n = dims["num_hidden_layers"]
    common = dict(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        **dims,
    )
    if arch == "gemma":
        # mlx-lm's gemma.py uses exact (erf) GELU, transformers forces the tanh
        # approximation for Gemma 1 (it rewrites hidden_act="gelu" too): the
        # one difference between the two that no config field can remove.
        return GemmaConfig(
            hidden_act="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_LOCAL},
            **common,
        )
    if arch == "gemma2":
        return Gemma2Config(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=dims["head_dim"],
            sliding_window=_GEMMA2_SLIDING_WINDOW,
            layer_types=_layer_types(n, 2),
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_LOCAL},
            **common,
        )
    text = Gemma3TextConfig(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=dims["head_dim"],
        sliding_window=_GEMMA3_SLIDING_WINDOW,
        # The legacy int; transformers keeps it only as "_sliding_window_pattern".
        sliding_window_pattern=_sliding_window_pattern(n),
        layer_types=_layer_types(n, _sliding_window_pattern(n)),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": _ROPE_GLOBAL},
            "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_LOCAL},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        **common,
    )
    if arch == "gemma3_text":
        return text
    ids = special_token_ids(arch, vocab_size)
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
        initializer_range=dims["initializer_range"],
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        initializer_range=dims["initializer_range"],
        tie_word_embeddings=True,
    )


def _gemma4_layer_types(arch: str, n: int) -> list[str]:
    # E-like: alternate (the KV-shared tail needs both kinds before it);
    # MoE: full attention every 3rd layer.  The last layer is always full.
    pattern = 3 if arch == "gemma4_moe" else 2
    return _layer_types(n, min(pattern, n))


def _gemma4_text_config(arch: str, vocab_size: int, **dims):
    """A Gemma4TextConfig with every field explicit (mlx-lm's defaults differ)."""
    from transformers import Gemma4TextConfig

    n = dims["num_hidden_layers"]
    moe = arch == "gemma4_moe"
    per_layer = 0 if moe else _GEMMA4_PER_LAYER_INPUT
    shared = 0 if moe else min(_GEMMA4_KV_SHARED, max(n - 2, 0))
    return Gemma4TextConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=_GEMMA4_SLIDING_WINDOW,
        layer_types=_gemma4_layer_types(arch, n),
        rope_parameters={
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": _ROPE_GLOBAL,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_LOCAL},
        },
        final_logit_softcapping=_GEMMA4_SOFTCAP,
        attention_bias=False,
        # per-layer embeddings (E models)
        hidden_size_per_layer_input=per_layer,
        vocab_size_per_layer_input=vocab_size,
        # KV sharing and the double-wide MLP of the KV-shared layers (E models)
        num_kv_shared_layers=shared,
        use_double_wide_mlp=not moe,
        # MoE + K=V global attention (26B-A4B / 31B)
        enable_moe_block=moe,
        num_experts=_GEMMA4_NUM_EXPERTS if moe else None,
        top_k_experts=_GEMMA4_TOP_K if moe else None,
        moe_intermediate_size=_GEMMA4_MOE_INTERMEDIATE if moe else None,
        attention_k_eq_v=moe,
        global_head_dim=_GEMMA4_GLOBAL_HEAD_DIM[arch],
        num_global_key_value_heads=_GEMMA4_GLOBAL_KV_HEADS if moe else None,
        **dims,
    )


def _make_gemma4_config(arch: str, vocab_size: int, **dims):
    if arch != "gemma4":
        return _gemma4_text_config(arch, vocab_size, **dims)
    from transformers import Gemma4Config, Gemma4VisionConfig

    ids = special_token_ids(arch, vocab_size)
    # A one-layer vision tower (the real E2B's: 16 layers, hidden 768): cheap,
    # so the checkpoint has the real layout; mlx-lm drops it on load.  No
    # audio tower.
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        patch_size=PATCH_SIZE,
        pooling_kernel_size=2,
        position_embedding_size=_GEMMA4_VISION_POSITIONS,
        use_clipped_linears=False,
        standardize=False,
        initializer_range=dims["initializer_range"],
    )
    return Gemma4Config(
        text_config=_gemma4_text_config(arch, vocab_size, **dims),
        vision_config=vision,
        audio_config=None,
        boi_token_id=ids["<|image>"],
        eoi_token_id=ids["<image|>"],
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        boa_token_id=ids["<|audio>"],
        eoa_token_index=ids["<audio|>"],
        audio_token_id=ids["<|audio|>"],
        initializer_range=dims["initializer_range"],
        tie_word_embeddings=True,
    )


def _patch_config_json(path: Path, arch: str, dtype: str, vocab_size: int) -> None:
    """Write the keys real hub configs carry and mlx-lm reads, but transformers 5 omits.

    mlx-lm builds its ModelArgs from config.json with its *own* defaults for
    missing keys, and several differ from transformers' (gemma3_text:
    sliding_window_pattern 6 -- with 2 layers that even crashes --, gemma2:
    query_pre_attn_scalar 144, gemma3: top-level vocab_size 262208), so every
    field that matters is written out explicitly.
    """
    file = path / "config.json"
    cfg = json.loads(file.read_text(encoding="utf-8"))
    cfg["torch_dtype"] = dtype  # pre-v5 key; mlx_lm.convert reads only this one
    text = cfg.get("text_config", cfg)
    if arch == "gemma3":
        cfg["vocab_size"] = vocab_size  # mlx-lm copies it into text_config
        text["torch_dtype"] = dtype
    if arch in ("gemma3", "gemma3_text"):
        text.pop("_sliding_window_pattern", None)
        text["sliding_window_pattern"] = _sliding_window_pattern(text["num_hidden_layers"])
        text["rope_theta"] = _ROPE_GLOBAL
        text["rope_local_base_freq"] = _ROPE_LOCAL
        text["rope_scaling"] = None
    elif is_gemma4(arch):
        _patch_gemma4_text(text)
        if arch == "gemma4":
            cfg["vocab_size"] = vocab_size  # mlx-lm copies it into text_config
            text["torch_dtype"] = dtype
    elif arch == "gemma3n":
        # mlx-lm's gemma3n TextConfig has these as required fields.
        text["rope_theta"] = _ROPE_GLOBAL
        text["rope_local_base_freq"] = _ROPE_LOCAL
        text["rope_scaling"] = None
        text["torch_dtype"] = dtype
    else:
        text["rope_theta"] = _ROPE_LOCAL
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _make_gemma3n_config(vocab_size: int, **dims):
    """The text config of the tiny Gemma 3n (E-like), every field explicit."""
    from transformers import Gemma3nTextConfig

    n = dims["num_hidden_layers"]
    return Gemma3nTextConfig(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=_GEMMA4_SLIDING_WINDOW,
        layer_types=_layer_types(n, min(2, n)),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": _ROPE_GLOBAL},
            "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_LOCAL},
        },
        final_logit_softcapping=_GEMMA4_SOFTCAP,
        hidden_size_per_layer_input=_GEMMA4_PER_LAYER_INPUT,
        num_kv_shared_layers=min(_GEMMA4_KV_SHARED, max(n - 2, 0)),
        # The real E2B/E4B: the first 10 layers keep the top 5% of the gate
        # activations (gelu_topk); here the first layer.
        activation_sparsity_pattern=[0.95] + [0.0] * (n - 1),
        altup_num_inputs=4,
        altup_active_idx=0,
        altup_coef_clip=120.0,
        altup_correct_scale=True,
        laurel_rank=64,
        attention_bias=False,
        **dims,
    )


def _save_gemma3n(path: Path, model, dtype: str) -> None:
    """Save a Gemma3nForCausalLM as the real (multimodal) Gemma 3n checkpoints are laid out.

    ``config.json`` is a ``gemma3n`` config (text + the default vision / audio
    configs; no tower weights: this checkpoint is for text), the weights sit
    under ``model.language_model.``, and the KV-shared layers keep their own
    (unused) k/v projections and k-norm as in the published files: mlx-lm's
    gemma3n loads them strictly, transformers ignores them.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nVisionConfig

    text = model.config
    gen = torch.Generator().manual_seed(1234)
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        weights["model.language_model." + name.removeprefix("model.")] = tensor
    kv_dim = text.num_key_value_heads * text.head_dim
    for i, layer in enumerate(model.model.layers):
        if not layer.self_attn.is_kv_shared_layer:
            continue
        prefix = f"model.language_model.layers.{i}.self_attn."
        std = text.initializer_range
        for proj in ("k_proj", "v_proj"):
            w = torch.randn((kv_dim, text.hidden_size), generator=gen) * std
            weights[prefix + proj + ".weight"] = w.to(model.dtype)
        weights[prefix + "k_norm.weight"] = torch.ones(text.head_dim, dtype=model.dtype)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    # The media token ids keep their real values (outside the tiny vocabulary,
    # like the towers' vocab_offset): this checkpoint is for text.
    config = Gemma3nConfig(
        text_config=text,
        vision_config=Gemma3nVisionConfig(),
        audio_config=Gemma3nAudioConfig(),
        initializer_range=text.initializer_range,
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma3nForConditionalGeneration"]
    config.dtype = dtype
    config.save_pretrained(str(path))


def _patch_gemma4_text(text: dict) -> None:
    """The Gemma 4 keys mlx-lm reads from the top of the text config.

    transformers keeps ``global_head_dim`` / ``num_global_key_value_heads`` only
    inside ``per_layer_config``; mlx-lm reads them from the top (defaults 512 /
    None), and derives nothing from ``per_layer_config``.
    """
    full = [o for o in text.get("per_layer_config", {}).values() if "head_dim" in o]
    text["global_head_dim"] = full[0]["head_dim"] if full else text["head_dim"]
    kv = {o.get("num_key_value_heads") for o in full} - {None}
    text["num_global_key_value_heads"] = kv.pop() if kv else None
    # Unused by mlx-lm when layer_types is given, but its default (5) would
    # describe another model; this is the tiny one's pattern.
    types = text["layer_types"]
    text["sliding_window_pattern"] = types.index("full_attention") + 1
    text["global_partial_rotary_factor"] = text["rope_parameters"]["full_attention"][
        "partial_rotary_factor"
    ]
    # The rest of mlx-lm's ModelArgs, explicit (the per-layer-type RoPE is in
    # rope_parameters; these two only describe it).
    text["partial_rotary_factor"] = 1.0
    text["rope_traditional"] = False


def build_tiny_checkpoint(
    path,
    arch: str = "gemma3_text",
    *,
    dtype: str = "float32",
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    initializer_range: float | None = None,
    norm_std: float | None = None,
) -> Path:
    """Build a random-weight Gemma checkpoint of ``arch`` in ``path``; return the path.

    ``arch`` is one of :data:`ARCHS`.  ``path`` is emptied first.  Writes
    ``config.json``, ``model.safetensors`` (``save_pretrained``),
    ``generation_config.json`` and the tokenizer files (and, for ``gemma3``,
    ``processor_config.json`` + the image processor).  The model dimensions
    default per arch (Gemma 1-3: hidden 128, 2 layers; Gemma 4 / 3n: hidden 64,
    3-4 layers); ``None`` means that default.  ``initializer_range`` is the std
    of the random Linear/Embedding weights (default per arch, see _INIT_STD);
    ``norm_std`` the spread of the random RMSNorm scales (default 1.0 for Gemma
    1-3, whose norms scale by ``1 + w`` with ``w`` ~ N(0, norm_std); 0.5 for
    Gemma 4 / 3n, whose norms scale by ``w`` ~ 1 + N(0, norm_std)).
    """
    _check_arch(arch)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    given = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
    )
    dims = {k: _DIMS[arch][k] if v is None else v for k, v in given.items()}
    if initializer_range is None:
        initializer_range = _INIT_STD[arch]
    scale_norms_by_w = arch not in GEMMA3_ARCHS  # Gemma 4 / 3n: x * w, not x * (1 + w)
    if norm_std is None:
        norm_std = 0.5 if scale_norms_by_w else 1.0
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)

    if is_gemma4(arch):
        config = _make_gemma4_config(
            arch,
            vocab_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            **dims,
        )
    elif arch == "gemma3n":
        config = _make_gemma3n_config(
            vocab_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            **dims,
        )
    else:
        config = _make_config(
            arch,
            vocab_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            **dims,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)

    def around_one(shape) -> torch.Tensor:
        return 1.0 + torch.randn(shape, generator=gen) * norm_std

    with torch.no_grad():
        for name, param in model.named_parameters():
            towers = "vision_tower" in name or "audio_tower" in name
            # Random norm scales make greedy decoding much less repetitive and
            # check that every backend applies the right scaling.
            if norm_std and name.endswith("norm.weight") and not towers:
                if scale_norms_by_w:
                    param.copy_(around_one(param.shape))
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * norm_std)
            # Ones by default: random, so that a backend that ignores them shows.
            elif name.endswith(("router.scale", "router.per_expert_scale", "correct_output_scale")):
                param.copy_(around_one(param.shape))
            # Zero-initialised by transformers: images would have no effect.
            elif name.endswith("mm_input_projection_weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * initializer_range)
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and not towers:
                param.mul_(_QK_GAIN.get(arch, 1.0))
        for name, buf in model.named_buffers():
            # Gemma 4's per-layer output scale (a saved buffer, ones by default).
            if name.endswith("layer_scalar"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype

    if arch == "gemma3n":
        _save_gemma3n(path, model, dtype)
    else:
        progress_bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(str(path))
        finally:
            if progress_bar:
                hf_logging.enable_progress_bar()
    _patch_config_json(path, arch, dtype, vocab_size)

    generation = GenerationConfig(
        bos_token_id=2, eos_token_id=list(eos_token_ids(arch)), pad_token_id=0
    )
    if arch != "gemma2" and arch != "gemma":
        # The real Gemma 3 / 3n / 4 defaults: sampling unless the caller says otherwise.
        generation.do_sample = True
        generation.top_k = 64
        generation.top_p = 0.95
        if is_gemma4(arch):
            generation.temperature = 1.0
    generation.save_pretrained(str(path))

    if arch == "gemma3":
        # First: saving a processor also writes the tokenizer files, which
        # build_tokenizer then overwrites with the finished ones.
        _save_processor(path, _make_tokenizer(arch, vocab_size))
    build_tokenizer(path, arch=arch, vocab_size=vocab_size)
    return path
