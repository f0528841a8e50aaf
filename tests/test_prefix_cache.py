"""core.prefix_cache: the store of earlier prompts' caches (longest prefix, LRU, limits)."""

from __future__ import annotations

import threading

import pytest

from core.prefix_cache import MIN_PREFIX, PrefixCache


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_the_longest_stored_proper_prefix_wins() -> None:
    cache = PrefixCache()
    cache.store(ids(20), "short")
    cache.store(ids(40), "long")
    cache.store(ids(30, start=100), "other")
    assert cache.lookup(ids(50)) == (40, "long")
    assert cache.lookup(ids(35)) == (20, "short")
    assert cache.lookup(ids(40)) == (20, "short")  # a prompt equal to an entry: one token must run
    assert cache.lookup(ids(50, start=1)) is None
    assert (cache.hits, cache.misses) == (3, 1)


def test_short_prompts_are_not_kept() -> None:
    cache = PrefixCache()
    cache.store(ids(MIN_PREFIX - 1), "tiny")
    assert len(cache) == 0
    assert cache.lookup(ids(MIN_PREFIX + 5)) is None


def test_least_recently_used_entries_go_first_by_count_and_tokens() -> None:
    cache = PrefixCache(max_entries=2, max_tokens=1000)
    cache.store(ids(20), "a")
    cache.store(ids(20, start=500), "b")
    assert cache.lookup(ids(25)) == (20, "a")  # a is now the most recent
    cache.store(ids(20, start=900), "c")  # evicts b
    assert cache.lookup(ids(25, start=500)) is None
    assert cache.lookup(ids(25)) == (20, "a")
    by_tokens = PrefixCache(max_entries=10, max_tokens=50)
    by_tokens.store(ids(30), "x")
    by_tokens.store(ids(30, start=100), "y")  # 60 tokens > 50: x goes
    assert by_tokens.tokens == 30 and by_tokens.lookup(ids(40)) is None
    by_tokens.store(ids(60, start=300), "too long")  # longer than the whole budget: not kept
    assert by_tokens.tokens == 30


def test_clear_and_off() -> None:
    cache = PrefixCache()
    cache.store(ids(20), "a")
    cache.clear()
    assert len(cache) == 0 and cache.tokens == 0 and cache.lookup(ids(30)) is None
    off = PrefixCache(max_entries=0)
    off.store(ids(20), "a")
    assert not off.enabled and off.lookup(ids(30)) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_entries": -1}, "max_entries must be an integer >= 0"),
        ({"max_entries": "8"}, "max_entries must be an integer >= 0"),
        ({"max_tokens": 1.5}, "max_tokens must be an integer >= 0"),
    ],
)
def test_bad_limits(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefixCache(**options)


def test_threads_store_and_look_up_together() -> None:
    cache = PrefixCache(max_entries=8, max_tokens=10_000)

    def work(k: int) -> None:
        for i in range(200):
            cache.store(ids(20 + (i % 10), start=k * 1000), (k, i))
            hit = cache.lookup(ids(40, start=k * 1000))
            assert hit is None or hit[1][0] == k

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) <= 8 and cache.tokens <= 10_000


def test_wants_says_what_store_keeps() -> None:
    cache = PrefixCache(max_entries=4, max_tokens=100)
    assert cache.wants(ids(MIN_PREFIX)) and cache.wants(ids(100))
    assert not cache.wants(ids(MIN_PREFIX - 1)) and not cache.wants(ids(101))
    assert not PrefixCache(max_tokens=0).wants(ids(50))


def test_a_tail_the_next_turn_does_not_repeat_is_cut() -> None:
    """Gemma 4's generation prompt (thinking off) ends with an empty thought channel that the
    next turn's rendering of the reply leaves out: the prompt is kept without it, so that the
    next turn's prompt extends it."""
    cache = PrefixCache()
    ids = list(range(100, 100 + MIN_PREFIX + 4))
    assert cache.cut(ids) == len(ids)  # no tails: all of it
    cache.tails = ((7, 8, 9),)
    assert cache.cut([*ids, 7, 8, 9]) == len(ids)
    assert cache.cut([*ids, 7, 8]) == len(ids) + 2  # not the whole tail: kept as is
    assert cache.cut([7, 8, 9]) == 3  # nothing before it: nothing to cut to
    cache.store(ids, "prefix")
    following = [*ids, 50, 51, 7, 8, 9]  # the next turn: the reply, then the tail again
    assert cache.lookup(following) == (len(ids), "prefix")


def test_gemma4_prompts_are_kept_without_their_empty_thought_channel(gemma4_path) -> None:
    from conftest import make_client

    client = make_client("transformers", gemma4_path)
    try:
        messages = [{"role": "user", "content": "Tell me about tides, " * 4}]
        prompt = client.format_prompt(messages)
        tail = client.tokenizer.encode("<|channel>thought\n<channel|>", add_special_tokens=False)
        assert client.prompt_cache.tails == (tuple(tail),)
        assert list(prompt.ids[-len(tail) :]) == tail  # thinking off: the empty channel
        assert client.prompt_cache.cut(prompt.ids) == len(prompt.ids) - len(tail)
        client.create(messages, temperature=0, max_tokens=4)
        [kept] = list(client.prompt_cache._entries)
        assert list(kept) == list(prompt.ids[: -len(tail)])
        thinking = client.format_prompt(messages, thinking=True)  # ends at the model's turn
        assert client.prompt_cache.cut(thinking.ids) == len(thinking.ids)
    finally:
        client.close()
