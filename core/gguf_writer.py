"""Writing Gemma GGUF files for llama.cpp: one writer for the tiny test model and HF folders.

Data flow::

    Hugging Face folder (config.json, *.safetensors, tokenizer.json)
        ──check_hf_folder──▶ HFGemmaFolder (config read, nothing else; errors name what is wrong)
        ──converted_gguf(folder, gguf_type)──▶ cached .gguf in $GEMMA_LOCAL_CACHE/gguf/
              (key: resolved path, size and mtime of every file read, type, converter version)
            spec_from_config ─┐
            vocabulary_from_tokenizer_json ─┼──write_gemma_gguf──▶ the .gguf file
            gemma_tensors (safetensors read with numpy, norms + 1) ─┘

    core.tiny.gguf.write_tiny_gemma3_gguf ──write_gemma_gguf──▶ the tiny test GGUF (same writer)

:func:`write_gemma_gguf` writes the metadata and tensors that llama.cpp's
``gemma``, ``gemma2`` and ``gemma3`` architectures read, under the names and
with the conventions of llama.cpp's own ``convert_hf_to_gguf.py`` (norm
weights stored as one plus the Hugging Face weight). Matrices are stored as
``f32``, ``f16`` or ``q8_0`` (``gguf.quants`` quantises in numpy); norms stay
float32. Safetensors are read by their header and memory-mapped with numpy
(bfloat16 widened to float32 by a shift), so converting needs neither torch
nor transformers: only ``gguf`` and ``numpy`` (the ``llamacpp`` extra).

The vocabulary is llama.cpp's SentencePiece kind (``tokenizer.ggml.model =
"llama"``): the tokens in id order, their types (control, user-defined, byte,
unknown, normal), and scores. llama.cpp's SPM tokenizer merges the adjacent
pair whose merged token has the highest score; Gemma's ``tokenizer.json`` is
the equivalent BPE whose merges are ranked by those scores, so a merged
token's score here is minus the rank of its first merge, which makes
llama.cpp pick the same merges in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GemmaLocalError, ModelNotFoundError

logger = logging.getLogger("gemma_local")

#: The storage types of a converted folder's matrices (``gguf_type=``).
GGUF_TYPES = ("q8_0", "f16", "f32")
#: Q8_0: near-lossless (8-bit per weight with a float16 scale per 32) and about half of
#: F16's bytes, so decode (memory-bound on a CPU) is fastest of the three.
DEFAULT_GGUF_TYPE = "q8_0"
#: Bumped when the converter writes something different: old conversions are not reused.
CONVERTER_VERSION = 1

#: Hugging Face ``model_type`` -> llama.cpp architecture, for the text decoders converted.
HF_ARCHITECTURES = {"gemma3_text": "gemma3", "gemma2": "gemma2", "gemma": "gemma"}

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class UnsupportedHFFolderError(GemmaLocalError, ValueError):
    """A Hugging Face folder the llama.cpp backend cannot convert (not a Gemma text decoder...)."""


@dataclass
class GemmaGGUFSpec:
    """What :func:`write_gemma_gguf` writes besides the tensors."""

    architecture: str  # "gemma3", "gemma2" or "gemma"
    name: str
    context_length: int
    hidden_size: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int | None
    pad: int | None
    chat_template: str | None
    add_bos: bool = True
    eot: int | None = None
    rope_base: float = 10_000.0
    rope_base_swa: float | None = None
    rope_linear_factor: float | None = None
    sliding_window: int | None = None
    sliding_window_period: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _storage(gguf: Any, name: str, array: Any, gguf_type: str) -> tuple[Any, Any]:
    """The array to write and its GGML type: norms (1-D) float32, matrices per ``gguf_type``."""
    import numpy as np

    kinds = gguf.GGMLQuantizationType
    if array.ndim < 2 or gguf_type == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), kinds.F32
    if gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
        data = np.ascontiguousarray(array, dtype=np.float32)
        return gguf.quants.quantize(data, kinds.Q8_0), kinds.Q8_0
    return np.ascontiguousarray(array, dtype=np.float16), kinds.F16


def write_gemma_gguf(
    path: str | Path,
    spec: GemmaGGUFSpec,
    tensors: Iterable[tuple[str, Any]],
    gguf_type: str = "f32",
) -> Path:
    """Write a Gemma GGUF file: ``spec``'s metadata, then ``tensors`` (GGUF names, numpy arrays).

    ``gguf_type`` (``"f32"``, ``"f16"`` or ``"q8_0"``) is how matrices are stored;
    1-D tensors (norms) are always float32.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), spec.architecture)
    writer.add_name(spec.name)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_base)
    if spec.rope_base_swa is not None:
        writer.add_rope_freq_base_swa(spec.rope_base_swa)
    if spec.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(spec.rope_linear_factor)
    if spec.sliding_window is not None:
        writer.add_sliding_window(spec.sliding_window)
    if spec.sliding_window_period is not None:
        writer.add_sliding_window_pattern(spec.sliding_window_period)
    if spec.attn_softcap is not None:
        writer.add_attn_logit_softcapping(spec.attn_softcap)
    if spec.final_softcap is not None:
        writer.add_final_logit_softcapping(spec.final_softcap)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[gguf_type])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(spec.tokens)
    writer.add_token_scores(spec.scores)
    writer.add_token_types(spec.types)
    writer.add_bos_token_id(spec.bos)
    writer.add_eos_token_id(spec.eos)
    if spec.unk is not None:
        writer.add_unk_token_id(spec.unk)
    if spec.pad is not None:
        writer.add_pad_token_id(spec.pad)
    if spec.eot is not None:
        writer.add_eot_token_id(spec.eot)
    writer.add_add_bos_token(spec.add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if spec.chat_template:
        writer.add_chat_template(spec.chat_template)
    for name, array in tensors:
        data, kind = _storage(gguf, name, array, gguf_type)
        writer.add_tensor(name, data, raw_dtype=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------ HF folders


@dataclass(frozen=True)
class HFGemmaFolder:
    """A local Hugging Face Gemma text-decoder folder, checked (nothing loaded)."""

    folder: Path
    config: dict[str, Any]
    weights: tuple[Path, ...]

    @property
    def architecture(self) -> str:
        return HF_ARCHITECTURES[self.config["model_type"]]

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the conversion reads (the cache key covers them all)."""
        extra = [
            self.folder / name
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                         "chat_template.jinja")
            if (self.folder / name).is_file()
        ]  # fmt: skip
        return (*extra, *self.weights)


def check_hf_folder(model_name: str) -> HFGemmaFolder:
    """Check that ``model_name`` is a folder llama.cpp's Gemma can be converted from; raise if not.

    Reads only ``config.json`` and the file listing: a missing folder, a folder
    without ``config.json``, safetensors or ``tokenizer.json``, and a model that
    is not a Gemma 1/2/3 text decoder each raise an error that says so.
    """
    folder = Path(model_name).expanduser()
    if not folder.exists():
        raise ModelNotFoundError(
            f"there is no file or folder {model_name!r}: the llama.cpp backend takes a .gguf "
            "file or a local Hugging Face Gemma folder (config.json, *.safetensors, "
            "tokenizer.json)"
        )
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{model_name!r} is not a Hugging Face folder (no config.json)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{folder / 'config.json'} cannot be read ({exc})") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_ARCHITECTURES:
        hint = (
            " (a multimodal or Gemma 3n / 4 checkpoint: load it with backend='transformers' "
            "or 'mlx')"
            if isinstance(model_type, str) and model_type.startswith("gemma")
            else ""
        )
        raise UnsupportedHFFolderError(
            f"{folder} holds a {model_type!r} model{hint}; the llama.cpp backend converts "
            f"Hugging Face folders of the Gemma text decoders {', '.join(HF_ARCHITECTURES)}"
        )
    weights = tuple(sorted(folder.glob("*.safetensors")))
    if not weights:
        raise ModelNotFoundError(f"{folder} has no *.safetensors weights to convert")
    if not (folder / "tokenizer.json").is_file():
        raise ModelNotFoundError(
            f"{folder} has no tokenizer.json (the llama.cpp backend builds the GGUF's "
            "vocabulary from it)"
        )
    return HFGemmaFolder(folder, config, weights)


def read_safetensors(path: Path) -> Iterator[tuple[str, Any]]:
    """The tensors of a ``.safetensors`` file as numpy arrays (memory-mapped; bf16 widened)."""
    import numpy as np

    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    start = 8 + size
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise UnsupportedHFFolderError(
                f"{path}: tensor {name} is {info['dtype']}; the converter reads F32, F16 and "
                "BF16 weights (not a quantised checkpoint)"
            )
        begin, end = info["data_offsets"]
        array = data[begin:end].view(dtypes[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        yield name, array


def gemma_tensors(source: HFGemmaFolder, n_vocab: int) -> Iterator[tuple[str, Any]]:
    """The folder's weights under llama.cpp's names, norms shifted by one (Gemma's ``1 + w``)."""
    import gguf
    import numpy as np

    arch = {"gemma3": gguf.MODEL_ARCH.GEMMA3, "gemma2": gguf.MODEL_ARCH.GEMMA2,
            "gemma": gguf.MODEL_ARCH.GEMMA}[source.architecture]  # fmt: skip
    names = gguf.get_tensor_name_map(arch, int(source.config["num_hidden_layers"]))
    tied = source.config.get("tie_word_embeddings", True)
    for file in source.weights:
        for name, array in read_safetensors(file):
            if name == "lm_head.weight" and tied:
                continue
            mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise UnsupportedHFFolderError(
                    f"{file}: tensor {name!r} has no llama.cpp {source.architecture} name"
                )
            if name.endswith("norm.weight"):
                array = array.astype(np.float32) + 1.0
            elif mapped in ("token_embd.weight", "output.weight"):
                array = array[:n_vocab]
            yield mapped, array


def vocabulary_from_tokenizer_json(
    folder: Path, n_vocab: int
) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """Tokens, scores and llama.cpp types from ``tokenizer.json`` (a Gemma SPM-style BPE).

    ``n_vocab`` is the embedding's row count: missing ids are filled with
    unused ``[PAD<id>]`` tokens, as llama.cpp's converter does.
    Also returns the special tokens by text.
    """
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UnsupportedHFFolderError(
            f"{folder / 'tokenizer.json'} is not a Gemma (SentencePiece-style BPE with byte "
            "fallback) tokenizer"
        )
    vocab: dict[str, int] = model["vocab"]
    tokens: list[str | None] = [None] * n_vocab
    for piece_text, token in vocab.items():
        if token < n_vocab:
            tokens[token] = piece_text
    types = [NORMAL] * n_vocab
    special: dict[str, int] = {}
    for added in data.get("added_tokens", []):
        token = int(added["id"])
        if token >= n_vocab:
            raise UnsupportedHFFolderError(
                f"{folder / 'tokenizer.json'}: token {added['content']!r} has id {token}, "
                f"beyond the embedding's {n_vocab} rows"
            )
        tokens[token] = added["content"]
        types[token] = CONTROL if added.get("special") else USER_DEFINED
        if added.get("special"):
            special[added["content"]] = token
    scores = [0.0] * n_vocab
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank_of.setdefault(left + right, rank)
    byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    unk = model.get("unk_token")
    for token, piece in enumerate(tokens):
        if piece is None:
            tokens[token], types[token] = f"[PAD{token}]", UNUSED
            continue
        text = piece
        if types[token] != NORMAL:
            continue
        if byte.fullmatch(text):
            types[token] = BYTE
        elif text == unk:
            types[token] = UNKNOWN
        elif text in rank_of:
            scores[token] = -float(rank_of[text] + 1)
    if unk is not None and unk in vocab and vocab[unk] < n_vocab:
        types[vocab[unk]] = UNKNOWN
    return [t for t in tokens if t is not None], scores, types, special


def _layer_period(layer_types: list[str]) -> int:
    """llama.cpp's sliding-window period: layer ``i`` is global iff ``i % period == period - 1``."""
    n = len(layer_types)
    for period in range(1, n + 1):
        expected = [
            "full_attention" if i % period == period - 1 else "sliding_attention" for i in range(n)
        ]
        if expected == layer_types:
            return period
    if all(kind == "sliding_attention" for kind in layer_types):
        return n + 1
    raise UnsupportedHFFolderError(
        f"layer_types {layer_types} follow no period of global layers that llama.cpp's Gemma knows"
    )


def spec_from_folder(source: HFGemmaFolder) -> GemmaGGUFSpec:
    """The GGUF metadata of ``source``: its config and its tokenizer's vocabulary."""
    config, arch = source.config, source.architecture
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    layers = int(config["num_hidden_layers"])
    n_vocab = int(config["vocab_size"])
    # llama.cpp takes the attention scale from the architecture and layer count, not the file.
    wanted = hidden // heads if (arch != "gemma" and layers in (46, 62)) else head_dim
    scalar = config.get("query_pre_attn_scalar")
    if arch != "gemma" and scalar is not None and int(scalar) != wanted:
        raise UnsupportedHFFolderError(
            f"{source.folder}: query_pre_attn_scalar={scalar}, but llama.cpp's {arch} scales "
            f"attention by 1/sqrt({wanted}) for this shape: the converted model would differ"
        )
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation not in (None, "gelu_pytorch_tanh", "gelu"):
        raise UnsupportedHFFolderError(f"{source.folder}: activation {activation!r} is not Gemma's")
    tokens, scores, types, special = vocabulary_from_tokenizer_json(source.folder, n_vocab)
    template = None
    if (source.folder / "chat_template.jinja").is_file():
        template = (source.folder / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer_config: dict[str, Any] = {}
    if (source.folder / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads(
            (source.folder / "tokenizer_config.json").read_text(encoding="utf-8")
        )
        if template is None and isinstance(tokenizer_config.get("chat_template"), str):
            template = tokenizer_config["chat_template"]

    def token_id(name: str, default: int | None) -> int | None:
        value = tokenizer_config.get(name)
        text = value.get("content") if isinstance(value, dict) else value
        if isinstance(text, str) and text in special:
            return special[text]
        return default

    spec = GemmaGGUFSpec(
        architecture=arch,
        name=str(config.get("_name_or_path") or source.folder.name),
        context_length=int(config.get("max_position_embeddings", 8192)),
        hidden_size=hidden,
        layers=layers,
        ffn=int(config["intermediate_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        tokens=tokens,
        scores=scores,
        types=types,
        bos=token_id("bos_token", config.get("bos_token_id", 2)) or 2,
        eos=token_id("eos_token", None) or 1,
        unk=token_id("unk_token", config.get("unk_token_id")),
        pad=token_id("pad_token", config.get("pad_token_id")),
        eot=special.get("<end_of_turn>"),
        add_bos=bool(tokenizer_config.get("add_bos_token", True)),
        chat_template=template,
    )
    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    spec.rope_base = float(full.get("rope_theta") or config.get("rope_theta") or 10_000.0)
    scaling = full.get("rope_type") or (config.get("rope_scaling") or {}).get("rope_type")
    if scaling == "linear":
        factor = full.get("factor") or (config.get("rope_scaling") or {}).get("factor")
        spec.rope_linear_factor = float(factor or 1.0)
    elif scaling not in (None, "default"):
        raise UnsupportedHFFolderError(f"{source.folder}: rope type {scaling!r} is not supported")
    if arch in ("gemma2", "gemma3") and config.get("sliding_window"):
        spec.sliding_window = int(config["sliding_window"])
        layer_types = config.get("layer_types")
        period = _layer_period(list(layer_types)) if layer_types else None
        if arch == "gemma2" and period not in (None, 2):
            raise UnsupportedHFFolderError(
                f"{source.folder}: llama.cpp's gemma2 alternates sliding and global layers, "
                f"and layer_types is {layer_types}"
            )
        if arch == "gemma3":  # gemma2's period is fixed at 2 by llama.cpp
            spec.sliding_window_period = period
            spec.rope_base_swa = float(local.get("rope_theta") or 10_000.0)
    if arch == "gemma2":
        spec.attn_softcap = config.get("attn_logit_softcapping")
    elif config.get("attn_logit_softcapping"):
        raise UnsupportedHFFolderError(f"{source.folder}: attention soft-capping on {arch}")
    spec.final_softcap = config.get("final_logit_softcapping")
    return spec


# ---------------------------------------------------------------- cache


def converted_gguf_path(source: HFGemmaFolder, gguf_type: str, root: Path | None = None) -> Path:
    """Where :func:`converted_gguf` writes ``source`` as ``gguf_type`` (whether or not it exists)."""
    from .gguf import cache_dir

    key = [f"v{CONVERTER_VERSION}", gguf_type, str(source.folder.resolve())]
    for file in source.files:
        stat = file.stat()
        key.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    return (root or cache_dir()) / f"{source.folder.resolve().name}-{gguf_type}-{digest}.gguf"


def converted_gguf(source: HFGemmaFolder, gguf_type: str, root: Path | None = None) -> Path:
    """``source`` as a GGUF file of ``gguf_type``, converted on the first call and cached.

    Written under a temporary name and renamed into place, so two processes
    converting at once never read half a file.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    target = converted_gguf_path(source, gguf_type, root)
    if target.is_file():
        return target
    logger.warning("converting %s to a %s GGUF in %s (once)", source.folder, gguf_type, target)
    spec = spec_from_folder(source)
    partial = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        write_gemma_gguf(
            partial, spec, gemma_tensors(source, len(spec.tokens)), gguf_type=gguf_type
        )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
