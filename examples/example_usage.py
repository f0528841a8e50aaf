"""Example usage, mirroring the original design's ``example_usage.py``.

    python examples/example_usage.py                 # offline: tiny random-weight Gemma 3
    python examples/example_usage.py --real          # the real default models (hub needed)

Sections: MLX, transformers, transformers with 4-bit, the factories, and a
side-by-side comparison of the backends on one conversation.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

from core import (
    GemmaMLXChatCompletion,
    GemmaTransformersChatCompletion,
    create_gemma_client,
    create_gemma_transformers_client,
)

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Explain what a token is in one sentence."},
]


def show(title: str, response: dict) -> None:
    usage = response["usage"]
    print(f"\n=== {title}")
    print(response["choices"][0]["message"]["content"].strip())
    print(
        f"[finish_reason={response['choices'][0]['finish_reason']}, "
        f"prompt={usage['prompt_tokens']}, completion={usage['completion_tokens']}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", action="store_true", help="use the real default models")
    args = parser.parse_args()

    if args.real:
        tf_model, mlx_model = "google/gemma-3-12b-it", "mlx-community/gemma-3-12b-it-4bit-DWQ"
    else:
        from core.cli import tiny_demo_model

        tf_model = mlx_model = str(tiny_demo_model())
    has_mlx = importlib.util.find_spec("mlx_lm") is not None

    # 1. MLX (Apple Silicon, or mlx[cpu] on Linux)
    if has_mlx:
        with GemmaMLXChatCompletion(model_name=mlx_model) as mlx_client:
            show("MLX", mlx_client.create(MESSAGES, temperature=0.7, max_tokens=64))
            print(mlx_client.get_model_info())

    # 2. transformers, bf16 / float32
    with GemmaTransformersChatCompletion(
        model_name=tf_model, use_4bit_quantization=False, device_map="auto"
    ) as tf_client:
        show("transformers", tf_client.create(MESSAGES, temperature=0.7, max_tokens=64))
        print("streamed: ", end="")
        for chunk in tf_client.create(MESSAGES, max_tokens=32, stream=True):
            for choice in chunk["choices"]:
                print(choice["delta"].get("content", ""), end="", flush=True)
        print()

    # 3. transformers with bitsandbytes NF4 4-bit
    if importlib.util.find_spec("bitsandbytes") is not None:
        with create_gemma_transformers_client(
            model_name=tf_model, use_4bit_quantization=True
        ) as q_client:
            show("transformers 4-bit", q_client.create(MESSAGES, max_tokens=64))
            print(q_client.get_model_info()["quantization"])

    # 4. the factory: the best backend for this machine
    client = create_gemma_client(backend="auto", model_name=tf_model)
    show(f"create_gemma_client -> {client.implementation}", client.create(MESSAGES, max_tokens=32))
    client.close()

    # 5. side by side, greedy
    backends = {"transformers": GemmaTransformersChatCompletion(tf_model, torch_dtype="float32")}
    if has_mlx:
        backends["mlx"] = GemmaMLXChatCompletion(mlx_model)
    for name, backend in backends.items():
        with backend:
            backend.load()
            started = time.perf_counter()
            response = backend.create(MESSAGES, temperature=0, max_tokens=48)
            elapsed = time.perf_counter() - started
            show(
                f"{name} (greedy, {response['usage']['completion_tokens'] / elapsed:.0f} tok/s)",
                response,
            )


if __name__ == "__main__":
    main()
