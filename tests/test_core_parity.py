"""Every Gemma architecture through ``create()`` on both backends, and cross-backend parity.

The tiny checkpoints are float32, so transformers and MLX compute the same
logits up to rounding: greedy decoding must pick the same token ids.
"""

from __future__ import annotations

import pytest
from conftest import make_client
from test_core_support import BOS, PROMPTS, USER, content, generated_ids

ARCHS = ("gemma3_text", "gemma3", "gemma2", "gemma")
PATH_FIXTURE = {
    "gemma3_text": "gemma3_path",
    "gemma3": "gemma3_vision_path",
    "gemma2": "gemma2_path",
    "gemma": "gemma1_path",
}
SYSTEM = [{"role": "system", "content": "Be brief."}, *USER]


@pytest.fixture(scope="module")
def arch_clients(request):
    """``{(arch, backend): client}``, each loaded once for this module (Gemma 3 text: the shared ones)."""
    clients: dict[tuple[str, str], object] = {
        ("gemma3_text", "transformers"): request.getfixturevalue("tf_client"),
        ("gemma3_text", "mlx"): request.getfixturevalue("mlx_client"),
    }
    own = []
    for arch in ARCHS[1:]:
        path = request.getfixturevalue(PATH_FIXTURE[arch])
        for backend in ("transformers", "mlx"):
            clients[arch, backend] = make_client(backend, path)
            own.append(clients[arch, backend])
    yield clients
    for client in own:
        client.close()


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_through_create(arch_clients, arch, backend) -> None:
    client = arch_clients[arch, backend]
    out = client.create(SYSTEM, temperature=0, max_tokens=6, logit_bias={1: -100, 106: -100})
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["finish_reason"] == "length"
    prompt = client.format_prompt(SYSTEM)
    assert out["usage"] == {
        "prompt_tokens": len(prompt.ids),
        "completion_tokens": 6,
        "total_tokens": len(prompt.ids) + 6,
    }
    assert prompt.ids[0] == BOS and prompt.ids[1] != BOS
    chunks = list(client.create(SYSTEM, temperature=0, max_tokens=6, stream=True))
    assert chunks[-1]["usage"]["prompt_tokens"] == len(prompt.ids)
    info = client.get_model_info()
    assert info["loaded"] and info["model_type"] == arch
    assert info["context_window"] == 2048
    assert info["parameters"] and info["dtype"] == "float32"


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
@pytest.mark.parametrize("arch", ARCHS)
def test_system_message_lands_in_the_first_user_turn(arch_clients, arch, backend) -> None:
    client = arch_clients[arch, backend]
    text = client.format_prompt(SYSTEM).text
    assert text.startswith(
        "<bos><start_of_turn>user\nBe brief.\n\nWrite a short poem about the sea.<end_of_turn>\n"
    )
    assert text.endswith("<start_of_turn>model\n") and "system" not in text
    # Gemma 1/2 templates reject a system role: core folds it; Gemma 3's template folds it itself.
    assert client._system_role is arch.startswith("gemma3")


@pytest.mark.parametrize("arch", ["gemma2", "gemma"])
def test_gemma2_template_rejects_system_role_but_client_folds(arch_clients, arch) -> None:
    client = arch_clients[arch, "transformers"]
    with pytest.raises(Exception, match="System role not supported"):
        client.tokenizer.apply_chat_template(SYSTEM, tokenize=False, add_generation_prompt=True)
    folded = [{"role": "user", "content": "Be brief.\n\nWrite a short poem about the sea."}]
    assert client.format_prompt(SYSTEM) == client.format_prompt(folded)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_and_mlx_generate_the_same_tokens(arch_clients, arch) -> None:
    tf, mlx = arch_clients[arch, "transformers"], arch_clients[arch, "mlx"]
    for messages in [*PROMPTS, SYSTEM]:
        assert tf.format_prompt(messages) == mlx.format_prompt(messages)
        tf_ids, _ = generated_ids(tf, messages, max_tokens=24)
        mlx_ids, _ = generated_ids(mlx, messages, max_tokens=24)
        assert tf_ids == mlx_ids
        assert len(tf_ids) == 24 or tf_ids[-1] in tf._eos_ids
        tf_out = tf.create(messages, temperature=0, max_tokens=24)
        mlx_out = mlx.create(messages, temperature=0, max_tokens=24)
        assert content(tf_out) == content(mlx_out)
        assert tf_out["usage"] == mlx_out["usage"]
        assert tf_out["choices"][0]["finish_reason"] == mlx_out["choices"][0]["finish_reason"]


@pytest.mark.parametrize("arch", ARCHS)
def test_batches_agree_across_backends_and_with_singles(arch_clients, arch) -> None:
    results = {}
    for backend in ("transformers", "mlx"):
        client = arch_clients[arch, backend]
        batch = client.create_batch(PROMPTS, temperature=0, max_tokens=10)
        singles = [client.create(m, temperature=0, max_tokens=10) for m in PROMPTS]
        assert [b["choices"] for b in batch] == [s["choices"] for s in singles]
        assert [b["usage"] for b in batch] == [s["usage"] for s in singles]
        results[backend] = [(content(b), b["usage"]) for b in batch]
    assert results["transformers"] == results["mlx"]


def test_logit_bias_parity(arch_clients) -> None:
    tf, mlx = arch_clients["gemma3_text", "transformers"], arch_clients["gemma3_text", "mlx"]
    bias = {119: 3.0, 126: 2.0, 188: -5.0}
    tf_ids, _ = generated_ids(tf, USER, max_tokens=16, logit_bias=bias)
    mlx_ids, _ = generated_ids(mlx, USER, max_tokens=16, logit_bias=bias)
    assert tf_ids == mlx_ids
