"""One client shared by threads and event loops; stopping a stream stops its generation."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_core_support import END_OF_TURN, EOS, PROMPTS, USER, ScriptedClient, content, stream_text

GREEDY = {"temperature": 0, "max_tokens": 12}
ENDLESS = {"temperature": 0, "max_tokens": 2000, "logit_bias": {EOS: -100, END_OF_TURN: -100}}


@pytest.fixture
def references(client) -> list[dict]:
    return [client.create(m, **GREEDY) for m in PROMPTS]


def test_threads_share_one_client(client, references) -> None:
    def work(i: int) -> list[tuple[int, dict]]:
        out = []
        for j in range(2):
            k = (i + j) % len(PROMPTS)
            if (i + j) % 3 == 2:  # some of them stream
                chunks = list(client.create(PROMPTS[k], stream=True, **GREEDY))
                out.append((k, {"text": stream_text(chunks), "usage": chunks[-1]["usage"]}))
            else:
                result = client.create(PROMPTS[k], **GREEDY)
                out.append((k, {"text": content(result), "usage": result["usage"]}))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(work, range(4)) for r in rs]
    assert len(results) == 8
    for k, got in results:
        assert got == {"text": content(references[k]), "usage": references[k]["usage"]}


async def test_gather_of_acreate_equals_reference(client, references) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(client.acreate(PROMPTS[i % 3], **GREEDY) for i in range(4)))
    task.cancel()
    for i, result in enumerate(results):
        assert result["choices"] == references[i % 3]["choices"]
        assert result["usage"] == references[i % 3]["usage"]
    assert ticks > 4  # the loop kept running while the model worked


async def test_async_streams_interleave_correctly(client, references) -> None:
    async def collect(k: int) -> str:
        return stream_text(
            [c async for c in await client.acreate(PROMPTS[k], stream=True, **GREEDY)]
        )

    texts = await asyncio.gather(*(collect(k) for k in (0, 1, 2, 0)))
    assert texts == [content(references[k]) for k in (0, 1, 2, 0)]


def test_threads_and_event_loop_together(client, references) -> None:
    def in_loop() -> list[dict]:
        async def main() -> list[dict]:
            return await asyncio.gather(*(client.acreate(m, **GREEDY) for m in PROMPTS))

        return asyncio.run(main())

    with ThreadPoolExecutor(3) as pool:
        loop_results = pool.submit(in_loop)
        thread_results = list(pool.map(lambda m: client.create(m, **GREEDY), PROMPTS))
        batch = pool.submit(client.create_batch, PROMPTS, **GREEDY)
        for got in (loop_results.result(), thread_results, batch.result()):
            assert [g["choices"] for g in got] == [r["choices"] for r in references]


# ------------------------------------------------------------------ cancellation


def count_tokens(monkeypatch, client) -> dict[str, int]:
    """Count the tokens the backend pushes (the real generation runs unchanged)."""
    original = client._generate
    state = {"pushed": 0, "jobs": 0}

    def counting(prompts, params, sink):
        state["jobs"] += 1
        push, push_row = sink.push, sink.push_row

        def counted_push(ids):
            state["pushed"] += 1
            push(ids)

        def counted_push_row(index, token):
            state["pushed"] += 1
            push_row(index, token)

        sink.push, sink.push_row = counted_push, counted_push_row
        original(prompts, params, sink)

    monkeypatch.setattr(client, "_generate", counting)
    return state


def assert_idle(client, state: dict[str, int], baseline: int) -> None:
    """The generation has stopped, the model thread is alive and idle, no thread leaked."""
    pushed = state["pushed"]
    assert pushed < 200, f"generation ran on after the reader left ({pushed} tokens)"
    assert client._worker.alive
    started = time.perf_counter()
    assert client._worker.call(lambda: "idle") == "idle"
    assert time.perf_counter() - started < 1.0
    time.sleep(0.05)
    assert state["pushed"] == pushed
    assert threading.active_count() == baseline


def test_breaking_out_of_a_stream_stops_generation(monkeypatch, client) -> None:
    client.create(USER, temperature=0, max_tokens=1)  # the model thread exists
    baseline = threading.active_count()
    state = count_tokens(monkeypatch, client)
    for i, _ in enumerate(client.create(USER, stream=True, **ENDLESS)):
        if i == 2:  # the role chunk and two content chunks
            break
    assert_idle(client, state, baseline)
    after = client.create(USER, temperature=0, max_tokens=3)
    assert after["usage"]["completion_tokens"] == 3
    assert threading.active_count() == baseline


def test_closing_a_held_stream_stops_generation(monkeypatch, client) -> None:
    client.create(USER, temperature=0, max_tokens=1)
    baseline = threading.active_count()
    state = count_tokens(monkeypatch, client)
    stream = client.create(USER, stream=True, **ENDLESS)
    first = [next(stream), next(stream)]
    assert first[0]["choices"][0]["delta"]["role"] == "assistant"
    stream.close()
    assert_idle(client, state, baseline)
    with pytest.raises(StopIteration):
        next(stream)


def test_raw_delta_stream_close_stops_generation(monkeypatch, client) -> None:
    from core import SamplingParams

    client.create(USER, temperature=0, max_tokens=1)
    baseline = threading.active_count()
    state = count_tokens(monkeypatch, client)
    params = SamplingParams.build(**ENDLESS)
    deltas = client.stream_deltas([USER, PROMPTS[1]], params)
    next(deltas)
    deltas.close()
    assert_idle(client, state, baseline)


async def test_aclose_of_an_async_stream_stops_generation(monkeypatch, client) -> None:
    await client.acreate(USER, temperature=0, max_tokens=1)
    baseline = threading.active_count()
    state = count_tokens(monkeypatch, client)
    stream = await client.acreate(USER, stream=True, **ENDLESS)
    count = 0
    async for _ in stream:
        count += 1
        if count == 2:
            break
    await stream.aclose()
    assert_idle(client, state, baseline)
    out = await client.acreate(USER, temperature=0, max_tokens=2)
    assert out["usage"]["completion_tokens"] == 2


async def test_cancelling_an_acreate_task_stops_generation(monkeypatch, client) -> None:
    await client.acreate(USER, temperature=0, max_tokens=1)
    baseline = threading.active_count()
    state = count_tokens(monkeypatch, client)
    task = asyncio.create_task(client.acreate(USER, **ENDLESS))
    while state["pushed"] < 3:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_idle(client, state, baseline)


def test_a_cancelled_stream_does_not_disturb_other_callers(monkeypatch, client, references) -> None:
    state = count_tokens(monkeypatch, client)

    def reader() -> None:
        for i, _ in enumerate(client.create(USER, stream=True, **ENDLESS)):
            if i == 3:
                break

    with ThreadPoolExecutor(3) as pool:
        readers = [pool.submit(reader) for _ in range(2)]
        other = pool.submit(client.create, PROMPTS[2], **GREEDY)
        for r in readers:
            r.result()
        assert other.result()["choices"] == references[2]["choices"]
    assert state["jobs"] == 3 and state["pushed"] < 200


def test_request_queued_behind_a_close_reloads_instead_of_failing(gemma3_path) -> None:
    """close() from one thread while another thread's request waits for the model thread."""
    client = ScriptedClient(gemma3_path).load()
    ids = client.tokenizer.encode("hello there", add_special_tokens=False)
    gate = threading.Event()
    client._worker.submit(lambda: gate.wait(5))  # keep the model thread busy

    def queued(n: int) -> None:
        while client._worker._jobs.qsize() < n:
            time.sleep(0.001)

    closer = threading.Thread(target=client.close)
    closer.start()
    queued(1)  # the unload job waits behind the busy one
    client.enqueue(ids)
    with ThreadPoolExecutor(2) as pool:
        request = pool.submit(client.create, USER, max_tokens=10)
        queued(2)  # the request's job waits behind the unload job
        prompt = pool.submit(client.format_prompt, USER)
        queued(3)
        gate.set()
        closer.join()
        assert content(request.result()) == "hello there"
        assert prompt.result().ids[0] == 2
    client.close()
    assert not client.is_loaded and not client._worker.alive
