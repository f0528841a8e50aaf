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

import json
import re
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from typing import TYPE_CHECKING, Any, Literal

from core import BaseGemmaChatCompletion, Delta, SamplingParams, create_gemma_client, fold_deltas
from core.errors import MissingDependencyError
from core.factory import DEFAULT_MODELS, resolve_backend
from core.openai_format import ChunkBuilder, Completion

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
        ContentBlock,
        LLMMetadata,
        MessageRole,
        TextBlock,
        ThinkingBlock,
        ToolCallBlock,
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

if TYPE_CHECKING:
    from llama_index.core.program.utils import FlexibleModel
    from llama_index.core.tools.types import BaseTool

dispatcher = instrument.get_dispatcher(__name__)

#: LlamaIndex roles and the OpenAI-style role each maps to. Anything else
#: (function, developer, chatbot, model) is rejected.
ROLES: Mapping[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.TOOL: "tool",
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
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "thinking",
        "reasoning_effort",
    }
)

#: ``tool_choice`` values that are modes, not tool names.
TOOL_CHOICE_MODES = ("none", "auto", "required")


# ------------------------------------------------------------------ messages in


def _block_texts(message: ChatMessage, role: str) -> list[str]:
    """The text of a message's ``TextBlock``s; tool-call and thinking blocks only in
    assistant turns."""
    texts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, (ToolCallBlock, ThinkingBlock)) and role == "assistant":
            continue  # mapped to tool_calls / reasoning_content by to_openai_message
        else:
            hint = (
                " (images are not supported yet)" if "image" in type(block).__name__.lower() else ""
            )
            raise TypeError(
                f"GemmaLocal supports only TextBlock content, got {type(block).__name__} "
                f"in a {role} message{hint} (assistant messages may also hold "
                "ToolCallBlock and ThinkingBlock)"
            )
    return texts


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _openai_call(call: Any) -> dict[str, Any]:
    """One ``additional_kwargs["tool_calls"]`` entry (a dict, or an OpenAI SDK object) as a dict."""
    if not isinstance(call, Mapping) and callable(getattr(call, "model_dump", None)):
        call = call.model_dump()
    if not isinstance(call, Mapping):
        raise TypeError(
            "an assistant message's additional_kwargs['tool_calls'] must hold OpenAI tool calls "
            f'{{"id", "type": "function", "function": {{"name", "arguments"}}}}, got {type(call).__name__}'
        )
    return dict(call)


def _tool_calls_of(message: ChatMessage) -> list[dict[str, Any]]:
    """An assistant message's tool calls in OpenAI form: its ``ToolCallBlock``s, else
    ``additional_kwargs["tool_calls"]`` (the OpenAI integration's form)."""
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        calls = []
        for block in blocks:
            call: dict[str, Any] = {"id": block.tool_call_id or "", "type": "function"}
            call["function"] = {
                "name": block.tool_name,
                "arguments": _arguments_text(block.tool_kwargs),
            }
            calls.append(call)
        return calls
    return [_openai_call(c) for c in message.additional_kwargs.get("tool_calls") or ()]


