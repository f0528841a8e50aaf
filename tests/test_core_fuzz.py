"""Property-based fuzzing of ``create()``: messages and every option, good and bad.

Each example is one request built by :func:`cases`: a conversation (system /
``developer`` turns, text or text-part contents with emoji, NUL, RTL, combining
marks and chat-template markers, assistant tool calls and their results, an
occasional oversized message) and every option ``create()`` accepts
(``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``stop``, ``seed``,
``repetition_penalty``, ``logit_bias``, ``n``, ``tools`` with random JSON
schemas, ``tool_choice``, ``parallel_tool_calls``, ``response_format``,
``model``, the ignored OpenAI options, ``stream``), sent through ``create`` or
``acreate``. Half of the examples carry exactly one deliberate defect (a wrong
type, an out-of-range value, an unknown option, a lone surrogate, a bare string
in a parts list, a tool result with no call, ``stream="no"``, ...), recorded
with the case, so the expected outcome is known:

* a clean case succeeds: a well-formed ``chat.completion`` (or a chunk stream
  read to the end) with ``n`` choices, a valid ``finish_reason``, tool calls
  only to the given tools with JSON-object arguments, no stop string in the
  text, and usage that adds up and respects ``max_tokens``;
* a defective case raises ``ValueError`` / ``TypeError`` from the ``create()``
  call itself, before the request reaches the model thread (checked by counting
  requests on an instrumented subclass); the only defects that may surface
  later are the two that need the tokenizer (a ``logit_bias`` id outside the
  vocabulary, a prompt longer than the context window), and those must still
  come before the backend's ``_generate`` is entered;
* no other exception, no hang (pytest-timeout), and the client answers a
  normal request after every failed one.

Two layers share the strategies:

* ``test_validation_fuzz``: 1,000 examples against a model-less client whose
  ``stream_deltas`` reports "accepted" instead of generating (milliseconds per
  example): every boundary check of ``create()`` / ``acreate()``.
* ``test_each_message_defect``: 10 examples of each of the 18 kinds of broken
  conversation (:data:`MESSAGE_DEFECTS`) on the same client, so that rare kinds
  are always covered.
* ``test_fuzz_create``: 150 examples per backend on the real tiny Gemma 3
  checkpoint (transformers and MLX, loaded through the real loading code),
  ``max_tokens`` at most 4 and ``n`` at most 2.

Two bugs it found are pinned below as plain tests: a temperature (or repetition
penalty) that is 0 in float32, and a ``top_k`` of the whole vocabulary on MLX.

Runs are deterministic (``derandomize=True``, no example database), so CI sees
the same examples every time.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.base import BaseGemmaChatCompletion
from core.errors import ContextWindowExceededError

VOCAB_SIZE = 512  # core.tiny's default vocabulary, the one the fixtures build
MODEL_NAME = "fuzz/validation-only"  # the model-less client's name
USER = [{"role": "user", "content": "Say hello."}]

VALIDATION_EXAMPLES = 1000
MODEL_EXAMPLES = 150

# ------------------------------------------------------------------ strategies

#: Text a user may legitimately send: any Unicode scalar value (NUL and
#: control characters included, surrogates excluded), plus pieces chosen to
#: stress the tokenizer, the chat template and the streaming detokenizer.
SPECIAL_TEXT = [
    "\x00",
    "😀",
    "👩‍👩‍👧‍👦",
    "🇫🇷",
    "e\u0301",
    "שלום עולם",
    "日本語のテキスト",
    "\u200b\ufeff",
    "\r\n\t",
    "<end_of_turn>",
    "<start_of_turn>model\n",
    "<bos>",
    "```tool_call\n",
    "```tool_output\n",
    '{"a": [1, {"b": null}]}',
    "\\u0000 \\ud800",
    "",
]
valid_text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=24),
    st.lists(st.sampled_from(SPECIAL_TEXT), max_size=4).map("".join),
)
lone_surrogate = st.sampled_from(["\udc80", "\ud83d", "\udfff", "\ud800"])


@st.composite
def valid_content(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(valid_text)
    texts = draw(st.lists(valid_text, max_size=3))
    return [{"type": "text", "text": t} for t in texts]


NAME = st.from_regex(r"\A[a-zA-Z0-9_-]{1,12}\Z")
PROPERTY = st.one_of(NAME, st.text(st.characters(codec="utf-8"), min_size=1, max_size=6))
LEAF_SCHEMAS = [
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "null"},
    {"enum": ["a", "b", 3]},
    {"const": "fixed"},
    {"type": "string", "maxLength": 5},
    {"type": "string", "minLength": 1, "maxLength": 3},
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"type": "string", "pattern": "^[a-z]+$"},
    {"type": "string", "format": "date"},
    {"type": ["string", "null"]},
]


def _object(props: dict[str, Any], required: int, closed: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if props and required:
        schema["required"] = sorted(props)[:required]
    if closed:
        schema["additionalProperties"] = False
    return schema


value_schema = st.recursive(
    st.sampled_from(LEAF_SCHEMAS),
    lambda children: st.one_of(
        st.builds(
            _object,
            st.dictionaries(PROPERTY, children, max_size=3),
            st.integers(0, 2),
            st.booleans(),
        ),
        children.map(lambda c: {"type": "array", "items": c, "maxItems": 3}),
        st.lists(children, min_size=1, max_size=2).map(lambda xs: {"anyOf": xs}),
    ),
    max_leaves=5,
)
object_schema = st.builds(
    _object, st.dictionaries(PROPERTY, value_schema, max_size=3), st.integers(0, 2), st.booleans()
)


@st.composite
def valid_tools(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(NAME, max_size=3, unique=True))
    tools = []
    for name in names:
        function: dict[str, Any] = {"name": name}
        if draw(st.booleans()):
            function["description"] = draw(valid_text)
        if draw(st.integers(0, 3)):
            function["parameters"] = draw(object_schema)
        tools.append({"type": "function", "function": function})
    return tools


@st.composite
def tool_calls(draw: st.DrawFn, first_id: int) -> list[dict[str, Any]]:
    count = draw(st.integers(1, 2))
    calls = []
    for i in range(count):
        arguments = draw(
            st.dictionaries(
                PROPERTY,
                st.one_of(st.none(), st.booleans(), st.integers(-5, 5), valid_text),
                max_size=2,
            )
        )
        calls.append(
            {
                "id": f"call_{first_id + i}",
                "type": "function",
                "function": {"name": draw(NAME), "arguments": json.dumps(arguments)},
            }
        )
    return calls


@st.composite
def valid_conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A conversation every Gemma template accepts: it alternates after merging,
    starts and ends on a user turn (a tool result counts as one), and every
    tool result answers a call of the assistant turn before it."""
    messages: list[dict[str, Any]] = [
        {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(valid_content())}
        for _ in range(draw(st.integers(0, 2)))
    ]
    exchanges = draw(st.integers(1, 3))
    next_id = 0
    for k in range(exchanges):
        last = k == exchanges - 1
        messages.append({"role": "user", "content": draw(valid_content())})
        if last and draw(st.booleans()):
            break
        if draw(st.booleans()):
            calls = draw(tool_calls(next_id))
            next_id += len(calls)
            content = draw(st.one_of(st.none(), valid_text))
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
            for call in calls:
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": draw(valid_content())}
                )
        else:
            messages.append({"role": "assistant", "content": draw(valid_content())})
            if last:
                messages.append({"role": "user", "content": draw(valid_content())})
    return messages


