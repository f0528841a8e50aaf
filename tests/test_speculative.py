"""Speculative decoding (``draft_model``, :mod:`core.speculative`) on transformers and MLX.

Every drafted reply is checked against the same request on a client without a draft
(greedy, float32 tiny checkpoints whose sliding window is cut to 16 tokens, so replies run
past it and a rejected draft must be rewound through it). Three drafts: a random 1-layer
model with the tokenizer (it almost never agrees: every pass keeps one token), the model
itself (it always agrees: several tokens a pass, so a stop string or ``max_tokens`` falls
inside a kept draft), and, for Gemma 4 on transformers, a Gemma 4 assistant
(``gemma4_assistant``, drafting from the model's hidden state and keys and values).
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_client
from test_core_support import PROMPTS

from core import cli
from core.tiny import build_tiny_checkpoint, build_tiny_gemma4_assistant

GREEDY = {"temperature": 0, "max_tokens": 48}
WINDOW = 16


def small_window(path: Path) -> Path:
    config = json.loads((path / "config.json").read_text())
    for section in (config, config.get("text_config") or {}):
        if "sliding_window" in section:
            section["sliding_window"] = WINDOW
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speculative")
    gemma3 = small_window(build_tiny_checkpoint(root / "gemma3", "gemma3_text"))
    gemma4 = small_window(build_tiny_checkpoint(root / "gemma4", "gemma4_text"))
    return {
        "gemma3": gemma3,
        "random": small_window(
            build_tiny_checkpoint(root / "draft", "gemma3_text", seed=5, num_hidden_layers=1)
        ),
        "gemma4": gemma4,
        "assistant": build_tiny_gemma4_assistant(root / "assistant", gemma4),
    }


@pytest.fixture(scope="module")
def clients(paths):
    """Clients by (backend, model, draft); draft ``None``: the client without one."""
    made: dict[tuple[str, str, str | None], object] = {}

    def get(backend: str, model: str, draft: str | None = None, **options):
        key = (backend, model, draft, *sorted(options.items()))
        if key not in made:
            extra = {} if draft is None else {"draft_model": str(paths[draft])}
            made[key] = make_client(backend, paths[model], **extra, **options)
        return made[key]

    yield get
    for client in made.values():
        client.close()


CASES = [
    ("transformers", "gemma3", "random"),
    ("transformers", "gemma3", "gemma3"),
    ("transformers", "gemma4", "assistant"),
    ("mlx", "gemma3", "random"),
    ("mlx", "gemma3", "gemma3"),
]


def reply(result: dict) -> tuple:
    return result["choices"], result["usage"]


@pytest.mark.parametrize(("backend", "model", "draft"), CASES)
def test_greedy_replies_equal_the_replies_without_a_draft(
    paths, clients, backend, model, draft
) -> None:
    plain, drafted = clients(backend, model), clients(backend, model, draft)
    before = drafted.get_model_info()["speculative"]
    for messages in PROMPTS:
        assert reply(drafted.create(messages, **GREEDY)) == reply(plain.create(messages, **GREEDY))
    streamed = [
        c["choices"][0]["delta"].get("content") or ""
        for c in drafted.create(PROMPTS[0], stream=True, **GREEDY)
        if c["choices"]  # not the closing usage chunk
    ]
    lone = plain.create(PROMPTS[0], **GREEDY)["choices"][0]["message"]["content"]
    assert "".join(streamed) == lone
    after = drafted.get_model_info()["speculative"]
    assert after["draft_model"] == str(paths[draft])
    assert after["requests"] == before["requests"] + len(PROMPTS) + 1
    assert after["tokens"] > before["tokens"] and after["model_passes"] > before["model_passes"]
    per_pass = (after["tokens"] - before["tokens"]) / (
        after["model_passes"] - before["model_passes"]
    )
    if draft == model:  # the model as its own draft: every draft kept
        assert per_pass > 1.5
    else:
        assert per_pass >= 1


@pytest.mark.parametrize(
    ("backend", "model", "draft"),
    [("transformers", "gemma3", "random"), ("transformers", "gemma4", "assistant"), CASES[3]],
)
def test_a_drafted_chat_answers_each_turn_as_without_a_draft(
    clients, backend, model, draft
) -> None:
    """Turn after turn (the client without a draft reuses its prompt cache; a drafted request
    prefills its whole prompt: transformers' assisted generation handed a filled cache
    continues it with other tokens)."""
    from test_prompt_cache import outcome, turns

    plain, drafted = clients(backend, model), clients(backend, model, draft)
    together = turns(drafted, f"speak of {draft}")
    assert [outcome(r) for r in together] == [outcome(r) for r in turns(plain, f"speak of {draft}")]


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3n"])
def test_mlx_drafts_gemma_1_2_and_3n_as_without_a_draft(tmp_path, arch) -> None:
    """The other model types MLX drafts for (full KV caches; Gemma 2 and 3n slide a window
    too), with a draft of other random weights: every rejection is rewound."""
    model = small_window(build_tiny_checkpoint(tmp_path / "model", arch))
    draft = small_window(build_tiny_checkpoint(tmp_path / "draft", arch, seed=5))
    plain = make_client("mlx", model)
    drafted = make_client("mlx", model, draft_model=str(draft), num_draft_tokens=3)
    try:
        for messages in PROMPTS[:2]:
            assert reply(drafted.create(messages, **GREEDY)) == reply(
                plain.create(messages, **GREEDY)
            )
        assert drafted.get_model_info()["speculative"]["requests"] == 2
    finally:
        plain.close()
        drafted.close()


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_stop_strings_and_max_tokens_inside_a_kept_draft(clients, backend) -> None:
    plain = clients(backend, "gemma3")
    drafted = clients(backend, "gemma3", "gemma3", num_draft_tokens=6)
    full = plain.create(PROMPTS[0], **GREEDY)["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    for options in ({"stop": [stop]}, {"max_tokens": 5}, {"max_tokens": 1}):
        settings = {**GREEDY, **options}
        assert reply(drafted.create(PROMPTS[0], **settings)) == reply(
            plain.create(PROMPTS[0], **settings)
        )
    info = drafted.get_model_info()["speculative"]
    assert info["num_draft_tokens"] == 6 and info["tokens"] / info["model_passes"] > 2


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_requests_that_cannot_draft_decode_as_without_one(clients, backend) -> None:
    """A grammar (tools, JSON), a seed or several rows: no draft, the same replies."""
    plain, drafted = clients(backend, "gemma3"), clients(backend, "gemma3", "gemma3")
    before = drafted.get_model_info()["speculative"]["requests"]
    requests = [
        {**GREEDY, "tools": [TOOL], "tool_choice": "required"},
        {**GREEDY, "response_format": {"type": "json_object"}},
        {"temperature": 0.9, "max_tokens": 24, "seed": 7},
        {**GREEDY, "n": 2},
    ]
    for options in requests:
        assert reply(drafted.create(PROMPTS[1], **options)) == reply(
            plain.create(PROMPTS[1], **options)
        )
    assert drafted.get_model_info()["speculative"]["requests"] == before


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_concurrent_requests_get_their_lone_replies(clients, backend) -> None:
    """Beside other requests a request joins the batch; alone it drafts: the same tokens."""
    plain, drafted = clients(backend, "gemma3"), clients(backend, "gemma3", "random")
    prompts = [[{"role": "user", "content": f"tell me about the sea {i}"}] for i in range(6)]
    alone = [reply(plain.create(m, **GREEDY)) for m in prompts]
    start = threading.Barrier(len(prompts))

    def ask(messages):
        start.wait()
        return reply(drafted.create(messages, **GREEDY))

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == alone


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_a_sampled_request_drafts(clients, backend) -> None:
    drafted = clients(backend, "gemma3", "gemma3")
    before = drafted.get_model_info()["speculative"]["requests"]
    result = drafted.create(PROMPTS[0], temperature=0.8, top_p=0.9, max_tokens=20)
    assert 1 <= result["usage"]["completion_tokens"] <= 20
    assert drafted.get_model_info()["speculative"]["requests"] == before + 1


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"draft_model": 3}, "draft_model must be a hub id or a local folder"),
        ({"draft_model": " "}, "draft_model must be a hub id or a local folder"),
        ({"draft_model": "d.gguf"}, "a GGUF draft is not supported"),
        ({"num_draft_tokens": 2}, "it needs draft_model"),
        ({"draft_model": "some/model", "num_draft_tokens": 0}, "from 1 to 64, got 0"),
        ({"draft_model": "some/model", "num_draft_tokens": 65}, "from 1 to 64, got 65"),
        ({"draft_model": "some/model", "num_draft_tokens": True}, "got True"),
        ({"draft_model": "some/model", "num_draft_tokens": "3"}, "got '3'"),
    ],
)
def test_bad_options_are_refused_before_any_load(paths, backend, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_client(backend, paths["gemma3"], **options)


def test_a_folder_without_a_config_is_refused(paths, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"a folder without config\.json"):
        make_client("transformers", paths["gemma3"], draft_model=str(tmp_path))


def test_mlx_refuses_gemma4_and_a_rotating_cache_before_any_load(paths) -> None:
    with pytest.raises(ValueError, match=r"is a gemma4_text model: .*backend='transformers'"):
        make_client("mlx", paths["gemma4"], draft_model=str(paths["gemma3"]))
    with pytest.raises(ValueError, match="cannot be combined with max_kv_size"):
        make_client("mlx", paths["gemma3"], draft_model=str(paths["random"]), max_kv_size=64)


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
@pytest.mark.parametrize(
    ("vocab_size", "message"),
    [
        (640, r"vocabulary of 640 tokens .* one of 512: the draft could propose ids"),
        (384, r"has another tokenizer than .* \(384 and 512 tokens"),
    ],
)
def test_a_draft_of_another_vocabulary_fails_the_load(
    paths, tmp_path, backend, vocab_size, message
) -> None:
    other = build_tiny_checkpoint(tmp_path / "other", "gemma3_text", vocab_size=vocab_size)
    client = make_client(backend, paths["gemma3"], draft_model=str(other))
    with pytest.raises(ValueError, match=message):
        client.load()
    client.close()


def padded(source: Path, path: Path, rows: int) -> Path:
    """``source`` with its vocabulary padded to ``rows`` zero rows, the tokenizer unchanged:
    what Gemma 3 4B-27B are (262,144 tokens in 262,208 rows) to a 270M / 1B draft."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    size = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[size:] = 0
    model.save_pretrained(path)
    for file in source.iterdir():
        if "token" in file.name or file.name == "generation_config.json":
            shutil.copy(file, path / file.name)
    return path


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_a_draft_with_fewer_rows_than_the_model(paths, tmp_path, backend) -> None:
    """The model pads the tokenizer's 512 tokens to 576 rows, the draft (the model's own
    weights, unpadded) has 512: greedy replies equal the model's alone, drafts kept."""
    model = padded(paths["gemma3"], tmp_path / "padded", 576)
    plain = make_client(backend, model)
    drafted = make_client(backend, model, draft_model=str(paths["gemma3"]), num_draft_tokens=4)
    try:
        for messages in PROMPTS:
            settings = {**GREEDY, "logit_bias": {300: 2.0}, "repetition_penalty": 1.3}
            assert reply(drafted.create(messages, **settings)) == reply(
                plain.create(messages, **settings)
            )
        info = drafted.get_model_info()["speculative"]
        assert info["requests"] == len(PROMPTS) and info["tokens"] / info["model_passes"] > 1.5
    finally:
        plain.close()
        drafted.close()


