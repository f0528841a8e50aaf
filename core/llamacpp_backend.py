"""llama.cpp backend: a GGUF file run by llama.cpp's CPU kernels, behind the same client.

A Hugging Face Gemma 1 / 2 / 3 text folder is converted once to a cached GGUF
first (:mod:`core.gguf_writer`, ``gguf_type``: Q8_0 by default) and then runs
the same way.

Data flow::

    Prompt.ids (llama.cpp's own tokenizer, the GGUF's vocabulary)
        ──llama_decode(prompt, in n_batch chunks)──▶ logits of the last position
        ──numpy view of llama.cpp's logits buffer (no copy)──▶ sample_token():
            repetition penalty, logit_bias, grammar mask (llguidance, :mod:`core.constrained`),
            greedy argmax or temperature / top-k / top-p from the request's own generator
        ──TokenSink.push_row (end ids, stops, max_tokens, usage, thinking, tool calls)──▶
        ──llama_decode(that token)──▶ ... until the sink says the row is done

The engine is llama.cpp's public C API (``llama.h``), called through
:mod:`ctypes` from one of two libraries (``library=``):

- ``"xllamacpp"``: the `xllamacpp <https://pypi.org/project/xllamacpp/>`_
  binary wheel (what ``pip install "gemma-local[llamacpp]"`` installs: seconds,
  no compiler). Its extension module exports llama.cpp's C API; its Linux
  wheel is built for AVX2 CPUs (no AVX-512 / AMX kernels).
- ``"llama-cpp-python"``: ``libllama`` from a ``llama-cpp-python`` install,
  which builds llama.cpp from source for the machine (10-35 minutes here,
  ``-march=native``): a few per cent faster decode on CPUs with AVX-512.
- ``"auto"`` (default): llama-cpp-python's library when it is installed, else xllamacpp's.

Only C functions whose signatures have been stable across llama.cpp releases
are declared, and of the parameter structs only the fields at stable offsets
are written (``n_ctx``, ``n_batch``, ``n_ubatch``, ``n_seq_max``: the first
four ``uint32`` of ``llama_context_params``); threads are set with
``llama_set_n_threads``. The structs themselves are passed through as opaque
blobs the library filled in (:func:`_opaque`), so a newer llama.cpp that adds
fields keeps working; a library whose defaults do not read as expected is
refused with a clear error before any model loads.

Tokenization is llama.cpp's own (``llama_tokenize`` / ``llama_token_to_piece``
on the GGUF's vocabulary, :class:`LlamaVocabTokenizer`): no transformers, no
torch, and no second copy of a 262k vocabulary in memory. Constrained decoding
builds llguidance's tokenizer from the same vocabulary (``LLTokenizer.from_llamacpp``).

Rows of a batch (``n`` > 1, :meth:`create_batch`) run one after another on the
one llama.cpp context. Like llama-cpp-python and llama.cpp's server, a row
keeps the KV cache of the longest prefix its prompt shares with what the cache
holds (the previous row or request: a chat's earlier turns, the ``n`` rows of
one prompt) and prefills only the rest; ``reuse_prefix=False`` clears the cache
for every row (each prompt then prefills whole, so a reply never depends on the
requests before it, not even in the last bits of a float).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import json
import logging
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import BaseGemmaChatCompletion
from .errors import MissingDependencyError, ModelNotFoundError
from .params import SamplingParams
from .stream import Prompt, TokenSink

logger = logging.getLogger("gemma_local")
llama_logger = logging.getLogger("gemma_local.llamacpp")

LIBRARIES = ("auto", "xllamacpp", "llama-cpp-python")
INSTALL = 'pip install "gemma-local[llamacpp]"'
#: The most prompt tokens one ``llama_decode`` call takes while prefilling (``n_batch``).
DEFAULT_N_BATCH = 512
#: The KV cache size when ``n_ctx`` is None: the model's training context, at most this.
DEFAULT_MAX_N_CTX = 8192

# llama_token_attr bits (llama.h)
ATTR_UNKNOWN = 1 << 0
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5


class LlamaCppLibraryError(MissingDependencyError):
    """A llama.cpp library that cannot be used (missing, or of an unexpected build)."""


# ------------------------------------------------------------------ the C API


class _Blob(ctypes.Structure):
    """A parameter struct of llama.h passed through whole (see the module docstring).

    512 bytes is larger than any llama.cpp release's ``llama_model_params`` /
    ``llama_context_params`` (80 / 168 bytes in late 2026). Both are returned
    through a caller-provided buffer and passed in memory by the x86-64 and
    AArch64 calling conventions (they are far larger than two registers), so
    the callee reads only its own struct's bytes from the start of the blob.
    """

    _fields_ = [("raw", ctypes.c_ubyte * 512)]


class _Batch(ctypes.Structure):
    """``llama_batch``: its layout has not changed since llama.cpp added it (2023)."""

    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.c_void_p),
        ("embd", ctypes.c_void_p),
        ("pos", ctypes.c_void_p),
        ("n_seq_id", ctypes.c_void_p),
        ("seq_id", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
    ]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _forward_log(level: int, text: bytes | None, _: Any) -> None:
    if text:
        llama_logger.debug("%s", text.decode("utf-8", errors="replace").rstrip("\n"))


#: Kept alive for the life of the process: llama.cpp holds the function pointer.
_LOG_FORWARDER = _LOG_CALLBACK(_forward_log)


@dataclass
class LlamaApi:
    """The C functions of one loaded llama.cpp library, with their ctypes signatures."""

    lib: Any
    name: str
    version: str

    def __post_init__(self) -> None:
        c = ctypes
        vp, i32, u32, f32p = c.c_void_p, c.c_int32, c.c_uint32, c.POINTER(c.c_float)
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "llama_backend_init": (None, []),
            "llama_log_set": (None, [_LOG_CALLBACK, vp]),
            "llama_model_default_params": (_Blob, []),
            "llama_context_default_params": (_Blob, []),
            "llama_model_load_from_file": (vp, [c.c_char_p, _Blob]),
            "llama_model_free": (None, [vp]),
            "llama_init_from_model": (vp, [vp, _Blob]),
            "llama_free": (None, [vp]),
            "llama_set_n_threads": (None, [vp, i32, i32]),
            "llama_model_get_vocab": (vp, [vp]),
            "llama_model_n_ctx_train": (i32, [vp]),
            "llama_model_n_params": (c.c_uint64, [vp]),
            "llama_model_size": (c.c_uint64, [vp]),
            "llama_model_desc": (i32, [vp, c.c_char_p, c.c_size_t]),
            "llama_model_chat_template": (c.c_char_p, [vp, c.c_char_p]),
            "llama_vocab_n_tokens": (i32, [vp]),
            "llama_vocab_bos": (i32, [vp]),
            "llama_vocab_eos": (i32, [vp]),
            "llama_vocab_eot": (i32, [vp]),
            "llama_vocab_is_eog": (c.c_bool, [vp, i32]),
            "llama_vocab_get_attr": (u32, [vp, i32]),
            "llama_vocab_get_text": (c.c_char_p, [vp, i32]),
            "llama_tokenize": (i32, [vp, c.c_char_p, i32, c.POINTER(i32), i32, c.c_bool, c.c_bool]),
            "llama_token_to_piece": (i32, [vp, i32, c.c_char_p, i32, i32, c.c_bool]),
            "llama_batch_get_one": (_Batch, [c.POINTER(i32), i32]),
            "llama_decode": (i32, [vp, _Batch]),
            "llama_get_logits_ith": (f32p, [vp, i32]),
            "llama_get_memory": (vp, [vp]),
            "llama_memory_clear": (None, [vp, c.c_bool]),
            "llama_memory_seq_rm": (c.c_bool, [vp, i32, i32, i32]),
        }
        missing = [name for name in signatures if not hasattr(self.lib, name)]
        if missing:
            raise LlamaCppLibraryError(
                f"the llama.cpp library of {self.name} {self.version} lacks {', '.join(missing)} "
                f"(an older llama.cpp than the backend needs). {INSTALL} installs one that has them"
            )
        for name, (restype, argtypes) in signatures.items():
            function = getattr(self.lib, name)
            function.restype = restype
            function.argtypes = argtypes

    def __getattr__(self, name: str) -> Any:
        if name == "lib":  # not set yet (never recurse)
            raise AttributeError(name)
        return getattr(self.lib, name)

    @contextlib.contextmanager
    def logging_to_python(self) -> Iterator[None]:
        """llama.cpp's log to the logger ``gemma_local.llamacpp`` (DEBUG) while a model loads.

        xllamacpp's copy of llama.cpp logs there all the time (see :func:`load_api`).
        llama-cpp-python's library is shared with llama-cpp-python, whose callback
        prints every line to stderr until one of its ``Llama(verbose=False)`` has
        been made: it is swapped for ours during the load and put back after.
        """
        if self.name != "llama-cpp-python":
            yield
            return
        from llama_cpp import _logger

        self.llama_log_set(_LOG_FORWARDER, None)
        try:
            yield
        finally:
            self.llama_log_set(ctypes.cast(_logger.llama_log_callback, _LOG_CALLBACK), None)


_APIS: dict[str, LlamaApi] = {}
_API_LOCK = threading.Lock()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_library(library: str) -> str:
    """The library ``library`` names: ``auto`` is llama-cpp-python's when installed, else xllamacpp's."""
    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {LIBRARIES}, got {library!r}")
    if library != "auto":
        return library
    return "llama-cpp-python" if _installed("llama_cpp") else "xllamacpp"


def load_api(library: str) -> LlamaApi:
    """llama.cpp's C API from ``library`` (``xllamacpp`` or ``llama-cpp-python``), loaded once."""
    with _API_LOCK:
        if library in _APIS:
            return _APIS[library]
        if library == "xllamacpp":
            if not _installed("xllamacpp"):
                raise LlamaCppLibraryError(
                    "the llama.cpp backend needs xllamacpp (a binary wheel of llama.cpp), "
                    f"which is not installed. Install it with: {INSTALL}"
                )
            import xllamacpp
            import xllamacpp.xllamacpp as extension

            lib = ctypes.CDLL(extension.__file__)
            version = str(getattr(xllamacpp, "__version__", "?"))
            api = LlamaApi(lib, "xllamacpp", version)
            # Its own copy of llama.cpp, private to xllamacpp: log through Python
            # logging (logger gemma_local.llamacpp, DEBUG) instead of stderr.
            api.llama_log_set(_LOG_FORWARDER, None)
        else:
            if not _installed("llama_cpp"):
                raise LlamaCppLibraryError(
                    "library='llama-cpp-python' needs llama-cpp-python, which is not installed "
                    "(pip install llama-cpp-python builds llama.cpp from source); or use "
                    f"library='xllamacpp': {INSTALL}"
                )
            import llama_cpp
            from llama_cpp import llama_cpp as bindings

            # A CDLL of our own on the same library: its function objects carry our
            # signatures, llama-cpp-python's keep theirs. llama-cpp-python installs its
            # own log callback (quiet unless verbose).
            lib = ctypes.CDLL(bindings._lib._name)
            api = LlamaApi(lib, "llama-cpp-python", str(llama_cpp.__version__))
        api.llama_backend_init()
        _check_defaults(api)
        _APIS[library] = api
        return api