# A defect is (what is wrong, whether it may only surface once the tokenizer is
# loaded). The strategies below return (value, defect or None).
Defect = tuple[str, bool]


def _first_user(messages: list[dict[str, Any]]) -> int:
    return next(i for i, m in enumerate(messages) if m["role"] == "user")


MESSAGE_DEFECTS = [
    "not a list",
    "empty",
    "not a dict",
    "bad role",
    "bad content",
    "bad part",
    "bare string part",
    "lone surrogate",
    "oversized",
    "system after start",
    "ends on assistant",
    "starts on assistant",
    "only system",
    "tool result first",
    "tool result without call",
    "unmatched tool_call_id",
    "tool result without id",
    "bad tool call",
]


@st.composite
def broken_conversation(
    draw: st.DrawFn, kinds: Sequence[str] = tuple(MESSAGE_DEFECTS)
) -> tuple[Any, Defect]:
    """A valid conversation with exactly one defect of one of ``kinds``."""
    messages = draw(valid_conversation())
    first = _first_user(messages)
    at = draw(st.integers(0, len(messages) - 1))
    kind = draw(st.sampled_from(kinds))
    user = {"role": "user", "content": "hi"}
    if kind == "not a list":
        return draw(st.sampled_from(["hi", None, 5, b"x", {"role": "user", "content": "x"}])), (
            kind,
            False,
        )
    if kind == "empty":
        return draw(st.sampled_from([[], ()])), (kind, False)
    if kind == "not a dict":
        messages.insert(at, draw(st.sampled_from(["hi", None, 5, ["user", "hi"], ("role",)])))
    elif kind == "bad role":
        bad = draw(st.sampled_from(["bot", "User", "", None, 5, "function", "model"]))
        if draw(st.booleans()):
            messages[at] = {**messages[at], "role": bad}
        else:
            messages[at] = {k: v for k, v in messages[at].items() if k != "role"}
    elif kind == "bad content":
        bad = draw(st.sampled_from([5, 5.5, True, b"bytes", {"text": "x"}, None]))
        messages[first] = {**messages[first], "content": bad}
    elif kind == "bad part":
        part = draw(
            st.sampled_from(
                [
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    {"type": "text", "text": 5},
                    {"type": "text"},
                    {"text": "no type"},
                    5,
                    None,
                    b"x",
                ]
            )
        )
        messages[first] = {**messages[first], "content": [{"type": "text", "text": "a"}, part]}
    elif kind == "bare string part":
        messages[first] = {**messages[first], "content": ["hi", {"type": "text", "text": "a"}]}
    elif kind == "lone surrogate":
        text = draw(valid_text) + draw(lone_surrogate) + draw(valid_text)
        target = draw(st.sampled_from([i for i, m in enumerate(messages) if m.get("content")] or [first]))
        if draw(st.booleans()):
            messages[target] = {**messages[target], "content": text}
        else:
            messages[target] = {**messages[target], "content": [{"type": "text", "text": text}]}
    elif kind == "oversized":
        messages[first] = {**messages[first], "content": "a long request " * 2000}
        return messages, (kind, True)
    elif kind == "system after start":
        messages.insert(first + 1, {"role": "system", "content": "late"})
        messages.append(user)
    elif kind == "ends on assistant":
        messages.append({"role": "assistant", "content": "last word"})
    elif kind == "starts on assistant":
        messages.insert(first, {"role": "assistant", "content": "first word"})
    elif kind == "only system":
        messages = [{"role": "system", "content": "only"}]
    elif kind == "tool result first":
        messages.insert(first, {"role": "tool", "tool_call_id": "call_0", "content": "42"})
    elif kind == "tool result without call":
        messages.append({"role": "tool", "tool_call_id": "call_x", "content": "42"})
    elif kind == "unmatched tool_call_id":
        call = {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_b", "content": "42"},
        ]
    elif kind == "tool result without id":
        call = {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        result: dict[str, Any] = {"role": "tool", "content": "42"}
        if draw(st.booleans()):
            result["tool_call_id"] = draw(st.sampled_from(["", 5, None]))
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]}, result]
    else:  # bad tool call
        bad_calls = draw(
            st.sampled_from(
                [
                    "call",
                    [5],
                    {"id": "c"},
                    [{"id": "c", "type": "function", "function": {"arguments": "{}"}}],
                    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}],
                    [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                ]
            )
        )
        messages += [{"role": "assistant", "content": None, "tool_calls": bad_calls}, user]
    return messages, (kind, False)