def test_a_gemma4_assistant_needs_its_gemma4_model(paths) -> None:
    client = make_client("transformers", paths["gemma3"], draft_model=str(paths["assistant"]))
    with pytest.raises(ValueError, match=r"is a Gemma 4 assistant: .* is Gemma3ForCausalLM"):
        client.load()
    client.close()


@pytest.mark.parametrize("backend", ["vllm", "llamacpp"])
def test_the_cli_refuses_a_draft_on_other_backends(monkeypatch, capsys, backend) -> None:
    monkeypatch.setattr(cli, "create_gemma_client", pytest.fail)
    argv = ["info", "--backend", backend, "--model", "/nowhere", "--draft-model", "d"]
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and "--draft-model: speculative decoding runs on the transformers" in err


def test_the_cli_passes_the_draft_options(monkeypatch, capsys) -> None:
    seen = {}

    class Client:
        def get_model_info(self):
            return {}

    def fake(backend, model, **options):
        seen.update(options)
        return Client()

    monkeypatch.setattr(cli, "create_gemma_client", fake)
    argv = ["info", "--backend", "mlx", "--model", "m", "--draft-model", "d"]
    assert cli.main([*argv, "--num-draft-tokens", "5"]) == 0
    assert seen == {"draft_model": "d", "num_draft_tokens": 5}
