"""Helpers shared by the ``test_core_*`` modules (this module holds no tests).

* :func:`generated_ids` runs a client's token primitive directly with a sink
  that records every token id the backend produced, so tests can compare ids
  (detokenizer-independent) and check ``create()`` against ``tokenizer.decode``.
* :class:`ScriptedClient` is the fake backend of the fast tier: the real tiny
  tokenizer, no model, and a script of token ids per request (``enqueue``);
  ``history`` records what every request asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core import BaseGemmaChatCompletion, Delta, Prompt, SamplingParams
from core.stream import TokenSink

USER = [{"role": "user", "content": "Write a short poem about the sea."}]
#: A few prompts of different lengths and shapes (system, multi-turn).
PROMPTS = [
    USER,
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And the capital of Italy?"},
    ],
]
BOS, EOS, START_OF_TURN, END_OF_TURN = 2, 1, 105, 106


class CapturingSink(TokenSink):
    """A :class:`TokenSink` that also records the ids each row was fed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ids: list[list[int]] = [[] for _ in self.rows]

    def push(self, tokens: Sequence[int]) -> None:
        for row, token in zip(self.rows, tokens, strict=True):
            if row.finish_reason is None:
                self.ids[row.index].append(int(token))
        super().push(tokens)

    def push_row(self, index: int, token: int) -> None:
        if self.rows[index].finish_reason is None:
            self.ids[index].append(int(token))
        super().push_row(index, token)


def generated_ids(
    client: BaseGemmaChatCompletion, messages: Any, **options: Any
) -> tuple[list[int], list[Delta]]:
    """The token ids the backend generates for ``messages`` (greedy unless told), and the deltas.

    Runs the client's own ``_prompt`` / ``_generate`` on its model thread,
    exactly as a request does, with a recording sink.
    """
    params = SamplingParams.build(**{"temperature": 0, **options})
    client.load()
    deltas: list[Delta] = []

    def job() -> list[int]:
        prompt = client._prompt(messages)
        sink = CapturingSink(
            [prompt],
            params,
            client._decode,
            client._eos_ids,
            deltas.append,
            threading.Event(),
            client._context_window,
            byte_ids=client._byte_ids,
            skipped_ids=client._skipped_ids,
        )
        client._generate([prompt], params, sink)
        sink.close()
        return sink.ids[0]

    return client._worker.call(job), deltas


def content(completion: dict[str, Any], index: int = 0) -> str:
    return completion["choices"][index]["message"]["content"]


def stream_text(chunks: Sequence[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


class ScriptedClient(BaseGemmaChatCompletion):
    """A fake backend: the real tiny tokenizer, no model, scripted token ids.

    ``enqueue(ids)`` queues the ids the next request's rows produce (one list
    per request, used for every row); ``history`` holds ``(prompts, params)``
    of every request. ``on_token(index, step)`` is called before each token is
    pushed (tests use it to raise or to block).
    """

    implementation = "scripted"

    def __init__(self, tokenizer_path: Path | str) -> None:
        super().__init__(str(tokenizer_path))
        self.script: list[list[int]] = []
        self.history: list[tuple[list[Prompt], SamplingParams]] = []
        self.on_token: Callable[[int, int], None] | None = None
        self.pushed = 0

    def enqueue(self, ids: Sequence[int]) -> None:
        self.script.append(list(ids))

    def _load_model_and_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.model = object()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        self.history.append((list(prompts), params))
        ids = self.script.pop(0) if self.script else []
        for step, token in enumerate(ids):
            if sink.done:
                return
            if self.on_token is not None:
                self.on_token(0, step)
            sink.push([token] * len(prompts))
            self.pushed += 1


class Gemma4ScriptedClient(ScriptedClient):
    """:class:`ScriptedClient` on a Gemma 4 checkpoint folder: its real tokenizer (control
    tokens at their real ids), and its ``config.json`` picks the Gemma 4 family.

    It accepts tools and ``response_format`` (``supports_constraints``): the script
    stands for what the grammar lets the model write, so tests script canonical
    calls. :meth:`ids` and :meth:`spelled` build scripts.
    """

    supports_constraints = True

    def ids(self, *parts: str | int) -> list[int]:
        """Token ids of ``parts``: an int as it is, a control token (``"<|channel>"``) as
        its id, any other string as the tokenizer encodes it (no special tokens added)."""
        self.load()
        tok = self.tokenizer
        out: list[int] = []
        for part in parts:
            if isinstance(part, int):
                out.append(part)
            elif part in tok.get_added_vocab():
                out.append(int(tok.convert_tokens_to_ids(part)))
            else:
                out += tok.encode(part, add_special_tokens=False)
        return out

    def spelled(self, text: str) -> list[int]:
        """``text`` one plain token per character (a space is ``▁``): a marker such as
        ``<channel|>`` written as ordinary text, split across many tokens."""
        self.load()
        vocab = self.tokenizer.get_vocab()
        missing = [c for c in text if ("▁" if c == " " else c) not in vocab]
        if missing:
            raise ValueError(f"characters without a token of their own: {missing!r}")
        return [int(vocab["▁" if c == " " else c]) for c in text]
