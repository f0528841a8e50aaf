"""The Lark grammar (llguidance dialect) of a Gemma 4 reply: only canonical, schema-valid calls.

Control tokens are named by id (``<[48]>`` is ``<|tool_call>``): text can
never match them, so prose, thoughts and strings cannot contain one, and a
call can only be written with them. Nor can free text spell a control
token's text with ordinary tokens (:func:`_free_text`): the reply parser
reads control tokens by id, but such text would read as a control token once
the reply is rendered back into the prompt (a ``<|"|>`` ending a string early).
The reply is::

    [<|channel> "thought\\n" text <channel|>]     only with thinking on
    then   prose | call+ | call | JSON              as tool_choice / response_format say
    call:  <|tool_call> "call:NAME" arguments <tool_call|>

and a tool's arguments follow its JSON schema (:class:`_Rules`): strings
(``enum`` / ``const``, ``minLength`` / ``maxLength``) between ``<|"|>``
tokens, integers and numbers (bounds through llguidance's ``%json``, which
then writes no exponent), booleans, ``null``, closed objects whose
properties come in the template's order (required ones always, optional
ones may), free objects
(``additionalProperties``), arrays (``items``, ``minItems`` / ``maxItems``),
``anyOf``, type lists, ``nullable`` and local ``$ref`` (recursion included).
Anything else is a ``ValueError`` naming the keyword, raised when the grammar
is built (before any model loads). JSON output (``response_format``) is
standard JSON in :data:`core.constrained.JSON_LAYOUT`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from ..constrained import ResponseFormat, ToolSpec, _json_rule, _response_schema
from .gemma4_syntax import (
    CALL_END,
    CALL_START,
    CHANNEL_END,
    CHANNEL_START,
    CONTROL_TOKENS,
    KEY,
    STRING_DELIM,
    THOUGHT_LABEL,
    TOKEN_IDS,
    _sorted_items,
    format_value,
)


def _token(text: str) -> str:
    """A control token as a Lark grammar names it (by id)."""
    return f"<[{TOKEN_IDS[text]}]>"


#: Schema keywords that only annotate (no effect on what is valid).
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
#: Keywords the call grammar enforces.
SUPPORTED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "allOf",
        "$ref",
        "nullable",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
    }
)
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_JSON_LAYOUT = '"x-guidance": {"whitespace_flexible": false}'

#: Free text never holds a control token's text spelled with ordinary tokens: the reply
#: parser reads control tokens by id, but the chat template renders the reply back as text,
#: where ``<`` ``channel`` ``|>`` reads as ``<channel|>`` (a string would end early).
_NO_CONTROL_TEXT = "~/(.|\\n)*(" + "|".join(re.escape(t) for t in CONTROL_TOKENS) + ")(.|\\n)*/"


def _free_text(count: str) -> str:
    """A lexeme of ``count`` (``*``, ``+`` or ``{lo,hi}``) characters holding no control
    token's text (:data:`_NO_CONTROL_TEXT`)."""
    return f"/(.|\\n){count}/ & {_NO_CONTROL_TEXT}"


