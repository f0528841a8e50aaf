"""The Gemma 4 family (``gemma4``, ``gemma4_text``, ``gemma4_unified``).

Gemma 4 has control tokens for everything Gemma 3 wrote as text, and its own
chat template (``core/chat_templates/gemma4_chat_template.jinja``) takes the
OpenAI shapes almost as they are. Data flow::

    OpenAI messages ──render_inputs──▶ template messages + {enable_thinking, tools}
        (native system turn; ``developer`` is ``system``; assistant calls with
        ``arguments`` as a dict; ``role: "tool"`` results checked against the
        call ids of the assistant message they follow)
    SamplingParams ──grammar──▶ Lark (llguidance) over control-token ids:
        [<|channel>thought\\n … <channel|>]  (only with thinking on)
        then prose | <|tool_call>call:NAME{key:value,…}<tool_call|>+ | JSON
    text decoded WITH special tokens ──Gemma4OutputParser──▶
        Parsed(content, reasoning, calls)

A call is written ``<|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>,days:3}<tool_call|>``:
keys unquoted and in the order the template's ``dictsort`` gives them
(case-insensitive), every string between ``<|"|>`` tokens (no escapes), numbers,
``true``/``false``/``null`` bare, objects ``{…}`` and arrays ``[…]``; parallel
calls simply follow each other. The grammar allows only that canonical form,
with arguments valid against the tool's JSON schema (:func:`arguments_rule`),
so the off-format calls other runtimes fail to parse (quotes instead of
``<|"|>``, ``key=value``, parentheses) cannot be produced.

``null`` is written ``null`` (as vLLM's and mlx-lm's parsers read it); the
template renders a ``None`` argument of an earlier call as ``None``, the only
place where a call in the history differs from the canonical form.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..constrained import (
    ResponseFormat,
    ToolCall,
    ToolSpec,
    _grammar_error,
    _json_rule,
    _response_schema,
    new_call_id,
    system_instructions,
)
from ..messages import content_to_text
from .interface import Messages, Parsed

if TYPE_CHECKING:
    from ..params import SamplingParams

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
#: Every control token's text: none of them ever reaches ``content``.
CONTROL_TOKENS = (*TOKEN_IDS, *MEDIA_TOKENS)
#: What ends a reply (the generation config's ``eos_token_id`` [1, 106, 50]).
END_TOKENS = (TURN_END, "<eos>", RESPONSE_START)

ROLES = ("system", "developer", "user", "assistant", "tool")
TURN_SEPARATOR = "\n\n"
#: A key the call syntax can write unquoted.
KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _token(text: str) -> str:
    """A control token as a Lark grammar names it (by id)."""
    return f"<[{TOKEN_IDS[text]}]>"


# --------------------------------------------------------------------- prompt


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} arguments are not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} arguments must be a JSON object, got {value!r}")
    return dict(value)


def _assistant_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where} must be a list of tool calls, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(name, str) or not name:
            raise ValueError(
                f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                f'"arguments": "<JSON object>"}}}}, got {call!r}'
            )
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ValueError(f"{at} id must be a string, got {call_id!r}")
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": _arguments(function.get("arguments"), at)},
            }
        )
    return out


def _system_text(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if content is None:
        raise ValueError(f"{where} ({message.get('role')}) has no content")
    return content_to_text(content, where=f"{where}['content']")


def render_messages(messages: Messages, instructions: str | None = None) -> list[dict[str, Any]]:
    """Validate OpenAI-style messages and shape them as the Gemma 4 template reads them.

    Leading ``system`` / ``developer`` messages merge into one system message
    (``instructions`` appended), consecutive user messages merge, assistant
    calls get their ``arguments`` as a dict, ``reasoning_content`` (or
    ``reasoning``) of an assistant message is passed on (the template shows
    it only for the calls after the last user message), and every
    ``role: "tool"`` message must answer a call of the assistant message it
    follows (other results of that message may come between); it gets that
    call's ``name``. The conversation must end on a user message or on tool
    results. New dicts; the input is never mutated.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            "messages must be a list of {'role': ..., 'content': ...} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages must not be empty")
    system: list[str] = []
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # call id -> tool name, of the assistant message being answered
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; allowed roles: {', '.join(ROLES)}")
        if role in ("system", "developer"):
            if out:
                raise ValueError(
                    f"{where} is a {role} message after the conversation started; "
                    "Gemma accepts system instructions only at the start"
                )
            system.append(_system_text(message, where))
            continue
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ValueError(
                    f"{where} has role 'tool' but no 'tool_call_id' (the id of the call it answers)"
                )
            if call_id not in calls:
                made = ", ".join(map(repr, calls)) or "none"
                raise ValueError(
                    f"{where} answers tool_call_id {call_id!r}, but the assistant message it "
                    f"follows made no call with that id (its call ids: {made})"
                )
            content = message.get("content")
            if content is None:
                raise ValueError(f"{where} (tool) has no content")
            text = content_to_text(content, where=f"{where}['content']")
            out.append(
                {"role": "tool", "tool_call_id": call_id, "name": calls[call_id], "content": text}
            )
            continue
        calls = {}
        content = message.get("content")
        if role == "user":
            if content is None:
                raise ValueError(f"{where} (user) has no content")
            text = content_to_text(content, where=f"{where}['content']")
            if out and out[-1]["role"] == "user":
                out[-1] = {"role": "user", "content": out[-1]["content"] + TURN_SEPARATOR + text}
            else:
                out.append({"role": "user", "content": text})
            continue
        turn: dict[str, Any] = {"role": "assistant"}
        raw_calls = message.get("tool_calls")
        if content is None and not raw_calls:
            raise ValueError(f"{where} (assistant) has no content")
        turn["content"] = (
            "" if content is None else content_to_text(content, where=f"{where}['content']")
        )
        if raw_calls:
            turn["tool_calls"] = _assistant_calls(raw_calls, f"{where}['tool_calls']")
            calls = {c["id"]: c["function"]["name"] for c in turn["tool_calls"] if c["id"]}
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise ValueError(f"{where} reasoning_content must be a string, got {reasoning!r}")
            turn["reasoning_content"] = reasoning
        out.append(turn)
    if not any(m["role"] == "user" for m in out):
        raise ValueError("messages hold no user message; add one")
    if out[-1]["role"] == "assistant":
        raise ValueError(
            "the conversation must end with a user message or tool results, got 'assistant' last"
        )
    if instructions:
        system.append(instructions)
    if system:
        return [{"role": "system", "content": TURN_SEPARATOR.join(system)}, *out]
    return out


