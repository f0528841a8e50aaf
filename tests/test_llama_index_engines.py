"""``GemmaLocal`` inside LlamaIndex engines, on both backends, and the event loop staying free.

Retrieval uses LlamaIndex's ``MockEmbedding`` (no download); the LLM is the
real tiny Gemma 3 checkpoint through the real loading code. Its answers are
gibberish, so the tests check the plumbing: the engine's prompt reached the
model (retrieved text included), the engine returned exactly what the model
produced, history and streaming work, greedy runs agree.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.bridge.pydantic import Field
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.llms import ChatMessage

from llama_index_gemma_local import GemmaLocal

FACT = "The lighthouse keeper of Port Ellen is called Morag."
DOCS = [
    Document(text=FACT),
    Document(text="The sea is wide and the sea is deep."),
    Document(text="Paris is the capital of France."),
]
QUESTION = "Who keeps the lighthouse?"
NO_END = {1: -100, 106: -100}  # ban <eos> and <end_of_turn>: run to max_tokens


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents(DOCS, embed_model=MockEmbedding(embed_dim=8))


class Recorder(BaseEventHandler):
    """Collects the LLM events LlamaIndex's instrumentation dispatches."""

    events: list = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
            self.events.append(event)

    def calls(self) -> list[tuple[list[ChatMessage] | str, str]]:
        """(input messages or prompt, output text) of every LLM call, in order."""
        out = []
        for event in self.events:
            if isinstance(event, LLMChatEndEvent):
                out.append((event.messages, event.response.message.content))
            else:
                out.append((event.prompt, event.response.text))
        return out


@pytest.fixture
def recorder():
    """Engines replace an LLM's callback manager with theirs, so listen to the dispatcher."""
    root = get_dispatcher()
    handler = Recorder(events=[])
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


@pytest.fixture
def llm(client) -> GemmaLocal:
    return GemmaLocal(client=client, temperature=0, max_tokens=6)


def prompt_text(given) -> str:
    return given if isinstance(given, str) else "\n".join(m.content or "" for m in given)


# ------------------------------------------------------------ query engines


def test_query_engine(index: VectorStoreIndex, llm: GemmaLocal, recorder: Recorder) -> None:
    response = index.as_query_engine(llm=llm, similarity_top_k=3).query(QUESTION)
    assert len(response.source_nodes) == 3
    [(given, text)] = recorder.calls()
    assert FACT in prompt_text(given) and QUESTION in prompt_text(given)
    assert str(response) == text
    # the engine used the chat path: its messages answer the same as a direct chat
    assert llm.chat(given).message.content == text


def test_streaming_query_engine(
    index: VectorStoreIndex, llm: GemmaLocal, recorder: Recorder
) -> None:
    engine = index.as_query_engine(llm=llm, streaming=True, similarity_top_k=3)
    response = engine.query(QUESTION)
    pieces = list(response.response_gen)
    assert len(pieces) >= 2
    [(given, text)] = recorder.calls()
    assert FACT in prompt_text(given)
    assert "".join(pieces) == text == llm.chat(given).message.content


async def test_async_query_engine(
    index: VectorStoreIndex, llm: GemmaLocal, recorder: Recorder
) -> None:
    response = await index.as_query_engine(llm=llm, similarity_top_k=3).aquery(QUESTION)
    [(given, text)] = recorder.calls()
    assert FACT in prompt_text(given)
    assert str(response) == text


async def test_async_streaming_query_engine(
    index: VectorStoreIndex, llm: GemmaLocal, recorder: Recorder
) -> None:
    engine = index.as_query_engine(llm=llm, streaming=True, similarity_top_k=3)
    response = await engine.aquery(QUESTION)
    pieces = [p async for p in response.async_response_gen()]
    [(given, text)] = recorder.calls()
    assert FACT in prompt_text(given)
    assert "".join(pieces) == text


def test_settings_llm(
    index: VectorStoreIndex, llm: GemmaLocal, recorder: Recorder, monkeypatch
) -> None:
    monkeypatch.setattr(Settings, "_llm", None)  # restored after the test
    Settings.llm = llm
    assert Settings.llm is llm
    response = index.as_query_engine(similarity_top_k=3).query(QUESTION)
    [(_, text)] = recorder.calls()
    assert str(response) == text


# ------------------------------------------------------------- chat engines


def test_condense_plus_context_chat_engine(
    index: VectorStoreIndex, llm: GemmaLocal, recorder: Recorder
) -> None:
    engine = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=3)
    first = engine.chat(QUESTION)
    [(given, text)] = recorder.calls()  # no history yet: no condensing
    assert str(first) == text
    assert FACT in prompt_text(given)

    recorder.events.clear()
    second = engine.chat("And who keeps the harbour?")
    (condense_in, _condensed), (answer_in, answer) = recorder.calls()
    assert QUESTION in prompt_text(condense_in)  # the history went into the condense prompt
    assert str(second) == answer
    # the answer prompt holds the history: first question and the model's first answer
    assert [m.role.value for m in answer_in][-3:] == ["user", "assistant", "user"]
    assert answer_in[-2].content == text

    recorder.events.clear()
    streamed = engine.stream_chat("Tell me more.")
    pieces = list(streamed.response_gen)
    *_, (_, streamed_text) = recorder.calls()
    assert "".join(pieces) == streamed_text == str(streamed)
    assert len(engine.chat_history) == 6


