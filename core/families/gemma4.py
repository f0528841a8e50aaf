"""The Gemma 4 family (``gemma4``, ``gemma4_text``, ``gemma4_unified``).

Gemma 4 has control tokens for everything Gemma 3 wrote as text, and its own
chat template (``core/chat_templates/gemma4_chat_template.jinja``) takes the
OpenAI shapes almost as they are. Data flow::

    OpenAI messages ──render_inputs──▶ template messages + {enable_thinking, tools}
        (native system turn; ``developer`` is ``system``; assistant calls with
        ``arguments`` as a dict; ``role: "tool"`` results checked against the
        call ids of the assistant message they follow)
    SamplingParams ──grammar──▶ Lark (llguidance) over control-token ids:
        [<|channel>thought\\n … <channel|>]  (only with thinking on)
        then prose | <|tool_call>call:NAME{key:value,…}<tool_call|>+ | JSON
    token ids ──decoded, each control token the parser reads as its sentinel
        (``control_tokens``), other special tokens dropped──▶ text
        ──Gemma4OutputParser──▶ Parsed(content, reasoning, calls)

The call syntax, its parser and the reply parser are in
:mod:`core.families.gemma4_syntax`; the grammar, which allows only the
canonical form with arguments valid against each tool's JSON schema (so the
off-format calls other runtimes fail to parse, quotes instead of ``<|"|>``,
``key=value``, parentheses, cannot be produced), in
:mod:`core.families.gemma4_grammar`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..constrained import ToolSpec, _grammar_error, system_instructions
from ..messages import content_to_text, join_content, user_content
from .gemma4_grammar import build_grammar
from .gemma4_syntax import CONTROL_TEXT, END_TOKENS, Gemma4OutputParser
from .interface import Messages, check_media, check_thinking, model_media

if TYPE_CHECKING:
    from ..media import MediaOptions
    from ..params import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
TURN_SEPARATOR = "\n\n"


# --------------------------------------------------------------------- prompt


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} arguments are not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} arguments must be a JSON object, got {value!r}")
    return dict(value)


def _assistant_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where} must be a list of tool calls, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(name, str) or not name:
            raise ValueError(
                f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                f'"arguments": "<JSON object>"}}}}, got {call!r}'
            )
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ValueError(f"{at} id must be a string, got {call_id!r}")
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": _arguments(function.get("arguments"), at)},
            }
        )
    return out


def _system_text(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if content is None:
        raise ValueError(f"{where} ({message.get('role')}) has no content")
    return content_to_text(content, where=f"{where}['content']")


def render_messages(messages: Messages, instructions: str | None = None) -> list[dict[str, Any]]:
    """Validate OpenAI-style messages and shape them as the Gemma 4 template reads them.

    Leading ``system`` / ``developer`` messages merge into one system message
    (``instructions`` appended), consecutive user messages merge, assistant
    calls get their ``arguments`` as a dict, ``reasoning_content`` (or
    ``reasoning``) of an assistant message is passed on (the template shows
    it only for the calls after the last user message), and every
    ``role: "tool"`` message must answer a call of the assistant message it
    follows (other results of that message may come between); it gets that
    call's ``name``. The conversation must end on a user message or on tool
    results. New dicts; the input is never mutated.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            "messages must be a list of {'role': ..., 'content': ...} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages must not be empty")
    system: list[str] = []
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # call id -> tool name, of the assistant message being answered
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; allowed roles: {', '.join(ROLES)}")
        if role in ("system", "developer"):
            if out:
                raise ValueError(
                    f"{where} is a {role} message after the conversation started; "
                    "Gemma accepts system instructions only at the start"
                )
            system.append(_system_text(message, where))
            continue
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ValueError(
                    f"{where} has role 'tool' but no 'tool_call_id' (the id of the call it answers)"
                )
            if call_id not in calls:
                made = ", ".join(map(repr, calls)) or "none"
                raise ValueError(
                    f"{where} answers tool_call_id {call_id!r}, but the assistant message it "
                    f"follows made no call with that id (its call ids: {made})"
                )
            content = message.get("content")
            if content is None:
                raise ValueError(f"{where} (tool) has no content")
            text = content_to_text(content, where=f"{where}['content']")
            out.append(
                {"role": "tool", "tool_call_id": call_id, "name": calls[call_id], "content": text}
            )
            continue
        calls = {}
        content = message.get("content")
        if role == "user":
            if content is None:
                raise ValueError(f"{where} (user) has no content")
            parts = user_content(content, where=f"{where}['content']")  # with media: a list
            if out and out[-1]["role"] == "user":
                out[-1] = {"role": "user", "content": join_content(out[-1]["content"], parts)}
            else:
                out.append({"role": "user", "content": parts})
            continue
        turn: dict[str, Any] = {"role": "assistant"}
        raw_calls = message.get("tool_calls")
        if content is None and not raw_calls:
            raise ValueError(f"{where} (assistant) has no content")
        turn["content"] = (
            "" if content is None else content_to_text(content, where=f"{where}['content']")
        )
        if raw_calls:
            turn["tool_calls"] = _assistant_calls(raw_calls, f"{where}['tool_calls']")
            calls = {c["id"]: c["function"]["name"] for c in turn["tool_calls"] if c["id"]}
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise ValueError(f"{where} reasoning_content must be a string, got {reasoning!r}")
            turn["reasoning_content"] = reasoning
        out.append(turn)
    if not any(m["role"] == "user" for m in out):
        raise ValueError("messages hold no user message; add one")
    if out[-1]["role"] == "assistant":
        raise ValueError(
            "the conversation must end with a user message or tool results, got 'assistant' last"
        )
    if instructions:
        system.append(instructions)
    if system:
        return [{"role": "system", "content": TURN_SEPARATOR.join(system)}, *out]
    return out