def _option(valid: st.SearchStrategy[Any], bad: Sequence[Any]) -> tuple[Any, Any]:
    return valid, (st.sampled_from(list(bad)) if bad else None)


FLOATS = {"allow_nan": False, "allow_infinity": False}
NAN, INF = math.nan, math.inf
#: name: (valid values, values that must be rejected). Interdependent options
#: (tools, tool_choice, response_format) are drawn in :func:`cases`.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "temperature": _option(
        st.one_of(st.none(), st.floats(0, 2, **FLOATS), st.sampled_from([0, 1, 2])),
        [-0.01, 2.0001, NAN, INF, -INF, "0.7", True, [0.5]],
    ),
    "top_p": _option(
        st.one_of(st.none(), st.floats(0, 1, exclude_min=True, **FLOATS), st.just(1)),
        [0, 0.0, -0.5, 1.01, NAN, "1", False],
    ),
    "top_k": _option(st.integers(0, 10**6), [-1, 2.5, "3", True, NAN]),
    "max_tokens": _option(st.integers(1, 4), [0, -5, 2.5, "3", True, NAN, [2]]),
    "stop": _option(
        st.one_of(
            st.none(),
            st.text(st.characters(codec="utf-8"), min_size=1, max_size=4),
            st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=4), max_size=4),
            st.lists(st.sampled_from(["a", "\n", "😀", " "]), max_size=3).map(tuple),
        ),
        ["", [""], [5], 5, ["x"] * 17, {"x": 1}, {"x"}, [None]],
    ),
    "seed": _option(st.integers(0, 2**63 - 1), [-1, 2**63, 1.5, "7", True]),
    "repetition_penalty": _option(
        st.one_of(st.none(), st.floats(0, 10, exclude_min=True, **FLOATS)),
        [0, -1.0, 10.01, NAN, "1.1", True],
    ),
    "logit_bias": _option(
        st.one_of(
            st.none(),
            st.dictionaries(
                st.one_of(st.integers(0, VOCAB_SIZE - 1), st.integers(0, VOCAB_SIZE - 1).map(str)),
                st.one_of(st.floats(-100, 100, **FLOATS), st.integers(-100, 100)),
                max_size=4,
            ),
        ),
        [{-1: 1.0}, {"abc": 1.0}, {"1": 100.5}, {"1": NAN}, {"1": "5"}, {"1": None}, [1, 2], "x"],
    ),
    "n": _option(st.integers(1, 2), [0, -1, 17, 1.0, "2", True]),
    "parallel_tool_calls": _option(st.one_of(st.none(), st.booleans()), ["yes", 1, 0]),
    "model": _option(st.sampled_from([None, MODEL_NAME]), ["another/model"]),
    "user": _option(st.text(max_size=5), []),
    "metadata": _option(st.dictionaries(NAME, NAME, max_size=2), []),
    "store": _option(st.booleans(), []),
    "stream_options": _option(st.just({"include_usage": True}), []),
    "stream": _option(st.booleans(), ["no", "yes", "false", ""]),
}
DEPENDENT = ["tools", "tool_choice", "response_format", "unknown option", "tools with json"]

