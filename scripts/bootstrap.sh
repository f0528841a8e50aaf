#!/usr/bin/env bash
# Create .venv (once) and install gemma-local with the given extras into it.
# Usage: scripts/bootstrap.sh EXTRAS   (e.g. "all" or "dev")
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-all}
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
hash=$(.venv/bin/python - <<'PY'
import hashlib, pathlib
print(hashlib.sha1(b"".join(pathlib.Path(p).read_bytes() for p in ("pyproject.toml", "constraints.txt"))).hexdigest()[:12])
PY
)
stamp=".venv/.installed-${extras}-${hash}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
  touch "$stamp"
fi
