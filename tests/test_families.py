"""The model-family seam: registry, the shared interface, and Gemma 1/2/3 unchanged.

The Gemma 2/3 families only delegate to :mod:`core.messages` and
:mod:`core.constrained`, so each check here compares the family's answer with
what those functions give for the same request. Gemma 4 has its own file
(``test_family_gemma4.py``). No model, no tokenizer: milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core import SamplingParams
from core.constrained import ToolCallParser, grammar_for, system_instructions
from core.families import FAMILIES, MODEL_TYPES, Parsed, family_for
from core.families.gemma3 import Gemma3Family, TextOutputParser
from core.families.gemma4 import Gemma4Family
from core.messages import normalize_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("model_type", "family"),
    [
        ("gemma", "gemma2"),
        ("gemma2", "gemma2"),
        ("gemma3", "gemma3"),
        ("gemma3_text", "gemma3"),
        ("gemma3n", "gemma3"),
        ("gemma3n_text", "gemma3"),
        ("gemma4", "gemma4"),
        ("gemma4_text", "gemma4"),
        ("gemma4_unified", "gemma4"),
        ("llama", "gemma3"),
        (None, "gemma3"),
        ("", "gemma3"),
    ],
)
def test_family_for(model_type: str | None, family: str) -> None:
    assert family_for(model_type).name == family
    assert family_for(model_type) is FAMILIES[family]


def test_registry_names_every_family_once() -> None:
    assert set(MODEL_TYPES.values()) == set(FAMILIES)
    assert {name: f.name for name, f in FAMILIES.items()} == {n: n for n in FAMILIES}


def test_family_facts() -> None:
    g2, g3, g4 = (FAMILIES[n] for n in ("gemma2", "gemma3", "gemma4"))
    assert (g2.can_think, g3.can_think, g4.can_think) == (False, False, True)
    assert (g2.keep_special_tokens, g3.keep_special_tokens, g4.keep_special_tokens) == (
        False,
        False,
        True,
    )
    assert g3.end_tokens == ("<end_of_turn>", "<eos>")
    assert set(g4.end_tokens) == {"<eos>", "<turn|>", "<|tool_response>"}
    assert g2.chat_template == "gemma2_chat_template.jinja"
    assert g3.chat_template == "gemma3_chat_template.jinja"
    assert g4.chat_template == "gemma4_chat_template.jinja"
    assert isinstance(g2, Gemma3Family) and not g2.system_role and g3.system_role
    assert isinstance(g4, Gemma4Family)


def test_families_are_frozen_values() -> None:
    import dataclasses

    family = FAMILIES["gemma3"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        family.name = "other"  # type: ignore[misc]
    probed = dataclasses.replace(family, system_role=False)
    assert not probed.system_role and family.system_role


def test_import_is_cheap() -> None:
    code = (
        "import sys, core.families; "
        "heavy = [m for m in ('torch', 'transformers', 'mlx', 'llguidance', 'jinja2') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------- Gemma 1/2/3 unchanged


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tools": [WEATHER]},
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
        {"response_format": {"type": "json_object"}},
    ],
)
def test_gemma3_family_delegates(name: str, options: dict) -> None:
    family = FAMILIES[name]
    params = SamplingParams.build(**options)
    system_role = name == "gemma3"
    messages, kwargs = family.render_inputs(CHAT, params, None)
    expected = normalize_messages(
        CHAT, system_role=system_role, instructions=system_instructions(params)
    )
    assert (messages, kwargs) == (expected, {})
    assert family.grammar(params, False) == grammar_for(params)
    assert family.free_prose(params, None) == (bool(params.tools) and params.tool_choice == "auto")


def test_gemma3_developer_is_system() -> None:
    family = FAMILIES["gemma3"]
    params = SamplingParams.build()
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    original = json.dumps(developer)
    assert family.render_inputs(developer, params, False) == family.render_inputs(
        CHAT, params, False
    )
    assert json.dumps(developer) == original  # not mutated
    folded, _ = FAMILIES["gemma2"].render_inputs(developer, params, False)
    assert folded == [{"role": "user", "content": "Be brief.\n\nHi"}]


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma3_cannot_think(name: str) -> None:
    family = FAMILIES[name]
    params = SamplingParams.build()
    for call in (
        lambda: family.check(params, True),
        lambda: family.render_inputs(CHAT, params, True),
        lambda: family.grammar(params, True),
        lambda: family.output_parser(params, True),
    ):
        with pytest.raises(ValueError, match=f"thinking=True.*{name} models cannot"):
            call()
    family.check(params, False)
    family.check(params, None)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "gemma4"])
def test_thinking_must_be_a_bool_or_none(name: str) -> None:
    with pytest.raises(TypeError, match="thinking must be True, False or None, got 'yes'"):
        FAMILIES[name].check(SamplingParams.build(), "yes")  # type: ignore[arg-type]


def test_gemma3_parser_is_the_json_call_parser() -> None:
    params = SamplingParams.build(tools=[WEATHER])
    parser = FAMILIES["gemma3"].output_parser(params, None)
    assert isinstance(parser, TextOutputParser)
    reference = ToolCallParser("auto", frozenset({"get_weather"}))
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    got = parser.feed(text[:10]) + parser.feed(text[10:]) + parser.finish()
    ref_text, ref_calls = reference.feed(text)
    assert got.content == ref_text == ""
    assert got.reasoning == ""
    assert [(c.name, c.arguments) for c in got.calls] == [(c.name, c.arguments) for c in ref_calls]
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    prose = FAMILIES["gemma3"].output_parser(SamplingParams.build(), None)
    assert prose.feed("Hello") + prose.finish() == Parsed("Hello")
    assert not prose.in_reasoning


def test_parsed_adds_and_is_falsy_when_empty() -> None:
    assert not Parsed()
    assert Parsed("a", "b") + Parsed("c", "d") == Parsed("ac", "bd")
    assert Parsed(reasoning="x")