BAD_TOOLS = [
    "search",
    {"type": "function"},
    [{"type": "retrieval"}],
    [{"type": "function", "function": {"name": "has space"}}],
    [{"type": "function", "function": {"name": "x" * 65}}],
    [{"type": "function", "function": {"name": ""}}],
    [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
    [{"type": "function", "function": {"name": "f", "description": 5}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
    [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"default": NAN}}}],
    [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}},
            },
        }
    ],
]
BAD_RESPONSE_FORMATS = [
    "json",
    {"type": "xml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    {"type": "json_schema", "json_schema": {"name": "", "schema": {"type": "object"}}},
    {"type": "json_schema", "json_schema": {"name": "r", "strict": "yes"}},
    {"type": "json_schema", "json_schema": {"name": "r", "schema": 5}},
    {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "nonsense"}}},
]


@st.composite
def valid_response_format(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["text", "json_object", "json_schema"]))
    if kind != "json_schema":
        return {"type": kind}
    spec: dict[str, Any] = {"name": draw(NAME)}
    if draw(st.integers(0, 3)):
        spec["schema"] = draw(st.one_of(object_schema, value_schema))
    if draw(st.booleans()):
        spec["strict"] = draw(st.booleans())
    return {"type": "json_schema", "json_schema": spec}


@dataclass
class Case:
    messages: Any
    options: dict[str, Any]
    use_async: bool
    defect: Defect | None = None
    tool_names: list[str] = field(default_factory=list)

    @property
    def stream(self) -> bool:
        return self.options.get("stream") is True

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        return (
            f"Case(defect={self.defect!r}, use_async={self.use_async},\n"
            f"     messages={self.messages!r},\n     options={self.options!r})"
        )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A request; half of them carry exactly one defect (which one is recorded)."""
    options_ = [name for name, (_, bad) in OPTIONS.items() if bad is not None]
    targets = ["messages"] * 8 + options_ + DEPENDENT  # messages go wrong in many ways
    target = draw(st.sampled_from([None] * len(targets) + targets))
    defect: Defect | None = None
    if target == "messages":
        messages, defect = draw(broken_conversation())
    else:
        messages = draw(valid_conversation())
        if draw(st.booleans()):
            messages = tuple(messages)
    options: dict[str, Any] = {}
    for name, (valid, bad) in OPTIONS.items():
        if name == target:
            options[name] = draw(bad)
            defect = (f"{name}={options[name]!r}", False)
        elif name == "max_tokens":
            options[name] = draw(valid)  # always small: the default is 2048
        elif draw(st.integers(0, 2)) == 0:
            options[name] = draw(valid)
    tools: list[dict[str, Any]] = draw(valid_tools()) if draw(st.booleans()) else []
    names = [t["function"]["name"] for t in tools]
    if tools or draw(st.booleans()):
        options["tools"] = tools
    choices: list[Any] = [None, "none"]
    if names:
        choices += ["auto", "required", *({"type": "function", "function": {"name": n}} for n in names)]
    choice = draw(st.sampled_from(choices))
    if choice is not None:
        options["tool_choice"] = choice
    if draw(st.integers(0, 2)) == 0:
        options["response_format"] = draw(valid_response_format())
    calling = bool(names) and choice != "none"
    if calling and options.get("response_format", {}).get("type", "text") != "text":
        options["tool_choice"] = "none"  # JSON replies and tool calls cannot share a reply
    if target == "tools":
        options["tools"] = draw(st.sampled_from(BAD_TOOLS))
        options.pop("tool_choice", None)
        defect = (f"tools={options['tools']!r}", False)
    elif target == "tool_choice":
        bad = ["any", "Auto", 5, {"type": "function"}, {"function": {"name": "f"}}]
        bad += [{"type": "function", "function": {"name": "not_a_given_tool"}}]
        if not names:
            bad += ["auto", "required"]
        options["tool_choice"] = draw(st.sampled_from(bad))
        defect = (f"tool_choice={options['tool_choice']!r}", False)
    elif target == "response_format":
        options["response_format"] = draw(st.sampled_from(BAD_RESPONSE_FORMATS))
        defect = (f"response_format={options['response_format']!r}", False)
    elif target == "unknown option":
        name = draw(st.sampled_from(["frobnicate", "temprature", "functions", "best_of"]))
        options[name] = 1
        defect = (f"unknown option {name!r}", False)
    elif target == "tools with json":
        tool = {"type": "function", "function": {"name": "f"}}
        options["tools"] = [tool]
        options["tool_choice"] = draw(st.sampled_from([None, "auto", "required"]))
        options["response_format"] = {"type": "json_object"}
        defect = ("tools and response_format together", False)
    if target is None and draw(st.integers(0, 19)) == 7:  # a well-typed id the tokenizer lacks
        options["logit_bias"] = {draw(st.integers(VOCAB_SIZE, 10**6)): 1.0}
        defect = ("logit_bias id outside the vocabulary", True)
    return Case(messages, options, draw(st.booleans()), defect, names if calling else [])


# ----------------------------------------------------------- running a request


class _Accepted(Exception):
    """The model-less client got a request past every boundary check."""


class _Probe:
    """Counts requests that reached the model thread and generations that started."""

    requests = 0
    generations = 0

    def stream_deltas(self, conversations: Any, params: Any) -> Any:
        self.requests += 1
        return super().stream_deltas(conversations, params)  # type: ignore[misc]

    def astream_deltas(self, conversations: Any, params: Any) -> Any:
        self.requests += 1
        return super().astream_deltas(conversations, params)  # type: ignore[misc]

    def _generate(self, prompts: Any, params: Any, sink: Any) -> None:
        self.generations += 1
        super()._generate(prompts, params, sink)  # type: ignore[misc]


class _ValidationOnly(BaseGemmaChatCompletion):
    """Runs ``create()``'s boundary checks, then reports ``_Accepted`` instead of generating."""

    supports_constraints = True

    def _load_model_and_tokenizer(self) -> None:
        raise AssertionError("the validation layer must never load a model")

    def _generate(self, prompts: Any, params: Any, sink: Any) -> None:
        raise AssertionError("the validation layer must never generate")

    def stream_deltas(self, conversations: Any, params: Any) -> Any:
        raise _Accepted

    def astream_deltas(self, conversations: Any, params: Any) -> Any:
        raise _Accepted


