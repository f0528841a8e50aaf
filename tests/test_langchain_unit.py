"""Fast tests of the LangChain adapter against a scripted core client (no model loads).

``ScriptedGemma`` is a core client whose token stream is scripted: each reply
echoes the conversation's last user turn word by word, rows of a batch come
interleaved (last row first), and every request is recorded in ``calls``.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import ConfigurableField
from pydantic import ValidationError

from core import BaseGemmaChatCompletion, Delta, SamplingParams, normalize_messages
from langchain_gemma_local import (
    ChatGemmaLocal,
    convert_message_to_dict,
    convert_messages_to_dicts,
)


class ScriptedGemma(BaseGemmaChatCompletion):
    """A core client with a scripted token stream: it echoes the last user turn."""

    implementation = "scripted"

    def __init__(
        self, model_name: str = "scripted/gemma", *, delay: float = 0.0, load_time: float = 0.0
    ) -> None:
        super().__init__(model_name)
        self.delay = delay
        self.load_time = load_time
        self.calls: list[tuple[list[list[dict[str, Any]]], SamplingParams]] = []
        self.stopped_early = 0
        self.fail_with: BaseException | None = None
        self.running = 0  # streams being read now, and the most at once
        self.peak = 0
        self._count = threading.Lock()

    def _started(self) -> None:
        with self._count:
            self.running += 1
            self.peak = max(self.peak, self.running)

    def _ended(self) -> None:
        with self._count:
            self.running -= 1

    def load(self) -> ScriptedGemma:
        if not self._loaded:
            time.sleep(self.load_time)
        self._loaded = True
        return self

    @staticmethod
    def reply(conversation: Sequence[dict[str, Any]]) -> list[str]:
        turns = normalize_messages(conversation)
        words = ["echo", *turns[-1]["content"].split()]
        return [words[0], *(" " + w for w in words[1:])]

    def _script(self, conversations: Sequence[Any], params: SamplingParams) -> list[Delta]:
        rows = []
        for conversation in conversations:
            pieces = self.reply(conversation)
            kept = pieces[: params.max_tokens]
            reason = "length" if len(pieces) > params.max_tokens else "stop"
            prompt = sum(len(m["content"].split()) for m in normalize_messages(conversation))
            rows.append((kept, reason, prompt))
        out = []
        for step in range(max(len(kept) for kept, _, _ in rows)):
            for index in reversed(range(len(rows))):
                kept, reason, prompt = rows[index]
                if step < len(kept):
                    last = step == len(kept) - 1
                    out.append(
                        Delta(
                            index,
                            kept[step],
                            reason if last else None,
                            prompt if last else 0,
                            len(kept) if last else 0,
                        )
                    )
        return out

    def stream_deltas(
        self, conversations: Sequence[Any], params: SamplingParams
    ) -> Iterator[Delta]:
        self.calls.append((copy.deepcopy(list(conversations)), params))
        self.load()
        return self._run(self._script(conversations, params))

    def _run(self, deltas: list[Delta]) -> Iterator[Delta]:
        sent = 0
        self._started()
        try:
            if self.fail_with is not None:
                raise self.fail_with
            for delta in deltas:
                time.sleep(self.delay)
                yield delta
                sent += 1
        finally:
            self._ended()
            if sent < len(deltas):
                self.stopped_early += 1

    async def astream_deltas(  # type: ignore[override]
        self, conversations: Sequence[Any], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        self.calls.append((copy.deepcopy(list(conversations)), params))
        self.load()
        deltas = self._script(conversations, params)
        sent = 0
        self._started()
        try:
            if self.fail_with is not None:
                raise self.fail_with
            for delta in deltas:
                await asyncio.sleep(self.delay)
                yield delta
                sent += 1
        finally:
            self._ended()
            if sent < len(deltas):
                self.stopped_early += 1


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.starts = 0
        self.ends = 0
        self.errors: list[BaseException] = []

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends += 1

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors.append(error)


@pytest.fixture
def fake() -> ScriptedGemma:
    return ScriptedGemma()


@pytest.fixture
def model(fake: ScriptedGemma) -> ChatGemmaLocal:
    return ChatGemmaLocal(client=fake)


# ---------------------------------------------------------------- message mapping


TEXT = [{"type": "text", "text": "a"}, "b", {"type": "text", "text": "c", "id": "x", "index": 0}]
TEXT_PARTS = [{"type": "text", "text": t} for t in "abc"]
CALL_F: Any = {"name": "f", "args": {"a": 1, "b": "é"}, "id": "c1", "type": "tool_call"}
CALL_G: Any = {"name": "g", "args": {}, "id": "c2", "type": "tool_call"}
OPENAI_CALL_F = {
    "id": "c1",
    "type": "function",
    "function": {"name": "f", "arguments": '{"a": 1, "b": "é"}'},
}
OPENAI_CALL_G = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (SystemMessage("be brief"), {"role": "system", "content": "be brief"}),
        (HumanMessage("hi"), {"role": "user", "content": "hi"}),
        (HumanMessage("hi", name="ann"), {"role": "user", "content": "hi"}),
        (AIMessage("hello"), {"role": "assistant", "content": "hello"}),
        (AIMessageChunk(content="part"), {"role": "assistant", "content": "part"}),
        (HumanMessage(TEXT), {"role": "user", "content": TEXT_PARTS}),
        (AIMessage(TEXT), {"role": "assistant", "content": TEXT_PARTS}),
        (SystemMessage(TEXT), {"role": "system", "content": TEXT_PARTS}),
        (ChatMessage(content="x", role="user"), {"role": "user", "content": "x"}),
        (ChatMessage(content="x", role="human"), {"role": "user", "content": "x"}),
        (ChatMessage(content="x", role="assistant"), {"role": "assistant", "content": "x"}),
        (ChatMessage(content="x", role="ai"), {"role": "assistant", "content": "x"}),
        (ChatMessage(content="x", role="model"), {"role": "assistant", "content": "x"}),
        (ChatMessage(content="x", role="system"), {"role": "system", "content": "x"}),
        (ChatMessage(content="x", role="developer"), {"role": "system", "content": "x"}),
        (
            ToolMessage("42", tool_call_id="c1"),
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ),
        (
            ToolMessage("Error: no b", tool_call_id="c1", name="add", status="error"),
            {"role": "tool", "tool_call_id": "c1", "content": "Error: no b"},
        ),
        (
            ToolMessage(TEXT, tool_call_id="c1"),
            {"role": "tool", "tool_call_id": "c1", "content": TEXT_PARTS},
        ),
        (
            AIMessage("", tool_calls=[CALL_F]),
            {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL_F]},
        ),
        (
            AIMessage("let me see", tool_calls=[CALL_F, CALL_G]),
            {
                "role": "assistant",
                "content": "let me see",
                "tool_calls": [OPENAI_CALL_F, OPENAI_CALL_G],
            },
        ),
        (
            AIMessage(
                [
                    {"type": "text", "text": "some text"},
                    {"type": "tool_use", "id": "c1", "name": "f", "input": CALL_F["args"]},
                ],
                tool_calls=[CALL_F],
            ),
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "some text"}],
                "tool_calls": [OPENAI_CALL_F],
            },
        ),
        (
            AIMessageChunk(
                content="",
                tool_call_chunks=[
                    {"name": "f", "args": '{"a": 1, "b": "\u00e9"}', "id": "c1", "index": 0}
                ],
            ),
            {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL_F]},
        ),
    ],
)
def test_convert_message(message: BaseMessage, expected: dict[str, Any]) -> None:
    before = message.model_copy(deep=True)
    assert convert_message_to_dict(message) == expected
    assert message == before  # never mutated


@pytest.mark.parametrize(
    ("message", "error", "names"),
    [
        (FunctionMessage(content="42", name="f"), TypeError, "FunctionMessage"),
        (ChatMessage(content="x", role="tool"), ValueError, "'tool'"),
        (
            ToolMessage(
                [{"type": "image", "base64": "AA", "mime_type": "image/png"}], tool_call_id="1"
            ),
            ValueError,
            "ToolMessage content block 0 ('image') is media in a message with role 'tool'",
        ),
        (
            HumanMessage([{"type": "image", "file_id": "file-1"}]),
            ValueError,
            "HumanMessage content block 0 ('image') refers to a provider's stored file",
        ),
        (
            HumanMessage([{"type": "video", "base64": "AA", "mime_type": "video/mp4"}]),
            TypeError,
            "Gemma cannot read video blocks",
        ),
        (AIMessage([{"type": "reasoning", "reasoning": "hm"}]), TypeError, "'reasoning'"),
        (
            AIMessage("", invalid_tool_calls=[{"name": "f", "args": "{oops", "id": "1"}]),
            ValueError,
            "invalid tool call ('f', arguments '{oops')",
        ),
        (
            AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": None}]),
            ValueError,
            "tool call to 'f' without an id",
        ),
    ],
)
def test_convert_message_rejects(message: BaseMessage, error: type[Exception], names: str) -> None:
    with pytest.raises(error, match=names.replace("(", r"\(").replace(")", r"\)")):
        convert_message_to_dict(message)


def test_convert_messages_is_pure() -> None:
    messages = [SystemMessage("s"), HumanMessage(list(TEXT)), AIMessage("a"), HumanMessage("q")]
    before = [m.model_copy(deep=True) for m in messages]
    out = convert_messages_to_dicts(messages)
    assert [d["role"] for d in out] == ["system", "user", "assistant", "user"]
    out[1]["content"][0]["text"] = "changed"
    assert messages == before


def test_unsupported_message_fails_before_generating(
    model: ChatGemmaLocal, fake: ScriptedGemma
) -> None:
    with pytest.raises(TypeError, match="FunctionMessage"):
        model.invoke([HumanMessage("hi"), FunctionMessage(content="42", name="f")])
    with pytest.raises(ValueError, match="end with a user message"):
        model.invoke([HumanMessage("hi"), AIMessage("hello")])
    assert fake.calls == []


# ---------------------------------------------------------------- construction


def test_import_and_construction_load_nothing(gemma3_path: Any) -> None:
    # a real checkpoint folder: core checks at construction that the folder holds a model
    code = (
        "import sys; from langchain_gemma_local import ChatGemmaLocal\n"
        f"m = ChatGemmaLocal(model={str(gemma3_path)!r}, backend='transformers')\n"
        "assert not m.client.is_loaded\n"
        "heavy = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'mlx', 'mlx_lm')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"temprature": 0}, "temprature"),  # a typo is an error, not silently ignored
        ({"backend": "onnx"}, "backend"),
        ({"stop": ["x"] * 17}, "at most 16"),
        ({"stop": [""]}, "non-empty"),
    ],
)
def test_fields_are_bounded(fake: ScriptedGemma, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ChatGemmaLocal(client=fake, **options)


def test_none_means_backend_default(model: ChatGemmaLocal) -> None:
    assert model._sampling_params(None, {}) == SamplingParams()


def test_zero_is_not_unset(fake: ScriptedGemma) -> None:
    model = ChatGemmaLocal(client=fake, temperature=0, seed=0, top_k=0)
    params = model._sampling_params(None, {})
    assert (params.temperature, params.seed, params.top_k) == (0.0, 0, 0)


def test_hosted_model_arguments_are_accepted(fake: ScriptedGemma) -> None:
    model = ChatGemmaLocal(
        client=fake, timeout=60, max_retries=2, api_key="unused", streaming=True, stop=[]
    )
    assert "unused" not in repr(model)
    assert model.invoke("a b").content == "echo a b"


def test_client_decides_model_and_loading(fake: ScriptedGemma) -> None:
    assert ChatGemmaLocal(client=fake).model == "scripted/gemma"
    assert ChatGemmaLocal(client=fake, model="scripted/gemma").client is fake
    with pytest.raises(ValidationError, match="client serves"):
        ChatGemmaLocal(client=fake, model="google/gemma-3-1b-it")
    with pytest.raises(ValidationError, match="leave backend unset"):
        ChatGemmaLocal(client=fake, backend="mlx")
    with pytest.raises(ValidationError, match="use_4bit_quantization"):
        ChatGemmaLocal(client=fake, use_4bit_quantization=True)
    assert not fake.is_loaded


def test_same_settings_share_one_client() -> None:
    a = ChatGemmaLocal(model="some/gemma", backend="transformers", temperature=0)
    b = ChatGemmaLocal(model="some/gemma", backend="transformers", temperature=1)
    c = ChatGemmaLocal(model="some/gemma", backend="transformers", device_map="cpu")
    d = ChatGemmaLocal(model="other/gemma", backend="transformers")
    assert a.client is b.client
    assert c.client is not a.client
    assert d.client is not a.client
    assert not a.client.is_loaded
    # an instance rebuilt by configurable_fields keeps the loaded model...
    tunable = a.configurable_fields(
        temperature=ConfigurableField(id="temperature"), model=ConfigurableField(id="model")
    )
    rebuilt = tunable._prepare({"configurable": {"temperature": 0.5}})[0]
    assert isinstance(rebuilt, ChatGemmaLocal)
    assert rebuilt.client is a.client and rebuilt.temperature == 0.5
    # ...and switching the model there switches the client
    other = tunable._prepare({"configurable": {"model": "other/gemma"}})[0]
    assert isinstance(other, ChatGemmaLocal)
    assert other.client is d.client and other.model == "other/gemma"


def test_default_model_is_the_backends() -> None:
    model = ChatGemmaLocal(backend="transformers")
    assert model.model == "google/gemma-3-12b-it"
    with pytest.raises(ValidationError, match="transformers backend"):
        ChatGemmaLocal(backend="mlx", use_4bit_quantization=True)


# ---------------------------------------------------------------- calls


def test_invoke_metadata(model: ChatGemmaLocal) -> None:
    result = model.invoke("hello there")
    assert result.content == "echo hello there"
    assert result.usage_metadata == {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}
    assert result.response_metadata["model_name"] == "scripted/gemma"
    assert result.response_metadata["finish_reason"] == "stop"


def test_stream_usage_on_last_chunk_only(model: ChatGemmaLocal) -> None:
    chunks = list(model.stream("one two three", max_tokens=2))
    assert [c.content for c in chunks] == ["echo", " one"]
    assert chunks[-1].chunk_position == "last"
    assert [c.usage_metadata is not None for c in chunks] == [False, True]
    full = chunks[0] + chunks[1]
    assert full.usage_metadata == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    assert full.response_metadata["finish_reason"] == "length"
    assert full.response_metadata["model_name"] == "scripted/gemma"


async def test_async_matches_sync(model: ChatGemmaLocal) -> None:
    sync = model.invoke("a b c")
    result = await model.ainvoke("a b c")
    assert (result.content, result.usage_metadata) == (sync.content, sync.usage_metadata)
    chunks = [c async for c in model.astream("a b c")]
    assert "".join(str(c.content) for c in chunks) == sync.content
    assert chunks[-1].usage_metadata == sync.usage_metadata


@pytest.mark.parametrize("streaming", [False, True])
def test_on_llm_new_token(fake: ScriptedGemma, streaming: bool) -> None:
    recorder = TokenRecorder()
    model = ChatGemmaLocal(client=fake, streaming=streaming)
    result = model.invoke("x y", config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == result.content == "echo x y"
    assert [t for t in recorder.tokens if t] == ["echo", " x", " y"]


async def test_on_llm_new_token_async(model: ChatGemmaLocal) -> None:
    recorder = TokenRecorder()
    result = await model.ainvoke("x y", config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == result.content == "echo x y"


def test_per_call_options_override_fields(fake: ScriptedGemma) -> None:
    model = ChatGemmaLocal(client=fake, temperature=0.9, max_tokens=50, stop=["zz"], seed=1)
    model.invoke("hi")
    model.invoke("hi", temperature=0, max_tokens=3, stop=["q"], top_k=5, logit_bias={106: 5})
    model.bind(temperature=0.25, top_p=0.5).invoke("hi")
    model.invoke("hi", stop=[])  # an explicit empty list clears the default stop strings
    defaults, per_call, bound, cleared = (params for _, params in fake.calls)
    assert (defaults.temperature, defaults.max_tokens, defaults.stop) == (0.9, 50, ("zz",))
    assert (per_call.temperature, per_call.max_tokens, per_call.stop) == (0.0, 3, ("q",))
    assert (per_call.top_k, per_call.seed, per_call.logit_bias) == (5, 1, ((106, 5.0),))
    assert (bound.temperature, bound.top_p, bound.max_tokens) == (0.25, 0.5, 50)
    assert cleared.stop == ()


def test_per_call_options_are_checked(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['functions'\]"):
        model.invoke("hi", functions=[])
    with pytest.raises(ValueError, match="temperature must be in"):
        model.invoke("hi", temperature=3)
    with pytest.raises(ValueError, match="serves 'scripted/gemma', not 'gpt-4o'"):
        model.invoke("hi", model="gpt-4o")
    assert fake.calls == []
    assert model.invoke("hi", model="scripted/gemma").content == "echo hi"


def test_timeout_stops_generation(fake: ScriptedGemma) -> None:
    fake.delay = 0.02
    model = ChatGemmaLocal(client=fake, timeout=0.05)
    with pytest.raises(TimeoutError, match=r"timeout=0\.05"):
        model.invoke(" ".join("w" * 40))
    assert fake.stopped_early == 1
    assert model.invoke("short", timeout=5).content == "echo short"


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_loading_does_not_count_against_timeout(asynchronous: bool) -> None:
    model = ChatGemmaLocal(client=ScriptedGemma(load_time=0.3), timeout=0.1)
    result = await model.ainvoke("a b") if asynchronous else model.invoke("a b")
    assert result.content == "echo a b"


async def test_timeout_stops_generation_async(fake: ScriptedGemma) -> None:
    fake.delay = 0.02
    model = ChatGemmaLocal(client=fake, timeout=0.05)
    with pytest.raises(TimeoutError):
        await model.ainvoke(" ".join("w" * 40))
    assert fake.stopped_early == 1


def test_generation_errors_reach_the_caller(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    fake.fail_with = MemoryError("boom")
    recorder = TokenRecorder()
    with pytest.raises(MemoryError, match="boom"):
        model.invoke("hi", config={"callbacks": [recorder]})
    assert len(recorder.errors) == 1


def test_identity_and_langsmith_params(fake: ScriptedGemma) -> None:
    model = ChatGemmaLocal(client=fake, temperature=0.1, max_tokens=7, stop=["s"])
    assert model._llm_type == "gemma-local"
    assert model._identifying_params["model"] == "scripted/gemma"
    assert model._identifying_params["backend"] == "scripted"
    assert model._identifying_params["temperature"] == 0.1
    ls = model._get_ls_params(stop=["t"], temperature=0.3)
    assert ls == {
        "ls_provider": "gemma_local",
        "ls_model_name": "scripted/gemma",
        "ls_model_type": "chat",
        "ls_temperature": 0.3,
        "ls_max_tokens": 7,
        "ls_stop": ["t"],
    }


# ---------------------------------------------------------------- batching


PROMPTS = ["alpha", "beta gamma", "delta epsilon zeta"]


def submitted(fake: ScriptedGemma) -> list[str]:
    """The last user turn of each request the client got (one conversation each), sorted."""
    assert all(len(conversations) == 1 for conversations, _ in fake.calls)
    return sorted(conversations[0][-1]["content"] for conversations, _ in fake.calls)


def test_batch_submits_every_input_at_once(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    """Each input is a request of its own, all running together: the core client's
    scheduler batches them (continuous batching)."""
    fake.delay = 0.05
    results = model.batch(PROMPTS * 3)
    assert [r.content for r in results] == [f"echo {p}" for p in PROMPTS * 3]
    assert submitted(fake) == sorted(PROMPTS * 3)
    assert fake.peak == 9  # more than LangChain's default pool would run on a small machine
    assert [r.usage_metadata["output_tokens"] for r in results[:3]] == [2, 3, 4]  # type: ignore[index]


async def test_abatch_submits_every_input_at_once(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    fake.delay = 0.01
    results = await model.abatch(PROMPTS)
    assert [r.content for r in results] == [f"echo {p}" for p in PROMPTS]
    assert submitted(fake) == sorted(PROMPTS) and fake.peak == 3


def test_batch_keeps_one_run_per_input(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    recorders = [TokenRecorder() for _ in PROMPTS]
    model.batch(PROMPTS, config=[{"callbacks": [r]} for r in recorders], max_tokens=2)
    assert submitted(fake) == sorted(PROMPTS)
    assert ["".join(r.tokens) for r in recorders] == ["echo alpha", "echo beta", "echo delta"]
    assert [(r.starts, r.ends) for r in recorders] == [(1, 1)] * 3


def test_batch_options_and_bind(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    results = model.bind(max_tokens=1).batch(PROMPTS, stop=["zz"])
    assert [r.content for r in results] == ["echo"] * 3
    assert len(fake.calls) == 3
    assert {(p.max_tokens, p.stop) for _, p in fake.calls} == {(1, ("zz",))}


@pytest.mark.parametrize("streaming", [False, True])
def test_batch_bad_input_fails_alone(fake: ScriptedGemma, streaming: bool) -> None:
    model = ChatGemmaLocal(client=fake, streaming=streaming)
    bad = FunctionMessage(content="x", name="f")
    inputs: list[Any] = ["one", [bad], "two", [AIMessage("a")]]
    results = model.batch(inputs, return_exceptions=True)
    assert results[0].content == "echo one" and results[2].content == "echo two"
    assert isinstance(results[1], TypeError) and isinstance(results[3], ValueError)
    assert submitted(fake) == ["one", "two"]  # the bad inputs fail before reaching the client
    with pytest.raises(TypeError, match="FunctionMessage"):
        model.batch(inputs)


async def test_abatch_bad_input_fails_alone(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    inputs: list[Any] = ["one", [FunctionMessage(content="x", name="f")], "two"]
    results = await model.abatch(inputs, return_exceptions=True)
    assert results[0].content == "echo one" and results[2].content == "echo two"
    assert isinstance(results[1], TypeError)
    assert submitted(fake) == ["one", "two"]


def test_batch_generation_error_reaches_every_input(
    model: ChatGemmaLocal, fake: ScriptedGemma
) -> None:
    fake.fail_with = MemoryError("boom")
    results = model.batch(PROMPTS, return_exceptions=True)
    assert all(isinstance(r, MemoryError) for r in results)
    with pytest.raises(MemoryError):
        model.batch(PROMPTS)


async def test_abatch_generation_error_reaches_every_input(
    model: ChatGemmaLocal, fake: ScriptedGemma
) -> None:
    fake.fail_with = MemoryError("boom")
    results = await model.abatch(PROMPTS, return_exceptions=True)
    assert all(isinstance(r, MemoryError) for r in results)


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_max_concurrency_caps_batch_size(
    model: ChatGemmaLocal, fake: ScriptedGemma, asynchronous: bool
) -> None:
    fake.delay = 0.01
    prompts = [f"p{i}" for i in range(5)]
    config = {"max_concurrency": 2}
    if asynchronous:
        results = await model.abatch(prompts, config=config)  # type: ignore[arg-type]
    else:
        results = model.batch(prompts, config=config)  # type: ignore[arg-type]
    assert [r.content for r in results] == [f"echo {p}" for p in prompts]
    assert submitted(fake) == prompts and fake.peak == 2


def test_batch_timeout_stops_one_row(fake: ScriptedGemma) -> None:
    fake.delay = 0.01
    model = ChatGemmaLocal(client=fake, timeout=0.1)
    results = model.batch(["short", " ".join("w" * 60)], return_exceptions=True)
    assert results[0].content == "echo short"
    assert isinstance(results[1], TimeoutError)


def test_batch_leaves_no_threads(model: ChatGemmaLocal, fake: ScriptedGemma) -> None:
    before = set(threading.enumerate())
    model.batch(PROMPTS * 3)
    assert set(threading.enumerate()) <= before


def test_batch_with_a_cache_runs_one_by_one(fake: ScriptedGemma) -> None:
    model = ChatGemmaLocal(client=fake, cache=InMemoryCache())
    first = model.batch(PROMPTS)
    assert [len(conversations) for conversations, _ in fake.calls] == [1, 1, 1]
    again = model.batch(PROMPTS)  # served by the cache: nothing generated
    assert [m.content for m in again] == [m.content for m in first]
    assert len(fake.calls) == 3


def test_breaking_out_of_a_stream_stops_generation(
    model: ChatGemmaLocal, fake: ScriptedGemma
) -> None:
    for _chunk in model.stream(" ".join("w" * 30)):
        break
    assert fake.stopped_early == 1


async def test_closing_an_async_stream_stops_generation(
    model: ChatGemmaLocal, fake: ScriptedGemma
) -> None:
    stream = model.astream(" ".join("w" * 30))
    async for _chunk in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert fake.stopped_early == 1
