"""Speculative decoding: a small draft model proposes tokens, the model checks them in one pass.

``draft_model=`` (a hub id or a local folder) and ``num_draft_tokens=`` on
:class:`~core.transformers_backend.GemmaTransformersChatCompletion` and
:class:`~core.mlx_backend.GemmaMLXChatCompletion`. Each backend uses its
library's own speculative decoding, on the client's model thread:

* **transformers**: ``model.generate(assistant_model=draft)`` (assisted
  generation). The draft is either a smaller model with the model's tokenizer
  (Gemma 3 270M for Gemma 3 12B) or one of Gemma 4's assistants
  (``gemma4_assistant``, e.g. ``google/gemma-4-e2b-it-assistant``), which drafts
  from the model's own last hidden state and keys and values (transformers'
  ``SinglePositionMultiTokenCandidateGenerator``). Sampled requests are
  verified by speculative sampling.
* **MLX**: ``mlx_lm.generate.speculative_generate_step`` with a draft model of
  the same tokenizer (mlx-lm has no Gemma 4 assistant).

Which requests draft (:func:`drafts`): one row, no images or audio, not
constrained (a tools / JSON grammar's mask follows the tokens already kept, not
a draft's guesses), not seeded (a seed names one draw of plain sampling), and
only when the request would decode alone: beside other requests it joins the
continuous batch as it would without a draft. Greedy output is the output
without the draft, token for token (``tests/test_speculative.py``); how much
faster it is depends on how often the model agrees with the draft, which random
test weights never show: :class:`DraftStats` counts it
(``get_model_info()["speculative"]``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import SamplingParams

#: The most tokens drafted per step (transformers and mlx-lm take any; more is never faster).
MAX_DRAFT_TOKENS = 64
#: mlx-lm's own default (``mlx_lm.generate --num-draft-tokens``).
MLX_DRAFT_TOKENS = 3


def check_options(draft_model: Any, num_draft_tokens: Any, *, backend: str) -> None:
    """Refuse bad ``draft_model`` / ``num_draft_tokens`` before anything loads."""
    if draft_model is not None:
        if not isinstance(draft_model, str) or not draft_model.strip():
            raise ValueError(
                "draft_model must be a hub id or a local folder of a smaller model with the "
                f"model's tokenizer, or None; got {draft_model!r}"
            )
        path = Path(draft_model).expanduser()
        if path.is_file() or draft_model.lower().endswith(".gguf"):
            raise ValueError(
                f"draft_model {draft_model!r} is a file; the {backend} backend loads a draft "
                "from a hub id or a folder (a GGUF draft is not supported)"
            )
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"draft_model {draft_model!r} is a folder without config.json")
    if num_draft_tokens is not None:
        if (
            isinstance(num_draft_tokens, bool)
            or not isinstance(num_draft_tokens, int)
            or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS
        ):
            raise ValueError(
                f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, "
                f"got {num_draft_tokens!r}"
            )
        if draft_model is None:
            raise ValueError(
                "num_draft_tokens is the number of tokens a draft model proposes per step; "
                "it needs draft_model"
            )


def check_vocabularies(model_name: str, vocab: int, draft_model: str, draft_vocab: int) -> None:
    """A draft proposes ids of the model's vocabulary: it may have fewer rows than the model
    (Gemma 3 4B-27B pad 262,144 tokens to 262,208 rows; 270M and 1B do not), never more."""
    if draft_vocab > vocab:
        raise ValueError(
            f"draft_model {draft_model!r} has a vocabulary of {draft_vocab} tokens and "
            f"{model_name!r} one of {vocab}: the draft could propose ids the model does not "
            "have; a draft must use the model's tokenizer (e.g. Gemma 3 270M for Gemma 3 "
            "models, a Gemma 4 assistant for Gemma 4)"
        )


def check_tokenizers(
    model_name: str, vocab: dict[str, int], draft_model: str, draft_vocab: dict[str, int]
) -> None:
    """A draft whose tokenizer differs proposes ids that mean other text: never accepted."""
    if vocab == draft_vocab:
        return
    differ = sorted(set(vocab.items()) ^ set(draft_vocab.items()), key=lambda kv: kv[1])
    raise ValueError(
        f"draft_model {draft_model!r} has another tokenizer than {model_name!r} "
        f"({len(draft_vocab)} and {len(vocab)} tokens; they differ at {len(differ)} entries, "
        f"e.g. {differ[0]!r}): a draft must use the model's tokenizer"
    )


def drafts(draft: Any, params: SamplingParams, *, rows: int, constrained: bool) -> bool:
    """Whether a text request (the caller has left out images and audio) with these options
    is served by speculative decoding with ``draft`` (``None``: the client has none)."""
    return (
        draft is not None
        and rows == 1
        and not constrained
        and (params.greedy or params.seed is None)
    )


@dataclass
class DraftStats:
    """How much the draft saved: tokens produced per pass of the model, over drafted requests."""

    requests: int = 0
    tokens: int = 0
    #: Passes of the model (each checks a draft and keeps its agreeing prefix + one token).
    passes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tokens: int, passes: int) -> None:
        with self._lock:
            self.requests += 1
            self.tokens += tokens
            self.passes += passes

    def describe(self, draft_model: str, num_draft_tokens: int | None) -> dict[str, Any]:
        with self._lock:
            per_pass = self.tokens / self.passes if self.passes else None
            return {
                "draft_model": draft_model,
                "num_draft_tokens": num_draft_tokens,
                "requests": self.requests,
                "tokens": self.tokens,
                "model_passes": self.passes,
                "tokens_per_pass": per_pass,
            }
