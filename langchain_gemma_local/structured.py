"""Tools and structured output: LangChain's forms as core's, and the parsers.

``bind_tools`` sends ``tool_choice`` through :func:`convert_tool_choice`;
``with_structured_output`` sends a schema through
:func:`convert_to_response_format` and chains one of the parsers here, which
report a reply that ``max_tokens`` cut short as such (an
``OutputParserException`` with the token count and the partial output) instead
of a schema error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import Generation
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel
from typing_extensions import is_typeddict

#: ``tool_choice`` strings LangChain code passes, as core's (OpenAI's) modes.
TOOL_CHOICE_MODES: Mapping[str, str] = {
    "auto": "auto",
    "none": "none",
    "required": "required",
    "any": "required",
}


def _tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    names = []
    for tool in tools:
        function = tool.get("function")
        if tool.get("type") == "function" and isinstance(function, Mapping):
            names.append(str(function.get("name")))
    return names


def _named_choice(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def convert_tool_choice(
    tool_choice: dict[str, Any] | str | bool | None, tools: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | str | None:
    """LangChain's ``tool_choice`` forms as core's (OpenAI's): a mode or a named tool.

    ``None`` / ``False`` → ``None`` (core's default: ``"auto"``); ``True``,
    ``"any"`` and ``"required"`` → ``"required"`` (at least one call);
    ``"auto"``, ``"none"``; the name of a bound tool (checked first, as
    langchain-openai does) → ``{"type": "function", "function": {"name"}}``
    (exactly that one call); an OpenAI dict as is, and Anthropic's
    ``{"type": "tool", "name"}`` / ``{"type": "any" | "auto" | "none"}``.

    Raises:
        ValueError: a string that is neither a mode nor a bound tool's name
            (naming both), or a dict of an unknown shape.
        TypeError: any other type.
    """
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True:
        return "required"
    names = _tool_names(tools)
    if isinstance(tool_choice, str):
        if tool_choice in names:
            return _named_choice(tool_choice)
        if tool_choice in TOOL_CHOICE_MODES:
            return TOOL_CHOICE_MODES[tool_choice]
        raise ValueError(
            f"tool_choice={tool_choice!r} is neither one of "
            f"{', '.join(map(repr, TOOL_CHOICE_MODES))} nor the name of a bound tool; "
            f"the tools are: {', '.join(map(repr, names)) or 'none'}"
        )
    if isinstance(tool_choice, Mapping):
        kind = tool_choice.get("type")
        if kind == "function":
            return dict(tool_choice)  # core checks the name against the tools
        if kind == "tool" and isinstance(tool_choice.get("name"), str):
            return _named_choice(tool_choice["name"])
        if isinstance(kind, str) and kind in TOOL_CHOICE_MODES:
            return TOOL_CHOICE_MODES[kind]
        raise ValueError(
            'tool_choice dicts are {"type": "function", "function": {"name": ...}} '
            f'(or Anthropic\'s {{"type": "tool", "name": ...}}), got {tool_choice!r}'
        )
    raise TypeError(
        f"tool_choice must be a string, a bool, a dict or None, got {type(tool_choice).__name__}"
    )


def _is_pydantic_class(schema: Any) -> bool:
    return isinstance(schema, type) and is_basemodel_subclass(schema)


def convert_to_response_format(
    schema: dict[str, Any] | type, strict: bool | None = None
) -> dict[str, Any]:
    """A schema as an OpenAI ``{"type": "json_schema", "json_schema": {...}}`` response format.

    Accepts a pydantic class (v2 ``model_json_schema()`` or v1 ``schema()``,
    ``$defs`` kept), a ``TypedDict`` class, a JSON schema dict (named by its
    ``title``, else ``"response"``), an OpenAI function / tool dict, a
    ``{"name", "schema"}`` dict or a whole response format. ``strict`` is
    recorded (core then closes every object the schema lists properties of).
    """
    if _is_pydantic_class(schema):
        model: Any = schema
        if issubclass(model, BaseModel):
            spec = {"name": model.__name__, "schema": model.model_json_schema()}
        else:  # pydantic.v1
            spec = {"name": model.__name__, "schema": model.schema()}
    elif is_typeddict(schema):
        json_schema = convert_to_json_schema(schema)
        spec = {"name": json_schema.get("title") or getattr(schema, "__name__", "response")}
        spec["schema"] = json_schema
    elif isinstance(schema, Mapping):
        if schema.get("type") == "json_schema" and isinstance(schema.get("json_schema"), Mapping):
            spec = dict(schema["json_schema"])
        elif "name" in schema and "schema" in schema:
            spec = dict(schema)
        elif schema.get("type") == "function" or ("name" in schema and "parameters" in schema):
            function = convert_to_openai_tool(schema)["function"]
            spec = {"name": function["name"], "schema": function.get("parameters", {})}
        else:
            title = schema.get("title")
            spec = {"name": title if isinstance(title, str) and title else "response"}
            spec["schema"] = dict(schema)
    else:
        raise TypeError(
            "schema must be a pydantic class, a TypedDict class or a JSON schema dict, got "
            f"{schema!r}"
        )
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


# ------------------------------------------------------------ cut-off structured replies


def _cut_off_error(result: Sequence[Generation], what: str, *, call: bool) -> None:
    """Raise if a structured reply ended at ``max_tokens`` before it was complete.

    Under the grammar a reply always parses and validates once it is complete;
    one cut short by ``max_tokens`` (``finish_reason == "length"``) is not, and
    would otherwise surface as a schema error about an auto-closed object, or,
    for a forced tool call that never finished, as ``None``. ``call``: the
    reply is a tool call (complete iff ``tool_calls`` holds one), else JSON
    text (complete iff it parses). Checked on partial (streamed) results too:
    the last chunk carries the finish reason.
    """
    for generation in result:
        message = getattr(generation, "message", None)
        if not isinstance(message, AIMessage):
            continue
        if message.response_metadata.get("finish_reason") != "length":
            continue
        text = message.text if isinstance(message.content, list) else str(message.content)
        if call:
            if message.tool_calls:
                continue
        else:
            try:
                json.loads(text)
                continue  # complete, just at the limit
            except ValueError:
                pass
        used = message.usage_metadata["output_tokens"] if message.usage_metadata else None
        subject = f"the call of {what}" if call else f"the {what} JSON"
        raise OutputParserException(
            f"{subject} was cut off after {used} tokens, before it was complete (max_tokens, or "
            "what the context window left after the prompt); raise max_tokens (e.g. "
            f"ChatGemmaLocal(max_tokens=...)). Partial output: {text!r}",
            llm_output=text,
        )


class _JsonParser(JsonOutputParser):
    """``JsonOutputParser`` that reports a reply cut off by ``max_tokens`` as such."""

    label: str = "reply"

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _cut_off_error(result, self.label, call=False)
        return super().parse_result(result, partial=partial)


class _PydanticParser(PydanticOutputParser):
    """``PydanticOutputParser`` that reports a reply cut off by ``max_tokens`` as such."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _cut_off_error(result, self.pydantic_object.__name__, call=False)
        return super().parse_result(result, partial=partial)


class _PydanticToolParser(PydanticToolsParser):
    """``PydanticToolsParser`` that reports a call cut off by ``max_tokens`` as such."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _cut_off_error(result, " or ".join(t.__name__ for t in self.tools), call=True)
        return super().parse_result(result, partial=partial)


class _KeyToolParser(JsonOutputKeyToolsParser):
    """``JsonOutputKeyToolsParser`` that reports a call cut off by ``max_tokens`` as such."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _cut_off_error(result, self.key_name, call=True)
        return super().parse_result(result, partial=partial)
