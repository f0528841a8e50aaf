"""Continuous batching (core.scheduler): concurrent requests share one running batch.

Every result is checked against the same request run alone (greedy, float32
tiny checkpoints), on both backends: a request that joins a running batch,
leaves it early or shares it with rows of other options gets exactly its lone
reply. Limits: a full queue raises at once; ``close()`` ends queued and
running requests.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import make_client
from test_core_support import END_OF_TURN, EOS, PROMPTS, USER, content

from core import ClientClosedError, QueueFullError

GREEDY = {"temperature": 0, "max_tokens": 16}
ENDLESS = {"temperature": 0, "max_tokens": 2000, "logit_bias": {EOS: -100, END_OF_TURN: -100}}
#: Sixteen different prompts (lengths 1 to 16 words) for sixteen threads.
SIXTEEN = [
    [{"role": "user", "content": " ".join(["tell me about the sea"] * (1 + i % 4)) + f" {i}"}]
    for i in range(16)
]


def choices_and_usage(result: dict) -> tuple:
    return result["choices"], result["usage"]


def count_steps(client) -> dict[str, int]:
    """Counts the scheduler's decode steps and the largest batch it stepped."""
    state = {"steps": 0, "widest": 0}
    scheduler = client._scheduler
    step = scheduler._step

    def counted() -> None:
        rows = sum(len(r.rows) for r in scheduler._active)
        state["steps"] += 1
        state["widest"] = max(state["widest"], rows)
        step()

    scheduler._step = counted
    return state


def test_sixteen_threads_each_get_their_lone_greedy_reply(client) -> None:
    alone = [client.create(m, **GREEDY) for m in SIXTEEN]
    steps = count_steps(client)
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda m: client.create(m, **GREEDY), SIXTEEN))
    finally:
        del client._scheduler._step
    for a, b in zip(alone, together, strict=True):
        assert choices_and_usage(b) == choices_and_usage(a)
    assert steps["widest"] > 1  # they really shared a batch


def test_rows_of_different_options_share_a_batch(client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    requests = [
        (PROMPTS[0], GREEDY),
        (PROMPTS[1], {"temperature": 0, "max_tokens": 5}),
        (PROMPTS[2], {"temperature": 0, "max_tokens": 24, "logit_bias": {EOS: -100}}),
        (PROMPTS[0], {"temperature": 0, "max_tokens": 20, "repetition_penalty": 1.3}),
        (PROMPTS[1], {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7, "max_tokens": 12}),
        (PROMPTS[2], {"temperature": 0, "max_tokens": 30, "stop": ["e"]}),
        (
            PROMPTS[0],
            {
                "temperature": 0,
                "max_tokens": 60,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": schema},
                },
            },
        ),
        (PROMPTS[1], {"temperature": 0, "max_tokens": 10, "n": 2}),
    ]
    alone = [client.create(m, **o) for m, o in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.create(r[0], **r[1]), requests))
    for a, b in zip(alone, together, strict=True):
        assert choices_and_usage(b) == choices_and_usage(a)
    assert together[1]["usage"]["completion_tokens"] <= 5
    assert "e" not in content(together[5])
    if together[6]["choices"][0]["finish_reason"] == "stop":
        assert set(json.loads(content(together[6]))) >= {"name", "age"}
    assert len(together[7]["choices"]) == 2


def test_a_request_arriving_mid_batch_joins_and_gets_its_lone_reply(client) -> None:
    reference = client.create(PROMPTS[2], **GREEDY)
    long = client.create(USER, stream=True, **ENDLESS)
    for _ in range(6):  # the long request is decoding
        next(long)
    steps = count_steps(client)
    try:
        joined = client.create(PROMPTS[2], **GREEDY)
        assert next(long)["choices"][0]["finish_reason"] is None  # still going meanwhile
    finally:
        long.close()
        del client._scheduler._step
    assert choices_and_usage(joined) == choices_and_usage(reference)
    assert steps["widest"] == 2  # it decoded beside the long one


def test_cancelling_one_stream_leaves_the_others_running(client) -> None:
    references = [client.create(m, **GREEDY) for m in PROMPTS]
    gate = threading.Barrier(len(PROMPTS) + 1)

    def reader() -> int:
        stream = client.create(USER, stream=True, **ENDLESS)
        next(stream)
        gate.wait(10)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        return i

    def other(messages) -> dict:
        gate.wait(10)
        return client.create(messages, **GREEDY)

    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        cancelled = pool.submit(reader)
        others = [pool.submit(other, m) for m in PROMPTS]
        assert cancelled.result(60) == 3
        for future, reference in zip(others, references, strict=True):
            assert choices_and_usage(future.result(60)) == choices_and_usage(reference)
    # the cancelled row left the batch: the client is idle again
    assert client._worker.call(lambda: len(client._scheduler._active)) == 0