def _call(client: Any, case: Case) -> Any:
    """Send ``case``; return the completion dict or the list of chunks, read to the end."""
    options = dict(case.options)
    if options.get("model") == MODEL_NAME:
        options["model"] = client.model_name
    if not case.use_async:
        out = client.create(case.messages, **options)
        return list(out) if case.stream else out

    async def run() -> Any:
        out = await client.acreate(case.messages, **options)
        if case.stream:
            return [chunk async for chunk in out]
        return out

    return asyncio.run(run())


def _check_choice_text(case: Case, text: str | None) -> None:
    stop = case.options.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if text and not case.tool_names:
        for s in stops:
            assert s not in text, f"stop string {s!r} is in the reply {text!r}"


def _check_calls(case: Case, calls: list[dict[str, Any]]) -> None:
    assert case.tool_names, f"tool calls {calls} without tools to call"
    for call in calls:
        assert call["type"] == "function" and isinstance(call["id"], str) and call["id"]
        assert call["function"]["name"] in case.tool_names
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


def _check_usage(case: Case, usage: dict[str, Any], n: int) -> None:
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(isinstance(v, int) and v >= 0 for v in usage.values())
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= n * case.options["max_tokens"]


def check_completion(case: Case, out: Any, model: str) -> None:
    n = case.options.get("n", 1)
    assert isinstance(out, dict) and out["object"] == "chat.completion", out
    assert out["id"].startswith("chatcmpl-") and out["model"] == model
    assert [c["index"] for c in out["choices"]] == list(range(n))
    for choice in out["choices"]:
        message = choice["message"]
        assert message["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")
        if "tool_calls" in message:
            assert message["content"] is None
            _check_calls(case, message["tool_calls"])
        else:
            assert isinstance(message["content"], str)
            assert choice["finish_reason"] != "tool_calls"
            _check_choice_text(case, message["content"])
            fmt = case.options.get("response_format") or {}
            if fmt.get("type", "text") != "text" and choice["finish_reason"] == "stop":
                json.loads(message["content"])  # a finished JSON reply parses
    _check_usage(case, out["usage"], n)


