"""Continuous batching on the fast path: requests in the rows of one static KV cache.

The scheduler (:mod:`core.scheduler`) adds rows, steps the batch and removes
rows between steps; this is its engine where the CUDA fast path applies
(:mod:`core.accel.cuda.fast_path`). One bucket of ``rows`` x ``slots`` holds
every request's keys and values; a decode step is the fast path's compiled
forward replayed as a CUDA graph over the first ``k`` rows (``k`` = the power
of four that covers the highest row in use, at most ``rows``; each ``k`` has its
graph, compiled and captured the first time, over views of the same buffers).

**Positions without moving anything.** The fast path's decode step writes
every row at one shared cache index ``step`` (each layer's buffer is a ring of
its slot count) and reads a slot when the index it holds is ``>= pad[row]``;
a row's position is ``step - pad[row]``. A request that joins when the next
index is ``s`` is prefilled alone (the fast path's prefill, on buffers of its
own) and its ``L`` keys and values are copied to the ring indices ``s - L ..
s - 1`` of its row, with ``pad = s - L``: its first decode step is position
``L``, and every slot of its row that it may attend holds its own entries.
Older entries of the row (a request that left) are at indices below ``pad``
and are never read. The counter starts at ``slots`` and only grows, so pads
are never negative. A request fits while ``L + max_tokens <= slots``; one
that does not runs whole on the plain fast path (the backend checks
:meth:`SlotBatch.fits`).

**Sampling** is per row, outside the graph, with the request's own options
(the logits pipeline of :mod:`core.torch_batch`: bias, penalty, grammar,
temperature / top-k / top-p, a seeded generator): rows that are plain greedy
(most) take one argmax for all rows; a step costs one host sync. In float32 a
row's tokens are the ones the plain path gives it alone
(``tests/test_core_scheduler.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...prefix_cache import PrefixCache
from ...scheduler import Row
from . import fast_path

#: Ring slots of the batch's full-attention layers (a request fits while its prompt and
#: max_tokens do); ``GEMMA_LOCAL_SLOT_TOKENS`` overrides it.
DEFAULT_SLOTS = 4096
#: Cache indices the fast path's graph capture writes (its warm-up steps 0..2).
_CAPTURE_SLOTS = 4
#: The prompt width a background compile runs (the prefill compiles for every width).
_WARM_WIDTH = 64


def slot_count(model: Any) -> int:
    """The batch's ring size: ``GEMMA_LOCAL_SLOT_TOKENS`` or :data:`DEFAULT_SLOTS`, at most
    the model's context window."""
    import os

    value = os.environ.get("GEMMA_LOCAL_SLOT_TOKENS", "").strip()
    try:
        slots = int(value) if value else DEFAULT_SLOTS
    except ValueError:
        slots = 0
    if slots < 16:
        raise ValueError(f"GEMMA_LOCAL_SLOT_TOKENS must be an integer >= 16, got {value!r}")
    text = model.config.get_text_config()
    window = getattr(text, "max_position_embeddings", None)
    return min(slots, int(window)) if window else slots


class _Slot:
    """A row's place in the batch and its ids so far (prompt and reply, for the penalty)."""

    def __init__(self, index: int, ids: Sequence[int]) -> None:
        self.index = index
        self.ids = list(ids)


