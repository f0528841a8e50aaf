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
