"""The token stream: incremental detokenizer, stop matcher, token sink and model worker (unit tier).

The detokenizer tests use the real tiny tokenizer (a Gemma-style BPE with byte
fallback: CJK and emoji become one token per UTF-8 byte) because the property
that matters is ``"".join(stream) == tokenizer.decode(ids)`` for *that* decoder.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from core import Delta, Prompt, SamplingParams, ToolCall, fold_deltas
from core.base import byte_and_special_ids
from core.families.gemma4_syntax import CONTROL_TEXT, SENTINELS
from core.stream import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopMatcher,
    TokenSink,
    sentinel_decoder,
)
from core.worker import ModelWorker, astream_job, stream_job


@pytest.fixture(scope="module")
def tok(gemma3_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma3_path))


@pytest.fixture(scope="module")
def special(tok):
    return byte_and_special_ids(tok)


def decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def stream(tok, special, ids: list[int]) -> list[str]:
    byte_ids, skipped = special
    detok = IncrementalDetokenizer(decoder(tok), byte_ids, skipped)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


# ------------------------------------------------------------------ detokenizer


def test_tiny_tokenizer_splits_cjk_and_emoji_into_byte_tokens(tok, special) -> None:
    byte_ids, skipped = special
    ids = tok.encode("日本", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "<0xE6>",
        "<0x97>",
        "<0xA5>",
        "<0xE6>",
        "<0x9C>",
        "<0xAC>",
    ]
    assert len(tok.encode("😀", add_special_tokens=False)) == 4
    assert set(ids) <= byte_ids and len(byte_ids) == 256
    assert {0, 1, 2, 3, 105, 106} <= skipped
    # The decoder turns a whole run of byte tokens into U+FFFD when any of it is invalid.
    assert tok.decode([*ids[:3], ids[0], 79]) == REPLACEMENT_CHAR * 4 + "h"


@pytest.mark.parametrize(
    "text",
    ["Hello world", "日本語 and 😀!", "héllo naïve café", "a\n\tb  c", " leading", "😀😀", "x日"],
)
def test_detokenizer_reproduces_decode_and_never_splits_a_character(tok, special, text) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(tok, special, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    shown = ""
    for piece in pieces:  # what was shown is never taken back
        shown += piece
        assert text.startswith(shown)


def test_detokenizer_holds_a_byte_run_until_it_closes(tok, special) -> None:
    nichi = tok.encode("日", add_special_tokens=False)
    stray = tok.encode("本", add_special_tokens=False)[0]  # a lead byte with nothing after it
    h = tok.encode("h", add_special_tokens=False)
    pieces = stream(tok, special, [*h, *nichi, stray, *h])
    # "日" looked complete, but the run went on with an invalid byte: decode says all U+FFFD.
    assert pieces[:5] == ["h", "", "", "", ""]
    assert (
        "".join(pieces) == tok.decode([*h, *nichi, stray, *h]) == "h" + REPLACEMENT_CHAR * 4 + "h"
    )


def test_detokenizer_special_tokens_do_not_close_a_byte_run(tok, special) -> None:
    e6, x97, xa5 = tok.encode("日", add_special_tokens=False)
    ids = [e6, x97, 105, xa5, 79]  # <start_of_turn> is skipped, so the bytes join up
    assert "".join(stream(tok, special, ids)) == tok.decode(ids, skip_special_tokens=True) == "日h"


def test_detokenizer_equals_decode_on_random_sequences(tok, special) -> None:
    byte_ids, skipped = special
    rng = random.Random(0)
    utf8 = sorted(byte_ids)[0x80:]  # the non-ASCII bytes: most runs of them are invalid
    cjk = tok.encode("日本😀é", add_special_tokens=False)
    normal = tok.encode("the sea is wide, my friend", add_special_tokens=False)
    pools = [utf8, cjk, cjk, normal, sorted(skipped - {0})]
    for _ in range(300):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 16))]
        assert "".join(stream(tok, special, ids)) == tok.decode(ids, skip_special_tokens=True), ids


def test_sentinel_decode_reads_control_tokens_by_id_and_streams_exactly(gemma4_path) -> None:
    """Gemma 4's decode: each control id the parser reads is its sentinel, other special
    ids are dropped, ordinary ids that spell a marker stay text; streamed through the
    detokenizer it equals the whole decode however byte runs and control ids mix."""
    from transformers import AutoTokenizer

    g4 = AutoTokenizer.from_pretrained(str(gemma4_path))
    ids_of = {token: int(g4.convert_tokens_to_ids(token)) for token, _ in CONTROL_TEXT}
    marks = {ids_of[token]: sentinel for token, sentinel in CONTROL_TEXT}
    decode = sentinel_decoder(lambda ids: g4.decode(ids, skip_special_tokens=True), marks)
    byte_ids, special = byte_and_special_ids(g4)
    skipped = (special | marks.keys()) - {t for t, m in marks.items() if m}

    vocab = g4.get_vocab()
    spelled = [vocab[c] for c in "<|channel>x<mask>"]  # one ordinary token per character
    assert decode(spelled) == "<|channel>x<mask>"
    channel = [ids_of["<|channel>"], *g4.encode("a", add_special_tokens=False)]
    assert decode([*channel, ids_of["<mask>"], ids_of["<channel|>"]]) == (
        SENTINELS["<|channel>"] + "a" + SENTINELS["<channel|>"]
    )
    fdd0 = [int(g4.convert_tokens_to_ids(f"<0x{b:02X}>")) for b in (0xEF, 0xB7, 0x90)]
    assert g4.decode(fdd0) == "\ufdd0" and decode(fdd0) == REPLACEMENT_CHAR

    rng = random.Random(0)
    utf8 = sorted(byte_ids)[0x80:]
    cjk = g4.encode("日本😀é", add_special_tokens=False)
    normal = g4.encode("the sea is wide", add_special_tokens=False)
    pools = [utf8, cjk, cjk, normal, spelled, sorted(marks), [0, 4, 2]]
    for _ in range(300):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 16))]
        detok = IncrementalDetokenizer(decode, byte_ids, skipped)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == decode(ids), ids


def test_detokenizer_without_byte_ids_still_waits_for_complete_characters(tok) -> None:
    detok = IncrementalDetokenizer(decoder(tok))
    ids = tok.encode("a日b", add_special_tokens=False)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "a日b"
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


def test_detokenizer_flush_emits_incomplete_tail(tok, special) -> None:
    ids = tok.encode("a😀", add_special_tokens=False)[:-1]
    pieces = stream(tok, special, ids)
    assert pieces[-1].endswith(REPLACEMENT_CHAR)
    assert "".join(pieces) == tok.decode(ids)
    detok = IncrementalDetokenizer(decoder(tok))
    assert detok.flush() == "" and detok.flush() == ""


# ------------------------------------------------------------------ stop matcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out += text
        if stopped:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        ((), ["abc", "def"], ("abcdef", False)),
        (("END",), ["abcEND", "more"], ("abc", True)),
        (("END",), ["ab", "cE", "N", "Dxyz"], ("abc", True)),
        (("END",), list("abcENxEND"), ("abcENx", True)),
        (("END",), ["abcEN"], ("abcEN", False)),  # partial match at the end is released
        (("END",), ["END"], ("", True)),
        (("x", "yz"), ["ay", "zbx"], ("a", True)),  # the earliest stop wins
        (("long stop", "st"), ["a long st", "op"], ("a long ", True)),
        (("\n\n",), ["line\n", "\nnext"], ("line", True)),
        (("日本",), ["今日", "本"], ("今", True)),
    ],
)
def test_stop_matcher(stops, pieces, expected) -> None:
    assert feed_all(StopMatcher(stops), pieces) == expected


def test_stop_matcher_never_emits_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["<END>"])
    assert matcher.feed("hello <") == ("hello ", False)
    assert matcher.feed("EN") == ("", False)
    assert matcher.feed("X") == ("<ENX", False)
    assert matcher.flush() == ""


# ------------------------------------------------------------------ token sink


ONE_PROMPT = (Prompt("p", (2, 5, 6)),)


def make_sink(prompts=ONE_PROMPT, window=None, cancel=None, **options):
    out: list[Delta] = []
    params = SamplingParams.build(**{"max_tokens": 5, **options})
    sink = TokenSink(
        list(prompts),
        params,
        lambda ids: "".join(chr(ord("a") + i) for i in ids),
        frozenset({1, 106}),
        out.append,
        cancel or threading.Event(),
        window,
    )
    return sink, out


def joined(out: list[Delta], index: int = 0) -> str:
    return "".join(d.text for d in out if d.index == index)


def last(out: list[Delta], index: int = 0) -> Delta:
    return [d for d in out if d.index == index][-1]


def test_sink_max_tokens_gives_length() -> None:
    sink, out = make_sink(max_tokens=3)
    for t in (10, 11, 12):
        sink.push([t])
    assert sink.done
    assert joined(out) == "klm"
    assert (last(out).finish_reason, last(out).completion_tokens, last(out).prompt_tokens) == (
        "length",
        3,
        3,
    )
    sink.push([13])  # ignored once finished
    sink.close()
    assert joined(out) == "klm" and sum(d.finish_reason is not None for d in out) == 1


@pytest.mark.parametrize("end", [1, 106])
def test_sink_every_end_id_stops_and_counts(end) -> None:
    sink, out = make_sink()
    sink.push([10])
    sink.push([end])
    assert sink.done
    assert joined(out) == "k"
    assert (last(out).finish_reason, last(out).completion_tokens) == ("stop", 2)


def test_sink_stop_string_trims_and_stops() -> None:
    sink, out = make_sink(stop=["lm"], max_tokens=10)
    for t in (10, 11, 12, 13):
        sink.push([t])
    assert joined(out) == "k"
    assert last(out).finish_reason == "stop" and last(out).completion_tokens == 3
    assert sink.done


def test_sink_stop_string_completed_at_max_tokens_is_stop() -> None:
    sink, out = make_sink(stop=["lm"], max_tokens=3)
    for t in (10, 11, 12):
        sink.push([t])
    assert joined(out) == "k" and last(out).finish_reason == "stop"


def test_sink_stop_string_inside_held_back_bytes_is_stop(tok, special) -> None:
    ids = tok.encode("a日", add_special_tokens=False)
    out: list[Delta] = []
    params = SamplingParams.build(max_tokens=len(ids), stop="日")
    byte_ids, skipped = special
    sink = TokenSink(
        [Prompt("p", (2,))],
        params,
        decoder(tok),
        frozenset({1, 106}),
        out.append,
        threading.Event(),
        byte_ids=byte_ids,
        skipped_ids=skipped,
    )
    for token in ids:  # "日" is only decoded when the row ends on max_tokens
        sink.push([token])
    assert joined(out) == "a"
    assert (last(out).finish_reason, last(out).completion_tokens) == ("stop", len(ids))


def test_sink_partial_stop_is_released_at_the_end() -> None:
    sink, out = make_sink(stop=["lmz"], max_tokens=3)
    for t in (10, 11, 12):
        sink.push([t])
    assert joined(out) == "klm" and last(out).finish_reason == "length"


def test_sink_clips_max_tokens_to_context_window() -> None:
    prompts = [Prompt("a", (2,) * 6), Prompt("b", (2,) * 9)]
    sink, out = make_sink(prompts, window=10, max_tokens=100)
    assert [r.max_tokens for r in sink.rows] == [4, 1]
    assert sink.max_new_tokens == 4
    sink.push([10, 10])
    assert sink.finished() == [False, True]
    for _ in range(3):
        sink.push([11, 11])
    assert [last(out, i).completion_tokens for i in (0, 1)] == [4, 1]
    assert {last(out, i).finish_reason for i in (0, 1)} == {"length"}


def test_sink_rows_finish_independently_and_close_ends_open_rows() -> None:
    sink, out = make_sink([Prompt("a", (2,)), Prompt("b", (2, 3))], max_tokens=9)
    sink.push([10, 106])
    sink.push([11, 12])  # row 1 finished: its token is ignored
    assert sink.finished() == [False, True] and not sink.done
    sink.close()
    assert (joined(out, 0), last(out, 0).finish_reason, last(out, 0).completion_tokens) == (
        "kl",
        "length",
        2,
    )
    assert (joined(out, 1), last(out, 1).finish_reason, last(out, 1).completion_tokens) == (
        "",
        "stop",
        1,
    )
    assert last(out, 1).prompt_tokens == 2


def test_sink_cancel_makes_it_done_and_close_silent() -> None:
    cancel = threading.Event()
    sink, out = make_sink(cancel=cancel)
    sink.push([10])
    cancel.set()
    assert sink.done and sink.cancelled and sink.finished() == [True]
    sink.close()
    assert all(d.finish_reason is None for d in out)


def letters(text: str) -> list[int]:
    """The ids ``make_sink``'s decoder reads as ``text`` (a=0, b=1, ...; b is an end id)."""
    return [ord(c) - ord("a") for c in text]


