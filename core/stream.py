"""The token stream every backend feeds, and everything derived from it once.

A backend's only job is to push sampled token ids into a :class:`TokenSink`
(one id per active row per step, on the thread that owns the model). The sink
turns them into :class:`Delta` records, in one place for every backend:

* incremental detokenisation that is exact for multi-byte characters
  (:class:`IncrementalDetokenizer`); for a family whose parser reads control
  tokens (Gemma 4), each such token's *id* decodes as a sentinel character
  (:func:`sentinel_decoder`), so text the model spells with ordinary tokens
  is never read as one,
* end-of-turn handling on *every* end id of the model (``<eos>`` and
  ``<end_of_turn>`` for Gemma), ``max_tokens`` and stop strings
  (:class:`StopMatcher`; the stop text is trimmed, even across tokens),
* truthful ``finish_reason`` (``"stop"`` / ``"length"`` / ``"tool_calls"``)
  and token counts,
* the model family's output parser (:meth:`core.families.Family.output_parser`):
  each row's text is split into answer text, reasoning (Gemma 4's thinking
  channel) and :class:`~core.constrained.ToolCall` records, so neither call
  text nor a control token is ever emitted as text.

``create()``, ``create(stream=True)``, batching and the LangChain / LlamaIndex
adapters all consume these deltas; nothing else detokenises or counts.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .constrained import ToolCall
from .families import OutputParser, Parsed, family_for
from .params import SamplingParams

logger = logging.getLogger("gemma_local")

REPLACEMENT_CHAR = "\ufffd"
#: The sentinels' range: U+FDD0 .. U+FDEF are Unicode noncharacters, never assigned.
SENTINEL_CHARS = re.compile("[\ufdd0-\ufdef]")


def sentinel_decoder(
    decode: Callable[[list[int]], str], marks: Mapping[int, str]
) -> Callable[[list[int]], str]:
    """``decode`` that reads control tokens by id: each id of ``marks`` becomes its
    sentinel, the runs of other ids in between go through ``decode``; ids marked ``""``
    are dropped first (whether or not the tokenizer flags them special).

    ``decode`` should skip special tokens. A noncharacter of the sentinels' range
    that ordinary ids spell (byte tokens ``EF B7 90`` are U+FDD0) becomes U+FFFD,
    so only a control token's id ever yields a sentinel. A marked id breaks a
    byte-fallback run as it does in a whole decode, and the result for a list of
    ids is the same however they are cut at marked ids, which keeps
    :class:`IncrementalDetokenizer` exact.
    """

    def plain(ids: list[int]) -> str:
        return SENTINEL_CHARS.sub(REPLACEMENT_CHAR, decode(ids)) if ids else ""

    dropped = frozenset(t for t, sentinel in marks.items() if not sentinel)

    def run(ids: list[int]) -> str:
        if dropped:  # gone before decoding, as skip_special_tokens drops special ids
            ids = [t for t in ids if t not in dropped]
        out: list[str] = []
        start = 0
        for i, token in enumerate(ids):
            sentinel = marks.get(token)
            if sentinel is not None:
                out += (plain(ids[start:i]), sentinel)
                start = i + 1
        out.append(plain(ids[start:]))
        return "".join(out)

    return run


@dataclass(frozen=True)
class Prompt:
    """A rendered chat prompt and its token ids (exactly what the model reads).

    ``media``: for a prompt with images / audio, what the backend's processor
    made of them besides the ids (transformers: ``pixel_values``, token type
    ids, audio features), which prefill passes to the model; ``ids`` already
    hold the media's soft tokens. ``None`` for text.
    """

    text: str
    ids: tuple[int, ...]
    media: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Delta:
    """A piece of one choice's output.

    ``index`` is the row: ``conversation_index * n + choice``. ``text`` may be
    empty on the last delta of a row, which always carries ``finish_reason``
    (``"stop"``, ``"length"`` or ``"tool_calls"``) and the row's final token
    counts. ``tool_calls`` holds the calls completed by this delta (each once,
    in order; ``ToolCall.index`` numbers them within the row): a row that calls
    tools emits no text, and its finish reason is ``"tool_calls"`` when the
    reply ended normally.

    ``reasoning`` is text of the model's thinking channel (Gemma 4 with
    ``thinking=True``), never part of ``text``; ``reasoning_tokens`` counts
    the row's tokens spent thinking so far (on the last delta: all of them,
    included in ``completion_tokens``).

    ``partial_call`` is set only on the last delta of a row that ``max_tokens``
    cut off (``finish_reason == "length"``) while a tool call was being
    written: that call's text so far, as the model wrote it (``""`` if the
    parser cannot tell); ``None`` otherwise. The call itself is dropped.
    """

    index: int
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""
    reasoning_tokens: int = 0
    partial_call: str | None = None


def fold_deltas(deltas: Iterable[Delta]) -> Delta:
    """One row's deltas as one: the text and reasoning joined, every tool call in
    order, and the finish reason and token counts of the last (what summing their
    chunks gives)."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    last: Delta | None = None
    for last in deltas:
        texts.append(last.text)
        thoughts.append(last.reasoning)
        calls.extend(last.tool_calls)
    if last is None or last.finish_reason is None:
        raise RuntimeError("the generation ended without a finish reason")
    return replace(
        last, text="".join(texts), reasoning="".join(thoughts), tool_calls=tuple(calls)
    )


