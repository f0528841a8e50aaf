"""``GemmaLocal`` on both backends (tiny random-weight Gemma 3): every entry point, options, events.

The tiny models write gibberish, so these tests assert structure, greedy
determinism, counts and equality with direct core calls, never words.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.callbacks.token_counting import TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from media_support import noise_png

from llama_index_gemma_local import GemmaLocal

ROOT = Path(__file__).resolve().parents[1]
MAX = 6
USER = [ChatMessage(role="user", content="Write a short poem about the sea.")]
OPENAI_USER = [{"role": "user", "content": "Write a short poem about the sea."}]
END_OF_TURN = 106
NO_END = {1: -100, END_OF_TURN: -100}  # never end early: exactly max_tokens tokens


@pytest.fixture
def llm(client) -> GemmaLocal:
    return GemmaLocal(client=client, temperature=0, max_tokens=MAX)


@pytest.fixture
def reference(client) -> dict:
    """What core itself answers, greedily, to USER."""
    return client.create(OPENAI_USER, temperature=0, max_tokens=MAX)


# ------------------------------------------------------------- construction


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_and_construction_load_nothing_heavy(gemma3_path: Path) -> None:
    """Importing, constructing and reading metadata import no torch/transformers/mlx."""
    code = f"""
import sys
from llama_index_gemma_local import GemmaLocal
for backend in ("transformers", "mlx"):
    llm = GemmaLocal({str(gemma3_path)!r}, backend=backend, max_tokens=16)
    m = llm.metadata
    assert not llm.client.is_loaded
    assert (m.context_window, m.num_output, m.is_chat_model) == (2048, 16, True), m
    assert llm.client.implementation == backend
heavy = [n for n in ("torch", "transformers", "mlx", "mlx_lm") if n in sys.modules]
print(heavy)
"""
    assert _run(code) == "[]"


def test_defaults_pick_the_backend_default_model() -> None:
    llm = GemmaLocal(backend="transformers")
    assert llm.model == "google/gemma-3-12b-it"
    assert llm.metadata.model_name == "google/gemma-3-12b-it"
    assert llm.metadata.num_output == 2048  # core's default max_tokens
    assert not llm.client.is_loaded
    assert GemmaLocal(backend="mlx").model == "mlx-community/gemma-3-12b-it-4bit-DWQ"


def test_client_kwargs_reach_the_backend(gemma3_path: Path) -> None:
    llm = GemmaLocal(
        str(gemma3_path), backend="transformers", client_kwargs={"torch_dtype": "float32"}
    )
    assert llm.client.torch_dtype == "float32"
    with pytest.raises(TypeError):
        GemmaLocal(str(gemma3_path), backend="mlx", client_kwargs={"no_such_option": 1})


def test_shared_client(client) -> None:
    llm = GemmaLocal(client=client)
    assert llm.client is client
    assert llm.model == client.model_name == llm.metadata.model_name
    with pytest.raises(ValueError, match="does not match"):
        GemmaLocal("google/gemma-2-2b-it", client=client)
    with pytest.raises(ValueError, match="client_kwargs"):
        GemmaLocal(client=client, client_kwargs={"device_map": "cpu"})
    with pytest.raises(TypeError, match="BaseGemmaChatCompletion"):
        GemmaLocal(client=object())


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("temperature", 3.0, r"temperature must be in \[0.0, 2.0\]"),
        ("max_tokens", 0, "max_tokens must be >= 1"),
        ("top_p", 0.0, "top_p"),
        ("seed", -1, "seed"),
    ],
)
def test_bad_fields_fail_at_construction(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GemmaLocal(backend="transformers", **{field: value})


def test_metadata(client) -> None:
    llm = GemmaLocal(client=client, max_tokens=32)
    meta = llm.metadata
    assert meta.context_window == 2048  # max_position_embeddings of the tiny config
    assert meta.num_output == 32
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is True
    assert meta.model_name == client.model_name
    assert GemmaLocal(client=client, context_window=512).metadata.context_window == 512


def test_metadata_without_a_readable_config(tmp_path: Path) -> None:
    """A hub model that is not in the cache yet: LlamaIndex's default window, nothing loaded."""
    llm = GemmaLocal("google/gemma-3-not-in-cache-it", backend="transformers")
    assert llm.metadata.context_window == 3900
    assert not llm.client.is_loaded