def check_chunks(case: Case, chunks: list[dict[str, Any]], model: str) -> None:
    n = case.options.get("n", 1)
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == model for c in chunks)
    *body, last = chunks
    assert last["choices"] == [] and "usage" in last
    _check_usage(case, last["usage"], n)
    texts = {i: "" for i in range(n)}
    calls: dict[int, list[dict[str, Any]]] = {i: [] for i in range(n)}
    finished: dict[int, str] = {}
    for i, chunk in enumerate(body):
        assert len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        index, delta = choice["index"], choice["delta"]
        assert index in texts and index not in finished, chunk
        if i < n:
            assert delta == {"role": "assistant", "content": ""} and index == i
        if choice["finish_reason"] is not None:
            assert delta == {}
            finished[index] = choice["finish_reason"]
        texts[index] += delta.get("content", "")
        calls[index] += [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls", [])]
    assert sorted(finished) == list(range(n)), f"not every choice finished: {finished}"
    for index in range(n):
        assert finished[index] in ("stop", "length", "tool_calls")
        if calls[index]:
            assert texts[index] == ""
            _check_calls(case, calls[index])
        else:
            assert finished[index] != "tool_calls"
            _check_choice_text(case, texts[index])


# ------------------------------------------------------------------ the tests

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
}


@pytest.fixture(scope="module")
def validation_client() -> Any:
    client = _ValidationOnly(MODEL_NAME)
    yield client
    client.close()


@settings(max_examples=VALIDATION_EXAMPLES, **SETTINGS)
@given(case=cases())
def test_validation_fuzz(validation_client: Any, case: Case) -> None:
    """Every boundary check of create()/acreate(), without a model (1,000 examples)."""
    try:
        _call(validation_client, case)
    except _Accepted:
        assert case.defect is None or case.defect[1], f"accepted a defective request: {case.defect}"
    except (ValueError, TypeError) as exc:
        assert case.defect is not None, f"rejected a valid request: {exc!r}"
        assert not case.defect[1], f"{case.defect} needs the tokenizer, yet failed early: {exc!r}"
    else:
        raise AssertionError("the validation-only client returned without reaching the model")
    assert not validation_client.is_loaded