class IncrementalDetokenizer:
    """Streams text from token ids without splitting multi-byte characters.

    Decodes a short window of recent ids and emits only the new suffix once
    it no longer ends in an incomplete character (the approach of
    transformers' ``TextStreamer`` and vLLM), so the concatenated output equals
    ``decode(all_ids)``.

    ``byte_ids`` are the tokenizer's byte-fallback tokens (``<0x00>`` ..
    ``<0xFF>``) and ``skipped_ids`` the special tokens ``decode`` drops (a
    control token that decodes as a sentinel is not one of them). The
    ByteFallback decoder of Gemma's tokenizer decodes a whole run of byte
    tokens at once and turns *every* byte of the run into U+FFFD when any part
    of it is not valid UTF-8, so a character that looks complete may still
    become U+FFFD; text is therefore held back while such a run is open.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        byte_ids: frozenset[int] = frozenset(),
        skipped_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._decode = decode
        self._byte_ids = byte_ids
        self._skipped_ids = skipped_ids
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _in_byte_run(self) -> bool:
        """Whether the newest decoded token is a byte token (its run may still grow)."""
        for token in reversed(self._ids):
            if token not in self._skipped_ids:
                return token in self._byte_ids
        return False

    def _advance(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        if not final and self._byte_ids and self._in_byte_run():
            return ""
        seen = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(seen) and not final:
            return ""
        if text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]


class StopMatcher:
    """Finds stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return ``(text safe to emit, stopped)``."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def default_parser(params: SamplingParams) -> OutputParser:
    """The Gemma 1-3 parser: text as it comes, or JSON tool calls."""
    return family_for(None).output_parser(params, None)


class _Row:
    """One choice being generated: counts, text and the reason it ended."""

    def __init__(
        self,
        index: int,
        prompt_tokens: int,
        max_tokens: int,
        params: SamplingParams,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        parser: OutputParser,
        byte_ids: frozenset[int] = frozenset(),
        skipped_ids: frozenset[int] = frozenset(),
        stop_on_content: bool = False,
    ) -> None:
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.eos_ids = eos_ids
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.detok = IncrementalDetokenizer(decode, byte_ids, skipped_ids)
        # Stop strings match the raw text, or only the parsed answer text where the raw
        # text holds control tokens (Gemma 4): the thought channel, its label and tool
        # calls are never cut by them, and no piece of a control token reaches content.
        self.stops = StopMatcher(() if stop_on_content else params.stop)
        self.content_stops = StopMatcher(params.stop if stop_on_content else ())
        self.parser = parser
        self.calls = 0
        self.json_output = params.response_format is not None
        self.constrained = params.constrained

    def delta(self, text: str) -> Delta | None:
        parsed = self.parser.feed(text) if text else Parsed()
        partial = None
        if self.finish_reason is not None:
            if self.finish_reason == "length" and self.parser.calling:
                # a call cut short: its text so far, from parsers that can tell it
                partial = str(getattr(self.parser, "partial_call", ""))
            parsed += self.parser.finish()
        parsed = self._stop_in_content(parsed)
        self.calls += len(parsed.calls)
        if self.calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        if not parsed and self.finish_reason is None:
            return None
        return Delta(
            self.index,
            parsed.content,
            self.finish_reason,
            self.prompt_tokens,
            self.completion_tokens,
            parsed.calls,
            parsed.reasoning,
            self.reasoning_tokens,
            partial,
        )

    def _stop_in_content(self, parsed: Parsed) -> Parsed:
        """``parsed`` with its content cut at a stop string (``stop_on_content``); a stop
        ends the row, and what the parser still holds back after it is dropped."""
        content, stopped = self.content_stops.feed(parsed.content)
        if stopped:
            if self.finish_reason is None:
                self.parser.finish()
            self.finish_reason = "stop"
        elif self.finish_reason is not None:
            content += self.content_stops.flush()
        if content == parsed.content:
            return parsed
        return Parsed(content, parsed.reasoning, parsed.calls)

    def push_token(self, token: int) -> Delta | None:
        self.completion_tokens += 1
        thinking = self.parser.in_reasoning
        if token in self.eos_ids:
            return self.finish("stop")
        text, stopped = self.stops.feed(self.detok.add(token))
        if stopped:
            self.finish_reason = "stop"
            return self._count(thinking, self.delta(text))
        if self.completion_tokens >= self.max_tokens:
            return self._count(thinking, self.finish("length", text))
        return self._count(thinking, self.delta(text))

    def _count(self, thinking: bool, delta: Delta | None) -> Delta | None:
        """Count the token just pushed as reasoning if the thinking channel was open
        before or after it (its markers count as reasoning)."""
        if not (thinking or self.parser.in_reasoning):
            return delta
        self.reasoning_tokens += 1
        return None if delta is None else replace(delta, reasoning_tokens=self.reasoning_tokens)

    def finish(self, reason: str, text: str = "") -> Delta | None:
        tail, stopped = self.stops.feed(self.detok.flush())
        self.finish_reason = "stop" if stopped else reason  # a stop string in held-back text
        if (
            self.finish_reason == "length"
            and self.constrained  # an unconstrained row's call or JSON was never promised
            and (self.json_output or self.parser.calling)
        ):
            what = "JSON reply" if self.json_output else "tool call"
            logger.warning(
                "a constrained %s was cut off after %d tokens, at its token limit of %d "
                "(max_tokens, or what the context window left after the prompt), before it was "
                "complete: it will not parse or validate (finish_reason 'length'); raise max_tokens",
                what,
                self.completion_tokens,
                self.max_tokens,
            )
        return self.delta(text + tail + self.stops.flush())


