"""Tools and structured output, guaranteed by constrained decoding.

Gemma has no tool-call tokens, so a call is text in a format the prompt asks
for; a grammar (llguidance) masks every token that would leave that format, so
the output always parses, names a real tool and carries schema-valid
arguments, even from a random-weight model. Data flow::

    create(tools=, tool_choice=, parallel_tool_calls=, response_format=)
        ──SamplingParams.build──▶ parse_tools / parse_tool_choice / parse_response_format
            (pure checks + each schema compiled once by llguidance, before any load)
        ──grammar_for(params)──▶ one Lark grammar (cached), system_instructions(params)
    model thread: GrammarMatchers(tokenizer, grammar, rows): one matcher per row,
        fed each sampled token, filling a vocabulary bitmask
        ──TorchGrammarMask (transformers LogitsProcessor) / mlx_grammar_processor──▶
        masked logits ──sampled tokens──▶ TokenSink ──ToolCallParser per row──▶
        Delta(text, tool_calls=(ToolCall, ...))

The call format is the JSON variant of Google's "Function calling with Gemma"
prompt: ``{"name": function name, "parameters": dictionary of argument name and
its value}``; parallel calls go one per line. The JSON form was chosen over the
Python-call form because the arguments then are JSON already (OpenAI's
``arguments`` string needs no translation from Python literals) and the
grammar constrains them with the tool's own JSON schema. Tool results go back
to the model as ```` ```tool_output ```` blocks, as Google's guides do.

Every constrained JSON value uses ``json.dumps``' layout (``", "`` and
``": "``, no other whitespace): the model cannot pad with endless whitespace,
and the calls in the prompt's history look exactly like the ones it is made to
write.

Importing this module is cheap: llguidance, numpy, torch and MLX are imported
by the functions that need them.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .errors import MissingDependencyError

if TYPE_CHECKING:
    from .params import SamplingParams

logger = logging.getLogger("gemma_local")

TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
#: What OpenAI allows as a function name (the name is written into the grammar as is).
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: llguidance JSON options for every constrained JSON value: ``json.dumps`` layout.
JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
#: Between parallel calls.
CALL_SEPARATOR = "\n"


# ---------------------------------------------------------------- the records


@dataclass(frozen=True)
class ToolSpec:
    """One validated tool (an OpenAI ``{"type": "function", "function": {...}}`` entry).

    ``parameters`` is the JSON text of the arguments' JSON schema (a string
    keeps the record hashable); :meth:`schema` parses it.
    """

    name: str
    description: str | None
    parameters: str

    def schema(self) -> dict[str, Any]:
        return dict(json.loads(self.parameters))

    def definition(self) -> dict[str, Any]:
        """The entry shown to the model (Google's example: name, description, parameters)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.schema()
        return out


@dataclass(frozen=True)
class ResponseFormat:
    """A validated ``response_format`` that constrains the output to JSON.

    ``type`` is ``"json_object"`` (any JSON object) or ``"json_schema"``;
    ``schema`` is the JSON text of the schema (``None`` for ``json_object``).
    ``strict`` is recorded but changes nothing: the schema is always enforced.
    """

    type: str
    name: str | None = None
    schema: str | None = None
    strict: bool | None = None

    def schema_dict(self) -> dict[str, Any]:
        return {"type": "object"} if self.schema is None else dict(json.loads(self.schema))


@dataclass(frozen=True)
class ToolCall:
    """One complete call the model made, as OpenAI reports it.

    ``index`` is the call's position among its choice's calls, ``id`` is
    ``call_<24 hex digits>`` and ``arguments`` the JSON text of the arguments
    object (it always parses and validates against the tool's schema).
    """

    index: int
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------- validation


def _require_llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise MissingDependencyError(
            "tools and response_format need llguidance (constrained decoding), which is not "
            'installed. Install it with: pip install "gemma-local[transformers]" '
            '(or "gemma-local[mlx]"), or pip install llguidance'
        ) from exc
    return llguidance


def _json_text(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must be JSON-serialisable: {exc}") from None


@lru_cache(maxsize=256)
def _grammar_error(grammar: str) -> str | None:
    """llguidance's complaint about a grammar (no tokenizer needed), or ``None``."""
    llguidance = _require_llguidance()
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar)
    )
    return messages[0] if is_error else None


