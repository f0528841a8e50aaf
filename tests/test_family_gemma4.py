"""The Gemma 4 family: prompt through the real template, the call grammar, the output parser.

* Prompt: :meth:`Gemma4Family.render_inputs` fed to the real Gemma 4 template
  (``core/chat_templates``), rendered both with jinja2 set up as transformers
  sets it up and through ``apply_chat_template`` of a tiny Gemma 4 tokenizer
  (the real control-token ids, ``core.tiny``), compared with the expected
  marker layout.
* Grammar: llguidance matchers over that tokenizer. Every call shape written
  canonically is accepted and parses back to the same arguments; off-format
  calls and schema violations are rejected; random walks through the grammar
  (uniform over the allowed tokens, the worst a model can do) always give
  calls that parse and validate against the tool's schema.
* Parser: it reads control tokens as the engine decodes their ids, as
  sentinels (``mark`` turns a test's marker text into them); every split of
  a canonical output into two (and many into three) chunks gives the same
  content, reasoning and calls; no control token leaks; a marker spelled in
  plain text is plain text.
* Round trip: a parsed call put back into the history renders as the same
  call text.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from core import SamplingParams
from core.constrained import ToolSpec
from core.families import Parsed, family_for
from core.families.gemma4_grammar import build_grammar
from core.families.gemma4_syntax import (
    CONTROL_TOKENS,
    SENTINELS,
    TOKEN_IDS,
    CallSyntaxError,
    Gemma4OutputParser,
    format_call,
    format_value,
    mark,
    parse_call,
    parse_value,
)

FAMILY = family_for("gemma4_text")
TEMPLATE = Path(__file__).resolve().parent.parent / "core" / "chat_templates"
Q = '<|"|>'


def tool(name: str, properties: dict[str, Any], required: list[str] | None = None, **extra: Any):
    parameters: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required is not None:
        parameters["required"] = required
    return {
        "type": "function",
        "function": {"name": name, "description": f"The {name} tool.", "parameters": parameters},
    }


WEATHER = tool(
    "get_weather",
    {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    ["city"],
)
SEARCH = tool(
    "search",
    {
        "query": {"type": "string", "minLength": 1, "maxLength": 40},
        "filters": {
            "type": "object",
            "properties": {
                "Lang": {"type": "string", "const": "en"},
                "after": {"type": ["integer", "null"]},
                "exact": {"type": "boolean"},
            },
            "required": ["exact"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "score": {"type": "number", "exclusiveMinimum": -1, "maximum": 100},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "meta": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    ["query"],
)
TREE = tool(
    "plant",
    {"root": {"$ref": "#/$defs/node"}},
    ["root"],
    **{
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["name"],
            }
        }
    },
)
NOARGS = {"type": "function", "function": {"name": "ping", "description": "Ping."}}
ALL_TOOLS = [WEATHER, SEARCH, TREE, NOARGS]

#: (tool, arguments) written canonically: every shape the grammar knows.
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("get_weather", {"city": "Tokyo"}),
    ("get_weather", {"city": "", "days": 3, "unit": "celsius"}),
    ("get_weather", {"city": 'Saint-Étienne, "FR"\n{x:1}', "unit": "fahrenheit"}),
    ("search", {"query": "a"}),
    (
        "search",
        {
            "filters": {"Lang": "en", "after": None, "exact": True},
            "limit": None,
            "meta": {"a": 1, "b_2": -3},
            "query": "gemma 4",
            "score": -0.25,
            "tags": ["x", "", "y z"],
        },
    ),
    (
        "search",
        {"filters": {"after": 2024, "exact": False}, "limit": 10, "query": "q", "score": 0.001},
    ),
    ("search", {"query": "q", "tags": [], "meta": {}}),
    ("plant", {"root": {"name": "a"}}),
    ("plant", {"root": {"kids": [{"name": "b"}, {"kids": [], "name": "c"}], "name": "a"}}),
    ("ping", {}),
]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    from core.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("gemma4_tokenizer")
    build_tokenizer(path, arch="gemma4_text")
    tok = AutoTokenizer.from_pretrained(str(path))
    for text, token_id in TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(text) == token_id
    return tok


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[106, 1, 50])


_COMPILED: dict[tuple[int, str], Any] = {}


def matcher(ll_tokenizer, grammar: str):
    """A fresh matcher (a copy of one compiled once per grammar)."""
    import llguidance

    key = (id(ll_tokenizer), grammar)
    if key not in _COMPILED:
        m = llguidance.LLMatcher(
            ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        assert not m.is_error(), m.get_error()
        _COMPILED[key] = m
    return _COMPILED[key].deep_copy()


def accepts(tokenizer, ll_tokenizer, grammar: str, text: str) -> bool:
    """Whether ``text`` (tokenized, control tokens as themselves) is a complete reply."""
    m = matcher(ll_tokenizer, grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(m.consume_token(i) for i in ids) and m.is_accepting()


def params(**options: Any) -> SamplingParams:
    return SamplingParams.build(**options)


def render(messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    """The real template, rendered with jinja2 set up as transformers sets it up."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    template = env.from_string((TEMPLATE / FAMILY.chat_template).read_text(encoding="utf-8"))
    return template.render(
        messages=messages, bos_token="<bos>", add_generation_prompt=True, **kwargs
    )


