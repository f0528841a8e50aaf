"""``structured_predict`` / ``as_structured_llm`` through ``GemmaLocal``'s chat path.

Until constrained decoding lands, LlamaIndex takes its text-parsing route for
a chat model without function calling: ``LLMTextCompletionProgram`` asks the
model for JSON matching the class's schema and parses the reply. A random
-weight tiny model cannot write valid JSON, so the two outcomes are tested on
two honest setups:

* **failure**, on the real tiny checkpoints of both backends: the reply is
  forced (``logit_bias``) to a fixed non-JSON text; LlamaIndex raises its
  parse error quoting that raw output, and the LLM stays usable.
* **success**, on :class:`ScriptedGemma`: a ``core.BaseGemmaChatCompletion``
  subclass of the original design (``_load_model_and_tokenizer`` +
  ``_generate_response``) that answers a scripted JSON string, with the real
  tiny Gemma tokenizer for templating and counting. Everything between
  LlamaIndex and the model (chat template, ``create``, the token stream,
  counting, our mapping) is the real code; only the text is scripted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, ValidationError

from core import BaseGemmaChatCompletion
from llama_index_gemma_local import GemmaLocal


class Song(BaseModel):
    """A song with its title and year."""

    title: str
    year: int


SONG = {"title": "Sea Fever", "year": 1902}
PROMPT = PromptTemplate("Name a song about {topic}.")


class ScriptedGemma(BaseGemmaChatCompletion):
    """A core client whose model answers what was enqueued (simonw/llm-style fake).

    ``history`` records every rendered prompt and the sampling options it got.
    """

    implementation = "scripted"

    def __init__(self, tokenizer_path: Path) -> None:
        super().__init__(str(tokenizer_path))
        self.replies: list[str] = []
        self.history: list[dict[str, Any]] = []

    def enqueue(self, *replies: str) -> ScriptedGemma:
        self.replies.extend(replies)
        return self

    def _load_model_and_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.model = object()

    def _generate_response(
        self, prompt_str: str, temperature: float, max_tokens: int, top_p: float, **kwargs: Any
    ) -> str:
        self.history.append(
            {"prompt": prompt_str, "temperature": temperature, "max_tokens": max_tokens, **kwargs}
        )
        return self.replies.pop(0)


@pytest.fixture
def scripted(gemma3_path: Path) -> ScriptedGemma:
    client = ScriptedGemma(gemma3_path)
    yield client
    client.close()


@pytest.fixture
def scripted_llm(scripted: ScriptedGemma) -> GemmaLocal:
    return GemmaLocal(client=scripted, temperature=0.2, max_tokens=256)


def _is_gemma_prompt(prompt: str, *needles: str) -> bool:
    """Rendered by the Gemma chat template: one user turn, then the model's turn."""
    return (
        prompt.startswith("<bos><start_of_turn>user\n")
        and prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
        and all(n in prompt for n in needles)
    )


# ------------------------------------------------------------------ success


def test_structured_predict(scripted: ScriptedGemma, scripted_llm: GemmaLocal) -> None:
    scripted.enqueue(json.dumps(SONG))
    song = scripted_llm.structured_predict(Song, PROMPT, topic="the sea")
    assert song == Song(**SONG)
    [call] = scripted.history
    # the schema instructions and the prompt went through the Gemma chat template
    assert _is_gemma_prompt(call["prompt"], "Name a song about the sea.", '"year"')
    assert call["temperature"] == 0.2


def test_structured_predict_passes_llm_kwargs(
    scripted: ScriptedGemma, scripted_llm: GemmaLocal
) -> None:
    scripted.enqueue("Here it is:\n```json\n" + json.dumps(SONG) + "\n```")
    song = scripted_llm.structured_predict(
        Song, PROMPT, llm_kwargs={"temperature": 0.9, "max_tokens": 100}, topic="rain"
    )
    assert song.year == 1902
    assert scripted.history[-1]["temperature"] == 0.9
    assert scripted.history[-1]["max_tokens"] == 100


async def test_astructured_predict(scripted: ScriptedGemma, scripted_llm: GemmaLocal) -> None:
    scripted.enqueue(json.dumps(SONG))
    assert await scripted_llm.astructured_predict(Song, PROMPT, topic="wind") == Song(**SONG)
    assert _is_gemma_prompt(scripted.history[-1]["prompt"], "Name a song about wind.")


async def test_as_structured_llm(scripted: ScriptedGemma, scripted_llm: GemmaLocal) -> None:
    structured = scripted_llm.as_structured_llm(Song)
    scripted.enqueue(json.dumps(SONG), json.dumps({"title": "Tide", "year": 2001}))
    response = structured.chat([ChatMessage(role="user", content="Name a song.")])
    assert response.raw == Song(**SONG)
    assert json.loads(response.message.content) == SONG
    response = await structured.achat([ChatMessage(role="user", content="Another one.")])
    assert response.raw == Song(title="Tide", year=2001)
    assert _is_gemma_prompt(scripted.history[-1]["prompt"], "Another one.")


def test_schema_mismatch_and_recovery(scripted: ScriptedGemma, scripted_llm: GemmaLocal) -> None:
    scripted.enqueue('{"title": "No year"}', json.dumps(SONG))
    with pytest.raises(ValidationError, match="year"):
        scripted_llm.structured_predict(Song, PROMPT, topic="x")
    assert scripted_llm.structured_predict(Song, PROMPT, topic="x") == Song(**SONG)


# ------------------------------------------------------------------ failure


def test_structured_predict_failure_on_the_real_model(client) -> None:
    """Gibberish is not JSON: LlamaIndex's parse error quotes the raw reply; the LLM still works."""
    token_a = client.load().tokenizer.convert_tokens_to_ids("a")
    llm = GemmaLocal(client=client, temperature=0, max_tokens=6)
    with pytest.raises(ValueError, match=r"Could not extract json string from output: aaaa$"):
        llm.structured_predict(
            Song, PROMPT, llm_kwargs={"logit_bias": {token_a: 100}, "max_tokens": 4}, topic="x"
        )
    with pytest.raises(ValueError, match="Could not extract json string"):
        llm.as_structured_llm(Song).chat(
            [ChatMessage(role="user", content="Name a song.")],
            logit_bias={token_a: 100},
            max_tokens=4,
        )
    expected = client.create([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=6)
    response = llm.chat([ChatMessage(role="user", content="Hi")])
    assert response.message.content == expected["choices"][0]["message"]["content"]