# ------------------------------------------------------------- sync / async


def test_chat_matches_core(llm: GemmaLocal, reference: dict) -> None:
    response = llm.chat(USER)
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == reference["choices"][0]["message"]["content"]
    raw = response.raw
    assert raw["object"] == "chat.completion"
    assert raw["choices"][0]["finish_reason"] == "length"
    assert raw["usage"] == reference["usage"]
    assert response.additional_kwargs == {**reference["usage"], "finish_reason": "length"}
    assert response.additional_kwargs["completion_tokens"] == MAX


def test_stream_chat(llm: GemmaLocal, reference: dict) -> None:
    responses = list(llm.stream_chat(USER))
    text = reference["choices"][0]["message"]["content"]
    assert "".join(r.delta for r in responses) == text
    assert responses[-1].message.content == text
    assert all(r.raw["object"] == "chat.completion.chunk" for r in responses)
    # each message holds the text so far
    so_far = ""
    for r in responses:
        so_far += r.delta
        assert r.message.content == so_far
    assert responses[-1].delta == ""
    assert responses[-1].raw["usage"] == reference["usage"]
    assert responses[-1].additional_kwargs == {**reference["usage"], "finish_reason": "length"}


def test_complete_is_chat_of_one_user_turn(llm: GemmaLocal, reference: dict) -> None:
    text = reference["choices"][0]["message"]["content"]
    completion = llm.complete(USER[0].content)
    assert completion.text == text
    assert completion.raw["usage"] == reference["usage"]
    assert completion.additional_kwargs["completion_tokens"] == MAX
    streamed = list(llm.stream_complete(USER[0].content))
    assert "".join(r.delta for r in streamed) == text == streamed[-1].text
    assert streamed[-1].additional_kwargs["finish_reason"] == "length"


def test_complete_adds_system_prompt_unless_formatted(client) -> None:
    llm = GemmaLocal(client=client, temperature=0, max_tokens=MAX, system_prompt="Be terse.")
    with_system = client.create(
        [{"role": "system", "content": "Be terse."}, *OPENAI_USER], temperature=0, max_tokens=MAX
    )
    plain = client.create(OPENAI_USER, temperature=0, max_tokens=MAX)
    assert with_system["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert llm.complete(USER[0].content).raw["usage"] == with_system["usage"]
    assert llm.complete(USER[0].content, formatted=True).raw["usage"] == plain["usage"]
    # chat() sends the messages as given (LlamaIndex's predict() adds system_prompt itself)
    assert llm.chat(USER).raw["usage"] == plain["usage"]


async def test_async_matches_sync(llm: GemmaLocal, reference: dict) -> None:
    text = reference["choices"][0]["message"]["content"]
    assert (await llm.achat(USER)).message.content == text
    assert (await llm.acomplete(USER[0].content)).text == text
    streamed = [r async for r in await llm.astream_chat(USER)]
    assert "".join(r.delta for r in streamed) == text
    assert streamed[-1].additional_kwargs == {**reference["usage"], "finish_reason": "length"}
    completions = [r async for r in await llm.astream_complete(USER[0].content)]
    assert "".join(r.delta for r in completions) == text == completions[-1].text


def test_multi_turn_with_system_and_blocks(llm: GemmaLocal, client) -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", blocks=[TextBlock(text="Hello"), TextBlock(text="there")]),
        ChatMessage(role="assistant", content="Hi!"),
        ChatMessage(role="user", content="How are you?"),
    ]
    expected = client.create(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello\nthere"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "How are you?"},
        ],
        temperature=0,
        max_tokens=MAX,
    )
    response = llm.chat(messages)
    assert response.message.content == expected["choices"][0]["message"]["content"]
    assert response.raw["usage"] == expected["usage"]


# ------------------------------------------------------------------ options