def tool_declarations(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """``tools`` as the template declares them (OpenAI function entries)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.schema(),
            },
        }
        for t in tools
    ]


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


def _value(text: str, i: int) -> tuple[Any, int]:
    i = _skip(text, i)
    if text.startswith(STRING_DELIM, i):
        end = text.find(STRING_DELIM, i + len(STRING_DELIM))
        if end < 0:
            raise CallSyntaxError(f"unterminated string at {i}")
        return text[i + len(STRING_DELIM) : end], end + len(STRING_DELIM)
    if text.startswith("{", i):
        return _object(text, i + 1)
    if text.startswith("[", i):
        items: list[Any] = []
        i = _skip(text, i + 1)
        if text.startswith("]", i):
            return items, i + 1
        while True:
            item, i = _value(text, i)
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


def _object(text: str, i: int) -> tuple[dict[str, Any], int]:
    """The object whose ``{`` ends just before ``i``."""
    out: dict[str, Any] = {}
    i = _skip(text, i)
    if text.startswith("}", i):
        return out, i + 1
    while True:
        i = _skip(text, i)
        if text.startswith(STRING_DELIM, i):  # the template's quoted-key style
            key, i = _value(text, i)
        else:
            end = text.find(":", i)
            key = text[i:end].strip() if end >= 0 else ""
            if not key or any(c in key for c in "{}[],<"):
                raise CallSyntaxError(f"expected a key at {i}: {text[i : i + 20]!r}")
            i = end
        i = _skip(text, i)
        if not text.startswith(":", i):
            raise CallSyntaxError(f"expected ':' at {i}")
        out[key], i = _value(text, i + 1)
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


def parse_call(text: str) -> tuple[str, dict[str, Any]]:
    """``call:NAME{…}`` (the text between ``<|tool_call>`` and ``<tool_call|>``) -> (name, arguments)."""
    if not text.startswith("call:"):
        raise CallSyntaxError(f"a call starts with 'call:', got {text[:20]!r}")
    brace = text.find("{")
    name = text[5:brace] if brace >= 0 else ""
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise CallSyntaxError(f"expected call:NAME{{...}}, got {text[:40]!r}")
    arguments = parse_value(text[brace:])
    if not isinstance(arguments, dict):  # cannot happen: the text at brace is an object
        raise CallSyntaxError("the arguments are not an object")
    return name, arguments


class Gemma4OutputParser:
    """Splits Gemma 4's streamed text (decoded with its control tokens) into a :class:`Parsed`.

    ``<|channel>thought\\n…<channel|>`` is reasoning (the ``thought`` label
    dropped), ``<|tool_call>…<tool_call|>`` a call (reported when it closes,
    with JSON arguments), everything else content. No control token ever
    reaches content or reasoning: ``<|"|>`` and the rest are dropped outside
    calls. A chunk that ends in the first part of a marker (``<|chan``) is
    held back until the next chunk says what it is, so the split is exact
    however the text arrives. Calls of tools not in ``tools`` (or any call
    when ``tools`` is ``None``: tool_choice ``"none"``) and calls that do not
    parse are dropped with a warning; the grammar rules both out.
    """

    def __init__(self, tools: frozenset[str] | None) -> None:
        self.tools = tools
        self.count = 0  # calls reported so far
        self._state = "content"  # "content" | "label" | "reasoning" | "call"
        self._held = ""  # a possible marker prefix at the end of the last chunk
        self._label = ""  # the start of a channel, until it is known to be "thought\n"
        self._call = ""  # the text of the call being written
        self._out: dict[str, list[str]] = {"content": [], "reasoning": []}
        self._calls: list[ToolCall] = []

    def feed(self, text: str) -> Parsed:
        buf, self._held = self._held + text, ""
        pos = 0
        while True:
            i = buf.find("<", pos)
            if i < 0:
                self._text(buf[pos:])
                break
            self._text(buf[pos:i])
            marker = next((m for m in CONTROL_TOKENS if buf.startswith(m, i)), None)
            if marker is not None:
                self._marker(marker)
                pos = i + len(marker)
            elif any(m.startswith(buf[i:]) for m in CONTROL_TOKENS):
                self._held = buf[i:]
                break
            else:
                self._text("<")
                pos = i + 1
        return self._take()

    def finish(self) -> Parsed:
        held, self._held = self._held, ""
        self._text(held)
        if self._state == "label":
            self._reasoning(self._label)
        elif self._state == "call":
            logger.debug("dropping a tool call cut short: %.200r", self._call)
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
                self._call += marker
            elif marker == CALL_END:
                self._end_call()
            else:  # a new call, or a stop token, before this one closed
                logger.warning("dropping an unterminated tool call: %.200r", self._call)
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
        # every other control token is dropped

    def _end_call(self) -> None:
        text, self._call, self._state = self._call, "", "content"
        try:
            name, arguments = parse_call(text)
        except CallSyntaxError as exc:
            logger.warning("dropping a tool call that does not parse (%s): %.200r", exc, text)
            return
        if self.tools is None or name not in self.tools:
            logger.warning("dropping a call of %r, which is not an allowed tool", name)
            return
        call = ToolCall(self.count, new_call_id(), name, json.dumps(arguments, ensure_ascii=False))
        self.count += 1
        self._calls.append(call)


# -------------------------------------------------------------------- grammar

#: Schema keywords that only annotate (no effect on what is valid).
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
#: Keywords the call grammar enforces.
SUPPORTED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "allOf",
        "$ref",
        "nullable",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
    }
)
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_JSON_LAYOUT = '"x-guidance": {"whitespace_flexible": false}'

#: Rules every call grammar may use.
_COMMON_RULES = {
    "g_str": f"{_token(STRING_DELIM)} G_TEXT {_token(STRING_DELIM)}",
    "G_TEXT": r"/(.|\n)*/",
    "G_INT": r"/-?(0|[1-9][0-9]*)/",
    "G_NUMBER": r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/",
    "G_KEY": r"/[A-Za-z_][A-Za-z0-9_]*/",
    "g_bool": '"true" | "false"',
    "g_any": 'g_str | G_NUMBER | g_bool | "null" | g_any_object | g_any_array',
    "g_any_object": '"{" (g_any_member ("," g_any_member)*)? "}"',
    "g_any_member": 'G_KEY ":" g_any',
    "g_any_array": '"[" (g_any ("," g_any)*)? "]"',
}


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Rules:
    """Builds the Lark rules for the call syntax of some JSON schemas."""

    def __init__(self, root: Mapping[str, Any], where: str, prefix: str) -> None:
        self.root = root
        self.where = where
        self.prefix = prefix
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}
        self.count = 0

    def new(self, stem: str) -> str:
        """A fresh rule name (an upper-case ``stem`` makes a terminal's name)."""
        self.count += 1
        prefix = self.prefix.upper() if stem.isupper() else self.prefix
        return f"{prefix}_{stem}_{self.count}"

    def add(self, stem: str, body: str) -> str:
        name = self.new(stem)
        self.rules[name] = body
        return name

    def fail(self, where: str, what: str) -> ValueError:
        return ValueError(
            f"{self.where}{where}: {what}. Gemma 4 tool calls support these JSON schema "
            f"keywords: {', '.join(sorted(SUPPORTED_KEYWORDS))} (types: {', '.join(_TYPES)}), "
            "plus annotations (title, description, default, examples, $defs)"
        )

    # -- values

    def value(self, schema: Any, where: str) -> str:
        """A Lark expression for a value valid against ``schema``."""
        if schema is True or schema == {}:
            return "g_any"
        if not isinstance(schema, Mapping):
            raise self.fail(where, f"a schema must be an object, got {schema!r}")
        unknown = sorted(set(schema) - SUPPORTED_KEYWORDS - _ANNOTATIONS)
        if unknown:
            raise self.fail(where, f"unsupported keyword(s) {', '.join(unknown)}")
        if "$ref" in schema:
            others = sorted(set(schema) - {"$ref"} - _ANNOTATIONS)
            if others:
                raise self.fail(where, f"$ref together with {', '.join(others)}")
            return self.ref(schema["$ref"], where)
        alternatives: list[str]
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise self.fail(where, "allOf is supported with exactly one schema")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            merged = {**rest, **parts[0]} if isinstance(parts[0], Mapping) else parts[0]
            return self.value(merged, where)
        if "anyOf" in schema:
            branches = schema["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise self.fail(where, "anyOf must be a non-empty list of schemas")
            rest = {k: v for k, v in schema.items() if k != "anyOf" and k not in _ANNOTATIONS}
            alternatives = [
                self.value({**rest, **b} if isinstance(b, Mapping) else b, f"{where}.anyOf[{j}]")
                for j, b in enumerate(branches)
            ]
        elif "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(where, "enum must be a non-empty list")
            alternatives = [self.literal(v, where) for v in values if self._fits(v, schema)]
            if not alternatives:
                raise self.fail(where, "no enum/const value matches the schema's type")
        else:
            kind = schema.get("type")
            if kind is None:
                if "properties" in schema or "additionalProperties" in schema:
                    kind = "object"
                elif "items" in schema:
                    kind = "array"
            kinds = kind if isinstance(kind, list) else [kind]
            alternatives = [self.typed(k, schema, where) for k in kinds]
        if schema.get("nullable") is True:
            alternatives.append('"null"')
        if len(alternatives) == 1:
            return alternatives[0]
        return self.add("alt", " | ".join(alternatives))

    def _fits(self, value: Any, schema: Mapping[str, Any]) -> bool:
        kind = schema.get("type")
        if kind is None:
            return True
        kinds = kind if isinstance(kind, list) else [kind]
        checks = {
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
            "object": lambda v: isinstance(v, Mapping),
            "array": lambda v: isinstance(v, list),
        }
        return any(checks.get(k, lambda v: False)(value) for k in kinds)

    def literal(self, value: Any, where: str) -> str:
        """The one text ``value`` is written as, as a Lark expression."""
        if isinstance(value, str):
            inner = f" {_lark_string(value)} " if value else " "
            return f"{_token(STRING_DELIM)}{inner}{_token(STRING_DELIM)}"
        if isinstance(value, Mapping):
            parts = ['"{"']
            for j, (k, v) in enumerate(_sorted_items(value)):
                parts.append(_lark_string(("," if j else "") + f"{self.key(k, where)}:"))
                parts.append(self.literal(v, where))
            parts.append('"}"')
            return "(" + " ".join(parts) + ")"
        if isinstance(value, list):
            parts = ['"["']
            for j, v in enumerate(value):
                if j:
                    parts.append('","')
                parts.append(self.literal(v, where))
            parts.append('"]"')
            return "(" + " ".join(parts) + ")"
        try:
            return _lark_string(format_value(value))
        except TypeError:
            raise self.fail(where, f"enum/const value {value!r} is not JSON") from None

    def key(self, key: Any, where: str) -> str:
        if not isinstance(key, str) or not KEY.match(key):
            raise self.fail(
                where,
                f"property name {key!r} cannot be written unquoted in a Gemma 4 call "
                "(use letters, digits, '_', '.', '-')",
            )
        return key

    def ref(self, ref: Any, where: str) -> str:
        match = (
            re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        )
        if match is None:
            raise self.fail(
                where, f"$ref {ref!r}: only local '#/$defs/NAME' references are supported"
            )
        if ref not in self.refs:
            target = (self.root.get(match.group(1)) or {}).get(match.group(2))
            if target is None:
                raise self.fail(where, f"$ref {ref!r} names no definition")
            name = self.new("def")
            self.refs[ref] = name  # before building: the definition may refer to itself
            self.rules[name] = self.value(target, f"{where}->{ref}")
        return self.refs[ref]

    def typed(self, kind: Any, schema: Mapping[str, Any], where: str) -> str:
        if kind is None:
            return "g_any"
        if kind == "string":
            return self.string(schema, where)
        if kind in ("integer", "number"):
            bounds = {k: schema[k] for k in _NUMBER_KEYWORDS if k in schema}
            if not bounds:
                return "G_INT" if kind == "integer" else "G_NUMBER"
            spec = json.dumps({"type": kind, **bounds})
            return self.add("num", f"%json {{{spec[1:-1]}, {_JSON_LAYOUT}}}")
        if kind == "boolean":
            return "g_bool"
        if kind == "null":
            return '"null"'
        if kind == "object":
            return self.object(schema, where)
        if kind == "array":
            return self.array(schema, where)
        raise self.fail(where, f"unknown type {kind!r}")

    def string(self, schema: Mapping[str, Any], where: str) -> str:
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if lo is None and hi is None:
            return "g_str"
        for bound in (lo, hi):
            if bound is not None and (not isinstance(bound, int) or bound < 0):
                raise self.fail(where, f"minLength/maxLength must be integers >= 0, got {bound!r}")
        text = self.add("STR", f"/(.|\\n){{{lo or 0},{'' if hi is None else hi}}}/")
        return f"{_token(STRING_DELIM)} {text} {_token(STRING_DELIM)}"

    def array(self, schema: Mapping[str, Any], where: str) -> str:
        item = self.value(schema.get("items", True), f"{where}.items")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        for bound in (lo, hi):
            if bound is not None and (not isinstance(bound, int) or bound < 0):
                raise self.fail(where, f"minItems/maxItems must be integers >= 0, got {bound!r}")
        if hi is not None and hi < lo:
            raise self.fail(where, f"maxItems {hi} < minItems {lo}")
        if hi == 0:
            return '("[" "]")'
        more_lo, more_hi = max(lo - 1, 0), "" if hi is None else hi - 1
        items = f'{item} ("," {item}){{{more_lo},{more_hi}}}'
        body = f'"[" {items} "]"' if lo > 0 else f'"[" ({items})? "]"'
        return self.add("arr", body)

    def object(self, schema: Mapping[str, Any], where: str) -> str:
        properties = schema.get("properties")
        extra = schema.get("additionalProperties", True)
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(where, f"required must be a list of property names, got {required!r}")
        if properties is None:
            if required:
                raise self.fail(where, "required keys need 'properties' that describe them")
            if extra is False:
                return '("{" "}")'
            if extra is True:
                return "g_any_object"
            member = self.add(
                "member", f'G_KEY ":" {self.value(extra, f"{where}.additionalProperties")}'
            )
            return self.add("obj", f'"{{" ({member} ("," {member})*)? "}}"')
        if not isinstance(properties, Mapping):
            raise self.fail(where, "properties must be an object")
        if extra not in (True, False):
            raise self.fail(where, "additionalProperties with a schema next to properties")
        missing = [r for r in required if r not in properties]
        if missing:
            raise self.fail(where, f"required key(s) {missing} are not in properties")
        # Closed, in the template's order: no key the schema does not name.
        members = [
            (self.key(k, where), self.value(v, f"{where}.{k}"), k in required)
            for k, v in _sorted_items(properties)
        ]
        return self.add("obj", f'"{{" {self.members(members, 0, True, {})} "}}"')

    def members(
        self,
        members: list[tuple[str, str, bool]],
        k: int,
        first: bool,
        memo: dict[tuple[int, bool], str],
    ) -> str:
        """The members from ``k`` on; ``first``: none written yet (no leading comma).

        Each optional member is "written, then the rest" or "skipped": one rule
        per (position, first) pair, so the grammar stays linear in the number
        of properties.
        """
        if k == len(members):
            return ""
        if (k, first) in memo:
            return memo[k, first]
        key, value, required = members[k]
        head = f"{_lark_string(('' if first else ',') + key + ':')} {value}"
        rest = self.members(members, k + 1, False, memo)
        written = f"{head} {rest}".strip()
        if required:
            out = written
        else:
            skipped = self.members(members, k + 1, first, memo)
            out = f"({written})?" if not skipped else self.add("mem", f"{written} | {skipped}")
        memo[k, first] = out
        return out


def arguments_rule(tool: ToolSpec, prefix: str = "t") -> tuple[str, dict[str, str]]:
    """``(expression, rules)``: Lark for ``tool``'s arguments object, rule names from ``prefix``."""
    schema = tool.schema()
    rules = _Rules(schema, f"tools ({tool.name}) parameters", prefix)
    return rules.value(schema, ""), rules.rules


@lru_cache(maxsize=64)
def build_grammar(
    tools: tuple[ToolSpec, ...],
    tool_choice: str,
    tool_name: str | None,
    parallel: bool,
    response_format: ResponseFormat | None,
    thinking: bool,
) -> str | None:
    """The Lark grammar for one request's reply, or ``None`` when nothing is constrained."""
    calling = bool(tools) and tool_choice != "none"
    if not calling and response_format is None:
        return None
    lines = ["%llguidance {}"]
    if thinking:
        lines.append("start: thought? body")
        lines.append(
            f"thought: {_token(CHANNEL_START)} {_lark_string(THOUGHT_LABEL)} G_THOUGHT "
            f"{_token(CHANNEL_END)}"
        )
        lines.append(r"G_THOUGHT: /(.|\n)*/")
    else:
        lines.append("start: body")
    if not calling:
        assert response_format is not None
        lines.append(f"body: {_json_rule(_response_schema(response_format))}")
        return "\n".join(lines) + "\n"
    chosen = [t for t in tools if tool_name is None or t.name == tool_name]
    many = parallel and tool_name is None
    calls = "call+" if many else "call"
    lines.append(f"body: (G_PROSE | {calls})?" if tool_choice == "auto" else f"body: {calls}")
    if tool_choice == "auto":
        lines.append(r"G_PROSE: /(.|\n)+/")
    lines.append(
        f"call: {_token(CALL_START)} "
        + "("
        + " | ".join(f"call_{i}" for i in range(len(chosen)))
        + ")"
        + f" {_token(CALL_END)}"
    )
    rules: dict[str, str] = dict(_COMMON_RULES)
    for i, tool in enumerate(chosen):
        top, own = arguments_rule(tool, f"t{i}")
        rules.update(own)
        lines.append(f"call_{i}: {_lark_string('call:' + tool.name)} {top}")
    lines += [f"{name}: {body}" for name, body in rules.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- family


@dataclass(frozen=True)
class Gemma4Family:
    """Gemma 4: native system turn, thinking, and tool calls in its own control tokens."""

    name: str = "gemma4"
    chat_template: str = "gemma4_chat_template.jinja"
    end_tokens: tuple[str, ...] = END_TOKENS
    keep_special_tokens: bool = True
    can_think: bool = True

    def check(self, params: SamplingParams, thinking: bool | None) -> None:
        grammar = self.grammar(params, thinking)
        if grammar is not None:
            error = _grammar_error(grammar)
            if error is not None:
                raise ValueError(f"the tools / response_format cannot be constrained: {error}")

    def render_inputs(
        self, messages: Messages, params: SamplingParams, thinking: bool | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        calling = bool(params.tools) and params.tool_choice != "none"
        # Tools are declared by the template; a JSON format is described in the
        # system turn as on Gemma 3.
        instructions = None if calling else system_instructions(params)
        kwargs: dict[str, Any] = {"enable_thinking": bool(thinking)}
        if calling:
            kwargs["tools"] = tool_declarations(params.tools)
        return render_messages(messages, instructions), kwargs

    def grammar(self, params: SamplingParams, thinking: bool | None) -> str | None:
        return build_grammar(
            params.tools,
            params.tool_choice,
            params.tool_choice_name,
            params.parallel_tool_calls,
            params.response_format,
            bool(thinking),
        )

    def free_prose(self, params: SamplingParams, thinking: bool | None) -> bool:
        return False  # prose is told apart by control tokens, not by its first character

    def output_parser(self, params: SamplingParams, thinking: bool | None) -> Gemma4OutputParser:
        calling = bool(params.tools) and params.tool_choice != "none"
        names = [t.name for t in params.tools if params.tool_choice_name in (None, t.name)]
        return Gemma4OutputParser(frozenset(names) if calling else None)


FAMILY = Gemma4Family()