async def test_asyncio_gather_shares_the_batch(client) -> None:
    import asyncio

    alone = [client.create(m, **GREEDY) for m in SIXTEEN[:6]]
    together = await asyncio.gather(*(client.acreate(m, **GREEDY) for m in SIXTEEN[:6]))
    for a, b in zip(alone, together, strict=True):
        assert choices_and_usage(b) == choices_and_usage(a)


async def test_cancelling_an_asyncio_task_removes_its_row(client) -> None:
    """A cancelled ``acreate`` (its task, or an async stream closed early) leaves the
    batch at the next step; a request decoding beside it gets its lone reply."""
    import asyncio

    reference = client.create(PROMPTS[0], **GREEDY)

    def rows() -> int:
        return client._worker.call(lambda: client._scheduler.active_rows)

    async def until_rows(count: int, *, at_most: bool = False) -> None:
        deadline = time.monotonic() + 30
        while True:
            now = await asyncio.to_thread(rows)
            if now == count or (at_most and now < count):
                return
            assert time.monotonic() < deadline, f"the batch never held {count} rows"
            await asyncio.sleep(0.01)

    # Whether both rows shared a step is seen from inside the step, not by polling: the
    # other request (a prefix-cache hit) can join, decode and finish between two polls.
    shared = threading.Event()
    scheduler = client._scheduler
    step = scheduler._step

    def watched() -> None:
        if sum(len(r.rows) for r in scheduler._active) >= 2:
            shared.set()
        step()

    endless = asyncio.create_task(client.acreate(USER, **ENDLESS))
    await until_rows(1)
    scheduler._step = watched
    try:
        other = asyncio.create_task(client.acreate(PROMPTS[0], **GREEDY))
        assert await asyncio.to_thread(shared.wait, 30), "the batch never held 2 rows"
    finally:
        del scheduler._step
    endless.cancel()
    with pytest.raises(asyncio.CancelledError):
        await endless
    await until_rows(1, at_most=True)  # the cancelled row left (the other may be done)
    assert choices_and_usage(await other) == choices_and_usage(reference)
    await until_rows(0)

    stream = await client.acreate(USER, stream=True, **ENDLESS)
    async for _ in stream:
        break
    await until_rows(1)
    await stream.aclose()
    await until_rows(0)


def test_requests_arriving_together_join_in_one_prefill(client, monkeypatch) -> None:
    """Requests waiting at the same tick reach the engine in one ``add`` (MLX spreads
    their prefills over its CPU streams), which gives each row its first token there
    and then (no step of the whole batch before it), and each gets its lone reply."""
    alone = [client.create(m, **GREEDY) for m in SIXTEEN[:4]]
    engine = client._worker.call(lambda: client._scheduler._engine)
    added: list[tuple[int, int]] = []
    add = type(engine).add

    def counted(self, rows):
        first = add(self, rows)
        added.append((len(rows), len(first)))
        return first

    monkeypatch.setattr(type(engine), "add", counted)
    gate = threading.Event()
    client._worker.submit(gate.wait)  # the model thread waits: the four requests queue
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.create, m, **GREEDY) for m in SIXTEEN[:4]]
        while len(client._in_flight) < 4:
            time.sleep(0.005)
        gate.set()
        together = [f.result(60) for f in futures]
    assert added == [(4, 4)]
    for a, b in zip(alone, together, strict=True):
        assert choices_and_usage(b) == choices_and_usage(a)


def test_a_failed_prefill_ends_the_batch_with_its_error(client, monkeypatch) -> None:
    """A prefill that raises ends the requests of the batch it may have half-joined with
    that error (none is cut short silently); the client then serves as before."""
    reference = client.create(PROMPTS[0], **GREEDY)
    engine = client._worker.call(lambda: client._scheduler._engine)
    add = type(engine).add

    def failing(self, rows):
        raise RuntimeError("prefill failed here")

    long = client.create(USER, stream=True, **ENDLESS)
    next(long)
    monkeypatch.setattr(type(engine), "add", failing)
    try:
        with pytest.raises(RuntimeError, match="prefill failed here"):
            client.create(PROMPTS[0], **GREEDY)
        with pytest.raises(RuntimeError, match="prefill failed here"):
            for _ in long:
                pass
    finally:
        long.close()
        monkeypatch.setattr(type(engine), "add", add)
    assert choices_and_usage(client.create(PROMPTS[0], **GREEDY)) == choices_and_usage(reference)