def prompt(conversation: list[dict[str, Any]], thinking: bool = False, **options: Any) -> str:
    return render(*FAMILY.render_inputs(conversation, params(**options), thinking))


def parse_all(text: str, tools: frozenset[str] | None = frozenset({"get_weather", "search"})):
    """``text`` (control tokens written as their text) parsed as the engine decodes it."""
    parser = Gemma4OutputParser(tools)
    return parser.feed(mark(text)) + parser.finish()


def summary(parsed: Parsed) -> tuple[str, str, list[tuple[int, str, Any]]]:
    return (
        parsed.content,
        parsed.reasoning,
        [(c.index, c.name, json.loads(c.arguments)) for c in parsed.calls],
    )


# -------------------------------------------------------------------- prompt

USER = {"role": "user", "content": "Weather in Tokyo?"}
ASSISTANT_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": '{"unit": "celsius", "city": "Tokyo"}',
            },
        },
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
        },
    ],
}
RESULTS = [
    {"role": "tool", "tool_call_id": "call_2", "content": "cold"},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": '{"t": 22}'}]},
]


def test_prompt_plain_and_system() -> None:
    assert prompt([USER]) == (
        "<bos><|turn>user\nWeather in Tokyo?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    for role in ("system", "developer"):
        assert prompt([{"role": role, "content": " Be brief. "}, USER]) == (
            "<bos><|turn>system\nBe brief.<turn|>\n"
            "<|turn>user\nWeather in Tokyo?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
        )


def test_prompt_thinking() -> None:
    assert prompt([{"role": "system", "content": "Be brief."}, USER], thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n"
        "<|turn>user\nWeather in Tokyo?<turn|>\n<|turn>model\n"
    )
    assert prompt([USER], thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWeather in Tokyo?<turn|>\n<|turn>model\n"
    )


def test_prompt_merges_system_and_user_turns() -> None:
    conversation = [
        {"role": "system", "content": "A."},
        {"role": "developer", "content": [{"type": "text", "text": "B."}]},
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ]
    assert prompt(conversation) == (
        "<bos><|turn>system\nA.\n\nB.<turn|>\n<|turn>user\none\n\ntwo<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_prompt_tools_are_declared_by_the_template() -> None:
    text = prompt([USER], tools=[WEATHER])
    assert text.startswith(
        '<bos><|turn>system\n<|tool>declaration:get_weather{description:<|"|>The get_weather '
        'tool.<|"|>,parameters:{properties:{city:{type:<|"|>STRING<|"|>},days:{type:<|"|>'
        'INTEGER<|"|>},unit:{enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:<|"|>STRING'
        '<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n'
    )
    assert prompt([USER], tools=[WEATHER], tool_choice="none") == prompt([USER])


def test_prompt_json_format_is_described_in_the_system_turn() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    text = prompt([USER], response_format=fmt)
    assert text.startswith("<bos><|turn>system\nYou MUST respond with JSON")
    assert '"a"' in text


def test_prompt_tool_calls_and_results() -> None:
    conversation = [
        {"role": "system", "content": "S"},
        USER,
        {**ASSISTANT_CALL, "reasoning_content": "Two cities."},
        *RESULTS,
    ]
    call_1 = format_call("get_weather", {"city": "Tokyo", "unit": "celsius"})
    call_2 = format_call("get_weather", {"city": "Oslo", "days": 2})
    assert prompt(conversation, thinking=True, tools=[WEATHER]).endswith(
        "<|turn>user\nWeather in Tokyo?<turn|>\n<|turn>model\n"
        "<|channel>thought\nTwo cities.\n<channel|>"
        f"{call_1}{call_2}"
        f"<|tool_response>response:get_weather{{value:{Q}cold{Q}}}<tool_response|>"
        f'<|tool_response>response:get_weather{{value:{Q}{{"t": 22}}{Q}}}<tool_response|>'
    )
    # Generation goes on in the same model turn: no new <|turn>model after results.
    answered = [
        *conversation,
        {"role": "assistant", "content": "Cold."},
        {"role": "user", "content": "Thanks"},
    ]
    text = prompt(answered, thinking=True, tools=[WEATHER])
    assert "Two cities." not in text  # reasoning of turns before the last user message is dropped
    assert text.endswith("<tool_response|>Cold.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n")


def test_prompt_through_apply_chat_template_no_double_bos(tokenizer) -> None:
    conversation = [{"role": "system", "content": "S"}, USER, ASSISTANT_CALL, *RESULTS]
    for thinking in (False, True):
        messages, kwargs = FAMILY.render_inputs(conversation, params(tools=[WEATHER]), thinking)
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert text == render(messages, kwargs)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids[0] == TOKEN_IDS["<bos>"] and ids.count(TOKEN_IDS["<bos>"]) == 1
        assert ids.count(TOKEN_IDS["<|tool_call>"]) == 2
        assert (TOKEN_IDS["<|think|>"] in ids) == thinking


def test_render_inputs_does_not_mutate() -> None:
    conversation = [USER, ASSISTANT_CALL, *RESULTS]
    before = copy.deepcopy(conversation)
    messages, kwargs = FAMILY.render_inputs(conversation, params(tools=[WEATHER]), False)
    assert conversation == before
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {
        "unit": "celsius",
        "city": "Tokyo",
    }
    assert [m.get("name") for m in messages[2:]] == ["get_weather", "get_weather"]
    assert kwargs["enable_thinking"] is False
    assert kwargs["tools"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize(
    ("conversation", "error"),
    [
        ([], "must not be empty"),
        ("hi", "must be a list"),
        ([{"role": "robot", "content": "x"}], "allowed roles"),
        ([USER, {"role": "system", "content": "late"}], "only at the start"),
        ([{"role": "system", "content": "s"}], "no user message"),
        ([USER, {"role": "assistant", "content": "a"}], "must end with a user message or tool"),
        (
            [USER, {"role": "tool", "tool_call_id": "x", "content": "r"}],
            "made no call with that id",
        ),
        (
            [USER, ASSISTANT_CALL, {"role": "tool", "tool_call_id": "nope", "content": "r"}],
            "'nope'",
        ),
        ([USER, ASSISTANT_CALL, {"role": "tool", "content": "r"}], "no 'tool_call_id'"),
        (
            [
                USER,
                ASSISTANT_CALL,
                RESULTS[0],
                {"role": "user", "content": "u"},
                {"role": "tool", "tool_call_id": "call_1", "content": "late"},
            ],
            "made no call with that id",
        ),
        ([USER, {"role": "assistant", "content": None}], "has no content"),
        (
            [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}],
                },
            ],
            "not valid JSON",
        ),
        (
            [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                },
            ],
            "must be a JSON object",
        ),
        ([USER, {"role": "assistant", "tool_calls": "f()"}], "must be a list of tool calls"),
        ([{"role": "user", "content": [{"type": "image"}]}], "has type 'image' but no 'image'"),
        (
            [{"role": "system", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "allowed in user messages only",
        ),
    ],
)
def test_render_inputs_rejects(conversation: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        FAMILY.render_inputs(conversation, params(), False)


# ------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"a": 1, "B": -2.5, "c": True, "d": False, "e": None},
        {"s": "", "t": 'quote " and , : { } [ ] < newline\n'},
        {"nested": {"deeper": {"list": [1, [2, [3]], {"k": "v"}]}}},
        {"num": 1e-05, "big": 12345678901234567890, "zero": 0},
        [],
        "text",
    ],
)
def test_value_round_trip(value: Any) -> None:
    assert parse_value(format_value(value)) == value


