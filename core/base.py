"""``BaseGemmaChatCompletion``: the OpenAI ChatCompletion-style engine over one backend.

Data flow, in one place for every backend::

    messages ──family.render_inputs──▶ template messages + kwargs
        ──chat template──▶ Prompt(text, ids)
        ──backend._generate(prompts, params, sink) on the model's own thread──▶
    TokenSink (family.output_parser per row) ──Delta records──▶
        create() / create(stream=True) / create_batch() / acreate()
        (the OpenAI shapes: :mod:`core.openai_format`)

What differs between Gemma generations (how messages become the template's
input, the end tokens, special-token decoding, the tool-call grammar and
parser, the thinking channel) is the model family's (:mod:`core.families`),
chosen from the checkpoint's ``model_type``.

A backend implements ``_load_model_and_tokenizer()`` and either the token
primitive ``_generate(prompts, params, sink)`` (the built-in backends) or, as in
the original design, ``_generate_response(prompt_str, temperature, max_tokens,
top_p, **kwargs)`` returning the whole text (then streaming yields one chunk).
That text is encoded with the checkpoint's tokenizer and its ids take the token
path (see :meth:`BaseGemmaChatCompletion._generate`).

Tools and JSON output (``params.constrained``) need a backend that masks
logits every step (``supports_constraints``): it asks :meth:`_grammar_matchers`
for the rows' matchers and applies them (see :mod:`core.constrained`).

Lifecycle: every load in the process, of any client and backend, runs under
one lock (:data:`LOAD_LOCK`), because transformers swaps
``PreTrainedModel.tie_weights`` process-wide while it loads and two
concurrent loads undo each other's swap (leaving ``lm_head`` untied and
random); each backend then checks what it loaded (:meth:`_check_loaded`).
``close()`` cancels the client's queued and running requests: their readers
get :class:`~core.errors.ClientClosedError`, and the next request loads again.
``seed`` is the backend's business inside ``_generate``: a private generator
per request, never the process's global random state.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import gc
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from .constrained import GrammarMatchers, grammar_tokenizer
from .errors import (
    ClientClosedError,
    ContextWindowExceededError,
    translate_load_error,
    translate_oom,
)
from .families import Family, family_for, model_type_from_name
from .media import (
    ALL_SOURCES,
    Image,
    Media,
    Sources,
    collect_media,
    media_kinds,
    resolve_messages,
)
from .openai_format import Completion, achunks, chunks
from .params import SamplingParams
from .prefix_cache import DEFAULT_TOKENS as DEFAULT_PROMPT_CACHE_TOKENS
from .prefix_cache import PrefixCache
from .scheduler import Engine, Request, Scheduler, check_limits
from .stream import Delta, Prompt, TokenSink, sentinel_decoder
from .worker import HANDED_OFF, Cancel, Emit, InFlight, ModelWorker, astream_job, stream_job

logger = logging.getLogger("gemma_local")

Messages = Sequence[Mapping[str, Any]]


#: Held by every client's load, whatever its backend (mlx-lm loads its tokenizer
#: through transformers too): transformers patches shared classes while loading
#: (``initialization.no_tie_weights`` replaces ``PreTrainedModel.tie_weights``),
#: so two loads at once leave each other's ``lm_head`` untied, and the process
#: poisoned for every later load. Re-entrant, for a load that builds another client.
LOAD_LOCK = threading.RLock()


def packaged_chat_template(model_type: str | None) -> str:
    """The packaged copy of the real chat template of ``model_type``'s family."""
    name = family_for(model_type).chat_template
    return resources.files("core").joinpath("chat_templates", name).read_text(encoding="utf-8")


