"""Gemma 4's control tokens and call syntax: writing, reading and streaming-splitting it.

A call is written ``<|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>,days:3}<tool_call|>``:
keys unquoted and in the order the chat template's ``dictsort`` gives them
(case-insensitive), every string between ``<|"|>`` tokens (no escapes),
numbers, ``true``/``false``/``null`` bare, objects ``{…}`` and arrays ``[…]``;
parallel calls simply follow each other. Thinking is
``<|channel>thought\\n…<channel|>`` before the answer.

* :func:`format_value` / :func:`format_call`: the canonical text (what the
  grammar of :mod:`core.families.gemma4_grammar` makes the model write);
* :func:`parse_value` / :func:`parse_call`: back to Python values;
* :class:`Gemma4OutputParser`: a row's streamed text split into content,
  reasoning and :class:`~core.constrained.ToolCall` records.

Control tokens are recognised by token id, never by spelled text. The engine
decodes each id of :data:`SENTINELS` as its sentinel, a Unicode noncharacter
(U+FDD0 ..) that decoding ordinary ids never yields (the engine turns one that
byte tokens spell into U+FFFD), and drops every other control or special token
(:data:`CONTROL_TEXT`, :func:`core.stream.sentinel_decoder`). The parser reads
only sentinels, so text the model spells with ordinary tokens (``<mask>``,
``<|channel>``) is plain content. :func:`mark` does the same for a text that
comes without ids.

``null`` is written ``null`` (as vLLM's and mlx-lm's parsers read it); the
template renders a ``None`` argument of an earlier call as ``None``, the only
place where a call in the history differs from the canonical form.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from ..constrained import ToolCall, new_call_id
from .interface import Parsed

logger = logging.getLogger("gemma_local")

# ------------------------------------------------------------ control tokens

BOS = "<bos>"
TURN_START, TURN_END = "<|turn>", "<turn|>"
CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
CALL_START, CALL_END = "<|tool_call>", "<tool_call|>"
RESPONSE_START, RESPONSE_END = "<|tool_response>", "<tool_response|>"
STRING_DELIM = '<|"|>'
THINK = "<|think|>"
#: The label the model writes at the top of its thinking channel.
THOUGHT_LABEL = "thought\n"

#: Control-token ids of every Gemma 4 checkpoint (vocab 262144).
TOKEN_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    BOS: 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    CALL_START: 48,
    CALL_END: 49,
    RESPONSE_START: 50,
    RESPONSE_END: 51,
    STRING_DELIM: 52,
    THINK: 98,
    CHANNEL_START: 100,
    CHANNEL_END: 101,
    TURN_START: 105,
    TURN_END: 106,
}
#: Media tokens (their ids differ between the real and the tiny vocabularies).
MEDIA_TOKENS = (
    "<|image>",
    "<|audio>",
    "<|image|>",
    "<|audio|>",
    "<image|>",
    "<audio|>",
    "<|video|>",
)
#: Every control token's text: none of them ever reaches ``content`` as a token (the
#: grammar also keeps free text from spelling one).
CONTROL_TOKENS = (*TOKEN_IDS, *MEDIA_TOKENS)
#: The control tokens the output parser reads, each decoded as its own sentinel: a
#: Unicode noncharacter (U+FDD0 .. U+FDEF are never assigned; see :mod:`core.stream`).
SENTINELS = {
    CALL_START: "\ufdd0",
    CALL_END: "\ufdd1",
    STRING_DELIM: "\ufdd2",
    CHANNEL_START: "\ufdd3",
    CHANNEL_END: "\ufdd4",
}
#: Every control token -> what its id decodes to: its sentinel, or ``""`` (dropped, as
#: ``skip_special_tokens`` drops ``<pad>``, ``<mask>``, media tokens and the rest).
CONTROL_TEXT = tuple((token, SENTINELS.get(token, "")) for token in CONTROL_TOKENS)
_TOKEN_OF = {mark: token for token, mark in SENTINELS.items()}
#: What ends a reply (the generation config's ``eos_token_id`` [1, 106, 50]).
END_TOKENS = (TURN_END, "<eos>", RESPONSE_START)


def mark(text: str) -> str:
    """``text`` with each control token's spelling turned into its sentinel (or dropped):
    what the engine's decoder makes of the ids the tokenizer gives ``text``. For tests
    and tools that hold text only; the engine itself decodes ids (a whole-text
    backend's reply is encoded first, see ``BaseGemmaChatCompletion._generate``)."""
    for token, sentinel in CONTROL_TEXT:
        text = text.replace(token, sentinel)
    return text


def unmark(text: str) -> str:
    """Sentinels back to the control tokens' text (to show a call as the model wrote it)."""
    return "".join(_TOKEN_OF.get(c, c) for c in text)


#: A key the call syntax can write unquoted.
KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


# -------------------------------------------------------- canonical call text


def format_value(value: Any) -> str:
    """A value in the call syntax, as the grammar makes the model write it."""
    if isinstance(value, str):
        return f"{STRING_DELIM}{value}{STRING_DELIM}"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in _sorted_items(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} in a Gemma 4 call: {value!r}")


def _sorted_items(value: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Items in the order of Jinja's ``dictsort`` (case-insensitive, stable)."""
    return sorted(value.items(), key=lambda kv: kv[0].lower())


def format_call(name: str, arguments: Mapping[str, Any]) -> str:
    """One call exactly as the model writes it."""
    return f"{CALL_START}call:{name}{format_value(dict(arguments))}{CALL_END}"


# -------------------------------------------------------------------- parsing

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_BARE = {"true": True, "false": False, "null": None}
_SPACE = " \t\n"


class CallSyntaxError(ValueError):
    """Text that is not a value or call in Gemma 4's call syntax."""


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _value(text: str, i: int, q: str = STRING_DELIM) -> tuple[Any, int]:
    """The value at ``i``; ``q`` is the string delimiter (its text, or its sentinel)."""
    i = _skip(text, i)
    if text.startswith(q, i):
        end = text.find(q, i + len(q))
        if end < 0:
            raise CallSyntaxError(f"unterminated string at {i}")
        return text[i + len(q) : end], end + len(q)
    if text.startswith("{", i):
        return _object(text, i + 1, q)
    if text.startswith("[", i):
        items: list[Any] = []
        i = _skip(text, i + 1)
        if text.startswith("]", i):
            return items, i + 1
        while True:
            item, i = _value(text, i, q)
            items.append(item)
            i = _skip(text, i)
            if text.startswith("]", i):
                return items, i + 1
            if not text.startswith(",", i):
                raise CallSyntaxError(f"expected ',' or ']' at {i}")
            i += 1
    match = _NUMBER.match(text, i)
    if match:
        return json.loads(match.group()), match.end()
    for word, parsed in _BARE.items():
        if text.startswith(word, i):
            return parsed, i + len(word)
    raise CallSyntaxError(f"expected a value at {i}: {text[i : i + 20]!r}")


def _object(text: str, i: int, q: str) -> tuple[dict[str, Any], int]:
    """The object whose ``{`` ends just before ``i``."""
    out: dict[str, Any] = {}
    i = _skip(text, i)
    if text.startswith("}", i):
        return out, i + 1
    while True:
        i = _skip(text, i)
        if text.startswith(q, i):  # the template's quoted-key style
            key, i = _value(text, i, q)
        else:
            end = text.find(":", i)
            key = text[i:end].strip() if end >= 0 else ""
            if not key or any(c in key for c in "{}[],<"):
                raise CallSyntaxError(f"expected a key at {i}: {text[i : i + 20]!r}")
            i = end
        i = _skip(text, i)
        if not text.startswith(":", i):
            raise CallSyntaxError(f"expected ':' at {i}")
        out[key], i = _value(text, i + 1, q)
        i = _skip(text, i)
        if text.startswith("}", i):
            return out, i + 1
        if not text.startswith(",", i):
            raise CallSyntaxError(f"expected ',' or '}}' at {i}")
        i += 1


def parse_value(text: str) -> Any:
    """One whole value in the call syntax (``{city:<|"|>Tokyo<|"|>}`` -> ``{"city": "Tokyo"}``)."""
    value, end = _value(text, 0)
    if _skip(text, end) != len(text):
        raise CallSyntaxError(f"unexpected text after the value at {end}: {text[end : end + 20]!r}")
    return value


def parse_call(text: str, q: str = STRING_DELIM) -> tuple[str, dict[str, Any]]:
    """``call:NAME{…}`` (the text between ``<|tool_call>`` and ``<tool_call|>``) -> (name, arguments).

    ``q`` is what delimits strings: ``<|"|>``, or its sentinel in decoded output (where a
    spelled ``<|"|>`` is string text)."""
    if not text.startswith("call:"):
        raise CallSyntaxError(f"a call starts with 'call:', got {text[:20]!r}")
    brace = text.find("{")
    name = text[5:brace] if brace >= 0 else ""
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise CallSyntaxError(f"expected call:NAME{{...}}, got {text[:40]!r}")
    arguments, end = _value(text, brace, q)
    if _skip(text, end) != len(text):
        raise CallSyntaxError(f"unexpected text after the value at {end}: {text[end : end + 20]!r}")
    if not isinstance(arguments, dict):  # cannot happen: the text at brace is an object
        raise CallSyntaxError("the arguments are not an object")
    return name, arguments


class Gemma4OutputParser:
    """Splits Gemma 4's streamed output, decoded with sentinels, into a :class:`Parsed`.

    The text holds each control token the parser reads as its sentinel
    (:data:`SENTINELS`; the engine decodes ids so, and drops every other
    control token): ``<|channel>thought\\n…<channel|>`` is reasoning (the
    ``thought`` label dropped), ``<|tool_call>…<tool_call|>`` a call (reported
    when it closes, with JSON arguments), everything else content. A sentinel
    never reaches content or reasoning (a stray ``<|"|>`` is dropped), while a
    control token's *spelling* (``<|channel>`` in ordinary characters) is
    plain text. A sentinel is one character, so the split is exact however the
    text arrives. Calls of tools not in ``tools`` (or any call when ``tools``
    is ``None``: tool_choice ``"none"``) and calls that do not parse are
    dropped with a warning; the grammar rules both out.
    """

    def __init__(self, tools: frozenset[str] | None) -> None:
        self.tools = tools
        self.count = 0  # calls reported so far
        self._state = "content"  # "content" | "label" | "reasoning" | "call"
        self._label = ""  # the start of a channel, until it is known to be "thought\n"
        self._call = ""  # the text of the call being written (its <|"|> as the sentinel)
        self._out: dict[str, list[str]] = {"content": [], "reasoning": []}
        self._calls: list[ToolCall] = []

    @property
    def in_reasoning(self) -> bool:
        """Whether the thinking channel is open (for counting reasoning tokens)."""
        return self._state in ("label", "reasoning")

    @property
    def calling(self) -> bool:
        """Whether a call is being written (between ``<|tool_call>`` and ``<tool_call|>``)."""
        return self._state == "call"

    @property
    def partial_call(self) -> str:
        """The text of the call being written (after ``<|tool_call>``, with ``<|"|>`` as the
        model wrote it), ``""`` outside a call."""
        return unmark(self._call) if self._state == "call" else ""

    def feed(self, text: str) -> Parsed:
        start = 0
        for i, char in enumerate(text):
            token = _TOKEN_OF.get(char)
            if token is not None:
                self._text(text[start:i])
                self._marker(token)
                start = i + 1
        self._text(text[start:])
        return self._take()

    def finish(self) -> Parsed:
        if self._state == "label":
            self._reasoning(self._label)
        elif self._state == "call":
            logger.debug("dropping a tool call cut short: %.200r", unmark(self._call))
        self._state, self._label, self._call = "content", "", ""
        return self._take()

    # -- internals

    def _take(self) -> Parsed:
        out = Parsed(
            "".join(self._out["content"]), "".join(self._out["reasoning"]), tuple(self._calls)
        )
        self._out = {"content": [], "reasoning": []}
        self._calls = []
        return out

    def _reasoning(self, text: str) -> None:
        if text:
            self._out["reasoning"].append(text)

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._state == "content":
            self._out["content"].append(text)
        elif self._state == "reasoning":
            self._reasoning(text)
        elif self._state == "call":
            self._call += text
        else:  # "label": is the channel's first line the thought label?
            self._label += text
            if self._label.startswith(THOUGHT_LABEL):
                self._state = "reasoning"
                self._reasoning(self._label[len(THOUGHT_LABEL) :])
                self._label = ""
            elif not THOUGHT_LABEL.startswith(self._label):
                self._state = "reasoning"
                self._reasoning(self._label)
                self._label = ""

    def _marker(self, marker: str) -> None:
        state = self._state
        if state == "call":
            if marker == STRING_DELIM:
                self._call += SENTINELS[STRING_DELIM]
            elif marker == CALL_END:
                self._end_call()
            else:  # a new call, or a stop token, before this one closed
                logger.warning("dropping an unterminated tool call: %.200r", unmark(self._call))
                self._call = ""
                self._state = "call" if marker == CALL_START else "content"
            return
        if marker == CALL_START:
            if state == "label":
                self._reasoning(self._label)
                self._label = ""
            self._state = "call"
        elif marker == CHANNEL_START and state == "content":
            self._state = "label"
        elif marker == CHANNEL_END and state in ("label", "reasoning"):
            if state == "label":
                self._reasoning(self._label)
                self._label = ""
            self._state = "content"
        # a stray <|"|> (outside a call) is dropped

    def _end_call(self) -> None:
        text, self._call, self._state = self._call, "", "content"
        try:
            name, arguments = parse_call(text, SENTINELS[STRING_DELIM])
        except CallSyntaxError as exc:
            logger.warning(
                "dropping a tool call that does not parse (%s): %.200r", exc, unmark(text)
            )
            return
        if self.tools is None or name not in self.tools:
            logger.warning("dropping a call of %r, which is not an allowed tool", name)
            return
        call = ToolCall(self.count, new_call_id(), name, json.dumps(arguments, ensure_ascii=False))
        self.count += 1
        self._calls.append(call)