def test_format_value_sorts_keys_like_dictsort() -> None:
    assert format_value({"b": 1, "A": 2, "a": 3}) == "{A:2,a:3,b:1}"


@pytest.mark.parametrize(
    "text",
    [
        'call:f{a:"x"}',
        "call:f{a=1}",
        "call:f(a=1)",
        "call:f{a:1",
        "call:f{a:1,}",
        f"call:f{{a:{Q}x}}",
        "f{a:1}",
        "call:{a:1}",
        "call:f{a:1}x",
        "call:f{:1}",
        "call:f{a:nope}",
    ],
)
def test_parse_call_rejects(text: str) -> None:
    with pytest.raises(CallSyntaxError):
        parse_call(text)


def test_parse_call_is_lenient_with_spaces_and_quoted_keys() -> None:
    assert parse_call(f"call:f{{ a : 1 , {Q}b{Q}:[ 2 , 3 ] }}") == ("f", {"a": 1, "b": [2, 3]})


# -------------------------------------------------------------------- parser

REPLIES = [
    "Just an answer, with a < sign and <b>html</b> and <|not a marker>.",
    "<|channel>thought\nLet me think <a bit>.\n<channel|>The answer is 4.",
    "<|channel>thought\n<channel|>Empty thought.",
    "<|channel>no label here<channel|>Answer",
    format_call("get_weather", {"city": "Tokyo", "days": 3}),
    "<|channel>thought\nTwo calls.<channel|>"
    + format_call("get_weather", {"city": "Tok<yo>", "unit": "celsius"})
    + format_call("search", {"query": "a, b: {c}", "tags": ["x"], "filters": {"exact": True}})
    + "<|tool_response>",
    'Hi<turn|><eos><|turn><|think|><|"|><tool_response|><|image|>!',
]