def read_model_config(model_name: str) -> dict[str, Any] | None:
    """``config.json`` of a local folder or of a hub model already in the local cache.

    Never downloads (metadata must stay instant and work offline) and never
    loads weights.
    """
    path = Path(model_name).expanduser()
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(model_name, "config.json")
    except Exception:  # not a valid repo id
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def byte_and_special_ids(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """The byte-fallback token ids (``<0x00>`` .. ``<0xFF>``) and the special ids ``decode`` skips.

    The streaming detokenizer needs both to reproduce ``decode`` exactly (see
    :class:`~core.stream.IncrementalDetokenizer`); tokenizers without them get
    empty sets.
    """
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if not callable(convert):
        return frozenset(), frozenset()
    unk = getattr(tokenizer, "unk_token_id", None)
    byte_ids = set()
    for byte in range(256):
        token_id = convert(f"<0x{byte:02X}>")
        if isinstance(token_id, int) and token_id != unk:
            byte_ids.add(token_id)
    special = {int(t) for t in getattr(tokenizer, "all_special_ids", None) or ()}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return frozenset(byte_ids), frozenset(special)


def context_window_from_config(config: Mapping[str, Any] | None) -> int | None:
    if not config:
        return None
    text = config.get("text_config") or {}
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


#: Clients whose model thread may be running; closed at interpreter exit.
_LIVE_CLIENTS: weakref.WeakSet[BaseGemmaChatCompletion] = weakref.WeakSet()


@atexit.register
def _close_live_clients() -> None:
    """Release every model and join its thread before the interpreter tears down.

    Native backends (MLX, torch) must not free arrays from a daemon thread, or
    after their own libraries have been finalised: that crashes the process at
    exit (a segfault after the program's last line).
    """
    for client in list(_LIVE_CLIENTS):
        try:
            client.close()
        except Exception:  # exiting anyway: one failed close must not keep others open
            logger.debug("closing %r at exit failed", client, exc_info=True)


class BaseGemmaChatCompletion:
    """An OpenAI ChatCompletion-style client over one local Gemma model.

    Cheap to construct: weights load on first use or on :meth:`load`. One
    client can be shared by many threads and event loops; requests run one at
    a time on the client's own model thread (use :meth:`create_batch` to run
    several prompts together).

    Subclasses implement :meth:`_load_model_and_tokenizer` (setting
    ``self.model`` and ``self.tokenizer``) and either :meth:`_generate`
    (stream tokens into a sink) or :meth:`_generate_response` (return text).
    """

    implementation: ClassVar[str] = "custom"
    #: Whether ``_generate`` applies :meth:`_grammar_matchers` (tools, JSON output).
    supports_constraints: ClassVar[bool] = False

    def __init__(
        self,
        model_name: str,
        *,
        max_batch_size: int | None = None,
        max_queue: int | None = None,
        prompt_cache_tokens: int | None = None,
    ) -> None:
        if not isinstance(model_name, str) or not model_name.strip():
            raise ValueError(f"model_name must be a hub id or a local folder, got {model_name!r}")
        batch_size, queue_size = check_limits(max_batch_size, max_queue)
        if prompt_cache_tokens is None:
            prompt_cache_tokens = DEFAULT_PROMPT_CACHE_TOKENS
        elif (
            not isinstance(prompt_cache_tokens, int)
            or isinstance(prompt_cache_tokens, bool)
            or prompt_cache_tokens < 0
        ):
            raise ValueError(
                "prompt_cache_tokens must be an integer >= 0 (the tokens of earlier prompts "
                f"kept for reuse; 0 turns reuse off) or None (default "
                f"{DEFAULT_PROMPT_CACHE_TOKENS}), got {prompt_cache_tokens!r}"
            )
        #: Earlier prompts' caches: a prompt that extends one is prefilled from where it ends
        #: (batch engines that support it; cleared by close() and clear_cache()).
        self.prompt_cache = PrefixCache(max_tokens=prompt_cache_tokens)
        self.model_name = model_name
        self.model: Any = None
        self.tokenizer: Any = None
        self._loaded = False
        self._loaded_family: Family | None = None  # the loaded checkpoint's (system role probed)
        self._named_family: Family | None = None  # before a load: from config.json or the name
        self._eos_ids: frozenset[int] = frozenset()
        self._byte_ids: frozenset[int] = frozenset()
        self._skipped_ids: frozenset[int] = frozenset()
        self._marked_decode: Any = None  # the family's control tokens read by id (Gemma 4)
        self._end_ids: list[int] = []  # the family's end tokens, its end of turn first
        self._context_window: int | None = None
        self._grammar_tokenizer: Any = None  # llguidance's view of the tokenizer, built once
        self._worker = self._new_worker()
        self._in_flight = InFlight()  # what close() cancels
        #: Merges every request into the running batch (continuous batching).
        self._scheduler = Scheduler(
            self._worker,
            self._batch_engine,
            self._run_whole,
            self._runs_whole,
            self._translate_error,
            max_batch_size=batch_size,
            max_queue=queue_size,
            on_idle=self._idle,
        )
        _LIVE_CLIENTS.add(self)

    # ------------------------------------------------------------------ hooks

    def _new_worker(self) -> ModelWorker:
        """The thread this client's model lives on: its own, by default."""
        return ModelWorker(f"gemma-local:{type(self).__name__}")

    def _idle(self) -> None:
        """Work for moments when no request runs (model thread): nothing, by default."""

    def _load_model_and_tokenizer(self) -> None:
        """Load ``self.model`` and ``self.tokenizer`` (runs on the model thread, under :data:`LOAD_LOCK`)."""
        raise NotImplementedError

    def _check_loaded(self) -> None:
        """Check what :meth:`_load_model_and_tokenizer` loaded; raise if it is unusable.

        Runs right after it, still under :data:`LOAD_LOCK`.
        """

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        """Push sampled tokens for every prompt into ``sink`` (runs on the model thread).

        The default serves subclasses of the original design through
        :meth:`_generate_response`, one whole text per prompt (``_check_hooks``
        has made sure one of the two is implemented). Options beyond the four
        positional ones reach it as keyword arguments, only when they are set.

        The text is encoded with the checkpoint's tokenizer (which parses each
        control token's text as that token, as it does in a prompt) and its ids
        go through the sink like sampled ones (:meth:`TokenSink.push_reply`): the
        same decoding, end ids, stop strings, ``max_tokens``, counts and family
        parser as every backend. A ``str`` cannot say which of its characters a
        control token's id wrote: a Gemma 4 reply that spells ``<|channel>`` with
        ordinary tokens is content on the token path, but once it is text it
        reads as the marker; a subclass that has the ids should implement
        :meth:`_generate` instead. The user's own messages are never parsed:
        only the returned reply goes through the parser.
        """
        extra: dict[str, Any] = {"top_k": params.top_k, "seed": params.seed}
        if params.repetition_penalty is not None:
            extra["repetition_penalty"] = params.repetition_penalty
        if params.logit_bias:
            extra["logit_bias"] = dict(params.logit_bias)
        for index, prompt in enumerate(prompts):
            if sink.done:
                return
            text = self._generate_response(
                prompt.text,
                params.temperature,
                sink.rows[index].max_tokens,
                params.top_p,
                **extra,
            )
            sink.push_reply(index, self._encode(text, special=False))

    def _generate_response(
        self, prompt_str: str, temperature: float, max_tokens: int, top_p: float, **kwargs: Any
    ) -> str:
        """The whole reply to a rendered prompt (the original design's hook).

        Built-in backends derive it from their token stream: the answer text
        (``content``), without reasoning or control tokens.
        """
        params = SamplingParams.build(
            temperature=temperature, max_tokens=max_tokens, top_p=top_p, **kwargs
        )
        prompt = Prompt(prompt_str, tuple(self._encode(prompt_str)))
        chunks: list[str] = []
        family = self.family  # its parser keeps control tokens (Gemma 4) out of the text
        sink = TokenSink(
            [prompt],
            params,
            self._decode,
            self._eos_ids,
            lambda d: chunks.append(d.text),
            _NEVER_CANCELLED,
            byte_ids=self._byte_ids,
            skipped_ids=self._skipped_ids,
            parser=lambda: family.output_parser(params, None),
            stop_on_content=family.keep_special_tokens,
        )
        self._generate([prompt], params, sink)
        sink.close()
        return "".join(chunks)

    def _eos_token_ids(self) -> set[int]:
        """End-of-turn ids from the model's generation config (backends add theirs)."""
        return set()

    def _batch_engine(self) -> Engine | None:
        """The backend's continuous batch for the loaded model (model thread; see
        :mod:`core.scheduler`), or ``None``: requests run whole through ``_generate``,
        one after another."""
        return None

    def _scheduled(self) -> bool:
        """Whether requests go through the scheduler: on backends with a batch engine.

        Others (subclasses of the original design, vLLM, whose engine batches
        requests itself on their own threads) run each request whole in its job.
        """
        return type(self)._batch_engine is not BaseGemmaChatCompletion._batch_engine

    def _runs_whole(self, request: Request, alone: bool) -> bool:
        """Whether ``request`` runs whole through ``_generate`` instead of joining the batch:
        when ``_generate`` was replaced (a subclass's or a test's own), or ``alone`` (it would
        decode alone) on a backend's faster single-request path (the CUDA fast path)."""
        return False

    def _own_generate(self, owner: type) -> bool:
        """Whether ``_generate`` is still ``owner``'s (not overridden by a subclass or
        replaced on the instance); the batch engine stands in for it only then."""
        return getattr(self._generate, "__func__", None) is owner.__dict__.get("_generate")

    def _release(self) -> None:
        """Drop backend state on :meth:`close` (runs on the model thread)."""

    def _clear_accelerator_cache(self) -> None:
        """Free cached accelerator memory (runs on the model thread)."""

    def _describe(self) -> dict[str, Any]:
        """Backend facts for :meth:`get_model_info`; must not load weights."""
        return {}

    # --------------------------------------------------------------- lifecycle

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    @property
    def max_batch_size(self) -> int:
        """The most rows decoded together (the running batch, :mod:`core.scheduler`)."""
        return self._scheduler.max_batch_size

    @property
    def max_queue(self) -> int:
        """The most requests waiting for a row; one more raises :class:`~core.errors.QueueFullError`."""
        return self._scheduler.max_queue

    def load(self) -> BaseGemmaChatCompletion:
        """Load the model now (otherwise the first request does). Returns ``self``.

        Loads of every client in the process run one at a time (see :data:`LOAD_LOCK`).
        """
        if not self._loaded:
            self._worker.call(self._load_on_worker)
        return self

    def _load_on_worker(self) -> None:
        if self._loaded:
            return
        self._check_hooks()
        started = time.perf_counter()
        try:
            with LOAD_LOCK:
                self._load_model_and_tokenizer()
                self._check_loaded()
            self._after_load()
        except BaseException as exc:
            self.model = self.tokenizer = None
            gc.collect()
            better = translate_load_error(exc, self.model_name)
            if better is not None:
                raise better from exc
            raise
        self._loaded = True
        logger.info("loaded %s in %.1fs", self.model_name, time.perf_counter() - started)

    def _check_hooks(self) -> None:
        """A clear ``TypeError`` for a subclass that cannot load or generate."""
        cls, base = type(self), BaseGemmaChatCompletion
        missing = []
        if cls._load_model_and_tokenizer is base._load_model_and_tokenizer:
            missing.append("_load_model_and_tokenizer() (setting self.model and self.tokenizer)")
        if cls._generate is base._generate and cls._generate_response is base._generate_response:
            missing.append(
                "_generate(prompts, params, sink) (a token stream) or "
                "_generate_response(prompt_str, temperature, max_tokens, top_p, **kwargs) "
                "(a whole text)"
            )
        if missing:
            raise TypeError(f"{cls.__name__} must implement {' and '.join(missing)}")

    def _after_load(self) -> None:
        tok = self.tokenizer
        if tok is None or not callable(getattr(tok, "encode", None)):
            raise TypeError(
                f"{type(self).__name__}._load_model_and_tokenizer must set self.tokenizer "
                "(a tokenizer with encode/decode; token counts come from it)"
            )
        model_type = self._model_type()
        family = family_for(model_type or model_type_from_name(self.model_name))
        if hasattr(tok, "chat_template") and not getattr(tok, "chat_template", None):
            logger.warning(
                "%s ships no chat template; using the packaged Gemma one", self.model_name
            )
            tok.chat_template = packaged_chat_template(model_type or family.name)
        if hasattr(family, "system_role"):  # Gemma 1-3: does this template take a system turn?
            try:
                self._render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
                system_role = True
            except Exception:
                system_role = False
            family = dataclasses.replace(family, system_role=system_role)  # type: ignore[type-var]
        self._loaded_family = family
        eos = set(self._eos_token_ids())
        if getattr(tok, "eos_token_id", None) is not None:
            eos.add(int(tok.eos_token_id))
        self._end_ids = self._token_ids(family.end_tokens)
        eos.update(self._end_ids)
        self.prompt_cache.tails = tuple(
            tuple(self._encode(tail, special=False))
            for tail in getattr(family, "generation_tails", ())
        )
        self._eos_ids = frozenset(eos)
        self._byte_ids, self._skipped_ids = byte_and_special_ids(tok)
        self._marked_decode = None
        if family.keep_special_tokens:  # its parser reads control tokens: by id, as sentinels
            marks = self._control_marks(family)
            self._skipped_ids = (self._skipped_ids | marks.keys()) - {
                t for t, sentinel in marks.items() if sentinel
            }
            tok_decode = tok.decode
            self._marked_decode = sentinel_decoder(
                lambda ids: str(tok_decode(ids, skip_special_tokens=True)), marks
            )
        self._context_window = self._context_window or context_window_from_config(
            read_model_config(self.model_name)
        )

    def _control_marks(self, family: Family) -> dict[int, str]:
        """The id of each of the family's control tokens the tokenizer knows -> its sentinel."""
        marks: dict[int, str] = {}
        for token, sentinel in family.control_tokens:
            for token_id in self._token_ids([token]):
                marks[token_id] = sentinel
        return marks

    def _token_ids(self, tokens: Sequence[str]) -> list[int]:
        """The ids of the ``tokens`` the tokenizer knows (as a special token), in order."""
        tok = self.tokenizer
        if not hasattr(tok, "convert_tokens_to_ids"):
            return []
        unk = getattr(tok, "unk_token_id", None)
        ids = (tok.convert_tokens_to_ids(t) for t in tokens)
        return [int(i) for i in ids if isinstance(i, int) and i != unk]

    @property
    def family(self) -> Family:
        """The model family (:mod:`core.families`): the loaded checkpoint's, or before a
        load the one its ``config.json`` (or failing that, its name) says; never loads."""
        if self._loaded_family is not None:
            return self._loaded_family
        if self._named_family is None:
            config = read_model_config(self.model_name) or {}
            model_type = config.get("model_type") or model_type_from_name(self.model_name)
            self._named_family = family_for(model_type)
        return self._named_family

    @property
    def _system_role(self) -> bool:
        """Whether the chat template takes a system turn (Gemma 1/2 fold it; Gemma 3/4 take it)."""
        return bool(getattr(self.family, "system_role", True))

    def _model_type(self) -> str | None:
        config = getattr(self.model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            model_type = (read_model_config(self.model_name) or {}).get("model_type")
        return model_type

    def close(self) -> None:
        """Cancel every request in flight, release the model and stop the model thread.

        Requests made before ``close()`` (sync, streamed or async, queued or
        generating) end at their next step: their callers get
        :class:`~core.errors.ClientClosedError` (a stream being read raises it
        at its next item). A loading model finishes loading first. The client
        can be used again later: the next request loads the model again.
        """
        name = self.model_name

        def closed() -> ClientClosedError:
            return ClientClosedError(
                f"the request was cancelled: close() was called on the {name} client while it "
                "was queued or generating. The client stays usable; a new request loads the "
                "model again."
            )

        def unload() -> concurrent.futures.Future[None] | None:
            if self._worker.alive or self._loaded:  # loaded on a thread a racing close() ended
                return self._worker.submit(self._unload_on_worker)
            return None

        # Requests made from here on queue behind the unload (and load again).
        unloading = self._in_flight.cancel_all(closed, then=unload)
        if unloading is not None:
            unloading.result()
        self._worker.close()

    def _unload_on_worker(self) -> None:
        self._scheduler.reset(
            ClientClosedError(f"close() was called on the {self.model_name} client")
        )
        self._release()
        self.prompt_cache.clear()
        self._grammar_tokenizer = None
        self.model = self.tokenizer = None
        self._loaded = False
        self._loaded_family = None
        gc.collect()
        self._clear_accelerator_cache()

    def __enter__(self) -> BaseGemmaChatCompletion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear_cache(self) -> None:
        """Free cached accelerator memory (CUDA / MLX) and the stored prompt caches."""
        if self._worker.alive:
            self._worker.call(self._clear_on_worker)

    def _clear_on_worker(self) -> None:
        self.prompt_cache.clear()
        gc.collect()
        self._clear_accelerator_cache()

    def get_model_info(self) -> dict[str, Any]:
        """What is known about the model; never loads weights."""
        info: dict[str, Any] = {
            "model_name": self.model_name,
            "implementation": self.implementation,
            "family": self.family.name,  # core.families: gemma2 / gemma3 / gemma4
            "model_type": self._model_type(),
            "loaded": self._loaded,
            "quantization": None,
            "device": None,
            "dtype": None,
            "parameters": None,
            "context_window": self._context_window
            or context_window_from_config(read_model_config(self.model_name)),
        }
        info.update(self._describe())
        return info

    # ------------------------------------------------------------- formatting

    def _render(self, turns: list[dict[str, Any]], **template_kwargs: Any) -> str:
        """The chat template applied to ``turns`` (with the family's extra ``template_kwargs``)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) and hasattr(tok, "apply_chat_template"):
            return str(
                tok.apply_chat_template(
                    turns, tokenize=False, add_generation_prompt=True, **template_kwargs
                )
            )
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(packaged_chat_template(self._model_type()))
        bos = getattr(tok, "bos_token", None) or "<bos>"
        return template.render(
            messages=turns, bos_token=bos, add_generation_prompt=True, **template_kwargs
        )

    def _encode(self, text: str, *, special: bool | None = None) -> list[int]:
        """Token ids of ``text``; a prompt that already starts with ``<bos>`` gets no second one."""
        tok = self.tokenizer
        if special is None:
            bos = getattr(tok, "bos_token", None)
            special = not (bos and text.startswith(bos))
        return list(tok.encode(text, add_special_tokens=special))

    def _decode(self, ids: list[int]) -> str:
        # Gemma 4's parser reads control tokens: their ids decode as sentinels (never
        # text the model could spell), other special tokens are skipped.
        if self._marked_decode is not None:
            return str(self._marked_decode(ids))
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def format_prompt(
        self,
        messages: Messages,
        *,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: Any = None,
        response_format: Any = None,
        thinking: Any = None,
        reasoning_effort: Any = None,
    ) -> Prompt:
        """The exact prompt (text and ids) the model reads for ``messages``; loads the model.

        ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` /
        ``response_format`` / ``thinking`` / ``reasoning_effort`` add what the
        model is told about them, as in :meth:`create` (and are checked as
        there, before any load).
        """
        params = SamplingParams.build(
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            thinking=thinking,
            reasoning_effort=reasoning_effort,
        )
        (messages,) = self.resolve_media([messages])
        self._check_messages([messages], params)
        self.family.check(params, params.thinking)
        self.load()

        def job() -> Prompt:
            self._load_on_worker()  # a close() queued in between unloaded it
            return self._prompt(messages, params)

        return self._worker.call(job)

    def _prompt(self, messages: Messages, params: SamplingParams | None = None) -> Prompt:
        params = params or SamplingParams()
        turns, template_kwargs = self.family.render_inputs(messages, params, params.thinking)
        text = self._render(turns, **template_kwargs)
        media = collect_media(turns)
        if media:  # the processor's ids: the media's soft tokens included
            ids, inputs = self._media_prompt(text, media)
        else:
            ids, inputs = tuple(self._encode(text)), None
        window = self._context_window
        if window is not None and len(ids) >= window:
            read = ""
            if media:
                read = f" ({len(ids) - len(self._encode(text))} more for the images / audio)"
            raise ContextWindowExceededError(
                f"the prompt is {len(ids)} tokens{read} but {self.model_name} has a context "
                f"window of {window} tokens; shorten the conversation or send fewer images / audio"
            )
        return Prompt(text, ids, inputs)

    # ------------------------------------------------------------------ media

    #: Whether this backend reads images / audio (:meth:`_media_inputs`).
    reads_media: ClassVar[bool] = False
    #: Where media parts may be read from besides the request (:class:`core.media.Sources`):
    #: local files and http(s) URLs by default; a server for others sets
    #: ``client.media_sources = Sources(local_files=False, urls=False)``.
    media_sources: Sources = ALL_SOURCES

    def _media_prompt(self, text: str, media: list[Media]) -> tuple[tuple[int, ...], Any]:
        """The rendered prompt with its media: ``(ids, backend inputs)`` (model thread).

        Checks that the template wrote one placeholder per media part (user text
        that spells a placeholder would shift every image) and what the loaded
        checkpoint reads, then hands them to :meth:`_media_inputs`.
        """
        config = self._model_config()
        kinds = {"image" if isinstance(m, Image) else "audio" for m in media}
        self.family.check_media(kinds, self.model_name, config)
        placeholders = self.family.media_placeholders(config)
        for kind in sorted(kinds):
            want = sum(1 for m in media if (kind == "image") == isinstance(m, Image))
            marker = placeholders[kind]
            found = text.count(marker)
            if found != want:
                raise ValueError(
                    f"the prompt holds {found} {marker} markers for {want} {kind} parts: the "
                    f"message text spells {marker}, which the chat template writes for each "
                    f"{kind}; remove it from the text"
                )
        return self._media_inputs(text, media)

    def _media_inputs(self, text: str, media: list[Media]) -> tuple[tuple[int, ...], Any]:
        """``(ids, inputs)`` of a prompt with media, from the checkpoint's processor: the ids
        with every media part's soft tokens, and what the backend's ``_generate`` passes the
        model with them (:attr:`Prompt.media`). Backends with :attr:`reads_media` implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not read images or audio")

    def _model_config(self) -> Mapping[str, Any] | None:
        """The checkpoint's config as a dict: the loaded model's, else its ``config.json``."""
        config = getattr(self.model, "config", None)
        to_dict = getattr(config, "to_dict", None)
        if callable(to_dict):
            return dict(to_dict())
        return read_model_config(self.model_name)

    def _check_media(self, conversations: Sequence[Messages]) -> None:
        """What the checkpoint and the backend cannot read, before any load."""
        kinds = set().union(*(media_kinds(c) for c in conversations))
        if not kinds:
            return
        if not self.reads_media:
            raise NotImplementedError(
                f"{type(self).__name__} does not read images or audio; use "
                "GemmaTransformersChatCompletion for messages with image / audio parts"
            )
        self.family.check_media(kinds, self.model_name, self._model_config())

    def resolve_media(self, conversations: Sequence[Messages]) -> list[Messages]:
        """The conversations with every image / audio part decoded once (:mod:`core.media`);
        the caller's lists are not touched. Text-only conversations come back as they are."""
        return [resolve_messages(c, self.media_sources) for c in conversations]

    # ------------------------------------------------------------- generation

    def _job(self, conversations: Sequence[Messages], params: SamplingParams) -> Any:
        """The worker-side body of one request: format it and hand it to the scheduler,
        which generates it (in the running batch, or whole) and emits its deltas."""

        def body(emit: Emit, cancel: Cancel) -> Any:
            # Loaded when the request was made, but a close() from another thread
            # may have been queued before this job: load again rather than fail.
            self._load_on_worker()
            if params.logit_bias:
                vocab = len(self.tokenizer)
                bad = [t for t, _ in params.logit_bias if t >= vocab]
                if bad:
                    raise ValueError(
                        f"logit_bias token ids {bad} are outside the vocabulary (0..{vocab - 1})"
                    )
            # One prompt per conversation (its media processed once), shared by its n rows.
            prompts = [p for c in conversations for p in [self._prompt(c, params)] * params.n]
            family = self.family
            sink = TokenSink(
                prompts,
                params,
                self._decode,
                self._eos_ids,
                emit,
                cancel,
                self._context_window,
                byte_ids=self._byte_ids,
                skipped_ids=self._skipped_ids,
                parser=lambda: family.output_parser(params, params.thinking),
                stop_on_content=family.keep_special_tokens,
            )
            if not self._scheduled():  # runs whole, here (on its own thread for vLLM)
                try:
                    self._generate(prompts, params, sink)
                except Exception as exc:
                    oom = translate_oom(exc, self.model_name)
                    if oom is not None:
                        raise oom from exc
                    raise
                sink.close()
                return None
            self._scheduler.admit(Request(prompts, params, sink, None, emit, cancel))
            return HANDED_OFF

        return body

    def _run_whole(self, request: Request) -> None:
        """Serve ``request`` through ``_generate`` (model thread; the scheduler closes its sink)."""
        self._generate(request.prompts, request.params, request.sink)

    def _translate_error(self, exc: BaseException) -> BaseException:
        """What a request's reader gets for a backend error (out of memory made clear)."""
        oom = translate_oom(exc, self.model_name)
        if oom is None:
            return exc
        oom.__cause__ = exc
        return oom

    def _check_queue(self, in_flight: int) -> None:
        """Refuse a request (:class:`~core.errors.QueueFullError`) when the queue is full."""
        self._scheduler.check_room(in_flight)

    def _check(
        self,
        conversations: Sequence[Messages],
        model: str | None,
        options: dict[str, Any],
    ) -> tuple[SamplingParams, list[Messages]]:
        """The request's params and its conversations with their media decoded (once)."""
        if model is not None and model != self.model_name:
            raise ValueError(
                f"this client serves {self.model_name!r}, not {model!r}; "
                "create a client for that model instead"
            )
        params = SamplingParams.build(**options)
        conversations = self.resolve_media(conversations)
        self._check_messages(conversations, params)
        self._check_constraints(params)
        return params, conversations

    async def _acheck(
        self, conversations: Sequence[Messages], model: str | None, options: dict[str, Any]
    ) -> tuple[SamplingParams, list[Messages]]:
        """:meth:`_check` off the event loop when a media part may read a file or fetch a URL."""
        if any(media_kinds(c) for c in conversations):
            import asyncio

            return await asyncio.to_thread(self._check, conversations, model, options)
        return self._check(conversations, model, options)

    def _check_messages(self, conversations: Sequence[Messages], params: SamplingParams) -> None:
        """Validate each conversation as this model's family reads it (no load)."""
        family = self.family
        for conversation in conversations:
            family.render_inputs(conversation, params, params.thinking)
        self._check_media(conversations)

    def _check_constraints(self, params: SamplingParams) -> None:
        """What this client cannot serve (``thinking`` on a family that cannot think, ...)."""
        self.family.check(params, params.thinking)
        if params.constrained and not self.supports_constraints:
            raise NotImplementedError(
                f"{type(self).__name__} cannot constrain decoding, so it cannot serve tools or "
                "response_format; use GemmaTransformersChatCompletion or GemmaMLXChatCompletion"
            )

    def _grammar_matchers(self, params: SamplingParams, rows: int) -> GrammarMatchers | None:
        """One grammar matcher per row for a constrained request, else ``None`` (model thread).

        llguidance's tokenizer is built on first use and kept until :meth:`close`.
        """
        family = self.family
        grammar = family.grammar(params, params.thinking)
        if grammar is None:
            return None
        if self._grammar_tokenizer is None:
            preferred = self._end_ids[0] if self._end_ids else None  # the family's end of turn
            ends = sorted(self._eos_ids, key=lambda t: (t != preferred, t))
            self._grammar_tokenizer = self._new_grammar_tokenizer(ends)
        free_prose = family.free_prose(params, params.thinking)
        return GrammarMatchers(self._grammar_tokenizer, grammar, rows, free_prose=free_prose)

    def _new_grammar_tokenizer(self, end_ids: Sequence[int]) -> Any:
        """llguidance's tokenizer for this model (model thread): the Hugging Face tokenizer's,
        by default; ``end_ids`` end a reply, the family's end of turn first."""
        return grammar_tokenizer(self.tokenizer, end_ids)

    def stream_deltas(
        self, conversations: Sequence[Messages], params: SamplingParams
    ) -> Iterator[Delta]:
        """The raw :class:`Delta` stream of a request (what adapters build on)."""
        self._check_constraints(params)
        self._check_queue(len(self._in_flight))  # at once, not at the first read
        conversations = self.resolve_media(conversations)  # decoded here, not on the model thread
        self._check_media(conversations)
        self.load()
        return stream_job(
            self._worker, self._job(conversations, params), self._in_flight, self._check_queue
        )

    async def astream_deltas(
        self, conversations: Sequence[Messages], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        """Async :meth:`stream_deltas`; loading and generation never block the event loop."""
        import asyncio

        self._check_constraints(params)
        self._check_queue(len(self._in_flight))
        if any(media_kinds(c) for c in conversations):  # may read files or fetch URLs
            conversations = await asyncio.to_thread(self.resolve_media, conversations)
        self._check_media(conversations)
        if not self._loaded:
            await asyncio.wrap_future(self._worker.submit(self._load_on_worker))
        job = astream_job(
            self._worker, self._job(conversations, params), self._in_flight, self._check_queue
        )
        try:
            async for delta in job:
                yield delta
        finally:
            # Closing this generator must cancel the job now: an async generator
            # left to the garbage collector is only closed later, by the loop.
            await job.aclose()

    def create(
        self,
        messages: Messages,
        temperature: float = 0.7,
        max_tokens: int = 2048,
        top_p: float = 1.0,
        model: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate a reply in OpenAI ``chat.completion`` format.

        ``stream=True`` returns an iterator of ``chat.completion.chunk`` dicts
        instead (role first, ``finish_reason`` on each choice's last chunk, and
        a final chunk with ``usage``). Other options: ``top_k``, ``stop``,
        ``seed``, ``repetition_penalty``, ``logit_bias``, ``n``, and, decoded
        under a grammar so the output always parses and validates:

        * ``tools=[{"type": "function", "function": {"name", "description",
          "parameters"}}]`` with ``tool_choice="auto"`` (default) | ``"none"`` |
          ``"required"`` | ``{"type": "function", "function": {"name": ...}}``
          and ``parallel_tool_calls`` (default ``True``): calls come back as
          ``message.tool_calls`` (``content`` is ``None``) with
          ``finish_reason="tool_calls"``; streamed as ``delta.tool_calls``.
        * ``response_format={"type": "json_object"}`` or ``{"type":
          "json_schema", "json_schema": {"name", "schema", "strict"}}``.

        ``seed`` makes sampling reproducible (same seed, prompt and options,
        same reply on the same machine and backend) with a random generator
        of the request's own: Python's, numpy's, torch's and MLX's global
        random state are left as they were. A :meth:`close` from another
        thread ends the request with :class:`~core.errors.ClientClosedError`.
        """
        stream = _stream_flag(kwargs.pop("stream", None))
        options = dict(kwargs, temperature=temperature, max_tokens=max_tokens, top_p=top_p)
        params, (messages,) = self._check([messages], model, options)
        deltas = self.stream_deltas([messages], params)
        if stream:
            return chunks(deltas, self.model_name, params.n)
        return Completion(self.model_name, 1, params.n).collect(deltas)[0]

    def create_batch(
        self,
        conversations: Sequence[Messages],
        temperature: float = 0.7,
        max_tokens: int = 2048,
        top_p: float = 1.0,
        model: str | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """One ``chat.completion`` per conversation, generated together as one batch."""
        conversations = list(conversations)
        if not conversations:
            return []
        options = dict(kwargs, temperature=temperature, max_tokens=max_tokens, top_p=top_p)
        params, conversations = self._check(conversations, model, options)
        collector = Completion(self.model_name, len(conversations), params.n)
        return collector.collect(self.stream_deltas(conversations, params))

    async def acreate(
        self,
        messages: Messages,
        temperature: float = 0.7,
        max_tokens: int = 2048,
        top_p: float = 1.0,
        model: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Async :meth:`create`; with ``stream=True`` returns an async iterator of chunks."""
        stream = _stream_flag(kwargs.pop("stream", None))
        options = dict(kwargs, temperature=temperature, max_tokens=max_tokens, top_p=top_p)
        params, (messages,) = await self._acheck([messages], model, options)
        deltas = self.astream_deltas([messages], params)
        if stream:
            return achunks(deltas, self.model_name, params.n)
        return (await Completion(self.model_name, 1, params.n).acollect(deltas))[0]

    async def acreate_batch(
        self,
        conversations: Sequence[Messages],
        temperature: float = 0.7,
        max_tokens: int = 2048,
        top_p: float = 1.0,
        model: str | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Async :meth:`create_batch`."""
        conversations = list(conversations)
        if not conversations:
            return []
        options = dict(kwargs, temperature=temperature, max_tokens=max_tokens, top_p=top_p)
        params, conversations = await self._acheck(conversations, model, options)
        collector = Completion(self.model_name, len(conversations), params.n)
        return await collector.acollect(self.astream_deltas(conversations, params))

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"{type(self).__name__}(model_name={self.model_name!r}, {state})"


def _stream_flag(stream: Any) -> bool:
    """``create(stream=...)``: a bool (``None`` means the default, ``False``)."""
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be True or False, got {stream!r}")
    return stream


class _NeverCancelled:
    def is_set(self) -> bool:
        return False


_NEVER_CANCELLED: Any = _NeverCancelled()
