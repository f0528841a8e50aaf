"""The transformers backend's continuous batch: left-padded rows in one ``DynamicCache``.

The scheduler (:mod:`core.scheduler`) adds rows, steps the batch and removes
rows between steps. Here, every row joins by being prefilled alone (so its
first token is exactly what a lone request gets) and its cache is merged
into the batch's, left-padded to the batch's length; rows leave by being
dropped from the cache (``batch_select_indices``) and columns every remaining
row pads are trimmed off the left. Each step decodes one token for every row
with the 2-D attention mask and per-row positions that ``generate`` uses for a
left-padded batch, so in float32 a row's tokens are the ones it gets alone.

The cache layers a Gemma model makes (full attention, sliding window: Gemma
2/3/4's local layers keep their last ``sliding_window - 1`` keys, and
KV-sharing layers that keep none) are padded and trimmed each as its kind
needs; a model whose cache holds any other kind of layer is not batched here
(:func:`supported`).

Each row's logits go through its own request's options, in ``generate``'s
order: ``logit_bias``, repetition penalty (over the row's own ids, never the
padding), the grammar mask, then greedy argmax or temperature / top-k / top-p
and a draw from the request's own ``torch.Generator`` (seeded) or torch's
default one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .prefix_cache import PrefixCache
from .scheduler import Request, Row


def supported(model: Any) -> bool:
    """Whether ``model``'s ``DynamicCache`` holds only layers this batch can pad and trim."""
    from transformers import DynamicCache, cache_utils

    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return False
    # DummyLayer (KV-shared layers) is in newer transformers releases only
    names = ("DynamicLayer", "DynamicSlidingWindowLayer", "DummyLayer")
    kinds = tuple(k for k in (getattr(cache_utils, n, None) for n in names) if k is not None)
    return bool(cache.layers) and all(type(layer) in kinds for layer in cache.layers)


def cache_keyword(model: Any) -> str:
    """The name ``model.forward`` takes its cache by: ``cache`` (transformers >= 5.2x;
    ``past_key_values`` deprecated) or ``past_key_values`` (earlier 5.x, where an unknown
    ``cache=`` would vanish into ``**kwargs`` and the model would run without it)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class _Slot:
    """A row's state in the batch: its ids so far (prompt and reply) for the penalty."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)


class _Options:
    """A request's per-row logits pipeline, built once."""

    def __init__(self, request: Request, device: Any) -> None:
        import torch

        # a temperature / repetition penalty below MIN_DIVISOR overflows float32 (what
        # generate() and MLX are given too)
        params = request.params.in_float32()
        self.params = params
        self.bias: tuple[Any, Any] | None = None
        if params.logit_bias:
            ids = torch.tensor([t for t, _ in params.logit_bias], device=device)
            values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
            self.bias = (ids, values.to(device))
        self.penalty: Any = None
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            from transformers import RepetitionPenaltyLogitsProcessor

            self.penalty = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
        self.warpers: list[Any] = []
        self.generator: Any = None
        if not params.greedy:
            from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            if params.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=params.top_p))
            if params.seed is not None:
                self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.plain = params.greedy and self.bias is None and self.penalty is None

    def token(self, row: Row, scores: Any, *, masked: bool = False) -> int:
        """``row``'s next token from its ``(1, vocab)`` float32 logits (``masked``: the
        grammar's mask is applied already)."""
        import torch

        from .constrained import disallowed_tokens

        if self.bias is not None:
            ids, values = self.bias
            scores = scores.index_add(1, ids, values[None])
        if self.penalty is not None:
            history = torch.tensor([row.state.ids], device=scores.device)
            scores = self.penalty(history, scores)
        grammar = row.grammar
        if grammar is not None and not grammar.retired[row.index] and not masked:
            blocked = torch.from_numpy(
                disallowed_tokens(grammar.fill_row(row.index), scores.shape[-1])
            )
            blocked = blocked.to(scores.device).to(scores.dtype)
            scores = scores + blocked.mul_(torch.finfo(scores.dtype).min)
        if self.params.greedy:
            return int(scores.argmax(-1).item())
        for warper in self.warpers:
            scores = warper(None, scores)
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