@pytest.mark.parametrize("reply", REPLIES)
def test_parser_every_split_gives_the_same_result(reply: str) -> None:
    whole = summary(parse_all(reply))
    for control in (*CONTROL_TOKENS, *SENTINELS.values()):
        assert control not in whole[0] and control not in whole[1]
    reply = mark(reply)
    for cut in range(len(reply) + 1):
        parser = Gemma4OutputParser(frozenset({"get_weather", "search"}))
        got = parser.feed(reply[:cut]) + parser.feed(reply[cut:]) + parser.finish()
        assert summary(got) == whole, cut
    rng = random.Random(0)
    for _ in range(50):
        a, b = sorted(rng.sample(range(len(reply) + 1), 2))
        parser = Gemma4OutputParser(frozenset({"get_weather", "search"}))
        got = parser.feed(reply[:a]) + parser.feed(reply[a:b]) + parser.feed(reply[b:])
        assert summary(got + parser.finish()) == whole
    parser = Gemma4OutputParser(frozenset({"get_weather", "search"}))
    pieces = [parser.feed(ch) for ch in reply]
    assert summary(sum(pieces, Parsed()) + parser.finish()) == whole


def test_parser_results() -> None:
    assert summary(parse_all(REPLIES[0])) == (REPLIES[0], "", [])
    assert summary(parse_all(REPLIES[1])) == ("The answer is 4.", "Let me think <a bit>.\n", [])
    assert summary(parse_all(REPLIES[2])) == ("Empty thought.", "", [])
    assert summary(parse_all(REPLIES[3])) == ("Answer", "no label here", [])
    assert summary(parse_all(REPLIES[5])) == (
        "",
        "Two calls.",
        [
            (0, "get_weather", {"city": "Tok<yo>", "unit": "celsius"}),
            (1, "search", {"filters": {"exact": True}, "query": "a, b: {c}", "tags": ["x"]}),
        ],
    )
    assert summary(parse_all(REPLIES[6])) == ("Hi!", "", [])


def test_parser_reads_sentinels_and_passes_spelled_markers_as_text() -> None:
    open_, close = SENTINELS["<|channel>"], SENTINELS["<channel|>"]
    parser = Gemma4OutputParser(None)
    assert parser.feed("Hello <|chan") == Parsed("Hello <|chan")  # nothing held back
    assert parser.feed(f"nel> and <mask> {open_}thou") == Parsed("nel> and <mask> ")
    assert parser.feed("ght\nhm <channel|>") == Parsed(reasoning="hm <channel|>")
    assert parser.feed(f"{close}Yes <|tool_call>call:f{{}}<tool_call|>") == Parsed(
        "Yes <|tool_call>call:f{}<tool_call|>"
    )
    assert parser.finish() == Parsed()
    # a spelled <|"|> inside a call's string is part of the string
    parser = Gemma4OutputParser(frozenset({"get_weather"}))
    q = SENTINELS[Q]
    text = mark("<|tool_call>call:get_weather{city:") + f'{q}a<|"|>b{q}}}' + mark("<tool_call|>")
    [got] = (parser.feed(text) + parser.finish()).calls
    assert json.loads(got.arguments) == {"city": 'a<|"|>b'}