@pytest.mark.parametrize(
    ("reply", "options", "text", "finish", "tokens"),
    [
        (letters("hello"), {}, "hello", "stop", 5),  # ran out: the backend ended it
        (letters("helloworld"), {"stop": ["lo"]}, "hel", "stop", 5),
        ([*letters("cat"), 106, *letters("dog")], {}, "cat", "stop", 4),  # an end id
        (letters("cdefgh"), {"max_tokens": 3}, "cde", "length", 3),
    ],
)
def test_sink_push_reply_reads_a_whole_reply_as_a_token_stream(
    reply, options, text, finish, tokens
) -> None:
    """A whole reply's ids end where a token stream would, and go out as one delta."""
    sink, out = make_sink(**{"max_tokens": 50, **options})
    sink.push_reply(0, reply)
    [delta] = out
    assert (delta.text, delta.finish_reason, delta.completion_tokens) == (text, finish, tokens)
    assert sink.done
    sink.push_reply(0, letters("more"))  # a finished row takes nothing more
    assert out == [delta]


# ------------------------------------------------------------------ model worker


def test_worker_runs_jobs_in_order_on_one_thread() -> None:
    worker = ModelWorker("test-worker")
    assert not worker.alive
    names = [worker.call(lambda: threading.current_thread().name) for _ in range(3)]
    assert names == ["test-worker"] * 3 and worker.alive
    futures = [worker.submit(lambda i=i: i * i) for i in range(5)]
    assert [f.result() for f in futures] == [0, 1, 4, 9, 16]
    assert worker.call(lambda: worker.submit(lambda: "inline").result()) == "inline"
    worker.close()
    assert not worker.alive
    assert worker.call(lambda: "again") == "again"  # restarts lazily
    worker.close()
    worker.close()  # idempotent


