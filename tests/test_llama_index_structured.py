"""``structured_predict`` / ``as_structured_llm`` through the constrained JSON route, both backends.

``GemmaLocal`` overrides LlamaIndex's structured-output entry points (in the
default ``pydantic_program_mode``): the request carries core's
``response_format={"type": "json_schema", "json_schema": {"name", "schema":
Model.model_json_schema(), "strict": True}}``, so decoding is constrained to the
class's schema and the reply always parses and validates, even from the tiny
random-weight models used here (nested objects, arrays of objects, enums,
bounded numbers, patterns, optional and required fields). Each result is
checked against the schema with ``jsonschema`` and against a direct core call
with the same options.

The other routes stay available: ``pydantic_program_mode="function"``
(LlamaIndex's ``FunctionCallingProgram``: a forced tool call, also constrained)
is tested on the real models; ``"llm"`` (unconstrained text parsing) needs
specific text, so it runs on :class:`ScriptedGemma`, a client that cannot
constrain decoding and so keeps the text route by default too.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import ChatMessage
from llama_index.core.program.utils import FlexibleModel
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, Field, ValidationError
from test_llama_index_support import ScriptedGemma, is_gemma_prompt

from llama_index_gemma_local import GemmaLocal, json_schema_format


class Role(str, enum.Enum):
    dev = "dev"
    ops = "ops"
    qa = "qa"


class Address(BaseModel):
    city: Literal["Paris", "Rome"]
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    """A person with a nested address, an array of enums and an optional field."""

    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    admin: bool
    address: Address
    roles: list[Role] = Field(min_length=1, max_length=3)
    nickname: str | None = Field(default=None, max_length=5)


class Member(BaseModel):
    role: Role
    level: int = Field(ge=1, le=3)


class Team(BaseModel):
    """An array of nested objects."""

    members: list[Member] = Field(min_length=1, max_length=3)
    lead: Role
    office: Address


# LlamaIndex's StructuredLLM streams partial objects with pydantic's deprecated .json()
pytestmark = pytest.mark.filterwarnings("ignore:The `json` method is deprecated")

PROMPT = PromptTemplate("Describe {who}.")
MAX = 300
SAMPLING = [
    pytest.param({"temperature": 0}, id="greedy"),
    pytest.param({"temperature": 1.0, "seed": 0}, id="seed0"),
    pytest.param({"temperature": 1.0, "seed": 1}, id="seed1"),
]


def check(value: BaseModel, cls: type[BaseModel]) -> None:
    assert type(value) is cls
    jsonschema.validate(value.model_dump(mode="json", exclude_unset=True), cls.model_json_schema())


@pytest.fixture
def llm(client) -> GemmaLocal:
    return GemmaLocal(client=client, temperature=0, max_tokens=MAX)


# ------------------------------------------------------------------ success


def test_response_format_is_the_class_schema() -> None:
    assert json_schema_format(Person) == {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": Person.model_json_schema(), "strict": True},
    }
    generic = type("Box[int]", (BaseModel,), {"__annotations__": {"x": int}})
    assert json_schema_format(generic)["json_schema"]["name"] == "Box_int_"


@pytest.mark.parametrize("sampling", SAMPLING)
def test_structured_predict_always_validates(client, sampling) -> None:
    llm = GemmaLocal(client=client, max_tokens=MAX, **sampling)
    person = llm.structured_predict(Person, PROMPT, who="an engineer")
    check(person, Person)
    # exactly what core answers to the same request
    direct = client.create(
        [{"role": "user", "content": "Describe an engineer."}],
        response_format=json_schema_format(Person),
        max_tokens=MAX,
        **sampling,
    )
    assert direct["choices"][0]["finish_reason"] == "stop"
    assert person == Person.model_validate_json(direct["choices"][0]["message"]["content"])


@pytest.mark.parametrize("sampling", SAMPLING[:2])
def test_arrays_of_nested_objects(client, sampling) -> None:
    llm = GemmaLocal(client=client, max_tokens=MAX, **sampling)
    team = llm.structured_predict(Team, PROMPT, who="a team")
    check(team, Team)
    assert 1 <= len(team.members) <= 3


async def test_astructured_predict_equals_sync(llm: GemmaLocal) -> None:
    sync = llm.structured_predict(Person, PROMPT, who="a pilot")
    assert await llm.astructured_predict(Person, PROMPT, who="a pilot") == sync


def test_stream_structured_predict(llm: GemmaLocal) -> None:
    expected = llm.structured_predict(Person, PROMPT, who="a cook")
    parts = list(llm.stream_structured_predict(Person, PROMPT, who="a cook"))
    assert len(parts) >= 3
    assert all(isinstance(p, (Person, FlexibleModel)) for p in parts)
    assert parts[-1] == expected  # the last one is validated strictly
    check(parts[-1], Person)


async def test_astream_structured_predict(llm: GemmaLocal) -> None:
    expected = llm.structured_predict(Person, PROMPT, who="a cook")
    parts = [p async for p in await llm.astream_structured_predict(Person, PROMPT, who="a cook")]
    assert len(parts) >= 3 and parts[-1] == expected


async def test_as_structured_llm(llm: GemmaLocal) -> None:
    structured = llm.as_structured_llm(Person)
    messages = [ChatMessage(role="user", content="Describe a sailor.")]
    response = structured.chat(messages)
    check(response.raw, Person)
    assert json.loads(response.message.content) == response.raw.model_dump(mode="json")
    assert (await structured.achat(messages)).raw == response.raw
    streamed = list(structured.stream_chat(messages))
    assert streamed[-1].raw == response.raw
    astreamed = [r async for r in await structured.astream_chat(messages)]
    assert astreamed[-1].raw == response.raw


def test_llm_kwargs_reach_the_request(llm: GemmaLocal, client) -> None:
    seeded = llm.structured_predict(
        Person, PROMPT, llm_kwargs={"temperature": 1.0, "seed": 3}, who="x"
    )
    direct = client.create(
        [{"role": "user", "content": "Describe x."}],
        response_format=json_schema_format(Person),
        temperature=1.0,
        seed=3,
        max_tokens=MAX,
    )
    assert seeded == Person.model_validate_json(direct["choices"][0]["message"]["content"])


def test_function_program_mode_is_constrained_too(client) -> None:
    """LlamaIndex's ``FunctionCallingProgram``: a forced call of a tool named after the class."""
    llm = GemmaLocal(client=client, temperature=0, max_tokens=MAX, pydantic_program_mode="function")
    # (the call instructions describe the tool at length: a small class keeps the tiny
    # tokenizer's prompt well inside the 2048-token context window)
    address = llm.structured_predict(Address, PROMPT, who="a diver's address")
    check(address, Address)