def to_openai_message(message: ChatMessage) -> dict[str, Any]:
    """One LlamaIndex ``ChatMessage`` as an OpenAI-style message dict.

    One ``TextBlock`` gives a string, several give a list of text parts (core
    joins them), none gives ``""``. An assistant message's tool calls
    (``ToolCallBlock``s, or OpenAI ``tool_calls`` in ``additional_kwargs``)
    become ``tool_calls`` (``content`` is then ``None`` when there is no
    text); its ``ThinkingBlock``s' text becomes ``reasoning_content`` (Gemma 4's
    template shows it where the model's own format keeps it; Gemma 1-3 ignore
    it). A ``tool`` message needs ``additional_kwargs["tool_call_id"]`` and
    becomes ``{"role": "tool", "tool_call_id", "content"}``. Core renders all
    of it into Gemma turns. The input is never mutated.

    Raises:
        TypeError: ``message`` is not a ``ChatMessage``, or holds a block other
            than ``TextBlock`` (and, in assistant messages, ``ToolCallBlock``
            and ``ThinkingBlock``).
        ValueError: a role other than system, user, assistant or tool; a tool
            message without ``tool_call_id``.
    """
    if not isinstance(message, ChatMessage):
        raise TypeError(f"expected a llama_index ChatMessage, got {type(message).__name__}")
    role = ROLES.get(message.role)
    if role is None:
        allowed = ", ".join(r.value for r in ROLES)
        raise ValueError(
            f"GemmaLocal does not support {message.role.value!r} messages; allowed roles: {allowed}"
        )
    texts = _block_texts(message, role)
    content: Any = texts[0] if len(texts) == 1 else [{"type": "text", "text": t} for t in texts]
    if not texts:
        content = ""
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "tool":
        call_id = message.additional_kwargs.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(
                "a tool message needs additional_kwargs['tool_call_id'] (the id of the call it "
                f"answers), got {call_id!r}"
            )
        out["tool_call_id"] = call_id
    elif role == "assistant":
        calls = _tool_calls_of(message)
        if calls:
            out["tool_calls"] = calls
            if not texts:
                out["content"] = None
        thoughts = [b.content for b in message.blocks if isinstance(b, ThinkingBlock) and b.content]
        if thoughts:
            out["reasoning_content"] = "\n".join(thoughts)
    return out


def to_openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """A LlamaIndex conversation as OpenAI-style message dicts (see :func:`to_openai_message`)."""
    if isinstance(messages, (str, ChatMessage)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a sequence of ChatMessage, got {type(messages).__name__}"
        )
    return [to_openai_message(m) for m in messages]


# --------------------------------------------------------------------- tools in


def to_openai_tool(tool: BaseTool | Mapping[str, Any]) -> dict[str, Any]:
    """A LlamaIndex tool (``FunctionTool``, ``QueryEngineTool``, ...) as an OpenAI tool dict.

    An OpenAI dict (``{"type": "function", "function": {...}}``) passes through
    as is; core validates both the same way. The tool's name must already be a
    valid function name: LlamaIndex would otherwise rename it for the model
    (``"my tool"`` → ``"my_tool"``) and no call could find the tool again.

    Raises:
        TypeError: neither a LlamaIndex tool nor a dict.
        ValueError: a tool name with characters other than letters, digits, ``_``, ``-``.
    """
    if isinstance(tool, Mapping):
        return dict(tool)
    metadata = getattr(tool, "metadata", None)
    if metadata is None or not callable(getattr(metadata, "to_openai_tool", None)):
        raise TypeError(
            "tools must be LlamaIndex tools (e.g. FunctionTool.from_defaults(fn)) or OpenAI "
            f'{{"type": "function", "function": {{...}}}} dicts, got {type(tool).__name__}'
        )
    name = metadata.name
    if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]+", name):
        raise ValueError(
            f"tool name {name!r} is not a valid function name (letters, digits, '_' or '-'); "
            "rename the tool, e.g. FunctionTool.from_defaults(fn, name='my_tool')"
        )
    return dict(metadata.to_openai_tool(skip_length_check=True))


def resolve_tool_choice(tool_choice: Any, tool_required: bool = False) -> Any:
    """LlamaIndex's ``tool_choice`` as OpenAI's.

    ``None`` is ``"required"`` when ``tool_required`` else ``"auto"``; a bare
    tool name (``FunctionAgent(initial_tool_choice="add")``) becomes
    ``{"type": "function", "function": {"name": "add"}}``; modes and dicts pass.
    """
    if tool_choice is None:
        return "required" if tool_required else "auto"
    if isinstance(tool_choice, str) and tool_choice not in TOOL_CHOICE_MODES:
        return {"type": "function", "function": {"name": tool_choice}}
    return tool_choice