class TokenSink:
    """What a backend pushes sampled tokens into, on the model's own thread.

    ``emit`` receives each :class:`Delta` as soon as it is known. ``done``
    turns true once every row has finished or the consumer went away
    (``cancel``); backends check it every step (transformers through a
    ``StoppingCriteria``, MLX in its loop) so no token is generated for nobody.
    Each row's ``max_tokens`` is clipped to what the context window leaves.
    ``byte_ids`` / ``skipped_ids`` go to each row's
    :class:`IncrementalDetokenizer` (see there). ``stop_on_content``: stop
    strings match only the answer text the ``parser`` finds (for families
    whose raw text holds control tokens), not reasoning, calls or markup.
    Control tokens are read by id, through ``decode`` (see :func:`sentinel_decoder`).
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        emit: Callable[[Delta], None],
        cancel: threading.Event,
        context_window: int | None = None,
        *,
        byte_ids: frozenset[int] = frozenset(),
        skipped_ids: frozenset[int] = frozenset(),
        parser: Callable[[], OutputParser] | None = None,
        stop_on_content: bool = False,
    ) -> None:
        def room(prompt: Prompt) -> int:
            if context_window is None:
                return params.max_tokens
            return max(1, min(params.max_tokens, context_window - len(prompt.ids)))

        new_parser = parser or (lambda: default_parser(params))
        self.rows = [
            _Row(
                i,
                len(p.ids),
                room(p),
                params,
                decode,
                eos_ids,
                new_parser(),
                byte_ids,
                skipped_ids,
                stop_on_content,
            )
            for i, p in enumerate(prompts)
        ]
        self._emit = emit
        self._cancel = cancel

    @property
    def max_new_tokens(self) -> int:
        """The most tokens any row may still take (``max_tokens`` clipped to the context)."""
        return max(r.max_tokens for r in self.rows)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._cancel.is_set() or all(r.finish_reason is not None for r in self.rows)

    def finished(self) -> list[bool]:
        """Per row: nothing more is wanted from it."""
        cancelled = self._cancel.is_set()
        return [cancelled or r.finish_reason is not None for r in self.rows]

    def push(self, tokens: Sequence[int]) -> None:
        """One new token for every row (finished rows' tokens are ignored)."""
        for row, token in zip(self.rows, tokens, strict=True):
            if row.finish_reason is None:
                self._send(row.push_token(int(token)))

    def push_row(self, index: int, token: int) -> None:
        row = self.rows[index]
        if row.finish_reason is None:
            self._send(row.push_token(int(token)))

    def push_reply(self, index: int, tokens: Iterable[int]) -> None:
        """A whole reply's ids for row ``index``, then its end: for backends that produce
        whole replies (the original design's ``_generate_response``, whose text the
        engine encodes). The ids are read one by one as :meth:`push_row` reads them, so
        an end id, a stop string or ``max_tokens`` ends the row there, exactly as in a
        token stream; a reply that runs out before any of them ends with ``"stop"``.
        The row's deltas go out folded into one (:func:`fold_deltas`): a whole reply
        streams as one chunk."""
        row = self.rows[index]
        deltas: list[Delta] = []
        for token in tokens:
            if row.finish_reason is not None:
                break
            delta = row.push_token(int(token))
            if delta is not None:
                deltas.append(delta)
        if row.finish_reason is None:
            delta = row.finish("stop")
            if delta is not None:
                deltas.append(delta)
        if deltas:
            self._send(fold_deltas(deltas))

    def close(self) -> None:
        """The backend returned: rows still open ran out of tokens."""
        if self._cancel.is_set():
            return
        for row in self.rows:
            if row.finish_reason is None:
                self._send(row.finish("length"))

    def _send(self, delta: Delta | None) -> None:
        if delta is not None:
            self._emit(delta)
