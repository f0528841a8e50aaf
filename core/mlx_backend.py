"""Apple MLX backend through mlx-lm (Metal on Apple Silicon, ``mlx[cpu]`` on Linux).

MLX streams are thread-local, so loading and every generation run on the
client's one model thread (see :mod:`core.worker`). The token primitive loops
over ``mlx_lm.generate.generate_step`` (what ``mlx_lm.stream_generate`` is
built on) with ``make_sampler`` / ``make_logits_processors`` and pushes each
token into the sink; stop strings, end ids and counts are the sink's work,
since mlx-lm has no stop strings. Constrained requests (tools, JSON output)
add one grammar logits processor per row
(:func:`~core.constrained.mlx_grammar_processor`), in ``generate_step`` and
per row in ``BatchGenerator``.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .base import BaseGemmaChatCompletion, read_model_config
from .errors import MissingDependencyError, UnsupportedPlatformError, require
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


def quantization_from_config(config: dict[str, Any] | None) -> str | None:
    q = (config or {}).get("quantization") or (config or {}).get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    return f"mlx {q['bits']}-bit (group size {q.get('group_size', 64)})"


class GemmaMLXChatCompletion(BaseGemmaChatCompletion):
    """Gemma through Apple MLX (mlx-lm).

    Args:
        model_name: an MLX checkpoint on the hub (e.g. the default 4-bit DWQ
            Gemma 3 12B), a Hugging Face checkpoint (converted on load) or a
            local folder, e.g. one written by ``mlx_lm.convert``.
        trust_remote_code: passed to the tokenizer loader; Gemma needs none.
        adapter_path: optional LoRA adapters to apply.
        max_kv_size: cap the KV cache (rotating cache) for long generations.
        prefill_step_size: prompt tokens processed per step.
    """

    implementation = "mlx"
    supports_constraints = True

    def __init__(
        self,
        model_name: str = "mlx-community/gemma-3-12b-it-4bit-DWQ",
        *,
        trust_remote_code: bool = False,
        adapter_path: str | None = None,
        max_kv_size: int | None = None,
        prefill_step_size: int = 2048,
    ) -> None:
        super().__init__(model_name)
        if max_kv_size is not None and (not isinstance(max_kv_size, int) or max_kv_size < 1):
            raise ValueError(f"max_kv_size must be a positive integer or None, got {max_kv_size!r}")
        if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
            raise ValueError(
                f"prefill_step_size must be a positive integer, got {prefill_step_size!r}"
            )
        self.trust_remote_code = trust_remote_code
        self.adapter_path = adapter_path
        self.max_kv_size = max_kv_size
        self.prefill_step_size = prefill_step_size
        self._wrapper: Any = None
        self._config: dict[str, Any] | None = None

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

        model, wrapper, config = load(
            self.model_name,
            tokenizer_config={"trust_remote_code": self.trust_remote_code},
            adapter_path=self.adapter_path,
            return_config=True,
            trust_remote_code=self.trust_remote_code,
        )
        self.model = model
        self._wrapper = wrapper
        self.tokenizer = wrapper._tokenizer
        self._config = config
        text = config.get("text_config") or {}
        self._context_window = text.get("max_position_embeddings") or config.get(
            "max_position_embeddings"
        )

    def _eos_token_ids(self) -> set[int]:
        return {int(t) for t in getattr(self._wrapper, "eos_token_ids", ()) or ()}

    def _set_seed(self, seed: int) -> None:
        import mlx.core as mx

        mx.random.seed(seed)

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, wired_limit
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        sampler = make_sampler(
            temp=params.temperature,
            top_p=params.top_p if params.top_p < 1.0 else 0.0,
            top_k=params.top_k,
        )
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

        if len(prompts) > 1 and self._batchable():
            self._generate_batch(prompts, sampler, processors, sink)
            return
        with wired_limit(self.model):
            for index, prompt in enumerate(prompts):  # one prompt, or a model that cannot batch
                if sink.done:
                    return
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

    def _batchable(self) -> bool:
        """Whether mlx-lm can run this model on a padded batch.

        mlx-lm's Gemma 2 attention (soft-capped, grouped-query) adds the 4-D
        batch mask to 5-D scores and fails to reshape ("Cannot reshape
        array"), so Gemma 2 rows run one after another.
        """
        config = self._config or {}
        model_type = (config.get("text_config") or {}).get("model_type") or config.get("model_type")
        return model_type not in UNBATCHABLE_MODEL_TYPES

    def _generate_batch(
        self,
        prompts: Sequence[Prompt],
        sampler: Any,
        processors: Callable[[int], list[Any]],
        sink: TokenSink,
    ) -> None:
        """Several prompts in one batch with mlx-lm's ``BatchGenerator`` (per-row processors)."""
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in sorted(self._eos_ids)],
            sampler=sampler,
            completion_batch_size=len(prompts),
            prefill_batch_size=len(prompts),
            prefill_step_size=self.prefill_step_size,
            max_kv_size=self.max_kv_size,
        )
        try:
            uids = generator.insert(
                [list(p.ids) for p in prompts],
                [row.max_tokens for row in sink.rows],
                logits_processors=[processors(i) for i in range(len(prompts))],
            )
            row_of = {uid: i for i, uid in enumerate(uids)}
            while not sink.done and (responses := generator.next_generated()):
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
            generator.close()

    def _release(self) -> None:
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
