"""Apple MLX backend through mlx-lm (Metal on Apple Silicon, ``mlx[cpu]`` on Linux).

MLX streams are thread-local, so loading and every generation run on the
client's one model thread (see :mod:`core.worker`). The token primitive loops
over ``mlx_lm.generate.generate_step`` (what ``mlx_lm.stream_generate`` is
built on) with ``make_sampler`` / ``make_logits_processors`` and pushes each
token into the sink; stop strings, end ids and counts are the sink's work,
since mlx-lm has no stop strings. A seeded sampled request draws from a
chain of MLX keys of its own (:func:`make_request_sampler`), never from
``mx.random``'s global state. Constrained requests (tools, JSON output)
add one grammar logits processor per row
(:func:`~core.constrained.mlx_grammar_processor`), in ``generate_step`` and
per row in ``BatchGenerator``.

Batches run in mlx-lm's ``BatchGenerator``. On a CPU device a batch is spread
over several MLX CPU streams (``cpu_streams``): MLX runs each stream's work on
one core, so one stream leaves the other cores idle. Each row's prompt is
prefilled into its own cache, one row per stream per evaluation so that the
streams run side by side. A Gemma 3 batch then decodes in one
``BatchGenerator`` from those caches (mlx-lm's ``insert(caches=...)``) whose
model step, the split step of the accelerator wing
(:func:`core.accel.mlx_split_step`, :mod:`core.accel.mlx_split`), gives each
stream a share of every matmul's output features and of the attention heads
(and fuses the elementwise work with ``mx.compile``): the same results bit for
bit, with more rows per matmul call than one generator per stream would give
each. Other models (and quantized Gemma 3) decode each stream's rows in a
``BatchGenerator`` of its own.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from . import accel, speculative
from .base import BaseGemmaChatCompletion, read_model_config
from .errors import MissingDependencyError, UnsupportedPlatformError, require
from .media import Media, MediaOptions
from .params import SamplingParams
from .stream import Prompt, TokenSink
from .worker import ModelWorker, shared_worker


def _import_mlx() -> Any:
    if sys.platform == "darwin" and platform.machine() != "arm64":
        raise UnsupportedPlatformError(
            "MLX needs Apple Silicon; on an Intel Mac use the transformers backend"
        )
    require("mlx", "mlx_lm", feature="The MLX backend")
    try:
        import mlx.core as mx
    except (ImportError, OSError) as exc:  # plain `mlx` on Linux ships no libmlx.so
        raise MissingDependencyError(
            f"MLX is installed but cannot load ({exc}). On Linux MLX runs on the CPU build: "
            'pip install "gemma-local[mlx]" (which installs mlx[cpu])'
        ) from exc
    return mx


#: Model types whose mlx-lm implementation cannot run a padded batch (see ``_batchable``).
UNBATCHABLE_MODEL_TYPES = frozenset({"gemma2"})
#: Model types that decode speculatively on MLX: their mlx-lm models keep the sliding window
#: in the attention mask over a full ``KVCache``, which can be trimmed after a rejected draft
#: (a ``RotatingKVCache`` cannot once it has wrapped: mlx-lm would go on from the wrong keys).
#: Gemma 4's mlx-lm model needs its rotating caches for its masks.
DRAFTING_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n"})


class PaddedDraft:
    """A draft with fewer vocabulary rows than the model (Gemma 3 270M / 1B for 4B-27B, whose
    262,144 tokens are padded to 262,208 rows), as mlx-lm's speculative step calls it: ids
    past its rows (padding the model emitted) are read as its last row, and its logits are
    padded to the model's width with ``-inf`` (never drafted; the request's logits
    processors, which index by the model's ids, run on them unchanged)."""

    def __init__(self, model: Any, rows: int, width: int) -> None:
        self.model, self.rows, self.width = model, rows, width
        self.layers = model.layers

    def __call__(self, inputs: Any, cache: Any = None) -> Any:
        import mlx.core as mx

        logits = self.model(mx.minimum(inputs, self.rows - 1), cache=cache)
        pad = mx.full((*logits.shape[:-1], self.width - self.rows), -mx.inf, dtype=logits.dtype)
        return mx.concatenate([logits, pad], axis=-1)


