#!/usr/bin/env bash
# The whole test suite: install (once), lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")"
# vLLM's CPU build needs an environment of its own (.gl/vllm, see scripts/vllm_env.sh): it is
# built (once) in the background while the rest runs; the vLLM test waits for it.
mkdir -p .gl
scripts/vllm_env.sh > .gl/vllm_env.log 2>&1 &
vllm_env=$!
trap 'wait "$vllm_env" 2> /dev/null || true' EXIT
scripts/bootstrap.sh dev
.venv/bin/ruff check .
.venv/bin/mypy
# Two worker processes (PYTEST_WORKERS), each file's tests on one of them: the suite is mostly
# Python-bound on tiny models, so two workers on two cores take about 0.6x the time of one.
.venv/bin/pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
