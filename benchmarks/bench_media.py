"""Images and audio on both backends, on the tiny multimodal checkpoints (CPU).

    python benchmarks/bench_media.py [--repeats 10] [--max-tokens 16]
    python benchmarks/bench_media.py --memory

Builds the tiny Gemma 3 vision and Gemma 4 vision + audio checkpoints once (in a
temporary folder), then for each backend (transformers float32; MLX: mlx-lm for
text, mlx-vlm for media, see ``core/mlx_media.py``) measures, greedy, with the
end tokens biased away so every reply is ``--max-tokens`` long:

* the first request with an image: on MLX this loads mlx-vlm's model (its
  language weights shared with mlx-lm's) and processor; on transformers the
  processor;
* the median latency of a text request, an image request (Gemma 3: 256 soft
  tokens; Gemma 4: at most 70 on the tiny processor) and on Gemma 4 an audio
  request (0.5 s: 13 soft tokens), each with its prompt length.

The tiny models are 2-4 layers of width 64-128: these numbers show what the
media path costs around the model (processing, prefill with the towers), not
what a real Gemma costs.

``--memory``: a wider Gemma 3 vision checkpoint (hidden 1024, MLP 16384: 390 MB
of float32 weights) on MLX, in two fresh processes: the MLX memory in use
(``mx.get_active_memory()``) after a text request and after the first image
request, and that request's time, with mlx-vlm's language model sharing
mlx-lm's arrays (as gemma-local does) and with weights of its own.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def png(seed: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def wav(hz: float) -> str:
    import numpy as np
    import soundfile

    t = np.arange(8000) / 16000
    out = io.BytesIO()
    soundfile.write(out, 0.5 * np.sin(2 * np.pi * hz * t), 16000, format="WAV")
    return base64.b64encode(out.getvalue()).decode()


def ask(part: dict[str, Any] | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
    return [{"role": "user", "content": content + ([part] if part else [])}]


def client(backend: str, path: Path) -> Any:
    if backend == "transformers":
        from core import GemmaTransformersChatCompletion

        return GemmaTransformersChatCompletion(str(path), device_map="cpu", torch_dtype="float32")
    from core import GemmaMLXChatCompletion

    return GemmaMLXChatCompletion(str(path))


def timed(c: Any, messages: Any, options: dict[str, Any]) -> tuple[float, int]:
    started = time.perf_counter()
    out = c.create(messages, **options)
    elapsed = time.perf_counter() - started
    assert out["usage"]["completion_tokens"] == options["max_tokens"], out["usage"]
    return elapsed, int(out["usage"]["prompt_tokens"])


def memory_run(path: Path, share: bool) -> None:
    import mlx.core as mx

    from core import mlx_media

    if not share:  # what loading mlx-vlm's model on its own would cost
        mlx_media.share_language_weights = lambda vision, text: False  # type: ignore[assignment]
    c = client("mlx", path)
    c.create(ask(None), temperature=0, max_tokens=2)
    before = c._worker.call(mx.get_active_memory)
    started = time.perf_counter()
    c.create(ask({"type": "image_url", "image_url": {"url": png(0)}}), temperature=0, max_tokens=2)
    elapsed = time.perf_counter() - started
    after = c._worker.call(mx.get_active_memory)
    mib = 2**20
    print(
        f"| {'shared' if share else 'own copy'} | {before / mib:.0f} | {after / mib:.0f} | "
        f"{(after - before) / mib:+.0f} | {elapsed:.1f} |",
        flush=True,
    )
    c.close()


def memory() -> None:
    import subprocess

    from core.tiny import build_tiny_checkpoint

    path = Path(tempfile.mkdtemp(prefix="bench-media-")) / "gemma3-wide"
    build_tiny_checkpoint(path, "gemma3", hidden_size=1024, intermediate_size=16384)
    print("| mlx-vlm language weights | MiB after text | MiB after first image | added | s |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("share", "copy"):
        subprocess.run(
            [sys.executable, __file__, "--memory-run", mode, "--path", str(path)], check=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-run", choices=("share", "copy"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_run:
        memory_run(args.path, args.memory_run == "share")
        return
    if args.memory:
        memory()
        return
    from core.tiny import build_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="bench-media-"))
    paths = {arch: build_tiny_checkpoint(root / arch, arch) for arch in ("gemma3", "gemma4")}
    print("| backend | checkpoint | request | prompt tokens | median ms | first image ms |")
    print("|---|---|---|---:|---:|---:|")
    for backend in ("transformers", "mlx"):
        for arch, path in paths.items():
            c = client(backend, path)
            c.load()
            end = sorted(c._eos_ids)  # every end id of the checkpoint and its family
            options = {
                "temperature": 0,
                "max_tokens": args.max_tokens,
                "logit_bias": {t: -100 for t in end},
            }
            c.create(ask(None), **options)  # warm
            first, _ = timed(c, ask({"type": "image_url", "image_url": {"url": png(99)}}), options)
            requests = {
                "text": lambda i: ask(None),
                "image": lambda i: ask({"type": "image_url", "image_url": {"url": png(i)}}),
            }
            if arch == "gemma4":
                requests["audio"] = lambda i: ask(
                    {"type": "input_audio", "input_audio": {"data": wav(200 + i), "format": "wav"}}
                )
            for name, make in requests.items():
                runs = [timed(c, make(i), options) for i in range(args.repeats)]
                median = statistics.median(t for t, _ in runs) * 1000
                shown = f"{first * 1000:.0f}" if name == "image" else ""
                print(
                    f"| {backend} | {arch} | {name} | {runs[0][1]} | {median:.1f} | {shown} |",
                    flush=True,
                )
            c.close()


if __name__ == "__main__":
    main()
