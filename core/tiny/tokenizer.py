"""The tiny Gemma tokenizers: the archs, their special tokens at the real ids, the
real chat templates, and a small BPE trained offline (see :mod:`core.tiny`).

Gemma 1-3 (and 3n) share the Gemma 3 token ids; Gemma 4 (:data:`GEMMA4_ARCHS`)
has its own control tokens (:data:`GEMMA4_SPECIAL_TOKENS`). ``tokenizers`` and
``transformers`` are imported inside the functions that need them.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Gemma 1/2/3 checkpoints (Gemma 3 tokenizer and token ids).
GEMMA3_ARCHS = ("gemma3_text", "gemma3", "gemma2", "gemma")
#: Gemma 4 checkpoints (Gemma 4 tokenizer, control tokens and template):
#: ``gemma4_text`` dense E-like, ``gemma4_moe`` (model_type ``gemma4_text`` with
#: ``enable_moe_block``), the multimodal ``gemma4`` and the encoder-free
#: multimodal ``gemma4_unified`` (like gemma-4-12B).
GEMMA4_ARCHS = ("gemma4_text", "gemma4_moe", "gemma4", "gemma4_unified")
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
#: Gemma 3n's media tokens, in the order of their real ids (255999, 256000, 262144,
#: 262145, 262272, 262273); they take the last six ids of the tiny vocabulary, so
#: the towers' ranges (``vocab_offset``: ``<end_of_image>`` for vision,
#: ``<end_of_audio>`` for audio, two ids each) hold media tokens only, as in the real one.
GEMMA3N_MEDIA_TOKENS = (
    "<start_of_image>",
    "<start_of_audio>",
    "<end_of_image>",
    "<image_soft_token>",
    "<end_of_audio>",
    "<audio_soft_token>",
)
#: The named media tokens of the real Gemma 3n tokenizer_config.json (Gemma3nProcessor reads them).
GEMMA3N_NAMED_TOKENS = {
    "boi_token": "<start_of_image>",
    "boa_token": "<start_of_audio>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "eoa_token": "<end_of_audio>",
    "audio_token": "<audio_soft_token>",
}
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

_NAMED = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "chat_templates"
_TEMPLATE_FILES = {
    "gemma3_text": "gemma3_chat_template.jinja",
    "gemma3": "gemma3_chat_template.jinja",
    "gemma2": "gemma2_chat_template.jinja",
    "gemma": "gemma2_chat_template.jinja",
    "gemma4_text": "gemma4_chat_template.jinja",
    "gemma4_moe": "gemma4_chat_template.jinja",
    "gemma4": "gemma4_chat_template.jinja",
    "gemma4_unified": "gemma4_chat_template.jinja",
    # Gemma 3n: Gemma 3's template and token ids, but an image part is written as
    # <image_soft_token> and an audio part as <audio_soft_token> (Gemma3nProcessor expands them).
    "gemma3n": "gemma3n_chat_template.jinja",
}

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
    media = {"gemma3": IMAGE_TOKENS, "gemma3n": GEMMA3N_MEDIA_TOKENS}.get(arch, ())
    for i, tok in enumerate(media):
        ids[tok] = vocab_size - len(media) + i
    return ids


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
    elif arch == "gemma3n":
        kwargs["extra_special_tokens"] = dict(GEMMA3N_NAMED_TOKENS)
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
