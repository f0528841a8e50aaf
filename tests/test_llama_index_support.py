"""Helpers shared by the ``test_llama_index_*`` modules (this module holds no tests).

* :class:`ScriptedGemma`: a ``core.BaseGemmaChatCompletion`` of the original
  design (``_load_model_and_tokenizer`` + ``_generate_response``) whose model
  answers what was enqueued (simonw/llm-style fake), with the real tiny Gemma
  tokenizer for templating and counting. Everything between LlamaIndex and the
  model (chat template, ``create``, the token stream, counting, our mapping) is
  the real code; only the text is scripted. It cannot constrain decoding, so
  it serves the unconstrained routes (text parsing, ReAct).
* The tools of the tool tests (LlamaIndex ``FunctionTool``s over Python
  functions that record their calls) and :func:`check_selections`, which
  asserts that every call names a real tool and validates (``jsonschema``)
  against that tool's schema.
* :class:`Recorder`: collects LlamaIndex's LLM instrumentation events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import jsonschema
from llama_index.core.bridge.pydantic import Field as LIField
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import ChatMessage, ChatResponse
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from core import BaseGemmaChatCompletion

END_OF_TURN = 106


class ScriptedGemma(BaseGemmaChatCompletion):
    """A core client whose model answers what was enqueued.

    ``history`` records every rendered prompt and the sampling options it got.
    """

    implementation = "scripted"

    def __init__(self, tokenizer_path: Path) -> None:
        super().__init__(str(tokenizer_path))
        self.replies: list[str] = []
        self.history: list[dict[str, Any]] = []

    def enqueue(self, *replies: str) -> ScriptedGemma:
        self.replies.extend(replies)
        return self

    def _load_model_and_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.model = object()

    def _generate_response(
        self, prompt_str: str, temperature: float, max_tokens: int, top_p: float, **kwargs: Any
    ) -> str:
        self.history.append(
            {"prompt": prompt_str, "temperature": temperature, "max_tokens": max_tokens, **kwargs}
        )
        return self.replies.pop(0)


def is_gemma_prompt(prompt: str, *needles: str) -> bool:
    """Rendered by the Gemma chat template, ending with the model's turn."""
    return (
        prompt.startswith("<bos><start_of_turn>user\n")
        and prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
        and all(n in prompt for n in needles)
    )


# ------------------------------------------------------------------- tools


class WeatherArgs(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class AlarmTime(BaseModel):
    hour: int = Field(ge=0, le=23)
    minute: int = Field(ge=0, le=59)


class AlarmArgs(BaseModel):
    time: AlarmTime
    days: list[Literal["mon", "tue"]] = Field(max_length=2)
    loud: bool


class MultiplyArgs(BaseModel):
    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


class Tools:
    """Python functions as LlamaIndex tools; ``calls`` records every real call, in order.

    Arguments are enums, booleans and bounded integers, so that a random
    model's calls finish well within a small ``max_tokens`` (the grammar
    bounds every value). Schemas and descriptions are short: the tiny test
    tokenizer (512 tokens) spells JSON out nearly character by character, and
    the tool definitions must leave room in the 2048-token context window.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get_weather(self, city: str, days: int) -> str:
        self.calls.append(("get_weather", {"city": city, "days": days}))
        return f"{city}: sunny for {days} days"

    def set_alarm(self, time: dict[str, int], days: list[str], loud: bool) -> str:
        self.calls.append(("set_alarm", {"time": time, "loud": loud, "days": days}))
        return "alarm set"

    def ping(self) -> str:
        self.calls.append(("ping", {}))
        return "pong"

    def multiply(self, a: int, b: int) -> int:
        self.calls.append(("multiply", {"a": a, "b": b}))
        return a * b

    def all(self) -> list[FunctionTool]:
        """Three tools; ``set_alarm`` (nested arguments) is tested on its own, see above."""
        return [self.weather_tool(), self.multiply_tool(), self.ping_tool()]

    def weather_tool(self) -> FunctionTool:
        return FunctionTool.from_defaults(
            self.get_weather,
            name="get_weather",
            description="Weather of a city.",
            fn_schema=WeatherArgs,
        )

    def alarm_tool(self) -> FunctionTool:
        return FunctionTool.from_defaults(
            self.set_alarm, name="set_alarm", description="Set an alarm.", fn_schema=AlarmArgs
        )

    def ping_tool(self) -> FunctionTool:
        return FunctionTool.from_defaults(self.ping, name="ping", description="Check the line.")

    def multiply_tool(self, **kwargs: Any) -> FunctionTool:
        return FunctionTool.from_defaults(
            self.multiply,
            name="multiply",
            description="Multiply two integers.",
            fn_schema=MultiplyArgs,
            **kwargs,
        )


def schemas(tools: list[FunctionTool]) -> dict[str, dict[str, Any]]:
    """Each tool's argument schema, exactly as it was sent to the model."""
    return {t.metadata.name or "": t.metadata.get_parameters_dict() for t in tools}


def check_args(name: str, arguments: dict[str, Any], tools: list[FunctionTool]) -> None:
    """``name`` is one of ``tools`` and ``arguments`` validate against its schema."""
    by_name = schemas(tools)
    assert name in by_name, (name, list(by_name))
    jsonschema.validate(arguments, by_name[name])


def check_selections(
    selections: list[ToolSelection], tools: list[FunctionTool]
) -> list[ToolSelection]:
    """Every call has core's id, names a real tool and its arguments validate."""
    for selection in selections:
        assert selection.tool_id.startswith("call_") and len(selection.tool_id) == 5 + 24
        check_args(selection.tool_name, selection.tool_kwargs, tools)
    return selections


def check_call_response(response: ChatResponse, tools: list[FunctionTool]) -> list[ToolSelection]:
    """A response with calls: blocks, OpenAI ``tool_calls`` and ``raw`` all agree and validate."""
    from llama_index.core.base.llms.types import ToolCallBlock

    message = response.message
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    openai_calls = message.additional_kwargs.get("tool_calls") or []
    assert [(b.tool_call_id, b.tool_name, b.tool_kwargs) for b in blocks] == [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in openai_calls
    ]
    if isinstance(response.raw, dict) and response.raw.get("object") == "chat.completion":
        assert response.raw["choices"][0]["message"].get("tool_calls", []) == openai_calls
    selections = [
        ToolSelection(
            tool_id=b.tool_call_id or "", tool_name=b.tool_name, tool_kwargs=b.tool_kwargs
        )
        for b in blocks
    ]
    if selections:
        assert message.content is None
    return check_selections(selections, tools)


# ------------------------------------------------------------------ events


class Recorder(BaseEventHandler):
    """Collects the LLM chat events LlamaIndex's instrumentation dispatches."""

    events: list = LIField(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if type(event).__name__ == "LLMChatEndEvent":
            self.events.append(event)

    def chats(self) -> list[tuple[list[ChatMessage], ChatResponse]]:
        """(input messages, response) of every chat call, in order."""
        return [(e.messages, e.response) for e in self.events]