def _check_drafting_model_type(name: str, model_type: str | None) -> None:
    if model_type is None or model_type in DRAFTING_MODEL_TYPES:
        return
    raise ValueError(
        f"{name!r} is a {model_type} model: speculative decoding (draft_model) on MLX runs "
        f"{', '.join(sorted(DRAFTING_MODEL_TYPES))} models (mlx-lm's Gemma 4 keeps rotating KV "
        "caches that cannot be rewound after a rejected draft). For Gemma 4 use "
        "backend='transformers' with the model's Gemma 4 assistant as draft_model"
    )


def quantization_from_config(config: dict[str, Any] | None) -> str | None:
    q = (config or {}).get("quantization") or (config or {}).get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    return f"mlx {q['bits']}-bit (group size {q.get('group_size', 64)})"


def make_request_sampler(params: SamplingParams) -> Callable[[Any], Any]:
    """mlx-lm's sampler for ``params``; a seeded sampled request gets a key chain of its own.

    Unseeded requests use ``make_sampler`` (``mx.random``'s global key). A
    seed starts a key of the request's own (``mx.random.key(seed)``) that is
    split at every step, and each step draws with its half; the filters are
    mlx-lm's, in ``make_sampler``'s order (top-p, then top-k), so the same
    tokens stay allowed. The global MLX random state is neither read nor
    changed.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p, categorical_sampling, make_sampler

    top_p = params.top_p if params.top_p < 1.0 else 0.0
    if params.greedy:
        return make_sampler(temp=0.0)

    def filtered(logprobs: Any) -> Any:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        # mlx-lm raises for a k >= the vocabulary, inside a compiled function whose
        # failure leaves mx.random's state unusable for every later request; such a
        # k keeps every token anyway.
        if 0 < params.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, params.top_k)
        return logprobs

    if params.seed is None:
        return lambda logprobs: categorical_sampling(filtered(logprobs), params.temperature)
    key = mx.random.key(params.seed)
    scale = 1.0 / params.temperature

    def sampler(logprobs: Any) -> Any:
        nonlocal key
        key, draw = mx.random.split(key)
        return mx.random.categorical(filtered(logprobs) * scale, key=draw)

    return sampler


class GemmaMLXChatCompletion(BaseGemmaChatCompletion):
    """Gemma through Apple MLX (mlx-lm).

    Args:
        model_name: an MLX checkpoint on the hub (e.g. the default 4-bit DWQ
            Gemma 3 12B), a Hugging Face checkpoint (converted on load) or a
            local folder, e.g. one written by ``mlx_lm.convert``, or a GGUF file
            (``path/to/model.gguf``, Gemma 2/3/4 from llama.cpp or Ollama). MLX
            cannot read GGUF: the first load converts it once (transformers
            dequantises it to float32) into a Hugging Face folder cached in
            ``$GEMMA_LOCAL_CACHE/gguf/`` (default ``~/.cache/gemma-local/gguf/``;
            see :mod:`core.gguf`), which later loads reuse. Converting needs
            ``gemma-local[gguf]``.
        trust_remote_code: passed to the tokenizer loader; Gemma needs none.
        adapter_path: optional LoRA adapters to apply.
        max_kv_size: cap the KV cache (rotating cache) for long generations.
        prefill_step_size: prompt tokens processed per step.
        cpu_streams: on a CPU device (``mlx[cpu]`` on Linux, or ``mx.cpu`` as
            the default device), how many MLX streams a batch is split across.
            MLX runs each stream on one core, so ``None`` (the default) uses
            one stream per core this process may use, at most one per row;
            ``1`` keeps a batch on one stream. Unused on the GPU, where one
            stream already fills the device.
        max_batch_size: the most rows decoded together (default 16): concurrent
            requests join the running batch until it holds that many
            (continuous batching, :mod:`core.scheduler`).
        max_queue: the most requests waiting for a row (default 256); one more
            raises :class:`~core.errors.QueueFullError` at once.
        image_soft_tokens: Gemma 4: the most soft tokens an image may cost
            (70, 140, 280, 560 or 1120); ``None``: the checkpoint's default.
        pan_and_scan: Gemma 3: also read crops of large or elongated images;
            ``None``: the checkpoint's default (off).
        draft_model: speculative decoding (:mod:`core.speculative`): a smaller
            model with this model's tokenizer (hub id or folder; Gemma 1, 2, 3
            and 3n). A request decoding alone (one row, no media, no tools /
            JSON grammar, no seed) runs mlx-lm's ``speculative_generate_step``
            over full (trimmable) KV caches: the same greedy tokens, fewer
            passes of the model when it agrees with the draft.
        num_draft_tokens: tokens the draft proposes per pass (default 3, as
            ``mlx_lm.generate --draft-model``).

    Messages may hold images and audio for checkpoints that read them: those
    requests go through mlx-vlm's model of the checkpoint, which shares
    mlx-lm's language weights (:mod:`core.mlx_media`); text keeps mlx-lm.
    """

    implementation = "mlx"
    supports_constraints = True
    reads_media = True

    def __init__(
        self,
        model_name: str = "mlx-community/gemma-3-12b-it-4bit-DWQ",
        *,
        trust_remote_code: bool = False,
        adapter_path: str | None = None,
        max_kv_size: int | None = None,
        prefill_step_size: int = 2048,
        cpu_streams: int | None = None,
        image_soft_tokens: int | None = None,
        pan_and_scan: bool | None = None,
        max_batch_size: int | None = None,
        max_queue: int | None = None,
        prompt_cache_tokens: int | None = None,
        draft_model: str | None = None,
        num_draft_tokens: int | None = None,
    ) -> None:
        speculative.check_options(draft_model, num_draft_tokens, backend="MLX")
        if draft_model is not None and max_kv_size is not None:
            raise ValueError(
                "draft_model cannot be combined with max_kv_size: max_kv_size keeps a rotating "
                "KV cache, which speculative decoding cannot rewind after a rejected draft"
            )
        if draft_model is not None:
            for name in (model_name, draft_model):
                _check_drafting_model_type(name, (read_model_config(name) or {}).get("model_type"))
        super().__init__(
            model_name,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            prompt_cache_tokens=prompt_cache_tokens,
        )
        self.media_options = MediaOptions(image_soft_tokens, pan_and_scan)
        self.family.processor_options(self.media_options)  # one this family has not: ValueError
        self._vision: Any = None  # mlx-vlm's model and processor, loaded at the first media
        from .gguf import check_model_path

        #: A local GGUF file, loaded through its converted folder (``None``: folder or hub id).
        self._gguf = check_model_path(model_name)
        if max_kv_size is not None and (not isinstance(max_kv_size, int) or max_kv_size < 1):
            raise ValueError(f"max_kv_size must be a positive integer or None, got {max_kv_size!r}")
        if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
            raise ValueError(
                f"prefill_step_size must be a positive integer, got {prefill_step_size!r}"
            )
        if cpu_streams is not None and (
            isinstance(cpu_streams, bool) or not isinstance(cpu_streams, int) or cpu_streams < 1
        ):
            raise ValueError(
                f"cpu_streams must be a positive integer or None (one per core), got {cpu_streams!r}"
            )
        self.trust_remote_code = trust_remote_code
        self.adapter_path = adapter_path
        self.max_kv_size = max_kv_size
        self.prefill_step_size = prefill_step_size
        self.cpu_streams = cpu_streams
        self.draft_model = draft_model
        #: tokens drafted per pass (mlx-lm's default where a draft was given without a count)
        self.num_draft_tokens = (
            speculative.MLX_DRAFT_TOKENS
            if draft_model is not None and num_draft_tokens is None
            else num_draft_tokens
        )
        self._draft: Any = None  # the loaded draft (model thread)
        self._draft_stats = speculative.DraftStats()
        #: the products run on numpy's BLAS (core.accel.mlx_blas), set when the model loads
        self._blas = False
        self._wrapper: Any = None
        self._config: dict[str, Any] | None = None
        #: The batch step for each set of CPU streams (see :meth:`_split_decoder`),
        #: kept across requests so that each is traced and compiled once.
        self._decoders: dict[tuple[Any, ...], Any] = {}

    def _new_worker(self) -> ModelWorker:
        """One MLX thread for the whole process, shared by every MLX client.

        MLX streams are thread-local, and MLX (0.32) aborts the process at
        exit ("terminate called without an active exception") when a thread
        that ran MLX work has ended before it. So every MLX model lives on the
        same thread, which is never stopped; requests to different MLX models
        queue on it (they share the one device anyway).
        """
        return shared_worker("gemma-local:mlx")

    def _load_model_and_tokenizer(self) -> None:
        _import_mlx()
        from mlx_lm import load

        path = self.model_name
        if self._gguf is not None:
            from .gguf import converted_folder

            path = str(converted_folder(self._gguf))
        model, wrapper, config = load(
            path,
            tokenizer_config={"trust_remote_code": self.trust_remote_code},
            adapter_path=self.adapter_path,
            return_config=True,
            trust_remote_code=self.trust_remote_code,
        )
        # a CPU device's float32 products through numpy's BLAS (not with cpu_streams: MLX's own
        # kernels split over those streams)
        self._blas = self.cpu_streams is None and accel.mlx_cpu_blas(model)
        self.model = model
        self._wrapper = wrapper
        self.tokenizer = wrapper._tokenizer
        self._config = config
        text = config.get("text_config") or {}
        self._context_window = text.get("max_position_embeddings") or config.get(
            "max_position_embeddings"
        )
        self._draft = None if self.draft_model is None else self._load_draft(config)

    def _load_draft(self, config: dict[str, Any]) -> Any:
        """The draft model of speculative decoding, checked against the model."""
        from mlx_lm import load

        assert self.draft_model is not None
        draft, wrapper, draft_config = load(
            self.draft_model,
            tokenizer_config={"trust_remote_code": self.trust_remote_code},
            return_config=True,
            trust_remote_code=self.trust_remote_code,
        )
        for name, loaded in ((self.model_name, config), (self.draft_model, draft_config)):
            _check_drafting_model_type(name, loaded.get("model_type"))

        def vocab(loaded: dict[str, Any]) -> int:
            return int((loaded.get("text_config") or {}).get("vocab_size") or loaded["vocab_size"])

        if self._blas:  # the model's products are numpy's: the draft's too
            accel.mlx_cpu_blas(draft)
        rows, draft_rows = vocab(config), vocab(draft_config)
        speculative.check_vocabularies(self.model_name, rows, self.draft_model, draft_rows)
        speculative.check_tokenizers(
            self.model_name,
            self.tokenizer.get_vocab(),
            self.draft_model,
            wrapper._tokenizer.get_vocab(),
        )
        return draft if draft_rows == rows else PaddedDraft(draft, draft_rows, rows)

    def _eos_token_ids(self) -> set[int]:
        return {int(t) for t in getattr(self._wrapper, "eos_token_ids", ()) or ()}

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, wired_limit
        from mlx_lm.sample_utils import make_logits_processors

        params = params.in_float32()
        sampler = make_request_sampler(params)
        from .constrained import mlx_grammar_processor

        shared = make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
        )
        grammar = self._grammar_matchers(params, len(prompts))

        def processors(row: int) -> list[Any]:
            if grammar is None:
                return shared
            return [*shared, mlx_grammar_processor(grammar, row)]

        media = any(p.media is not None for p in prompts)  # mlx-vlm, one row at a time
        if len(prompts) > 1 and self._batchable() and not media:
            self._generate_batch(prompts, sampler, processors, sink)
            return
        if not media and speculative.drafts(
            self._draft, params, rows=len(prompts), constrained=grammar is not None
        ):
            self._generate_drafted(prompts[0], sampler, shared, sink)
            return
        with wired_limit(self.model):
            for index, prompt in enumerate(prompts):  # one prompt, or a model that cannot batch
                if sink.done:
                    return
                if prompt.media is not None:
                    self._generate_media_row(index, prompt, sampler, processors(index), sink)
                    continue
                steps = generate_step(
                    mx.array(prompt.ids),
                    self.model,
                    max_tokens=sink.rows[index].max_tokens,
                    sampler=sampler,
                    logits_processors=processors(index),
                    max_kv_size=self.max_kv_size,
                    prefill_step_size=self.prefill_step_size,
                )
                try:
                    for token, _ in steps:
                        sink.push_row(index, token)
                        if sink.finished()[index]:
                            break
                finally:
                    steps.close()

    def _generate_drafted(
        self, prompt: Prompt, sampler: Any, processors: list[Any], sink: TokenSink
    ) -> None:
        """One prompt through mlx-lm's speculative decoding, over full KV caches (trimmable
        after a rejected draft; the models keep their sliding windows in the mask)."""
        import mlx.core as mx
        from mlx_lm.generate import speculative_generate_step, wired_limit
        from mlx_lm.models.cache import KVCache

        caches = [KVCache() for _ in self.model.layers] + [KVCache() for _ in self._draft.layers]
        tokens = passes = 0
        open_pass = False  # the last token came from a draft: its pass ended unread
        drafted = self.num_draft_tokens
        assert drafted is not None  # set with the draft
        with wired_limit(self.model), accel.mlx_logit_rows(drafted + 1):
            steps = speculative_generate_step(
                mx.array(prompt.ids),
                self.model,
                self._draft,
                num_draft_tokens=drafted,
                max_tokens=sink.rows[0].max_tokens,
                sampler=sampler,
                logits_processors=processors,
                prompt_cache=caches,
                prefill_step_size=self.prefill_step_size,
            )
            try:
                for token, _, from_draft in steps:
                    tokens += 1
                    passes += not from_draft  # each pass ends with a token of the model's own
                    open_pass = bool(from_draft)
                    sink.push_row(0, token)
                    if sink.finished()[0]:
                        break
            finally:
                steps.close()
        self._draft_stats.add(tokens, passes + open_pass)

    def _batch_engine(self) -> Any:
        """One mlx-lm ``BatchGenerator`` that requests join and leave (:mod:`core.mlx_batch`),
        for a model mlx-lm can batch (not Gemma 2)."""
        if not self._batchable():
            return None
        from .mlx_batch import MLXBatch

        return MLXBatch(self, self._scheduler.max_batch_size)

    def _runs_whole(self, request: Any, alone: bool) -> bool:
        """A replaced ``_generate`` serves every request whole, and so does a request with
        images or audio (mlx-vlm's model prefills it: :meth:`_generate_media_row`) and, with
        a draft model, one that would decode alone (speculative decoding)."""
        if not self._own_generate(GemmaMLXChatCompletion):
            return True
        if any(p.media is not None for p in request.prompts):
            return True
        # speculative decoding: a request alone runs mlx-lm's speculative steps
        return alone and speculative.drafts(
            self._draft,
            request.params,
            rows=len(request.rows),
            constrained=request.grammar is not None,
        )

    # ------------------------------------------------------------------ media

    def _check_media(self, conversations: Sequence[Any]) -> None:
        from .media import media_kinds

        super()._check_media(conversations)  # what the checkpoint reads
        if not any(media_kinds(c) for c in conversations):
            return
        require("mlx_vlm", feature="Images and audio on the MLX backend")
        if self.adapter_path is not None:
            raise NotImplementedError(
                f"adapter_path ({self.adapter_path}) applies to mlx-lm's text model; images and "
                "audio go through mlx-vlm's model, which gemma-local loads without adapters. "
                "Send text, or use a client without adapter_path"
            )

    def _media_inputs(self, text: str, media: list[Media]) -> tuple[tuple[int, ...], Any]:
        from . import mlx_media
        from .base import LOAD_LOCK

        if self._vision is None:
            path = self.model_name
            if self._gguf is not None:
                from .gguf import converted_folder

                path = str(converted_folder(self._gguf))
            with LOAD_LOCK:  # mlx-vlm's processor loads through transformers
                self._vision = mlx_media.load(path, self.model)
        bos = getattr(self.tokenizer, "bos_token", None)
        return mlx_media.encode(
            self._vision,
            text,
            media,
            self.family.processor_options(self.media_options),
            add_special_tokens=not (bos and text.startswith(bos)),
            text_ids=len(self._encode(text)),
        )

    def _generate_media_row(
        self, index: int, prompt: Prompt, sampler: Any, processors: list[Any], sink: TokenSink
    ) -> None:
        from .mlx_media import generate_row

        def push(token: int) -> bool:
            sink.push_row(index, token)
            return bool(sink.finished()[index])

        generate_row(
            self._vision,
            prompt.ids,
            prompt.media,
            max_tokens=sink.rows[index].max_tokens,
            sampler=sampler,
            logits_processors=processors,
            max_kv_size=self.max_kv_size,
            prefill_step_size=self.prefill_step_size,
            push=push,
        )

    def _batchable(self) -> bool:
        """Whether mlx-lm can run this model on a padded batch.

        mlx-lm's Gemma 2 attention (soft-capped, grouped-query) adds the 4-D
        batch mask to 5-D scores and fails to reshape ("Cannot reshape
        array"), so Gemma 2 rows run one after another.
        """
        config = self._config or {}
        model_type = (config.get("text_config") or {}).get("model_type") or config.get("model_type")
        return model_type not in UNBATCHABLE_MODEL_TYPES

    def _stream_groups(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """The rows of a batch for each MLX stream: one group unless the device is the CPU.

        Rows are dealt out longest first, so each group gets a similar share of
        the prompt tokens and each prefill wave (see :meth:`_prefill_rows`)
        holds prompts of similar length.
        """
        import mlx.core as mx

        rows = list(range(len(prompts)))
        wanted = self._streams_wanted()
        count = min(wanted, len(rows))
        if (
            count < 2
            or mx.default_device().type != mx.DeviceType.cpu
            or any(len(p.ids) < 2 for p in prompts)
        ):
            return [rows]
        rows.sort(key=lambda i: -len(prompts[i].ids))
        return [rows[k::count] for k in range(count)]

    def _generate_batch(
        self,
        prompts: Sequence[Prompt],
        sampler: Any,
        processors: Callable[[int], list[Any]],
        sink: TokenSink,
    ) -> None:
        """Several prompts in batches of mlx-lm's ``BatchGenerator`` (per-row processors).

        On a CPU device the rows are prefilled on the CPU streams (see
        :meth:`_stream_groups` and :meth:`_prefill_rows`), then decode in one
        generator whose step spreads over all the streams (:meth:`_split_decoder`)
        or, where that step does not apply, in one generator per stream, stepped
        in turn so that each stream computes its next step while the tokens of
        the others are read. Elsewhere one generator on one stream.
        """
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator

        cpu = mx.default_device().type == mx.DeviceType.cpu
        groups = self._stream_groups(prompts)
        streams = accel.mlx_cpu_streams(len(groups)) if len(groups) > 1 else [None]
        caches = self._prefill_rows(prompts, groups, streams, sink) if len(groups) > 1 else None
        if sink.done:
            return
        decoder = self._split_decoder(streams)
        plan = (
            [(list(range(len(prompts))), streams[0], decoder)]  # one batch on all the streams
            if decoder is not None
            else [
                (group, stream, self.model) for group, stream in zip(groups, streams, strict=True)
            ]
        )
        generators: list[tuple[Any, dict[int, int]]] = []
        try:
            for group, stream, model in plan:
                generator = BatchGenerator(
                    model,
                    stop_tokens=[[t] for t in sorted(self._eos_ids)],
                    sampler=sampler,
                    completion_batch_size=len(group),
                    prefill_batch_size=len(group),
                    prefill_step_size=self.prefill_step_size,
                    max_kv_size=self.max_kv_size,
                    stream=stream,
                )
                generators.append((generator, {}))
                if cpu:  # all-greedy steps without MLX's scalar logsumexp over the vocabulary
                    accel.mlx_greedy_steps(generator)
                if caches is None:
                    uids = generator.insert(
                        [list(prompts[i].ids) for i in group],
                        [sink.rows[i].max_tokens for i in group],
                        logits_processors=[processors(i) for i in group],
                    )
                else:  # prefilled: the last prompt token is the first step's input
                    uids = generator.insert(
                        [[prompts[i].ids[-1]] for i in group],
                        [sink.rows[i].max_tokens for i in group],
                        caches=[caches[i] for i in group],
                        all_tokens=[list(prompts[i].ids[:-1]) for i in group],
                        logits_processors=[processors(i) for i in group],
                    )
                generators[-1][1].update(zip(uids, group, strict=True))
            live = list(generators)
            while live and not sink.done:
                for entry in list(live):
                    generator, row_of = entry
                    responses = generator.next_generated()
                    if not responses:
                        live.remove(entry)
                        continue
                    finished = []
                    for response in responses:
                        index = row_of[response.uid]
                        sink.push_row(index, response.token)
                        if (
                            sink.rows[index].finish_reason is not None
                            and response.finish_reason is None
                        ):
                            finished.append(response.uid)  # a stop string: free its slot
                    if finished:
                        generator.remove(finished)
        finally:
            for generator, _ in generators:
                generator.close()

    def _streams_wanted(self) -> int:
        """The CPU streams a batch spreads over: ``cpu_streams``, else one where numpy's BLAS
        computes the products (it uses every core itself), else one per usable core."""
        if self.cpu_streams is not None:
            return self.cpu_streams
        return 1 if self._blas else accel.usable_cores()

    def _split_decoder(self, streams: Sequence[Any]) -> Any:
        """On a CPU device, the split step over ``streams`` (made once); else ``None``.

        The step is :func:`core.accel.mlx_split_step`'s, ``None`` where it does not apply.
        """
        import mlx.core as mx

        if mx.default_device().type != mx.DeviceType.cpu:
            return None
        key = tuple(streams)
        if key not in self._decoders:
            self._decoders[key] = accel.mlx_split_step(self.model, streams)
        return self._decoders[key]

    def _prefill_rows(
        self,
        prompts: Sequence[Prompt],
        groups: Sequence[Sequence[int]],
        streams: Sequence[Any],
        sink: TokenSink,
    ) -> list[Any]:
        """Each row's prompt but its last token in a cache of its own, on its group's stream.

        One row of each group per evaluation: an evaluation of many rows on
        several streams is scheduled mostly one stream after the other (MLX
        walks the graph with a bounded breadth), one row per stream runs them
        side by side.
        """
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        caches = [make_prompt_cache(self.model, self.max_kv_size) for _ in prompts]
        step = self.prefill_step_size
        for wave in zip_longest(*groups):
            rows = [(i, s) for i, s in zip(wave, streams, strict=True) if i is not None]
            for start in range(0, max(len(prompts[i].ids) - 1 for i, _ in rows), step):
                for i, stream in rows:
                    chunk = list(prompts[i].ids[start : min(start + step, len(prompts[i].ids) - 1)])
                    if chunk:
                        with mx.stream(stream):
                            self.model(mx.array(chunk)[None], cache=caches[i])
                mx.eval([c.state for i, _ in rows for c in caches[i]])
                if sink.done:
                    return caches
        return caches

    def _release(self) -> None:
        self._draft = None
        self._decoders.clear()
        self._vision = None
        self._wrapper = None
        self._config = None
        self._context_window = None

    def _clear_accelerator_cache(self) -> None:
        if "mlx.core" in sys.modules:
            import mlx.core as mx

            mx.clear_cache()

    def _describe(self) -> dict[str, Any]:
        config = self._config or read_model_config(self.model_name) or {}
        info: dict[str, Any] = {
            "quantization": quantization_from_config(config),
            "model_type": config.get("model_type"),
        }
        if self.draft_model is not None:
            info["speculative"] = self._draft_stats.describe(
                self.draft_model, self.num_draft_tokens
            )
        if self.model is None:
            return info
        import mlx.core as mx
        from mlx.utils import tree_flatten

        params = dict(tree_flatten(self.model.parameters()))
        bits = (config.get("quantization") or {}).get("bits")
        total = 0
        for name, value in params.items():
            stem = name.rsplit(".", 1)[0]
            quantized = bool(bits) and f"{stem}.scales" in params
            if quantized and name.endswith((".scales", ".biases")):
                continue  # quantisation metadata, not parameters
            packed = quantized and name.endswith(".weight")
            total += value.size * 32 // bits if packed else value.size
        dtypes = {
            str(v.dtype).replace("mlx.core.", "") for k, v in params.items() if k.endswith("weight")
        }
        info.update(
            parameters=int(total),
            dtype=",".join(sorted(dtypes)),
            device=str(mx.default_device()),
            architecture=type(self.model).__name__,
        )
        if Path(self.model_name).is_dir():
            info["path"] = str(Path(self.model_name).resolve())
        return info
