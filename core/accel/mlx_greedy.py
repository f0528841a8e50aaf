"""Greedy batch steps on an MLX CPU device without normalising the logits.

mlx-lm's ``BatchGenerator`` turns every step's logits into log-probabilities
(``logits - logsumexp(logits)``) before its samplers see them. On ``mlx[cpu]``
the exponentials behind ``logsumexp`` are MLX's scalar kernel: over Gemma's
262,144-token vocabulary that is 2.6 ms a row, 41 ms of a 16-row step of the
real Gemma 3 270M (a quarter of the step; numpy's products take the rest).
A greedy row needs none of it: its token is the argmax of the logits, and
subtracting one number from a row does not move its argmax (up to rounding:
two logits within one float32 rounding step of ``logits - lse`` tie there, and
mlx-lm's argmax would take the lower id; the argmax of the logits themselves
is what ``transformers`` and llama.cpp take).

:func:`skip_normalising` gives a generator's running batch a step that leaves
the normalisation out while every row of the batch is greedy
(``mlx_lm.sample_utils.greedy_sampler``), and is mlx-lm's own step otherwise
(any sampled row: top-p, top-k and min-p read log-probabilities). The step's
``logprobs`` are then the processed logits; gemma-local reads only the tokens.
"""

from __future__ import annotations

import functools
from typing import Any


def skip_normalising(generator: Any) -> bool:
    """Give ``generator`` (an mlx-lm ``BatchGenerator``) the greedy step; whether it applied
    (``False`` for an mlx-lm whose generation batch is not the one this step is written for)."""
    batch = getattr(generator, "_generation_batch", None)
    step = _step_class()
    if step is None or type(batch) is not step.__mro__[1]:
        return False
    if not all(hasattr(batch, a) for a in _STATE):
        return False
    batch.__class__ = step  # this generator's batch only; rows that join are merged into it
    return True


#: what the step reads and writes of mlx-lm's ``GenerationBatch``
_STATE = (
    "_next_tokens",
    "_next_logprobs",
    "_current_tokens",
    "_current_logprobs",
    "_token_context",
    "logits_processors",
    "samplers",
    "fallback_sampler",
    "prompt_cache",
    "tokens",
    "uids",
)


@functools.cache
def _step_class() -> type | None:
    try:
        from mlx_lm.generate import GenerationBatch
        from mlx_lm.sample_utils import greedy_sampler
    except ImportError:  # an mlx-lm without the two-part generator
        return None
    import mlx.core as mx

    class GreedyBatch(GenerationBatch):
        """mlx-lm's generation batch whose all-greedy steps skip ``logsumexp``."""

        def _step(self) -> Any:
            b: Any = self  # mlx-lm's attributes, untyped
            samplers = b.samplers or [None] * len(b.uids)
            if any((s or b.fallback_sampler) is not greedy_sampler for s in samplers):
                return super()._step()
            b._current_tokens = b._next_tokens
            b._current_logprobs = b._next_logprobs
            inputs = b._current_tokens
            logits = b.model(inputs[:, None], cache=b.prompt_cache)[:, -1, :]
            token_context = []
            if any(b.logits_processors):  # per row, as mlx-lm applies them
                rows = []
                for e in range(len(b.uids)):
                    row = logits[e : e + 1]
                    processors = b.logits_processors[e] or ()
                    if processors:
                        context = b._token_context[e].update_and_fetch(inputs[e : e + 1])
                        token_context.append(context)
                        for processor in processors:
                            row = processor(context, row)
                    rows.append(row)
                logits = mx.concatenate(rows, axis=0)
            b._next_tokens = mx.argmax(logits, axis=-1)
            b._next_logprobs = list(logits)
            mx.async_eval(b._next_tokens, b._next_logprobs, token_context)
            mx.eval(inputs, b._current_logprobs)
            inputs = inputs.tolist()
            for kept, token in zip(b.tokens, inputs, strict=True):
                kept.append(token)
            return inputs, b._current_logprobs

    return GreedyBatch
