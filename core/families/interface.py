"""What every model family answers: the :class:`Family` and :class:`OutputParser` protocols.

A family is a small frozen dataclass (see :mod:`core.families.gemma3` and
:mod:`core.families.gemma4`); the engine only ever talks to it through this
interface, so adding a family touches neither the others nor the adapters.

The data flow of one request, with the calls the engine makes::

    family = family_for(model_type)                        # once per client
    family.check(params, thinking)                         # at the API boundary, before any load
    family.check_media(kinds, model, config)               # images / audio it cannot read
    messages, kwargs = family.render_inputs(conversation, params, thinking)
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True, **kwargs)
    grammar = family.grammar(params, thinking)             # llguidance Lark, or None
    parser = family.output_parser(params, thinking)        # one per row
    for piece in detokenised text (control tokens as sentinels if family.keep_special_tokens):
        parsed = parser.feed(piece)    # -> Parsed(content, reasoning, calls)
    parsed = parser.finish()           # held-back text; a call cut short is dropped

Media (:mod:`core.media`): user content with image / audio parts renders as a
list of parts; the template writes ``family.media_placeholders(config)[kind]``
for each, and the backend's processor (with ``family.processor_options``)
expands it into the media's soft tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..constrained import ToolCall

if TYPE_CHECKING:
    from ..media import MediaOptions
    from ..params import SamplingParams

Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Parsed:
    """What one piece of a row's output turned out to be.

    ``content`` is answer text (never a control token), ``reasoning`` the
    text of the model's thinking channel and ``calls`` the tool calls this
    piece completed (each reported once, numbered by ``ToolCall.index``
    within the row).
    """

    content: str = ""
    reasoning: str = ""
    calls: tuple[ToolCall, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)

    def __add__(self, other: Parsed) -> Parsed:
        return Parsed(
            self.content + other.content,
            self.reasoning + other.reasoning,
            self.calls + other.calls,
        )


def check_thinking(thinking: Any, name: str, can_think: bool) -> None:
    """``thinking`` must be ``None`` (the default: off), ``False`` or ``True`` where allowed."""
    if thinking is not None and not isinstance(thinking, bool):
        raise TypeError(f"thinking must be True, False or None, got {thinking!r}")
    if thinking and not can_think:
        raise ValueError(
            f"thinking=True needs a model that can think; {name} models cannot "
            "(use a Gemma 4 model, or leave thinking unset)"
        )


def model_media(config: Mapping[str, Any] | None) -> frozenset[str] | None:
    """What a multimodal checkpoint reads besides text, from its ``config.json``: ``"image"``
    with a ``vision_config``, ``"audio"`` with an ``audio_config``; ``None`` without a config
    (a hub model not downloaded yet: decided after the load)."""
    if config is None:
        return None
    kinds = set()
    if config.get("vision_config") is not None:
        kinds.add("image")
    if config.get("audio_config") is not None:
        kinds.add("audio")
    return frozenset(kinds)


#: What to use instead, per media kind, in the error for a checkpoint that cannot read it.
_READERS = {
    "image": "Gemma 3 4b/12b/27b, Gemma 3n or Gemma 4",
    "audio": "Gemma 4 E2B/E4B or Gemma 3n",
}


def check_media(
    kinds: Collection[str], readable: frozenset[str] | None, model: str, model_type: str | None
) -> None:
    """``ValueError`` naming the model and what it reads if ``kinds`` holds something else.

    ``readable`` ``None`` (unknown before the checkpoint is on disk) passes.
    """
    missing = sorted(set(kinds) - (readable if readable is not None else set(kinds)))
    if not missing:
        return

    def word(kind: str) -> str:
        return "images" if kind == "image" else kind

    reads = " and ".join(["text", *map(word, sorted(readable or ()))])
    what = " or ".join(map(word, missing))
    kind = f"model_type {model_type!r}" if model_type else "its config.json"
    others = "; ".join(
        f"for {word(k)} use a {_READERS[k]} checkpoint" for k in missing if k in _READERS
    )
    raise ValueError(
        f"{model} cannot read {what}: it reads {reads} only ({kind}). "
        f"Remove the {' and '.join(missing)} parts, or {others}"
    )


class OutputParser(Protocol):
    """Turns one row's streamed text into content, reasoning and tool calls.

    ``feed`` may hold text back (a half-received marker, undecided prose);
    ``finish`` releases it at the end of the row. Concatenating every
    result's fields gives the same answer however the text was split.
    """

    @property
    def in_reasoning(self) -> bool:
        """Whether the thinking channel is open now.

        A token whose text was fed while it was open before or after the
        feed is a reasoning token (``completion_tokens_details.reasoning_tokens``;
        the channel's markers count as reasoning).
        """
        ...

    @property
    def calling(self) -> bool:
        """Whether a tool call is being written now (a reply cut off here loses it)."""
        ...

    def feed(self, text: str) -> Parsed: ...

    def finish(self) -> Parsed: ...


class Family(Protocol):
    """Everything that differs between model generations.

    Attributes:
        name: ``"gemma2"``, ``"gemma3"`` or ``"gemma4"``.
        chat_template: file name of the packaged fallback template in
            ``core/chat_templates`` (used when a checkpoint ships none).
        end_tokens: the token strings that end a reply, the preferred one
            first (the engine maps them to ids and adds the generation
            config's ``eos_token_id``).
        keep_special_tokens: the output parser reads control tokens: each id
            of ``control_tokens`` decodes as its sentinel (or nothing), every
            other special token is skipped, and stop strings match only the
            parsed answer text. ``False``: decode with
            ``skip_special_tokens=True``.
        control_tokens: ``(token text, sentinel)`` pairs (with
            ``keep_special_tokens``): the id of each token decodes as its
            sentinel, a Unicode noncharacter in U+FDD0 .. U+FDEF that ordinary
            text never holds, or as ``""`` (dropped); the parser matches
            sentinels, never spelled text (:func:`core.stream.sentinel_decoder`).
        can_think: whether ``thinking=True`` is allowed.
        generation_tails: texts the generation prompt may end with that the next turn's
            rendering of this turn does not repeat (Gemma 4 opens an empty thought channel
            when thinking is off; the history renders the reply without it). A prompt
            that ends with one is kept for prefix reuse without it (see
            :class:`core.prefix_cache.PrefixCache`).
    """

    @property
    def name(self) -> str: ...

    @property
    def chat_template(self) -> str: ...

    @property
    def end_tokens(self) -> tuple[str, ...]: ...

    @property
    def keep_special_tokens(self) -> bool: ...

    @property
    def control_tokens(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def can_think(self) -> bool: ...

    @property
    def generation_tails(self) -> tuple[str, ...]: ...

    def check(self, params: SamplingParams, thinking: bool | None) -> None:
        """Raise ``ValueError`` for what this family cannot serve (no model needed)."""
        ...

    def render_inputs(
        self, messages: Messages, params: SamplingParams, thinking: bool | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """``(messages, extra keyword arguments)`` for the chat template.

        The caller's messages are validated (``ValueError`` naming the
        message) and never mutated. The caller adds
        ``add_generation_prompt=True``.
        """
        ...

    def media_inputs(self, config: Mapping[str, Any] | None) -> frozenset[str] | None:
        """What the checkpoint with this ``config.json`` reads besides text (``"image"``,
        ``"audio"``); ``None`` when ``config`` is ``None`` (not known yet)."""
        ...

    def media_placeholders(self, config: Mapping[str, Any] | None) -> Mapping[str, str]:
        """Media kind -> the text the chat template writes for one part of that kind (the
        processor expands it into the media's soft tokens)."""
        ...

    def check_media(
        self, kinds: Collection[str], model: str, config: Mapping[str, Any] | None
    ) -> None:
        """``ValueError`` naming ``model`` and what it reads when ``kinds`` asks for more."""
        ...

    def processor_options(self, options: MediaOptions) -> dict[str, Any]:
        """The image processor's keyword arguments for the client's ``options`` (those left
        ``None`` are not sent); ``ValueError`` for an option this family has not."""
        ...

    def grammar(self, params: SamplingParams, thinking: bool | None) -> str | None:
        """The Lark grammar (llguidance dialect) the reply must match, or ``None``."""
        ...

    def free_prose(self, params: SamplingParams, thinking: bool | None) -> bool:
        """Whether a row may drop its grammar once its first token starts prose.

        True only where prose is told apart by its first character being
        something other than ``{`` (:class:`core.constrained.GrammarMatchers`'
        ``free_prose``).
        """
        ...

    def output_parser(self, params: SamplingParams, thinking: bool | None) -> OutputParser:
        """A fresh parser for one row."""
        ...