def test_worker_exceptions_reach_the_caller() -> None:
    worker = ModelWorker("test-worker")

    def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        worker.call(boom)
    assert worker.call(lambda: 1) == 1
    worker.close()


def counting_body(n: int, fail_at: int | None = None, delay: float = 0.0):
    state = {"emitted": 0, "cancelled": False, "returned": False}

    def body(emit, cancel) -> None:
        try:
            for i in range(n):
                if cancel.is_set():
                    state["cancelled"] = True
                    return
                if i == fail_at:
                    raise RuntimeError(f"failed at {i}")
                emit(i)
                state["emitted"] += 1
                time.sleep(delay)
        finally:
            state["returned"] = True

    return body, state


def test_stream_job_yields_everything_and_reraises() -> None:
    worker = ModelWorker("test-worker")
    body, _ = counting_body(4)
    assert list(stream_job(worker, body)) == [0, 1, 2, 3]
    body, _ = counting_body(4, fail_at=2)
    got = []
    with pytest.raises(RuntimeError, match="failed at 2"):
        for item in stream_job(worker, body):
            got.append(item)
    assert got == [0, 1]
    worker.close()


def test_stream_job_early_close_cancels_and_waits() -> None:
    worker = ModelWorker("test-worker")
    body, state = counting_body(10_000, delay=0.001)
    it = stream_job(worker, body)
    assert [next(it), next(it)] == [0, 1]
    it.close()
    assert state["returned"] and state["cancelled"] and state["emitted"] < 10_000
    assert worker.call(lambda: "idle") == "idle"
    worker.close()


