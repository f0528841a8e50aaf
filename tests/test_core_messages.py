"""``normalize_messages``: the one place OpenAI-style messages become Gemma turns (no model)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from types import MappingProxyType

import pytest

from core import normalize_messages
from core.messages import check_text, content_to_text


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def tool(call_id: str, text: str) -> dict[str, str]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def out(text: str) -> str:
    return f"```tool_output\n{text}\n```"


CALL_1 = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
CALL_2 = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}
CALLS = {"role": "assistant", "content": None, "tool_calls": [CALL_1, CALL_2]}
CALL_1_TEXT = '{"name": "f", "parameters": {"x": 1}}'
CALLS_TEXT = CALL_1_TEXT + '\n{"name": "g", "parameters": {}}'

VALID = [
    pytest.param([u("hi")], [u("hi")], id="one-user"),
    pytest.param([u("q"), a("r"), u("q2")], [u("q"), a("r"), u("q2")], id="alternating"),
    pytest.param([s("be brief"), u("hi")], [s("be brief"), u("hi")], id="system-kept"),
    pytest.param(
        [s("one"), s("two"), u("hi")], [s("one\n\ntwo"), u("hi")], id="leading-systems-merged"
    ),
    pytest.param([u("a"), u("b")], [u("a\n\nb")], id="consecutive-users-merged"),
    pytest.param(
        [u("q"), a("r1"), a("r2"), u("q2")],
        [u("q"), a("r1\n\nr2"), u("q2")],
        id="consecutive-assistants-merged",
    ),
    pytest.param(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}],
            }
        ],
        [u("x\ny")],
        id="text-parts-joined",
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "text", "text": "only"}]}],
        [u("only")],
        id="one-part",
    ),
    pytest.param(
        [{"role": "developer", "content": "dev"}, u("hi")], [s("dev"), u("hi")], id="developer"
    ),
    pytest.param(
        [s("a"), {"role": "developer", "content": "b"}, u("hi")],
        [s("a\n\nb"), u("hi")],
        id="system-and-developer-merged",
    ),
    pytest.param(
        [u("q"), CALLS, tool("c1", "r1"), tool("c2", "r2")],
        [u("q"), a(CALLS_TEXT), u(f"{out('r1')}\n\n{out('r2')}")],
        id="tool-results-answer-the-calls",
    ),
    pytest.param(
        [u("q"), CALLS, tool("c2", "r2"), u("more"), a("ok"), u("q2")],
        [u("q"), a(CALLS_TEXT), u(f"{out('r2')}\n\nmore"), a("ok"), u("q2")],
        id="one-result-then-user",
    ),
    pytest.param(
        [u("q"), {**CALLS, "tool_calls": [{**CALL_1, "id": ""}]}, tool("any", "r")],
        [u("q"), a(CALL_1_TEXT), u(out("r"))],
        id="id-less-call-matches-any-id",
    ),
    pytest.param([u("")], [u("")], id="empty-string-content"),
    pytest.param(
        [{"role": "user", "content": "hi", "name": "bob"}], [u("hi")], id="extra-keys-dropped"
    ),
    pytest.param((u("tuple"),), [u("tuple")], id="tuple-of-messages"),
    pytest.param([MappingProxyType(u("mapping"))], [u("mapping")], id="any-mapping"),
    pytest.param([OrderedDict(u("ordered"))], [u("ordered")], id="ordered-dict"),
]


@pytest.mark.parametrize(("messages", "expected"), VALID)
def test_normalize_valid(messages, expected) -> None:
    assert normalize_messages(messages) == expected


FOLDED = [
    pytest.param([s("sys"), u("hi")], [u("sys\n\nhi")], id="system-into-first-user"),
    pytest.param([s("a"), s("b"), u("hi")], [u("a\n\nb\n\nhi")], id="two-systems"),
    pytest.param(
        [s("sys"), u("q"), a("r"), u("q2")], [u("sys\n\nq"), a("r"), u("q2")], id="only-first-turn"
    ),
    pytest.param([u("hi")], [u("hi")], id="no-system-unchanged"),
    pytest.param([s("sys"), u("a"), u("b")], [u("sys\n\na\n\nb")], id="merge-then-fold"),
]


@pytest.mark.parametrize(("messages", "expected"), FOLDED)
def test_system_folding_for_templates_without_system_role(messages, expected) -> None:
    assert normalize_messages(messages, system_role=False) == expected


INVALID = [
    pytest.param([], "must not be empty", id="empty-list"),
    pytest.param("hello", "must be a list", id="a-string"),
    pytest.param(b"hello", "must be a list", id="bytes"),
    pytest.param(None, "must be a list", id="none"),
    pytest.param({"role": "user", "content": "hi"}, "must be a list", id="a-dict-not-a-list"),
    pytest.param(["hi"], r"messages\[0\] must be a dict", id="non-dict-message"),
    pytest.param([u("hi"), 42], r"messages\[1\] must be a dict", id="non-dict-later"),
    pytest.param([{"role": "tool", "content": "x"}], "role 'tool'", id="unknown-role"),
    pytest.param([{"role": "bot", "content": "x"}], "allowed roles: .*developer", id="bot-role"),
    pytest.param(
        [u("q"), a("r"), {"role": "developer", "content": "late"}, u("q2")],
        r"messages\[2\] is a system message after",
        id="developer-after-start",
    ),
    pytest.param(
        [{"role": "user", "content": ["hi"]}],
        r"content'\]\[0\] must be a text part .*got str \(write \{'type': 'text', 'text': 'hi'\}\)",
        id="bare-string-part",
    ),
    pytest.param(
        [tool("c1", "r")],
        r"messages\[0\] is a tool result .* no assistant tool call",
        id="tool-first",
    ),
    pytest.param(
        [u("q"), tool("c1", "r")],
        r"messages\[1\] is a tool result .*must follow the assistant message",
        id="tool-after-user",
    ),
    pytest.param(
        [u("q"), a("plain"), tool("c1", "r")],
        r"messages\[2\] is a tool result",
        id="tool-after-assistant-without-calls",
    ),
    pytest.param(
        [u("q"), CALLS, tool("c1", "r"), u("more"), tool("c2", "late")],
        r"messages\[4\] is a tool result",
        id="tool-after-the-user-spoke-again",
    ),
    pytest.param(
        [u("q"), CALLS, tool("c1", "r"), tool("nope", "r")],
        r"messages\[3\] has tool_call_id 'nope', which matches no call .* \['c1', 'c2'\]",
        id="tool-call-id-matches-no-call",
    ),
    pytest.param(
        [u("bad \udc80 x")],
        r"messages\[0\]\['content'\] holds a lone surrogate '\\udc80' at index 4",
        id="surrogate-in-content",
    ),
    pytest.param(
        [u("ok"), a("ok"), {"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
        r"messages\[2\]\['content'\]\[0\]\['text'\] holds a lone surrogate",
        id="surrogate-in-text-part",
    ),
    pytest.param(
        [
            u("q"),
            {
                **CALLS,
                "tool_calls": [
                    {**CALL_1, "function": {"name": "f", "arguments": '{"x": "\udc80"}'}}
                ],
            },
            tool("c1", "r"),
        ],
        r"messages\[1\]\['tool_calls'\]\[0\]\['function'\]\['arguments'\] holds a lone",
        id="surrogate-in-call-arguments",
    ),
    pytest.param(
        [u("q"), CALLS, {**tool("c1", "r"), "tool_call_id": "c\udc801"}],
        r"messages\[2\]\['tool_call_id'\] holds a lone surrogate",
        id="surrogate-in-tool-call-id",
    ),
    pytest.param([{"content": "x"}], "role None", id="missing-role"),
    pytest.param([{"role": "user"}], "has no content", id="missing-content"),
    pytest.param([{"role": "user", "content": None}], "has no content", id="none-content"),
    pytest.param([{"role": "user", "content": 5}], "string or a list", id="int-content"),
    pytest.param(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        r"messages\[0\]\['content'\]\[0\]: 'x' does not exist",
        id="image-part-missing-path",
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}],
        "'x.png' does not exist",
        id="image-part-2-missing-path",
    ),
    pytest.param(
        [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "allowed in user messages only",
        id="image-part-in-assistant",
    ),
    pytest.param(
        [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}],
        "content parts are 'text', and in user messages also 'image_url'",
        id="unknown-part",
    ),
    pytest.param([{"role": "user", "content": [42]}], "must be a text part", id="int-part"),
    pytest.param(
        [{"role": "user", "content": [{"type": "text", "text": 3}]}],
        "must be a string",
        id="bad-text",
    ),
    pytest.param([s("only system")], "only system messages", id="only-system"),
    pytest.param([a("hello")], "must start with a user", id="starts-with-assistant"),
    pytest.param(
        [s("x"), a("hello"), u("q")], "must start with a user", id="system-then-assistant"
    ),
    pytest.param([u("q"), a("r")], "must end with a user", id="ends-with-assistant"),
    pytest.param([u("q"), s("late")], "system message after", id="system-after-start"),
    pytest.param(
        [u("q"), a("r"), s("late"), u("q2")], r"messages\[2\]", id="system-mid-names-index"
    ),
]


@pytest.mark.parametrize(("messages", "match"), INVALID)
def test_normalize_invalid_raises_value_error(messages, match) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_messages(messages)


def test_caller_messages_are_not_mutated() -> None:
    parts = [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]
    messages = [s("sys"), u("a"), {"role": "user", "content": parts}, a("r"), a("r2"), u("q")]
    before = copy.deepcopy(messages)
    for system_role in (True, False):
        out = normalize_messages(messages, system_role=system_role)
        assert messages == before
        out[0]["content"] = "changed"  # the result holds new dicts, not the caller's
        assert messages == before


def test_output_is_plain_str_dicts() -> None:
    out = normalize_messages([s("x"), {"role": "user", "content": [{"type": "text", "text": "y"}]}])
    assert all(type(t) is dict and set(t) == {"role", "content"} for t in out)
    assert all(isinstance(t["content"], str) for t in out)


def test_content_to_text_names_where() -> None:
    with pytest.raises(ValueError, match=r"here\[1\]"):
        content_to_text([{"type": "text", "text": "ok"}, {"type": "audio"}], where="here")


def test_check_text_walks_keys_values_and_lists() -> None:
    check_text({"a": ["ok", ("fine", 3, None)], "b": {"c": "é 😀"}}, "x")  # valid: no error
    with pytest.raises(ValueError, match=r"x\['a'\]\[1\]\[0\] holds a lone surrogate"):
        check_text({"a": ["ok", ("\udfff",)]}, "x")
    with pytest.raises(ValueError, match=r"x key 'k\\udc80' holds a lone surrogate"):
        check_text({"k\udc80": 1}, "x")
