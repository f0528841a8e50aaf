"""``GemmaLocal``: a LlamaIndex ``FunctionCallingLLM`` over a local Gemma chat model.

Data flow, chat-first, on core's token stream (as the LangChain adapter)::

    ChatMessage[] ──to_openai_messages()──▶ OpenAI-style message dicts
        (validated by the model family before anything loads)
    fields + per-call kwargs ──SamplingParams.build──▶ frozen, validated params (once)
    client.stream_deltas([conversation], params)     (sync, on the model thread)
    client.astream_deltas([conversation], params)    (async, never blocks the loop)
        ──core.fold_deltas──▶ one Delta ──reply_response()──▶ ChatResponse   (chat)
        ──DeltaFolder──▶ one ChatResponse per Delta, then a last one with the
            usage                                                     (stream_chat)
    complete(prompt) = chat([user: prompt]) ──▶ CompletionResponse

Tools and structured output ride the same path, as OpenAI-style options that
core decodes under a grammar (so calls always parse, name a real tool and carry
schema-valid arguments, and JSON always validates, whatever the model)::

    chat_with_tools(tools, ...) ──_prepare_chat_with_tools──▶ chat(messages,
        tools=[to_openai_tool(t)], tool_choice=..., parallel_tool_calls=...)
        ──▶ ChatResponse whose message carries ToolCallBlocks (and OpenAI
        ``tool_calls`` in additional_kwargs) ──get_tool_calls_from_response──▶ ToolSelection[]
    structured_predict(Model, prompt) ──chat(messages, response_format=json_schema(Model))──▶
        Model.model_validate_json(reply)

Thinking (Gemma 4, ``thinking=True`` or a ``reasoning_effort`` other than
``"none"``): the model's thought comes as ``Delta.reasoning``, apart from the
answer; it becomes a ``ThinkingBlock`` (``content``, ``num_tokens`` = the
reasoning tokens) before the text in the message's blocks, and, when
streaming, each response's ``additional_kwargs["thinking_delta"]`` (how
LlamaIndex's Ollama and Anthropic integrations expose it, and what its agents
read into ``AgentStream.thinking_delta``). A ``ThinkingBlock`` of an earlier
assistant message goes back to core as ``reasoning_content``.

Everything model-side happens in ``core``: this module neither renders
prompts (the Gemma chat template, the tool declarations and the rendering of
tool calls / results into Gemma turns are core's family's), nor counts
tokens, nor parses output. It maps LlamaIndex types to OpenAI-style dicts,
:class:`~core.Delta` records to LlamaIndex types, and merges options.

Layout: this module holds ``GemmaLocal`` (options, the shared core client,
the sync / async / tools / structured paths); the pure conversions it uses
live beside it, each re-exported here: :mod:`.messages` (``ChatMessage`` and
tools <-> OpenAI-style dicts), :mod:`.responses` (core's deltas and
OpenAI-style dicts -> ``ChatResponse``, stream folding) and :mod:`.structured`
(``response_format`` of a pydantic class, parsing the reply).

* ``raw`` of every response is the OpenAI-style dict of what it carries,
  written by :mod:`core.openai_format`: the ``chat.completion`` for
  ``chat``/``complete``; a ``chat.completion.chunk`` per streamed response
  (the last streamed response carries the final usage chunk).
* ``additional_kwargs`` holds ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``, ``reasoning_tokens`` (when the model thought) and
  ``finish_reason`` (on the last streamed response).
* The async methods read core's async stream, which runs loading and
  generation on the client's model thread and hands deltas to the event loop
  with ``call_soon_threadsafe``; the loop is never blocked (unlike
  ``CustomLLM``'s async defaults, which call the sync methods).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from typing import TYPE_CHECKING, Any, Literal

from core import BaseGemmaChatCompletion, Delta, SamplingParams, create_gemma_client, fold_deltas
from core.errors import MissingDependencyError
from core.factory import DEFAULT_MODELS, check_backend_settings, resolve_backend

try:
    import llama_index.core.instrumentation as instrument
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
    )
    from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
    from llama_index.core.instrumentation.events.llm import (
        LLMStructuredPredictEndEvent,
        LLMStructuredPredictStartEvent,
    )
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import ToolSelection
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.types import Model, PydanticProgramMode
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "llama_index_gemma_local needs llama-index-core, which is not installed. "
        'Install it with: pip install "gemma-local[llama-index]"'
    ) from exc

from .messages import (
    ROLES,
    TOOL_CHOICE_MODES,
    assistant_message,
    resolve_tool_choice,
    to_openai_message,
    to_openai_messages,
    to_openai_tool,
    tool_selections,
)
from .responses import (
    DeltaFolder,
    StreamFolder,
    chat_to_completion_response,
    completion_to_chat_response,
    reply_response,
    usage_kwargs,
)
from .structured import json_schema_format, parse_structured

if TYPE_CHECKING:
    from llama_index.core.program.utils import FlexibleModel
    from llama_index.core.tools.types import BaseTool

# The helpers live in messages / responses / structured (imported after the
# llama-index-core check above); ``from llama_index_gemma_local.base import ...``
# still finds them.
__all__ = [
    "CALL_OPTIONS",
    "ROLES",
    "TOOL_CHOICE_MODES",
    "DeltaFolder",
    "GemmaLocal",
    "StreamFolder",
    "assistant_message",
    "chat_to_completion_response",
    "completion_to_chat_response",
    "json_schema_format",
    "parse_structured",
    "reply_response",
    "resolve_tool_choice",
    "to_openai_message",
    "to_openai_messages",
    "to_openai_tool",
    "tool_selections",
    "usage_kwargs",
]

dispatcher = instrument.get_dispatcher(__name__)

#: Options a call may pass (``llm.chat(messages, temperature=0)``), besides ``formatted``.
CALL_OPTIONS = frozenset(
    {
        "temperature",
        "max_tokens",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "repetition_penalty",
        "logit_bias",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "thinking",
        "reasoning_effort",
    }
)


# ----------------------------------------------------------------------- the LLM


#: Clients made by GemmaLocal itself, by (backend, model, client_kwargs).
_SHARED_CLIENTS: weakref.WeakValueDictionary[tuple[str, str, str], BaseGemmaChatCompletion] = (
    weakref.WeakValueDictionary()
)
_SHARED_LOCK = threading.Lock()


def _shared_client(
    backend: str, model: str | None, options: Mapping[str, Any]
) -> BaseGemmaChatCompletion:
    """The core client for these settings, shared by every GemmaLocal built with them.

    As ``ChatGemmaLocal`` does: creating a client loads nothing, and sharing
    makes sure that two ``GemmaLocal(model=same)`` (say, under
    ``asyncio.gather``) never load two copies of the same weights.
    """
    chosen = resolve_backend(backend)
    # transformers-only options elsewhere, llama.cpp without a model, vLLM not
    # installed: clear errors before a client exists
    check_backend_settings(chosen, model, options)
    name = model if model is not None else DEFAULT_MODELS[chosen]
    key = (chosen, name, repr(sorted(options.items())))
    with _SHARED_LOCK:
        client = _SHARED_CLIENTS.get(key)
        if client is None:
            client = create_gemma_client(chosen, name, **options)
            _SHARED_CLIENTS[key] = client
        return client


class GemmaLocal(FunctionCallingLLM):
    """A local Gemma chat model as a LlamaIndex ``FunctionCallingLLM`` (transformers, MLX, llama.cpp, vLLM).

    Chat-first: every call goes through the model's own chat template;
    ``complete(prompt)`` is ``chat([user: prompt])``. Works anywhere LlamaIndex
    expects an LLM (``Settings.llm``, query engines, chat engines, agents).
    Tool calls and structured output are decoded under a grammar by core, so
    they always parse and validate, even from a small model.

    Setup:
        ``pip install "gemma-local[transformers,llama-index]"`` (or ``[mlx,llama-index]``
        on Apple Silicon, ``[llamacpp,llama-index]`` for GGUF files on the CPU,
        ``[vllm,llama-index]`` for vLLM's engine).

    Instantiate (constructing never loads weights; the first call does). Every
    ``GemmaLocal`` built with the same ``backend``, ``model`` and
    ``client_kwargs`` shares one core client, so the weights load once::

        from llama_index_gemma_local import GemmaLocal

        llm = GemmaLocal(model="google/gemma-3-12b-it", temperature=0.2, max_tokens=512)
        # or share one loaded model with other adapters / the OpenAI-style API:
        llm = GemmaLocal(client=core.create_gemma_client("mlx"), temperature=0.2)
        # a GGUF file on llama.cpp (model required), or vLLM's engine:
        llm = GemmaLocal("gemma-3-4b-it-Q4_K_M.gguf", backend="llamacpp",
                         client_kwargs={"n_threads": 8})
        llm = GemmaLocal("google/gemma-3-12b-it", backend="vllm",
                         client_kwargs={"tensor_parallel_size": 2})

    Settings a backend cannot take raise before anything loads: ``use_4bit_quantization``
    / ``device_map`` in ``client_kwargs`` on any backend but transformers, llama.cpp
    without ``model``, and vLLM where the ``vllm`` package is not installed
    (``MissingDependencyError`` naming the ``vllm`` extra and ``scripts/vllm_env.sh``).

    Chat / complete::

        llm.chat([ChatMessage(role="user", content="Hi")]).message.content
        llm.complete("Hi", max_tokens=64, stop=["\\n\\n"]).text

    Stream::

        for r in llm.stream_chat(messages):
            print(r.delta, end="")

    Async (never blocks the event loop; concurrent calls queue on the model thread)::

        await llm.achat(messages)
        async for r in await llm.astream_complete("Hi"):
            print(r.delta, end="")

    Images and audio (Gemma 3 4b+ and Gemma 4 read images, Gemma 4 E2B/E4B also
    audio; transformers backend; ``ImageBlock`` / ``AudioBlock`` in user messages,
    from bytes, a path or a URL; also in a chat engine's ``chat_history``)::

        from llama_index.core.llms import AudioBlock, ImageBlock, TextBlock

        llm.chat([ChatMessage(role="user", blocks=[
            TextBlock(text="What is on this screen?"), ImageBlock(path="screenshot.png"),
        ])])
        llm.chat([ChatMessage(role="user", blocks=[AudioBlock(path="note.wav")])])

    Tools (``FunctionCallingLLM``)::

        from llama_index.core.tools import FunctionTool

        def add(a: int, b: int) -> int:
            return a + b

        tool = FunctionTool.from_defaults(add, description="Add two integers.")
        response = llm.chat_with_tools([tool], user_msg="What is 2 + 3?", tool_required=True)
        llm.get_tool_calls_from_response(response)  # [ToolSelection(tool_name="add", ...)]
        llm.predict_and_call([tool], user_msg="What is 2 + 3?")  # calls add(...)
        FunctionAgent(tools=[tool], llm=llm).run("What is 2 + 3?")

    Thinking (Gemma 4; off by default; ``thinking=True`` on a model that cannot
    think raises ``ValueError`` before anything loads)::

        llm = GemmaLocal(model="google/gemma-4-E4B-it", thinking=True)
        response = llm.chat(messages)  # or per call: llm.chat(messages, thinking=True)
        thought = response.message.blocks[0]  # ThinkingBlock(content=..., num_tokens=...)
        response.message.content  # the answer only
        for r in llm.stream_chat(messages, reasoning_effort="high"):
            print(r.additional_kwargs.get("thinking_delta", ""), r.delta, end="")

    Structured output (constrained to the class's JSON schema)::

        song = llm.structured_predict(Song, PromptTemplate("A song about {topic}."), topic="sea")
        llm.as_structured_llm(Song).chat(messages).raw  # a Song

    With LlamaIndex::

        from llama_index.core import Settings, VectorStoreIndex
        Settings.llm = llm
        index.as_query_engine(streaming=True).query("...")

    Per-call options (``temperature``, ``max_tokens``, ``top_p``, ``top_k``,
    ``stop``, ``seed``, ``repetition_penalty``, ``logit_bias``, ``thinking``,
    ``reasoning_effort`` (OpenAI's spelling: ``"none"`` is off, any other
    effort on), and core's ``tools``, ``tool_choice``, ``parallel_tool_calls``,
    ``response_format``) override the fields for that call. ``messages_to_prompt`` /
    ``completion_to_prompt`` are not used: the Gemma chat template always
    formats the prompt.
    """

    model: str | None = Field(
        default=None,
        description=(
            "Hub id or local folder of the Gemma checkpoint; on llama.cpp the path of a "
            ".gguf file (required there). Default: None, the backend's "
            "default (google/gemma-3-12b-it on transformers and vLLM, "
            "mlx-community/gemma-3-12b-it-4bit-DWQ on MLX). Set to the client's model "
            "when a client is given."
        ),
    )
    backend: Literal["auto", "transformers", "mlx", "llamacpp", "vllm"] = Field(
        default="auto",
        description=(
            "Which backend loads the model (core.factory.BACKENDS). Default: 'auto' (MLX on "
            "Apple Silicon with mlx-lm installed, transformers otherwise). 'llamacpp' runs a "
            "GGUF file (gemma-local[llamacpp]); 'vllm' runs vLLM's engine (gemma-local[vllm], "
            "or the environment scripts/vllm_env.sh builds). Ignored when a client is given."
        ),
    )
    client_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Options for the backend's constructor, e.g. use_4bit_quantization, device_map, "
            "torch_dtype (transformers only), max_kv_size (MLX), n_threads, n_ctx "
            "(llama.cpp) or tensor_parallel_size, engine_args (vLLM). Default: {}."
        ),
    )
    temperature: float | None = Field(
        default=None,
        description="Sampling temperature in [0, 2]; 0 is greedy. Default: None (core's 0.7).",
    )
    max_tokens: int | None = Field(
        default=None,
        description=(
            "Most new tokens per reply (>= 1); also LlamaIndex's num_output. "
            "Default: None (core's 2048)."
        ),
    )
    top_p: float | None = Field(
        default=None, description="Nucleus sampling mass in (0, 1]. Default: None (core's 1.0)."
    )
    top_k: int | None = Field(
        default=None,
        description="Sample from the k likeliest tokens; 0 is off. Default: None (off).",
    )
    stop: list[str] | None = Field(
        default=None,
        description="Strings that end the reply (not included in it). Default: None (no stop strings).",
    )
    seed: int | None = Field(
        default=None, description="Seed for reproducible sampling. Default: None (unseeded)."
    )
    repetition_penalty: float | None = Field(
        default=None, description="> 0; 1.0 is off. Default: None (off)."
    )
    logit_bias: dict[int, float] | None = Field(
        default=None,
        description=(
            "Token id -> bias in [-100, 100] added to its logit at every step (OpenAI's "
            "logit_bias); a per-call logit_bias replaces it. It steers every call this LLM "
            "makes, also those an agent or engine makes for you. Default: None (no bias)."
        ),
    )
    thinking: bool | None = Field(
        default=None,
        description=(
            "Let a model that can think (Gemma 4) think before it answers; the thought comes "
            "back as a ThinkingBlock before the answer (and as additional_kwargs['thinking_delta'] "
            "when streaming) and counts against max_tokens. True on a model that cannot think "
            "(Gemma 1-3) raises ValueError. Default: None (off)."
        ),
        strict=True,  # not "yes" read as True
    )
    context_window: int | None = Field(
        default=None,
        description=(
            "Tokens the model reads and writes per call, for LlamaIndex's prompt packing. "
            "Default: None, read from the model's config.json (local folder or HF cache) "
            f"without loading weights; {DEFAULT_CONTEXT_WINDOW} when that is unreadable."
        ),
    )

    _client: BaseGemmaChatCompletion = PrivateAttr()
    _config_context_window: int | None = PrivateAttr(default=None)

    def __init__(
        self,
        model: str | None = None,
        *,
        client: BaseGemmaChatCompletion | None = None,
        callback_manager: CallbackManager | None = None,
        **kwargs: Any,
    ) -> None:
        if client is not None:
            if not isinstance(client, BaseGemmaChatCompletion):
                raise TypeError(
                    f"client must be a core.BaseGemmaChatCompletion, got {type(client).__name__}"
                )
            if model is not None and model != client.model_name:
                raise ValueError(
                    f"model={model!r} does not match the client's model {client.model_name!r}; "
                    "pass one or the other"
                )
            if kwargs.get("client_kwargs"):
                raise ValueError(
                    "client_kwargs configure a new client; they cannot apply to a given one"
                )
            model = client.model_name
        data = dict(kwargs, model=model)
        if callback_manager is not None:
            data["callback_manager"] = callback_manager
        super().__init__(**data)
        # Validate the sampling fields now, with core's bounds and messages.
        params = SamplingParams.build(**self._field_options())
        if client is None:  # one client per (backend, model, client_kwargs) in the process
            client = _shared_client(self.backend, self.model, self.client_kwargs)
            self.model = client.model_name
        self._client = client
        # thinking=True on a family that cannot think (config.json or the name; no load)
        client.family.check(params, params.thinking)

    @classmethod
    def class_name(cls) -> str:
        return "GemmaLocal"

    @property
    def client(self) -> BaseGemmaChatCompletion:
        """The core client (share it: ``GemmaLocal(client=llm.client, ...)``)."""
        return self._client

    @property
    def metadata(self) -> LLMMetadata:
        """Model facts for LlamaIndex; never loads weights."""
        num_output = self.max_tokens if self.max_tokens is not None else SamplingParams().max_tokens
        return LLMMetadata(
            context_window=self._context_window(),
            num_output=num_output,
            is_chat_model=True,
            # the built-in backends constrain decoding; a custom client may not
            is_function_calling_model=self._client.supports_constraints,
            model_name=self._client.model_name,
        )

    def _context_window(self) -> int:
        if self.context_window is not None:
            return self.context_window
        if self._config_context_window is None:
            # get_model_info never loads; it reads config.json (or the loaded config).
            self._config_context_window = self._client.get_model_info().get("context_window")
        return self._config_context_window or DEFAULT_CONTEXT_WINDOW

    # ------------------------------------------------------------- options

    def _field_options(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
            "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias,
            "thinking": self.thinking,
        }

    def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Field values overridden by the call's options (``None`` = not given)."""
        unknown = set(kwargs) - CALL_OPTIONS
        if unknown:
            raise TypeError(
                f"unexpected option(s) {sorted(unknown)} for GemmaLocal; "
                f"allowed per-call options: {', '.join(sorted(CALL_OPTIONS))}"
            )
        options = self._field_options()
        given = {k: v for k, v in kwargs.items() if v is not None}
        if "thinking" in given or "reasoning_effort" in given:
            options.pop("thinking")  # the call decides, whichever way it spells it
        options.update(given)
        if "tools" in options:
            tools = options["tools"]
            if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
                raise ValueError(f"tools must be a list of tools, got {type(tools).__name__}")
            options["tools"] = [to_openai_tool(t) for t in tools]
        if "tool_choice" in options:
            options["tool_choice"] = resolve_tool_choice(options["tool_choice"])
        return options

    def _request(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], SamplingParams]:
        """The conversation and params of one call, validated before anything loads.

        The options become one :class:`~core.SamplingParams` here; the model's
        family checks what it cannot serve (``thinking`` on Gemma 1-3) and
        reads the conversation as it will render it, so bad input fails now,
        at call time, even for a stream that has not been read yet.
        """
        conversation = to_openai_messages(messages)
        params = SamplingParams.build(**self._options(kwargs))
        client = self._client
        if params.constrained and not client.supports_constraints:
            raise NotImplementedError(
                f"the client {type(client).__name__} cannot constrain decoding, so GemmaLocal "
                "cannot serve tools or structured output with it; use a built-in client "
                "(transformers, MLX, llama.cpp or vLLM)"
            )
        family = client.family
        family.check(params, params.thinking)
        family.render_inputs(conversation, params, params.thinking)
        return conversation, params

    def _prompt_messages(self, prompt: str, formatted: bool) -> list[ChatMessage]:
        """``complete``'s conversation: the prompt as one user turn.

        ``system_prompt`` is added unless ``formatted`` (LlamaIndex passes
        ``formatted=True`` once it has added it to the prompt itself).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        return messages if formatted else self._extend_messages(messages)

    # ---------------------------------------------------------------- sync

    def _deltas(self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]) -> Iterator[Delta]:
        conversation, params = self._request(messages, kwargs)
        return self._client.stream_deltas([conversation], params)  # loads if needed

    def _chat(self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]) -> ChatResponse:
        deltas = self._deltas(messages, kwargs)
        with closing(deltas):  # type: ignore[type-var]
            reply = fold_deltas(deltas)
        return reply_response(reply, self._client.model_name)

    def _stream_chat(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> ChatResponseGen:
        # Validate now, at call time; generation starts with the first read.
        deltas = self._deltas(messages, kwargs)
        model = self._client.model_name

        def gen() -> ChatResponseGen:
            folder = DeltaFolder(model)
            with closing(deltas):  # type: ignore[type-var]  # an early stop stops generating
                for delta in deltas:
                    yield from folder.feed(delta)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return chat_to_completion_response(
            self._chat(self._prompt_messages(prompt, formatted), kwargs)
        )

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        responses = self._stream_chat(self._prompt_messages(prompt, formatted), kwargs)

        def gen() -> CompletionResponseGen:
            try:
                for response in responses:
                    yield chat_to_completion_response(response)
            finally:
                responses.close()

        return gen()

    # --------------------------------------------------------------- async

    def _adeltas(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> AsyncIterator[Delta]:
        conversation, params = self._request(messages, kwargs)
        return self._client.astream_deltas([conversation], params)  # loads on the model thread

    async def _achat(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> ChatResponse:
        deltas = self._adeltas(messages, kwargs)
        async with aclosing(deltas):  # type: ignore[type-var]  # a cancelled task stops it
            reply = fold_deltas([delta async for delta in deltas])
        return reply_response(reply, self._client.model_name)

    async def _astream_chat(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> ChatResponseAsyncGen:
        deltas = self._adeltas(messages, kwargs)
        model = self._client.model_name

        async def gen() -> ChatResponseAsyncGen:
            folder = DeltaFolder(model)
            async with aclosing(deltas):  # type: ignore[type-var]
                async for delta in deltas:
                    for response in folder.feed(delta):
                        yield response

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._achat(messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return await self._astream_chat(messages, kwargs)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        response = await self._achat(self._prompt_messages(prompt, formatted), kwargs)
        return chat_to_completion_response(response)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        responses = await self._astream_chat(self._prompt_messages(prompt, formatted), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            try:
                async for response in responses:
                    yield chat_to_completion_response(response)
            finally:
                await responses.aclose()

        return gen()

    # --------------------------------------------------------------- tools

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat()``'s arguments for a call with tools (``chat_with_tools`` & co use it).

        ``tool_choice``: ``"auto"`` (the default), ``"none"``, ``"required"``
        (the default when ``tool_required``), a tool's name or OpenAI's
        ``{"type": "function", "function": {"name": ...}}``.
        ``allow_parallel_tool_calls=False`` lets the grammar allow one call
        only. ``strict`` (OpenAI's) is accepted and changes nothing: arguments
        are always decoded under the tool's schema. ``chat_history`` is not
        modified.
        """
        del verbose, strict  # nothing to print: the calls are in the response; always strict
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        prepared: dict[str, Any] = {"messages": messages, **kwargs}
        specs = [to_openai_tool(t) for t in tools]
        if specs:
            prepared["tools"] = specs
            prepared["tool_choice"] = resolve_tool_choice(tool_choice, tool_required)
            prepared["parallel_tool_calls"] = allow_parallel_tool_calls
        elif tool_choice is not None or tool_required:
            # no tools: core explains why a choice cannot apply
            prepared["tool_choice"] = resolve_tool_choice(tool_choice, tool_required)
        return prepared

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The response's tool calls as ``ToolSelection(tool_id, tool_name, tool_kwargs)``.

        Raises:
            ValueError: there is no call and ``error_on_no_tool_call`` is true.
        """
        selections = tool_selections(response.message)
        if not selections and error_on_no_tool_call:
            counts = response.additional_kwargs
            cut = counts.get("finish_reason") == "length"
            if cut and not response.message.content:  # a call was being written, or a thought
                used = counts.get("completion_tokens")
                where = (
                    "while the model was still thinking"
                    if used is not None and counts.get("reasoning_tokens") == used
                    else "before a call was complete"
                )
                raise ValueError(
                    f"Expected at least one tool call, but the reply was cut off after {used} "
                    "tokens (max_tokens, or what the context window left after the prompt) "
                    f"{where}; raise max_tokens"
                )
            raise ValueError(
                "Expected at least one tool call, but the model answered with text: "
                f"{response.message.content!r}. Pass tool_required=True (or a tool's name as "
                "tool_choice) to force a call"
            )
        return selections

    # --------------------------------------------------- structured output

    def _structured_kwargs(
        self, output_cls: type[BaseModel], llm_kwargs: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        kwargs = dict(llm_kwargs or {})
        kwargs["response_format"] = json_schema_format(output_cls)
        return kwargs

    def _structured_messages(self, prompt: PromptTemplate, prompt_args: Any) -> list[ChatMessage]:
        return self._extend_messages(prompt.format_messages(llm=self, **prompt_args))

    def _uses_json_schema(self) -> bool:
        """LlamaIndex's default program mode takes the constrained JSON route.

        A client that cannot constrain decoding (a custom backend) keeps
        LlamaIndex's text-parsing route, as for any LLM without function calling.
        """
        return (
            self.pydantic_program_mode == PydanticProgramMode.DEFAULT
            and self._client.supports_constraints
        )

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """``output_cls`` from the model, decoded under its JSON schema (always validates).

        ``pydantic_program_mode`` other than the default takes LlamaIndex's
        routes instead (``"function"``: a forced tool call, also constrained;
        ``"llm"``: unconstrained text parsing).
        """
        if not self._uses_json_schema():
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        response = self.chat(
            self._structured_messages(prompt, prompt_args),
            **self._structured_kwargs(output_cls, llm_kwargs),
        )
        result = parse_structured(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Async :meth:`structured_predict`."""
        if not self._uses_json_schema():
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        response = await self.achat(
            self._structured_messages(prompt, prompt_args),
            **self._structured_kwargs(output_cls, llm_kwargs),
        )
        result = parse_structured(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    def _structured_stream_call(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Generator[Model | list[Model] | FlexibleModel | list[FlexibleModel], None, None]:
        """Partial objects while the JSON streams in, then the validated ``output_cls``.

        Behind ``stream_structured_predict`` and ``as_structured_llm(...).stream_chat``.
        """
        if not self._uses_json_schema():
            yield from super()._structured_stream_call(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
            return
        from llama_index.core.program.streaming_utils import (
            process_streaming_content_incremental,
        )

        responses = self.stream_chat(
            self._structured_messages(prompt, prompt_args),
            **self._structured_kwargs(output_cls, llm_kwargs),
        )
        current: Any = None
        try:
            for response in responses:
                if response.additional_kwargs.get("finish_reason") is not None:
                    yield parse_structured(output_cls, response)  # the last one
                else:
                    current = process_streaming_content_incremental(response, output_cls, current)
                    yield current
        finally:
            responses.close()

    async def _structured_astream_call(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncGenerator[Model | list[Model] | FlexibleModel | list[FlexibleModel], None]:
        """Async :meth:`_structured_stream_call`."""
        if not self._uses_json_schema():
            return await super()._structured_astream_call(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        from llama_index.core.program.streaming_utils import (
            process_streaming_content_incremental,
        )

        responses = await self.astream_chat(
            self._structured_messages(prompt, prompt_args),
            **self._structured_kwargs(output_cls, llm_kwargs),
        )

        async def gen() -> AsyncGenerator[Any, None]:
            current: Any = None
            try:
                async for response in responses:
                    if response.additional_kwargs.get("finish_reason") is not None:
                        yield parse_structured(output_cls, response)
                    else:
                        current = process_streaming_content_incremental(
                            response, output_cls, current
                        )
                        yield current
            finally:
                await responses.aclose()

        return gen()