class SlotBatch:
    """The running batch of a fast-path model (see the module docstring)."""

    feeds_grammar = False

    def __init__(
        self,
        model: Any,
        grammar_for: Callable[[Any, int], Any],
        *,
        rows: int,
        slots: int,
        prefixes: PrefixCache | None = None,
    ) -> None:
        torch = fast_path._import_torch()
        self.torch = torch
        self.engine = fast_path._engine(model, compile=None, cuda_graphs=None)
        self.layout = self.engine.layout
        self.rows = fast_path.batch_bucket(rows)
        self.slots = slots
        self._grammar_for = grammar_for
        #: earlier prompts' keys and values (sliding-window layers: their last window; none
        #: for Gemma 4's KV-shared layers), extended by the engine (``_Engine.extend``: the
        #: Gemma 1-3 forward's layers; Gemma 4: the model's own text model, ``own_forward``)
        self.prefixes = prefixes
        self.bucket = fast_path._Bucket(self.layout, self.rows, slots)
        self.next_index = slots  # the cache index the next step writes (host copy)
        self.bucket.step.fill_(self.next_index)
        self.bucket.pad.fill_(self.next_index)
        self.held: list[Row | None] = [None] * self.rows
        self._how = fast_path._Sampler(True)
        self._views: dict[int, tuple[Any, Callable[[], None]]] = {}
        #: a launched step: its view and the rows it decodes (their tokens not read yet)
        self._inflight: tuple[Any, list[tuple[int, Row]]] | None = None
        self._cuda = self.layout.device.type == "cuda"
        self._host = torch.empty(self.rows, dtype=torch.long, pin_memory=self._cuda)
        #: greedy rows: the next step is launched before the host reads this one's tokens
        self.pipeline = fast_path._flag("GEMMA_LOCAL_SLOT_PIPELINE", True)
        self._indexes: dict[tuple[int, ...], Any] = {}
        self._bits: Any = None  # fast_path._Bits of the vocabulary, made at the first grammar

    def ready(self) -> bool:
        """Whether the batch's one-row step has its compiled code; if not, it is queued to
        compile in the background (:func:`core.accel.cuda.fast_path.generate`) and requests
        run whole meanwhile (on the plain path while their own buckets compile). The
        four-row step is queued after it; wider ones compile when first used."""
        if not self._views and not self.engine.ready((1, self.slots), _WARM_WIDTH):
            return False
        self.engine.ready((min(4, self.rows), self.slots), _WARM_WIDTH)
        return True

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a row of ``prompt_tokens`` and up to ``max_tokens`` fits the ring."""
        return prompt_tokens + max_tokens <= self.slots

    # ------------------------------------------------------------------ rows

    def add(self, rows: Sequence[Row]) -> list[tuple[Row, int]]:
        from ...torch_batch import _Options

        torch = self.torch
        first: list[tuple[Row, int]] = []
        for request in {id(r.request): r.request for r in rows}.values():
            if request.state is None:
                request.grammar = self._grammar_for(request.params, len(request.rows))
                request.state = _Options(request, self.layout.device)
        with torch.inference_mode(), self._device():
            for row in rows:
                index = self.held.index(None)  # the scheduler keeps rows <= max_batch_size
                if not self.fits(len(row.prompt.ids), row.max_tokens):
                    raise ValueError(
                        f"a row of {len(row.prompt.ids)} prompt tokens and max_tokens "
                        f"{row.max_tokens} does not fit the batch's {self.slots} cache slots"
                    )
                logits = self._prefill(index, row.prompt.ids)
                row.state = _Slot(index, row.prompt.ids)
                token = row.request.state.token(row, logits)
                row.state.ids.append(token)
                self.bucket.tok[index, 0] = token
                self.held[index] = row
                first.append((row, token))
        return first

    def _prefill(self, index: int, ids: Sequence[int]) -> Any:
        """Prefill ``ids`` alone (from the longest stored prompt it extends, if any) and copy
        its keys and values into row ``index``, right-aligned to the next cache index;
        returns the last position's float32 logits ``(1, vocab)``."""
        torch, lay = self.torch, self.layout
        width = len(ids)
        hit = self.prefixes.lookup(ids) if self.prefixes is not None else None
        if hit is not None:
            logits, own = self.engine.extend(hit[1], hit[0], ids)
        else:
            prompt = torch.tensor([list(ids)], device=lay.device)
            own = fast_path._Caches.of(lay, 1, width)
            logits = self.engine._prefill(own, prompt, torch.ones_like(prompt), padded=False)
        end = self.next_index  # the prompt's last token goes to end - 1
        for mine, theirs in ((self.bucket.keys, own.keys), (self.bucket.values, own.values)):
            for buffer, written in zip(mine, theirs, strict=True):
                if buffer is None:  # a KV-shared layer (Gemma 4) keeps no cache
                    continue
                ring, held = int(buffer.shape[2]), int(written.shape[2])
                keep = min(held, ring)  # a sliding window's ring keeps its last slots' worth
                where = torch.arange(end - keep, end, device=lay.device)
                buffer[index : index + 1].index_copy_(2, where % ring, written[:, :, held - keep :])
        self.bucket.pad[index] = end - width
        if self.prefixes is not None:
            cut = self.prefixes.cut(ids)  # without a tail the next turn does not repeat
            kept = self._kept(own, width, cut) if self.prefixes.wants(ids[:cut]) else None
            if kept is not None:
                self.prefixes.store(ids[:cut], kept)
        return logits

    def _kept(self, caches: Any, width: int, cut: int) -> Any:
        """What to store of ``caches`` (a ``width``-token prompt's; each layer holds its
        last positions) for the prompt's first ``cut`` tokens: a full layer's positions up
        to ``cut``, a sliding-window layer's last window of them (all a later prompt's
        queries can see); copies, so the full buffers can be freed. ``None`` where a layer
        no longer holds them."""
        keys, values = [], []
        for window, k, v in zip(self.layout.windows, caches.keys, caches.values, strict=True):
            if k is not None:
                first = width - int(k.shape[2])  # the position of the layer's first slot
                start = 0 if window is None else max(0, cut - window)
                if start < first:
                    return None
                if (start, cut) != (first, width):
                    k = k[:, :, start - first : cut - first].clone()
                    v = v[:, :, start - first : cut - first].clone()
            keys.append(k)
            values.append(v)
        return fast_path._Caches(keys, values)

    def remove(self, rows: Sequence[Row]) -> None:
        for row in rows:
            slot = row.state
            if isinstance(slot, _Slot) and self.held[slot.index] is row:
                self.held[slot.index] = None
            row.state = None

    def close(self) -> None:
        for row in self.held:
            if row is not None:
                row.state = None
        self.held = [None] * self.rows
        self._inflight = None
        self._views.clear()

    # ------------------------------------------------------------------ step

    def step(self) -> list[tuple[Row, int]]:
        torch = self.torch
        with torch.inference_mode(), self._device():
            if self._inflight is None:
                live = [i for i, row in enumerate(self.held) if row is not None]
                if not live:
                    return []
                self._launch(live)
            assert self._inflight is not None
            view, launched = self._inflight
            self._inflight = None
            # rows that left since the launch are dropped; rows that joined wait for the next
            rows = [(i, row) for i, row in launched if self.held[i] is row]
            if not rows:
                return []
            index = self._index(tuple(i for i, _ in rows))
            scores = self._masked(view.logits, rows)
            if self.pipeline and all(self._plain(row) for _, row in rows):
                # every row greedy: its token goes to the device, the next step is launched,
                # and the host reads the tokens while that step runs
                best = scores.argmax(dim=-1)
                view.tok.index_copy_(0, index, best.index_select(0, index)[:, None])
                self._host[: best.shape[0]].copy_(best, non_blocking=True)
                done = torch.cuda.Event() if self._cuda else None
                if done is not None:
                    done.record()
                live = [i for i, row in enumerate(self.held) if row is not None]
                self._launch(live)
                if done is not None:
                    done.synchronize()
                tokens = self._host[: best.shape[0]].tolist()
            else:
                tokens = scores.argmax(dim=-1).tolist()
                for i, row in rows:
                    if not row.request.state.plain:  # bias, penalty, sampling: its own pipeline
                        tokens[i] = row.request.state.token(row, scores[i : i + 1], masked=True)
                chosen = torch.tensor([tokens[i] for i, _ in rows], device=self.layout.device)
                view.tok.index_copy_(0, index, chosen[:, None])
            out: list[tuple[Row, int]] = []
            for i, row in rows:
                row.state.ids.append(tokens[i])
                out.append((row, tokens[i]))
        return out

    def _index(self, rows: tuple[int, ...]) -> Any:
        """``rows`` as a device tensor, made once per set of rows: a copy from pageable host
        memory would wait for the step in flight and undo the pipelining."""
        index = self._indexes.get(rows)
        if index is None:
            if len(self._indexes) > 256:
                self._indexes.clear()
            index = self._indexes[rows] = self.torch.tensor(rows, device=self.layout.device)
        return index

    @staticmethod
    def _plain(row: Row) -> bool:
        grammar = row.grammar
        free = grammar is None or grammar.retired[row.index]
        return bool(row.request.state.plain) and free

    def _launch(self, live: list[int]) -> None:
        """Launch the decode step of the rows ``live`` at the next cache index."""
        view, forward = self._view(self._width(live[-1] + 1))
        forward()
        self.bucket.step.add_(1)
        self.next_index += 1
        self._inflight = (view, [(i, row) for i in live if (row := self.held[i]) is not None])

    def _masked(self, scores: Any, live: list[tuple[int, Row]]) -> Any:
        """``scores`` with each constrained row's disallowed tokens at the lowest value.

        The rows' bitmasks (one int32 word per 32 ids) are filled on the host, copied
        to the device together and unpacked there: a few hundred kilobytes a step
        instead of a vocabulary-wide array per row.
        """
        torch = self.torch
        rows = []
        for i, row in live:
            grammar = row.grammar
            if grammar is not None and not grammar.retired[row.index]:
                rows.append((i, grammar.fill_row(row.index)[0]))
        if not rows:
            return scores
        import numpy as np

        if self._bits is None:
            self._bits = fast_path._Bits(scores.shape[-1], scores.device)
        words = self._bits.words
        host = np.full((scores.shape[0], words), -1, dtype=np.int32)
        for i, bitmask in rows:
            width = min(words, bitmask.shape[0])
            host[i, :width] = bitmask[:width]
            host[i, width:] = 0  # ids past the tokenizer's vocabulary: never
        return self._bits.mask(scores, torch.from_numpy(host).to(scores.device))

    def _width(self, rows: int) -> int:
        """The graph width that covers ``rows`` rows: 1, 4, 16, 64... (each width compiles and
        captures its own step; a memory-bound step costs about the same at 4 rows as at 1)."""
        width = 1
        while width < rows:
            width *= 4
        return min(width, self.rows)

    def _view(self, rows: int) -> tuple[Any, Callable[[], None]]:
        """The bucket's first ``rows`` rows and their forward step (captured on first use)."""
        entry = self._views.get(rows)
        if entry is None:
            b = self.bucket
            view = b if rows == b.batch else fast_path._Bucket(self.layout, rows, b.length, b)
            with self.torch.inference_mode(), self._device():
                saved = self._save()
                forward, _ = self.engine.split_stepper(view, self._how, capture=True)
                self._restore(saved)
            entry = self._views[rows] = (view, forward)
        return entry

    def _save(self) -> tuple[Any, ...]:
        """What capturing a step overwrites (its warm-up steps run on the live buffers)."""
        b, n = self.bucket, _CAPTURE_SLOTS
        return (
            b.step.clone(),
            b.pad.clone(),
            b.tok.clone(),
            [k[:, :, :n].clone() for k in b.keys if k is not None],
            [v[:, :, :n].clone() for v in b.values if v is not None],
        )

    def _restore(self, saved: tuple[Any, ...]) -> None:
        b, n = self.bucket, _CAPTURE_SLOTS
        step, pad, tok, keys, values = saved
        b.step.copy_(step)
        b.pad.copy_(pad)
        b.tok.copy_(tok)
        buffers = [k for k in b.keys + b.values if k is not None]
        for buffer, kept in zip(buffers, keys + values, strict=True):
            buffer[:, :, :n].copy_(kept)

    def _device(self) -> Any:
        torch = self.torch
        if self.layout.device.type == "cuda":
            return torch.cuda.device(self.layout.device)
        import contextlib

        return contextlib.nullcontext()
