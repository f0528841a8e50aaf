"""Model families: what differs between Gemma generations, one module each.

:func:`family_for` picks the family from a checkpoint's ``config.json``
``model_type``; the engine asks the family how messages become the chat
template's input, which tokens end a reply, how text is decoded, which
grammar constrains tools / JSON output and how the output splits into
content, reasoning and tool calls (the :class:`Family` protocol).

=========  ===============================================  =====================
family     model types                                      module
=========  ===============================================  =====================
gemma2     ``gemma``, ``gemma2``                            :mod:`.gemma2`
gemma3     ``gemma3``, ``gemma3_text``, ``gemma3n``,        :mod:`.gemma3`
           ``gemma3n_text``; any other model type
gemma4     ``gemma4``, ``gemma4_text``, ``gemma4_unified``  :mod:`.gemma4`
=========  ===============================================  =====================

Adding a family: a module with a frozen dataclass that answers
:class:`Family` and a ``FAMILY`` instance, and its model types in
:data:`MODEL_TYPES`. Importing this package is cheap (no torch,
transformers, mlx or llguidance).
"""

from __future__ import annotations

from . import gemma2, gemma3, gemma4
from .interface import Family, Messages, OutputParser, Parsed

#: Every family by name.
FAMILIES: dict[str, Family] = {
    "gemma2": gemma2.FAMILY,
    "gemma3": gemma3.FAMILY,
    "gemma4": gemma4.FAMILY,
}
#: ``config.json`` ``model_type`` -> family name.
MODEL_TYPES = {
    "gemma": "gemma2",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gemma3n": "gemma3",
    "gemma3n_text": "gemma3",
    "gemma4": "gemma4",
    "gemma4_text": "gemma4",
    "gemma4_unified": "gemma4",
}
#: The family of a model type this table does not know.
DEFAULT_FAMILY = "gemma3"
#: ``model_type`` -> the transformers class its text model loads with, where
#: ``AutoModelForCausalLM``'s choice does not serve text: for ``gemma3n`` it builds
#: ``Gemma3nForConditionalGeneration``, whose vision tower needs ``timm``, while
#: ``Gemma3nForCausalLM`` loads the multimodal checkpoint's language model by itself.
#: (Multimodal ``gemma3`` / ``gemma4`` load as ``...ForConditionalGeneration``, which
#: serves text as it is.)
TRANSFORMERS_TEXT_CLASSES = {"gemma3n": "Gemma3nForCausalLM"}


#: Hub-name spellings of each generation, for a model whose config.json is not on disk yet
#: (``google/gemma-4-E4B-it``, ``mlx-community/gemma-3-12b-it-4bit``, ``gemma-3n-E2B``).
_NAMED_TYPES = (
    ("gemma-4", "gemma4"),
    ("gemma4", "gemma4"),
    ("gemma-3n", "gemma3n"),
    ("gemma3n", "gemma3n"),
    ("gemma-3", "gemma3"),
    ("gemma3", "gemma3"),
    ("gemma-2", "gemma2"),
    ("gemma2", "gemma2"),
)


def model_type_from_name(model_name: str) -> str | None:
    """The ``model_type`` a model's name spells (``"gemma4"`` for ``google/gemma-4-E4B-it``), or
    ``None``: what the engine goes by before the checkpoint's ``config.json`` can be read."""
    name = model_name.lower().rsplit("/", 1)[-1]
    for spelling, model_type in _NAMED_TYPES:
        if spelling in name:
            return model_type
    return None


def transformers_text_class(model_type: str | None) -> str | None:
    """The transformers class name to load ``model_type``'s text model with, or ``None``
    for ``AutoModelForCausalLM``'s choice (:data:`TRANSFORMERS_TEXT_CLASSES`)."""
    return TRANSFORMERS_TEXT_CLASSES.get(model_type or "")


def family_for(model_type: str | None) -> Family:
    """The family of a checkpoint's ``model_type`` (Gemma 3's for unknown or ``None``)."""
    return FAMILIES[MODEL_TYPES.get(model_type or "", DEFAULT_FAMILY)]


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "MODEL_TYPES",
    "TRANSFORMERS_TEXT_CLASSES",
    "Family",
    "Messages",
    "OutputParser",
    "Parsed",
    "family_for",
    "model_type_from_name",
    "transformers_text_class",
]