def _check_defaults(api: LlamaApi) -> None:
    """Refuse a library whose ``llama_context_params`` do not start as llama.h says they do."""
    n_ctx, n_batch, n_ubatch, n_seq_max = struct.unpack_from(
        "<4I", bytes(api.llama_context_default_params().raw)
    )
    if not (n_seq_max == 1 and 0 < n_ubatch <= n_batch <= 1 << 20 and n_ctx <= 1 << 24):
        raise LlamaCppLibraryError(
            f"{api.name} {api.version}: llama_context_default_params() reads as n_ctx={n_ctx}, "
            f"n_batch={n_batch}, n_ubatch={n_ubatch}, n_seq_max={n_seq_max}, not llama.h's "
            f"layout; gemma-local cannot drive this build. {INSTALL} installs a supported one"
        )


# ---------------------------------------------------------------- tokenizer


class LlamaVocabTokenizer:
    """The GGUF's vocabulary through llama.cpp, with the tokenizer methods core uses.

    ``encode`` parses control tokens written as text (``<start_of_turn>``) as
    those tokens, as a Hugging Face tokenizer does for a rendered chat prompt;
    ``decode(ids, skip_special_tokens=True)`` leaves out control tokens
    (:attr:`all_special_ids`) and joins the other pieces' bytes.
    ``convert_tokens_to_ids`` knows the control, user-defined, unknown and
    byte tokens (what core asks it for); other strings map to the unknown id.
    ``chat_template`` is the GGUF's own (``tokenizer.chat_template``) or, when
    the file has none (Google's Gemma GGUFs), the packaged one of its
    architecture; :meth:`apply_chat_template` renders it as transformers does,
    compiled once.
    """

    def __init__(self, api: LlamaApi, vocab: int, chat_template: str | None = None) -> None:
        self.chat_template = chat_template
        self._api = api
        self._vocab = vocab
        self._size = int(api.llama_vocab_n_tokens(vocab))
        self._piece = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        named: dict[str, int] = {}
        control: list[int] = []
        unknown: int | None = None
        wanted = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN | ATTR_BYTE
        for token in range(self._size):
            attr = int(api.llama_vocab_get_attr(vocab, token))
            if not attr & wanted:
                continue
            text = (api.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", "replace")
            named.setdefault(text, token)
            if attr & ATTR_CONTROL:
                control.append(token)
            if attr & ATTR_UNKNOWN and unknown is None:
                unknown = token
        self._named = named
        self.all_special_ids = control
        self.unk_token_id = unknown
        bos = int(api.llama_vocab_bos(vocab))
        eos = int(api.llama_vocab_eos(vocab))
        self.bos_token_id = bos if bos >= 0 else None
        self.eos_token_id = eos if eos >= 0 else None
        self.bos_token = self._text(bos) if bos >= 0 else None
        self.eos_token = self._text(eos) if eos >= 0 else None
        self.added_tokens_decoder: dict[int, Any] = {}

    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The chat template rendered for ``conversation`` (text only: ``tokenize=False``)."""
        if tokenize:
            raise ValueError("LlamaVocabTokenizer renders text only (tokenize=False)")
        if not self.chat_template:
            raise ValueError("no chat template: the GGUF carries none and none was set")
        return compiled_template(self.chat_template).render(
            messages=list(conversation),
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def _text(self, token: int) -> str:
        return (self._api.llama_vocab_get_text(self._vocab, token) or b"").decode(
            "utf-8", "replace"
        )

    def __len__(self) -> int:
        return self._size

    @property
    def vocab_size(self) -> int:
        return self._size

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._named.get(token, self.unk_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            out = (ctypes.c_int32 * capacity)()
            n = self._api.llama_tokenize(
                self._vocab, data, len(data), out, capacity, add_special_tokens, True
            )
            if n >= 0:
                return list(out[:n])
            capacity = -n
        raise RuntimeError(f"llama_tokenize failed on a text of {len(data)} bytes")

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` decodes to; control tokens decode to nothing."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buffer = self._piece
        n = self._api.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._api.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        data = bytes(buffer.raw[:n])
        if len(self._pieces) < 1 << 16:
            self._pieces[token] = data
        return data

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if not skip_special_tokens:
            raise ValueError("LlamaVocabTokenizer decodes with skip_special_tokens=True only")
        return b"".join(self.piece(int(t)) for t in ids).decode("utf-8", errors="replace")

    def grammar_tokenizer(self, end_ids: Sequence[int]) -> Any:
        """llguidance's tokenizer of this vocabulary (~1 s for Gemma's 262k tokens)."""
        from llguidance import LLTokenizer

        api, vocab = self._api, self._vocab
        buffer = ctypes.create_string_buffer(1024)
        tokens: list[bytes] = []
        for token in range(self._size):
            n = api.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
            piece = bytes(buffer.raw[: max(n, 0)])
            attr = int(api.llama_vocab_get_attr(vocab, token))
            # llguidance's marker for a special token (as its llama.cpp helper does)
            if attr & ATTR_CONTROL or (
                attr & ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")
            ):
                piece = b"\xff" + piece
            tokens.append(piece)
        tokenize = ctypes.cast(api.llama_tokenize, ctypes.c_void_p).value
        return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
            tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=list(end_ids)
        )


@functools.lru_cache(maxsize=8)
def compiled_template(source: str) -> Any:
    """A chat template compiled as transformers compiles one (sandboxed, HF's filters)."""
    import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:  # transformers' tojson: no HTML escaping
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


# ----------------------------------------------------------------- sampling


def sample_token(
    logits: Any,
    params: SamplingParams,
    rng: Any,
    *,
    seen: Any = None,
    mask: Any = None,
) -> int:
    """The next token from one position's float32 ``logits`` (a numpy view; not modified).

    In transformers' (and mlx-lm's) order: ``logit_bias``, the repetition penalty
    over the ``seen`` ids, the grammar's ``mask`` (True = not allowed), then greedy argmax or
    temperature, top-k, top-p and a draw from ``rng`` (the request's own
    ``numpy.random.Generator``).
    """
    import numpy as np

    plain = params.greedy and not params.logit_bias and mask is None
    if plain and (params.repetition_penalty in (None, 1.0) or seen is None or not len(seen)):
        return int(logits.argmax())
    scores = np.array(logits, dtype=np.float32)  # a copy: llama.cpp owns the buffer
    for token, bias in params.logit_bias:
        if token < scores.shape[0]:
            scores[token] += bias
    penalty = params.repetition_penalty
    if penalty is not None and penalty != 1.0 and seen is not None and len(seen):
        ids = np.unique(np.asarray(seen, dtype=np.int64))
        ids = ids[ids < scores.shape[0]]
        picked = scores[ids]
        scores[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    if mask is not None:
        scores[mask] = -np.inf
    if params.greedy:
        return int(scores.argmax())
    scores /= max(params.temperature, 1e-6)
    if 0 < params.top_k < scores.shape[0]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores[scores < kth] = -np.inf
    scores -= scores.max()
    probs = np.exp(scores, dtype=np.float64)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        kept = np.zeros_like(probs)
        kept[order[:keep]] = probs[order[:keep]]
        probs = kept / kept.sum()
    return int(rng.choice(probs.shape[0], p=probs))


# ------------------------------------------------------------------ backend


@dataclass
class LlamaCppModel:
    """A loaded GGUF: llama.cpp's model and context handles, and what was asked of them."""

    api: LlamaApi
    model: int
    context: int
    vocab: int
    n_vocab: int
    n_ctx: int
    n_threads: int
    n_batch: int
    #: The tokens whose keys and values the KV cache holds (sequence 0), in order.
    cached: list[int] = field(default_factory=list)
    #: The last prompt prefilled, and a copy of the logits of its last position: while
    #: the cache starts with that prompt, the same prompt again (the next of ``n``
    #: rows, a repeated request) needs no step before its first token.
    prompt_ids: tuple[int, ...] = ()
    prompt_logits: Any = None

    def free(self) -> None:
        if self.context:
            self.api.llama_free(self.context)
            self.context = 0
        if self.model:
            self.api.llama_model_free(self.model)
            self.model = 0


class GemmaLlamaCppChatCompletion(BaseGemmaChatCompletion):
    """Gemma from a GGUF file, or a Hugging Face folder converted once to one, through llama.cpp.

    The fastest CPU path for GGUF files (Q4_K_M and the other llama.cpp
    quantisations run as they are, never dequantised): see the README's speed
    section. Same API as the other backends: streaming, stops, ``max_tokens``,
    usage, ``n`` / :meth:`create_batch`, tools and ``response_format`` under a
    grammar, seeds, LangChain / LlamaIndex adapters with ``client=``.

    Args:
        model_name: the path of a ``.gguf`` file of Gemma 2, 3 or 4 (from
            llama.cpp, Ollama, LM Studio or the hub), or of a local Hugging
            Face folder of a Gemma 1, 2 or 3 text decoder (``gemma``,
            ``gemma2``, ``gemma3_text``): converted once to a GGUF file cached
            in ``$GEMMA_LOCAL_CACHE/gguf/`` (:mod:`core.gguf_writer`).
        gguf_type: how a Hugging Face folder's matrices are stored in its
            GGUF: ``"q8_0"`` (``None``, the default: near-lossless, the
            fastest decode), ``"f16"`` or ``"f32"`` (lossless for a float32
            folder: the same greedy replies as transformers). Not an option
            for a ``.gguf`` file.
        n_ctx: the KV cache size in tokens, prompt and reply together
            (``None``: the model's training context, at most 8192).
        n_threads: llama.cpp's threads (``None``: the cores this process may
            use). On a busy machine fewer threads can be faster: llama.cpp's
            threads wait for each other at every op.
        n_batch: the most prompt tokens one prefill step processes.
        reuse_prefix: keep the KV cache of the prefix a prompt shares with the
            previous one and prefill only the rest (default ``True``, as
            llama.cpp's server does); ``False`` prefills every prompt whole.
        library: where llama.cpp comes from: ``"auto"`` (llama-cpp-python's
            library if installed, else xllamacpp's), ``"xllamacpp"`` or
            ``"llama-cpp-python"`` (see :mod:`core.llamacpp_backend`).
    """

    implementation = "llamacpp"
    supports_constraints = True

    def __init__(
        self,
        model_name: str,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int = DEFAULT_N_BATCH,
        reuse_prefix: bool = True,
        library: str = "auto",
        gguf_type: str | None = None,
    ) -> None:
        super().__init__(model_name)
        from .families import family_for
        from .gguf import GGUFSource, check_model_path
        from .gguf_writer import DEFAULT_GGUF_TYPE, GGUF_TYPES, HFGemmaFolder, check_hf_folder

        if gguf_type is not None and gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type must be one of {GGUF_TYPES} or None, got {gguf_type!r}")
        source = check_model_path(model_name)
        #: A Hugging Face folder converted to GGUF on first load (None for a .gguf file).
        self._hf_folder: HFGemmaFolder | None = None
        self.gguf_type = gguf_type
        if source is None:
            path = Path(model_name).expanduser()
            if not path.exists() and not path.is_absolute() and model_name.count("/") == 1:
                raise ModelNotFoundError(
                    f"the llama.cpp backend loads a local .gguf file or Hugging Face folder, and "
                    f"{model_name!r} is neither (a hub id: download it first, e.g. with `hf "
                    "download`, or load it with backend='transformers' or 'mlx')"
                )
            self._hf_folder = check_hf_folder(model_name)
            self.gguf_type = gguf_type or DEFAULT_GGUF_TYPE
            # the path is the converted file's, known (and written) at load time
            source = GGUFSource(path, "", self._hf_folder.architecture)
        elif gguf_type is not None:
            raise ValueError(
                f"gguf_type={gguf_type!r} applies to a Hugging Face folder, and {model_name!r} is "
                "a GGUF file (its tensors are loaded as they are stored)"
            )
        #: The GGUF file (its architecture read from its header, nothing loaded).
        self._gguf = source
        for name, value in (("n_ctx", n_ctx), ("n_threads", n_threads)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
            raise ValueError(f"n_batch must be a positive integer, got {n_batch!r}")
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        if not isinstance(reuse_prefix, bool):
            raise ValueError(f"reuse_prefix must be True or False, got {reuse_prefix!r}")
        self.n_batch = n_batch
        self.reuse_prefix = reuse_prefix
        self.library = resolve_library(library)
        self._named_family = family_for(source.architecture)

    # ----------------------------------------------------------------- loading

    def _model_type(self) -> str | None:
        return self._gguf.architecture

    def _load_model_and_tokenizer(self) -> None:
        api = load_api(self.library)
        with api.logging_to_python():
            self._load_with(api)

    def _load_with(self, api: LlamaApi) -> None:
        from . import accel

        if self._hf_folder is not None:
            from .gguf import GGUFSource
            from .gguf_writer import converted_gguf

            assert self.gguf_type is not None  # set with _hf_folder in __init__
            file = converted_gguf(self._hf_folder, self.gguf_type)
            self._gguf = GGUFSource(file.parent, file.name, self._gguf.architecture)
        path = str(self._gguf.path)
        model = api.llama_model_load_from_file(path.encode(), api.llama_model_default_params())
        if not model:
            raise ModelNotFoundError(
                f"llama.cpp could not load {path} (an architecture or quantisation this build "
                f"of llama.cpp ({api.name} {api.version}) does not know, or a damaged file; "
                "its log is on the logger 'gemma_local.llamacpp' at DEBUG level)"
            )
        context = 0
        try:
            trained = int(api.llama_model_n_ctx_train(model))
            n_ctx = self.n_ctx or min(
                trained if trained > 0 else DEFAULT_MAX_N_CTX, DEFAULT_MAX_N_CTX
            )
            n_batch = min(self.n_batch, n_ctx)
            params = api.llama_context_default_params()
            struct.pack_into("<4I", params.raw, 0, n_ctx, n_batch, n_batch, 1)
            context = api.llama_init_from_model(model, params)
            if not context:
                raise MemoryError(
                    f"llama.cpp could not create a context of {n_ctx} tokens for {path}; "
                    "pass a smaller n_ctx"
                )
            threads = self.n_threads or accel.usable_cores()
            api.llama_set_n_threads(context, threads, threads)
            vocab = api.llama_model_get_vocab(model)
            template = api.llama_model_chat_template(model, None)
            if template:
                chat_template = template.decode("utf-8")
            else:  # as the transformers backend does for such a file (core.gguf)
                from .gguf import chat_template as packaged

                logger.info("%s carries no chat template; using the packaged one", path)
                chat_template = packaged(self._gguf.architecture)
            self.tokenizer = LlamaVocabTokenizer(api, vocab, chat_template)
        except BaseException:
            if context:
                api.llama_free(context)
            api.llama_model_free(model)
            raise
        self.model = LlamaCppModel(
            api, model, context, vocab, len(self.tokenizer), n_ctx, threads, n_batch
        )
        self._context_window = n_ctx

    def _eos_token_ids(self) -> set[int]:
        api, vocab = self.model.api, self.model.vocab
        ids = {int(api.llama_vocab_eos(vocab)), int(api.llama_vocab_eot(vocab))}
        return {t for t in ids if t >= 0 and api.llama_vocab_is_eog(vocab, t)}

    def _new_grammar_tokenizer(self, end_ids: Sequence[int]) -> Any:
        return self.tokenizer.grammar_tokenizer(end_ids)

    def _clear_accelerator_cache(self) -> None:
        """:meth:`clear_cache`: forget the KV cache (the next prompt prefills whole)."""
        if isinstance(self.model, LlamaCppModel) and self.model.context:
            self._forget_cache()

    def _release(self) -> None:
        if isinstance(self.model, LlamaCppModel):
            with self.model.api.logging_to_python():
                self.model.free()
        self._context_window = None

    # -------------------------------------------------------------- generation

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        import numpy as np

        from .constrained import disallowed_tokens

        handle: LlamaCppModel = self.model
        api, context, width = handle.api, handle.context, handle.n_vocab
        grammar = self._grammar_matchers(params, len(prompts))
        rng = np.random.default_rng(None if params.greedy else params.seed)
        penalty = params.repetition_penalty not in (None, 1.0)

        def step(tokens: Sequence[int]) -> Any:
            """Decode ``tokens`` (after what the cache holds): the last position's logits."""
            for start in range(0, len(tokens), handle.n_batch):
                chunk = tokens[start : start + handle.n_batch]
                array = (ctypes.c_int32 * len(chunk))(*chunk)
                status = api.llama_decode(context, api.llama_batch_get_one(array, len(chunk)))
                if status != 0:
                    self._forget_cache()
                    raise RuntimeError(
                        f"llama_decode failed ({status}): the KV cache of {handle.n_ctx} tokens "
                        "is full or the batch was refused; pass a larger n_ctx"
                    )
                handle.cached.extend(chunk)
            pointer = api.llama_get_logits_ith(context, -1)
            return np.ctypeslib.as_array(pointer, shape=(width,))

        for row, prompt in enumerate(prompts):
            if sink.done:
                return
            keep = self._keep_prefix(prompt.ids)
            if keep == len(prompt.ids):  # the cache holds this prompt and its logits
                logits = handle.prompt_logits
            else:
                logits = step(prompt.ids[keep:])
                handle.prompt_ids = tuple(prompt.ids)
                handle.prompt_logits = np.array(logits)  # ~1 MB for Gemma's vocabulary
            seen: list[int] | None = list(prompt.ids) if penalty else None
            while True:
                mask = None
                if grammar is not None and not grammar.retired[row]:
                    mask = disallowed_tokens(grammar.fill_row(row), width)[0].astype(bool)
                token = sample_token(logits, params, rng, seen=seen, mask=mask)
                sink.push_row(row, token)
                finished = sink.finished()[row]
                if grammar is not None:
                    grammar.advance(row, token)
                    if finished:
                        grammar.retire(row)
                if finished:
                    break
                if seen is not None:
                    seen.append(token)
                logits = step([token])

    def _keep_prefix(self, ids: Sequence[int]) -> int:
        """Trim the KV cache to the prefix it shares with ``ids`` (model thread); its length.

        The whole prompt is kept when it is the last one prefilled and the cache
        still starts with it (its last position's logits were kept:
        :attr:`LlamaCppModel.prompt_logits`); otherwise at least its last token is
        decoded again (its logits are the first step's). Everything is cleared
        when ``reuse_prefix`` is off or llama.cpp cannot remove part of a
        sequence (it then answers false).
        """
        handle: LlamaCppModel = self.model
        api, memory = handle.api, handle.api.llama_get_memory(handle.context)
        whole = len(ids)
        same_prompt = (
            self.reuse_prefix
            and handle.prompt_logits is not None
            and handle.prompt_ids == tuple(ids)
            and handle.cached[:whole] == list(ids)
        )
        if same_prompt and (
            len(handle.cached) == whole or api.llama_memory_seq_rm(memory, 0, whole, -1)
        ):
            del handle.cached[whole:]
            return whole
        keep = 0
        if self.reuse_prefix:
            limit = min(len(handle.cached), len(ids) - 1)
            while keep < limit and handle.cached[keep] == ids[keep]:
                keep += 1
        if keep == len(handle.cached):
            return keep
        if keep > 0 and api.llama_memory_seq_rm(memory, 0, keep, -1):
            del handle.cached[keep:]
            if keep < len(handle.prompt_ids):
                handle.prompt_ids, handle.prompt_logits = (), None
            return keep
        self._forget_cache()
        return 0

    def _forget_cache(self) -> None:
        handle: LlamaCppModel = self.model
        handle.api.llama_memory_clear(handle.api.llama_get_memory(handle.context), True)
        handle.cached.clear()
        handle.prompt_ids, handle.prompt_logits = (), None

    # ----------------------------------------------------------------- extras

    def _describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "library": self.library,
            "gguf_architecture": self._gguf.architecture,
            "gguf_type": self.gguf_type,
            "device": "cpu",
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
        }
        handle = self.model
        if isinstance(handle, LlamaCppModel) and handle.model:
            api = handle.api
            buffer = ctypes.create_string_buffer(256)
            api.llama_model_desc(handle.model, buffer, len(buffer))
            info.update(
                model_type=self._gguf.architecture,
                quantization=f"GGUF {buffer.value.decode('utf-8', 'replace')}",
                parameters=int(api.llama_model_n_params(handle.model)),
                n_ctx=handle.n_ctx,
                n_threads=handle.n_threads,
                library=f"{api.name} {api.version}",
            )
        return info
