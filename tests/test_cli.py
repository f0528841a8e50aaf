"""The ``gemma-local`` command: usage errors from the right parser, backend-specific options.

Nothing here loads a model except the last test (one greedy token on the tiny
checkpoint): the errors are raised before any client is constructed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core import cli


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", ["chat", "info", "demo"])
def test_unknown_option_prints_the_subcommands_usage(command, capsys) -> None:
    code, _, err = run([command, "--frobnicate"], capsys)
    assert code == 2
    assert err.startswith(f"usage: gemma-local {command} ")
    assert f"gemma-local {command}: error: unrecognized arguments: --frobnicate" in err


def test_unknown_option_among_a_prompt_names_only_the_unknown(capsys) -> None:
    code, _, err = run(["chat", "--temperature", "0", "--frobnicate", "hello", "--bogus=1"], capsys)
    assert code == 2 and err.startswith("usage: gemma-local chat ")
    assert "unrecognized arguments: --frobnicate --bogus=1" in err


def test_no_command_still_prints_the_top_level_usage(capsys) -> None:
    code, _, err = run([], capsys)
    assert code == 2 and err.startswith("usage: gemma-local [-h]")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--4bit"], "--4bit is not an option"),
        (["--dtype", "float32"], "--dtype is not an option"),
        (["--device-map", "cpu"], "--device-map is not an option"),
        (["--4bit", "--dtype", "bfloat16"], "--4bit, --dtype are not options"),
    ],
)
@pytest.mark.parametrize("command", [["chat", "hi"], ["info"]])
def test_transformers_options_on_mlx_are_refused(monkeypatch, capsys, command, flags, named):
    def no_client(*args, **kwargs):
        raise AssertionError("no client may be built for a bad option")

    monkeypatch.setattr(cli, "create_gemma_client", no_client)
    argv = [command[0], "--backend", "mlx", "--model", "/nowhere", *flags, *command[1:]]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"gemma-local: error: {named}")
    assert "of the MLX backend (transformers only)" in err
    assert "--backend transformers" in err


def test_auto_backend_that_picks_mlx_refuses_them_too(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "resolve_backend", lambda backend: "mlx")
    monkeypatch.setattr(cli, "create_gemma_client", pytest.fail)
    code, _, err = run(["info", "--4bit", "--model", "/nowhere"], capsys)
    assert code == 2 and "--4bit is not an option of the MLX backend" in err


def test_transformers_options_reach_the_transformers_client(monkeypatch, capsys) -> None:
    seen = {}

    class Client:
        def get_model_info(self):
            return {"ok": True}

    def fake(backend, model, **options):
        seen.update(backend=backend, model=model, options=options)
        return Client()

    monkeypatch.setattr(cli, "create_gemma_client", fake)
    argv = ["info", "--backend", "transformers", "--model", "m", "--4bit"]
    code, out, _ = run([*argv, "--dtype", "float32", "--device-map", "cpu"], capsys)
    assert code == 0 and '"ok": true' in out
    assert seen == {
        "backend": "transformers",
        "model": "m",
        "options": {"use_4bit_quantization": True, "device_map": "cpu", "torch_dtype": "float32"},
    }


def test_chat_on_mlx_runs_without_transformers_options(gemma3_path: Path, capsys) -> None:
    argv = ["chat", "--backend", "mlx", "--model", str(gemma3_path), "--temperature", "0"]
    code, out, _ = run([*argv, "--max-tokens", "1", "hi"], capsys)
    assert code == 0 and out.endswith("\n")
