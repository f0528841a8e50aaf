"""LangChain's own standard test suites, run on both backends against a tiny Gemma 3.

The unit suites construct models only (nothing loads). The integration suites
generate with a tiny random-weight checkpoint through the real loading code,
sharing the session's clients (``tf_client`` / ``mlx_client`` from conftest),
so the suite's many model instances load the weights once per backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_gemma_local import ChatGemmaLocal

#: Few new tokens keep the suites fast on a 2-core CPU; every reply is non-empty
#: text because greedy decoding of the tiny model never starts with an end token
#: for the suites' prompts.
MAX_TOKENS = 8


class _Capabilities:
    """Truthful capability flags (tool calling and structured output come later)."""

    @property
    def chat_model_class(self) -> type[ChatGemmaLocal]:
        return ChatGemmaLocal

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        # one client serves one model; a per-call model= must name that model
        return False


class _Unit(_Capabilities, ChatModelUnitTests):
    backend: str

    @pytest.fixture(autouse=True)
    def _checkpoint(self, gemma3_path: Path) -> None:
        self._path = str(gemma3_path)

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": self._path, "backend": self.backend}


class TestTransformersUnit(_Unit):
    backend = "transformers"


class TestMLXUnit(_Unit):
    backend = "mlx"


class _Integration(_Capabilities, ChatModelIntegrationTests):
    client_fixture: str

    @pytest.fixture(autouse=True)
    def _shared_client(self, request: pytest.FixtureRequest) -> None:
        self._client = request.getfixturevalue(self.client_fixture)

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"client": self._client, "max_tokens": MAX_TOKENS}


class TestTransformersIntegration(_Integration):
    client_fixture = "tf_client"


class TestMLXIntegration(_Integration):
    client_fixture = "mlx_client"
