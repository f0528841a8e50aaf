"""Tool calling under constrained decoding, on both backends (tiny random-weight Gemma 3).

A random model follows no prompt, so every guarantee here comes from the
grammar: under sampling (several seeds, temperature 1.0) and greedy decoding,
every reported call parses, names a real tool and has arguments that validate
(``jsonschema``) against the tool's parameters; ``tool_choice`` is respected.
Tools use enums, booleans and bounded integers so that calls finish well
within ``max_tokens``; the free-string case is checked separately. The fast
tier at the top checks validation, the grammar, the prompt and the parser
without a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import make_client
from test_core_support import END_OF_TURN, USER, ScriptedClient

from core import SamplingParams
from core.constrained import ToolCallParser, format_call, grammar_for, system_instructions

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Set an alarm.",
        "parameters": {
            "type": "object",
            "properties": {
                "time": {
                    "type": "object",
                    "properties": {
                        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                        "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                    },
                    "required": ["hour", "minute"],
                },
                "days": {
                    "type": "array",
                    "items": {"enum": ["mon", "tue", "wed"]},
                    "maxItems": 2,
                },
                "loud": {"type": "boolean"},
            },
            "required": ["time", "loud"],
        },
    },
}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters at all
TOOLS = [WEATHER, ALARM, PING]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {}) for t in TOOLS}
SEEDS = (0, 1, 2, 3)
SAMPLING = [pytest.param({"temperature": 1.0, "seed": s}, id=f"seed{s}") for s in SEEDS] + [
    pytest.param({"temperature": 0}, id="greedy")
]
ASK = [{"role": "user", "content": "What is the weather in Paris for three days?"}]


def check_calls(choice: dict[str, Any], schemas: dict[str, Any] = SCHEMAS) -> list[dict]:
    """Every call parses, names a real tool and validates; returns the calls."""
    message = choice["message"]
    calls = message.get("tool_calls") or []
    for call in calls:
        assert set(call) == {"id", "type", "function"}
        assert call["id"].startswith("call_") and len(call["id"]) == len("call_") + 24
        assert call["type"] == "function"
        assert call["function"]["name"] in schemas
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, schemas[call["function"]["name"]])
    if calls:
        assert message["content"] is None
        assert choice["finish_reason"] in ("tool_calls", "length")
    return calls


def newline_bias(client) -> dict[int, float]:
    """Push the model to start another call whenever the grammar allows one."""
    ids = client.tokenizer.convert_tokens_to_ids(["\n", "<0x0A>"])
    return {i: 100.0 for i in ids if i is not None}


# ------------------------------------------------------------- fast tier: validation


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tools": "get_weather"}, "tools must be a list"),
        ({"tools": [{"name": "x"}]}, "only function tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tool name"),
        ({"tools": [PING, PING]}, "used twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "must be a JSON schema object",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "must describe an object",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"x": {"type": "strin"}},
                            },
                        },
                    }
                ]
            },
            r"tools\[0\] \(f\) parameters .*Invalid type: strin",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"x": {"not": {}}}},
                        },
                    }
                ]
            },
            "Unimplemented keys",
        ),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be one of"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "unknown tool 'nope'; the tools are: 'get_weather', 'set_alarm', 'ping'",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice must be one of"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls must be"),
        (
            {"tools": TOOLS, "response_format": {"type": "json_object"}},
            "cannot both apply",
        ),
    ],
)
def test_bad_tool_options_raise_value_error_naming_the_problem(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams.build(**options)


def test_bad_tool_options_fail_before_any_load(gemma3_path: Path) -> None:
    client = make_client("transformers", gemma3_path)
    bad = {"type": "function", "function": {"name": "unknown"}}
    with pytest.raises(ValueError, match="unknown tool"):
        client.create(USER, tools=TOOLS, tool_choice=bad)
    broken = {"type": "object", "properties": {"x": {"type": 1}}}
    with pytest.raises(ValueError, match=r"tools\[0\] \(f\) parameters"):
        client.create(USER, tools=[{**PING, "function": {"name": "f", "parameters": broken}}])
    assert not client.is_loaded


def test_a_backend_that_cannot_constrain_refuses_tools_before_loading(gemma3_path: Path) -> None:
    client = ScriptedClient(gemma3_path)
    with pytest.raises(NotImplementedError, match="cannot constrain decoding"):
        client.create(USER, tools=TOOLS)
    with pytest.raises(NotImplementedError, match="cannot constrain decoding"):
        client.create(USER, response_format={"type": "json_object"})
    assert not client.is_loaded
    client.create(USER, tools=TOOLS, tool_choice="none")  # nothing to constrain: fine


class ConstrainingScript(ScriptedClient):
    """The scripted fake, declared able to constrain: its script must obey the grammar."""

    supports_constraints = True


def test_scripted_calls_stream_and_finish_through_the_sink(gemma3_path: Path) -> None:
    client = ConstrainingScript(gemma3_path).load()
    text = format_call("ping", {}) + "\n" + format_call("get_weather", {"city": "Oslo", "days": 2})
    ids = client.tokenizer.encode(text, add_special_tokens=False)
    client.enqueue([*ids, END_OF_TURN])
    params = SamplingParams.build(tools=TOOLS, max_tokens=500)
    deltas = list(client.stream_deltas([USER], params))
    assert [d.text for d in deltas] == [""] * len(deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [
        ("ping", "{}"),
        ("get_weather", '{"city": "Oslo", "days": 2}'),
    ]
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas[-1].completion_tokens == len(ids) + 1
    assert client.history[-1][0][0].text.count("You have access to functions") == 1
    client.enqueue([*client.tokenizer.encode("Hi {there}", add_special_tokens=False), END_OF_TURN])
    out = client.create(USER, tools=TOOLS)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hi {there}"}
    assert out["choices"][0]["finish_reason"] == "stop"
    client.close()


def test_params_record_tools_hashably_and_inherit_choices() -> None:
    params = SamplingParams.build(tools=TOOLS)
    assert params.tool_choice == "auto" and params.tool_choice_name is None
    assert params.parallel_tool_calls is True and params.constrained
    assert [t.name for t in params.tools] == ["get_weather", "set_alarm", "ping"]
    assert params.tools[2].schema() == {"type": "object", "properties": {}}
    assert hash(params) == hash(SamplingParams.build(tools=TOOLS))
    named = SamplingParams.build(
        tool_choice={"type": "function", "function": {"name": "ping"}}, defaults=params
    )
    assert (named.tool_choice, named.tool_choice_name) == ("required", "ping")
    assert SamplingParams.build(temperature=0, defaults=named).tool_choice_name == "ping"
    none = SamplingParams.build(tools=TOOLS, tool_choice="none")
    assert not none.constrained and grammar_for(none) is None
    assert not SamplingParams.build().constrained


def test_grammar_shapes_follow_tool_choice() -> None:
    auto = grammar_for(SamplingParams.build(tools=TOOLS))
    assert auto is not None and "start: (TEXT | calls)?" in auto
    assert 'calls: call ("\\n" call)*' in auto
    required = grammar_for(SamplingParams.build(tools=TOOLS, tool_choice="required"))
    assert required is not None and "start: calls" in required and "TEXT" not in required
    single = grammar_for(
        SamplingParams.build(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    )
    assert single is not None and "calls: call\n" in single
    named = grammar_for(
        SamplingParams.build(
            tools=TOOLS, tool_choice={"type": "function", "function": {"name": "set_alarm"}}
        )
    )
    assert named is not None and "set_alarm" in named and "get_weather" not in named


def test_tool_prompt_follows_googles_json_function_calling_format() -> None:
    text = system_instructions(SamplingParams.build(tools=TOOLS))
    assert text is not None
    assert text.startswith(
        "You have access to functions. If you decide to invoke any of the function(s), "
        "you MUST put it in the format of\n"
        '{"name": function name, "parameters": dictionary of argument name and its value}\n'
    )
    assert "You SHOULD NOT include any other text in the response if you call a function" in text
    definitions = json.loads(text[text.index("\n[") :])
    assert [d["name"] for d in definitions] == ["get_weather", "set_alarm", "ping"]
    assert definitions[0]["parameters"] == WEATHER["function"]["parameters"]
    named = system_instructions(
        SamplingParams.build(
            tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}}
        )
    )
    assert named is not None and "You MUST invoke the function ping" in named
    assert system_instructions(SamplingParams.build(tools=TOOLS, tool_choice="none")) is None


def test_parser_reports_each_call_once_across_any_split() -> None:
    text = format_call("get_weather", {"city": "Rome", "days": 2}) + "\n" + format_call("ping", {})
    for cut in range(1, len(text)):
        parser = ToolCallParser("calls", frozenset({"get_weather", "ping"}))
        emitted, first = parser.feed(text[:cut])
        emitted2, second = parser.feed(text[cut:])
        assert emitted == emitted2 == ""
        calls = first + second
        assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
            (0, "get_weather", {"city": "Rome", "days": 2}),
            (1, "ping", {}),
        ]


def test_parser_auto_mode_decides_at_the_first_character() -> None:
    prose = ToolCallParser("auto", frozenset({"ping"}))
    assert prose.feed("") == ("", ())
    assert prose.feed("Hello {") == ("Hello {", ())
    assert prose.feed(' "name"') == (' "name"', ()) and not prose.calling
    call = ToolCallParser("auto", frozenset({"ping"}))
    assert call.feed('{"name": "ping", ') == ("", ()) and call.calling
    _, done = call.feed('"parameters": {}}')
    assert [c.name for c in done] == ["ping"]


def test_auto_rows_are_freed_once_the_reply_is_prose(tf_client) -> None:
    import torch

    from core.constrained import GrammarMatchers, TorchGrammarMask

    params = SamplingParams.build(tools=TOOLS)
    tok = tf_client.load().tokenizer
    lltok = tf_client._worker.call(lambda: tf_client._grammar_matchers(params, 1)).tokenizer
    grammar = grammar_for(params)
    assert grammar is not None
    matchers = GrammarMatchers(lltok, grammar, 2, free_prose=True)
    hello = tok.encode("Hello", add_special_tokens=False)
    brace = tok.encode('{"', add_special_tokens=False)
    matchers.advance(0, hello[0])
    matchers.advance(1, brace[0])
    assert matchers.retired == [True, False]  # row 1 writes a call: still constrained
    mask = TorchGrammarMask(matchers)
    scores = torch.zeros(2, len(tok))
    out = mask(None, scores)
    assert torch.equal(out[0], scores[0]) and (out[1] < -1e30).sum() > 0
    matchers.retire(1)
    assert mask(None, scores) is scores  # nothing left to constrain: logits untouched


def test_parser_drops_a_call_cut_short() -> None:
    parser = ToolCallParser("calls", frozenset({"ping"}))
    _, calls = parser.feed(format_call("ping", {}) + '\n{"name": "ping", "param')
    assert len(calls) == 1 and len(parser.calls) == 1


# ------------------------------------------------------------------ messages in


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Rome","days":1}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
]


def test_tool_history_renders_into_alternating_gemma_turns(client) -> None:
    prompt = client.format_prompt(HISTORY, tools=TOOLS)
    calls = (
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}\n'
        '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}'
    )
    results = "```tool_output\nsunny\n```\n\n```tool_output\nrain\n```"
    instructions = system_instructions(SamplingParams.build(tools=TOOLS))
    assert prompt.text == (
        "<bos><start_of_turn>user\n"
        f"Be brief.\n\n{instructions}\n\nWeather in Paris and Rome?<end_of_turn>\n"
        f"<start_of_turn>model\n{calls}<end_of_turn>\n"
        f"<start_of_turn>user\n{results}<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    plain = client.format_prompt(HISTORY, tools=TOOLS, tool_choice="none").text
    assert "You have access to functions" not in plain and calls in plain and results in plain


def test_tool_prompt_is_folded_for_gemma2_and_generation_works(gemma2_path: Path) -> None:
    for backend in ("transformers", "mlx"):
        client = make_client(backend, gemma2_path)
        try:
            text = client.format_prompt(USER, tools=TOOLS).text
            assert text.startswith("<bos><start_of_turn>user\nYou have access to functions.")
            assert text.count("<start_of_turn>user") == 1
            out = client.create(
                ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=0, max_tokens=150
            )
            assert check_calls(out["choices"][0])
        finally:
            client.close()


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "tool", "content": "x"}], "role 'tool' but no 'tool_call_id'"),
        ([*USER, {"role": "assistant", "content": None}, *USER], "has no content"),
        (
            [*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, *USER],
            r"tool_calls'\]\[0\] must be",
        ),
        (
            [
                *USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                },
                *USER,
            ],
            "arguments are not valid JSON",
        ),
        (
            [
                *USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                },
                *USER,
            ],
            "must be a JSON object",
        ),
    ],
)
def test_bad_tool_messages_raise(messages, match) -> None:
    from core import normalize_messages

    with pytest.raises(ValueError, match=match):
        normalize_messages(messages)


# ------------------------------------------------------------- generation: calls


@pytest.mark.parametrize("sampling", SAMPLING)
def test_required_calls_parse_name_real_tools_and_validate(client, sampling) -> None:
    out = client.create(ASK, tools=TOOLS, tool_choice="required", max_tokens=200, **sampling)
    [choice] = out["choices"]
    assert len(check_calls(choice)) >= 1
    assert out["usage"]["completion_tokens"] <= 200


@pytest.mark.parametrize("sampling", SAMPLING)
def test_named_tool_choice_makes_exactly_that_one_call(client, sampling) -> None:
    choice_ = {"type": "function", "function": {"name": "set_alarm"}}
    out = client.create(ASK, tools=TOOLS, tool_choice=choice_, max_tokens=200, **sampling)
    [choice] = out["choices"]
    [call] = check_calls(choice)
    assert call["function"]["name"] == "set_alarm"
    assert choice["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("sampling", SAMPLING)
def test_auto_gives_either_prose_or_calls(client, sampling) -> None:
    out = client.create(ASK, tools=TOOLS, max_tokens=120, **sampling)
    [choice] = out["choices"]
    if check_calls(choice):
        assert choice["message"]["content"] is None
    else:
        assert "tool_calls" not in choice["message"]
        assert not choice["message"]["content"].startswith("{")
        assert choice["finish_reason"] in ("stop", "length")


def test_auto_forced_into_a_call_by_its_first_character(client) -> None:
    brace = client.tokenizer.convert_tokens_to_ids("{")
    out = client.create(ASK, tools=TOOLS, temperature=0, max_tokens=200, logit_bias={brace: 100})
    assert check_calls(out["choices"][0])


@pytest.mark.parametrize("sampling", SAMPLING)
def test_none_makes_no_call_and_describes_no_tools(client, sampling) -> None:
    out = client.create(ASK, tools=TOOLS, tool_choice="none", max_tokens=24, **sampling)
    [choice] = out["choices"]
    assert "tool_calls" not in choice["message"]
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] == len(client.format_prompt(ASK).ids)


def test_parallel_calls_one_per_line(client) -> None:
    out = client.create(
        ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=200,
        logit_bias=newline_bias(client),
    )
    [choice] = out["choices"]
    calls = check_calls(choice)
    assert len(calls) >= 2
    assert choice["finish_reason"] == "length"  # a newline always wins: calls until max_tokens


def test_parallel_tool_calls_false_allows_one_call(client) -> None:
    out = client.create(
        ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=200,
        logit_bias=newline_bias(client),
    )
    [choice] = out["choices"]
    assert len(check_calls(choice)) == 1
    assert choice["finish_reason"] == "tool_calls"  # the grammar then allows only <end_of_turn>


def test_free_string_arguments_complete_validly_or_finish_with_length(client) -> None:
    note = {
        "type": "function",
        "function": {
            "name": "note",
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string"}, "tags": {"type": "array"}},
                "required": ["text"],
            },
        },
    }
    schemas = {"note": note["function"]["parameters"]}
    for seed in SEEDS:
        out = client.create(
            ASK, tools=[note], tool_choice="required", temperature=1.0, seed=seed, max_tokens=300
        )
        [choice] = out["choices"]
        calls = check_calls(choice, schemas)
        assert calls or choice["finish_reason"] == "length"


def test_max_tokens_inside_a_call_reports_complete_calls_only(client) -> None:
    out = client.create(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=5)
    [choice] = out["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": ""}


# ---------------------------------------------------- one stream, every route


def reassemble(chunks: list[dict]) -> dict[int, list[dict]]:
    """OpenAI-style accumulation of streamed ``delta.tool_calls`` per choice."""
    calls: dict[int, dict[int, dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for part in choice["delta"].get("tool_calls", ()):
                slot = calls.setdefault(choice["index"], {}).setdefault(
                    part["index"], {"id": "", "type": "", "function": {"name": "", "arguments": ""}}
                )
                slot["id"] += part.get("id") or ""
                slot["type"] += part.get("type") or ""
                slot["function"]["name"] += part["function"].get("name") or ""
                slot["function"]["arguments"] += part["function"].get("arguments") or ""
    return {i: [c[k] for k in sorted(c)] for i, c in calls.items()}


def strip_ids(calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_streamed_tool_call_deltas_reassemble_to_the_non_stream_result(client, seed) -> None:
    options = {"tools": TOOLS, "tool_choice": "required", "temperature": 1.0, "seed": seed}
    out = client.create(ASK, max_tokens=200, **options)
    chunks = list(client.create(ASK, max_tokens=200, stream=True, **options))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    parts = [c for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert parts
    for chunk in parts:
        for part in chunk["choices"][0]["delta"]["tool_calls"]:
            assert set(part) == {"index", "id", "type", "function"}
            assert set(part["function"]) == {"name", "arguments"}
    assert not any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)
    streamed = reassemble(chunks)[0]
    assert strip_ids(streamed) == strip_ids(out["choices"][0]["message"]["tool_calls"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == out["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == out["usage"]


def test_deltas_carry_tool_calls_for_adapters(client) -> None:
    params = SamplingParams.build(
        tools=TOOLS, tool_choice="required", temperature=1.0, seed=1, max_tokens=200
    )
    deltas = list(client.stream_deltas([ASK], params))
    assert all(d.text == "" for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    assert [c.index for c in calls] == list(range(len(calls))) and calls
    last = deltas[-1]
    assert last.finish_reason in ("tool_calls", "length")
    out = client.create(
        ASK, **{"tools": TOOLS, "tool_choice": "required"}, temperature=1.0, seed=1, max_tokens=200
    )
    assert [c.to_openai()["function"] for c in calls] == [
        c["function"] for c in out["choices"][0]["message"]["tool_calls"]
    ]


def test_batch_and_n_with_tools(client) -> None:
    other = [{"role": "user", "content": "Wake me at seven."}]
    outs = client.create_batch(
        [ASK, other],
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=2,
        n=2,
        max_tokens=200,
    )
    assert len(outs) == 2
    for out in outs:
        assert len(out["choices"]) == 2
        for choice in out["choices"]:
            assert check_calls(choice)


async def test_acreate_with_tools_equals_create(client) -> None:
    options = {"tools": TOOLS, "tool_choice": "required", "temperature": 1.0, "seed": 3}
    sync = client.create(ASK, max_tokens=200, **options)
    out = await client.acreate(ASK, max_tokens=200, **options)
    assert strip_ids(out["choices"][0]["message"]["tool_calls"]) == strip_ids(
        sync["choices"][0]["message"]["tool_calls"]
    )
    chunks = [c async for c in await client.acreate(ASK, max_tokens=200, stream=True, **options)]
    assert strip_ids(reassemble(chunks)[0]) == strip_ids(
        sync["choices"][0]["message"]["tool_calls"]
    )


def test_tool_round_trip_conversation(client) -> None:
    first = client.create(
        ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=200,
    )
    message = first["choices"][0]["message"]
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": '{"ok": true}'}
        for c in message["tool_calls"]
    ]
    second = client.create([*ASK, message, *results], tools=TOOLS, temperature=0, max_tokens=16)
    assert second["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    check_calls(second["choices"][0])