def tool_declarations(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """``tools`` as the template declares them (OpenAI function entries)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.schema(),
            },
        }
        for t in tools
    ]


# --------------------------------------------------------------------- family


@dataclass(frozen=True)
class Gemma4Family:
    """Gemma 4: native system turn, thinking, and tool calls in its own control tokens."""

    name: str = "gemma4"
    chat_template: str = "gemma4_chat_template.jinja"
    end_tokens: tuple[str, ...] = END_TOKENS
    keep_special_tokens: bool = True
    control_tokens: tuple[tuple[str, str], ...] = CONTROL_TEXT
    can_think: bool = True
    #: with thinking off the generation prompt opens and closes an empty thought channel,
    #: which the next turn's rendering of the reply leaves out
    generation_tails: tuple[str, ...] = ("<|channel>thought\n<channel|>",)

    def check(self, params: SamplingParams, thinking: bool | None) -> None:
        check_thinking(thinking, self.name, self.can_think)
        grammar = self.grammar(params, thinking)
        if grammar is not None:
            error = _grammar_error(grammar)
            if error is not None:
                raise ValueError(f"the tools / response_format cannot be constrained: {error}")

    def render_inputs(
        self, messages: Messages, params: SamplingParams, thinking: bool | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        calling = bool(params.tools) and params.tool_choice != "none"
        # Tools are declared by the template; a JSON format is described in the
        # system turn as on Gemma 3.
        instructions = None if calling else system_instructions(params)
        kwargs: dict[str, Any] = {"enable_thinking": bool(thinking)}
        if calling:
            kwargs["tools"] = tool_declarations(params.tools)
        return render_messages(messages, instructions), kwargs

    def media_inputs(self, config: Mapping[str, Any] | None) -> frozenset[str] | None:
        """``gemma4`` reads images with a ``vision_config`` and audio with an ``audio_config``
        (E2B/E4B have both, 26B/31B vision only); ``gemma4_text`` reads text only."""
        return model_media(config)

    def media_placeholders(self, config: Mapping[str, Any] | None) -> Mapping[str, str]:
        # The template writes <|image|> / <|audio|>; Gemma4Processor expands each into
        # <|image> + n x <|image|> + <image|> (n: the image's soft tokens) / the audio's.
        return {"image": "<|image|>", "audio": "<|audio|>"}

    def check_media(
        self, kinds: Collection[str], model: str, config: Mapping[str, Any] | None
    ) -> None:
        if kinds:
            model_type = config.get("model_type") if config else None
            check_media(kinds, self.media_inputs(config), model, model_type)

    def processor_options(self, options: MediaOptions) -> dict[str, Any]:
        if options.pan_and_scan is not None:
            raise ValueError(
                "pan_and_scan is a Gemma 3 option; Gemma 4 reads an image at its aspect ratio "
                "within a soft-token budget (set image_soft_tokens instead)"
            )
        n = options.image_soft_tokens
        return {} if n is None else {"max_soft_tokens": n}

    def grammar(self, params: SamplingParams, thinking: bool | None) -> str | None:
        return build_grammar(
            params.tools,
            params.tool_choice,
            params.tool_choice_name,
            params.parallel_tool_calls,
            params.response_format,
            bool(thinking),
        )

    def free_prose(self, params: SamplingParams, thinking: bool | None) -> bool:
        return False  # prose is told apart by control tokens, not by its first character

    def output_parser(self, params: SamplingParams, thinking: bool | None) -> Gemma4OutputParser:
        calling = bool(params.tools) and params.tool_choice != "none"
        names = [t.name for t in params.tools if params.tool_choice_name in (None, t.name)]
        return Gemma4OutputParser(frozenset(names) if calling else None)


FAMILY = Gemma4Family()
