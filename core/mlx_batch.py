"""The MLX backend's continuous batch: one mlx-lm ``BatchGenerator`` that rows join and leave.

mlx-lm's ``BatchGenerator`` inserts and removes rows between steps, with a
sampler and logits processors per row; the scheduler (:mod:`core.scheduler`)
drives it. Each joining row's prompt (all but its last token) is prefilled
into a cache of its own, without padding (on a CPU device, a row per MLX CPU
stream at a time: :meth:`GemmaMLXChatCompletion._prefill_rows`); its last
prompt token then runs alone and its first token is sampled there and then
(as ``generate_step`` does: the row's processors see the whole prompt), so the
first token is out without waiting for a step of the whole batch (mlx-lm's
generator reads a new row's first token only after one more batch step).
The row is inserted with that cache and its first token as input, so it
decodes what it would alone. On a CPU
device the batch steps through the split step over the CPU streams
(:func:`core.accel.mlx_split_step`) where it applies, and where it does not
(quantized projections) each stream decodes its own rows in a generator of its
own (a joining row goes to the one with the fewest), stepped in turn.

End tokens, stop strings and ``max_tokens`` are the sink's business: the
generator is given no stop tokens and one token more than the row may take,
and rows leave when the scheduler removes them. Grammar rows feed their
matcher inside their logits processor (:func:`~core.constrained.mlx_grammar_processor`),
since mlx-lm computes the next step before the current tokens are read.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .scheduler import Row


def _default() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _mergeable(caches: Sequence[Any]) -> bool:
    """Whether mlx-lm can merge these per-row caches into one batch cache and back: every
    layer's caches of one class with ``merge`` (plain and rotating KV caches)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    return all(
        type(layer[0]) in (KVCache, RotatingKVCache)
        and all(type(c) is type(layer[0]) for c in layer)
        for layer in zip(*caches, strict=True)
    )


class _Sink:
    """What :meth:`_prefill_rows` checks between waves: nobody cancels a prefill here."""

    done = False