def test_per_call_max_tokens_and_temperature(client) -> None:
    hot = GemmaLocal(client=client, temperature=1.5, max_tokens=MAX)
    greedy = client.create(OPENAI_USER, temperature=0, max_tokens=3, logit_bias=NO_END)
    response = hot.chat(USER, temperature=0, max_tokens=3, logit_bias=NO_END)
    assert response.message.content == greedy["choices"][0]["message"]["content"]
    assert response.additional_kwargs["completion_tokens"] == 3
    assert response.additional_kwargs["finish_reason"] == "length"


def test_per_call_stop(llm: GemmaLocal) -> None:
    text = llm.chat(USER, max_tokens=16, logit_bias=NO_END).message.content
    candidates = [c for c in text[1:] if c.strip() and c != "\ufffd"]
    assert candidates, f"no usable stop character in {text!r}"
    stop = candidates[len(candidates) // 2]
    response = llm.chat(USER, max_tokens=16, logit_bias=NO_END, stop=[stop])
    assert response.message.content == text[: text.index(stop)]
    assert response.additional_kwargs["finish_reason"] == "stop"
    streamed = list(llm.stream_chat(USER, max_tokens=16, logit_bias=NO_END, stop=stop))
    assert "".join(r.delta for r in streamed) == text[: text.index(stop)]


def test_stop_field(client) -> None:
    llm = GemmaLocal(client=client, temperature=0, max_tokens=16)
    text = llm.chat(USER, logit_bias=NO_END).message.content
    stop = next(c for c in text[1:] if c.strip() and c != "\ufffd")
    stopped = GemmaLocal(client=client, temperature=0, max_tokens=16, stop=[stop])
    assert stopped.chat(USER, logit_bias=NO_END).message.content == text[: text.index(stop)]


def test_logit_bias_forcing_end_of_turn(llm: GemmaLocal) -> None:
    response = llm.chat(USER, logit_bias={END_OF_TURN: 100})
    assert response.message.content == ""
    assert response.additional_kwargs["completion_tokens"] == 1
    assert response.additional_kwargs["finish_reason"] == "stop"


def test_seed_makes_sampling_reproducible(client) -> None:
    llm = GemmaLocal(client=client, temperature=1.0, max_tokens=8, seed=7)
    assert llm.chat(USER).message.content == llm.chat(USER).message.content


@pytest.mark.parametrize("option", ["n", "stream", "model", "functions", "frequency_penalty"])
def test_unknown_per_call_options_are_refused(llm: GemmaLocal, option: str) -> None:
    with pytest.raises(TypeError, match=rf"\['{option}'\].*allowed per-call options"):
        llm.chat(USER, **{option: 2})


def test_bad_per_call_values(llm: GemmaLocal) -> None:
    with pytest.raises(ValueError, match="temperature"):
        llm.complete("hi", temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        list(llm.stream_chat(USER, max_tokens=0))


# ------------------------------------------------------------------- errors


def test_errors_come_before_any_load(gemma3_path: Path) -> None:
    llm = GemmaLocal(str(gemma3_path), backend="transformers")
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # a truncated PNG
    with pytest.raises(ValueError, match="not an image PIL can read"):
        llm.chat([ChatMessage(role="user", blocks=[ImageBlock(image=png)])])
    with pytest.raises(ValueError, match="cannot read images: it reads text only"):
        llm.chat([ChatMessage(role="user", blocks=[ImageBlock(image=noise_png(0))])])
    with pytest.raises(ValueError, match="must start with a user message"):
        llm.chat([ChatMessage(role="assistant", content="hi")])
    with pytest.raises(ValueError, match="'function'"):
        llm.stream_chat([ChatMessage(role="function", content="42")])
    with pytest.raises(ValueError, match="tool_call_id"):
        llm.chat([ChatMessage(role="user", content="hi"), ChatMessage(role="tool", content="42")])
    assert not llm.client.is_loaded


async def test_async_errors(llm: GemmaLocal) -> None:
    with pytest.raises(ValueError, match="end with a user message"):
        await llm.achat([*USER, ChatMessage(role="assistant", content="x")])
    with pytest.raises(TypeError, match="unexpected option"):
        await llm.astream_complete("hi", n=2)


def test_breaking_out_of_a_stream_stops_it(llm: GemmaLocal, reference: dict) -> None:
    stream = llm.stream_chat(USER, max_tokens=64, logit_bias=NO_END)
    first = next(stream)
    assert first.delta
    stream.close()
    # the model thread is free again and answers the next call normally
    assert llm.chat(USER).message.content == reference["choices"][0]["message"]["content"]


async def test_breaking_out_of_an_async_stream_stops_it(llm: GemmaLocal, reference: dict) -> None:
    stream = await llm.astream_complete(USER[0].content, max_tokens=64, logit_bias=NO_END)
    async for _ in stream:
        break
    await stream.aclose()
    assert (await llm.achat(USER)).message.content == reference["choices"][0]["message"]["content"]


async def test_cancelling_a_task_stops_its_generation(llm: GemmaLocal, reference: dict) -> None:
    """A cancelled task's generation stops: the next call does not queue behind it."""
    seen: list[float] = []

    async def consume() -> None:
        async for _ in await llm.astream_chat(USER, max_tokens=2000, logit_bias=NO_END):
            seen.append(time.perf_counter())

    task = asyncio.create_task(consume())
    while len(seen) < 10:
        await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    per_delta = (seen[-1] - seen[0]) / (len(seen) - 1)
    started = time.perf_counter()
    assert (await llm.achat(USER)).message.content == reference["choices"][0]["message"]["content"]
    # ~1990 tokens were left: continuing them would take ~2000 x per_delta
    assert time.perf_counter() - started < 500 * per_delta

    task = asyncio.create_task(llm.achat(USER, max_tokens=2000, logit_bias=NO_END))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await llm.achat(USER)).message.content == reference["choices"][0]["message"]["content"]


# ------------------------------------------------------------------- events


class Recorder(BaseEventHandler):
    events: list = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event, **kwargs) -> None:
        self.events.append(event)


