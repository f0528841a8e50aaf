"""Hugging Face transformers backend (CPU, CUDA, MPS; bf16 by default; bitsandbytes 4/8-bit).

The token primitive drives ``model.generate`` on the client's model thread. A
``StoppingCriteria`` is the bridge: every step it hands the newest token of
each row to the :class:`~core.stream.TokenSink` and tells ``generate`` which
rows are finished (end ids, stop strings, per-row ``max_tokens``, or a reader
that went away), so no helper thread and no streamer are needed.

Constrained requests (tools, JSON output) add one ``LogitsProcessor``
(:class:`~core.constrained.TorchGrammarMask`); the same ``StoppingCriteria``
feeds each row's new token to the row's grammar matcher.

A seeded sampled request runs ``generate`` greedily with :class:`SeededSampler`
as its last logits processor (after the grammar mask): it applies
temperature / top-k / top-p with transformers' own warpers and draws from a
``torch.Generator`` of the request's own, so the process's random state
(``transformers.set_seed`` would reset Python's, numpy's and torch's) is left
alone. Unseeded sampling uses ``generate``'s own sampling (torch's default
generator).

After every load, :meth:`GemmaTransformersChatCompletion._check_loaded`
makes sure the weights the config ties (``lm_head`` to the input embeddings)
share storage, and raises :class:`~core.errors.TiedWeightsError` otherwise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import accel, speculative
from .base import BaseGemmaChatCompletion, read_model_config
from .errors import TiedWeightsError, UnsupportedPlatformError, require
from .media import Media, MediaOptions
from .params import SamplingParams
from .stream import Prompt, TokenSink

logger = logging.getLogger("gemma_local")

DTYPES = ("auto", "bfloat16", "float16", "float32")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 instructions (AVX512-BF16 or AMX), where bf16 decodes faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def untied_weights(model: Any) -> list[tuple[str, str]]:
    """The ``(target, source)`` parameter pairs the model should tie but does not.

    What should be tied is transformers' own record of it
    (``all_tied_weights_keys``, transformers 5: the config's
    ``tie_word_embeddings``, of the text config too for multimodal models, minus
    pairs it deliberately left untied because the checkpoint holds both with
    different values). Without that record: the output embeddings against the
    input embeddings when the (text) config says ``tie_word_embeddings``.
    """
    pairs: dict[str, str] | None = getattr(model, "all_tied_weights_keys", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    if pairs is None:
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        tie = getattr(text, "tie_word_embeddings", None)
        if tie is None:
            tie = getattr(config, "tie_word_embeddings", False)
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if not tie or out is None or inp is None:
            return []
        by_id = {id(p): n for n, p in params.items()}
        target = by_id.get(id(out.weight), "output embeddings")
        source = by_id.get(id(inp.weight), "input embeddings")
        return [] if _shared(out.weight, inp.weight) else [(target, source)]
    bad = []
    for target, source in pairs.items():
        a, b = params.get(target), params.get(source)
        if a is None or b is None or not _shared(a, b):
            bad.append((target, source))
    return bad


def _shared(a: Any, b: Any) -> bool:
    """Whether two parameters are one tensor (or views of one storage, or both offloaded)."""
    if a is b:
        return True
    if a.device.type == "meta" and b.device.type == "meta":  # disk-offloaded together
        return True
    return bool(a.shape == b.shape and a.data_ptr() == b.data_ptr())


class SeededSampler:
    """The last logits processor of a seeded sampled request: draws each row's token itself.

    ``generate`` runs greedily (``do_sample=False``). This applies
    temperature, top-k and top-p with transformers' own warpers, in the order
    its sampling does, draws one token per row from a ``torch.Generator``
    seeded for this request, and returns scores where only the drawn token is
    finite, which greedy's argmax then picks. Processors before it (penalties,
    biases, the grammar mask) shape the distribution as they would for
    ``generate``'s own sampling; torch's global generator is never used.
    """

    def __init__(self, params: SamplingParams, seed: int) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers: list[Any] = []
        if params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p))
        self.seed = seed
        self.generator: Any = None  # made on the scores' device at the first step

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for warper in self.warpers:
            scores = warper(input_ids, scores)
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = scores.float().softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=self.generator)
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(1, tokens, 0.0)


class GemmaTransformersChatCompletion(BaseGemmaChatCompletion):
    """Gemma through Hugging Face transformers.

    Args:
        model_name: hub id (``google/gemma-3-12b-it``), a local folder, or a
            GGUF file (``path/to/model.gguf``, from llama.cpp or Ollama: Gemma 2,
            3 or 4), which transformers dequantises on load (needs
            ``gemma-local[gguf]``).
        use_4bit_quantization: load with bitsandbytes NF4 + double quantisation
            (about a quarter of the bf16 memory). Needs ``gemma-local[quantization]``.
        device_map: where weights go: ``"auto"`` (GPU if any, else CPU),
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or an accelerate map.
        trust_remote_code: run code from the model's repository. Gemma needs
            none; leave it ``False`` unless you trust the repository.
        torch_dtype: ``"auto"`` (default) picks bfloat16 on GPUs that support
            it and on CPUs with AVX512-BF16/AMX, float32 elsewhere. Avoid
            float16: Gemma's activations overflow it.
        use_8bit_quantization: bitsandbytes LLM.int8 instead of NF4.
        bnb_4bit_compute_dtype: compute dtype of the 4-bit layers (default bfloat16).
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"`` (default: transformers').
        revision, token, local_files_only: passed to ``from_pretrained``.
        gguf_file: the name of a GGUF file inside the folder (or hub repository)
            ``model_name``, as ``from_pretrained(..., gguf_file=...)`` takes it.
        image_soft_tokens: Gemma 4: the most soft tokens an image may cost
            (70, 140, 280, 560 or 1120; ``None``: the checkpoint's processor
            default, 280 on the released models).
        pan_and_scan: Gemma 3: also read crops of large or elongated images
            (each crop costs 256 more tokens; ``None``: the processor's default, off).

    Messages may hold images and audio (:mod:`core.media`) for checkpoints that
    read them: the checkpoint's own processor (``AutoProcessor``) turns them into
    the soft tokens and tensors the model was trained with.
        max_batch_size: the most rows decoded together (default 16): concurrent
            requests join the running batch until it holds that many
            (continuous batching, :mod:`core.scheduler`).
        max_queue: the most requests waiting for a row (default 256); one more
            raises :class:`~core.errors.QueueFullError` at once.
        prompt_cache_tokens: tokens of earlier prompts whose KV cache is kept
            (default 65536, least recently used first out; 0: off). A prompt that
            extends a kept one (the next turn of a chat or an agent loop: same
            system prompt, tools and history) is prefilled from where it ends.
        draft_model: speculative decoding (:mod:`core.speculative`): a hub id or
            folder of a smaller model with this model's tokenizer (Gemma 3 270M
            for a Gemma 3 model) or of a Gemma 4 assistant
            (``gemma4_assistant``) for a Gemma 4 model. A request decoding alone
            (one row, no media, no tools / JSON grammar, no seed) runs
            ``generate(assistant_model=...)``: the same greedy tokens, fewer
            passes of the model when it agrees with the draft.
        num_draft_tokens: tokens the draft proposes per pass, always that many
            (default: the draft's ``generation_config``, else transformers' own:
            up to 20, fewer where the draft is unsure; 4 for a Gemma 4 assistant
            whose config names none).
    """

    implementation = "transformers"
    supports_constraints = True
    reads_media = True

    def __init__(
        self,
        model_name: str = "google/gemma-3-12b-it",
        use_4bit_quantization: bool = False,
        device_map: str | Mapping[str, Any] | None = "auto",
        trust_remote_code: bool = False,
        *,
        torch_dtype: str = "auto",
        use_8bit_quantization: bool = False,
        bnb_4bit_compute_dtype: str = "bfloat16",
        attn_implementation: str | None = None,
        revision: str | None = None,
        token: str | None = None,
        local_files_only: bool | None = None,
        gguf_file: str | None = None,
        image_soft_tokens: int | None = None,
        pan_and_scan: bool | None = None,
        max_batch_size: int | None = None,
        max_queue: int | None = None,
        prompt_cache_tokens: int | None = None,
        draft_model: str | None = None,
        num_draft_tokens: int | None = None,
    ) -> None:
        speculative.check_options(draft_model, num_draft_tokens, backend="transformers")
        super().__init__(
            model_name,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            prompt_cache_tokens=prompt_cache_tokens,
        )
        #: The image processor's options (``None``: the checkpoint's defaults).
        self.media_options = MediaOptions(image_soft_tokens, pan_and_scan)
        #: the scheduler's engine when it is the CUDA fast path's batch (set by _batch_engine)
        self._slot_batch: Any = None
        self.family.processor_options(self.media_options)  # one this family has not: ValueError
        self._processor: Any = None  # the checkpoint's processor, loaded at the first media
        from .gguf import check_model_path

        #: A local GGUF file to load (``None``: a folder or hub id, or ``gguf_file`` on the hub).
        self._gguf = check_model_path(model_name, gguf_file)
        self.gguf_file = gguf_file
        if (self._gguf is not None or gguf_file is not None) and (
            use_4bit_quantization or use_8bit_quantization
        ):
            raise ValueError(
                "a GGUF file is dequantised on load; it cannot be combined with "
                "use_4bit_quantization / use_8bit_quantization (load a Hugging Face folder "
                "for bitsandbytes, or keep the GGUF in a bf16/float32 torch_dtype)"
            )
        if torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {DTYPES}, got {torch_dtype!r}")
        if bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"bnb_4bit_compute_dtype must be one of {COMPUTE_DTYPES}, got {bnb_4bit_compute_dtype!r}"
            )
        if use_4bit_quantization and use_8bit_quantization:
            raise ValueError(
                "choose one of use_4bit_quantization and use_8bit_quantization, not both"
            )
        if device_map is not None and not isinstance(device_map, (str, Mapping)):
            raise ValueError(
                "device_map must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps', a dict or None, "
                f"got {device_map!r}"
            )
        if (use_4bit_quantization or use_8bit_quantization) and sys.platform == "darwin":
            raise UnsupportedPlatformError(
                "bitsandbytes quantisation does not run on macOS; use the MLX backend with a "
                "4-bit MLX checkpoint (e.g. mlx-community/gemma-3-12b-it-4bit-DWQ) instead"
            )
        if torch_dtype == "float16" or bnb_4bit_compute_dtype == "float16":
            logger.warning(
                "float16 overflows Gemma's activations (empty or NaN output); prefer bfloat16"
            )
        self.use_4bit_quantization = use_4bit_quantization
        self.use_8bit_quantization = use_8bit_quantization
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self._draft: Any = None  # the loaded draft (model thread)
        self._draft_stats = speculative.DraftStats()
        self.device_map = device_map
        self.trust_remote_code = trust_remote_code
        self.torch_dtype = torch_dtype
        self.bnb_4bit_compute_dtype = bnb_4bit_compute_dtype
        self.attn_implementation = attn_implementation
        self.hub_kwargs: dict[str, Any] = {
            k: v
            for k, v in {
                "revision": revision,
                "token": token,
                "local_files_only": local_files_only,
            }.items()
            if v is not None
        }

    # ----------------------------------------------------------------- loading

    def _resolve_dtype(self) -> Any:
        import torch

        if self.torch_dtype != "auto":
            return getattr(torch, self.torch_dtype)
        target = str(self.device_map) if isinstance(self.device_map, str) else "auto"
        if target.startswith("cuda") or (target == "auto" and torch.cuda.is_available()):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if target == "mps" or (target == "auto" and torch.backends.mps.is_available()):
            return torch.bfloat16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32

    def _quantization_config(self, dtype: Any) -> Any:
        if not (self.use_4bit_quantization or self.use_8bit_quantization):
            return None
        require("bitsandbytes", feature="bitsandbytes quantisation")
        import torch
        from transformers import BitsAndBytesConfig

        if self.use_8bit_quantization:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, self.bnb_4bit_compute_dtype),
        )

    def _load_model_and_tokenizer(self) -> None:
        require("torch", "transformers", feature="The transformers backend")
        if self.device_map == "auto":
            require("accelerate", feature="device_map='auto'")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = self._resolve_dtype()
        quantization = self._quantization_config(dtype)
        source = self.model_name
        gguf: str | None = self.gguf_file
        if self._gguf is not None or gguf is not None:
            from .gguf import require_gguf

            require_gguf()
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": self.trust_remote_code}
        if self._gguf is not None:  # a local GGUF: dequantised by transformers
            from .gguf import load_tokenizer

            source, gguf = str(self._gguf.folder), self._gguf.file
            self.tokenizer = load_tokenizer(self._gguf, trust_remote_code=self.trust_remote_code)
        else:
            extra = {} if gguf is None else {"gguf_file": gguf}
            self.tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=self.trust_remote_code, **extra, **self.hub_kwargs
            )
        if gguf is not None:
            kwargs["gguf_file"] = gguf
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        model_class = self._text_model_class() if gguf is None else AutoModelForCausalLM
        self.model = model_class.from_pretrained(source, **kwargs, **self.hub_kwargs)
        self.model.eval()
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._context_window = getattr(text_config, "max_position_embeddings", None)
        self._draft = None if self.draft_model is None else self._load_draft(dtype)

    def _load_draft(self, dtype: Any) -> Any:
        """The draft model of speculative decoding, on the model's device, checked against it."""
        from transformers import AutoModelForCausalLM

        assert self.draft_model is not None
        hub = {k: v for k, v in self.hub_kwargs.items() if k != "revision"}  # the model's
        draft = AutoModelForCausalLM.from_pretrained(
            self.draft_model, dtype=dtype, trust_remote_code=self.trust_remote_code, **hub
        )
        draft.to(self.model.device).eval()
        text = self.model.config.get_text_config()
        vocab, draft_vocab = int(text.vocab_size), int(draft.config.get_text_config().vocab_size)
        speculative.check_vocabularies(self.model_name, vocab, self.draft_model, draft_vocab)
        config = draft.generation_config
        if type(draft).__name__.startswith(("Gemma4Assistant", "Gemma4UnifiedAssistant")):
            self._check_assistant(draft, int(text.hidden_size), vocab)
            if self.num_draft_tokens is None and config.num_assistant_tokens is None:
                config.num_assistant_tokens = 4
        else:
            self._check_draft_tokenizer(hub)
            if draft_vocab < vocab:
                # The model's extra rows are padding (Gemma 3 4B-27B: 262,208 rows for 262,144
                # tokens), but generate() wants one vocabulary size: the draft gets zero rows
                # there (a padding id the model emits becomes an input it can embed).
                draft.resize_token_embeddings(vocab, mean_resizing=False)
                import torch

                with torch.no_grad():
                    draft.get_input_embeddings().weight[draft_vocab:] = 0
                    head = draft.get_output_embeddings()
                    if head is not None:
                        head.weight[draft_vocab:] = 0
        if self.num_draft_tokens is not None:  # that many each pass: no schedule, no early stop
            config.num_assistant_tokens = self.num_draft_tokens
            config.num_assistant_tokens_schedule = "constant"
            config.assistant_confidence_threshold = 0.0
        return draft

    def _check_assistant(self, draft: Any, hidden: int, vocab: int) -> None:
        """A Gemma 4 assistant drafts from the model's last hidden state and keys and values."""
        if not type(self.model).__name__.startswith("Gemma4"):
            raise ValueError(
                f"draft_model {self.draft_model!r} is a Gemma 4 assistant: it drafts from a "
                f"Gemma 4 model's hidden states, and {self.model_name!r} is "
                f"{type(self.model).__name__}; use a small model with its tokenizer instead"
            )
        backbone = int(draft.config.backbone_hidden_size)
        assistant_vocab = int(draft.config.get_text_config().vocab_size)
        if backbone != hidden or assistant_vocab != vocab:
            raise ValueError(
                f"draft_model {self.draft_model!r} is the assistant of a Gemma 4 model of "
                f"hidden size {backbone} and {assistant_vocab} tokens; {self.model_name!r} has "
                f"{hidden} and {vocab}: use the assistant released with this model"
            )

    def _check_draft_tokenizer(self, hub: dict[str, Any]) -> None:
        """The draft's tokenizer, where it has one, must be the model's."""
        from transformers import AutoTokenizer

        assert self.draft_model is not None
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.draft_model, trust_remote_code=self.trust_remote_code, **hub
            )
        except (OSError, ValueError):  # weights only: what it proposes is checked anyway
            return
        speculative.check_tokenizers(
            self.model_name, self.tokenizer.get_vocab(), self.draft_model, tokenizer.get_vocab()
        )

    def _text_model_class(self) -> Any:
        """The class to load the text model with: the one :mod:`core.families` names for the
        checkpoint's ``model_type`` (``Gemma3nForCausalLM`` for ``gemma3n``), else
        ``AutoModelForCausalLM``."""
        import transformers

        from .families import model_type_from_name, transformers_text_class

        config = read_model_config(self.model_name) or {}
        model_type = config.get("model_type") or model_type_from_name(self.model_name)
        name = transformers_text_class(model_type)
        return transformers.AutoModelForCausalLM if name is None else getattr(transformers, name)

    def _check_loaded(self) -> None:
        """Fail loudly if weights the config ties came back untied (a random ``lm_head``)."""
        bad = untied_weights(self.model)
        if not bad:
            return
        from transformers import PreTrainedModel

        pairs = ", ".join(f"{target} -> {source}" for target, source in bad)
        patched = getattr(PreTrainedModel.tie_weights, "__name__", "") == "empty_func"
        cause = (
            "transformers' PreTrainedModel.tie_weights is still replaced by its loading-time "
            "no-op: a from_pretrained outside gemma-local ran at the same time as another "
            "load and left the process in that state. Restart the Python process, and load "
            "models one at a time."
            if patched
            else "If code outside gemma-local was loading a transformers model in another thread "
            "at that moment, load again (or restart the process); otherwise check that the "
            "checkpoint holds the weights its config describes."
        )
        raise TiedWeightsError(
            f"{self.model_name} loaded with weights untied that its config ties ({pairs}); "
            f"its replies would come from a randomly initialised output layer. {cause}"
        )

    def _eos_token_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}

    # -------------------------------------------------------------- generation

    def _batch_engine(self) -> Any:
        """Where the CUDA fast path applies, rows in the slots of its static cache
        (:mod:`core.accel.cuda.slots`, CUDA graphs); elsewhere left-padded rows in one
        ``DynamicCache`` (:mod:`core.torch_batch`), for a model whose cache it can pad and trim."""
        from . import torch_batch

        rows = self._scheduler.max_batch_size
        self._slot_batch = accel.cuda_batch(
            self.model, self._grammar_matchers, rows=rows, prefixes=self.prompt_cache
        )
        if self._slot_batch is not None:
            return self._slot_batch
        if not torch_batch.supported(self.model):
            return None
        return torch_batch.TorchBatch(self.model, self._grammar_matchers, self.prompt_cache)

    def _runs_whole(self, request: Any, alone: bool) -> bool:
        """A replaced ``_generate`` serves every request whole, and so does a request with
        images or audio (its prefill needs the processor's tensors). With the fast path's
        batch, so does a request whose prompt and ``max_tokens`` do not fit its cache slots,
        and a request of several rows (``create_batch``, ``n``) that finds the client idle:
        the fast path serves those in a bucket of their own size, with captured prefills and
        tokens read in bursts (the shared batch's cache holds ``GEMMA_LOCAL_SLOT_TOKENS``
        slots a row, which every step's attention reads)."""
        if not self._own_generate(GemmaTransformersChatCompletion):
            return True
        if any(
            p.media is not None for p in request.prompts
        ):  # images / audio: generate() reads them
            return True
        constrained = request.grammar is not None
        if alone and speculative.drafts(
            self._draft, request.params, rows=len(request.rows), constrained=constrained
        ):
            return True  # speculative decoding: generate() with the draft
        slots = self._slot_batch
        if slots is None:
            return False
        if not slots.ready():  # compiling in the background: the plain path meanwhile
            return True
        if alone and len(request.rows) > 1:  # a batch on its own: the fast path's own bucket
            return True
        return not all(slots.fits(len(row.prompt.ids), row.max_tokens) for row in request.rows)

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        from .constrained import TorchGrammarMask

        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        params = params.in_float32()
        seed = None if params.greedy else params.seed
        media = any(p.media is not None for p in prompts)  # images / audio: generate() reads them
        grammar = self._grammar_matchers(params, len(prompts))
        draft = not media and speculative.drafts(
            self._draft, params, rows=len(prompts), constrained=grammar is not None
        )
        # CUDA: static cache + CUDA graphs (grammars too); its sampling draws from torch's
        # default generator, so seeded sampling takes generate() with its own generator.
        if (
            seed is None
            and not media
            and not draft
            and accel.cuda_generate(self.model, prompts, params, sink, pad_id=pad, grammar=grammar)
        ):
            return
        width = max(len(p.ids) for p in prompts)

        class FeedSink(StoppingCriteria):
            """Hands each step's tokens to the sink (and the grammar); reports finished rows.

            A step of speculative decoding appends every draft token the model kept and
            one of its own: all of them go to the sink, in order."""

            seen = width
            passes = 0  # calls: passes of the model

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                self.passes += 1
                if input_ids.shape[1] - self.seen > 1:
                    for column in input_ids[:, self.seen :].T.tolist():
                        sink.push(column)
                    self.seen = input_ids.shape[1]
                    return torch.tensor(sink.finished(), dtype=torch.bool, device=input_ids.device)
                self.seen = input_ids.shape[1]
                tokens = input_ids[:, -1].tolist()
                if grammar is None:
                    sink.push(tokens)
                else:
                    live = [not done for done in sink.finished()]
                    sink.push(tokens)
                    for row, (token, done) in enumerate(zip(tokens, sink.finished(), strict=True)):
                        if live[row]:
                            grammar.advance(row, token)
                        if done:
                            grammar.retire(row)
                return torch.tensor(sink.finished(), dtype=torch.bool, device=input_ids.device)

        device = self.model.device
        input_ids = torch.tensor(
            [[pad] * (width - len(p.ids)) + list(p.ids) for p in prompts], device=device
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts], device=device
        )
        options: dict[str, Any] = {
            "max_new_tokens": sink.max_new_tokens,
            "eos_token_id": sorted(self._eos_ids),
            "pad_token_id": pad,
            "repetition_penalty": params.repetition_penalty or 1.0,
            "stopping_criteria": StoppingCriteriaList([feed := FeedSink()]),
        }
        processors: list[Any] = [] if grammar is None else [TorchGrammarMask(grammar)]
        if params.greedy or seed is not None:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if seed is not None:
                processors.append(SeededSampler(params, seed))  # last: after the mask
        else:
            options.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
            )
        if params.logit_bias:
            options["sequence_bias"] = {(t,): b for t, b in params.logit_bias}
        if processors:
            options["logits_processor"] = LogitsProcessorList(processors)
        if media:  # pixel_values, token type ids, audio features: prefill reads them
            from .transformers_media import merge

            options.update(merge(prompts, width, device, self.model.dtype))
        if draft:
            options["assistant_model"] = self._draft
        with torch.inference_mode():
            self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        if draft:
            self._draft_stats.add(sink.rows[0].completion_tokens, feed.passes)

    # ------------------------------------------------------------------ media

    def _check_media(self, conversations: Sequence[Any]) -> None:
        from .media import media_kinds

        gemma3n = self._model_type() in ("gemma3n", "gemma3n_text")
        if gemma3n and any(media_kinds(c) for c in conversations):
            raise ValueError(
                f"{self.model_name}: Gemma 3n's images and audio need its full model "
                "(Gemma3nForConditionalGeneration), whose vision tower needs timm, and timm "
                "needs torchvision; gemma-local loads Gemma 3n for text only "
                "(Gemma3nForCausalLM). Send text, use backend='mlx' (mlx-vlm reads Gemma 3n's "
                'images and audio: pip install "gemma-local[mlx-media]"), or use a Gemma 3 / '
                "Gemma 4 checkpoint"
            )
        super()._check_media(conversations)

    def _media_inputs(self, text: str, media: list[Media]) -> tuple[tuple[int, ...], Any]:
        from .base import LOAD_LOCK
        from .transformers_media import encode, load_processor

        if self._processor is None:
            source = str(self._gguf.folder) if self._gguf is not None else self.model_name
            with LOAD_LOCK:
                self._processor = load_processor(
                    source,
                    self._model_type(),
                    trust_remote_code=self.trust_remote_code,
                    **self.hub_kwargs,
                )
        text_ids = self._encode(text)
        bos = getattr(self.tokenizer, "bos_token", None)
        return encode(
            self._processor,
            text,
            media,
            self.family.processor_options(self.media_options),
            add_special_tokens=not (bos and text.startswith(bos)),
            text_ids=len(text_ids),
        )

    # ----------------------------------------------------------------- extras

    def _idle(self) -> None:
        if self.model is not None:
            accel.cuda_idle(self.model)  # the graphs a first request of a shape ran without

    def _release(self) -> None:
        if self.model is not None:
            accel.cuda_release(self.model)  # compiled graphs and KV buffers
        self._draft = None
        self._context_window = None
        self._processor = None

    def _clear_accelerator_cache(self) -> None:
        if "torch" not in sys.modules:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()

    def _describe(self) -> dict[str, Any]:
        if self.use_4bit_quantization:
            quantization = (
                f"bitsandbytes nf4 4-bit (double quant, {self.bnb_4bit_compute_dtype} compute)"
            )
        elif self.use_8bit_quantization:
            quantization = "bitsandbytes int8"
        else:
            quantization = None
        info: dict[str, Any] = {
            "quantization": quantization,
            "trust_remote_code": self.trust_remote_code,
            "device_map": self.device_map,
        }
        if self.draft_model is not None:
            info["speculative"] = self._draft_stats.describe(
                self.draft_model, self.num_draft_tokens
            )
        model = self.model
        if model is None:
            config = read_model_config(self.model_name) or {}
            info["model_type"] = config.get("model_type")
            if self.torch_dtype != "auto":
                info["dtype"] = self.torch_dtype
            return info
        info["model_type"] = model.config.model_type
        info["dtype"] = str(model.dtype).replace("torch.", "")
        device_map = getattr(model, "hf_device_map", None)
        info["device"] = (
            sorted({str(d) for d in device_map.values()}) if device_map else str(model.device)
        )
        info["parameters"] = int(model.num_parameters())
        info["architecture"] = type(model).__name__
        return info
