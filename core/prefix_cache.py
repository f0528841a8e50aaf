"""Prompt-prefix reuse: the KV cache of earlier prompts, kept so that a prompt that extends
one of them is prefilled from where it ends.

An agent loop or a chat re-sends the same system prompt, tool declarations and
history every turn; turn ``n``'s rendered prompt starts with turn ``n - 1``'s
(the template renders earlier turns the same way). A batch engine keeps the
cache of each prompt it prefilled (:meth:`PrefixCache.store`) and, for a new
prompt, asks for the longest stored prompt that is a prefix of it
(:meth:`PrefixCache.lookup`): it then runs only the rest of the prompt on a
copy of that cache. Entries are evicted least recently used first, by count
and by total tokens (``max_tokens``), and all of them on ``clear()`` (the
client's ``close()``). A stored value is never handed out to be mutated: the
engine copies it.

A chat template may end the generation prompt with tokens that the next turn
does not render again (Gemma 4 with thinking off opens an empty thought channel
there; the history shows the reply without it): such a prompt is never a prefix
of the next one. :meth:`PrefixCache.cut` says how much of a prompt later turns
repeat (the prompt without such a tail, :attr:`PrefixCache.tails`, set by the
client from its model family), and the engines store the cache of that much.

The engines store what they need (a transformers ``DynamicCache``, the fast
path's per-layer tensors, mlx-lm's prompt cache); this module only keeps them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

#: Stored prompts kept per client, and their total tokens.
DEFAULT_ENTRIES = 16
DEFAULT_TOKENS = 65_536
#: A prefix shorter than this is not worth a lookup hit (prefilling it costs little).
MIN_PREFIX = 16


class PrefixCache:
    """A least-recently-used store of prompt caches keyed by their token ids (thread-safe)."""

    def __init__(
        self, max_entries: int = DEFAULT_ENTRIES, max_tokens: int = DEFAULT_TOKENS
    ) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 0:
            raise ValueError(
                f"prefix cache max_entries must be an integer >= 0 (0 turns reuse off), "
                f"got {max_entries!r}"
            )
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ValueError(f"prefix cache max_tokens must be an integer >= 0, got {max_tokens!r}")
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        #: token ids a prompt may end with that later turns do not repeat (see :meth:`cut`)
        self.tails: tuple[tuple[int, ...], ...] = ()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_tokens > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens held by the stored prompts."""
        return self._tokens

    def lookup(self, ids: Sequence[int]) -> tuple[int, Any] | None:
        """The longest stored prompt that is a proper prefix of ``ids`` (at least one token of
        ``ids`` is left to run, for its logits) and its value, or ``None``."""
        if not self.enabled:
            return None
        key = tuple(ids)
        with self._lock:
            best: tuple[int, ...] | None = None
            for stored in self._entries:
                n = len(stored)
                longer = best is None or n > len(best)
                if MIN_PREFIX <= n < len(key) and longer and key[:n] == stored:
                    best = stored
            if best is None:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            return len(best), self._entries[best]

    def cut(self, ids: Sequence[int]) -> int:
        """How many of ``ids`` later turns repeat: all of them, or all but a tail of
        :attr:`tails` the prompt ends with. Engines store the cache of ``ids[:cut]``."""
        for tail in self.tails:
            if tail and len(ids) > len(tail) and tuple(ids[-len(tail) :]) == tail:
                return len(ids) - len(tail)
        return len(ids)

    def wants(self, ids: Sequence[int]) -> bool:
        """Whether :meth:`store` would keep a prompt of ``ids`` (ask before copying a cache)."""
        return self.enabled and MIN_PREFIX <= len(ids) <= self.max_tokens

    def store(self, ids: Sequence[int], value: Any) -> None:
        """Keep ``value`` (a cache of exactly the prompt ``ids``), evicting the least
        recently used entries past the limits. Prompts longer than ``max_tokens`` are not
        kept."""
        if not self.wants(ids):
            return
        key = tuple(ids)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = value
            self._tokens += len(key)
            while len(self._entries) > self.max_entries or self._tokens > self.max_tokens:
                old, _ = self._entries.popitem(last=False)
                self._tokens -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._tokens = 0