def test_parser_partial_call_is_the_text_the_model_wrote() -> None:
    parser = Gemma4OutputParser(frozenset({"get_weather"}))
    parser.feed(mark('<|tool_call>call:get_weather{city:<|"|>Tok'))
    assert parser.calling and parser.partial_call == 'call:get_weather{city:<|"|>Tok'


def test_parser_says_when_the_thinking_channel_is_open() -> None:
    tokens = ["<|channel>", "thought", "\n", "Hm", "<channel|>", "Yes", "<|tool_call>"]
    parser = Gemma4OutputParser(None)
    counted = 0
    for token in tokens:
        before = parser.in_reasoning
        parser.feed(mark(token))
        counted += before or parser.in_reasoning
    assert counted == 5  # the channel's markers, its label and its text
    assert not parser.in_reasoning


def test_parser_call_cut_short_is_not_reported() -> None:
    parser = Gemma4OutputParser(frozenset({"get_weather"}))
    assert parser.feed(mark('<|tool_call>call:get_weather{city:<|"|>Tok')) == Parsed()
    assert parser.finish() == Parsed()


def test_parser_reports_calls_as_they_close() -> None:
    parser = Gemma4OutputParser(frozenset({"get_weather"}))
    first = parser.feed(mark(format_call("get_weather", {"city": "A"}) + "<|tool_call>call:get_"))
    assert [json.loads(c.arguments) for c in first.calls] == [{"city": "A"}]
    second = parser.feed(mark('weather{city:<|"|>B<|"|>}<tool_call|>'))
    assert [(c.index, json.loads(c.arguments)) for c in second.calls] == [(1, {"city": "B"})]
    assert first.calls[0].id != second.calls[0].id
    assert first.calls[0].id.startswith("call_")


def test_parser_drops_calls_it_may_not_report(caplog: pytest.LogCaptureFixture) -> None:
    call = format_call("get_weather", {"city": "A"})
    assert parse_all(call, None) == Parsed()  # tool_choice "none"
    assert parse_all(call, frozenset({"search"})) == Parsed()  # unknown tool
    assert parse_all("<|tool_call>call:get_weather(city='A')<tool_call|>ok") == Parsed("ok")
    assert "does not parse" in caplog.text


def test_output_parser_of_the_family_knows_the_allowed_tools() -> None:
    call = mark(format_call("search", {"query": "q"}) + format_call("get_weather", {"city": "A"}))
    both = FAMILY.output_parser(params(tools=[WEATHER, SEARCH]), False)
    assert [c.name for c in (both.feed(call) + both.finish()).calls] == ["search", "get_weather"]
    named = {"type": "function", "function": {"name": "search"}}
    one = FAMILY.output_parser(params(tools=[WEATHER, SEARCH], tool_choice=named), False)
    assert [c.name for c in (one.feed(call) + one.finish()).calls] == ["search"]
    none = FAMILY.output_parser(params(tools=[WEATHER], tool_choice="none"), True)
    assert none.feed(call) + none.finish() == Parsed()


# ------------------------------------------------------------------- grammar


def grammar(thinking: bool = False, **options: Any) -> str:
    result = FAMILY.grammar(params(**options), thinking)
    assert result is not None
    return result


def test_no_grammar_without_tools_or_json() -> None:
    assert FAMILY.grammar(params(), True) is None
    assert FAMILY.grammar(params(tools=[WEATHER], tool_choice="none"), True) is None
    assert not FAMILY.free_prose(params(tools=[WEATHER]), False)


@pytest.mark.parametrize(("name", "arguments"), CALLS)
def test_every_call_shape_is_accepted_and_parsed_back(
    tokenizer, ll_tokenizer, name: str, arguments: dict[str, Any]
) -> None:
    text = format_call(name, arguments)
    g = grammar(tools=ALL_TOOLS)
    assert accepts(tokenizer, ll_tokenizer, g, text), text
    assert accepts(tokenizer, ll_tokenizer, grammar(True, tools=ALL_TOOLS), text)
    calls = parse_all(text, frozenset({name})).calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(name, arguments)]
    schema = next(t for t in ALL_TOOLS if t["function"]["name"] == name)["function"]
    jsonschema.validate(json.loads(calls[0].arguments), schema.get("parameters", {}))


