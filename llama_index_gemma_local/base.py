"""``GemmaLocal``: a LlamaIndex ``LLM`` over a local Gemma chat model (transformers or MLX).

Data flow, chat-first::

    ChatMessage[] ──to_openai_messages()──▶ OpenAI-style message dicts
        ──client.create() / client.acreate() (stream or not)──▶ chat.completion(.chunk) dicts
        ──completion_to_chat_response() / StreamFolder──▶ ChatResponse
    complete(prompt) = chat([user: prompt]) ──▶ CompletionResponse

Everything model-side happens in ``core``: ``create``/``acreate`` are core's one
fold of the token primitive (``stream_deltas`` / ``astream_deltas``) into the
OpenAI format, so this module neither renders prompts (the Gemma chat template
is always applied by core), nor counts tokens, nor re-folds deltas. It maps
LlamaIndex types to OpenAI-style dicts and back, and merges options.

* ``raw`` of every response is the OpenAI-style dict it came from: the
  ``chat.completion`` for ``chat``/``complete``; each ``chat.completion.chunk``
  when streaming (the last streamed response carries the final usage chunk).
* ``additional_kwargs`` holds ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens`` and ``finish_reason`` (on the last streamed response).
* The async methods await core's async API, which runs loading and generation
  on the client's model thread and hands results to the event loop with
  ``call_soon_threadsafe``; the loop is never blocked (unlike ``CustomLLM``'s
  async defaults, which call the sync methods).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from core import BaseGemmaChatCompletion, SamplingParams, create_gemma_client
from core.errors import MissingDependencyError

try:
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
        TextBlock,
    )
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.llm import LLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "llama_index_gemma_local needs llama-index-core, which is not installed. "
        'Install it with: pip install "gemma-local[llama-index]"'
    ) from exc

#: LlamaIndex roles and the OpenAI-style role each maps to. Anything else
#: (tool, function, developer, chatbot, model) is rejected.
ROLES: Mapping[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
}

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
    }
)


# ------------------------------------------------------------------ messages in


def to_openai_message(message: ChatMessage) -> dict[str, Any]:
    """One LlamaIndex ``ChatMessage`` as an OpenAI-style ``{"role", "content"}`` dict.

    One ``TextBlock`` gives a string, several give a list of text parts (core
    joins them), none gives ``""``. The input is never mutated.

    Raises:
        TypeError: ``message`` is not a ``ChatMessage``, or holds a block other
            than ``TextBlock`` (images are not supported yet).
        ValueError: a role other than system, user or assistant.
    """
    if not isinstance(message, ChatMessage):
        raise TypeError(f"expected a llama_index ChatMessage, got {type(message).__name__}")
    role = ROLES.get(message.role)
    if role is None:
        allowed = ", ".join(r.value for r in ROLES)
        raise ValueError(
            f"GemmaLocal does not support {message.role.value!r} messages; allowed roles: {allowed}"
        )
    texts = []
    for block in message.blocks:
        if not isinstance(block, TextBlock):
            hint = (
                " (images are not supported yet)" if "image" in type(block).__name__.lower() else ""
            )
            raise TypeError(
                f"GemmaLocal supports only TextBlock content, got {type(block).__name__} "
                f"in a {role} message{hint}"
            )
        texts.append(block.text)
    if len(texts) == 1:
        return {"role": role, "content": texts[0]}
    return {"role": role, "content": [{"type": "text", "text": t} for t in texts] or ""}


def to_openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """A LlamaIndex conversation as OpenAI-style message dicts (see :func:`to_openai_message`)."""
    if isinstance(messages, (str, ChatMessage)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a sequence of ChatMessage, got {type(messages).__name__}"
        )
    return [to_openai_message(m) for m in messages]


# ----------------------------------------------------------------- responses out


def usage_kwargs(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Token counts of an OpenAI ``usage`` record, for ``additional_kwargs``."""
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: usage[k] for k in keys if usage and k in usage}


def completion_to_chat_response(completion: Mapping[str, Any]) -> ChatResponse:
    """A ``chat.completion`` dict (one choice) as a ``ChatResponse``; ``raw`` is the dict."""
    choice = completion["choices"][0]
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=choice["message"]["content"]),
        raw=completion,
        additional_kwargs={
            **usage_kwargs(completion.get("usage")),
            "finish_reason": choice["finish_reason"],
        },
    )


def chat_to_completion_response(response: ChatResponse) -> CompletionResponse:
    """The ``CompletionResponse`` of a chat response (nothing is mutated)."""
    return CompletionResponse(
        text=response.message.content or "",
        additional_kwargs=dict(response.additional_kwargs),
        raw=response.raw,
        delta=response.delta,
    )


