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
_INIT_STD = {"gemma3_text": 0.02, "gemma3": 0.02, "gemma2": 0.02, "gemma": 0.2}
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
    else:
        text["rope_theta"] = _ROPE_LOCAL
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_checkpoint(
    path,
    arch: str = "gemma3_text",
    *,
    dtype: str = "float32",
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 64,
    max_position_embeddings: int = 2048,
    initializer_range: float | None = None,
    norm_std: float = 1.0,
) -> Path:
    """Build a random-weight Gemma checkpoint of ``arch`` in ``path``; return the path.

    ``path`` is emptied first.  Writes ``config.json``, ``model.safetensors``
    (``save_pretrained``), ``generation_config.json`` and the tokenizer files
    (and, for ``gemma3``, ``processor_config.json`` + the image processor).
    ``initializer_range`` is the std of the random Linear/Embedding weights
    (default per arch, see _INIT_STD); ``norm_std`` the std of the RMSNorm
    weights (transformers initialises them to 0, i.e. scale 1).
    """
    _check_arch(arch)
    if arch not in GEMMA3_ARCHS:
        raise ValueError(f"build_tiny_checkpoint does not build {arch!r} yet (tokenizer only)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    if initializer_range is None:
        initializer_range = _INIT_STD[arch]
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)

    config = _make_config(
        arch,
        vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random norm scales make greedy decoding much less repetitive and
            # check that every backend applies Gemma's (1 + w) scaling.
            if norm_std and name.endswith("norm.weight") and "vision_tower" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * norm_std)
            # Zero-initialised by transformers: images would have no effect.
            elif name.endswith("mm_input_projection_weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * initializer_range)
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and "vision_tower" not in name:
                param.mul_(_QK_GAIN.get(arch, 1.0))
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype

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
    if arch.startswith("gemma3"):
        # The real Gemma 3 defaults: sampling unless the caller says otherwise.
        generation.do_sample = True
        generation.top_k = 64
        generation.top_p = 0.95
    generation.save_pretrained(str(path))

    if arch == "gemma3":
        # First: saving a processor also writes the tokenizer files, which
        # build_tokenizer then overwrites with the finished ones.
        _save_processor(path, _make_tokenizer(arch, vocab_size))
    build_tokenizer(path, arch=arch, vocab_size=vocab_size)
    return path