def test_create_batch_rows_join_a_running_batch(client) -> None:
    alone = [client.create(m, **GREEDY) for m in PROMPTS]
    long = client.create(USER, stream=True, **ENDLESS)
    next(long)
    try:
        batch = client.create_batch(PROMPTS, **GREEDY)
    finally:
        long.close()
    for a, b in zip(alone, batch, strict=True):
        assert choices_and_usage(b) == choices_and_usage(a)


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_a_full_queue_raises_at_once(gemma3_path, backend) -> None:
    fresh = make_client(backend, gemma3_path, max_batch_size=1, max_queue=1)
    try:
        running = fresh.create(USER, stream=True, **ENDLESS)
        next(running)  # in the batch, which is now full
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(fresh.create, PROMPTS[1], **GREEDY)
            while len(fresh._in_flight) < 2:  # it waits for a row
                time.sleep(0.005)
            started = time.perf_counter()
            with pytest.raises(QueueFullError, match="max_queue=1"):
                fresh.create(PROMPTS[2], **GREEDY)
            assert time.perf_counter() - started < 1.0
            assert not waiting.done()  # a batch of one: it waits for the running row
            running.close()
            assert waiting.result(60)["usage"]["completion_tokens"] > 0
        assert fresh.create(PROMPTS[2], temperature=0, max_tokens=2)["usage"]["completion_tokens"]
    finally:
        fresh.close()


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_close_cancels_queued_and_running_requests(gemma3_path, backend) -> None:
    fresh = make_client(backend, gemma3_path, max_batch_size=2)
    fresh.load()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(fresh.create, m, **ENDLESS) for m in PROMPTS]
        while len(fresh._in_flight) < 3 or not fresh._scheduler._active:
            time.sleep(0.005)
        time.sleep(0.1)  # two rows decode, the third waits for one
        started = time.perf_counter()
        fresh.close()
        assert time.perf_counter() - started < 5.0
        for future in futures:
            with pytest.raises(ClientClosedError):
                future.result(10)
    assert fresh.create(USER, temperature=0, max_tokens=3)["usage"]["completion_tokens"] == 3
    fresh.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
        ({"max_batch_size": 2.5}, "max_batch_size must be a positive integer"),
        ({"max_batch_size": True}, "max_batch_size must be a positive integer"),
        ({"max_queue": -1}, "max_queue must be a non-negative integer"),
        ({"max_queue": "8"}, "max_queue must be a non-negative integer"),
    ],
)
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_limits_are_checked_before_anything_loads(gemma3_path, backend, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_client(backend, gemma3_path, **options)


def test_a_batch_larger_than_max_batch_size_still_runs(gemma3_path) -> None:
    fresh = make_client("transformers", gemma3_path, max_batch_size=2)
    try:
        alone = [fresh.create(m, **GREEDY) for m in PROMPTS]
        batch = fresh.create_batch(PROMPTS, **GREEDY)  # three rows: runs once the batch is empty
        for a, b in zip(alone, batch, strict=True):
            assert choices_and_usage(b) == choices_and_usage(a)
        with ThreadPoolExecutor(6) as pool:  # six requests through two rows
            together = list(pool.map(lambda m: fresh.create(m, **GREEDY), PROMPTS * 2))
        for a, b in zip(alone * 2, together, strict=True):
            assert choices_and_usage(b) == choices_and_usage(a)
    finally:
        fresh.close()


def test_an_engine_that_cannot_be_built_leaves_requests_running_whole(gemma3_path) -> None:
    client = make_client("transformers", gemma3_path)
    try:
        reference = client.create(PROMPTS[1], **GREEDY)
        client._worker.call(lambda: client._scheduler._reset_engine())

        def broken() -> None:
            raise ImportError("cannot import name 'DummyLayer'")

        client._batch_engine = broken
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: client.create(PROMPTS[1], **GREEDY), range(3)))
        for reply in replies:
            assert choices_and_usage(reply) == choices_and_usage(reference)
    finally:
        client.close()


def test_a_scheduler_bug_ends_the_requests_instead_of_hanging_them(gemma3_path) -> None:
    client = make_client("transformers", gemma3_path)
    try:
        client.create(PROMPTS[1], **GREEDY)
        engine = client._worker.call(lambda: client._scheduler._engine)
        remove = engine.remove

        def failing(rows) -> None:
            raise RuntimeError("remove failed")

        engine.remove = failing
        with pytest.raises(RuntimeError, match="remove failed"):
            client.create(PROMPTS[1], **GREEDY)
        engine.remove = remove
        assert client.create(PROMPTS[1], **GREEDY)["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
    finally:
        client.close()


def test_the_cache_keyword_follows_the_transformers_release() -> None:
    from core.torch_batch import cache_keyword

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