@pytest.mark.parametrize("kind", MESSAGE_DEFECTS)
def test_each_message_defect(validation_client: Any, kind: str) -> None:
    """Every kind of broken conversation, 10 examples each, on both entry points."""

    @settings(max_examples=10, **SETTINGS)
    @given(broken=broken_conversation([kind]), use_async=st.booleans(), stream=st.booleans())
    def check(broken: tuple[Any, Defect], use_async: bool, stream: bool) -> None:
        messages, (_, late) = broken
        case = Case(messages, {"max_tokens": 1, "stream": stream}, use_async, (kind, late))
        try:
            _call(validation_client, case)
        except _Accepted:
            assert late, f"accepted a conversation with a defect ({kind}): {messages!r}"
        except (ValueError, TypeError):
            assert not late, f"{kind} needs the tokenizer, yet failed early"

    check()


@pytest.fixture(scope="module", params=BACKENDS)
def probe_client(request: pytest.FixtureRequest, gemma3_path: Path) -> Any:
    """A client of ``request.param`` with :class:`_Probe`'s counters, loaded once."""
    import core

    if request.param == "transformers":
        cls: type = core.GemmaTransformersChatCompletion
        options: dict[str, Any] = {"device_map": "cpu", "torch_dtype": "float32"}
    else:
        cls, options = core.GemmaMLXChatCompletion, {}
    client = type(f"Fuzz{cls.__name__}", (_Probe, cls), {})(str(gemma3_path), **options)
    client.load()
    yield client
    client.close()


def _expect_failure(client: Any, case: Case, run: Callable[[], Any]) -> None:
    requests, generations = client.requests, client.generations
    with pytest.raises((ValueError, TypeError)) as info:
        run()
    assert client.generations == generations, f"{case.defect} was rejected only after generating"
    if not case.defect or not case.defect[1]:
        assert client.requests == requests, (
            f"{case.defect} reached the model thread before it was rejected: {info.value!r}"
        )


@pytest.mark.timeout(300)
@settings(max_examples=MODEL_EXAMPLES, **SETTINGS)
@given(case=cases())
def test_fuzz_create(probe_client: Any, case: Case) -> None:
    """Real tiny checkpoints on both backends (150 examples each, max_tokens <= 4)."""
    client = probe_client
    if case.defect is not None:
        _expect_failure(client, case, lambda: _call(client, case))
        out = client.create(USER, max_tokens=2, temperature=0)  # it still answers
        check_completion(Case(USER, {"max_tokens": 2}, False), out, client.model_name)
        return
    generations = client.generations
    try:
        out = _call(client, case)
    except ContextWindowExceededError:
        assert client.generations == generations
        return
    if case.stream:
        check_chunks(case, out, client.model_name)
    else:
        check_completion(case, out, client.model_name)


# ------------------------------------------- what the fuzzer found, pinned


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1e-300},
        {"temperature": 1e-300, "seed": 1},
        {"temperature": 5e-324, "repetition_penalty": 1e-300},
    ],
)
def test_tiny_temperature_samples_the_argmax(probe_client: Any, options: dict[str, Any]) -> None:
    """A temperature (or repetition penalty) that is 0 in float32 used to make NaN
    probabilities: transformers raised from torch.multinomial mid-generation, MLX drew
    garbage. Below ``MIN_DIVISOR`` the draw is the argmax, as greedy decoding's."""
    penalty = {"repetition_penalty": options.get("repetition_penalty")}
    greedy = probe_client.create(USER, max_tokens=6, temperature=0, **penalty)
    out = probe_client.create(USER, max_tokens=6, **options)
    assert out["choices"][0]["message"] == greedy["choices"][0]["message"]


@pytest.mark.parametrize("top_k", [VOCAB_SIZE - 1, VOCAB_SIZE, VOCAB_SIZE + 1, 10**6])
def test_top_k_of_the_whole_vocabulary(probe_client: Any, top_k: int) -> None:
    """mlx-lm raises for a top_k >= the vocabulary inside a compiled sampler, which
    left MLX's random state unusable: every later request of the client failed."""
    for options in ({"top_k": top_k}, {"top_k": top_k, "seed": 3}, {}):
        out = probe_client.create(USER, max_tokens=3, temperature=1.0, **options)
        check_completion(Case(USER, {"max_tokens": 3}, False), out, probe_client.model_name)