def test_structured_events(llm: GemmaLocal) -> None:
    seen: list[str] = []

    class Handler(BaseEventHandler):
        @classmethod
        def class_name(cls) -> str:
            return "Handler"

        def handle(self, event, **kwargs) -> None:
            seen.append(type(event).__name__)

    root = get_dispatcher()
    handler = Handler()
    root.add_event_handler(handler)
    try:
        llm.structured_predict(Person, PROMPT, who="x")
    finally:
        root.event_handlers.remove(handler)
    structured = [n for n in seen if "Structured" in n]
    assert structured == ["LLMStructuredPredictStartEvent", "LLMStructuredPredictEndEvent"]
    assert "LLMChatStartEvent" in seen and "LLMChatEndEvent" in seen


# ------------------------------------------------------------------ errors


def test_max_tokens_too_small_says_so(llm: GemmaLocal) -> None:
    with pytest.raises(
        ValueError, match=r"Person JSON was cut off after 3 tokens, before it was complete"
    ):
        llm.structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 3}, who="x")
    with pytest.raises(ValueError, match="cut off after 3 tokens"):
        list(llm.stream_structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 3}, who="x"))
    # the function-calling route says it the same way
    function = llm.model_copy(update={"pydantic_program_mode": "function"})
    with pytest.raises(ValueError, match="cut off after 3 tokens"):
        function.structured_predict(Address, PROMPT, llm_kwargs={"max_tokens": 3}, who="x")
    # the LLM is still usable
    check(llm.structured_predict(Person, PROMPT, who="x"), Person)