class TorchBatch:
    """The running batch of a transformers model (see the module docstring)."""

    feeds_grammar = False

    def __init__(self, model: Any, grammar_for: Any, prefixes: PrefixCache | None = None) -> None:
        self.model = model
        self._grammar_for = grammar_for  # (params, rows) -> GrammarMatchers | None
        #: earlier prompts' caches: a prompt that extends one is prefilled from where it ends
        self.prefixes = prefixes
        self._cache_keyword = cache_keyword(model)
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None  # (rows, length) 1 = a real token, 0 = left padding
        self.last: Any = None  # (rows, 1) each row's newest token: the next step's input

    # ------------------------------------------------------------------ rows

    def add(self, rows: Sequence[Row]) -> list[tuple[Row, int]]:
        import torch

        first: list[tuple[Row, int]] = []
        grown = list(rows)
        requests = {id(r.request): r.request for r in grown}
        for request in requests.values():
            if request.state is None:
                request.grammar = self._grammar_for(request.params, len(request.rows))
                request.state = _Options(request, self.model.device)
        with torch.inference_mode():
            for row in grown:
                cache, logits = self._prefill(row)
                row.state = _Slot(row.prompt.ids)
                token = row.request.state.token(row, logits)
                row.state.ids.append(token)
                self._merge(row, cache, token)
                first.append((row, token))
        return first

    def _prefill(self, row: Row) -> tuple[Any, Any]:
        """``row``'s prompt alone in a cache of its own: from a copy of the longest stored
        prompt it extends (only the rest runs), else from scratch; the result is stored."""
        import copy

        import torch
        from transformers import DynamicCache

        device = self.model.device
        prompt = row.prompt.ids
        hit = self.prefixes.lookup(prompt) if self.prefixes is not None else None
        start, cache = (
            (hit[0], copy.deepcopy(hit[1])) if hit else (0, DynamicCache(config=self.model.config))
        )
        # the part later turns repeat is stored (a tail they do not, e.g. Gemma 4's empty
        # thought channel, runs after the copy is taken)
        prefixes = self.prefixes
        cut = len(prompt) if prefixes is None else prefixes.cut(prompt)
        keep = prefixes is not None and start < cut and prefixes.wants(prompt[:cut])
        out: Any = None
        for begin, end in ((start, cut), (cut, len(prompt))) if keep else ((start, len(prompt)),):
            if begin == end:
                continue
            out = self.model(
                input_ids=torch.tensor([prompt[begin:end]], device=device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                position_ids=torch.arange(begin, end, device=device)[None],
                **{self._cache_keyword: cache},
                use_cache=True,
                logits_to_keep=1,
            )
            if keep and end == cut and prefixes is not None:
                prefixes.store(prompt[:cut], copy.deepcopy(cache))
        return cache, out.logits[:, -1, :].to(dtype=torch.float32)

    def _merge(self, row: Row, cache: Any, token: int) -> None:
        import torch

        length = len(row.prompt.ids)
        device = self.model.device
        if self.cache is None:
            self.cache = cache
            self.mask = torch.ones((1, length), dtype=torch.long, device=device)
            self.last = torch.tensor([[token]], device=device)
            self.rows = [row]
            return
        width = self.mask.shape[1]
        if length < width:
            _pad(cache, width)
            mask = torch.cat(
                [
                    torch.zeros((1, width - length), dtype=torch.long, device=device),
                    torch.ones((1, length), dtype=torch.long, device=device),
                ],
                dim=1,
            )
        else:
            mask = torch.ones((1, length), dtype=torch.long, device=device)
            if length > width:
                _pad(self.cache, length)
                pad = torch.zeros(
                    (self.mask.shape[0], length - width), dtype=torch.long, device=device
                )
                self.mask = torch.cat([pad, self.mask], dim=1)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            if _holds(mine):
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])
        self.last = torch.cat([self.last, torch.tensor([[token]], device=device)])
        self.rows.append(row)

    def remove(self, rows: Sequence[Row]) -> None:
        import torch

        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        for row in rows:
            row.state = None
        if not keep:
            self.close()
            return
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, device=self.model.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.last = self.last[index]
        # Columns every remaining row pads: trimmed, so the batch is as short as its longest row.
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0].item()) if real.numel() else 0
        if start:
            _trim(self.cache, self.mask.shape[1], start)
            self.mask = self.mask[:, start:]

    def close(self) -> None:
        for row in self.rows:
            row.state = None
        self.rows, self.cache, self.mask, self.last = [], None, None, None

    # ------------------------------------------------------------------ step

    def step(self) -> list[tuple[Row, int]]:
        import torch

        if not self.rows:
            return []
        device = self.model.device
        ones = torch.ones((self.mask.shape[0], 1), dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        with torch.inference_mode():
            out = self.model(
                input_ids=self.last,
                attention_mask=self.mask,
                position_ids=positions,
                **{self._cache_keyword: self.cache},
                use_cache=True,
                logits_to_keep=1,
            )
            scores = out.logits[:, -1, :].to(dtype=torch.float32)
            greedy = scores.argmax(dim=-1).tolist()
            tokens: list[int] = []
            for i, row in enumerate(self.rows):
                options = row.request.state
                if options.plain and row.grammar is None:
                    token = int(greedy[i])
                else:
                    token = options.token(row, scores[i : i + 1])
                row.state.ids.append(token)
                tokens.append(token)
        self.last = torch.tensor(tokens, device=device)[:, None]
        return list(zip(self.rows, tokens, strict=True))


def _holds(layer: Any) -> bool:
    """Whether a cache layer holds keys (KV-sharing and dummy layers hold none)."""
    return (
        bool(getattr(layer, "is_initialized", False)) and getattr(layer, "keys", None) is not None
    )


def _pad(cache: Any, length: int) -> None:
    """Left-pad every layer of a cache to a total length of ``length`` tokens."""
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicSlidingWindowLayer

    for layer in cache.layers:
        if not _holds(layer):
            continue
        want = length
        if isinstance(layer, DynamicSlidingWindowLayer):
            want = min(length, layer.sliding_window - 1)
            layer.cumulative_length = length
        pad = want - layer.keys.shape[-2]
        if pad > 0:
            layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
            layer.values = F.pad(layer.values, (0, 0, pad, 0))


def _trim(cache: Any, length: int, start: int) -> None:
    """Drop the first ``start`` of ``length`` columns from every layer of a cache."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    remaining = length - start
    for layer in cache.layers:
        if not _holds(layer):
            continue
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = remaining
            keep = min(remaining, layer.sliding_window - 1)
        else:
            keep = remaining
        if layer.keys.shape[-2] > keep:
            layer.keys = layer.keys[:, :, -keep:, :]
            layer.values = layer.values[:, :, -keep:, :]
