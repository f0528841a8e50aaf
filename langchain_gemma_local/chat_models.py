"""LangChain chat model over a local Gemma (``core`` client: transformers, MLX, llama.cpp or vLLM).

Data flow in and out, all on the core token stream::

    list[BaseMessage] ──convert_messages_to_dicts──▶ OpenAI-style dicts
        (ToolMessage → role "tool"; AIMessage.tool_calls → OpenAI tool_calls;
        image / audio blocks → image_url / input_audio parts, decoded by core;
        core.normalize_messages validates them before anything loads)
    fields + per-call kwargs ──SamplingParams.build──▶ frozen, validated params
        (bind_tools / with_structured_output only bind core's own options:
        tools, tool_choice, parallel_tool_calls, response_format;
        ``reasoning`` is core's ``thinking``)
    client.stream_deltas([conversation], params)     (sync, on the model thread)
    client.astream_deltas([conversation], params)    (async, never blocks the loop)
        ──Delta──▶ ChatGenerationChunk ──▶ _stream / _astream
            (Delta.tool_calls → AIMessageChunk.tool_call_chunks, one whole
            call per chunk, so the chunks add up to the invoke result;
            Delta.reasoning → additional_kwargs["reasoning_content"], whence
            LangChain derives the standard "reasoning" content block;
            Delta.reasoning_tokens → usage output_token_details["reasoning"];
            Delta.partial_call, a call max_tokens cut off → invalid_tool_calls)
        ──merged──▶ ChatResult ──▶ _generate / _agenerate   (with callback handlers)
        ──core.fold_deltas──▶ one chunk ──▶ ChatResult      (without: no chunk per token)

Tool calls and JSON output are guaranteed by core's constrained decoding
(a grammar masks every token that would break the format), so the parsers
that ``with_structured_output`` chains on never see malformed output unless
``max_tokens`` cuts it short; they then raise an ``OutputParserException``
saying so (the token count and the partial output) rather than a schema error.
A tool call cut short that way is an ``invalid_tool_calls`` entry whose
``error`` names the limit, never a silently empty message.

``batch()`` / ``abatch()`` are LangChain's own: one ``invoke`` / ``ainvoke``
per input, all at once (``batch()`` runs as many threads as inputs unless
``max_concurrency`` says fewer). Each call submits its own request to the core
client, whose scheduler merges concurrent requests into one running batch
(continuous batching, ``core.scheduler``). So every input keeps its own
callbacks, tags, run id, ``on_llm_new_token`` events and error handling, while
the model decodes them together.

Nothing here formats prompts, tokenizes or counts tokens: the core client does,
once, for every adapter.

This module holds :class:`ChatGemmaLocal`; its helpers live beside it, one job each:
``messages`` (LangChain messages → OpenAI dicts), ``structured`` (``tool_choice``
and schemas in core's forms, the structured-output parsers), ``_deltas`` (core
deltas → usage and cut-off calls, the ``timeout`` deadline) and ``_clients``
(the shared core clients).
Their public names are importable from here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.load.serializable import SerializedConstructor, SerializedNotImplemented
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    message_chunk_to_message,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from typing_extensions import Self

from core import BaseGemmaChatCompletion, Delta, SamplingParams, fold_deltas, normalize_messages
from core.factory import BACKENDS, check_backend_settings, resolve_backend

from ._clients import _shared_client, _shared_key
from ._deltas import (
    _akeep_last,
    _auntil_deadline,
    _cut_call,
    _keep_last,
    _until_deadline,
    _usage,
    _with_cut_call,
)
from .messages import (
    CHAT_MESSAGE_ROLES,
    CUT_OFF_CALL_ERROR,
    convert_message_to_dict,
    convert_messages_to_dicts,
)
from .structured import (
    TOOL_CHOICE_MODES,
    _is_pydantic_class,
    _JsonParser,
    _KeyToolParser,
    _PydanticParser,
    _PydanticToolParser,
    convert_to_response_format,
    convert_tool_choice,
)

__all__ = [
    "CALL_OPTIONS",
    "CHAT_MESSAGE_ROLES",
    "CONSTRAINT_OPTIONS",
    "CUT_OFF_CALL_ERROR",
    "TOOL_CHOICE_MODES",
    "ChatGemmaLocal",
    "convert_message_to_dict",
    "convert_messages_to_dicts",
    "convert_to_response_format",
    "convert_tool_choice",
]

#: Core's tool and JSON-output options, bound by ``bind_tools`` / ``with_structured_output``
#: (or passed per call, in OpenAI's shapes).
CONSTRAINT_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
#: Per-call options ``invoke`` / ``stream`` / ``bind`` accept besides ``stop``.
CALL_OPTIONS = frozenset(
    {
        "temperature",
        "max_tokens",
        "top_p",
        "top_k",
        "seed",
        "repetition_penalty",
        "logit_bias",
        "timeout",
        "model",
        "reasoning",
        *CONSTRAINT_OPTIONS,
    }
)
#: Tracing metadata that ``with_structured_output`` binds; LangChain consumes it
#: (``invoke`` / ``stream`` pop it), but ``batch`` passes it on, so it is ignored here.
_TRACING_OPTIONS = frozenset({"ls_structured_output_format", "structured_output_format"})
_SAMPLING_FIELDS = (
    "temperature",
    "max_tokens",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "logit_bias",
)
_LOAD_FIELDS = frozenset({"use_4bit_quantization", "device_map", "client_kwargs"})


class ChatGemmaLocal(BaseChatModel):
    """Google's Gemma chat models running locally (transformers, Apple MLX, llama.cpp or vLLM).

    A drop-in LangChain chat model: use it in any chain, agent graph or
    runnable like a hosted one. Generation runs on this machine through the
    ``core`` client of gemma-local; nothing is sent anywhere.

    Setup:
        Install gemma-local with the LangChain extra and one backend:

        ```bash
        pip install "gemma-local[langchain,transformers]"  # CPU / CUDA / MPS
        pip install "gemma-local[langchain,mlx]"           # Apple Silicon
        pip install "gemma-local[langchain,quantization]"  # + bitsandbytes 4-bit
        pip install "gemma-local[langchain,llamacpp]"      # GGUF files on the CPU
        pip install "gemma-local[langchain,vllm]"          # vLLM's engine (GPUs)
        ```

        Gemma checkpoints on the Hugging Face hub are gated: accept the licence
        on the model page, then `hf auth login` (or set `HF_TOKEN`). A local
        folder needs neither.

    Key init args — sampling (`None` = the backend default):
        temperature: float | None
            0 is greedy decoding; otherwise in (0, 2]. Default 0.7.
        max_tokens: int | None
            Most tokens to generate (>= 1). Default 2048.
        top_p: float | None
            Nucleus sampling mass in (0, 1]. Default 1.0 (off).
        top_k: int | None
            Keep the k most likely tokens; 0 is off. Default 0.
        stop: list[str] | None
            Strings that end the reply (not included in it).
        seed: int | None
            Makes sampling reproducible.
        repetition_penalty: float | None
            > 0; 1.0 is off.
        logit_bias: dict[int, float] | None
            Token id → bias in [-100, 100].
        reasoning: bool | None
            Let a model that can think (Gemma 4) reason before it answers.
            Default None: off.

    Key init args — the model:
        model: str | None
            Hub id (`"google/gemma-3-12b-it"`) or local folder; for llama.cpp
            the path of a `.gguf` file (required). Default: the backend's
            default model.
        backend: "auto" | "transformers" | "mlx" | "llamacpp" | "vllm"
            `"auto"` picks MLX on Apple Silicon (when mlx-lm is installed),
            transformers elsewhere; llama.cpp and vLLM are asked for by name.
        use_4bit_quantization: bool
            transformers only: bitsandbytes NF4 (about a quarter of the memory).
        device_map: str | dict | None
            transformers only: `"auto"`, `"cpu"`, `"cuda:0"`, `"mps"`, ...
        client_kwargs: dict | None
            Other backend options, e.g. `{"torch_dtype": "bfloat16"}`,
            `{"max_kv_size": 4096}` (MLX), `{"n_threads": 8, "n_ctx": 8192}`
            (llama.cpp) or `{"tensor_parallel_size": 2}` (vLLM).
        client: core client | None
            An existing `core` client to share one loaded model with LlamaIndex
            or direct core use.
        timeout: float | None
            Seconds one generation may take once the model is loaded.

    Instantiate:
        ```python
        from langchain_gemma_local import ChatGemmaLocal

        model = ChatGemmaLocal(
            model="google/gemma-3-12b-it",  # or a local folder
            temperature=0.2,
            max_tokens=512,
            # backend="auto", use_4bit_quantization=False, seed=None, ...
        )
        ```

        Constructing loads nothing: the weights load on the first call (or
        `model.client.load()`). Models built with the same model, backend and
        load options share one loaded copy of the weights.

        A GGUF file on llama.cpp (the fastest CPU path), or vLLM's engine:

        ```python
        model = ChatGemmaLocal(backend="llamacpp", model="gemma-3-4b-it-Q4_K_M.gguf")
        model = ChatGemmaLocal(backend="vllm", model="google/gemma-3-12b-it",
                               client_kwargs={"tensor_parallel_size": 2})
        ```

        Settings a backend cannot take fail here, before anything loads:
        `use_4bit_quantization` / `device_map` on any backend but transformers,
        llama.cpp without `model`, and vLLM where the `vllm` package is not
        installed (`MissingDependencyError` naming the `vllm` extra and
        `scripts/vllm_env.sh`, the environment it runs in).

    Invoke:
        ```python
        messages = [
            ("system", "You are a helpful translator. Translate the user sentence to French."),
            ("human", "I love programming."),
        ]
        model.invoke(messages)
        ```

        ```python
        AIMessage(
            content="J'adore la programmation.",
            response_metadata={"model_name": "google/gemma-3-12b-it", "finish_reason": "stop", ...},
            usage_metadata={"input_tokens": 29, "output_tokens": 8, "total_tokens": 37},
        )
        ```

        Per-call options override the fields: `model.invoke(messages,
        temperature=0, max_tokens=64, stop=["\\n"])`, or bind them once:
        `model.bind(temperature=0)`.

    Stream:
        ```python
        for chunk in model.stream(messages):
            print(chunk.text, end="", flush=True)
        ```

        The last chunk carries `usage_metadata`, `finish_reason` and
        `model_name`; adding the chunks up gives the whole message.

    Async:
        ```python
        await model.ainvoke(messages)

        async for chunk in model.astream(messages):
            print(chunk.text, end="", flush=True)

        async for event in model.astream_events(messages, version="v2"):
            ...
        ```

        Async calls never block the event loop: generation runs on the model's
        own thread (MLX stays on it) and chunks are handed to the loop.

    Batch:
        ```python
        model.batch(["Tell me a joke", "Tell me a fact"])
        await model.abatch(["Tell me a joke", "Tell me a fact"])
        ```

        Every input is its own `invoke`, all running at once, and the core
        client decodes concurrent requests together in one running batch
        (continuous batching), with the same replies as one-by-one calls
        under greedy decoding (`temperature=0`, float32). Each input keeps its
        own callbacks and run. `max_concurrency` in the config caps how many
        run together. With a LangChain cache configured, LangChain's default
        thread pool runs them.

    Images and audio:
        ```python
        from langchain_core.messages import HumanMessage

        model = ChatGemmaLocal(model="google/gemma-4-E2B-it")
        model.invoke([HumanMessage([
            {"type": "text", "text": "What is on this screen?"},
            {"type": "image", "base64": png_base64, "mime_type": "image/png"},
        ])])
        model.invoke([HumanMessage([
            {"type": "text", "text": "Transcribe this."},
            {"type": "audio", "base64": wav_base64, "mime_type": "audio/wav"},
        ])])
        ```

        Gemma 3 4b/12b/27b and Gemma 4 read images, Gemma 4 E2B/E4B also
        audio (transformers backend). User messages take LangChain's standard
        image / audio blocks (`base64` + `mime_type`, or `url`: a `data:` URI,
        a path, `file://` or `http(s)://`), the older `source_type` blocks and
        OpenAI's `image_url` / `input_audio` blocks; usage counts the media
        tokens the model read. A `file_id`, media in another message type
        and a checkpoint that cannot read it raise `ValueError` before
        generating.

    Share one loaded model:
        ```python
        from core import create_gemma_client

        client = create_gemma_client(model_name="google/gemma-3-12b-it")
        model = ChatGemmaLocal(client=client)  # LangChain
        client.create([{"role": "user", "content": "Hi"}])  # direct core use, same weights
        ```

    Tool calling:
        ```python
        from langchain_core.tools import tool

        @tool
        def get_weather(city: str) -> str:
            '''Current weather of a city.'''
            return f"Sunny in {city}."

        model_with_tools = model.bind_tools([get_weather])  # tool_choice="auto"
        reply = model_with_tools.invoke("What's the weather in Paris?")
        reply.tool_calls
        ```

        ```python
        [{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_...", "type": "tool_call"}]
        ```

        Decoding is constrained by a grammar: every call parses, names a bound
        tool and has schema-valid arguments. `tool_choice`: `"auto"` (default),
        `"none"`, `"required"` / `"any"` / `True`, or a tool's name (exactly one
        call of it). Streaming gives each call as one `tool_call_chunk`; send
        results back as `ToolMessage`s (LangGraph agents work unchanged).

        A call that `max_tokens` cuts off before it is complete comes back
        as an entry of `invalid_tool_calls` (the tool's name when known, the
        call text so far as `args`, and an `error` naming the limit), on the
        message and on the last streamed chunk; the complete calls before it
        stay in `tool_calls`. Sent back in the history, that entry is left out.

    Structured output:
        ```python
        from pydantic import BaseModel

        class Joke(BaseModel):
            setup: str
            punchline: str

        model.with_structured_output(Joke).invoke("Tell me a joke about cats")
        ```

        ```python
        Joke(setup="Why was the cat sitting on the computer?", punchline="To keep an eye on the mouse!")
        ```

        `method="json_schema"` (default: the reply is JSON constrained by the
        schema), `"function_calling"` (a forced tool call) or `"json_mode"`
        (any JSON object); pydantic, `TypedDict` or JSON schema;
        `include_raw=True` for `{"raw", "parsed", "parsing_error"}`.

    Reasoning (Gemma 4):
        ```python
        model = ChatGemmaLocal(model="google/gemma-4-E4B-it", reasoning=True)
        reply = model.invoke("How many r's are in 'strawberry'?")
        reply.additional_kwargs["reasoning_content"]  # the thought
        reply.content_blocks  # [{"type": "reasoning", ...}, {"type": "text", ...}]
        reply.usage_metadata["output_token_details"]  # {"reasoning": 57}
        ```

        Per call: `model.invoke(messages, reasoning=False)` or
        `model.bind(reasoning=True)`. Streamed chunks carry the thought in
        `additional_kwargs["reasoning_content"]` as it comes, before the
        answer's text. The thought counts against `max_tokens`.
        `reasoning=True` on Gemma 1/2/3 raises `ValueError` before anything loads.

    Token usage:
        ```python
        model.invoke(messages).usage_metadata
        # {"input_tokens": 29, "output_tokens": 8, "total_tokens": 37}
        ```

        Exact counts from the model's own tokenizer (prompt tokens include
        the chat template).

    Response metadata:
        `model_name`, `finish_reason` (`"stop"` at the end of the turn or a
        stop string, `"length"` at `max_tokens`, `"tool_calls"` after calls)
        and `model_provider`.

    Serialization:
        ```python
        from langchain_core.load import dumps, loads

        text = dumps(model)  # its settings as JSON, never the client or the weights
        model = loads(
            text, valid_namespaces=["langchain_gemma_local"], allowed_objects=[ChatGemmaLocal]
        )
        ```

        The rebuilt model makes (or shares) a client from the settings and
        loads nothing until its first call. A `client=` passed in is not
        serialized: the rebuilt model gets a client for the same model and
        backend with default load options. A `token` in `client_kwargs` is
        left out; the rebuilt model uses `HF_TOKEN` or the `hf auth login`.

    Not supported yet: images in a `ToolMessage` (Gemma's chat templates have
    no place for them: `ValueError`), video and PDF blocks (`TypeError`).
    """

    # -------- the model

    model: str | None = None
    """Hub id (e.g. ``"google/gemma-3-12b-it"``) or a local folder; on llama.cpp
    the path of a ``.gguf`` file (or a Hugging Face Gemma folder, converted on
    first load).

    Default ``None``: the backend's default (``google/gemma-3-12b-it`` on
    transformers and vLLM, ``mlx-community/gemma-3-12b-it-4bit-DWQ`` on MLX;
    llama.cpp has none, so it needs ``model``), or the model of ``client``.
    Always the resolved name after construction.
    """

    backend: Literal["auto", "transformers", "mlx", "llamacpp", "vllm"] = "auto"
    """Backend to run on (``core.factory.BACKENDS``). Default ``"auto"``: MLX on
    Apple Silicon when mlx-lm is installed, transformers otherwise. ``"llamacpp"``
    runs a GGUF file (``gemma-local[llamacpp]``); ``"vllm"`` runs vLLM's engine
    (``gemma-local[vllm]``, or the environment ``scripts/vllm_env.sh`` builds)."""

    client: BaseGemmaChatCompletion | None = Field(default=None, exclude=True)
    """The core client that generates. Default ``None``: one is made for ``model``
    and ``backend`` (shared with every ChatGemmaLocal built with the same
    settings). Pass an existing client to share one loaded model with
    LlamaIndex or direct core use. Never loaded at construction."""

    use_4bit_quantization: bool = False
    """transformers only: load with bitsandbytes NF4 4-bit quantisation (needs
    ``gemma-local[quantization]`` and a CUDA GPU). Default ``False``. On another
    backend ``True`` raises ``ValueError`` (MLX and llama.cpp checkpoints carry
    their own quantisation; vLLM takes ``engine_args={"quantization": ...}``)."""

    device_map: str | dict[str, Any] | None = None
    """transformers only: where the weights go (``"auto"``, ``"cpu"``, ``"cuda:0"``,
    ``"mps"`` or an accelerate device map). Default ``None``: the backend's
    default, ``"auto"``. Set on another backend it raises ``ValueError``."""

    client_kwargs: dict[str, Any] | None = None
    """Other keyword arguments for the backend client, e.g.
    ``{"torch_dtype": "bfloat16", "attn_implementation": "sdpa"}`` (transformers),
    ``{"max_kv_size": 4096}`` (MLX), ``{"n_threads": 8, "n_ctx": 8192}`` (llama.cpp)
    or ``{"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8}`` (vLLM).
    Default ``None``: none."""

    # -------- sampling

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature in [0, 2]; 0 is greedy decoding. Default ``None``: 0.7."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (>= 1); clipped to what the context window leaves.
    Default ``None``: 2048."""

    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling probability mass in (0, 1]. Default ``None``: 1.0 (off)."""

    top_k: int | None = Field(default=None, ge=0)
    """Sample from the k most likely tokens; 0 is off. Default ``None``: 0 (off)."""

    stop: list[str] | None = None
    """Strings that end generation (the stop string is not returned); at most 16.
    Per-call ``stop`` replaces them. Default ``None``: none."""

    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """Seed that makes sampling reproducible. Default ``None``: not seeded."""

    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    """Penalty on tokens already present, > 0; 1.0 is off. Default ``None``: off."""

    logit_bias: dict[int, float] | None = None
    """Token id → bias in [-100, 100] added to that token's logit every step
    (``-100`` bans a token, ``100`` all but forces it wherever it is allowed).
    Default ``None``: none."""

    reasoning: bool | None = Field(default=None, strict=True)
    """Controls the reasoning (thinking) mode of models that can think (Gemma 4).

    - ``True``: the model thinks before it answers. Its thought comes back
      apart from the answer: in the message's ``additional_kwargs`` under
      ``reasoning_content``, and as a ``reasoning`` block of ``content_blocks``
      (streamed chunks carry it as it arrives, before the answer). Thinking
      tokens count against ``max_tokens`` and are reported in
      ``usage_metadata["output_token_details"]["reasoning"]``.
    - ``False``: the model does not think.
    - ``None`` (Default): the backend default, which is off (Gemma 4's chat
      template then asks for no thinking).

    ``True`` on a model that cannot think (Gemma 1/2/3) raises ``ValueError``
    before anything loads. Per call: ``invoke(..., reasoning=True)`` or
    ``bind(reasoning=True)``."""

    # -------- behaviour

    streaming: bool = False
    """Whether ``invoke`` streams internally, so callbacks get ``on_llm_new_token``
    for every piece of text. Default ``False`` (``stream()`` always streams)."""

    timeout: float | None = Field(default=None, gt=0)
    """Seconds one generation may run once the model is loaded; past it the
    generation is stopped and ``TimeoutError`` raised (checked as text arrives).
    Default ``None``: no limit."""

    max_retries: int | None = Field(default=None, ge=0)
    """Accepted so code written for hosted chat models runs unchanged. A local
    generation has no transient failures, so nothing is retried; use
    ``.with_retry()`` to retry anyway. Default ``None``."""

    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Accepted (and unused) so code written for hosted chat models runs
    unchanged: a local model needs no key. Default ``None``."""

    model_config = ConfigDict(extra="forbid")

    # ------------------------------------------------------------ validation

    @model_validator(mode="after")
    def _resolve_client(self) -> Self:
        """Resolve ``client`` and ``model`` (cheap: nothing loads) and check the options."""
        load_options: dict[str, Any] = dict(self.client_kwargs or {})
        if self.use_4bit_quantization:
            load_options["use_4bit_quantization"] = True
        if self.device_map is not None:
            load_options["device_map"] = self.device_map
        explicit = self.model_fields_set
        client = self.client
        key = _shared_key(client) if client is not None else None
        if client is not None and key is not None:
            # one of our shared clients (e.g. passed on by configurable_fields): keep it
            # unless the settings given now ask for another model or another load
            backend, model, options = key
            if (
                ("model" in explicit and self.model not in (None, model))
                or ("backend" in explicit and self.backend not in ("auto", backend))
                or (explicit & _LOAD_FIELDS and repr(sorted(load_options.items())) != options)
            ):
                client = None
        if client is None:
            backend = resolve_backend(self.backend)
            # transformers-only options elsewhere, llama.cpp without a model, vLLM
            # not installed: clear errors now, before a client exists
            check_backend_settings(backend, self.model, load_options)
            client = _shared_client(backend, self.model, load_options)
        elif key is None:
            # the caller's own client decides the model and how it loads
            if self.model is not None and self.model != client.model_name:
                raise ValueError(
                    f"model={self.model!r} but the client serves {client.model_name!r}; "
                    "leave model unset when passing client="
                )
            if self.backend not in ("auto", client.implementation):
                raise ValueError(
                    f"backend={self.backend!r} but the client is a {client.implementation} "
                    "client; leave backend unset when passing client="
                )
            if load_options:
                raise ValueError(
                    f"{', '.join(sorted(load_options))} configure loading, which the client "
                    "passed as client= already decides; set them on that client instead"
                )
        self.client = client
        self.model = client.model_name
        self._sampling_params(None, {})  # bad stop strings fail here, not at the first call
        return self

    # ------------------------------------------------------------ requests

    def _core(self) -> BaseGemmaChatCompletion:
        client = self.client
        if client is None:  # pragma: no cover - the validator always sets it
            raise RuntimeError("ChatGemmaLocal has no client")
        return client

    def _sampling_params(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> SamplingParams:
        """Fields, overridden by per-call options that are not ``None``."""
        options: dict[str, Any] = {name: getattr(self, name) for name in _SAMPLING_FIELDS}
        options["stop"] = self.stop if stop is None else stop
        for name in (*_SAMPLING_FIELDS, *CONSTRAINT_OPTIONS):
            if kwargs.get(name) is not None:
                options[name] = kwargs[name]
        reasoning = kwargs.get("reasoning")
        if reasoning is None:
            reasoning = self.reasoning
        elif not isinstance(reasoning, bool):
            raise TypeError(f"reasoning must be True, False or None, got {reasoning!r}")
        options["thinking"] = reasoning
        params = SamplingParams.build(**options)
        client = self.client
        if params.thinking and client is not None and not client.family.can_think:
            raise ValueError(
                f"reasoning=True needs a model that can think (Gemma 4); {client.model_name!r} "
                f"is a {client.family.name} model, which cannot (leave reasoning unset or False)"
            )
        if params.constrained and client is not None and not client.supports_constraints:
            raise NotImplementedError(
                f"the client {type(client).__name__} cannot constrain decoding, so "
                "ChatGemmaLocal cannot serve tools or structured output with it; use a "
                "built-in client (transformers, MLX, llama.cpp or vLLM)"
            )
        return params

    def _options(
        self, stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> tuple[SamplingParams, float | None]:
        """Sampling params and timeout of one call (fields overridden per call)."""
        # "stream" is LangChain's routing flag; tracing metadata is not an option
        kwargs = {k: v for k, v in kwargs.items() if k != "stream" and k not in _TRACING_OPTIONS}
        unknown = sorted(set(kwargs) - CALL_OPTIONS)
        if unknown:
            raise TypeError(
                f"ChatGemmaLocal got unexpected option(s) {unknown}; per-call options are "
                f"stop, {', '.join(sorted(CALL_OPTIONS))}"
            )
        model = kwargs.get("model")
        if model is not None and model != self.model:
            raise ValueError(
                f"this ChatGemmaLocal serves {self.model!r}, not {model!r}; create a "
                "ChatGemmaLocal for that model instead"
            )
        timeout = kwargs["timeout"] if kwargs.get("timeout") is not None else self.timeout
        return self._sampling_params(stop, kwargs), timeout

    @staticmethod
    def _conversation(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
        """OpenAI-style dicts, validated by core (so bad input fails before anything loads)."""
        conversation = convert_messages_to_dicts(messages)
        normalize_messages(conversation)
        return conversation

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], SamplingParams, float | None]:
        """Conversation, params and timeout of one call; raises before anything loads."""
        params, timeout = self._options(stop, kwargs)
        return self._conversation(messages), params, timeout

    def _deltas(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Iterator[Delta], SamplingParams]:
        conversation, params, timeout = self._request(messages, stop, kwargs)
        client = self._core()
        cold = not client.is_loaded
        deltas = client.stream_deltas([conversation], params)  # loads if needed
        return _until_deadline(deltas, timeout, cold), params

    def _adeltas(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[AsyncIterator[Delta], SamplingParams]:
        conversation, params, timeout = self._request(messages, stop, kwargs)
        client = self._core()
        cold = not client.is_loaded
        deltas = client.astream_deltas([conversation], params)  # loads on the model thread
        return _auntil_deadline(deltas, timeout, cold), params

    def _chunk(self, delta: Delta, params: SamplingParams) -> ChatGenerationChunk:
        """One delta as a chunk.

        Each tool call it completes becomes one whole ``tool_call_chunk``; its
        thinking text goes to ``additional_kwargs["reasoning_content"]``. The
        last chunk carries usage and metadata, and a call ``max_tokens`` cut
        off as an entry of ``invalid_tool_calls`` (with no ``tool_call_chunk``:
        LangChain would parse partial JSON arguments into a call that looks whole).
        """
        calls = [
            tool_call_chunk(name=c.name, args=c.arguments, id=c.id, index=c.index)
            for c in delta.tool_calls
        ]
        extra = {"reasoning_content": delta.reasoning} if delta.reasoning else {}
        if delta.finish_reason is None:
            return ChatGenerationChunk(
                message=AIMessageChunk(
                    content=delta.text, tool_call_chunks=calls, additional_kwargs=extra
                )
            )
        metadata = {
            "model_name": self.model,
            "finish_reason": delta.finish_reason,
            "model_provider": "gemma_local",
        }
        message = AIMessageChunk(
            content=delta.text,
            additional_kwargs=extra,
            tool_call_chunks=calls,
            usage_metadata=_usage(delta),
            response_metadata=metadata,
            chunk_position="last",
        )
        cut = _cut_call(delta, params)
        if cut is not None:
            message.invalid_tool_calls = [cut]
        return ChatGenerationChunk(message=message, generation_info=dict(metadata))

    # ------------------------------------------------------------ BaseChatModel

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        deltas, params = self._deltas(messages, stop, kwargs)
        with closing(deltas):  # type: ignore[type-var]
            for delta in deltas:
                chunk = self._chunk(delta, params)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        deltas, params = self._adeltas(messages, stop, kwargs)
        async with aclosing(deltas):  # type: ignore[type-var]
            async for delta in deltas:
                chunk = self._chunk(delta, params)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if run_manager is not None and run_manager.handlers:  # they get every piece of text
            last: list[ChatGenerationChunk] = []
            chunks = self._stream(messages, stop, run_manager, **kwargs)
            return _with_cut_call(generate_from_stream(_keep_last(chunks, last)), last)
        # No one listens: fold the deltas first, not one message chunk per token.
        deltas, params = self._deltas(messages, stop, kwargs)
        with closing(deltas):  # type: ignore[type-var]
            return self._result(fold_deltas(deltas), params)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if run_manager is not None and run_manager.handlers:
            last: list[ChatGenerationChunk] = []
            chunks = self._astream(messages, stop, run_manager, **kwargs)
            result = await agenerate_from_stream(_akeep_last(chunks, last))
            return _with_cut_call(result, last)
        deltas, params = self._adeltas(messages, stop, kwargs)
        async with aclosing(deltas):  # type: ignore[type-var]
            return self._result(fold_deltas([delta async for delta in deltas]), params)

    def _result(self, delta: Delta, params: SamplingParams) -> ChatResult:
        """A whole reply (one folded delta) as the result ``generate_from_stream`` builds."""
        chunk = self._chunk(delta, params)
        message = message_chunk_to_message(chunk.message)
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=chunk.generation_info)]
        )

    # ------------------------------------------------------------ tools and structured output

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; the model's calls come back as ``AIMessage.tool_calls``.

        Decoding is constrained by a grammar, so every call parses, names one
        of these tools and has arguments that validate against its schema.

        Args:
            tools: anything :func:`~langchain_core.utils.function_calling.convert_to_openai_tool`
                takes: ``@tool`` functions, ``BaseTool``, plain functions, pydantic
                classes, ``TypedDict`` classes, JSON schema or OpenAI tool dicts.
            tool_choice: ``None`` / ``"auto"`` (prose or calls, the model decides),
                ``"none"`` (no calls; the tools are not shown to the model),
                ``"required"`` / ``"any"`` / ``True`` (one or more calls), a tool's
                name or ``{"type": "function", "function": {"name": ...}}``
                (exactly one call of that tool).
            parallel_tool_calls: whether one reply may hold several calls.
                Default ``None``: yes.
            strict: passed to ``convert_to_openai_tool`` (closes the schemas'
                objects); the schemas are enforced either way.
            kwargs: other options bound with the tools (``temperature``, ...).

        Raises:
            ValueError: an unknown tool name or mode in ``tool_choice``, or a
                schema constrained decoding cannot handle; raised here, before
                anything loads. (Two tools of one name fail when called.)
        """
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        choice = convert_tool_choice(tool_choice, formatted)
        # Validate (and compile) now. A second tool of the same name is only rejected
        # when the model is called, as hosted APIs do (the standard suite binds one).
        checked, seen = [], set()
        for tool in formatted:
            function = tool.get("function")
            name = function.get("name") if isinstance(function, Mapping) else None
            if name is None or name not in seen:
                seen.add(name)
                checked.append(tool)
        self._sampling_params(
            None,
            {"tools": checked, "tool_choice": choice, "parallel_tool_calls": parallel_tool_calls},
        )
        if choice is not None:
            kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable whose output is ``schema``-shaped: a pydantic object or a dict.

        Args:
            schema: a pydantic class (output: an instance), a ``TypedDict``
                class, a JSON schema dict or an OpenAI tool dict (output: a dict).
                Optional for ``method="json_mode"``.
            method:
                ``"json_schema"`` (default): the reply is JSON constrained by the
                schema (core ``response_format`` of type ``json_schema``).
                ``"function_calling"``: the schema is bound as a tool and that
                tool is forced (exactly one call); the output is its arguments.
                ``"json_mode"``: the reply is constrained to *some* JSON object
                (``{"type": "json_object"}``); say in the prompt which keys you
                want. Parsed with the schema if one is given.
            include_raw: return ``{"raw": AIMessage, "parsed": ..., "parsing_error":
                ...}`` instead of raising when parsing fails.
            strict: whether objects are closed (no keys the schema does not
                list). Default ``None``: closed, as tool arguments always are;
                ``False`` leaves ``json_schema`` objects open where the schema
                does. The schema's own rules are enforced either way.

        Raises:
            ValueError: an unknown method, unexpected arguments, a missing
                schema, or a schema constrained decoding cannot handle (before
                anything loads).

        A complete reply always parses and validates (the grammar sees to it).
        One cut off by ``max_tokens`` (``finish_reason == "length"``) does not:
        the runnable raises an ``OutputParserException`` saying so, with the
        token count and the partial output, or with ``include_raw=True``
        returns it as ``parsing_error`` (``parsed`` is ``None``).
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        if schema is None and method != "json_mode":
            raise ValueError(
                f"method={method!r} needs a schema; only 'json_mode' works without one"
            )
        tracing: dict[str, Any] = (
            {}
            if schema is None
            else {
                "ls_structured_output_format": {
                    "kwargs": {"method": method, "strict": strict},
                    "schema": schema,
                }
            }
        )
        parser: Runnable[Any, Any]
        if method == "function_calling":
            assert schema is not None
            tool = convert_to_openai_tool(schema, strict=strict)
            name = tool["function"]["name"]
            llm = self.bind_tools([tool], tool_choice=name, parallel_tool_calls=False, **tracing)
            if _is_pydantic_class(schema):
                parser = _PydanticToolParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = _KeyToolParser(key_name=name, first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                assert schema is not None
                # Closed objects unless strict=False: a reply has exactly the schema's keys
                # (tool arguments always are; core closes them itself).
                response_format = convert_to_response_format(schema, strict is not False)
            else:
                response_format = {"type": "json_object"}
            self._sampling_params(None, {"response_format": response_format})  # check it now
            llm = self.bind(response_format=response_format, **tracing)
            if _is_pydantic_class(schema):
                parser = _PydanticParser(pydantic_object=schema)  # type: ignore[arg-type]
            elif method == "json_schema":
                parser = _JsonParser(label=response_format["json_schema"]["name"])
            else:
                parser = _JsonParser(label="json_mode")
        else:
            raise ValueError(
                f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}"
            )
        if include_raw:
            parsed = RunnablePassthrough.assign(
                parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
            )
            unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parsed.with_fallbacks(
                [unparsed], exception_key="parsing_error"
            )
        return llm | parser

    # ------------------------------------------------------------ batching

    def _cache_active(self) -> bool:
        if self.cache is False:
            return False
        return self.cache is not None or get_llm_cache() is not None

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """LangChain's ``batch``, with every input's ``invoke`` running at once.

        Each call is a request of its own, and the core client's scheduler
        decodes concurrent requests together (continuous batching); LangChain's
        default pool would run only a few at a time. ``max_concurrency`` in the
        config caps how many run together. With a LangChain cache configured,
        LangChain's default pool runs them.
        """
        if len(inputs) > 1 and not self._cache_active():
            configs = get_config_list(config, len(inputs))
            if configs[0].get("max_concurrency") is None:
                configs = [{**c, "max_concurrency": len(inputs)} for c in configs]
            config = configs
        return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    # ------------------------------------------------------------ serialization

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """``True``: ``dumpd`` / ``dumps`` write the settings, ``load`` / ``loads`` rebuild.

        The id is ``["langchain_gemma_local", "chat_models", "ChatGemmaLocal"]``
        (the default ``get_lc_namespace()``, the module path), so loading needs
        ``valid_namespaces=["langchain_gemma_local"]``.
        """
        return True

    def to_json(self) -> SerializedConstructor | SerializedNotImplemented:
        """The constructor arguments that rebuild this model, never its client.

        ``client`` is excluded (a live object, maybe shared); the rebuilt model
        gets the client for ``model``, ``backend`` and the load options (shared
        with every model built with those settings; nothing loads).
        ``backend`` is written as the backend the model resolved to, like
        ``model`` (``"auto"`` could pick another backend elsewhere, for which
        the resolved model name is wrong). A Hugging Face ``token`` in
        ``client_kwargs`` is left out, so no secret is written in clear; the
        hub then authenticates the rebuilt model by ``HF_TOKEN`` or the cached
        login. (LangChain's secret markers cannot be nested inside a dict field:
        ``dumpd`` escapes them as user data.)
        """
        serialized = super().to_json()
        if serialized["type"] != "constructor":  # pragma: no cover - always serializable
            return serialized
        kwargs = dict(serialized["kwargs"])
        backend = self._core().implementation
        if backend in BACKENDS:  # a custom client's implementation is no backend
            kwargs["backend"] = backend
        if self.client_kwargs is not None and "token" in self.client_kwargs:
            options = {k: v for k, v in self.client_kwargs.items() if k != "token"}
            if options:
                kwargs["client_kwargs"] = options
            else:
                kwargs.pop("client_kwargs", None)
        serialized["kwargs"] = kwargs
        return serialized

    def __repr_args__(self) -> Any:
        """The fields pydantic shows in ``repr``, with a hub ``token`` masked (reprs reach logs)."""
        for name, value in super().__repr_args__():
            if name == "client_kwargs" and isinstance(value, dict) and "token" in value:
                value = {**value, "token": "**********"}
            yield name, value

    # ------------------------------------------------------------ metadata

    @property
    def _llm_type(self) -> str:
        return "gemma-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self._core().implementation,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
            "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias,
            "reasoning": self.reasoning,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="gemma_local",
            ls_model_name=model if isinstance(model, str) else str(self.model),
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the model's own tokenizer (loads the model)."""
        client = self._core().load()
        return list(client.tokenizer.encode(text, add_special_tokens=False))
