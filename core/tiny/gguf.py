"""A tiny random-weight Gemma 3 GGUF file, written offline with the ``gguf`` package.

What llama.cpp and transformers both read as a Gemma 3 GGUF (the keys and
tensor names of Google's Gemma 3 270M GGUF, with tiny sizes): a 6-layer model
(five sliding-window layers, then a global one, as Gemma 3 interleaves them),
float32 (or float16) tensors, and an SPM vocabulary of 384 tokens whose every
ordinary token is one character. With no merges to choose between, llama.cpp's
tokenizer and the one transformers builds from the file split a text the same
way, so both engines read the same ids and the backends can be compared token
for token. Characters outside the alphabet fall back to ``<0xNN>`` byte tokens.

The head dim is 256 (as on the real models) because the two engines take
Gemma 3's attention scale from different places (llama.cpp: ``1/sqrt(head_dim)``;
transformers' config from GGUF: its default ``query_pre_attn_scalar`` of 256).
Norm weights are stored as llama.cpp stores them (one plus the Hugging Face
weight) and are multiples of 1/64, so transformers' ``weight - 1`` on load is
exact. Byte and unused tokens get tiny embedding rows: a random model then
writes readable characters, not byte soup.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .tokenizer import chat_template

#: The named tokens at Gemma's real ids, and their llama.cpp token types.
NAMED = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
TURN = {"<start_of_turn>": 105, "<end_of_turn>": 106}
#: llama.cpp's token types (``gguf.TokenType``).
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

HIDDEN = 64
LAYERS = 6
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 256
FFN = 128
VOCAB = 384
CONTEXT = 2048
SLIDING_WINDOW = 512


def tiny_vocabulary() -> tuple[list[str], list[int]]:
    """The 384 tokens and their types: named and turn tokens at Gemma's ids, one token per
    character of a small alphabet (``▁`` for the space), the 256 byte tokens, unused rest."""
    chars = ["▁", "\n", *[chr(c) for c in range(33, 127)]]
    tokens: list[str | None] = [None] * VOCAB
    types = [CONTROL] * VOCAB
    for text, token in {**NAMED, **TURN}.items():
        tokens[token] = text
    types[NAMED["<unk>"]] = UNKNOWN
    free = [i for i in range(VOCAB) if tokens[i] is None]
    for token, char in zip(free, chars, strict=False):
        tokens[token], types[token] = char, NORMAL
    free = [i for i in range(VOCAB) if tokens[i] is None]
    for byte, token in enumerate(free[:256]):
        tokens[token], types[token] = f"<0x{byte:02X}>", BYTE
    unused = 0
    for token in range(VOCAB):
        if tokens[token] is None:
            tokens[token] = f"<unused{unused}>"
            unused += 1
    return [t for t in tokens if t is not None], types


def write_tiny_gemma3_gguf(path: str | Path, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Write the tiny Gemma 3 GGUF file to ``path`` (``dtype``: ``float32`` or ``float16``)."""
    import numpy as np

    from ..gguf_writer import GemmaGGUFSpec, write_gemma_gguf

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types = tiny_vocabulary()
    spec = GemmaGGUFSpec(
        architecture="gemma3",
        name="tiny Gemma 3",
        context_length=CONTEXT,
        hidden_size=HIDDEN,
        layers=LAYERS,
        ffn=FFN,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_eps=1e-6,
        rope_base=1_000_000.0,
        sliding_window=SLIDING_WINDOW,
        tokens=tokens,
        scores=[0.0] * len(tokens),
        types=types,
        bos=NAMED["<bos>"],
        eos=NAMED["<eos>"],
        unk=NAMED["<unk>"],
        pad=NAMED["<pad>"],
        chat_template=chat_template("gemma3_text"),
    )
    weight_type = np.float32 if dtype == "float32" else np.float16

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(weight_type)

    def norm(size: int, centre: float = 1.0) -> np.ndarray:  # multiples of 1/64: exact "- 1"
        return (centre + rng.integers(-16, 17, size) / 64.0).astype(np.float32)

    # Small embeddings (the layers, not the current token, decide the next one) and a
    # large final norm (logits far apart: float rounding never flips an argmax).
    embedding = rng.standard_normal((VOCAB, HIDDEN)) * 0.15
    quiet = [i for i, kind in enumerate(types) if kind in (BYTE, CONTROL)]
    quiet = [i for i in quiet if i not in (NAMED["<eos>"], TURN["<end_of_turn>"])]
    embedding[quiet] *= 0.02

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        yield ("token_embd.weight", embedding.astype(weight_type))
        for layer in range(LAYERS):
            prefix = f"blk.{layer}."
            yield (prefix + "attn_norm.weight", norm(HIDDEN))
            yield (prefix + "attn_q.weight", matrix(HEADS * HEAD_DIM, HIDDEN, 0.5))
            yield (prefix + "attn_k.weight", matrix(KV_HEADS * HEAD_DIM, HIDDEN, 0.5))
            yield (prefix + "attn_v.weight", matrix(KV_HEADS * HEAD_DIM, HIDDEN, 0.5))
            yield (prefix + "attn_q_norm.weight", norm(HEAD_DIM, centre=4.0))
            yield (prefix + "attn_k_norm.weight", norm(HEAD_DIM))
            yield (prefix + "attn_output.weight", matrix(HIDDEN, HEADS * HEAD_DIM, 0.05))
            yield (prefix + "post_attention_norm.weight", norm(HIDDEN))
            yield (prefix + "ffn_norm.weight", norm(HIDDEN))
            yield (prefix + "ffn_gate.weight", matrix(FFN, HIDDEN, 0.5))
            yield (prefix + "ffn_up.weight", matrix(FFN, HIDDEN, 0.125))
            yield (prefix + "ffn_down.weight", matrix(HIDDEN, FFN, 0.09))
            yield (prefix + "post_ffw_norm.weight", norm(HIDDEN))
        yield ("output_norm.weight", norm(HIDDEN, centre=4.0))

    return write_gemma_gguf(path, spec, tensors(), gguf_type="f32" if dtype == "float32" else "f16")