WEATHER_CALL = format_call("get_weather", {"city": "Tokyo", "days": 3})


@pytest.mark.parametrize(
    "text",
    [
        'call:get_weather{city:"Tokyo",days:3}',  # quotes instead of <|"|>
        '<|tool_call>call:get_weather{city:"Tokyo",days:3}<tool_call|>',
        f"<|tool_call>call:get_weather{{city={Q}Tokyo{Q},days=3}}<tool_call|>",  # key=value
        f"<|tool_call>call:get_weather(city={Q}Tokyo{Q},days=3)<tool_call|>",  # parentheses
        f"<|tool_call>call:get_weather{{city: {Q}Tokyo{Q}, days: 3}}<tool_call|>",  # spaces
        f"<|tool_call>call:get_weather{{days:3,city:{Q}Tokyo{Q}}}<tool_call|>",  # key order
        '<|tool_call>{"name": "get_weather", "parameters": {"city": "Tokyo"}}<tool_call|>',
        f"<|tool_call>call:get_weather{{{Q}city{Q}:{Q}Tokyo{Q}}}<tool_call|>",  # quoted key
        "<|tool_call>call:get_weather{days:3}<tool_call|>",  # required key missing
        f"<|tool_call>call:get_weather{{city:{Q}A{Q},country:{Q}JP{Q}}}<tool_call|>",  # extra key
        f"<|tool_call>call:get_weather{{city:{Q}A{Q},days:0}}<tool_call|>",  # below minimum
        f"<|tool_call>call:get_weather{{city:{Q}A{Q},days:8}}<tool_call|>",  # above maximum
        f"<|tool_call>call:get_weather{{city:{Q}A{Q},days:2.5}}<tool_call|>",  # not an integer
        f"<|tool_call>call:get_weather{{city:{Q}A{Q},days:{Q}3{Q}}}<tool_call|>",  # string for int
        f"<|tool_call>call:get_weather{{city:{Q}A{Q},unit:{Q}kelvin{Q}}}<tool_call|>",  # enum
        "<|tool_call>call:get_weather{city:3}<tool_call|>",  # int for string
        f"<|tool_call>call:get_time{{city:{Q}A{Q}}}<tool_call|>",  # unknown tool
        f"<|tool_call>call:get_weather{{city:{Q}A{Q}}}",  # not closed
        f"Sure! {WEATHER_CALL}",  # prose, then a call
        f"<|channel>thought\nhm<channel|>{WEATHER_CALL}",  # thinking is off
    ],
)
def test_off_format_and_invalid_calls_are_rejected(tokenizer, ll_tokenizer, text: str) -> None:
    required = grammar(tools=[WEATHER], tool_choice="required")
    assert not accepts(tokenizer, ll_tokenizer, required, text)
    # Under "auto" text without control tokens is prose; anything with them is checked.
    auto_ok = "<|" not in text
    assert accepts(tokenizer, ll_tokenizer, grammar(tools=[WEATHER]), text) == auto_ok


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("search", f"{{query:{Q}{Q}}}"),  # minLength 1
        ("search", f"{{query:{Q}{'x' * 41}{Q}}}"),  # maxLength 40
        ("search", f"{{filters:{{Lang:{Q}fr{Q},exact:true}},query:{Q}q{Q}}}"),  # const
        ("search", f"{{filters:{{after:1}},query:{Q}q{Q}}}"),  # nested required
        ("search", f"{{filters:{{after:{Q}x{Q},exact:true}},query:{Q}q{Q}}}"),  # type list
        ("search", f"{{query:{Q}q{Q},tags:[{Q}a{Q},{Q}b{Q},{Q}c{Q},{Q}d{Q}]}}"),  # maxItems
        ("search", f"{{query:{Q}q{Q},tags:[1]}}"),  # items
        ("search", f"{{meta:{{a:{Q}x{Q}}},query:{Q}q{Q}}}"),  # additionalProperties schema
        ("search", f"{{limit:1.5,query:{Q}q{Q}}}"),  # anyOf
        ("search", f"{{query:{Q}q{Q},score:-1}}"),  # exclusiveMinimum
        ("search", f"{{query:{Q}q{Q},score:100.5}}"),  # maximum
        ("plant", f"{{root:{{kids:[{{kids:[]}}],name:{Q}a{Q}}}}}"),  # $ref: name required
        ("ping", f"{{x:{Q}y{Q}}}"),  # no parameters
    ],
)
def test_schema_violations_are_rejected(tokenizer, ll_tokenizer, name: str, bad: str) -> None:
    text = f"<|tool_call>call:{name}{bad}<tool_call|>"
    assert not accepts(tokenizer, ll_tokenizer, grammar(tools=ALL_TOOLS), text)