# ----------------------------------------------------------------- responses out


def usage_kwargs(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Token counts of an OpenAI ``usage`` record, for ``additional_kwargs``
    (``reasoning_tokens`` only when the model thought)."""
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    counts = {k: usage[k] for k in keys if usage and k in usage}
    details = (usage or {}).get("completion_tokens_details") or {}
    if details.get("reasoning_tokens"):
        counts["reasoning_tokens"] = details["reasoning_tokens"]
    return counts


def _tool_kwargs(arguments: str) -> dict[str, Any] | str:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # not complete yet (a stream that is still arriving)
    return value if isinstance(value, dict) else arguments


def assistant_message(
    text: str | None,
    tool_calls: Sequence[Mapping[str, Any]],
    reasoning: str | None = None,
    reasoning_tokens: int | None = None,
) -> ChatMessage:
    """The assistant ``ChatMessage`` of a reply: its thought, text and tool calls.

    A thought (``reasoning``, Gemma 4's thinking channel) comes first, as a
    ``ThinkingBlock`` with ``num_tokens=reasoning_tokens`` (as LlamaIndex's
    Ollama integration puts it), followed by the text block. Tool calls are
    carried twice, as LlamaIndex's OpenAI integration does: as
    ``ToolCallBlock``s (what llama-index-core's agents and memory read; their
    ``tool_kwargs`` are the parsed arguments) and as the OpenAI ``tool_calls``
    dicts in ``additional_kwargs`` (what OpenAI-style code reads).
    """
    thought: list[ContentBlock] = []
    if reasoning:
        thought.append(ThinkingBlock(content=reasoning, num_tokens=reasoning_tokens or None))
    if not tool_calls:
        if not thought:
            return ChatMessage(role=MessageRole.ASSISTANT, content=text or "")
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=[*thought, TextBlock(text=text or "")])
    blocks: list[ContentBlock] = [*thought, *([TextBlock(text=text)] if text else [])]
    for call in tool_calls:
        function = call.get("function") or {}
        blocks.append(
            ToolCallBlock(
                tool_call_id=call.get("id") or None,
                tool_name=function.get("name") or "",
                tool_kwargs=_tool_kwargs(function.get("arguments") or "{}"),
            )
        )
    return ChatMessage(
        role=MessageRole.ASSISTANT,
        blocks=blocks,
        additional_kwargs={"tool_calls": [dict(c) for c in tool_calls]},
    )


def completion_to_chat_response(completion: Mapping[str, Any]) -> ChatResponse:
    """A ``chat.completion`` dict (one choice) as a ``ChatResponse``; ``raw`` is the dict.

    For OpenAI-style dicts from elsewhere (a server speaking core's format);
    ``GemmaLocal`` itself builds its responses from core's deltas
    (:func:`reply_response`).
    """
    choice = completion["choices"][0]
    message = choice["message"]
    details = (completion.get("usage") or {}).get("completion_tokens_details") or {}
    return ChatResponse(
        message=assistant_message(
            message.get("content"),
            message.get("tool_calls") or (),
            message.get("reasoning_content"),
            details.get("reasoning_tokens"),
        ),
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


def tool_selections(message: ChatMessage) -> list[ToolSelection]:
    """The tool calls a message carries, as LlamaIndex ``ToolSelection``s (in order).

    Reads ``ToolCallBlock``s, or else OpenAI ``tool_calls`` in
    ``additional_kwargs``; arguments that are JSON text are parsed.
    """
    selections = []
    for call in _tool_calls_of(message):
        function = call.get("function") or {}
        arguments = function.get("arguments")
        kwargs = _tool_kwargs(arguments) if isinstance(arguments, str) else arguments
        selections.append(
            ToolSelection(
                tool_id=call.get("id") or "",
                tool_name=function.get("name") or "",
                tool_kwargs=kwargs if isinstance(kwargs, dict) else {},
            )
        )
    return selections


class StreamFolder:
    """Folds ``chat.completion.chunk`` dicts into streamed ``ChatResponse`` records.

    For OpenAI-style chunks from elsewhere (a server speaking core's format);
    ``GemmaLocal`` itself streams from core's deltas (:class:`DeltaFolder`).
    One response per chunk that carries text, reasoning or tool calls
    (``message`` holds the thought, text and calls so far, ``delta`` the new
    text, ``additional_kwargs["thinking_delta"]`` the new reasoning, ``raw``
    the chunk) and a last one, with an empty ``delta``, for the final usage
    chunk: its ``additional_kwargs`` hold the token counts and
    ``finish_reason``. Tool call deltas are accumulated by ``index`` as OpenAI
    clients do (core sends each call whole, once complete).
    """

    def __init__(self) -> None:
        self.text = ""
        self.reasoning = ""
        self.tool_calls: dict[int, dict[str, Any]] = {}
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
        delta = choice.get("delta") or {}
        calls = delta.get("tool_calls") or ()
        for part in calls:
            self._add_call(part)
        text = delta.get("content") or ""
        thought = delta.get("reasoning_content") or ""
        if not text and not calls and not thought:  # the role and finish chunks carry nothing
            return None
        self.text += text
        self.reasoning += thought
        return self._response(text, chunk, {"thinking_delta": thought} if thought else {})

    def _add_call(self, part: Mapping[str, Any]) -> None:
        slot = self.tool_calls.setdefault(
            int(part.get("index") or 0),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        slot["id"] += part.get("id") or ""
        function = part.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def _response(self, delta: str, chunk: Any, extra: dict[str, Any]) -> ChatResponse:
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        tokens = extra.get("reasoning_tokens")
        return ChatResponse(
            message=assistant_message(self.text, calls, self.reasoning, tokens),
            delta=delta,
            raw=chunk,
            additional_kwargs=extra,
        )


def reply_response(reply: Delta, model: str) -> ChatResponse:
    """A whole reply (the row's deltas folded by :func:`core.fold_deltas`) as a ``ChatResponse``.

    ``raw`` is the ``chat.completion`` core's :meth:`create` would return for it
    (written by :mod:`core.openai_format`); ``additional_kwargs`` hold the token
    counts and ``finish_reason``.
    """
    if reply.finish_reason is None:
        raise ValueError("reply_response needs a finished reply (core.fold_deltas of a row)")
    completion = Completion(model, 1, 1).collect([reply])[0]
    return ChatResponse(
        message=assistant_message(
            reply.text,
            [c.to_openai() for c in reply.tool_calls],
            reply.reasoning,
            reply.reasoning_tokens,
        ),
        raw=completion,
        additional_kwargs={
            **usage_kwargs(completion["usage"]),
            "finish_reason": reply.finish_reason,
        },
    )


class DeltaFolder:
    """Turns one row's :class:`~core.Delta` stream into streamed ``ChatResponse`` records.

    One response per delta that carries text, reasoning or tool calls:
    ``message`` holds the thought (a ``ThinkingBlock``), the text and the calls
    so far, ``delta`` the new text, ``additional_kwargs["thinking_delta"]``
    the new reasoning (only when there is some), ``raw`` the delta as one
    ``chat.completion.chunk``. Then a last one, with an empty ``delta``, once
    the row has finished: ``raw`` is the usage chunk and ``additional_kwargs``
    hold the token counts and ``finish_reason`` (what
    ``stream_structured_predict`` and token counters look for). Core sends
    each tool call whole, once complete. Shared by the sync and async streams
    so both behave the same.
    """

    def __init__(self, model: str) -> None:
        self.text = ""
        self.reasoning = ""
        self.reasoning_tokens = 0
        self.tool_calls: list[dict[str, Any]] = []
        self._chunks = ChunkBuilder(model, 1)

    def feed(self, delta: Delta) -> list[ChatResponse]:
        """The responses of one delta (none, one, or two for a row's last delta)."""
        chunk = self._chunk(delta)  # always: the builder counts the row's tokens
        self.text += delta.text
        self.reasoning += delta.reasoning
        self.reasoning_tokens = delta.reasoning_tokens
        self.tool_calls += [c.to_openai() for c in delta.tool_calls]
        out = []
        if delta.text or delta.reasoning or delta.tool_calls:
            extra = {"thinking_delta": delta.reasoning} if delta.reasoning else {}
            out.append(self._response(delta.text, chunk, extra))
        if delta.finish_reason is not None:
            usage = self._chunks.usage_chunk()
            extra = {**usage_kwargs(usage["usage"]), "finish_reason": delta.finish_reason}
            out.append(self._response("", usage, extra))
        return out

    def _chunk(self, delta: Delta) -> dict[str, Any]:
        """The delta as one ``chat.completion.chunk`` (core's chunks for it, merged)."""
        merged: dict[str, Any] = {}
        finish = None
        for part in self._chunks.on_delta(delta):
            choice = part["choices"][0]
            merged.update(choice["delta"])
            finish = choice["finish_reason"] or finish
        choice = {"index": 0, "delta": merged, "logprobs": None, "finish_reason": finish}
        return self._chunks.chunk([choice])

    def _response(self, delta: str, raw: dict[str, Any], extra: dict[str, Any]) -> ChatResponse:
        return ChatResponse(
            message=assistant_message(
                self.text, self.tool_calls, self.reasoning, self.reasoning_tokens
            ),
            delta=delta,
            raw=raw,
            additional_kwargs=extra,
        )


def json_schema_format(output_cls: type[Any]) -> dict[str, Any]:
    """Core's ``response_format`` for a pydantic class: its JSON schema, strict."""
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", output_cls.__name__)
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": output_cls.model_json_schema(), "strict": True},
    }


def parse_structured(output_cls: type[Model], response: ChatResponse) -> Model:
    """The reply of a ``json_schema`` request as ``output_cls``.

    Under the grammar the reply always validates once it is complete; a reply
    cut short by ``max_tokens`` is not, and says so.
    """
    text = response.message.content or ""
    if response.additional_kwargs.get("finish_reason") == "length":
        used = response.additional_kwargs.get("completion_tokens")
        raise ValueError(
            f"the {output_cls.__name__} JSON was cut off after {used} tokens, before it was "
            "complete (max_tokens, or what the context window left after the prompt); raise "
            f"max_tokens (e.g. llm_kwargs={{'max_tokens': ...}}). Partial output: {text!r}"
        )
    return output_cls.model_validate_json(text)


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
    name = model if model is not None else DEFAULT_MODELS[chosen]
    key = (chosen, name, repr(sorted(options.items())))
    with _SHARED_LOCK:
        client = _SHARED_CLIENTS.get(key)
        if client is None:
            client = create_gemma_client(chosen, name, **options)
            _SHARED_CLIENTS[key] = client
        return client


class GemmaLocal(FunctionCallingLLM):
    """A local Gemma chat model as a LlamaIndex ``FunctionCallingLLM`` (transformers or Apple MLX).

    Chat-first: every call goes through the model's own chat template;
    ``complete(prompt)`` is ``chat([user: prompt])``. Works anywhere LlamaIndex
    expects an LLM (``Settings.llm``, query engines, chat engines, agents).
    Tool calls and structured output are decoded under a grammar by core, so
    they always parse and validate, even from a small model.

    Setup:
        ``pip install "gemma-local[transformers,llama-index]"`` (or ``[mlx,llama-index]``
        on Apple Silicon).

    Instantiate (constructing never loads weights; the first call does). Every
    ``GemmaLocal`` built with the same ``backend``, ``model`` and
    ``client_kwargs`` shares one core client, so the weights load once::

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
                "cannot serve tools or structured output with it; use a transformers or MLX "
                "client"
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
