"""Structured output (``response_format``) under constrained decoding, on both backends.

The reply of a tiny random-weight model always parses and validates against
the schema (``jsonschema``), under sampling and greedy decoding: nested
objects, arrays, enums, required fields, ``$ref``. Schemas close their objects
(``additionalProperties: false``, or ``strict``) and bound their values so
that replies finish; free strings and open objects either finish validly or
end with ``finish_reason == "length"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from conftest import make_client
from test_core_support import USER, stream_text

from core import SamplingParams
from core.constrained import close_objects, disallowed_tokens, system_instructions

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"enum": ["Ada", "Grace", "Linus"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "roles": {
            "type": "array",
            "items": {"enum": ["dev", "ops", "qa"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "nickname": {"type": "string", "maxLength": 5},
    },
    "required": ["name", "age", "admin", "address", "roles"],
    "additionalProperties": False,
}
PYDANTIC_STYLE: dict[str, Any] = {
    "$defs": {
        "Pet": {
            "properties": {
                "kind": {"enum": ["cat", "dog"], "title": "Kind"},
                "legs": {"type": "integer", "minimum": 0, "maximum": 4, "title": "Legs"},
            },
            "required": ["kind", "legs"],
            "title": "Pet",
            "type": "object",
        }
    },
    "properties": {
        "pets": {"items": {"$ref": "#/$defs/Pet"}, "maxItems": 2, "type": "array"},
        "owner": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
    },
    "required": ["pets", "owner"],
    "title": "Household",
    "type": "object",
}
TOP_ARRAY = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "maxItems": 4,
}
SEEDS = (0, 1, 2, 3)
SAMPLING = [pytest.param({"temperature": 1.0, "seed": s}, id=f"seed{s}") for s in SEEDS] + [
    pytest.param({"temperature": 0}, id="greedy")
]


def schema_format(schema: dict[str, Any], name: str = "answer", **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **extra}}


def check_json(choice: dict[str, Any], schema: dict[str, Any]) -> Any:
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    jsonschema.validate(value, schema)
    assert "tool_calls" not in choice["message"]
    return value


# --------------------------------------------------------------- fast tier


@pytest.mark.parametrize(
    ("response_format", "match"),
    [
        ("json", "response_format must be"),
        ({"type": "xml"}, "response_format must be"),
        ({"type": "json_schema"}, "needs 'json_schema'"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "non-empty 'name'"),
        (schema_format(PERSON, strict="yes"), "'strict' must be a bool"),
        (schema_format([1]), "must be a JSON schema object"),  # type: ignore[arg-type]
        (schema_format({"type": "object", "properties": {"a": {"type": "strin"}}}), "Invalid type"),
        (schema_format({"type": "array", "uniqueItems": True}), "Unimplemented keys"),
        (schema_format({"type": "string", "format": "shoe-size"}), "Unknown format"),
        (schema_format({"type": "object", "default": float("nan")}), "JSON-serialisable"),
    ],
)
def test_bad_response_format_raises_value_error(response_format, match) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams.build(response_format=response_format)


def test_bad_schema_fails_before_any_load(gemma3_path: Path) -> None:
    client = make_client("mlx", gemma3_path)
    with pytest.raises(ValueError, match="'answer' schema is not a JSON schema"):
        client.create(USER, response_format=schema_format({"type": "nope"}))
    assert not client.is_loaded


def test_text_format_is_no_constraint_and_formats_are_recorded() -> None:
    assert SamplingParams.build(response_format={"type": "text"}).response_format is None
    params = SamplingParams.build(response_format=schema_format(PERSON, strict=True))
    assert params.constrained and params.response_format is not None
    assert params.response_format.type == "json_schema"
    assert params.response_format.name == "answer" and params.response_format.strict is True
    assert json.loads(params.response_format.schema or "") == PERSON
    obj = SamplingParams.build(response_format={"type": "json_object"}).response_format
    assert obj is not None and obj.type == "json_object" and obj.schema is None
    text = system_instructions(params)
    assert text is not None and text.startswith("You MUST respond with JSON")
    assert json.loads(text[text.index("\n") :]) == PERSON


def test_close_objects_closes_listed_properties_only() -> None:
    closed = close_objects(PYDANTIC_STYLE)
    assert closed["additionalProperties"] is False
    assert closed["$defs"]["Pet"]["additionalProperties"] is False
    assert "additionalProperties" not in close_objects({"type": "object"})
    open_map = {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}
    assert close_objects(open_map) == open_map
    composed = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert close_objects(composed) == composed
    assert "additionalProperties" not in PYDANTIC_STYLE  # the caller's schema is not mutated


def test_disallowed_tokens_include_ids_past_the_tokenizer() -> None:
    bitmask = np.full((2, 2), -1, dtype=np.int32)  # a 64-token tokenizer allows everything
    bitmask[1, 0] = 0b101
    masked = disallowed_tokens(bitmask, 80)  # the model has 80 logits
    assert masked.shape == (2, 80)
    assert not masked[0, :64].any() and masked[0, 64:].all()
    assert np.flatnonzero(masked[1, :32] == 0).tolist() == [0, 2] and not masked[1, 32:64].any()
    assert disallowed_tokens(bitmask, 40).shape == (2, 40)


def test_torch_bridge_masks_to_the_lowest_value_and_keeps_allowed_logits() -> None:
    import torch

    from core.constrained import TorchGrammarMask

    class Fixed:
        retired = (False,)

        def fill(self) -> np.ndarray:
            mask = np.zeros((1, 1), dtype=np.int32)
            mask[0, 0] = 0b1010  # tokens 1 and 3 of a 32-token tokenizer
            return mask

    scores = torch.randn(1, 40)
    out = TorchGrammarMask(Fixed()).__call__(None, scores)  # type: ignore[arg-type]
    assert out.argmax().item() in (1, 3) and not torch.isnan(out).any()
    assert torch.equal(out[0, [1, 3]], scores[0, [1, 3]])
    probs = out.softmax(-1)
    assert probs[0, [1, 3]].sum().item() == pytest.approx(1.0)


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("sampling", SAMPLING)
def test_nested_schema_output_always_validates(client, sampling) -> None:
    out = client.create(USER, response_format=schema_format(PERSON), max_tokens=200, **sampling)
    value = check_json(out["choices"][0], PERSON)
    assert list(value)[:5] == ["name", "age", "admin", "address", "roles"]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_refs_anyof_and_strict_closing(client, sampling) -> None:
    response_format = schema_format(PYDANTIC_STYLE, name="Household", strict=True)
    out = client.create(USER, response_format=response_format, max_tokens=200, **sampling)
    value = check_json(out["choices"][0], close_objects(PYDANTIC_STYLE))
    jsonschema.validate(value, PYDANTIC_STYLE)


@pytest.mark.parametrize("sampling", SAMPLING)
def test_top_level_array(client, sampling) -> None:
    out = client.create(USER, response_format=schema_format(TOP_ARRAY), max_tokens=60, **sampling)
    assert isinstance(check_json(out["choices"][0], TOP_ARRAY), list)


def test_output_uses_json_dumps_layout(client) -> None:
    out = client.create(USER, response_format=schema_format(PERSON), temperature=0, max_tokens=200)
    text = out["choices"][0]["message"]["content"]
    assert text == json.dumps(json.loads(text), ensure_ascii=False)


def test_json_object_finishes_as_soon_as_the_object_closes(client) -> None:
    close = client.tokenizer.convert_tokens_to_ids("}")
    out = client.create(
        USER, response_format={"type": "json_object"}, temperature=0, logit_bias={close: 100}
    )
    [choice] = out["choices"]
    assert choice["message"]["content"] == "{}" and choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 3  # "{", "}", <end_of_turn>


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_and_free_strings_validate_or_finish_with_length(client, seed) -> None:
    free = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    for response_format, schema in [
        ({"type": "json_object"}, {"type": "object"}),
        (schema_format(free), free),
    ]:
        out = client.create(
            USER, response_format=response_format, temperature=1.0, seed=seed, max_tokens=150
        )
        [choice] = out["choices"]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        else:
            assert choice["finish_reason"] == "length"
            assert out["usage"]["completion_tokens"] == 150


def test_stream_equals_create_and_deltas_carry_the_json(client) -> None:
    options = {"response_format": schema_format(PERSON), "temperature": 1.0, "seed": 5}
    out = client.create(USER, max_tokens=200, **options)
    chunks = list(client.create(USER, max_tokens=200, stream=True, **options))
    assert stream_text(chunks) == out["choices"][0]["message"]["content"]
    params = SamplingParams.build(max_tokens=200, **options)
    deltas = list(client.stream_deltas([USER], params))
    assert "".join(d.text for d in deltas) == out["choices"][0]["message"]["content"]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].tool_calls == ()


def test_batch_and_n_with_a_schema(client) -> None:
    other = [{"role": "user", "content": "Hi"}]
    outs = client.create_batch(
        [USER, other],
        response_format=schema_format(PERSON),
        temperature=1.0,
        seed=4,
        n=2,
        max_tokens=200,
    )
    for out in outs:
        for choice in out["choices"]:
            check_json(choice, PERSON)


async def test_acreate_with_a_schema_equals_create(client) -> None:
    options = {"response_format": schema_format(PERSON), "temperature": 1.0, "seed": 6}
    sync = client.create(USER, max_tokens=200, **options)
    out = await client.acreate(USER, max_tokens=200, **options)
    assert out["choices"][0]["message"] == sync["choices"][0]["message"]


def test_schema_instructions_are_in_the_prompt(client) -> None:
    prompt = client.format_prompt(USER, response_format=schema_format(PERSON))
    assert "You MUST respond with JSON that follows this JSON schema" in prompt.text
    assert prompt.text.count("<start_of_turn>user") == 1


@pytest.fixture(scope="session")
def wide_vocab_path(tiny_dir: Path, gemma3_path: Path) -> Path:
    """A model with 32 more logits than its tokenizer has tokens (like Gemma 3 12B/27B)."""
    import shutil

    from core.tiny import build_tiny_checkpoint

    path = tiny_dir / "gemma3_text-wide-vocab"
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, "gemma3_text", vocab_size=544)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (gemma3_path / name).exists():
                shutil.copy(gemma3_path / name, path / name)
    return path


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_logits_past_the_tokenizer_are_never_sampled(wide_vocab_path: Path, backend) -> None:
    client = make_client(backend, wide_vocab_path)
    try:
        client.load()
        assert len(client.tokenizer) == 512
        for seed in SEEDS:  # a sampled id >= 512 would put the matcher in error (RuntimeError)
            out = client.create(
                USER,
                response_format=schema_format(PERSON),
                temperature=1.0,
                seed=seed,
                max_tokens=200,
            )
            check_json(out["choices"][0], PERSON)
    finally:
        client.close()
