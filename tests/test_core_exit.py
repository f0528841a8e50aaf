"""The process exits cleanly after clients are used, closed and reused.

MLX (0.32) aborts at exit ("terminate called without an active exception")
once a thread that ran MLX work has ended before the process, and freeing
native state from daemon threads during interpreter teardown can crash too.
Both show only when the interpreter exits, so these run in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_two_clients_one_after_another_exit_cleanly(backend: str, gemma3_path: Path) -> None:
    result = run_script(
        f"""
        import core
        messages = [{{"role": "user", "content": "hi"}}]
        for _ in range(2):
            client = core.create_gemma_client({backend!r}, {str(gemma3_path)!r})
            print(client.create(messages, temperature=0, max_tokens=4)["usage"]["completion_tokens"])
            client.close()
        reopened = core.create_gemma_client({backend!r}, {str(gemma3_path)!r})
        reopened.create(messages, max_tokens=2)  # left open: closed at exit
        print("done")
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["4", "4", "done"]


def test_mlx_clients_share_one_model_thread(gemma3_path: Path) -> None:
    from core import GemmaMLXChatCompletion

    first = GemmaMLXChatCompletion(str(gemma3_path))
    second = GemmaMLXChatCompletion(str(gemma3_path))
    assert first._worker is second._worker
    first.close()  # the shared thread keeps serving the other client
    assert second.create([{"role": "user", "content": "x"}], max_tokens=2)["usage"]
    second.close()