async def test_astream_job_early_close_cancels_and_waits() -> None:
    worker = ModelWorker("test-worker")
    body, state = counting_body(10_000, delay=0.001)
    it = astream_job(worker, body)
    assert [await it.__anext__(), await it.__anext__()] == [0, 1]
    await it.aclose()
    assert state["returned"] and state["cancelled"] and state["emitted"] < 10_000
    body, _ = counting_body(3, fail_at=1)
    with pytest.raises(RuntimeError, match="failed at 1"):
        async for _ in astream_job(worker, body):
            pass
    worker.close()


async def test_astream_job_does_not_block_the_event_loop() -> None:
    worker = ModelWorker("test-worker")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    body, _ = counting_body(20, delay=0.01)
    items = [i async for i in astream_job(worker, body)]
    task.cancel()
    assert items == list(range(20)) and ticks >= 10
    worker.close()


def test_fold_deltas_joins_a_rows_text_and_calls() -> None:
    first, second = ToolCall(0, "call_0", "f", "{}"), ToolCall(1, "call_1", "g", '{"a": 1}')
    deltas = [
        Delta(3, "a"),
        Delta(3, "", tool_calls=(first,)),
        Delta(3, "bc", "stop", 9, 4, (second,)),
    ]
    assert fold_deltas(iter(deltas)) == Delta(3, "abc", "stop", 9, 4, (first, second))


@pytest.mark.parametrize("deltas", [[], [Delta(0, "a")]], ids=["empty", "unfinished"])
def test_fold_deltas_needs_a_finished_row(deltas: list[Delta]) -> None:
    with pytest.raises(RuntimeError, match="without a finish reason"):
        fold_deltas(deltas)