class StreamFolder:
    """Folds ``chat.completion.chunk`` dicts into streamed ``ChatResponse`` records.

    One response per chunk that carries text (``message`` holds the text so
    far, ``delta`` the new piece, ``raw`` the chunk) and a last one, with an
    empty ``delta``, for core's final usage chunk: its ``additional_kwargs``
    hold the token counts and ``finish_reason``. Shared by the sync and async
    streams so both behave the same.
    """

    def __init__(self) -> None:
        self.text = ""
        self.finish_reason: str | None = None

    def feed(self, chunk: Mapping[str, Any]) -> ChatResponse | None:
        choices = chunk.get("choices") or []
        if not choices:  # the usage chunk: always core's last
            return self._response(
                "",
                chunk,
                {**usage_kwargs(chunk.get("usage")), "finish_reason": self.finish_reason},
            )
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        delta = (choice.get("delta") or {}).get("content") or ""
        if not delta:  # the role chunk and the finish chunk carry no text
            return None
        self.text += delta
        return self._response(delta, chunk, {})

    def _response(self, delta: str, chunk: Any, extra: dict[str, Any]) -> ChatResponse:
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=self.text),
            delta=delta,
            raw=chunk,
            additional_kwargs=extra,
        )


# ----------------------------------------------------------------------- the LLM


class GemmaLocal(LLM):
    """A local Gemma chat model as a LlamaIndex ``LLM`` (transformers or Apple MLX).

    Chat-first: every call goes through the model's own chat template;
    ``complete(prompt)`` is ``chat([user: prompt])``. Works anywhere LlamaIndex
    expects an LLM (``Settings.llm``, query engines, chat engines,
    ``structured_predict`` through text parsing).

    Setup:
        ``pip install "gemma-local[transformers,llama-index]"`` (or ``[mlx,llama-index]``
        on Apple Silicon).

    Instantiate (constructing never loads weights; the first call does)::

        from llama_index_gemma_local import GemmaLocal

        llm = GemmaLocal(model="google/gemma-3-12b-it", temperature=0.2, max_tokens=512)
        # or share one loaded model with other adapters / the OpenAI-style API:
        llm = GemmaLocal(client=core.create_gemma_client("mlx"), temperature=0.2)

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

    With LlamaIndex::

        from llama_index.core import Settings, VectorStoreIndex
        Settings.llm = llm
        index.as_query_engine(streaming=True).query("...")

    Per-call options (``temperature``, ``max_tokens``, ``top_p``, ``top_k``,
    ``stop``, ``seed``, ``repetition_penalty``, ``logit_bias``) override the
    fields for that call. ``messages_to_prompt`` / ``completion_to_prompt`` are
    not used: the Gemma chat template always formats the prompt.
    """

    model: str | None = Field(
        default=None,
        description=(
            "Hub id or local folder of the Gemma checkpoint. Default: None, the backend's "
            "default (google/gemma-3-12b-it on transformers, "
            "mlx-community/gemma-3-12b-it-4bit-DWQ on MLX). Set to the client's model "
            "when a client is given."
        ),
    )
    backend: Literal["auto", "transformers", "mlx"] = Field(
        default="auto",
        description=(
            "Which backend loads the model. Default: 'auto' (MLX on Apple Silicon with "
            "mlx-lm installed, transformers otherwise). Ignored when a client is given."
        ),
    )
    client_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Options for the backend's constructor, e.g. use_4bit_quantization, device_map, "
            "torch_dtype (transformers) or max_kv_size (MLX). Default: {}."
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
        SamplingParams.build(**self._field_options())
        if client is None:
            client = create_gemma_client(self.backend, self.model, **self.client_kwargs)
            self.model = client.model_name
        self._client = client

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
            is_function_calling_model=False,
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
        options.update({k: v for k, v in kwargs.items() if v is not None})
        return options

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

    def _chat(self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]) -> ChatResponse:
        completion = self._client.create(to_openai_messages(messages), **self._options(kwargs))
        return completion_to_chat_response(completion)

    def _stream_chat(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> ChatResponseGen:
        # Validate now, at call time; generation starts with the first read.
        chunks = self._client.create(
            to_openai_messages(messages), stream=True, **self._options(kwargs)
        )

        def gen() -> ChatResponseGen:
            folder = StreamFolder()
            try:
                for chunk in chunks:
                    if (response := folder.feed(chunk)) is not None:
                        yield response
            finally:
                chunks.close()  # a reader that stops early stops the generation

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

    async def _achat(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> ChatResponse:
        completion = await self._client.acreate(
            to_openai_messages(messages), **self._options(kwargs)
        )
        return completion_to_chat_response(completion)

    async def _astream_chat(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> ChatResponseAsyncGen:
        chunks = await self._client.acreate(
            to_openai_messages(messages), stream=True, **self._options(kwargs)
        )

        async def gen() -> ChatResponseAsyncGen:
            folder = StreamFolder()
            try:
                async for chunk in chunks:
                    if (response := folder.feed(chunk)) is not None:
                        yield response
            finally:
                await chunks.aclose()

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