@pytest.fixture
def recorder():
    root = get_dispatcher()
    handler = Recorder(events=[])
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


def _names(recorder: Recorder) -> list[str]:
    return [type(e).__name__ for e in recorder.events if type(e).__name__.startswith("LLM")]


async def test_instrumentation_events(client, recorder: Recorder) -> None:
    llm = GemmaLocal(client=client, temperature=0, max_tokens=2)
    llm.chat(USER)
    assert _names(recorder) == ["LLMChatStartEvent", "LLMChatEndEvent"]
    end = recorder.events[-1]
    assert end.response.raw["usage"]["completion_tokens"] == 2

    recorder.events.clear()
    chunks = list(llm.stream_chat(USER))
    names = _names(recorder)
    assert names[0] == "LLMChatStartEvent" and names[-1] == "LLMChatEndEvent"
    assert names.count("LLMChatInProgressEvent") == len(chunks)

    recorder.events.clear()
    llm.complete("hi")
    list(llm.stream_complete("hi"))
    assert _names(recorder)[0] == "LLMCompletionStartEvent"
    assert _names(recorder)[-1] == "LLMCompletionEndEvent"
    assert "LLMChatStartEvent" not in _names(recorder)  # complete fires completion events only

    recorder.events.clear()
    await llm.achat(USER)
    [r async for r in await llm.astream_complete("hi")]
    names = _names(recorder)
    assert names[:2] == ["LLMChatStartEvent", "LLMChatEndEvent"]
    assert names[2] == "LLMCompletionStartEvent" and names[-1] == "LLMCompletionEndEvent"
    start = next(e for e in recorder.events if type(e).__name__ == "LLMChatStartEvent")
    assert start.model_dict["class_name"] == "GemmaLocal"
    assert start.model_dict["model_name"] == client.model_name


def test_callback_manager_events_and_token_counts(client) -> None:
    debug = LlamaDebugHandler(print_trace_on_end=False)
    counter = TokenCountingHandler(tokenizer=lambda text: text.split())  # not used: usage is
    llm = GemmaLocal(
        client=client,
        temperature=0,
        max_tokens=3,
        callback_manager=CallbackManager([debug, counter]),
    )
    response = llm.chat(USER)
    streamed = list(llm.stream_complete("hi"))
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 2
    usage = response.raw["usage"]
    last = streamed[-1].raw["usage"]
    assert counter.prompt_llm_token_count == usage["prompt_tokens"] + last["prompt_tokens"]
    assert counter.completion_llm_token_count == 3 + 3