def test_nullable_and_free_values(tokenizer, ll_tokenizer) -> None:
    note = tool(
        "note",
        {"text": {"type": "string", "nullable": True}, "extra": {}, "blob": {"type": "object"}},
        ["text"],
    )
    g = grammar(tools=[note], tool_choice="required")
    ok = lambda t: accepts(tokenizer, ll_tokenizer, g, t)  # noqa: E731
    assert ok("<|tool_call>call:note{text:null}<tool_call|>")
    assert ok(
        format_call("note", {"text": "a", "extra": [1, {"k": None}], "blob": {"z": "y", "a": 1}})
    )
    assert not ok("<|tool_call>call:note{text:1}<tool_call|>")
    assert not ok(f"<|tool_call>call:note{{blob:[],text:{Q}a{Q}}}<tool_call|>")


def test_tool_choice_and_parallel_calls(tokenizer, ll_tokenizer) -> None:
    search = format_call("search", {"query": "q"})
    prose = "It is sunny."
    ok = lambda g, t: accepts(tokenizer, ll_tokenizer, g, t)  # noqa: E731
    auto = grammar(tools=[WEATHER, SEARCH])
    assert ok(auto, prose) and ok(auto, WEATHER_CALL) and ok(auto, WEATHER_CALL + search)
    assert ok(auto, "")
    required = grammar(tools=[WEATHER, SEARCH], tool_choice="required")
    assert not ok(required, prose) and not ok(required, "")
    assert ok(required, WEATHER_CALL + search + WEATHER_CALL)
    single = grammar(tools=[WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=False)
    assert ok(single, search) and not ok(single, WEATHER_CALL + search)
    named = grammar(
        tools=[WEATHER, SEARCH], tool_choice={"type": "function", "function": {"name": "search"}}
    )
    assert ok(named, search) and not ok(named, WEATHER_CALL) and not ok(named, search + search)


def test_thinking_channel_before_the_answer(tokenizer, ll_tokenizer) -> None:
    ok = lambda g, t: accepts(tokenizer, ll_tokenizer, g, t)  # noqa: E731
    thought = "<|channel>thought\nFirst, the city.\n<channel|>"
    g = grammar(True, tools=[WEATHER], tool_choice="required")
    assert ok(g, thought + WEATHER_CALL) and ok(g, WEATHER_CALL)
    assert not ok(g, thought) and not ok(g, thought + thought + WEATHER_CALL)
    assert not ok(g, "<|channel>musing\nx<channel|>" + WEATHER_CALL)
    auto = grammar(True, tools=[WEATHER])
    assert ok(auto, thought + "Sunny.") and ok(auto, "<|channel>thought\n<channel|>Sunny.")
    assert not ok(auto, "Sunny." + thought)


def test_json_response_format(tokenizer, ll_tokenizer) -> None:
    ok = lambda g, t: accepts(tokenizer, ll_tokenizer, g, t)  # noqa: E731
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    for thinking in (False, True):
        g = grammar(thinking, response_format=fmt)
        assert ok(g, '{"a": 1}') and not ok(g, '{"a": "1"}') and not ok(g, "a: 1")
        assert not ok(g, '{"a": 1, "b": 2}')
        assert ok(g, "<|channel>thought\nx<channel|>" + '{"a": 1}') == thinking
    g = grammar(response_format={"type": "json_object"})
    assert ok(g, '{"b": [true, null]}') and not ok(g, "[1]")
    assert ok(
        grammar(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"}), "{}"
    )


@pytest.mark.parametrize(
    ("schema", "error"),
    [
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}, "pattern"),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "date"}}}, "format"),
        ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}, "oneOf"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "object", "properties": {"a": {"$ref": "https://x/y"}}}, "only local"),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
            "names no definition",
        ),
        (
            {"type": "object", "properties": {"a b": {"type": "string"}}},
            "cannot be written unquoted",
        ),
        (
            {"type": "object", "properties": {"a": {}}, "required": ["b"]},
            r"\['b'\] are not in properties",
        ),
        ({"type": "object", "properties": {"a": {"allOf": [{}, {}]}}}, "exactly one schema"),
        ({"type": "object", "properties": {"a": {"enum": ["x"], "type": "integer"}}}, "matches"),
    ],
)
def test_unsupported_schemas_fail_at_build_time(schema: dict[str, Any], error: str) -> None:
    # Built around SamplingParams.build: core.constrained refuses some of these already.
    spec = ToolSpec("f", None, json.dumps(schema))
    with pytest.raises(ValueError, match=f"tools \\(f\\) parameters.*{error}"):
        build_grammar((spec,), "auto", None, True, None, False)
    p = dataclasses.replace(params(tools=[WEATHER]), tools=(spec,))
    with pytest.raises(ValueError, match="Gemma 4 tool calls support these JSON schema keywords"):
        FAMILY.check(p, False)