class MLXBatch:
    """The running batch of an MLX model (see the module docstring)."""

    feeds_grammar = True

    def __init__(self, client: Any, max_rows: int) -> None:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_sampler

        from . import accel

        self._client = client
        self._streams: list[Any] = [None]
        decoder = None
        cpu = mx.default_device().type == mx.DeviceType.cpu
        if cpu:
            wanted = client._streams_wanted()
            if wanted > 1:
                self._streams = accel.mlx_cpu_streams(wanted)
                decoder = client._split_decoder(self._streams)
        self._greedy = make_sampler(temp=0.0)
        plan = (
            [(decoder, self._streams[0])]
            if decoder is not None
            else [(client.model, stream) for stream in self._streams]
        )
        self.generators = [
            BatchGenerator(
                model,
                stop_tokens=None,
                sampler=self._greedy,
                completion_batch_size=max_rows,
                prefill_batch_size=max_rows,
                prefill_step_size=client.prefill_step_size,
                max_kv_size=client.max_kv_size,
                stream=stream,
            )
            for model, stream in plan
        ]
        self._cpu = cpu
        if cpu:  # all-greedy steps without MLX's scalar logsumexp over the vocabulary
            for generator in self.generators:
                accel.mlx_greedy_steps(generator)
        #: uid -> row, per generator
        self._rows: list[dict[int, Row]] = [{} for _ in self.generators]

    def add(self, rows: Sequence[Row]) -> list[tuple[Row, int]]:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_logits_processors

        from .constrained import mlx_grammar_processor
        from .mlx_backend import make_request_sampler

        client = self._client
        for request in {id(r.request): r.request for r in rows}.values():
            if request.state is None:
                params = request.params.in_float32()
                request.grammar = client._grammar_matchers(params, len(request.rows))
                shared = make_logits_processors(
                    logit_bias=dict(params.logit_bias) or None,
                    repetition_penalty=params.repetition_penalty,
                )
                sampler = self._greedy if params.greedy else make_request_sampler(params)
                request.state = (sampler, shared)
        all_prompts = [row.prompt for row in rows]
        caches: list[Any] = [None] * len(rows)
        stream_of: list[Any] = [None] * len(rows)
        # a prompt that extends a kept one starts from a copy of its cache
        fresh = []
        for i, prompt in enumerate(all_prompts):
            hit = client.prompt_cache.lookup(prompt.ids)
            if hit is None:
                fresh.append(i)
                continue
            caches[i] = copy.deepcopy(hit[1])
            self._prefill([prompt], [caches[i]], start=hit[0])
        prompts = [all_prompts[i] for i in fresh]
        if len(self._streams) > 1 and prompts and all(len(p.ids) > 1 for p in prompts):
            groups = client._stream_groups(prompts)
            streams = self._streams[: len(groups)]
            made = client._prefill_rows(prompts, groups, streams, _Sink())
            for group, stream in zip(groups, streams, strict=True):
                for i in group:
                    stream_of[fresh[i]] = stream
        else:
            made = [make_prompt_cache(client.model, client.max_kv_size) for _ in prompts]
            self._prefill(prompts, made)
        for i, cache in zip(fresh, made, strict=True):
            caches[i] = cache
        prompts = all_prompts
        processors = []
        for row in rows:
            _, shared = row.request.state
            grammar = row.request.grammar
            own = [] if grammar is None else [mlx_grammar_processor(grammar, row.index)]
            processors.append([*shared, *own])
        firsts = self._first_tokens(rows, caches, processors, stream_of)  # caches: and its KV
        kept = client.prompt_cache
        for prompt, cache in zip(prompts, caches, strict=True):  # before the generator has them
            if kept.cut(prompt.ids) == len(prompt.ids) and kept.wants(prompt.ids):
                kept.store(prompt.ids, copy.deepcopy(cache))  # (a shorter cut: _prefill's)
        for i, row in enumerate(rows):
            g = min(range(len(self.generators)), key=lambda k: len(self._rows[k]))
            [uid] = self.generators[g].insert(
                [[firsts[i]]],
                [row.max_tokens],  # one more than it may still take: the sink ends it
                caches=[caches[i]],
                all_tokens=[list(prompts[i].ids)],
                samplers=[row.request.state[0]],
                logits_processors=[processors[i]],
            )
            row.state = (g, uid)
            self._rows[g][uid] = row
        return list(zip(rows, firsts, strict=True))

    def _first_tokens(
        self,
        rows: Sequence[Row],
        caches: Sequence[Any],
        processors: Sequence[list[Any]],
        streams: Sequence[Any],
    ) -> list[int]:
        """Each row's last prompt token through the model in its own cache, and its first
        token sampled as ``generate_step`` samples it (processors over the whole prompt).

        Rows on one stream whose caches mlx-lm can batch run their last tokens as one
        batch (their caches merged, left-padded as ``BatchGenerator`` pads them, and
        each row's cache taken back out): one pass of the model for all of them instead
        of one each, which on a CPU device is mostly the output layer's product over
        the vocabulary. ``caches`` is updated in place.
        """
        import mlx.core as mx

        model = self._client.model
        logits = []
        if len(rows) > 1 and all(s is None for s in streams) and _mergeable(caches):
            merged = [type(layer[0]).merge(list(layer)) for layer in zip(*caches, strict=True)]
            last = mx.array([row.prompt.ids[-1:] for row in rows])
            batch = model(last, cache=merged)[:, -1, :]
            logits = [batch[i : i + 1] for i in range(len(rows))]
            for i in range(len(rows)):
                caches[i][:] = [c.extract(i) for c in merged]
        else:
            for row, cache, stream in zip(rows, caches, streams, strict=True):
                with mx.stream(stream) if stream is not None else _default():
                    logits.append(model(mx.array([row.prompt.ids[-1:]]), cache=cache)[:, -1, :])
        mx.eval(logits, [c.state for cache in caches for c in cache])
        tokens = []
        for row, scores, own in zip(rows, logits, processors, strict=True):
            if own:
                context = mx.array(row.prompt.ids)
                for processor in own:
                    scores = processor(context, scores)
            sampler = row.request.state[0]
            if self._cpu and sampler is self._greedy:  # no normalising (core.accel.mlx_greedy)
                tokens.append(int(mx.argmax(scores, axis=-1).item()))
                continue
            logprobs = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
            tokens.append(int(sampler(logprobs).item()))
        return tokens

    def _prefill(self, prompts: Sequence[Any], caches: Sequence[Any], start: int = 0) -> None:
        """Each prompt but its last token into its cache (which holds its first ``start``
        tokens already), on the default stream. A prompt that ends with a tail later turns
        do not repeat (``prompt_cache.cut``) stops before it once, and a copy of its cache
        there is kept for prefix reuse."""
        import mlx.core as mx

        model, step = self._client.model, self._client.prefill_step_size
        kept = self._client.prompt_cache
        for prompt, cache in zip(prompts, caches, strict=True):
            ids = prompt.ids
            cut = kept.cut(ids)
            store = start < cut < len(ids) and kept.wants(ids[:cut])
            bounds = sorted({*range(start, len(ids) - 1, step), *([cut] if store else [])})
            for begin, end in zip(bounds, [*bounds[1:], len(ids) - 1], strict=True):
                if begin < end:
                    model(mx.array(ids[begin:end])[None], cache=cache)
                    mx.eval([c.state for c in cache])
                if store and end == cut:
                    kept.store(ids[:cut], copy.deepcopy(cache))
                    store = False

    def step(self) -> list[tuple[Row, int]]:
        out = []
        for generator, rows in zip(self.generators, self._rows, strict=True):
            if not rows:
                continue
            for response in generator.next_generated():
                row = rows.get(response.uid)
                if row is None:
                    continue
                out.append((row, int(response.token)))
                if response.finish_reason is not None:  # the generator dropped it itself
                    del rows[response.uid]
        return out

    def remove(self, rows: Sequence[Row]) -> None:
        gone: list[list[int]] = [[] for _ in self.generators]
        for row in rows:
            g, uid = row.state
            if self._rows[g].pop(uid, None) is not None:
                gone[g].append(uid)
            row.state = None
        for generator, uids in zip(self.generators, gone, strict=True):
            if uids:
                generator.remove(uids)

    def close(self) -> None:
        for rows in self._rows:
            for row in rows.values():
                row.state = None
            rows.clear()
        for generator in self.generators:
            generator.close()