def _check_schema(schema: Mapping[str, Any], where: str) -> None:
    error = _grammar_error(f"start: {_json_rule(schema)}")
    if error is not None:
        first = error.split("\n", 1)[0]
        first = re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", first)
        raise ValueError(
            f"{where} is not a JSON schema that constrained decoding supports: {first}. "
            "Supported keywords: type, properties, required, additionalProperties, items, "
            "prefixItems, enum, const, anyOf, allOf, oneOf (when it equals anyOf), $ref/$defs, "
            "minLength/maxLength, pattern, format, minItems/maxItems, minimum/maximum"
        )


def _schema(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON schema object (a dict), got {value!r}")
    schema = dict(value)
    _json_text(schema, where)
    return schema


def parse_tools(value: Any) -> tuple[ToolSpec, ...]:
    """Validate OpenAI ``tools``: ``[{"type": "function", "function": {name, description, parameters}}]``."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(
            'tools must be a list of {"type": "function", "function": {"name": ..., '
            f'"description": ..., "parameters": {{JSON schema}}}}}}, got {type(value).__name__}'
        )
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ValueError(
                f'{where} must be {{"type": "function", "function": {{...}}}}; '
                f"only function tools are supported, got {tool!r}"
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"{where}['function'] must be a dict with 'name' and 'parameters'")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ValueError(
                f"{where} has name {name!r}; a tool name must be 1-64 letters, digits, '_' or '-'"
            )
        if name in seen:
            raise ValueError(f"{where}: tool name {name!r} is used twice; names must be unique")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{where} ({name}) description must be a string, got {description!r}")
        where = f"{where} ({name}) parameters"
        raw = function.get("parameters")
        schema = {"type": "object", "properties": {}} if raw is None else _schema(raw, where)
        kind = schema.get("type", "object")
        if kind != "object":
            raise ValueError(
                f"{where} must describe an object (type 'object'), got type {kind!r}: "
                "arguments are passed by name"
            )
        _check_schema(_call_arguments_schema(schema), where)
        specs.append(ToolSpec(name, description, _json_text(schema, where)))
    return tuple(specs)


def parse_tool_choice(value: Any, tools: Sequence[ToolSpec]) -> tuple[str, str | None]:
    """``(mode, forced tool name)``; mode is ``"none"``, ``"auto"`` or ``"required"``.

    A named choice ``{"type": "function", "function": {"name": ...}}`` is
    ``("required", name)``. Without tools the mode is ``"none"``.
    """
    names = [t.name for t in tools]
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise ValueError(
                f"tool_choice must be one of {', '.join(map(repr, TOOL_CHOICES))} or "
                f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r}'
            )
        if value != "none" and not tools:
            raise ValueError(f"tool_choice={value!r} needs tools; pass tools=[...]")
        return value, None
    function = value.get("function") if isinstance(value, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(value, Mapping) or value.get("type") != "function" or not name:
        raise ValueError(
            f"tool_choice must be one of {', '.join(map(repr, TOOL_CHOICES))} or "
            f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r}'
        )
    if name not in names:
        known = ", ".join(map(repr, names)) or "none (no tools were given)"
        raise ValueError(f"tool_choice names the unknown tool {name!r}; the tools are: {known}")
    return "required", str(name)


def parse_response_format(value: Any) -> ResponseFormat | None:
    """Validate ``response_format``; ``None`` for plain text."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind not in RESPONSE_FORMATS:
        raise ValueError(
            "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}, "
            f"'strict': True}}}}, got {value!r}"
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ValueError(
            "response_format of type 'json_schema' needs 'json_schema': "
            "{'name': ..., 'schema': {...}, 'strict': True}"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"response_format json_schema needs a non-empty 'name', got {name!r}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"response_format json_schema 'strict' must be a bool, got {strict!r}")
    raw = spec.get("schema")
    if raw is None:
        return ResponseFormat("json_schema", name, None, strict)
    where = f"response_format json_schema {name!r} schema"
    schema = _schema(raw, where)
    _check_schema(close_objects(schema) if strict else schema, where)
    return ResponseFormat("json_schema", name, _json_text(schema, where), strict)


def check_combination(
    tools: Sequence[ToolSpec], tool_choice: str, response_format: ResponseFormat | None
) -> None:
    if response_format is not None and tools and tool_choice != "none":
        raise ValueError(
            "response_format (JSON output) and tools cannot both apply to one reply: either "
            "pass tool_choice='none' (JSON reply, no calls) or drop response_format"
        )


# -------------------------------------------------------------------- grammar


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains")
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_COMPOSED_KEYS = ("allOf", "anyOf", "oneOf", "$ref")


def close_objects(schema: Any, *, close: bool = True) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties.

    OpenAI's strict mode asks for exactly that; here it is applied for the
    caller. Objects that say anything about extra properties, or that are
    composed (``allOf`` / ``anyOf`` / ``oneOf`` / ``$ref``, and the members of
    an ``allOf``), are left as they are. Every output still validates against
    the original schema: it only stops the model from inventing keys.
    """
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(v, close=False) for v in out["allOf"]]
    for key in _SCHEMA_VALUES:
        if isinstance(out.get(key), Mapping):
            out[key] = close_objects(out[key])
    if (
        close
        and isinstance(out.get("properties"), Mapping)
        and not any(k in out for k in _OPEN_KEYS + _COMPOSED_KEYS)
    ):
        out["additionalProperties"] = False
    return out


def _call_arguments_schema(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's argument schema as constrained: objects that list properties are closed.

    Arguments are a closed set, so no argument the schema does not name is
    generated (see :func:`close_objects`).
    """
    schema = dict(close_objects(parameters))
    schema.setdefault("type", "object")
    return schema


def _response_schema(response_format: ResponseFormat) -> dict[str, Any]:
    """The JSON output's schema as constrained (closed objects when ``strict`` is true)."""
    schema = response_format.schema_dict()
    return dict(close_objects(schema)) if response_format.strict else schema


def _json_rule(schema: Mapping[str, Any]) -> str:
    """``%json {...}`` with the :data:`JSON_LAYOUT` (a schema's own ``x-guidance`` wins)."""
    with_layout = dict(schema)
    with_layout["x-guidance"] = {**JSON_LAYOUT, **dict(schema.get("x-guidance") or {})}
    return f"%json {json.dumps(with_layout, ensure_ascii=False)}"


def call_prefix(name: str) -> str:
    """The text every call of ``name`` starts with (its arguments object follows)."""
    return '{"name": ' + json.dumps(name) + ', "parameters": '


def format_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A call exactly as the model is asked to write it."""
    return call_prefix(name) + json.dumps(dict(arguments), ensure_ascii=False) + "}"


@lru_cache(maxsize=64)
def _grammar(
    tools: tuple[ToolSpec, ...],
    tool_choice: str,
    tool_name: str | None,
    parallel: bool,
    response_format: ResponseFormat | None,
) -> str | None:
    if tools and tool_choice != "none":
        chosen = [t for t in tools if tool_name is None or t.name == tool_name]
        lines = ["%llguidance {}"]
        if tool_choice == "auto":
            # Prose or calls, decided by the first character: prose never starts with "{".
            lines += ["start: (TEXT | calls)?", r"TEXT: /[^{](.|\n)*/"]
        else:
            lines.append("start: calls")
        separator = json.dumps(CALL_SEPARATOR)
        lines.append(
            f"calls: call ({separator} call)*" if parallel and tool_name is None else "calls: call"
        )
        lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(chosen))))
        for i, tool in enumerate(chosen):
            lines.append(f'call_{i}: {json.dumps(call_prefix(tool.name))} args_{i} "}}"')
            lines.append(f"args_{i}: {_json_rule(_call_arguments_schema(tool.schema()))}")
        return "\n".join(lines) + "\n"
    if response_format is not None:
        return f"%llguidance {{}}\nstart: {_json_rule(_response_schema(response_format))}\n"
    return None


def grammar_for(params: SamplingParams) -> str | None:
    """The Lark grammar (llguidance dialect) the request's output must match, or ``None``."""
    return _grammar(
        params.tools,
        params.tool_choice,
        params.tool_choice_name,
        params.parallel_tool_calls,
        params.response_format,
    )


def check_grammar(params: SamplingParams) -> None:
    """Raise ``ValueError`` if llguidance rejects the request's grammar (cached)."""
    grammar = grammar_for(params)
    if grammar is not None:
        error = _grammar_error(grammar)
        if error is not None:
            raise ValueError(f"the tools / response_format cannot be constrained: {error}")


# --------------------------------------------------------------------- prompt


def system_instructions(params: SamplingParams) -> str | None:
    """The text that tells the model about its tools or its JSON format (system part).

    Tools follow the JSON variant of Google's Gemma function-calling prompt
    (``tool_choice`` and parallel calls adjust its first lines); the tool
    definitions are the JSON list of ``{name, description, parameters}`` it
    shows. ``tool_choice="none"`` describes no tools.
    """
    if params.tools and params.tool_choice != "none":
        fmt = '{"name": function name, "parameters": dictionary of argument name and its value}'
        if params.tool_choice_name is not None:
            head = (
                f"You have access to functions. You MUST invoke the function "
                f"{params.tool_choice_name}, in the format of\n{fmt}"
            )
        elif params.tool_choice == "required":
            head = f"You have access to functions. You MUST invoke one or more of them, in the format of\n{fmt}"
        else:
            head = (
                "You have access to functions. If you decide to invoke any of the function(s), "
                f"you MUST put it in the format of\n{fmt}"
            )
        if params.parallel_tool_calls and params.tool_choice_name is None:
            head += "\nTo invoke several functions, put each call on its own line."
        definitions = json.dumps(
            [t.definition() for t in params.tools], indent=2, ensure_ascii=False
        )
        return (
            f"{head}\n\nYou SHOULD NOT include any other text in the response if you call "
            f"a function\n{definitions}"
        )
    fmt_spec = params.response_format
    if fmt_spec is None:
        return None
    if fmt_spec.schema is None:
        return "You MUST respond with a JSON object and nothing else."
    schema = json.dumps(fmt_spec.schema_dict(), indent=2, ensure_ascii=False)
    return f"You MUST respond with JSON that follows this JSON schema, and nothing else:\n{schema}"


# ------------------------------------------------------ messages (history in)


def render_tool_calls(calls: Any, where: str) -> str:
    """An assistant message's ``tool_calls`` as the exact call text the model writes."""
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where} must be a list of tool calls, got {type(calls).__name__}")
    texts = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(
                f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                f'"arguments": "<JSON object>"}}}}, got {call!r}'
            )
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{at} arguments are not valid JSON: {exc}") from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"{at} arguments must be a JSON object, got {arguments!r}")
        texts.append(format_call(function["name"], arguments))
    return CALL_SEPARATOR.join(texts)


def render_tool_output(text: str) -> str:
    """A tool result as the model reads it (Google's ```` ```tool_output ```` block)."""
    return f"```tool_output\n{text}\n```"


# ------------------------------------------------------------ output parsing


class ToolCallParser:
    """Turns one choice's streamed text into prose or :class:`ToolCall` records.

    ``mode`` ``"auto"``: the first character decides (the grammar lets prose
    start with anything but ``{``, and every call starts with ``{``); text is
    held back only until that character arrives. ``"calls"``: the output is
    calls only. In call mode no text is emitted: each call is reported as soon
    as its closing brace arrives. A call cut short (``max_tokens`` or a stop
    string) is not reported; the finish reason says why.
    """

    def __init__(self, mode: str, names: frozenset[str]) -> None:
        self.mode = mode  # "auto" (undecided), "prose" or "calls"
        self.names = names
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    @property
    def calling(self) -> bool:
        return self.mode == "calls"

    @property
    def partial_call(self) -> str:
        """The text of the call being written (what follows the last complete one)."""
        return self._buffer.lstrip(CALL_SEPARATOR) if self.mode == "calls" else ""

    def feed(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """``(text to emit, calls completed by this text)``."""
        if self.mode == "prose" or not text:
            return text, ()
        if self.mode == "auto":
            if not text.startswith("{"):
                self.mode = "prose"
                return text, ()
            self.mode = "calls"
        self._buffer += text
        if "}" not in text:
            return "", ()
        return "", self._complete()

    def _complete(self) -> tuple[ToolCall, ...]:
        done = []
        while True:
            rest = self._buffer.lstrip(CALL_SEPARATOR)
            if not rest.startswith("{"):
                break
            try:
                value, end = self._decoder.raw_decode(rest)
            except json.JSONDecodeError:
                break
            self._buffer = rest[end:]
            call = self._call(value)
            if call is not None:
                self.calls.append(call)
                done.append(call)
        return tuple(done)

    def _call(self, value: Any) -> ToolCall | None:
        name = value.get("name") if isinstance(value, dict) else None
        arguments = value.get("parameters") if isinstance(value, dict) else None
        if name not in self.names or not isinstance(arguments, dict):
            # Cannot happen under the grammar; a backend that does not constrain might.
            logger.warning("dropping output that is not a call of a known tool: %.200r", value)
            return None
        return ToolCall(
            len(self.calls), new_call_id(), name, json.dumps(arguments, ensure_ascii=False)
        )


def tool_call_parser(params: SamplingParams) -> ToolCallParser | None:
    """The parser a choice's text goes through, or ``None`` when no calls can be made."""
    if not params.tools or params.tool_choice == "none":
        return None
    mode = "auto" if params.tool_choice == "auto" else "calls"
    return ToolCallParser(mode, frozenset(t.name for t in params.tools))


# ------------------------------------------------------------- model thread


def grammar_tokenizer(tokenizer: Any, end_ids: Sequence[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer (about 1 s for Gemma's 262k vocab).

    ``end_ids`` are the ids that end a reply (``<end_of_turn>`` first): once
    the grammar is complete only they are allowed, so generation stops right
    after the last call or the closing brace.
    """
    _require_llguidance()
    from llguidance.hf import from_tokenizer

    try:
        return from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(end_ids))
    except ValueError as exc:
        raise ValueError(
            f"constrained decoding needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}"
        ) from exc


class GrammarMatchers:
    """One llguidance matcher per row of a batch, and the rows' vocabulary bitmask.

    A backend feeds each live row's sampled token (:meth:`advance`), retires
    rows that have finished (:meth:`retire`) and asks for the bitmask of the
    next step (:meth:`fill` / :meth:`fill_row`): one int32 word per 32 token
    ids, bit set = allowed. Retired rows need no mask: they get an
    all-allowed one, and the bridges leave their logits alone.

    ``free_prose``: the grammar is ``tool_choice="auto"``'s, where a reply
    whose first token does not start with ``{`` is prose and anything may
    follow; such a row is retired after that token, so prose replies decode
    at the unconstrained speed.
    """

    def __init__(
        self, tokenizer: Any, grammar: str, rows: int, *, free_prose: bool = False
    ) -> None:
        import llguidance
        import numpy as np

        first = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
        if first.is_error():
            raise ValueError(f"the grammar cannot be compiled: {first.get_error()}")
        self.tokenizer = tokenizer
        self.matchers = [first] + [first.deep_copy() for _ in range(rows - 1)]
        self.vocab_size = int(tokenizer.vocab_size)
        self.bitmask = np.full((rows, (self.vocab_size + 31) // 32), -1, dtype=np.int32)
        self.retired = [False] * rows
        self._undecided = [free_prose] * rows

    def advance(self, row: int, token: int) -> None:
        """Feed ``row``'s sampled ``token`` (ignored once the row is retired)."""
        if self.retired[row]:
            return
        matcher = self.matchers[row]
        if not matcher.consume_token(int(token)):
            raise RuntimeError(
                f"constrained decoding: row {row} produced token {token}, which the grammar "
                f"forbids ({matcher.get_error()}); the logits were not masked"
            )
        if self._undecided[row]:
            self._undecided[row] = False
            text = self.tokenizer.decode_bytes([int(token)])
            if text and not text.startswith(b"{") and not matcher.is_stopped():
                self.retire(row)  # prose: the rest of the reply is free text

    def retire(self, row: int) -> None:
        self.retired[row] = True

    def fill_row(self, row: int) -> Any:
        """Row ``row``'s mask for the next token, shape ``(1, words)``."""
        from llguidance.numpy import fill_next_token_bitmask

        if not self.retired[row]:  # a complete grammar allows only the end ids
            fill_next_token_bitmask(self.matchers[row], self.bitmask, row)
        else:
            self.bitmask[row] = -1
        return self.bitmask[row : row + 1]

    def fill(self) -> Any:
        """Every row's mask for the next token, shape ``(rows, words)`` (rows in parallel)."""
        from llguidance.numpy import fill_next_token_bitmask_par

        live = []
        for row in range(len(self.matchers)):
            if not self.retired[row]:
                live.append((self.matchers[row], row))
            else:
                self.bitmask[row] = -1
        if len(live) == 1:
            self.fill_row(live[0][1])
        elif live:
            fill_next_token_bitmask_par(_executor(), live, self.bitmask)
        return self.bitmask


_EXECUTOR: Any = None


def _executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance

        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def disallowed_tokens(bitmask: Any, width: int) -> Any:
    """A ``(rows, width)`` uint8 array from a bitmask: 1 where a token is not allowed.

    The model's vocabulary (its embedding rows) can be larger than the
    tokenizer's (Gemma 3 12B: 262208 vs 262144): those extra ids are never
    allowed.
    """
    import numpy as np

    rows, words = bitmask.shape[0], -(-width // 32)
    inverted = np.full((rows, max(words, bitmask.shape[1])), -1, dtype=np.int32)
    np.invert(bitmask, out=inverted[:, : bitmask.shape[1]])
    bits = np.unpackbits(inverted.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :width]


class TorchGrammarMask:
    """The transformers bridge: a ``LogitsProcessor`` that masks each row's disallowed tokens.

    The rows' tokens are fed to ``matchers`` by the caller right after each
    step (the backend's ``StoppingCriteria`` does, from the ids it already
    holds on the host), so here the masks are only computed (on the CPU; on an
    accelerator the step's forward pass may still be running meanwhile) and
    applied: disallowed logits get the dtype's lowest value added, which
    sampling, top-k / top-p and argmax treat as -inf. transformers runs custom
    processors after its penalties and biases and before temperature / top-k /
    top-p, so sampling only ever sees allowed tokens.
    """

    def __init__(self, matchers: GrammarMatchers) -> None:
        self.matchers = matchers

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if all(self.matchers.retired):
            return scores
        masked = torch.from_numpy(disallowed_tokens(self.matchers.fill(), scores.shape[-1]))
        masked = masked.to(scores.device, non_blocking=True).to(scores.dtype)
        # The lowest finite value, added: vectorised (a masked_fill with a scattered
        # mask is several times slower on CPUs) and never NaN, and exp() of it is 0.
        return scores + masked.mul_(torch.finfo(scores.dtype).min)


def mlx_grammar_processor(matchers: GrammarMatchers, row: int) -> Callable[[Any, Any], Any]:
    """The MLX bridge: an mlx-lm logits processor ``(tokens, logits) -> logits`` for one row.

    mlx-lm calls it once per step with the row's tokens so far; from the
    second call on, the newest token is the one sampled last and is fed to the
    row's matcher. Works for ``generate_step`` and per row in ``BatchGenerator``.
    """
    first = True

    def process(tokens: Any, logits: Any) -> Any:
        nonlocal first
        import mlx.core as mx

        if matchers.retired[row]:
            return logits  # no .item(): mlx-lm keeps overlapping the steps
        if first:
            first = False
        else:
            matchers.advance(row, int(tokens[-1].item()))
            if matchers.retired[row]:
                return logits
        masked = mx.array(disallowed_tokens(matchers.fill_row(row), logits.shape[-1]))
        lowest = mx.array(mx.finfo(logits.dtype).min, dtype=logits.dtype)
        return logits + masked.astype(logits.dtype) * lowest

    return process