def test_bad_schema_fails_before_any_load(gemma3_path: Path) -> None:
    class Odd(BaseModel):
        x: int = Field(json_schema_extra={"not": {"const": 1}})

    llm = GemmaLocal(str(gemma3_path), backend="transformers")
    with pytest.raises(ValueError, match="'Odd' schema is not a JSON schema that constrained"):
        llm.structured_predict(Odd, PROMPT, who="x")
    with pytest.raises(ValueError, match="not a JSON schema"):
        llm.as_structured_llm(Odd).chat([ChatMessage(role="user", content="hi")])
    assert not llm.client.is_loaded


# -------------------------------------------- scripted: routes that need text


@pytest.fixture
def scripted(gemma3_path: Path) -> ScriptedGemma:
    client = ScriptedGemma(gemma3_path)
    yield client
    client.close()


SONG = {"title": "Sea Fever", "year": 1902}


class Song(BaseModel):
    """A song with its title and year."""

    title: str
    year: int


def test_a_client_that_cannot_constrain_keeps_the_text_route(scripted: ScriptedGemma) -> None:
    """A custom client without constrained decoding: no function calling, text parsing."""
    llm = GemmaLocal(client=scripted)
    assert llm.metadata.is_function_calling_model is False
    scripted.enqueue(json.dumps(SONG))
    assert llm.structured_predict(Song, PROMPT, who="x") == Song(**SONG)
    assert is_gemma_prompt(scripted.history[-1]["prompt"], "Describe x.", '"year"')
    with pytest.raises(NotImplementedError, match="cannot constrain decoding"):
        llm.chat([ChatMessage(role="user", content="hi")], response_format={"type": "json_object"})


@pytest.fixture
def text_route(scripted: ScriptedGemma) -> GemmaLocal:
    """LlamaIndex's text-parsing route (``LLMTextCompletionProgram``), chosen explicitly."""
    return GemmaLocal(client=scripted, temperature=0.2, max_tokens=256, pydantic_program_mode="llm")


def test_text_route_parses_the_reply(scripted: ScriptedGemma, text_route: GemmaLocal) -> None:
    scripted.enqueue("Here it is:\n```json\n" + json.dumps(SONG) + "\n```")
    song = text_route.structured_predict(
        Song,
        PromptTemplate("Name a song about {topic}."),
        llm_kwargs={"max_tokens": 100},
        topic="x",
    )
    assert song == Song(**SONG)
    [call] = scripted.history
    # the schema instructions and the prompt went through the Gemma chat template
    assert is_gemma_prompt(call["prompt"], "Name a song about x.", '"year"')
    assert (call["temperature"], call["max_tokens"]) == (0.2, 100)


async def test_text_route_async_and_structured_llm(
    scripted: ScriptedGemma, text_route: GemmaLocal
) -> None:
    scripted.enqueue(json.dumps(SONG), json.dumps({"title": "Tide", "year": 2001}))
    assert await text_route.astructured_predict(Song, PROMPT, who="x") == Song(**SONG)
    response = text_route.as_structured_llm(Song).chat([ChatMessage(role="user", content="A.")])
    assert response.raw == Song(title="Tide", year=2001)


def test_text_route_mismatch_raises(scripted: ScriptedGemma, text_route: GemmaLocal) -> None:
    scripted.enqueue('{"title": "No year"}', "not json at all")
    with pytest.raises(ValidationError, match="year"):
        text_route.structured_predict(Song, PROMPT, who="x")
    with pytest.raises(ValueError, match="Could not extract json string from output: not json"):
        text_route.structured_predict(Song, PROMPT, who="x")