def test_check_accepts_every_supported_shape() -> None:
    for thinking in (False, True):
        FAMILY.check(params(tools=ALL_TOOLS), thinking)
        FAMILY.check(params(response_format={"type": "json_object"}), thinking)
        FAMILY.check(params(), thinking)
    assert build_grammar.cache_info().hits > 0


def _random_reply(
    ll_tokenizer, tokenizer, g: str, rng: random.Random, limit: int = 300
) -> str | None:
    """A reply sampled uniformly from the tokens the grammar allows (None: too long)."""
    import numpy as np

    m = matcher(ll_tokenizer, g)
    ids: list[int] = []
    vocab = len(tokenizer)
    ends = np.isin(np.arange(vocab), [1, 50, 106])
    control = np.isin(np.arange(vocab), [48, 49, 52, 100, 101])
    punctuation = np.isin(
        np.arange(vocab), tokenizer.convert_tokens_to_ids([",", "}", "]", "{", "["])
    )
    for _ in range(limit):
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = bits[:vocab].astype(bool)
        if (allowed & ends).any() and (not (allowed & ~ends).any() or rng.random() < 0.15):
            return tokenizer.decode(ids, skip_special_tokens=False)
        choices = allowed & ~ends
        # Favour control tokens and punctuation over free text, so that
        # strings and calls end within the limit.
        pick = rng.random()
        if (choices & control).any() and pick < 0.3:
            choices &= control
        elif (choices & punctuation).any() and pick < 0.6:
            choices &= punctuation
        token = int(rng.choice(np.flatnonzero(choices)))
        assert m.consume_token(token)
        ids.append(token)
    return None


def test_random_walks_through_the_grammar_always_parse_and_validate(
    tokenizer, ll_tokenizer
) -> None:
    rng = random.Random(1234)
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in ALL_TOOLS}
    finished = calls = prose = thoughts = 0
    for thinking, choice in (
        (False, "required"),
        (True, "required"),
        (True, "auto"),
        (False, "auto"),
    ):
        g = grammar(thinking, tools=ALL_TOOLS, tool_choice=choice)
        for _ in range(25):
            reply = _random_reply(ll_tokenizer, tokenizer, g, rng)
            if reply is None:
                continue
            finished += 1
            parsed = parse_all(reply, frozenset(schemas))
            for control in CONTROL_TOKENS:
                assert control not in parsed.content and control not in parsed.reasoning
            if "<|tool_call>" in reply:
                assert parsed.calls and not parsed.content, reply
                assert len(parsed.calls) == reply.count("<|tool_call>")
            else:
                assert choice == "auto"
                prose += 1
            thoughts += "<|channel>" in reply
            assert ("<|channel>" in reply) <= thinking
            for call in parsed.calls:
                calls += 1
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
                # The canonical text of what was parsed is in the language too.
                canonical = format_call(call.name, json.loads(call.arguments))
                assert accepts(tokenizer, ll_tokenizer, g, canonical), canonical
    print(f"{finished} replies, {calls} calls, {prose} prose, {thoughts} thoughts")
    assert finished >= 40 and calls >= 20 and prose >= 3 and thoughts >= 3


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(("name", "arguments"), [c for c in CALLS if "None" not in repr(c[1])])
def test_parsed_call_renders_back_as_the_same_text(name: str, arguments: dict[str, Any]) -> None:
    text = format_call(name, arguments)
    call = parse_all(text, frozenset({name})).calls[0]
    conversation = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": call.id, "content": "done"},
    ]
    rendered = prompt(conversation, tools=ALL_TOOLS)
    assert f"<|turn>model\n{text}<|tool_response>response:{name}{{value:{Q}done{Q}}}" in rendered
