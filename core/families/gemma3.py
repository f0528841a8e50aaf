"""The Gemma 3 family (``gemma3``, ``gemma3_text``, ``gemma3n``; also the default).

No control tokens for tools or thinking: a call is JSON text in the format
the system prompt asks for, constrained by the grammar of
:mod:`core.constrained`, and tool results are ```` ```tool_output ````
blocks in a user turn (see :mod:`core.messages`). This module only delegates
to those functions, so Gemma 1/2/3 behave exactly as before; Gemma 2 is the
same family with a template that rejects the system role
(:mod:`core.families.gemma2`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..constrained import (
    ToolCall,
    ToolCallParser,
    grammar_for,
    system_instructions,
    tool_call_parser,
)
from ..messages import normalize_messages
from .interface import Messages, Parsed, check_media, check_thinking, model_media

if TYPE_CHECKING:
    from ..media import MediaOptions
    from ..params import SamplingParams


class TextOutputParser:
    """Text as it comes, or JSON tool calls through :class:`~core.constrained.ToolCallParser`."""

    def __init__(self, calls: ToolCallParser | None) -> None:
        self._calls = calls

    def feed(self, text: str) -> Parsed:
        calls: tuple[ToolCall, ...] = ()
        if self._calls is not None:
            text, calls = self._calls.feed(text)
        return Parsed(text, "", calls)

    @property
    def in_reasoning(self) -> bool:
        return False  # Gemma 1/2/3 cannot think

    @property
    def calling(self) -> bool:
        return self._calls is not None and self._calls.calling

    @property
    def partial_call(self) -> str:
        """The text of the call being written, ``""`` outside a call."""
        return self._calls.partial_call if self._calls is not None else ""

    def finish(self) -> Parsed:
        return Parsed()  # ToolCallParser holds back nothing but a call cut short


def _developer_as_system(messages: Any) -> Any:
    """``developer`` (OpenAI's newer name for ``system``) read as ``system``; a new list.

    Anything but a list goes on unchanged: :func:`normalize_messages` says what is wrong.
    """
    if not isinstance(messages, (list, tuple)):
        return messages
    return [
        {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
        for m in messages
    ]


@dataclass(frozen=True)
class Gemma3Family:
    """Gemma 1/2/3: the system text folded or passed as a system message, JSON calls.

    ``system_role``: whether the chat template accepts a leading system
    message (the engine may ``dataclasses.replace`` it with what it probed on
    the checkpoint's own template).
    """

    name: str = "gemma3"
    chat_template: str = "gemma3_chat_template.jinja"
    system_role: bool = True
    end_tokens: tuple[str, ...] = ("<end_of_turn>", "<eos>")
    keep_special_tokens: bool = False
    control_tokens: tuple[tuple[str, str], ...] = ()  # decoded with skip_special_tokens=True
    can_think: bool = False
    generation_tails: tuple[str, ...] = ()  # a turn renders in the history as it was prompted

    def check(self, params: SamplingParams, thinking: bool | None) -> None:
        check_thinking(thinking, self.name, self.can_think)

    def render_inputs(
        self, messages: Messages, params: SamplingParams, thinking: bool | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        self.check(params, thinking)
        turns = normalize_messages(
            _developer_as_system(messages),
            system_role=self.system_role,
            instructions=system_instructions(params),
        )
        return [dict(t) for t in turns], {}

    def media_inputs(self, config: Mapping[str, Any] | None) -> frozenset[str] | None:
        """Gemma 3 4b/12b/27b (``gemma3`` with a SigLIP ``vision_config``) read images, Gemma
        3n images and audio; ``gemma3_text`` (1b, 270m) and Gemma 1/2 read text only."""
        return model_media(config)

    def media_placeholders(self, config: Mapping[str, Any] | None) -> Mapping[str, str]:
        # The Gemma 3 template writes <start_of_image> for an image part; Gemma3Processor
        # expands it to "\n\n<start_of_image>" + 256 x <image_soft_token> + "<end_of_image>\n\n".
        # Gemma 3n's writes <image_soft_token> / <audio_soft_token>, which Gemma3nProcessor
        # expands the same way (256 image / 188 audio soft tokens between <start_of_...>
        # and <end_of_...>).
        if config and config.get("model_type") in ("gemma3n", "gemma3n_text"):
            return {"image": "<image_soft_token>", "audio": "<audio_soft_token>"}
        return {"image": "<start_of_image>"}

    def check_media(
        self, kinds: Collection[str], model: str, config: Mapping[str, Any] | None
    ) -> None:
        if kinds:
            model_type = config.get("model_type") if config else None
            check_media(kinds, self.media_inputs(config), model, model_type)

    def processor_options(self, options: MediaOptions) -> dict[str, Any]:
        if options.image_soft_tokens is not None:
            raise ValueError(
                "image_soft_tokens is a Gemma 4 option; Gemma 3 reads every image as 256 "
                "soft tokens (use pan_and_scan=True to also read crops of a large image)"
            )
        return {} if options.pan_and_scan is None else {"do_pan_and_scan": options.pan_and_scan}

    def grammar(self, params: SamplingParams, thinking: bool | None) -> str | None:
        self.check(params, thinking)
        return grammar_for(params)

    def free_prose(self, params: SamplingParams, thinking: bool | None) -> bool:
        return bool(params.tools) and params.tool_choice == "auto"

    def output_parser(self, params: SamplingParams, thinking: bool | None) -> TextOutputParser:
        self.check(params, thinking)
        return TextOutputParser(tool_call_parser(params))


FAMILY = Gemma3Family()
