"""Structured output for :class:`~llama_index_gemma_local.GemmaLocal`: a pydantic class
as core's ``response_format``, and the reply back as an instance of it.

    Model ──json_schema_format()──▶ {"type": "json_schema", "json_schema": {..., "strict": True}}
    ChatResponse ──parse_structured(Model, ...)──▶ Model   (a reply cut off by max_tokens
        raises ValueError saying so)
"""

from __future__ import annotations

import re
from typing import Any

from llama_index.core.base.llms.types import ChatResponse
from llama_index.core.types import Model


def json_schema_format(output_cls: type[Any]) -> dict[str, Any]:
    """Core's ``response_format`` for a pydantic class: its JSON schema, strict."""
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", output_cls.__name__)
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": output_cls.model_json_schema(), "strict": True},
    }


def parse_structured(output_cls: type[Model], response: ChatResponse) -> Model:
    """The reply of a ``json_schema`` request as ``output_cls``.

    Under the grammar the reply always validates once it is complete; a reply
    cut short by ``max_tokens`` is not, and says so.
    """
    text = response.message.content or ""
    if response.additional_kwargs.get("finish_reason") == "length":
        used = response.additional_kwargs.get("completion_tokens")
        raise ValueError(
            f"the {output_cls.__name__} JSON was cut off after {used} tokens, before it was "
            "complete (max_tokens, or what the context window left after the prompt); raise "
            f"max_tokens (e.g. llm_kwargs={{'max_tokens': ...}}). Partial output: {text!r}"
        )
    return output_cls.model_validate_json(text)
