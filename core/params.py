"""Sampling options: one validated, immutable record built at the API boundary.

Every entry point (``create``, the LangChain and LlamaIndex adapters, the CLI)
builds a :class:`SamplingParams` through :func:`SamplingParams.build`, so bounds
are checked once, before any model is loaded, with a message that names the
option, the bad value and what is allowed. ``None`` always means "the default";
values are never merged with truthiness (``temperature=0`` is greedy, not
"unset").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .constrained import (
    ResponseFormat,
    ToolSpec,
    check_combination,
    check_grammar,
    parse_response_format,
    parse_tool_choice,
    parse_tools,
)
from .messages import check_text

MAX_STOP_SEQUENCES = 16
MAX_N = 16
#: The smallest temperature and repetition penalty backends divide logits by. A
#: smaller one is 0 in float32 (or overflows the logits it divides), which makes
#: the probabilities NaN (transformers raises mid-generation, MLX draws garbage);
#: at this size the draw is already the argmax (a logit gap of 1e-4 weighs e^100).
MIN_DIVISOR = 1e-6

#: Options ``create()`` accepts besides the sampling ones (OpenAI names that
#: have no effect locally are accepted and ignored, like the OpenAI server does
#: with ``user``).
IGNORED_OPENAI_OPTIONS = frozenset({"user", "timeout", "metadata", "store", "stream_options"})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if not _is_number(value) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    below = value <= lo if lo_open else value < lo
    if below or value > hi:
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {left}{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(value).__name__}")
    if len(items) > MAX_STOP_SEQUENCES:
        raise ValueError(f"stop allows at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}")
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"each stop sequence must be a non-empty string, got {item!r}")
    return tuple(dict.fromkeys(items))


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {value!r}")
    out = []
    for key, bias in value.items():
        # OpenAI's JSON spells the ids as strings ("106"); a float or bool key is no id.
        is_id = isinstance(key, int) and not isinstance(key, bool)
        if not is_id and not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            raise ValueError(
                f"logit_bias keys must be token ids (an int, or its digits as a string), got {key!r}"
            )
        token = int(key)
        if token < 0:
            raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
        out.append((token, _number(f"logit_bias[{key!r}]", bias, -100.0, 100.0)))
    return tuple(sorted(out))


#: OpenAI's ``reasoning_effort`` values: ``"none"`` turns thinking off, any other on.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def _thinking(thinking: Any, reasoning_effort: Any) -> bool:
    if thinking is not None and not isinstance(thinking, bool):
        raise TypeError(f"thinking must be True, False or None, got {thinking!r}")
    if reasoning_effort is None:
        return bool(thinking)
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort must be one of {', '.join(map(repr, REASONING_EFFORTS))}, "
            f"got {reasoning_effort!r}"
        )
    effort_on = reasoning_effort != "none"
    if thinking is not None and thinking != effort_on:
        raise ValueError(
            f"thinking={thinking!r} contradicts reasoning_effort={reasoning_effort!r}; pass one"
        )
    return effort_on


def _inherited_tool_choice(base: SamplingParams, tools: tuple[ToolSpec, ...]) -> Any:
    """``defaults``' tool choice in ``parse_tool_choice``'s input form, if it still applies."""
    if not base.tools or not tools:
        return None  # the default for these tools
    if base.tool_choice_name is not None:
        if base.tool_choice_name in {t.name for t in tools}:
            return {"type": "function", "function": {"name": base.tool_choice_name}}
        return None
    return base.tool_choice


@dataclass(frozen=True)
class SamplingParams:
    """Validated options of one generation request.

    Attributes:
        temperature: 0 means greedy decoding; otherwise in (0, 2].
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        max_tokens: upper bound on generated tokens (>= 1). Clipped to what is
            left of the context window after the prompt.
        stop: strings that end generation; the stop text is not returned.
        seed: makes sampling reproducible: same seed, same prompt, same output.
        repetition_penalty: > 0; 1.0 (or ``None``) disables it.
        logit_bias: (token id, bias in [-100, 100]) pairs added to the logits.
        n: number of choices to generate for one prompt.
        tools: the functions the model may call (validated OpenAI ``tools``).
        tool_choice: ``"none"`` (no calls; the tools are not described to the
            model), ``"auto"`` (prose or calls; the default when tools are
            given) or ``"required"`` (one or more calls).
        tool_choice_name: the one tool a named ``tool_choice`` forces
            (``tool_choice`` is then ``"required"`` and exactly one call is made).
        parallel_tool_calls: several calls in one reply (default ``True``).
        response_format: JSON output (``json_object`` / ``json_schema``), or
            ``None`` for text.
        thinking: let a model that can think (Gemma 4) reason before it
            answers; ``None`` (the default) and ``False`` keep thinking off.
            The thought comes back apart from the answer
            (``reasoning_content``) and counts against ``max_tokens``.
            ``reasoning_effort`` sets it as OpenAI spells it: ``"none"`` is
            off, any other effort on.

    With tools (``tool_choice`` other than ``"none"``) or a JSON
    ``response_format``, decoding is constrained by a grammar
    (:mod:`core.constrained`): see :attr:`constrained`.
    """

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 2048
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    n: int = 1
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"
    tool_choice_name: str | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    thinking: bool | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def constrained(self) -> bool:
        """Whether decoding runs under a grammar (tool calls or JSON output).

        Backends (and fast paths) that cannot mask logits every step must not
        serve such a request.
        """
        return self.response_format is not None or (bool(self.tools) and self.tool_choice != "none")

    @classmethod
    def build(
        cls,
        *,
        temperature: Any = None,
        top_p: Any = None,
        top_k: Any = None,
        max_tokens: Any = None,
        stop: Any = None,
        seed: Any = None,
        repetition_penalty: Any = None,
        logit_bias: Any = None,
        n: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: Any = None,
        response_format: Any = None,
        thinking: Any = None,
        reasoning_effort: Any = None,
        defaults: SamplingParams | None = None,
        **unknown: Any,
    ) -> SamplingParams:
        """Validate options; ``None`` keeps the value from ``defaults``.

        ``tools``, ``tool_choice``, ``parallel_tool_calls`` and
        ``response_format`` take OpenAI's shapes; every schema is compiled
        once here (llguidance), so a bad one fails before any model loads.
        """
        base = defaults or cls()
        for name in list(unknown):
            if name in IGNORED_OPENAI_OPTIONS:
                unknown.pop(name)
        if unknown:
            allowed = ", ".join(sorted(ACCEPTED_OPTIONS))
            raise TypeError(f"unexpected option(s) {sorted(unknown)}; allowed options: {allowed}")
        # Text the tokenizer or the grammar will read must be valid Unicode (a
        # lone surrogate would fail inside the tokenizer, after the model loaded).
        check_text(stop, "stop")
        check_text(tools, "tools")
        check_text(tool_choice, "tool_choice")
        check_text(response_format, "response_format")
        changes: dict[str, Any] = {}
        if temperature is not None:
            changes["temperature"] = _number("temperature", temperature, 0.0, 2.0)
        if top_p is not None:
            changes["top_p"] = _number("top_p", top_p, 0.0, 1.0, lo_open=True)
        if top_k is not None:
            changes["top_k"] = _integer("top_k", top_k, 0)
        if max_tokens is not None:
            changes["max_tokens"] = _integer("max_tokens", max_tokens, 1)
        if stop is not None:
            changes["stop"] = _stop(stop)
        if seed is not None:
            changes["seed"] = _integer("seed", seed, 0, 2**63 - 1)
        if repetition_penalty is not None:
            rp = _number("repetition_penalty", repetition_penalty, 0.0, 10.0, lo_open=True)
            changes["repetition_penalty"] = None if rp == 1.0 else rp
        if logit_bias is not None:
            changes["logit_bias"] = _logit_bias(logit_bias)
        if n is not None:
            changes["n"] = _integer("n", n, 1, MAX_N)
        if tools is not None:
            changes["tools"] = parse_tools(tools)
        if parallel_tool_calls is not None:
            if not isinstance(parallel_tool_calls, bool):
                raise ValueError(
                    f"parallel_tool_calls must be True or False, got {parallel_tool_calls!r}"
                )
            changes["parallel_tool_calls"] = parallel_tool_calls
        if response_format is not None:
            changes["response_format"] = parse_response_format(response_format)
        if thinking is not None or reasoning_effort is not None:
            changes["thinking"] = _thinking(thinking, reasoning_effort)
        if tools is not None or tool_choice is not None:
            all_tools = changes.get("tools", base.tools)
            if tool_choice is None:
                tool_choice = _inherited_tool_choice(base, all_tools)
            changes["tool_choice"], changes["tool_choice_name"] = parse_tool_choice(
                tool_choice, all_tools
            )
        params = replace(base, **changes)
        check_combination(params.tools, params.tool_choice, params.response_format)
        check_grammar(params)
        return params

    def with_max_tokens(self, max_tokens: int) -> SamplingParams:
        return replace(self, max_tokens=max_tokens)

    def in_float32(self) -> SamplingParams:
        """These options with a positive temperature / repetition penalty of at least
        :data:`MIN_DIVISOR`, what backends sample with (see there)."""
        changes: dict[str, Any] = {}
        if 0.0 < self.temperature < MIN_DIVISOR:
            changes["temperature"] = MIN_DIVISOR
        if self.repetition_penalty is not None and self.repetition_penalty < MIN_DIVISOR:
            changes["repetition_penalty"] = MIN_DIVISOR
        return replace(self, **changes) if changes else self


ACCEPTED_OPTIONS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "stop",
        "seed",
        "repetition_penalty",
        "logit_bias",
        "n",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "thinking",
        "reasoning_effort",
    }
    | IGNORED_OPENAI_OPTIONS
)