async def test_condense_plus_context_chat_engine_async(
    index: VectorStoreIndex, llm: GemmaLocal, recorder: Recorder
) -> None:
    engine = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm)
    first = await engine.achat(QUESTION)
    second = await engine.astream_chat("And then?")
    pieces = [p async for p in second.async_response_gen()]
    calls = recorder.calls()
    assert len(calls) == 3  # answer, condense, answer
    assert str(first) == calls[0][1]
    assert "".join(pieces) == calls[-1][1]


def test_simple_chat_engine(llm: GemmaLocal) -> None:
    engine = SimpleChatEngine.from_defaults(llm=llm, system_prompt="Be brief.")
    first = engine.chat("Hello!")
    expected = llm.chat(
        [
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hello!"),
        ]
    )
    assert str(first) == expected.message.content
    streamed = engine.stream_chat("Go on.")
    assert "".join(streamed.response_gen) == str(streamed)
    assert [m.role.value for m in engine.chat_history] == ["user", "assistant"] * 2


async def test_simple_chat_engine_async(llm: GemmaLocal) -> None:
    engine = SimpleChatEngine.from_defaults(llm=llm)
    first = await engine.achat("Hello!")
    assert str(first) == llm.chat([ChatMessage(role="user", content="Hello!")]).message.content
    streamed = await engine.astream_chat("Go on.")
    pieces = [p async for p in streamed.async_response_gen()]
    assert "".join(pieces) == str(streamed)


# ---------------------------------------------------------------- async


async def test_gather_of_several_achat_calls(llm: GemmaLocal) -> None:
    prompts = [[ChatMessage(role="user", content=f"Question number {i}?")] for i in range(4)]
    expected = [llm.chat(p).message.content for p in prompts]
    results = await asyncio.gather(*(llm.achat(p) for p in prompts))
    assert [r.message.content for r in results] == expected
    assert all(r.additional_kwargs["prompt_tokens"] > 0 for r in results)


MAX_GAP_S = 0.050
HEARTBEAT_TOKENS = 200


async def _max_heartbeat_gap(generate) -> tuple[float, int, float]:
    """Run ``generate()`` while a 10 ms heartbeat ticks; the largest gap between ticks."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.03)  # the heartbeat is running before generation starts
    gaps.clear()
    started = time.perf_counter()
    tokens = await generate()
    elapsed = time.perf_counter() - started
    done.set()
    await beat
    return max(gaps), tokens, elapsed


@pytest.mark.parametrize("mode", ["achat", "astream_chat"])
async def test_event_loop_stays_free_during_generation(client, mode: str) -> None:
    """A heartbeat keeps ticking (no gap over 50 ms) while a generation runs.

    The model is loaded first: loading imports torch / transformers on the
    model thread, and initialising a C extension holds the GIL (~250 ms
    measured for torch), which no event loop can avoid. Generation runs on
    the model thread and hands results over with ``call_soon_threadsafe``;
    measured max gaps on the 2-core dev machine: 11-25 ms (both backends).
    On a CPU oversubscribed by other processes (load ~7 on 2 cores) an *idle*
    loop already sees ~30 ms gaps and the OS can preempt the thread holding
    the GIL, so gaps up to ~85 ms were measured there (Linux schedstat: the
    loop waiting in the run queue or on the GIL holder, not on our code).
    """
    client.load()
    llm = GemmaLocal(client=client, temperature=0, max_tokens=HEARTBEAT_TOKENS)
    messages = [ChatMessage(role="user", content="Write a long poem about the sea.")]

    async def generate() -> int:
        if mode == "achat":
            response = await llm.achat(messages, logit_bias=NO_END)
            return response.additional_kwargs["completion_tokens"]
        *_, last = [r async for r in await llm.astream_chat(messages, logit_bias=NO_END)]
        return last.additional_kwargs["completion_tokens"]

    gap, tokens, elapsed = await _max_heartbeat_gap(generate)
    print(
        f"\n{client.implementation} {mode}: {tokens} tokens in {elapsed:.3f}s, max gap {gap * 1000:.1f} ms"
    )
    assert tokens == HEARTBEAT_TOKENS
    assert elapsed > 5 * 0.01, "the generation was too short to prove anything"
    assert gap < MAX_GAP_S, f"the event loop was blocked for {gap * 1000:.0f} ms"


async def test_heartbeat_detects_a_blocked_loop(client) -> None:
    """Control: the same generation run synchronously on the loop shows up as a long gap."""
    client.load()
    llm = GemmaLocal(client=client, temperature=0, max_tokens=HEARTBEAT_TOKENS)
    messages = [ChatMessage(role="user", content="Write a long poem about the sea.")]

    async def blocking() -> int:  # what CustomLLM's default achat does
        return llm.chat(messages, logit_bias=NO_END).additional_kwargs["completion_tokens"]

    gap, tokens, elapsed = await _max_heartbeat_gap(blocking)
    assert tokens == HEARTBEAT_TOKENS
    assert gap >= 0.9 * elapsed and gap > MAX_GAP_S
