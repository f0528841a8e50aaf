"""ChatGemmaLocal in real LangChain use, on both backends, with a tiny random-weight Gemma 3.

The model's words are gibberish, so the assertions are about structure,
determinism (greedy decoding), token counts and equality with direct core
calls on the same client, never about what the reply says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_client
from langchain_core.chat_history import InMemoryChatMessageHistory
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory

from core import BaseGemmaChatCompletion, SamplingParams
from langchain_gemma_local import ChatGemmaLocal

END_OF_TURN = 106
PROMPTS = ["Hello", "Write me 2 haikus. Only include the haikus.", "how are you"]


def direct(client: BaseGemmaChatCompletion, text: str, **options: Any) -> dict[str, Any]:
    """The same request straight to core (what the adapter must agree with)."""
    return client.create([{"role": "user", "content": text}], **options)


class SpyDeltas:
    """Records every ``stream_deltas`` / ``astream_deltas`` request of a client."""

    def __init__(self, client: BaseGemmaChatCompletion, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, SamplingParams]] = []
        sync, asyn = client.stream_deltas, client.astream_deltas

        def stream_deltas(conversations: Any, params: SamplingParams) -> Iterator[Any]:
            self.calls.append((len(conversations), params))
            return sync(conversations, params)

        def astream_deltas(conversations: Any, params: SamplingParams) -> Any:
            self.calls.append((len(conversations), params))
            return asyn(conversations, params)

        monkeypatch.setattr(client, "stream_deltas", stream_deltas)
        monkeypatch.setattr(client, "astream_deltas", astream_deltas)


@pytest.fixture
def llm(client: BaseGemmaChatCompletion) -> ChatGemmaLocal:
    return ChatGemmaLocal(client=client, temperature=0, max_tokens=12)


def test_invoke_matches_core(llm: ChatGemmaLocal, client: BaseGemmaChatCompletion) -> None:
    result = llm.invoke("Hello")
    expected = direct(client, "Hello", temperature=0, max_tokens=12)
    assert result.content == expected["choices"][0]["message"]["content"]
    assert result.usage_metadata == {
        "input_tokens": expected["usage"]["prompt_tokens"],
        "output_tokens": expected["usage"]["completion_tokens"],
        "total_tokens": expected["usage"]["total_tokens"],
    }
    assert result.response_metadata["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert result.response_metadata["model_name"] == client.model_name


def test_prompt_model_parser_chain(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You translate to {language}."), ("human", "{text}")]
    )
    chain = prompt | llm | StrOutputParser()
    out = chain.invoke({"language": "French", "text": "I love programming."})
    expected = client.create(
        [
            {"role": "system", "content": "You translate to French."},
            {"role": "user", "content": "I love programming."},
        ],
        temperature=0,
        max_tokens=12,
    )
    assert isinstance(out, str) and out
    assert out == expected["choices"][0]["message"]["content"]
    # a chain's batch reaches the model's batch: a request per input, batched by core
    spy = SpyDeltas(client, monkeypatch)
    assert chain.batch([{"language": "French", "text": "I love programming."}] * 2) == [out, out]
    assert [n for n, _ in spy.calls] == [1, 1]


def test_stream_matches_invoke(llm: ChatGemmaLocal) -> None:
    chunks = list(llm.stream("Hello"))
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    result = llm.invoke("Hello")
    assert full.content == result.content
    assert full.usage_metadata == result.usage_metadata
    assert len([c for c in chunks if c.usage_metadata]) == 1


async def test_astream_events(llm: ChatGemmaLocal) -> None:
    chain = llm | StrOutputParser()
    tokens: list[str] = []
    ended: list[Any] = []
    async for event in chain.astream_events("Hello", version="v2"):
        if event["event"] == "on_chat_model_stream":
            tokens.append(event["data"]["chunk"].content)
        elif event["event"] == "on_chat_model_end":
            ended.append(event["data"]["output"])
    result = await llm.ainvoke("Hello")
    assert len([t for t in tokens if t]) > 1  # really streamed, piece by piece
    assert "".join(tokens) == result.content
    assert len(ended) == 1 and ended[0].usage_metadata == result.usage_metadata


@pytest.mark.filterwarnings("ignore::langchain_core._api.LangChainDeprecationWarning")
def test_multi_turn_history(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy_history: list[list[dict[str, Any]]] = []
    stream_deltas = client.stream_deltas

    def spy(conversations: Any, params: SamplingParams) -> Any:
        spy_history.extend(conversations)
        return stream_deltas(conversations, params)

    monkeypatch.setattr(client, "stream_deltas", spy)
    store: dict[str, InMemoryChatMessageHistory] = {}
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Be brief."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    chat = RunnableWithMessageHistory(
        prompt | llm,
        lambda session_id: store.setdefault(session_id, InMemoryChatMessageHistory()),
        input_messages_key="question",
        history_messages_key="history",
    )
    config = {"configurable": {"session_id": "s1"}}
    first = chat.invoke({"question": "My name is Ada."}, config=config)  # type: ignore[arg-type]
    second = chat.invoke({"question": "What is my name?"}, config=config)  # type: ignore[arg-type]
    history = store["s1"].messages
    assert [type(m) for m in history] == [HumanMessage, AIMessage, HumanMessage, AIMessage]
    assert history[1].content == first.content and history[3].content == second.content
    # the second turn sent the whole conversation to the model
    assert [m["role"] for m in spy_history[1]] == ["system", "user", "assistant", "user"]
    assert spy_history[1][2]["content"] == first.content
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]  # type: ignore[index]


def test_batch_equals_one_by_one(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_by_one = [llm.invoke(p) for p in PROMPTS]
    spy = SpyDeltas(client, monkeypatch)
    batched = llm.batch(PROMPTS)
    assert [m.content for m in batched] == [m.content for m in one_by_one]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in one_by_one]
    assert [m.response_metadata["finish_reason"] for m in batched] == [
        m.response_metadata["finish_reason"] for m in one_by_one
    ]
    assert [n for n, _ in spy.calls] == [1, 1, 1]  # a request per input, batched by core


async def test_abatch_equals_one_by_one(
    llm: ChatGemmaLocal, client: BaseGemmaChatCompletion, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_by_one = [await llm.ainvoke(p) for p in PROMPTS]
    spy = SpyDeltas(client, monkeypatch)
    batched = await llm.abatch(PROMPTS)
    assert [m.content for m in batched] == [m.content for m in one_by_one]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in one_by_one]
    assert [n for n, _ in spy.calls] == [1, 1, 1]


def test_shared_client_loads_once(backend_name: str, gemma3_path: Path) -> None:
    client = make_client(backend_name, gemma3_path)
    loads = 0
    load = client._load_model_and_tokenizer

    def counting_load() -> None:
        nonlocal loads
        loads += 1
        load()

    client._load_model_and_tokenizer = counting_load  # type: ignore[method-assign]
    try:
        llm = ChatGemmaLocal(client=client, temperature=0, max_tokens=6)
        assert not client.is_loaded  # constructing never loads
        via_langchain = llm.invoke("Hello")
        via_core = direct(client, "Hello", temperature=0, max_tokens=6)
        again = ChatGemmaLocal(client=client, temperature=0, max_tokens=6).invoke("Hello")
        assert via_langchain.content == via_core["choices"][0]["message"]["content"]
        assert again.content == via_langchain.content
        assert loads == 1
    finally:
        client.close()


def test_stop_and_max_tokens(llm: ChatGemmaLocal) -> None:
    full = llm.invoke("how are you", max_tokens=12)
    assert full.response_metadata["finish_reason"] == "length"
    assert full.usage_metadata["output_tokens"] == 12  # type: ignore[index]
    text = str(full.content)
    stop = text[len(text) // 2 :].strip()[:2]
    cut = llm.invoke("how are you", stop=[stop])
    assert cut.content == text[: text.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    short = llm.invoke("how are you", max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3  # type: ignore[index]


def test_logit_bias_forces_end_of_turn(llm: ChatGemmaLocal) -> None:
    result = llm.invoke("Hello", logit_bias={END_OF_TURN: 100})
    assert result.content == ""
    assert result.response_metadata["finish_reason"] == "stop"
    assert result.usage_metadata["output_tokens"] == 1  # type: ignore[index]


def test_seeded_sampling_is_reproducible(client: BaseGemmaChatCompletion) -> None:
    llm = ChatGemmaLocal(client=client, temperature=1.0, seed=7, max_tokens=10)
    assert llm.invoke("Hello").content == llm.invoke("Hello").content


def test_token_ids_from_the_models_tokenizer(llm: ChatGemmaLocal) -> None:
    ids = llm.get_token_ids("Hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert llm.get_num_tokens("Hello world") == len(ids)
    assert 2 not in ids  # no <bos>


async def test_async_does_not_block_the_event_loop(client: BaseGemmaChatCompletion) -> None:
    llm = ChatGemmaLocal(client=client, temperature=0, max_tokens=48)
    await llm.ainvoke("Hello")  # warm: loaded, kernels compiled
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    result = await llm.ainvoke("Write me 2 haikus. Only include the haikus.")
    elapsed = time.perf_counter() - started
    done.set()
    await task
    assert result.usage_metadata["output_tokens"] > 1  # type: ignore[index]
    assert ticks > 10, f"the loop ran only {ticks} times in {elapsed:.2f}s of generation"


def test_langgraph_graph_with_memory(llm: ChatGemmaLocal) -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, MessagesState, StateGraph

    def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    app = graph.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t1"}}
    app.invoke({"messages": [HumanMessage("Hello")]}, config)  # type: ignore[arg-type]
    out = app.invoke({"messages": [HumanMessage("how are you")]}, config)  # type: ignore[arg-type]
    messages = out["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, HumanMessage, AIMessage]
    assert messages[1].content == llm.invoke("Hello").content
    assert messages[3].content == llm.invoke(messages[:3]).content