#: Rules every call grammar may use.
_COMMON_RULES = {
    "g_str": f"{_token(STRING_DELIM)} G_TEXT {_token(STRING_DELIM)}",
    "G_TEXT": _free_text("*"),
    "G_INT": r"/-?(0|[1-9][0-9]*)/",
    "G_NUMBER": r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/",
    "G_KEY": r"/[A-Za-z_][A-Za-z0-9_]*/",
    "g_bool": '"true" | "false"',
    "g_any": 'g_str | G_NUMBER | g_bool | "null" | g_any_object | g_any_array',
    "g_any_object": '"{" (g_any_member ("," g_any_member)*)? "}"',
    "g_any_member": 'G_KEY ":" g_any',
    "g_any_array": '"[" (g_any ("," g_any)*)? "]"',
}


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Rules:
    """Builds the Lark rules for the call syntax of some JSON schemas."""

    def __init__(self, root: Mapping[str, Any], where: str, prefix: str) -> None:
        self.root = root
        self.where = where
        self.prefix = prefix
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}
        self.count = 0

    def new(self, stem: str) -> str:
        """A fresh rule name (an upper-case ``stem`` makes a terminal's name)."""
        self.count += 1
        prefix = self.prefix.upper() if stem.isupper() else self.prefix
        return f"{prefix}_{stem}_{self.count}"

    def add(self, stem: str, body: str) -> str:
        name = self.new(stem)
        self.rules[name] = body
        return name

    def fail(self, where: str, what: str) -> ValueError:
        return ValueError(
            f"{self.where}{where}: {what}. Gemma 4 tool calls support these JSON schema "
            f"keywords: {', '.join(sorted(SUPPORTED_KEYWORDS))} (types: {', '.join(_TYPES)}), "
            "plus annotations (title, description, default, examples, $defs)"
        )

    # -- values

    def value(self, schema: Any, where: str) -> str:
        """A Lark expression for a value valid against ``schema``."""
        if schema is True or schema == {}:
            return "g_any"
        if not isinstance(schema, Mapping):
            raise self.fail(where, f"a schema must be an object, got {schema!r}")
        unknown = sorted(set(schema) - SUPPORTED_KEYWORDS - _ANNOTATIONS)
        if unknown:
            raise self.fail(where, f"unsupported keyword(s) {', '.join(unknown)}")
        if "$ref" in schema:
            others = sorted(set(schema) - {"$ref"} - _ANNOTATIONS)
            if others:
                raise self.fail(where, f"$ref together with {', '.join(others)}")
            return self.ref(schema["$ref"], where)
        alternatives: list[str]
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise self.fail(where, "allOf is supported with exactly one schema")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            merged = {**rest, **parts[0]} if isinstance(parts[0], Mapping) else parts[0]
            return self.value(merged, where)
        if "anyOf" in schema:
            branches = schema["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise self.fail(where, "anyOf must be a non-empty list of schemas")
            rest = {k: v for k, v in schema.items() if k != "anyOf" and k not in _ANNOTATIONS}
            alternatives = [
                self.value({**rest, **b} if isinstance(b, Mapping) else b, f"{where}.anyOf[{j}]")
                for j, b in enumerate(branches)
            ]
        elif "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(where, "enum must be a non-empty list")
            alternatives = [self.literal(v, where) for v in values if self._fits(v, schema)]
            if not alternatives:
                raise self.fail(where, "no enum/const value matches the schema's type")
        else:
            kind = schema.get("type")
            if kind is None:
                if "properties" in schema or "additionalProperties" in schema:
                    kind = "object"
                elif "items" in schema:
                    kind = "array"
            kinds = kind if isinstance(kind, list) else [kind]
            alternatives = [self.typed(k, schema, where) for k in kinds]
        if schema.get("nullable") is True:
            alternatives.append('"null"')
        if len(alternatives) == 1:
            return alternatives[0]
        return self.add("alt", " | ".join(alternatives))

    def _fits(self, value: Any, schema: Mapping[str, Any]) -> bool:
        kind = schema.get("type")
        if kind is None:
            return True
        kinds = kind if isinstance(kind, list) else [kind]
        checks = {
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
            "object": lambda v: isinstance(v, Mapping),
            "array": lambda v: isinstance(v, list),
        }
        return any(checks.get(k, lambda v: False)(value) for k in kinds)

    def literal(self, value: Any, where: str) -> str:
        """The one text ``value`` is written as, as a Lark expression."""
        if isinstance(value, str):
            inner = f" {_lark_string(value)} " if value else " "
            return f"{_token(STRING_DELIM)}{inner}{_token(STRING_DELIM)}"
        if isinstance(value, Mapping):
            parts = ['"{"']
            for j, (k, v) in enumerate(_sorted_items(value)):
                parts.append(_lark_string(("," if j else "") + f"{self.key(k, where)}:"))
                parts.append(self.literal(v, where))
            parts.append('"}"')
            return "(" + " ".join(parts) + ")"
        if isinstance(value, list):
            parts = ['"["']
            for j, v in enumerate(value):
                if j:
                    parts.append('","')
                parts.append(self.literal(v, where))
            parts.append('"]"')
            return "(" + " ".join(parts) + ")"
        try:
            return _lark_string(format_value(value))
        except TypeError:
            raise self.fail(where, f"enum/const value {value!r} is not JSON") from None

    def key(self, key: Any, where: str) -> str:
        if not isinstance(key, str) or not KEY.match(key):
            raise self.fail(
                where,
                f"property name {key!r} cannot be written unquoted in a Gemma 4 call "
                "(use letters, digits, '_', '.', '-')",
            )
        return key

    def ref(self, ref: Any, where: str) -> str:
        match = (
            re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        )
        if match is None:
            raise self.fail(
                where, f"$ref {ref!r}: only local '#/$defs/NAME' references are supported"
            )
        if ref not in self.refs:
            target = (self.root.get(match.group(1)) or {}).get(match.group(2))
            if target is None:
                raise self.fail(where, f"$ref {ref!r} names no definition")
            name = self.new("def")
            self.refs[ref] = name  # before building: the definition may refer to itself
            self.rules[name] = self.value(target, f"{where}->{ref}")
        return self.refs[ref]

    def typed(self, kind: Any, schema: Mapping[str, Any], where: str) -> str:
        if kind is None:
            return "g_any"
        if kind == "string":
            return self.string(schema, where)
        if kind in ("integer", "number"):
            bounds = {k: schema[k] for k in _NUMBER_KEYWORDS if k in schema}
            if not bounds:
                return "G_INT" if kind == "integer" else "G_NUMBER"
            spec = json.dumps({"type": kind, **bounds})
            return self.add("num", f"%json {{{spec[1:-1]}, {_JSON_LAYOUT}}}")
        if kind == "boolean":
            return "g_bool"
        if kind == "null":
            return '"null"'
        if kind == "object":
            return self.object(schema, where)
        if kind == "array":
            return self.array(schema, where)
        raise self.fail(where, f"unknown type {kind!r}")

    def string(self, schema: Mapping[str, Any], where: str) -> str:
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if lo is None and hi is None:
            return "g_str"
        for bound in (lo, hi):
            if bound is not None and (not isinstance(bound, int) or bound < 0):
                raise self.fail(where, f"minLength/maxLength must be integers >= 0, got {bound!r}")
        text = self.add("STR", _free_text(f"{{{lo or 0},{'' if hi is None else hi}}}"))
        return f"{_token(STRING_DELIM)} {text} {_token(STRING_DELIM)}"

    def array(self, schema: Mapping[str, Any], where: str) -> str:
        item = self.value(schema.get("items", True), f"{where}.items")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        for bound in (lo, hi):
            if bound is not None and (not isinstance(bound, int) or bound < 0):
                raise self.fail(where, f"minItems/maxItems must be integers >= 0, got {bound!r}")
        if hi is not None and hi < lo:
            raise self.fail(where, f"maxItems {hi} < minItems {lo}")
        if hi == 0:
            return '("[" "]")'
        more_lo, more_hi = max(lo - 1, 0), "" if hi is None else hi - 1
        items = f'{item} ("," {item}){{{more_lo},{more_hi}}}'
        body = f'"[" {items} "]"' if lo > 0 else f'"[" ({items})? "]"'
        return self.add("arr", body)

    def object(self, schema: Mapping[str, Any], where: str) -> str:
        properties = schema.get("properties")
        extra = schema.get("additionalProperties", True)
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(where, f"required must be a list of property names, got {required!r}")
        if properties is None:
            if required:
                raise self.fail(where, "required keys need 'properties' that describe them")
            if extra is False:
                return '("{" "}")'
            if extra is True:
                return "g_any_object"
            member = self.add(
                "member", f'G_KEY ":" {self.value(extra, f"{where}.additionalProperties")}'
            )
            return self.add("obj", f'"{{" ({member} ("," {member})*)? "}}"')
        if not isinstance(properties, Mapping):
            raise self.fail(where, "properties must be an object")
        if extra not in (True, False):
            raise self.fail(where, "additionalProperties with a schema next to properties")
        missing = [r for r in required if r not in properties]
        if missing:
            raise self.fail(where, f"required key(s) {missing} are not in properties")
        # Closed, in the template's order: no key the schema does not name.
        members = [
            (self.key(k, where), self.value(v, f"{where}.{k}"), k in required)
            for k, v in _sorted_items(properties)
        ]
        return self.add("obj", f'"{{" {self.members(members, 0, True, {})} "}}"')

    def members(
        self,
        members: list[tuple[str, str, bool]],
        k: int,
        first: bool,
        memo: dict[tuple[int, bool], str],
    ) -> str:
        """The members from ``k`` on; ``first``: none written yet (no leading comma).

        Each optional member is "written, then the rest" or "skipped": one rule
        per (position, first) pair, so the grammar stays linear in the number
        of properties.
        """
        if k == len(members):
            return ""
        if (k, first) in memo:
            return memo[k, first]
        key, value, required = members[k]
        head = f"{_lark_string(('' if first else ',') + key + ':')} {value}"
        rest = self.members(members, k + 1, False, memo)
        written = f"{head} {rest}".strip()
        if required:
            out = written
        else:
            skipped = self.members(members, k + 1, first, memo)
            out = f"({written})?" if not skipped else self.add("mem", f"{written} | {skipped}")
        memo[k, first] = out
        return out


def arguments_rule(tool: ToolSpec, prefix: str = "t") -> tuple[str, dict[str, str]]:
    """``(expression, rules)``: Lark for ``tool``'s arguments object, rule names from ``prefix``."""
    schema = tool.schema()
    rules = _Rules(schema, f"tools ({tool.name}) parameters", prefix)
    return rules.value(schema, ""), rules.rules


@lru_cache(maxsize=64)
def build_grammar(
    tools: tuple[ToolSpec, ...],
    tool_choice: str,
    tool_name: str | None,
    parallel: bool,
    response_format: ResponseFormat | None,
    thinking: bool,
) -> str | None:
    """The Lark grammar for one request's reply, or ``None`` when nothing is constrained."""
    calling = bool(tools) and tool_choice != "none"
    if not calling and response_format is None:
        return None
    lines = ["%llguidance {}"]
    if thinking:
        lines.append("start: thought? body")
        lines.append(
            f"thought: {_token(CHANNEL_START)} {_lark_string(THOUGHT_LABEL)} G_THOUGHT "
            f"{_token(CHANNEL_END)}"
        )
        lines.append(f"G_THOUGHT: {_free_text('*')}")
    else:
        lines.append("start: body")
    if not calling:
        assert response_format is not None
        lines.append(f"body: {_json_rule(_response_schema(response_format))}")
        return "\n".join(lines) + "\n"
    chosen = [t for t in tools if tool_name is None or t.name == tool_name]
    many = parallel and tool_name is None
    calls = "call+" if many else "call"
    lines.append(f"body: (G_PROSE | {calls})?" if tool_choice == "auto" else f"body: {calls}")
    if tool_choice == "auto":
        lines.append(f"G_PROSE: {_free_text('+')}")
    lines.append(
        f"call: {_token(CALL_START)} "
        + "("
        + " | ".join(f"call_{i}" for i in range(len(chosen)))
        + ")"
        + f" {_token(CALL_END)}"
    )
    rules: dict[str, str] = dict(_COMMON_RULES)
    for i, tool in enumerate(chosen):
        top, own = arguments_rule(tool, f"t{i}")
        rules.update(own)
        lines.append(f"call_{i}: {_lark_string('call:' + tool.name)} {top}")
    lines += [f"{name}: {body}" for name, body in rules.items()]
    return "\n".join(lines) + "\n"
