"""``gemma-local serve``: its options, its errors (before any model loads), and one real run.

The option tests stop at ``core.server.serve`` (replaced by a recorder) or
fail before a client is built; the last test starts the command in a
subprocess on the tiny checkpoint, asks it one question with the ``openai``
client and stops it with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from core import cli
from core.media import Sources

ROOT = Path(__file__).resolve().parent.parent
TF = ["--backend", "transformers", "--dtype", "float32", "--device-map", "cpu"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors and --help
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_client(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no client may be built for a bad option")

    monkeypatch.setattr(cli, "create_gemma_client", refuse)


def test_help(capsys) -> None:
    code, out, _ = run(["serve", "--help"], capsys)
    assert code == 0 and out.startswith("usage: gemma-local serve ")
    for option in ("--model", "--host", "--port", "--api-key", "GEMMA_LOCAL_API_KEY"):
        assert option in out
    for option in (
        "--max-batch-size",
        "--max-queue",
        "--max-body-size",
        "--served-model-name",
        "--allow-media-urls",
    ):
        assert option in out
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "serve" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "argument --port: must be a port number 0..65535"),
        (["--port", "http"], "argument --port: must be a port number"),
        (["--max-batch-size", "0"], "argument --max-batch-size: must be an integer >= 1, got '0'"),
        (["--max-queue", "-1"], "argument --max-queue: must be an integer >= 0, got '-1'"),
        (["--max-queue", "many"], "argument --max-queue: must be an integer >= 0, got 'many'"),
        (["--max-body-size", "lots"], "argument --max-body-size: must be a size in bytes"),
        (["--max-body-size", "0M"], "argument --max-body-size: must be a size in bytes"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_usage_errors(capsys, no_client, argv, message) -> None:
    code, _, err = run(["serve", "--model", "/nowhere", *argv], capsys)
    assert code == 2 and err.startswith("usage: gemma-local serve ")
    assert f"gemma-local serve: error: {message}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "serve needs --model: a hub id or a local folder"),
        (["--model", "m", "--api-key", " "], "--api-key must not be empty"),
        (["--model", "m", "--served-model-name", ""], "each served model name must be a non-empty"),
        (["--model", "m", "--backend", "mlx", "--4bit"], "--4bit is not an option of the MLX"),
        (
            ["--model", "m", "--backend", "vllm", "--max-queue", "3"],
            "--max-batch-size / --max-queue are not options of the vLLM backend",
        ),
        (
            ["--model", "m.gguf", "--backend", "llamacpp", "--max-batch-size", "4"],
            "--max-batch-size / --max-queue are not options of the llama.cpp backend",
        ),
        (["--model", "m", "--host", "no.such.host.invalid"], "cannot listen on host"),
    ],
)
def test_errors_before_any_load(capsys, no_client, argv, message) -> None:
    code, out, err = run(["serve", "--port", "0", *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("gemma-local: error: ") and message in err


def test_a_taken_port_fails_before_the_load(capsys, no_client) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(["serve", "--model", "m", "--port", str(port)], capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize(
    ("text", "size"),
    [("1", 1), ("512K", 512 * 1024), ("10M", 10 * 1024**2), ("1g", 1024**3), ("2MiB", 2 << 20)],
)
def test_byte_size(text, size) -> None:
    assert cli.byte_size(text) == size


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What ``core.server.serve`` would have served, instead of serving it."""
    import core.server

    calls: list[dict[str, Any]] = []

    def record(client: Any, **options: Any) -> list[int]:
        loaded = client.is_loaded  # loaded before serving; closed after
        calls.append(
            {"client": client, "loaded": loaded, "dtype": str(client.model.dtype), **options}
        )
        return []  # no signal stopped it

    monkeypatch.setattr(core.server, "serve", record)
    return calls


def test_options_reach_the_server(gemma3_path, capsys, monkeypatch, recorded) -> None:
    monkeypatch.setenv("GEMMA_LOCAL_API_KEY", "sk-from-env")
    argv = ["serve", "--model", str(gemma3_path), *TF, "--port", "0", "--max-queue", "7"]
    argv += ["--max-body-size", "1M", "--served-model-name", "a", "--served-model-name", "b"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    [call] = recorded
    assert call["api_key"] == "sk-from-env" and call["served_names"] == ("a", "b")
    assert call["client"].max_queue == 7 and call["max_body_size"] == 1 << 20
    assert call["client"].max_batch_size == 16  # the default
    assert call["log_level"] == "info" and isinstance(call["sock"], socket.socket)
    assert call["client"].implementation == "transformers"
    assert call["loaded"] and call["dtype"] == "torch.float32"  # --dtype reached the client
    assert re.search(r"serving a, b on http://127\.0\.0\.1:\d+/v1 \(API key: required\)", out)
    assert not call["client"].is_loaded  # closed when serving ended

    assert call["media_sources"] == Sources(local_files=False, urls=False)  # inline only

    code, out, _ = run([*argv, "--api-key", "sk-flag"], capsys)  # the flag wins
    assert code == 0 and recorded[-1]["api_key"] == "sk-flag"
    code, out, _ = run([*argv, "--allow-media-urls"], capsys)
    assert code == 0 and recorded[-1]["media_sources"] == Sources(local_files=False, urls=True)
    code, out, _ = run([*argv, "--allow-local-media"], capsys)
    assert code == 0 and recorded[-1]["media_sources"] == Sources(local_files=True, urls=False)


def test_a_server_stopped_by_ctrl_c_exits_130(gemma3_path, capsys, monkeypatch) -> None:
    """uvicorn re-raises the signal after its graceful shutdown, but asyncio may take it as a
    cancel of a task that has already ended: the command reads the signals the server
    returns instead (Ctrl-C: 130, as a shell reports it; SIGTERM: 143)."""
    import core.server

    for stopped, code in (([], 0), ([signal.SIGINT], 130), ([signal.SIGTERM], 143)):
        monkeypatch.setattr(core.server, "serve", lambda client, _s=stopped, **_: list(_s))
        argv = ["serve", "--model", str(gemma3_path), *TF, "--port", "0"]
        assert run(argv, capsys)[0] == code


def test_an_open_host_without_a_key_is_warned_about(gemma3_path, capsys, recorded) -> None:
    code, _, err = run(
        ["serve", "--model", str(gemma3_path), *TF, "--host", "0.0.0.0", "--port", "0"], capsys
    )
    assert code == 0
    assert "warning: listening on 0.0.0.0 without an API key" in err
    assert recorded[0]["api_key"] is None


@pytest.mark.timeout(180)
def test_the_real_command(gemma3_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("GEMMA_LOCAL_API_KEY", None)
    argv = [sys.executable, "-m", "core.cli", "serve", "--model", str(gemma3_path), *TF]
    argv += ["--port", "0", "--api-key", "sk-real", "--log-level", "warning"]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not (lines and lines[-1].startswith("serving")):
            line = proc.stdout.readline()
            assert line, (
                f"the server exited: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
            )
            lines.append(line)
        url = re.search(r"on (http://\S+/v1)", lines[-1]).group(1)  # type: ignore[union-attr]
        with openai.OpenAI(base_url=url, api_key="sk-real", max_retries=0) as client:
            name = client.models.list().data[0].id
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
        assert name == gemma3_path.name and reply.usage.completion_tokens <= 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # Ctrl-C: a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
