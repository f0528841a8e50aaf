"""The fast path for decoders it has no forward of its own for (Gemma 4): the model's own
modules over a static KV cache, the decode step captured as a CUDA graph.

:mod:`core.accel.cuda.fast_path` decodes Gemma 1-3 with a forward of its own
(fused products, Triton ops, one compiled layer for every layer). Gemma 4 adds
per-layer embeddings, KV-shared layers, keys that are their values on global
layers (``attention_k_eq_v``), proportional RoPE, a 512-wide global head and
mixture-of-experts blocks; rather than a second hand-written forward, this
module runs the model's own text model (``Gemma4TextModel.forward``, every
part of it transformers' code) with three things of ours passed in:

* **a static cache** (:class:`StaticKV`): transformers' ``Cache`` interface
  (``update``) over the bucket's preallocated buffers, one per layer that keeps
  keys and values (none for the KV-shared layers, which read the last
  storing layer's through the model's own ``shared_kv_states``). In a decode
  step ``update`` writes the new token at the slot the step's counter names
  (an ``index_copy_`` at a device index: no host value, so the step can be
  captured) and hands the whole buffer to attention; sliding layers keep a
  ring of ``sliding_window`` slots, as in the Gemma 3 path;
* **the masks** as the dict the model accepts in place of building its own
  (``{"full_attention": ..., "sliding_attention": ...}``), made on the device
  from the bucket's step counter and each row's left padding;
* **the positions** (``position_ids``), from the same counter.

Everything else is :class:`~core.accel.cuda.fast_path._Engine`'s, unchanged:
buckets of (batch, cache length), sampling on the device, the grammar's mask
applied on the device (tools, JSON), tokens read in bursts, captured prefill
graphs, compiling in the background, and the continuous batch of
:mod:`core.accel.cuda.slots` (rows of any age in one static cache; a prompt that
extends a kept one runs its new tokens through the model's own text model over the kept
keys and values, :class:`ExtendKV`, eagerly). Greedy tokens equal ``model.generate``'s
(float32, checked on the CPU and on the GPU by ``tests/test_fast_path_gemma4.py``
and ``tests/test_fast_path_batch.py``).

The step runs the model's eager kernels: what the graph removes is the host
(Python, launches, ``generate``'s bookkeeping), which is what keeps Gemma 4
at ~10 tok/s under ``generate``. Mixture-of-experts blocks must run an
experts implementation that never reads a value back to the host
(transformers' ``grouped_mm``, its default where torch has it, in bfloat16:
in another dtype transformers falls back to a loop that reads the offsets);
otherwise (``experts_implementation="eager"``, a float32 MoE model) the steps
run uncaptured, with a warning. ``GEMMA_LOCAL_OWN_COMPILE=1`` compiles the whole decode step
(``torch.compile``, static shapes) before it is captured.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from . import fast_path

logger = logging.getLogger("gemma_local")

#: Model types whose text model this module runs.
MODEL_TYPES = frozenset({"gemma4", "gemma4_text"})

torch: Any = None


class StaticKV:
    """transformers' ``Cache`` interface over a bucket's static buffers.

    ``slot_of`` (decode) maps a buffer's slot count to the device index of the
    slot being written; ``None`` (prefill) writes the prompt from slot 0 (a
    window's ring shorter than the prompt keeps its last slots) and gives the
    prompt's own keys and values to attention.
    """

    is_compileable = True

    def __init__(self, keys: list[Any], values: list[Any], slot_of: dict[int, Any] | None) -> None:
        self.keys, self.values, self.slot_of = keys, values, slot_of

    def update(
        self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        slots = int(keys.shape[2])
        if self.slot_of is not None:
            index = self.slot_of[slots]
            keys.index_copy_(2, index, key_states)
            values.index_copy_(2, index, value_states)
            return keys, values
        width = int(key_states.shape[2])
        if width <= slots:
            keys[:, :, :width].copy_(key_states)
            values[:, :, :width].copy_(value_states)
        else:  # the ring keeps the prompt's last ``slots`` positions, each at position % slots
            index = torch.arange(width - slots, width, device=keys.device) % slots
            keys.index_copy_(2, index, key_states[:, :, width - slots :])
            values.index_copy_(2, index, value_states[:, :, width - slots :])
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:  # the model asks without positions only
        raise NotImplementedError("the fast path always passes position_ids")


class ExtendKV:
    """transformers' ``Cache`` interface over a stored prompt's keys and values (prompt-prefix
    reuse): each layer's new keys and values go after its stored ones, and attention reads
    them all; :attr:`keys` / :attr:`values` then hold the whole prompt's (``None`` for the
    KV-shared layers, which read the storing layer's through the model's ``shared_kv_states``).
    """

    is_compileable = False

    def __init__(self, keys: list[Any], values: list[Any]) -> None:
        self.keys, self.values = list(keys), list(values)

    def update(
        self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        keys = torch.cat([self.keys[layer_idx], key_states], dim=2)
        values = torch.cat([self.values[layer_idx], value_states], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:  # the model asks without positions only
        raise NotImplementedError("the fast path always passes position_ids")


class ModelLayout:
    """What the engine needs to know of a Gemma 4 model, read from its modules once."""

    def __init__(self, model: Any) -> None:
        _import_torch()
        config = model.config
        if getattr(config, "model_type", None) not in MODEL_TYPES:
            raise TypeError(f"not a Gemma 4 decoder: {getattr(config, 'model_type', None)!r}")
        text = config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise TypeError("bidirectional attention")
        inner = model.model
        self.text_model = getattr(inner, "language_model", None) or inner
        self.layers = list(self.text_model.layers[: text.num_hidden_layers])
        self.lm_head = model.lm_head
        impl = getattr(text, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise TypeError(f"attention implementation {impl!r}")
        #: eager attention adds its mask; SDPA takes booleans (True: attend)
        self.additive = impl == "eager"
        self.use_sdpa = impl == "sdpa"
        self.final_softcap = getattr(text, "final_logit_softcapping", None)
        self.types = list(text.layer_types[: len(self.layers)])
        self.windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.layers]
        self.shapes: list[tuple[int, int] | None] = []
        for layer in self.layers:
            attn = layer.self_attn
            if getattr(attn, "is_kv_shared_layer", False):
                self.shapes.append(None)
            else:
                self.shapes.append((attn.k_proj.out_features // attn.head_dim, attn.head_dim))
        #: the forward's name for the cache (``cache`` from 5.2x; ``past_key_values`` before)
        names = inspect.signature(self.text_model.forward).parameters
        self.cache_kw = "cache" if "cache" in names else "past_key_values"
        embed = self.text_model.embed_tokens.weight
        self.vocab = int(self.lm_head.weight.shape[0])
        self.dtype, self.device = embed.dtype, embed.device
        experts = getattr(text, "_experts_implementation", None)
        #: steps can be captured: no host read in the forward. Mixture-of-experts layers read
        #: one a layer with eager experts, and with ``grouped_mm`` experts in any dtype but
        #: bf16 on CUDA (transformers then takes its fallback, which reads the offsets; an H100
        #: with transformers 5.17 refused to capture a float32 one)
        self.capturable = not getattr(text, "enable_moe_block", False) or (
            experts == "grouped_mm" and (self.device.type != "cuda" or self.dtype == torch.bfloat16)
        )
        #: the multimodal model reads its image/video/audio placeholder ids as padding when no
        #: media fills them (``Gemma4Model.forward``): a lookup of those ids, or None
        self.placeholder: Any = None
        self.pad_id = int(getattr(text, "pad_token_id", None) or 0)
        if self.text_model is not inner:
            marks = [
                getattr(config, name, None)
                for name in ("image_token_id", "video_token_id", "audio_token_id")
            ]
            marks = [int(m) for m in marks if isinstance(m, int) and 0 <= m < self.vocab]
            if marks:
                self.placeholder = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
                self.placeholder[marks] = True
        device_map = getattr(model, "hf_device_map", None)
        if device_map and len({str(d) for d in device_map.values()}) > 1:
            raise TypeError("model spread over several devices")
        if model.training:
            raise TypeError("model in training mode")
        #: the kinds of layer it has, for describe()
        self.layer_kinds = sorted(
            {
                ("shared " if s is None else "") + t
                for s, t in zip(self.shapes, self.types, strict=True)
            }
        )

    @staticmethod
    def find(model: Any) -> ModelLayout | None:
        try:
            return ModelLayout(model)
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            logger.debug(
                "own-forward fast path not available for %s: %s", type(model).__name__, exc
            )
            return None

    def cache_shapes(self) -> list[tuple[int, int] | None]:
        return list(self.shapes)

    def slot_counts(self, length: int) -> list[int]:
        return [length if w is None else min(length, w) for w in self.windows]

    def type_slots(self, keys: list[Any]) -> dict[str, int]:
        """Each layer type's slot count, from the buffers of its layers that keep a cache."""
        out: dict[str, int] = {}
        for t, k in zip(self.types, keys, strict=True):
            if k is not None:
                out.setdefault(t, int(k.shape[2]))
        return out

    def mask(self, allowed: Any) -> Any:
        """A boolean mask (True: attend) in the form the model's attention takes."""
        if not self.additive:
            return allowed
        zeros = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(self.dtype).min)

    def hidden(self, ids: Any, positions: Any, masks: dict[str, Any], cache: StaticKV) -> Any:
        """The model's own text model over ``ids``: the last position's final hidden state."""
        if self.placeholder is not None:
            ids = torch.where(self.placeholder[ids], self.pad_id, ids)
        out = self.text_model(
            input_ids=ids,
            attention_mask=masks,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
        )
        return out.last_hidden_state[:, -1]

    def logits(self, hidden: Any) -> Any:
        """float32 logits ``[B, V]``, soft-capped as ``Gemma4ForCausalLM`` does."""
        logits = self.lm_head(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()


def decode(
    lay: ModelLayout, keys: list[Any], values: list[Any], tok: Any, step: Any, pad: Any
) -> tuple[Any, list[Any]]:
    """One token per row at cache index ``step`` (a ``[1]`` tensor); float32 logits ``[B, V]``.

    A slot is attended when the position it holds is not a row's left padding
    and not in the future (a ring's slots hold the window's last positions).
    """
    positions = (step - pad)[:, None]
    masks: dict[str, Any] = {}
    slot_of: dict[int, Any] = {}
    for t, n in lay.type_slots(keys).items():
        masks[t] = lay.mask(fast_path.slot_mask(step, pad, n))
        slot_of[n] = torch.remainder(step, n)
    hidden = lay.hidden(tok, positions, masks, StaticKV(keys, values, slot_of))
    return lay.logits(hidden), []


def prefill(
    lay: ModelLayout, keys: list[Any], values: list[Any], ids: Any, mask: Any, padded: bool = True
) -> Any:
    """Run the left-padded prompts, fill the cache from slot 0, return the last logits.

    Without padding, a layer type whose window does not bind gets no mask
    (SDPA's own causal attention, as ``generate`` runs it).
    """
    windows = dict(zip(lay.types, lay.windows, strict=True))  # layer type -> its window
    by_window = fast_path.prompt_masks(mask, list(windows.values()), padded, lay.use_sdpa)
    masks = {
        t: None if by_window[w] is None else lay.mask(by_window[w]) for t, w in windows.items()
    }
    positions = fast_path.prompt_positions(mask)
    hidden = lay.hidden(ids, positions, masks, StaticKV(keys, values, None))
    return lay.logits(hidden)


def extend(lay: ModelLayout, stored: Any, start: int, ids: Any) -> tuple[Any, Any]:
    """``ids[start:]`` after ``stored`` (``fast_path._Caches`` of ``ids[:start]``; a sliding
    layer's may hold only the prefix's last window): the last float32 logits and the whole
    prompt's caches (each layer type's masks: :func:`fast_path.extension_mask`)."""
    length = len(ids)
    new = torch.tensor([list(ids[start:])], device=lay.device)
    positions = torch.arange(start, length, device=lay.device)[None]
    masks: dict[str, Any] = {}
    for kind, window, kept in zip(lay.types, lay.windows, stored.keys, strict=True):
        if kept is None or kind in masks:
            continue
        held = int(kept.shape[2]) + length - start
        masks[kind] = lay.mask(fast_path.extension_mask(start, length, held, window, lay.device))
    cache = ExtendKV(stored.keys, stored.values)
    hidden = lay.hidden(new, positions, masks, cache)  # type: ignore[arg-type]
    return lay.logits(hidden), fast_path._Caches(cache.keys, cache.values)


class OwnForwardEngine(fast_path._Engine):
    """:class:`~core.accel.cuda.fast_path._Engine` with the model's own forward."""

    def __init__(
        self, model: Any, layout: ModelLayout, compile: bool | str, cuda_graphs: bool
    ) -> None:
        super().__init__(model, layout, False, cuda_graphs)  # type: ignore[arg-type]
        self.compile = compile
        self.eager_forward = self.forward = decode
        if compile:  # the whole step, one graph (no break: tests/test_fast_path_gemma4.py)
            backend = compile if isinstance(compile, str) else "inductor"
            self.forward = torch.compile(decode, backend=backend, dynamic=False)

    def describe(self) -> dict[str, Any]:
        lay: ModelLayout = self.layout  # type: ignore[assignment]
        return {
            "active": True,
            "forward": "own",
            "layers": lay.layer_kinds,
            "compile": self.compile,
            "cuda_graphs": self.use_graphs,
            "prefill_graphs": sum(len(b.prefills) for b in self.buckets.values()),
            "compile_seconds": dict(self.compile_seconds),
            "buckets": [list(key) for key in self.buckets],
            "compiled_buckets": sorted(list(key) for key in self.background.done),
            "fallbacks": list(self.fallbacks),
        }

    def _prefill(self, b: Any, ids: Any, mask: Any, padded: bool) -> Any:
        return prefill(self.layout, b.keys, b.values, ids, mask, padded)  # type: ignore[arg-type]

    def extend(self, stored: Any, start: int, ids: Any) -> tuple[Any, Any]:
        """Run ``ids[start:]`` over the stored keys and values of ``ids[:start]`` (prompt-prefix
        reuse, one row; see :meth:`fast_path._Engine.extend`), through the model's own text
        model: the last logits and the whole prompt's caches."""
        lay: ModelLayout = self.layout  # type: ignore[assignment]
        return extend(lay, stored, start, ids)


def engine(model: Any, *, compile: bool | str | None, cuda_graphs: bool | None) -> OwnForwardEngine:
    """A fast-path engine running ``model``'s own forward (see the module's docstring)."""
    _import_torch()
    layout = ModelLayout(model)
    cuda = layout.device.type == "cuda"
    if cuda_graphs is None:
        cuda_graphs = cuda
    if cuda_graphs and not layout.capturable:
        logger.warning(
            "fast path: %s runs its experts with a host read per layer (eager experts, or "
            "grouped_mm in %s): decode steps run uncaptured; load it in bfloat16 with "
            'experts_implementation="grouped_mm" for CUDA graphs',
            type(model).__name__,
            layout.dtype,
        )
        cuda_graphs = False
    if compile is None:
        compile = cuda and fast_path._flag("GEMMA_LOCAL_OWN_COMPILE", False)
    return OwnForwardEngine(model, layout, compile, bool(cuda_graphs))


def _import_torch() -> Any:
    global torch
    if torch is None:
        torch = fast_path._import_torch()
    return torch
