#!/usr/bin/env bash
# The whole test suite: install (once), lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh dev
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest "$@"
